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


def _sar_contrast(vv_db: np.ndarray, src, poly, others) -> float | None:
    """Mean VV dB inside a slump (10 m in from its edge) minus a ring 20-60 m around it."""
    inside, ring = _inside_and_ring(poly, 10.0, (20.0, 60.0))
    mi, mr = _masks([inside], src), _masks([ring.difference(others)], src)
    if mi.sum() < 3 or mr.sum() < 10:
        return None
    return float(vv_db[mi].mean() - vv_db[mr].mean())


def test_slumps_hidden_by_cloud_are_seen_by_sar_only_at_their_own_contrast(demo_region):
    """Under cloud, SAR shows a slump whose contrast is strong and not one whose contrast is ~0."""
    optical = _by_collection(demo_region, dr.OPTICAL_COLLECTION)
    others = shapely.union_all(list(_truth(demo_region, "distractors").geometry))
    seen, unseen = 0, 0
    for year in (2021, 2022, 2023):
        truth = _truth(demo_region, f"rts_{year}")
        sar = next(i for i in _by_collection(demo_region, dr.SAR_COLLECTION) if i.datetime.year == year)
        with rasterio.open(sar.assets["vv"].href) as src:
            vv_db = 10 * np.log10(src.read(1))
            for sid, poly, cloud in zip(truth["slump_id"], truth.geometry, truth["cloud_fraction"]):
                if cloud < 0.9:
                    continue
                # every optical scene of the year flags the slump as cloud in its SCL
                for item in (i for i in optical if i.datetime.year == year):
                    with rasterio.open(item.assets["scl"].href) as s:
                        assert np.isin(s.read(1)[_masks([poly], s)], (8, 9, 10)).mean() > 0.9
                drawn, _ = dr.slump_sar_contrast_db(demo_region.seed, sid)
                measured = _sar_contrast(vv_db, src, poly, others.union(shapely.union_all(list(truth.geometry))))
                if measured is None:
                    continue
                if drawn >= 2.0:
                    assert measured > 1.0, (sid, year, drawn, measured)
                    seen += 1
                elif abs(drawn) < 0.5:
                    assert abs(measured) < 2.0, (sid, year, drawn, measured)
                    unseen += 1
    assert seen >= 1 and unseen >= 1


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
        # SAR: a slump may be invisible there, so its landmark is the lake: dark water at the lake's
        # interior point, land (10 dB brighter) 150 m outside its shore
        vv_db = lambda p, half=1: 10 * np.log10(_sample(v, p.x, p.y, half).mean())  # noqa: E731
        lakes = _truth(demo_region, "distractors").query("`class` == 'lake'").geometry
        assert len(lakes) >= 1
        for lake in lakes:
            assert vv_db(polylabel(lake, 1.0)) < -19.0
            shore = lake.buffer(150.0).exterior
            outside = [vv_db(shore.interpolate(f, normalized=True)) for f in np.linspace(0, 1, 12, endpoint=False)]
            assert np.median(outside) > vv_db(polylabel(lake, 1.0)) + 6.0
        for poly in big.geometry:
            p = polylabel(poly, 1.0)
            red, nir = _sample(r, p.x, p.y), _sample(n, p.x, p.y)
            assert ((nir - red) / (nir + red)).item() < 0.35
            # 250 m away (8 directions) mostly green tundra again: the low NDVI is the slump's
            ring = [affinity.translate(p, 250 * np.cos(a), 250 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
            ndvi_ring = [((_sample(n, q.x, q.y) - _sample(r, q.x, q.y)) / (_sample(n, q.x, q.y) + _sample(r, q.x, q.y))).item() for q in ring]
            assert np.mean(np.array(ndvi_ring) > 0.5) >= 0.5
            # the DEM is lower at the slump's interior than on the rim 30 m outside it
            rim = poly.buffer(30).exterior
            rim_z = [_sample(d, q.x, q.y).item() for q in (rim.interpolate(f, normalized=True) for f in np.linspace(0, 1, 24))]
            assert _sample(d, p.x, p.y).item() < np.max(rim_z) - 1.0


# --- the synthetic SAR: speckle, slump contrast, terrain, yearly offsets (docs/synthetic-sar.md) ----


def test_speckle_is_unit_mean_gamma_with_the_stated_looks(demo_region):
    rng = np.random.default_rng(7)
    flat = np.full((400, 400), 0.05)
    x = dr._speckle(rng, flat, dr.SAR_MODEL.looks)
    assert x.mean() == pytest.approx(0.05, rel=0.01)
    assert x.mean() ** 2 / x.var() == pytest.approx(dr.SAR_MODEL.looks, rel=0.03)
    assert 4.0 <= dr.SAR_MODEL.looks <= 5.0  # multi-looked RTC, not single-look (ENL 1)
    # in the written scenes: the lake's interior is one flat gamma0, so its spread is speckle alone
    lakes = [g.buffer(-40.0) for g in _truth(demo_region, "distractors").query("`class` == 'lake'").geometry]
    ratios = []
    for item in _by_collection(demo_region, dr.SAR_COLLECTION):
        for band in dr.SAR_BANDS:
            with rasterio.open(item.assets[band].href) as src:
                v = src.read(1)[_masks(lakes, src)].astype(np.float64)
            ratios.append(v / v.mean())
    pooled = np.concatenate(ratios)
    assert pooled.size >= 500
    assert pooled.mean() ** 2 / pooled.var() == pytest.approx(dr.SAR_MODEL.looks, abs=0.6)


def test_slump_contrast_is_drawn_per_slump_from_the_stated_range():
    m = dr.SAR_MODEL
    draws = np.array([dr.slump_sar_contrast_db(0, f"s{k:03d}") for k in range(3000)])
    vv, vh = draws[:, 0], draws[:, 1]
    assert m.contrast_vv_db[0] <= vv.min() and vv.max() <= m.contrast_vv_db[1]
    assert m.contrast_vv_db[0] <= 0.0 <= m.contrast_vv_db[1]  # the range includes "invisible"
    assert vv.min() < m.contrast_vv_db[0] + 0.05 and vv.max() > m.contrast_vv_db[1] - 0.05  # uniform, the whole range
    assert 0.15 < np.mean(np.abs(vv) < 0.5) < 0.35  # about a quarter within 0.5 dB of the tundra
    assert (m.contrast_vh_minus_vv_db[0] <= vh - vv).all() and (vh - vv <= m.contrast_vh_minus_vv_db[1]).all()
    # the slump's own stream: same seed and id, same contrast; another seed, another
    assert dr.slump_sar_contrast_db(0, "s001") == dr.slump_sar_contrast_db(0, "s001")
    assert dr.slump_sar_contrast_db(1, "s001") != dr.slump_sar_contrast_db(0, "s001")


def test_written_slump_contrast_follows_the_drawn_one(demo_region):
    """Measured in the COGs (20 m, speckled, moisture and terrain included) against the draw."""
    others = shapely.union_all(list(_truth(demo_region, "distractors").geometry))
    pairs = []
    for item in _by_collection(demo_region, dr.SAR_COLLECTION):
        truth = _truth(demo_region, f"rts_{item.datetime.year}")
        near = others.union(shapely.union_all(list(truth.geometry)))
        with rasterio.open(item.assets["vv"].href) as src:
            vv_db = 10 * np.log10(src.read(1))
            for sid, poly in zip(truth["slump_id"], truth.geometry):
                measured = _sar_contrast(vv_db, src, poly, near)
                if measured is not None:
                    pairs.append((dr.slump_sar_contrast_db(demo_region.seed, sid)[0], measured))
    drawn, measured = np.array(pairs).T
    assert len(drawn) >= 12
    assert np.median(np.abs(measured - drawn)) < 1.0
    assert np.corrcoef(drawn, measured)[0, 1] > 0.7
    assert measured.max() < dr.SAR_MODEL.contrast_vv_db[1] + 2.0  # nothing like the old +5 dB floors
    assert np.mean(np.abs(measured) < 1.0) >= 0.25  # many slumps hardly differ from their surroundings


def test_layover_faces_the_radar_and_shadow_faces_away_above_the_thresholds():
    m, res = dr.SAR_MODEL, 5.0
    # a ridge across the look direction (+x): 60-degree faces, then a 20-degree hill, on flat ground
    x = np.arange(200) * res
    ridge = np.clip(60.0 - np.tan(np.radians(60.0)) * np.abs(x - 250.0), 0, None)
    hill = np.clip(40.0 - np.tan(np.radians(20.0)) * np.abs(x - 750.0), 0, None)
    elevation = np.tile(ridge + hill, (40, 1))
    geo = dr._sar_geometry(elevation, res, (1.0, 0.0), m)
    row = slice(5, 35)
    near_face = (x > 220) & (x < 245)  # rises away from the radar: faces it
    far_face = (x > 255) & (x < 280)
    assert geo.layover[row][:, near_face].all() and not geo.shadow[row][:, near_face].any()
    assert geo.shadow[row][:, far_face].all() and not geo.layover[row][:, far_face].any()
    gentle = (x > 660) & (x < 840) | (x < 150)
    assert not (geo.layover | geo.shadow)[row][:, gentle].any()
    assert geo.range_slope_deg[20, near_face] == pytest.approx(60.0, abs=0.5)
    assert geo.layover.sum() + geo.shadow.sum() > 0
    # thresholds: layover above the incidence angle, shadow beyond 90 degrees minus it
    assert (geo.range_slope_deg[geo.layover] > m.incidence_deg).all()
    assert (geo.range_slope_deg[geo.shadow] < -(90.0 - m.incidence_deg)).all()
    # RTC flattening leaves little of the terrain: the 20-degree faces within 1.5 dB of flat
    on_hill = (x > 680) & (x < 820) & (np.abs(x - 750) > 10)
    assert np.all(np.abs(10 * np.log10(geo.terrain[20, on_hill])) < 1.5)
    # rendered: layover bright, shadow at the noise level, whatever the land cover
    shape = elevation.shape
    canvas = dr._Grid("EPSG:3413", dr.Affine(res, 0, 0, 0, -res, 0), shape)
    scene = dr._Scene(canvas, shapely.box(0, -200, 1000, 0), elevation.astype(np.float32), np.zeros(shape, np.float32),
                      np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                      (np.zeros(shape, np.float32), np.zeros(shape, np.float32)))
    g = dr._render_sar(scene, np.ones((2, *shape), np.float32), geo, np.zeros(shape, np.float32), m)
    db = 10 * np.log10(g)
    assert db[0][geo.layover] == pytest.approx(m.tundra_db[0] + m.layover_gain_db + 10 * np.log10(geo.terrain[geo.layover]), abs=1e-3)
    assert np.allclose(db[:, geo.shadow], m.shadow_db, atol=1e-3)
    assert np.allclose(db[0][:, x < 150], m.tundra_db[0], atol=1e-3)


def test_look_direction_is_west_north_west_in_the_grid():
    cx, cy = Transformer.from_crs("EPSG:4326", "EPSG:3413", always_xy=True).transform(*dr.REGION_CENTER_LONLAT)
    north = dr._look_vector("EPSG:3413", (cx, cy), 0.0)
    assert np.dot(north, -np.array([cx, cy]) / np.hypot(cx, cy)) > 0.999  # north points at the pole
    west = dr._look_vector("EPSG:3413", (cx, cy), 270.0)
    look = dr._look_vector("EPSG:3413", (cx, cy), dr.SAR_MODEL.look_azimuth_deg)
    angle = np.degrees(np.arccos(np.clip(np.dot(look, west), -1, 1)))
    assert angle == pytest.approx(dr.SAR_MODEL.look_azimuth_deg - 270.0, abs=0.01)
    assert np.dot(look, north) > 0  # a little to the north of west


def test_moisture_offsets_are_smooth_and_differ_between_years(demo_region):
    m, res = dr.SAR_MODEL, 5.0
    rng = np.random.default_rng(3)
    canvas = dr._Grid("EPSG:3413", dr.Affine(res, 0, -2.3e6, 0, -res, -0.2e6), (800, 800))
    a, b = (dr._moisture_offset_db(rng, canvas, m) for _ in range(2))
    for f in (a, b):
        assert np.isfinite(f).all()
        snow = f < np.quantile(f, m.wet_snow_fraction)
        assert f[~snow].std() == pytest.approx(m.moisture_std_db, rel=0.35)
        assert f.min() < m.wet_snow_db + 0.5 * m.moisture_std_db  # wet snow patches exist
        assert np.abs(np.diff(f, axis=1)).mean() < 0.05 * m.moisture_std_db  # smooth: ~0.02 dB per 5 m pixel
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.4
    again = np.random.default_rng(3)
    assert np.array_equal(dr._moisture_offset_db(again, canvas, m), a)  # deterministic per seed
    assert np.abs(a - b).mean() > 0.5 * m.moisture_std_db
    # in the written scenes: 200 m block means of land change between years by far more than
    # speckle alone would move them (~0.3 dB for 100 pixels of ENL 4.4)
    blocked = []
    for item in sorted(_by_collection(demo_region, dr.SAR_COLLECTION), key=lambda i: i.datetime):
        with rasterio.open(item.assets["vv"].href) as src:
            vv_db = 10 * np.log10(src.read(1))
            water = _masks([g.buffer(40.0) for g in _truth(demo_region, "distractors").geometry], src)
            slumps = _masks([g.buffer(40.0) for g in _truth(demo_region, "rts_2023").geometry], src)
        h, w = (s // 10 * 10 for s in vv_db.shape)
        keep = ~(water | slumps)[:h, :w].reshape(h // 10, 10, w // 10, 10).any(axis=(1, 3))
        blocked.append((vv_db[:h, :w].reshape(h // 10, 10, w // 10, 10).mean(axis=(1, 3)), keep))
    for (y0, k0), (y1, k1) in zip(blocked, blocked[1:]):
        d = (y1 - y0)[k0 & k1]
        assert d.size >= 20 and d.std() > 0.9


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
    # the SAR scenes (speckle, moisture fields, slump contrasts) follow the seed too
    sar_a = sorted(k for k in a_fp if dr.SAR_COLLECTION in k)
    sar_b = sorted(k for k in b if dr.SAR_COLLECTION in k)
    assert len(sar_a) == 4 and not any(np.array_equal(a_fp[x], b[y]) for x, y in zip(sar_a, sar_b))
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


def test_legacy_sar_is_the_strong_signature_of_the_first_generator(legacy_region, demo_region):
    """The two SAR variants share every other raster; legacy slumps stand ~5 dB above the tundra."""
    legacy = next(i for i in _by_collection(legacy_region, dr.SAR_COLLECTION) if i.datetime.year == 2021)
    realistic = next(i for i in _by_collection(demo_region, dr.SAR_COLLECTION) if i.datetime.year == 2021)
    assert legacy.id == realistic.id  # the same acquisition dates: the same rng_sar draws
    assert json.loads(legacy_region.region_json.read_text())["sar"] == "legacy"
    assert json.loads(demo_region.region_json.read_text())["sar"] == "realistic"
    truth = _truth(demo_region, "rts_2021")
    contrasts = {}
    for name, item in (("legacy", legacy), ("realistic", realistic)):
        with rasterio.open(item.assets["vv"].href) as src:
            inside = _masks([g.buffer(-10.0) for g in truth.geometry], src)
            ring = _masks([g.buffer(60.0).difference(g.buffer(20.0)) for g in truth.geometry], src)
            vv = 10 * np.log10(np.maximum(src.read(1), 1e-6))
        contrasts[name] = float(np.median(vv[inside]) - np.median(vv[ring]))
    assert contrasts["legacy"] > 3.0
    assert contrasts["realistic"] < contrasts["legacy"] - 1.5
    with pytest.raises(ConfigError, match="sar must be one of"):
        dr.generate_region(demo_region.root.parent / "bad", sar="clean", size_m=(1500.0, 1500.0))
