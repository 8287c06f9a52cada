"""stac-geoparquet search with pushdown: the same items as a full read filtered in Python."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rustac

from benchmarks.pan_arctic_catalog import write_catalog
from rtsmap.pipeline.errors import CatalogError
from rtsmap.pipeline.geoparquet import search_geoparquet

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A 66-70 N slice of the synthetic pan-Arctic catalog, two years, in small row groups."""
    out = tmp_path_factory.mktemp("pan_arctic")
    counts = write_catalog(out, [2021, 2024], south=66.0, north=70.0, s2_per_cell=3, s1_per_frame=4, ndjson=True)
    return out, counts


def _overlaps(item, bbox, start, end, collections):
    if item["collection"] not in collections:
        return False
    b = item["bbox"]
    if not (b[0] <= bbox[2] and b[2] >= bbox[0] and b[1] <= bbox[3] and b[3] >= bbox[1]):
        return False
    p = item["properties"]
    lo = p.get("start_datetime") or p["datetime"]
    hi = p.get("end_datetime") or p["datetime"]
    lo, hi = (dt.datetime.fromisoformat(v.replace("Z", "+00:00")) for v in (lo, hi))
    return hi >= start and lo <= end


@pytest.mark.parametrize(
    "bbox, start, end, collections",
    [
        ((-135.0, 68.0, -134.0, 69.0), dt.datetime(2024, 7, 1, tzinfo=UTC), dt.datetime(2024, 8, 31, 23, 59, tzinfo=UTC),
         ["sentinel-2-l2a", "sentinel-1-rtc"]),
        ((100.0, 66.0, 140.0, 67.5), dt.datetime(2021, 7, 10, tzinfo=UTC), dt.datetime(2021, 7, 20, tzinfo=UTC),
         ["sentinel-1-rtc"]),
        ((-180.0, 66.0, 180.0, 70.0), dt.datetime(2021, 1, 1, tzinfo=UTC), dt.datetime(2021, 12, 31, tzinfo=UTC),
         ["cop-dem-glo-30", "sentinel-2-l2a"]),
        ((10.0, 69.5, 10.5, 69.6), dt.datetime(2010, 1, 1, tzinfo=UTC), dt.datetime(2030, 1, 1, tzinfo=UTC),
         ["cop-dem-glo-30"]),
    ],
)
def test_pushdown_returns_the_items_of_a_full_read(snapshot, bbox, start, end, collections):
    out, _ = snapshot
    everything = [item for file in sorted((out / "catalog").rglob("*.parquet")) for item in rustac.read_sync(str(file))["features"]]
    expected = sorted(item["id"] for item in everything if _overlaps(item, bbox, start, end, collections))
    found = list(search_geoparquet(out / "catalog", collections=collections, bbox=bbox, start=start, end=end))
    assert sorted(item["id"] for item in found) == expected
    assert expected, "the case should match some items"
    assert len(found) < len(everything)


def test_row_groups_are_skipped(snapshot):
    """The snapshot's row groups are small, so a narrow search touches few of them (statistics)."""
    out, _ = snapshot
    file = out / "catalog" / "sentinel-2-l2a" / "2024.parquet"
    assert pq.ParquetFile(file).metadata.num_row_groups >= 2


def test_snapshot_made_with_rustac_translate_is_searchable(snapshot, tmp_path):
    """The documented way to make a snapshot for an offline site: `rustac translate` of NDJSON."""
    out, counts = snapshot
    target = tmp_path / "snapshot.parquet"
    rustac_cli = Path(sys.executable).with_name("rustac")  # the CLI that the rustac package installs
    subprocess.run([str(rustac_cli), "translate", str(out / "catalog.ndjson"), str(target)], check=True, capture_output=True)
    items = list(search_geoparquet(target, collections=["cop-dem-glo-30"]))
    assert len(items) == counts["cop-dem-glo-30"]
    assert all(item["links"][0]["href"].startswith("https://planetarycomputer") for item in items)


def test_not_geoparquet_is_one_catalog_error(tmp_path):
    bad = tmp_path / "items.parquet"
    bad.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(CatalogError, match="not readable stac-geoparquet"):
        list(search_geoparquet(bad))
    with pytest.raises(CatalogError, match="not a stac-geoparquet file"):
        list(search_geoparquet(tmp_path / "missing.parquet"))
