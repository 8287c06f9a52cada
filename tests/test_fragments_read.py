"""Reading fragments (workflows/fragments.py::read_fragment): equal to geopandas' own reader."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely
from geopandas.testing import assert_geodataframe_equal

from rtsmap.pipeline.vectorize import empty_polygons
from rtsmap.workflows import fragments
from rtsmap.workflows.fragments import read_fragment


def detections(crs="EPSG:3413", n=5):
    rng = np.random.default_rng(1)
    boxes = [shapely.box(x, y, x + 30, y + 20) for x, y in rng.uniform(0, 1000, (n, 2))]
    return gpd.GeoDataFrame({"score": rng.uniform(0, 1, n).astype(np.float32), "tile_id": [f"t{i}" for i in range(n)],
                             "n": np.arange(n, dtype=np.int64)}, geometry=boxes, crs=crs)


def test_fragments_read_as_geopandas_reads_them(tmp_path):
    for i, frame in enumerate([detections(), detections(crs="EPSG:32606"), empty_polygons("EPSG:3413"),
                               detections().set_geometry(gpd.GeoSeries([None] * 5, crs="EPSG:3413"))]):
        path = tmp_path / f"f{i}.parquet"
        frame.to_parquet(path, index=False)
        ours, theirs = read_fragment(path), gpd.read_parquet(path)
        assert_geodataframe_equal(ours, theirs, check_like=False)
        assert list(ours.columns) == list(theirs.columns)


def test_the_crs_is_parsed_once_per_process(tmp_path):
    fragments._parsed_crs.cache_clear()
    for i in range(3):
        detections().to_parquet(tmp_path / f"{i}.parquet", index=False)
        assert read_fragment(tmp_path / f"{i}.parquet").crs == pyproj.CRS("EPSG:3413")
    info = fragments._parsed_crs.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_other_layouts_are_left_to_geopandas(tmp_path):
    frame = detections()
    frame["centre"] = frame.centroid  # two geometry columns: not a fragment's layout
    path = tmp_path / "two.parquet"
    frame.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(pd.DataFrame(read_fragment(path)), pd.DataFrame(gpd.read_parquet(path)))
