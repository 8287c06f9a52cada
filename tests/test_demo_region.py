"""The synthetic demo region: real COGs on native grids, STAC, truth, and the cues fusion needs."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from click.testing import CliRunner
from pyproj import Transformer
from shapely import affinity
from shapely.ops import polylabel

from rtsmap.pipeline.errors import ConfigError, OutputError
from rtsmap.workflows import demo_region as dr
from rtsmap.workflows import shapes as shp

EXPECTED = {
    dr.OPTICAL_COLLECTION: {"crs": 32608, "res": 10.0, "assets": {"blue": ("uint16", 0), "green": ("uint16", 0), "red": ("uint16", 0), "nir": ("uint16", 0), "scl": ("uint8", 0)}},
    dr.SAR_COLLECTION: {"crs": 32609, "res": 20.0, "assets": {"vv": ("float32", 0), "vh": ("float32", 0)}},
    dr.DEM_COLLECTION: {"crs": 3413, "res": 10.0, "assets": {"dem": ("float32", -9999)}},
}


def _items(region) -> list[pystac.Item]:
    return list(pystac.ItemCollection.from_file(str(region.items)))


def _by_collection(region, collection: str) -> list[pystac.Item]:
    return [i for i in _items(region) if i.collection_id == collection]


def _truth(region, layer: str) -> gpd.GeoDataFrame:
    return gpd.read_file(region.truth, layer=layer)


def _masks(geoms, src) -> np.ndarray:
    """Rasterize 3413 geometries onto an open raster's grid (after reprojecting them)."""
    g = gpd.GeoSeries(list(geoms), crs=3413).to_crs(src.crs)
    return rasterio.features.rasterize([(x, 1) for x in g if not x.is_empty], out_shape=src.shape, transform=src.transform, dtype="uint8") > 0


def _inside_and_ring(poly, inner_m: float, ring: tuple[float, float]):
    return poly.buffer(-inner_m), poly.buffer(ring[1]).difference(poly.buffer(ring[0]))


def _sample(src, x3413: float, y3413: float, half: int = 0) -> np.ndarray:
    """Pixels around a 3413 coordinate in a raster of any CRS (transformed, then indexed)."""
    x, y = Transformer.from_crs("EPSG:3413", src.crs, always_xy=True).transform(x3413, y3413)
    row, col = src.index(x, y)
    win = rasterio.windows.Window(col - half, row - half, 2 * half + 1, 2 * half + 1)
    return src.read(1, window=win).astype(np.float64)


# --- files, grids, STAC ----------------------------------------------------------------------------


def test_rasters_are_tiled_cogs_on_their_native_grids(demo_region):
    items = _items(demo_region)
    assert {i.collection_id for i in items} == set(EXPECTED)
    for item in items:
        spec = EXPECTED[item.collection_id]
        assert set(item.assets) == set(spec["assets"])
        for key, asset in item.assets.items():
            path = Path(asset.href)
            assert path.is_absolute() and path.exists(), asset.href
            assert path.parent == demo_region.root / "cogs" / item.collection_id / item.id
            with rasterio.open(path) as src:
                assert src.crs.to_epsg() == spec["crs"]
                assert src.res == (spec["res"], spec["res"])
                assert src.dtypes[0] == spec["assets"][key][0]
                assert src.nodata == spec["assets"][key][1]
                assert src.block_shapes[0] == (256, 256) and src.profile["tiled"]
                assert len(src.overviews(1)) >= 2
                assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                # the STAC projection fields describe the raster exactly
                assert item.properties["proj:code"] == f"EPSG:{spec['crs']}"
                assert tuple(item.properties["proj:shape"]) == src.shape
                assert item.properties["proj:transform"] == pytest.approx(list(src.transform)[:6])


def test_stac_outputs_agree(demo_region):
    items = _items(demo_region)
    ids = sorted(i.id for i in items)
    ndjson = [json.loads(line) for line in demo_region.items_ndjson.read_text().splitlines()]
    assert sorted(d["id"] for d in ndjson) == ids
    catalog = pystac.Catalog.from_file(str(demo_region.catalog))
    assert sorted(i.id for i in catalog.get_items(recursive=True)) == ids
    for item in catalog.get_items(recursive=True):
        assert all(Path(a.get_absolute_href()).exists() for a in item.assets.values())
    assert sorted(p.stem for p in demo_region.collections) == sorted(EXPECTED)
    for p in demo_region.collections:
        assert pystac.Collection.from_dict(json.loads(p.read_text())).id == p.stem
    region = json.loads(demo_region.region_json.read_text())
    assert region["seed"] == demo_region.seed and region["years"] == list(demo_region.years)
    # optical: July-August, cloud cover set; 1-2 per year; the SAR once per year; one DEM
    optical = _by_collection(demo_region, dr.OPTICAL_COLLECTION)
    assert all(i.datetime.month in (7, 8) and 0 <= i.properties["eo:cloud_cover"] <= 100 for i in optical)
    per_year = {y: sum(i.datetime.year == y for i in optical) for y in (2021, 2022, 2023)}
    assert set(per_year.values()) == {1, 2}
    assert sorted(i.datetime.year for i in _by_collection(demo_region, dr.SAR_COLLECTION)) == [2021, 2022, 2023]
    assert len(_by_collection(demo_region, dr.DEM_COLLECTION)) == 1
    # the AOI is inside every item's footprint
    aoi = shapely.geometry.shape(json.loads(demo_region.aoi.read_text())["features"][0]["geometry"])
    assert aoi.is_valid and -136 < aoi.centroid.x < -134.5 and 67 < aoi.centroid.y < 68
    for item in items:
        assert shapely.geometry.shape(item.geometry).contains(aoi), item.id


def test_two_optical_scenes_in_a_year_differ_in_cloudiness_and_one_has_a_nodata_strip(demo_region):
    optical = _by_collection(demo_region, dr.OPTICAL_COLLECTION)
    years = {}
    for i in optical:
        years.setdefault(i.datetime.year, []).append(i)
    pair = next(v for v in years.values() if len(v) == 2)
    covers = sorted(i.properties["eo:cloud_cover"] for i in pair)
    assert covers[1] > covers[0] + 10
    strips = 0
    for item in optical:
        with rasterio.open(item.assets["scl"].href) as s, rasterio.open(item.assets["red"].href) as r:
            scl, red = s.read(1), r.read(1)
        assert np.array_equal(scl == 0, red == 0)  # nodata agrees across assets
        if (scl == 0).any():
            strips += 1
            assert (scl[:, -1] == 0).all() and (scl[:, 0] != 0).all()  # a strip at the east edge
        clouds = np.isin(scl, (8, 9, 10)).sum() / max((scl != 0).sum(), 1) * 100
        assert clouds == pytest.approx(item.properties["eo:cloud_cover"], abs=0.01)
    assert strips == 1


# --- truth -----------------------------------------------------------------------------------------


def test_truth_layers_grow_and_new_slumps_appear(demo_region):
    layers = {name for name, _ in pyogrio.list_layers(demo_region.truth)}
    assert {"rts_2021", "rts_2022", "rts_2023", "distractors"} <= layers
    prev = None
    for year in (2021, 2022, 2023):
        t = _truth(demo_region, f"rts_{year}")
        assert t.crs.to_epsg() == 3413 and len(t) > 0
        assert {"UID", "slump_id", "area_m2", "shape_type", "Year"} <= set(t.columns)
        assert (t["Year"] == year).all() and t["UID"].is_unique
        assert np.allclose(t["area_m2"], t.geometry.area, rtol=1e-4)
        assert set(t["shape_type"]) <= {"teardrop", "horseshoe"}
        if prev is not None:
            both = prev.merge(t, on="slump_id", suffixes=("_a", "_b"))
            assert len(both) == len(prev)  # active slumps persist
            assert (both["area_m2_b"] >= both["area_m2_a"]).all()
            assert (both["area_m2_b"] > both["area_m2_a"]).mean() > 0.9  # the headwalls retreat
            new = set(t["slump_id"]) - set(prev["slump_id"])
            assert new and (t.loc[t["slump_id"].isin(new), "first_year"] == year).all()
            # growth is upslope retreat: the old footprint stays inside the new one
            for ga, gb in zip(gpd.GeoSeries(both["geometry_a"]), gpd.GeoSeries(both["geometry_b"])):
                assert ga.difference(gb).area < 0.02 * ga.area
        prev = t
    d = _truth(demo_region, "distractors")
    assert {"lake", "river", "bare_ridge", "stabilised_slump"} <= set(d["class"])
    # distractors never overlap a labelled slump
    final = shapely.union_all(_truth(demo_region, "rts_2023").geometry.values)
    assert not any(g.intersects(final) for g in d.geometry)


# --- the cues each modality carries ---------------------------------------------------------------


def _ndvi(item) -> tuple[np.ndarray, np.ndarray, rasterio.DatasetReader]:
    with rasterio.open(item.assets["red"].href) as r, rasterio.open(item.assets["nir"].href) as n, rasterio.open(item.assets["scl"].href) as s:
        red, nir, scl = r.read(1).astype(float), n.read(1).astype(float), s.read(1)
        ndvi = (nir - red) / np.maximum(nir + red, 1)
        return ndvi, np.isin(scl, (4, 5, 6)), s


def test_optical_ndvi_is_low_inside_active_slumps_and_high_around(demo_region):
    clearest = min(_by_collection(demo_region, dr.OPTICAL_COLLECTION), key=lambda i: i.properties["eo:cloud_cover"])
    truth = _truth(demo_region, f"rts_{clearest.datetime.year}")
    ndvi, clear, src = _ndvi(clearest)
    others = shapely.union_all(list(truth.geometry) + list(_truth(demo_region, "distractors").geometry))
    diffs = []
    for poly in truth.geometry:
        inside, ring = _inside_and_ring(poly, 10.0, (20.0, 60.0))
        mi, mr = _masks([inside], src) & clear, _masks([ring.difference(others)], src) & clear
        if mi.sum() >= 5 and mr.sum() >= 10:
            diffs.append(np.median(ndvi[mr]) - np.median(ndvi[mi]))
            assert np.median(ndvi[mi]) < 0.35 and np.median(ndvi[mr]) > 0.55
    assert len(diffs) >= 3 and min(diffs) > 0.3
    # stabilised slumps are green: no NDVI drop
    for poly in _truth(demo_region, "distractors").query("`class` == 'stabilised_slump'").geometry:
        mi = _masks([poly.buffer(-10.0)], src) & clear
        if mi.sum() >= 5:
            assert np.median(ndvi[mi]) > 0.6


def test_dem_depressions_under_slumps_and_stabilised_scars_but_not_ridges(demo_region):
    item = _by_collection(demo_region, dr.DEM_COLLECTION)[0]
    with rasterio.open(item.assets["dem"].href) as src:
        dem = src.read(1)

        def drop(poly) -> float:
            inside, ring = _inside_and_ring(poly, 10.0, (10.0, 40.0))
            return float(dem[_masks([ring], src)].mean() - dem[_masks([inside], src)].mean())

        first = _truth(demo_region, "rts_2021")  # the DEM is from the first year
        drops = [drop(p) for p in first.geometry if p.buffer(-10).area > 300]
        # small slumps are shallow and smeared by 10 m pixels, so judge the population
        assert np.median(drops) > 1.0 and np.mean(np.array(drops) > 0.5) >= 0.8
        # the headwall: the rim upslope is well above the scar floor
        for poly in first.geometry:
            assert dem[_masks([poly.buffer(30).difference(poly.buffer(5))], src)].max() - dem[_masks([poly], src)].min() > 3.0
        d = _truth(demo_region, "distractors")
        assert all(drop(p) > 0.3 for p in d.query("`class` == 'stabilised_slump'").geometry)
        assert all(drop(p) < 0.0 for p in d.query("`class` == 'bare_ridge'").geometry)  # convex knolls


def test_some_slumps_are_hidden_by_cloud_but_seen_by_sar(demo_region):
    optical = _by_collection(demo_region, dr.OPTICAL_COLLECTION)
    hidden_seen = 0
    for year in (2021, 2022, 2023):
        truth = _truth(demo_region, f"rts_{year}")
        sar = next(i for i in _by_collection(demo_region, dr.SAR_COLLECTION) if i.datetime.year == year)
        with rasterio.open(sar.assets["vv"].href) as src:
            vv_db = 10 * np.log10(src.read(1))
            background = np.median(vv_db)
            for poly, cloud in zip(truth.geometry, truth["cloud_fraction"]):
                if cloud < 0.9:
                    continue
                # every optical scene of the year flags the slump as cloud in its SCL
                for item in (i for i in optical if i.datetime.year == year):
                    with rasterio.open(item.assets["scl"].href) as s:
                        assert np.isin(s.read(1)[_masks([poly], s)], (8, 9, 10)).mean() > 0.9
                m = _masks([poly.buffer(-10)], src)
                if m.sum() >= 3:
                    assert vv_db[m].mean() > background + 2.0
                    hidden_seen += 1
    assert hidden_seen >= 1


def test_a_slump_is_at_the_same_place_in_every_native_raster(demo_region):
    """Sample each raster at a slump's interior point (3413 -> native CRS): co-registration holds."""
    truth = _truth(demo_region, "rts_2021")
    clearest = min((i for i in _by_collection(demo_region, dr.OPTICAL_COLLECTION) if i.datetime.year == 2021), key=lambda i: i.properties["eo:cloud_cover"])
    sar = next(i for i in _by_collection(demo_region, dr.SAR_COLLECTION) if i.datetime.year == 2021)
    dem_item = _by_collection(demo_region, dr.DEM_COLLECTION)[0]
    big = truth[(truth.area_m2 > 4000) & (truth.cloud_fraction == 0)]
    assert len(big) >= 2
    with rasterio.open(clearest.assets["red"].href) as r, rasterio.open(clearest.assets["nir"].href) as n, \
            rasterio.open(sar.assets["vv"].href) as v, rasterio.open(dem_item.assets["dem"].href) as d:
        vv_background = np.median(10 * np.log10(v.read(1)))
        for poly in big.geometry:
            p = polylabel(poly, 1.0)
            red, nir = _sample(r, p.x, p.y), _sample(n, p.x, p.y)
            assert ((nir - red) / (nir + red)).item() < 0.35
            # 250 m away (8 directions) mostly green tundra again: the low NDVI is the slump's
            ring = [affinity.translate(p, 250 * np.cos(a), 250 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
            ndvi_ring = [((_sample(n, q.x, q.y) - _sample(r, q.x, q.y)) / (_sample(n, q.x, q.y) + _sample(r, q.x, q.y))).item() for q in ring]
            assert np.mean(np.array(ndvi_ring) > 0.5) >= 0.5
            assert 10 * np.log10(_sample(v, p.x, p.y).mean()) > vv_background + 2.0
            # the DEM is lower at the slump's interior than on the rim 30 m outside it
            rim = poly.buffer(30).exterior
            rim_z = [_sample(d, q.x, q.y).item() for q in (rim.interpolate(f, normalized=True) for f in np.linspace(0, 1, 24))]
            assert _sample(d, p.x, p.y).item() < np.max(rim_z) - 1.0


# --- determinism, CLI, real footprints, errors ------------------------------------------------------


def _fingerprint(root: Path, years) -> dict:
    """Truth geometries and every pixel of a region, keyed by layer and relative path."""
    out = {}
    for year in years:
        t = gpd.read_file(root / "truth.gpkg", layer=f"rts_{year}")
        out[f"truth_{year}"] = [g.wkb for g in t.geometry]
    for path in sorted((root / "cogs").rglob("*.tif")):
        with rasterio.open(path) as src:
            out[str(path.relative_to(root))] = src.read()
    return out


def test_cli_writes_everything_and_generation_is_deterministic(tmp_path):
    runner = CliRunner()
    res = runner.invoke(dr.demo_data_command, ["--out", str(tmp_path / "cli"), "--seed", "1", "--years", "2021-2022", "--size-km", "1.5"])
    assert res.exit_code == 0, res.output
    assert "demo region written" in res.output
    root = tmp_path / "cli"
    for name in ("aoi.geojson", "truth.gpkg", "region.json", "stac/items.json", "stac/items.ndjson", "stac/catalog.json",
                 f"stac/collections/{dr.OPTICAL_COLLECTION}.json", f"stac/collections/{dr.SAR_COLLECTION}.json", f"stac/collections/{dr.DEM_COLLECTION}.json"):
        assert (root / name).is_file(), name
    a = dr.generate_region(tmp_path / "a", seed=1, years=(2021, 2022), size_m=(1500.0, 1500.0))
    cli_fp, a_fp = _fingerprint(root, (2021, 2022)), _fingerprint(a.root, a.years)
    assert cli_fp.keys() == a_fp.keys()
    assert all(np.array_equal(cli_fp[k], a_fp[k]) for k in a_fp)
    b = _fingerprint(dr.generate_region(tmp_path / "b", seed=2, years=(2021, 2022), size_m=(1500.0, 1500.0)).root, (2021, 2022))
    assert b["truth_2021"] != a_fp["truth_2021"]
    dem_key = next(k for k in a_fp if k.endswith("dem.tif"))
    assert not np.array_equal(a_fp[dem_key], b[dem_key])
    # running again into the same directory is refused without --overwrite, replaces the region with it
    args = ["--out", str(root), "--seed", "1", "--years", "2021-2022", "--size-km", "1.5"]
    res = runner.invoke(dr.demo_data_command, args)
    assert isinstance(res.exception, OutputError) and "--overwrite" in str(res.exception)
    res = runner.invoke(dr.demo_data_command, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output


def test_shapes_from_the_arts_sample_keep_shape_and_size(tmp_path, arts_path):
    region = dr.generate_region(tmp_path / "arts", seed=3, years=(2021, 2022), size_m=(2000.0, 2000.0), shapes=arts_path)
    truth = _truth(region, "rts_2021")
    assert len(truth) >= 3 and set(truth["shape_type"]) == {"arts"}
    pool = shp.read_footprints(arts_path)
    by_area = {round(p.area, 1): p for p in pool}
    for poly in truth.geometry:
        src = by_area.get(round(poly.area, 1))
        assert src is not None, "a placed footprint must be a translated ARTS footprint"
        moved = shp.move_to(src, (poly.centroid.x, poly.centroid.y))
        assert moved.symmetric_difference(poly).area < 1e-6 * poly.area
    # the placed real footprints lie inside the region
    bounds = json.loads(region.region_json.read_text())["bounds_3413"]
    assert shapely.box(*bounds).contains(shapely.union_all(truth.geometry.values))


def test_lognormal_constants_match_the_arts_sample(arts_path):
    """The hardcoded size and elongation parameters are a fit to the ARTS sample."""
    gdf = gpd.read_file(arts_path)
    gdf = gdf[~gdf.geometry.is_empty]  # the sample has one empty geometry collection
    log_area = np.log(gdf.geometry.area.to_numpy())
    assert log_area.mean() == pytest.approx(shp.AREA_LOG_MEAN, abs=0.01)
    assert log_area.std() == pytest.approx(shp.AREA_LOG_STD, abs=0.01)
    polys = gdf.geometry[gdf.geometry.geom_type == "Polygon"]
    sides = []
    for rect in polys.minimum_rotated_rectangle():
        c = np.asarray(rect.exterior.coords)
        e = np.hypot(*np.diff(c[:3], axis=0).T)
        sides.append(e.max() / max(e.min(), 1e-6))
    assert np.log(sides).mean() == pytest.approx(shp.ELONGATION_LOG_MEAN, abs=0.02)


def test_synthetic_outlines_and_retreat():
    rng = np.random.default_rng(0)
    areas = shp.sample_areas(rng, 4000)
    assert areas.min() >= shp.MIN_AREA_M2 and areas.max() <= shp.MAX_AREA_M2
    assert 5_000 < np.median(areas) < 11_000  # ARTS median ~0.7 ha
    for kind in shp.SHAPE_KINDS:
        poly = shp.slump_outline(kind, 12_000.0, 2.0, rng)
        assert poly.is_valid and poly.area == pytest.approx(12_000.0, rel=1e-6)
        placed = shp.place(poly, (100.0, 200.0), (1.0, 0.0))  # upslope = +x: long axis along x
        minx, miny, maxx, maxy = placed.bounds
        assert (maxx - minx) > 1.4 * (maxy - miny)
        grown = shp.retreat(placed, (1.0, 0.0), 20.0)
        assert grown.bounds[2] == pytest.approx(maxx + 20.0, abs=1.0)  # the headwall moved upslope
        assert grown.bounds[0] == pytest.approx(minx, abs=0.5)  # the toe stayed
        assert placed.difference(grown).area < 1.0


def test_bad_input_raises_clear_errors(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an rtsmap demo region"):
        dr.generate_region(tmp_path / "busy", size_m=(1500.0, 1500.0))
    with pytest.raises(ConfigError, match="years"):
        dr.generate_region(tmp_path / "y", years=(2022, 2021), size_m=(1500.0, 1500.0))
    with pytest.raises(ConfigError, match="does not exist"):
        dr.generate_region(tmp_path / "s", shapes=tmp_path / "missing.geojson", size_m=(1500.0, 1500.0))
    (tmp_path / "bad.geojson").write_text("not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        shp.read_footprints(tmp_path / "bad.geojson")
    with pytest.raises(ConfigError, match="--years"):
        dr._parse_years("2021..2023")


def _fake_region(folder):
    """An earlier region's marker and a file of it (the checks look at region.json only)."""
    folder.mkdir()
    (folder / "region.json").write_text('{"generator": "rtsmap demo_region"}')
    (folder / "truth.gpkg").write_bytes(b"the user's earlier region")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": -1}, ConfigError, "seed"),
    ({"size_m": (float("nan"), float("nan"))}, ConfigError, "finite"),
    ({"size_m": (float("inf"), 2000.0)}, ConfigError, "finite"),
    ({"years": (2021, 20222)}, ConfigError, "years"),
    ({"years": ()}, ConfigError, "years"),
    ({"fine_resolution": 0.0}, ConfigError, "fine_resolution"),
    ({"center_lonlat": (float("nan"), 67.0)}, ConfigError, "centre"),
    ({}, OutputError, "--overwrite"),  # valid arguments, but no --overwrite
])
def test_bad_arguments_never_touch_an_existing_region(tmp_path, kwargs, error, match):
    before = _fake_region(tmp_path / "region")
    args = {"size_m": (1500.0, 1500.0), **kwargs}
    with pytest.raises(error, match=match):
        dr.generate_region(tmp_path / "region", **args)
    assert {p.name: p.read_bytes() for p in (tmp_path / "region").iterdir()} == before


def test_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        dr.generate_region(tmp_path / "file" / "region", size_m=(1500.0, 1500.0))
    with pytest.raises(OutputError, match="is a file"):
        dr.generate_region(tmp_path / "file", size_m=(1500.0, 1500.0))


def test_parse_years_refuses_huge_ranges():
    with pytest.raises(ConfigError, match="--years"):
        dr._parse_years("1-1000000000")
    assert dr._parse_years("2021-2023") == (2021, 2022, 2023)
