"""Tests for pipeline.load: co-registration, resampling kinds, best-first mosaic, errors, DEM seams.

Every test writes small real GeoTIFFs with rasterio in its own native CRS and reads them back
through odc-stac/GDAL onto a chunk grid in EPSG:3413, as the pipeline does.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.enums
import rasterio.warp
from affine import Affine
from pyproj import Transformer
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from rtsmap.pipeline.errors import AssetError
from rtsmap.pipeline.grid import Chunk, GridSpec, chunk_by_id
from rtsmap.pipeline.load import DEM_BUFFER_PX, ChunkStack, load_chunk, order_items, season_peak
from rtsmap.pipeline.profiles import BandSpec, MaskSpec, ModalityProfile

GRID_CRS = "EPSG:3413"
# The demo region: Peel Plateau, NW Canada.
LON, LAT = -135.3, 67.4
YEAR = 2022


# --- helpers ---------------------------------------------------------------------------------


def make_chunk(x0: float, y0: float, shape: tuple[int, int], res: float = 10.0, chunk_id: str = "test") -> Chunk:
    """A Chunk whose read window is placed freely (so tests can centre it on their rasters)."""
    h, w = shape
    return Chunk(
        id=chunk_id, col=0, row=0, spec=GridSpec(crs=GRID_CRS, resolution=res),
        bounds=(x0, y0 - h * res, x0 + w * res, y0), transform=Affine(res, 0, x0, 0, -res, y0),
        shape=shape, tiles=(),
    )


def to_crs(src: str, dst: str, x, y):
    return Transformer.from_crs(src, dst, always_xy=True).transform(x, y)


def centre_3413() -> tuple[float, float]:
    x, y = to_crs("EPSG:4326", GRID_CRS, LON, LAT)
    return round(x / 10) * 10, round(y / 10) * 10


def write_tif(path: Path, arr: np.ndarray, crs: str, transform: Affine, nodata=None) -> Path:
    """A tiled GeoTIFF (as a COG is) holding one band."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1,
        dtype=arr.dtype, crs=crs, transform=transform, nodata=nodata,
        tiled=True, blockxsize=32, blockysize=32,
    ) as dst:
        dst.write(arr, 1)
    return path


def make_item(item_id: str, assets: dict[str, str], when: dt.datetime, collection: str, **props) -> pystac.Item:
    """A STAC item with a WGS84 footprint and proj metadata taken from its first asset."""
    first = next(iter(assets.values()))
    with rasterio.open(first.split("?")[0]) as src:
        bbox = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        proj = {"proj:code": src.crs.to_string(), "proj:shape": list(src.shape), "proj:transform": list(src.transform)[:6]}
    geometry = {
        "type": "Polygon",
        "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]], [bbox[0], bbox[1]]]],
    }
    item = pystac.Item(item_id, geometry, list(bbox), when, {**proj, **props}, collection=collection)
    for key, href in assets.items():
        item.add_asset(key, pystac.Asset(href, media_type="image/tiff; application=geotiff; profile=cloud-optimized"))
    return item


def native_grid(crs: str, centre_3413_xy: tuple[float, float], res: float, half_px: int) -> Affine:
    """Transform of a ``2*half_px`` square raster in ``crs`` centred near a 3413 point."""
    cx, cy = to_crs(GRID_CRS, crs, *centre_3413_xy)
    return from_origin(math.floor(cx / res) * res - half_px * res, math.floor(cy / res) * res + half_px * res, res, res)


def native_index(chunk, crs: str, transform: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (row, col) in a native raster of every chunk pixel centre."""
    h, w = chunk.shape
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = chunk.transform @ (cols, rows)
    nx, ny = to_crs(GRID_CRS, crs, xs, ys)
    c, r = ~transform @ (np.asarray(nx), np.asarray(ny))
    return np.asarray(r), np.asarray(c)


def square_image(crs: str, transform: Affine, n: int, centre: tuple[float, float], side_m: float) -> np.ndarray:
    """Background 100 plus 1000 x the fraction of each pixel inside a square in EPSG:3413.

    Supersampled 4x4 per pixel so the square's centroid is exact to a small fraction of a pixel
    whatever the native CRS.
    """
    sub = (np.arange(4) + 0.5) / 4
    idx = (np.arange(n)[:, None] + sub[None, :]).ravel()
    cols, rows = np.meshgrid(idx, idx)
    xs, ys = transform @ (cols, rows)
    gx, gy = to_crs(crs, GRID_CRS, xs, ys)
    inside = (np.abs(np.asarray(gx) - centre[0]) <= side_m / 2) & (np.abs(np.asarray(gy) - centre[1]) <= side_m / 2)
    frac = inside.reshape(n, 4, n, 4).mean(axis=(1, 3))
    return (100.0 + 1000.0 * frac).astype(np.float32)


def profile(name: str, bands, mask=None, cloud_property=None, derived=(), season=("07-01", "08-31")) -> ModalityProfile:
    return ModalityProfile(
        name=name, collections=(f"test-{name}",), bands=tuple(bands), mask=mask, season=season,
        cloud_property=cloud_property, derived=tuple(derived), per_year=not derived,
    )


# --- co-registration and resampling ----------------------------------------------------------


def test_square_lands_at_the_same_place_from_three_crs(tmp_path):
    cx, cy = centre_3413()
    square = (cx + 3.0, cy - 7.0)  # off the 10 m grid on purpose
    natives = {
        "utm8": ("EPSG:32608", 10.0, 60),
        "utm9": ("EPSG:32609", 20.0, 30),
        "polar": (GRID_CRS, 10.0, 60),
    }
    items, profiles = {}, {}
    for name, (crs, res, half) in natives.items():
        transform = native_grid(crs, square, res, half)
        if crs == GRID_CRS:
            transform = transform @ Affine.translation(0.5, 0.5)  # half a pixel off the chunk grid
        img = square_image(crs, transform, 2 * half, square, side_m=120.0)
        path = write_tif(tmp_path / f"{name}.tif", img, crs, transform)
        items[name] = [make_item(f"{name}-1", {"b": str(path)}, dt.datetime(YEAR, 7, 20), f"test-{name}")]
        profiles[name] = profile(name, [BandSpec("b", "b")])
    chunk = make_chunk(cx - 320.0, cy + 320.0, (64, 64))

    stack = load_chunk(chunk, items, profiles, YEAR)

    expected_col = (square[0] - chunk.transform.c) / 10.0
    expected_row = (chunk.transform.f - square[1]) / 10.0
    h, w = chunk.shape
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    for name in natives:
        assert stack.valid[name].all(), name
        weight = np.clip(stack.data[name][0] - 100.0, 0, None)
        assert weight.sum() > 0, name
        col = (weight * cols).sum() / weight.sum()
        row = (weight * rows).sum() / weight.sum()
        assert abs(col - expected_col) < 0.5 and abs(row - expected_row) < 0.5, (name, row, col, expected_row, expected_col)
    assert stack.crs == GRID_CRS and stack.shape == (64, 64) and stack.transform == chunk.transform


def test_class_band_nearest_keeps_classes_continuous_band_interpolates(tmp_path):
    cx, cy = centre_3413()
    transform = native_grid("EPSG:32609", (cx, cy), 20.0, 30)
    rng = np.random.default_rng(0)
    classes = rng.choice(np.array([3, 4, 8], dtype=np.uint8), size=(60, 60))
    cls_path = write_tif(tmp_path / "cls.tif", classes, "EPSG:32609", transform)
    cont_path = write_tif(tmp_path / "cont.tif", classes.astype(np.float32), "EPSG:32609", transform)
    item = make_item("s", {"cls": str(cls_path), "cont": str(cont_path)}, dt.datetime(YEAR, 7, 20), "test-x")
    prof = profile("x", [BandSpec("cls", "cls", resampling="nearest", kind="class"), BandSpec("cont", "cont")])
    chunk = make_chunk(cx - 200.0, cy + 200.0, (40, 40))

    stack = load_chunk(chunk, {"x": [item]}, {"x": prof}, YEAR)

    assert stack.valid["x"].all()
    cls, cont = stack.data["x"]
    assert set(np.unique(cls)) == {3.0, 4.0, 8.0}
    frac = np.abs(cont - np.round(cont)) > 1e-3
    assert frac.mean() > 0.3  # bilinear blends neighbours of a random field


# --- best-first, mask-aware mosaic -------------------------------------------------------------


def _optical_pair(tmp_path):
    """Two UTM 8N items over the same 400 m square: A (less cloudy) and B, see the test."""
    cx, cy = centre_3413()
    transform = native_grid("EPSG:32608", (cx, cy), 10.0, 20)
    n = 40
    rows = np.arange(n)[:, None] * np.ones((1, n), dtype=int)
    cols = rows.T
    band_names = ["blue", "green", "red", "nir"]

    def write_item(item_id, value, scl, nodata_where, cloud):
        assets = {}
        for i, b in enumerate(band_names):
            arr = np.full((n, n), value + i, dtype=np.uint16)
            arr[nodata_where] = 0
            assets[b] = str(write_tif(tmp_path / item_id / f"{b}.tif", arr, "EPSG:32608", transform, nodata=0))
        scl = scl.copy()
        scl[nodata_where] = 0
        assets["scl"] = str(write_tif(tmp_path / item_id / "scl.tif", scl.astype(np.uint8), "EPSG:32608", transform))
        return make_item(item_id, assets, dt.datetime(YEAR, 7, 25), "test-optical", **{"eo:cloud_cover": cloud})

    scl_a = np.where(rows < 20, 9, 4)  # A: cloud over the top half
    scl_b = np.where(rows < 10, 8, 4)  # B: cloud over the top quarter
    a = write_item("A", 1000, scl_a, np.zeros((n, n), bool), cloud=5.0)
    b = write_item("B", 2000, scl_b, cols < 10, cloud=40.0)
    prof = profile(
        "optical",
        [BandSpec(b, b, nodata=0, scale=1e-4) for b in band_names],
        mask=MaskSpec("scl", (0, 1, 3, 8, 9, 10)),
        cloud_property="eo:cloud_cover",
    )
    return a, b, prof, transform


def test_best_first_mosaic_fills_clouds_from_the_next_item(tmp_path):
    a, b, prof, transform = _optical_pair(tmp_path)
    cx, cy = centre_3413()
    chunk = make_chunk(cx - 160.0, cy + 160.0, (32, 32))

    stack = load_chunk(chunk, {"optical": [b, a]}, {"optical": prof}, YEAR)  # worst first on purpose

    assert stack.item_ids["optical"] == ["A", "B"]
    assert stack.band_names["optical"] == ("blue", "green", "red", "nir")
    r, c = native_index(chunk, "EPSG:32608", transform)
    inside = (r > 1.5) & (r < 38.5) & (c > 1.5) & (c < 38.5)
    from_a = inside & (r > 21.5)
    from_b = inside & (r < 18.5) & (r > 11.5) & (c > 11.5)
    assert from_a.sum() > 20 and from_b.sum() > 20
    blue, nir = stack.data["optical"][0], stack.data["optical"][3]
    np.testing.assert_allclose(blue[from_a], 0.1000, atol=1e-6)
    np.testing.assert_allclose(nir[from_a], 0.1003, atol=1e-6)
    np.testing.assert_allclose(blue[from_b], 0.2000, atol=1e-6)
    assert stack.valid["optical"][from_a | from_b].all()


def test_valid_mask_honours_nodata_scl_and_footprint(tmp_path):
    a, b, prof, transform = _optical_pair(tmp_path)
    cx, cy = centre_3413()
    chunk = make_chunk(cx - 240.0, cy + 240.0, (48, 48))  # reaches past the rasters

    stack = load_chunk(chunk, {"optical": [a, b]}, {"optical": prof}, YEAR)

    valid = stack.valid["optical"]
    r, c = native_index(chunk, "EPSG:32608", transform)
    cloudy_both = (r > 0.5) & (r < 8.5) & (c > 11.5) & (c < 38.5)  # A cloud, B cloud
    cloud_and_nodata = (r > 0.5) & (r < 18.5) & (c > 0.5) & (c < 8.5)  # A cloud, B nodata
    outside = (r < -1) | (r > 41) | (c < -1) | (c > 41)
    for region in (cloudy_both, cloud_and_nodata, outside):
        assert region.sum() > 3
        assert not valid[region].any()
        assert (stack.data["optical"][:, region] == 0).all()
    assert valid.sum() > 0.4 * valid.size


def test_order_items_cloud_then_closeness_to_season_middle():
    def item(item_id, cloud, day):
        return pystac.Item(item_id, None, None, dt.datetime(YEAR, day[0], day[1]), {"eo:cloud_cover": cloud})

    prof = profile("optical", [BandSpec("blue", "blue")], cloud_property="eo:cloud_cover")
    assert season_peak(prof.season, YEAR) == dt.date(YEAR, 7, 31)
    items = [item("early", 10.0, (7, 2)), item("peak", 10.0, (7, 30)), item("clear", 1.0, (8, 31))]
    assert [i.id for i in order_items(items, prof, YEAR)] == ["clear", "peak", "early"]


def test_sar_linear_to_db_and_zero_is_invalid(tmp_path):
    cx, cy = centre_3413()
    transform = native_grid("EPSG:32609", (cx, cy), 20.0, 20)
    vv = np.full((40, 40), 0.1, dtype=np.float32)
    vv[:, :20] = 0.0  # nodata half
    vh = np.full((40, 40), 0.01, dtype=np.float32)
    item = make_item(
        "s1",
        {"vv": str(write_tif(tmp_path / "vv.tif", vv, "EPSG:32609", transform, nodata=0)),
         "vh": str(write_tif(tmp_path / "vh.tif", vh, "EPSG:32609", transform, nodata=0))},
        dt.datetime(YEAR, 7, 20), "test-sar",
    )
    prof = profile("sar", [BandSpec("vv", "vv", nodata=0, transform="db"), BandSpec("vh", "vh", nodata=0, transform="db")])
    chunk = make_chunk(cx - 150.0, cy + 150.0, (30, 30))

    stack = load_chunk(chunk, {"sar": [item], "optical": []}, {"sar": prof}, YEAR)

    assert "optical" not in stack.data and "optical" not in stack.valid
    r, c = native_index(chunk, "EPSG:32609", transform)
    good = (c > 21.5) & (c < 38.5) & (r > 1.5) & (r < 38.5)
    bad = (c < 19.5) & (c > 0) & (r > 0) & (r < 40)
    assert good.sum() > 20 and bad.sum() > 20
    np.testing.assert_allclose(stack.data["sar"][0][good], -10.0, atol=1e-4)
    np.testing.assert_allclose(stack.data["sar"][1][good], -20.0, atol=1e-4)
    assert stack.valid["sar"][good].all() and not stack.valid["sar"][bad].any()


# --- errors ---------------------------------------------------------------------------------


def _one_band_setup(tmp_path, href: str):
    cx, cy = centre_3413()
    transform = native_grid("EPSG:32608", (cx, cy), 10.0, 20)
    good = write_tif(tmp_path / "good.tif", np.ones((40, 40), np.float32), "EPSG:32608", transform)
    item = make_item("S2X_2022", {"ok": str(good)}, dt.datetime(YEAR, 7, 20), "test-x")
    item.add_asset("broken", pystac.Asset(href))
    prof = profile("x", [BandSpec("ok", "ok"), BandSpec("broken", "broken")])
    return make_chunk(cx - 100.0, cy + 100.0, (20, 20)), item, prof


def test_corrupt_cog_raises_asset_error_naming_item_and_asset(tmp_path):
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    chunk, item, prof = _one_band_setup(tmp_path, str(bad))
    with pytest.raises(AssetError, match=r"asset 'broken' of item 'S2X_2022'"):
        load_chunk(chunk, {"x": [item]}, {"x": prof}, YEAR)


def test_missing_file_raises_asset_error_without_token(tmp_path):
    href = str(tmp_path / "nowhere.tif") + "?sv=2024&sig=SECRETTOKEN"
    chunk, item, prof = _one_band_setup(tmp_path, href)
    with pytest.raises(AssetError) as info:
        load_chunk(chunk, {"x": [item]}, {"x": prof}, YEAR)
    message = str(info.value)
    assert "'broken'" in message and "'S2X_2022'" in message and "nowhere.tif" in message
    assert "SECRETTOKEN" not in message and "sig=" not in message


def test_item_without_the_asset_raises_asset_error(tmp_path):
    chunk, item, prof = _one_band_setup(tmp_path, "unused.tif")
    del item.assets["broken"]
    with pytest.raises(AssetError, match="has no asset 'broken'"):
        load_chunk(chunk, {"x": [item]}, {"x": prof}, YEAR)


# --- several items per odc-stac call ---------------------------------------------------------


@pytest.fixture
def count_odc_calls(monkeypatch):
    """Counts ``odc.stac.load`` calls (and their items) while the real function does the work."""
    import odc.stac

    calls: list[int] = []
    real = odc.stac.load

    def counting(items, *args, **kwargs):
        items = list(items)
        calls.append(len(items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(odc.stac, "load", counting)
    return calls


def grouping(monkeypatch, first: int, group_bytes: int) -> None:
    import rtsmap.pipeline.load as load_module

    monkeypatch.setattr(load_module, "FIRST_GROUP_ITEMS", first)
    monkeypatch.setattr(load_module, "LOAD_GROUP_BYTES", group_bytes)


def test_items_read_in_groups_equal_items_read_one_by_one(tmp_path, monkeypatch, count_odc_calls):
    a, b, prof, _ = _optical_pair(tmp_path)
    # copies ranked after A and B whose cloud stays where B's is, so the mosaic reads them all
    copies = []
    for n in range(4):
        copy = b.clone()
        copy.id = f"B{n}"
        copy.properties["eo:cloud_cover"] = 50.0 + n
        copies.append(copy)
    cx, cy = centre_3413()
    chunk = make_chunk(cx - 240.0, cy + 240.0, (48, 48))  # reaches past the rasters: never full
    items = {"optical": [b, a, *copies]}

    grouping(monkeypatch, first=1, group_bytes=0)  # one item per call
    alone = load_chunk(chunk, items, {"optical": prof}, YEAR)
    assert count_odc_calls == [1] * 6
    count_odc_calls.clear()
    grouping(monkeypatch, first=2, group_bytes=2**30)  # sizes 2, then 4
    grouped = load_chunk(chunk, items, {"optical": prof}, YEAR)
    assert count_odc_calls == [2, 4]
    count_odc_calls.clear()
    grouping(monkeypatch, first=1, group_bytes=3 * 5 * 48 * 48 * 4)  # sizes 1, 2, then 3 by memory
    bounded = load_chunk(chunk, items, {"optical": prof}, YEAR)
    assert count_odc_calls == [1, 2, 3]

    for got in (grouped, bounded):
        np.testing.assert_array_equal(got.data["optical"], alone.data["optical"])
        np.testing.assert_array_equal(got.valid["optical"], alone.valid["optical"])
        assert got.item_ids["optical"] == alone.item_ids["optical"] == ["A", "B"]


def test_items_declaring_different_raster_metadata_are_not_grouped(tmp_path, monkeypatch, count_odc_calls):
    a, b, prof, _ = _optical_pair(tmp_path)
    b.assets["blue"].extra_fields["raster:bands"] = [{"nodata": 0, "data_type": "uint16"}]
    cx, cy = centre_3413()
    grouping(monkeypatch, first=8, group_bytes=2**30)
    load_chunk(make_chunk(cx - 240.0, cy + 240.0, (48, 48)), {"optical": [a, b]}, {"optical": prof}, YEAR)
    assert count_odc_calls == [1, 1]


def test_a_failed_group_names_the_broken_item_and_the_mosaic_still_stops_before_it(tmp_path, monkeypatch):
    a, b, prof, _ = _optical_pair(tmp_path)
    broken = b.clone()
    broken.id = "BROKEN"
    broken.properties["eo:cloud_cover"] = 60.0
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(np.random.default_rng(2).bytes(4096))
    broken.assets["red"].href = str(bad)
    grouping(monkeypatch, first=8, group_bytes=2**30)
    cx, cy = centre_3413()
    never_full = make_chunk(cx - 240.0, cy + 240.0, (48, 48))
    with pytest.raises(AssetError, match=r"asset 'red' of item 'BROKEN'"):
        load_chunk(never_full, {"optical": [a, b, broken]}, {"optical": prof}, YEAR)
    # A chunk that A and B fill: read one by one after the group failed, the mosaic stops before
    # the broken item, as it did before items were grouped.
    filled_by_a_and_b = make_chunk(cx - 40.0, cy + 40.0, (8, 8))
    stack = load_chunk(filled_by_a_and_b, {"optical": [a, b, broken]}, {"optical": prof}, YEAR)
    assert stack.valid["optical"].all() and "BROKEN" not in stack.item_ids["optical"]


# --- DEM derivatives: seamless across chunks -------------------------------------------------


def test_dem_derivatives_are_seamless_across_chunks(tmp_path):
    # Real adjacent chunks of a small grid (stride 24 px, read windows 56 px, 8 px overlap) and
    # the chunk of a coarser grid (4 tiles a side) whose window holds both of them.
    small = GridSpec(crs=GRID_CRS, resolution=10.0, tile_px=32, overlap_px=8, tiles_per_chunk=2)
    large = GridSpec(crs=GRID_CRS, resolution=10.0, tile_px=32, overlap_px=8, tiles_per_chunk=4)
    cx, cy = centre_3413()
    col = 2 * math.floor(cx / (large.chunk_px * 10.0))  # even: both grids start there
    row = 2 * math.floor(-cy / (large.chunk_px * 10.0))
    left = chunk_by_id(small.chunk_id(col, row), small)
    right = chunk_by_id(small.chunk_id(col + 1, row), small)
    big = chunk_by_id(large.chunk_id(col // 2, row // 2), large)
    assert big.transform == left.transform and big.shape == (104, 104)
    stride, size = small.chunk_px, small.window_px

    # DEM: 40 px margin around the big window (the 32 px read buffer stays inside it)
    n = 104 + 80
    x0, y0 = big.transform.c - 400.0, big.transform.f + 400.0
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    rng = np.random.default_rng(3)
    dem = 400 + 30 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + 0.05 * xx + rng.normal(0, 0.5, (n, n))
    dem = dem.astype(np.float32)
    dem[90:95, 60:65] = -9999  # a nodata hole: rows 50..55, cols 20..25 of the big window
    path = write_tif(tmp_path / "dem.tif", dem, GRID_CRS, from_origin(x0, y0, 10, 10), nodata=-9999)
    item = make_item("dem-1", {"dem": str(path)}, dt.datetime(2015, 1, 1), "test-dem")
    prof = ModalityProfile(
        name="dem", collections=("test-dem",), bands=(BandSpec("elevation", "dem", nodata=-9999),),
        per_year=False, derived=("slope", "hillshade", "relative_elevation"),
    )
    got = {}
    for chunk in (left, right, big):
        stack = load_chunk(chunk, {"dem": [item]}, {"dem": prof}, YEAR)
        got[{left.id: "L", right.id: "R", big.id: "B"}[chunk.id]] = stack
    assert got["L"].band_names["dem"] == ("slope", "hillshade", "relative_elevation")
    assert got["R"].valid["dem"].all() and not got["L"].valid["dem"][50:55, 20:25].any()
    overlap_l = got["L"].data["dem"][:, :, stride:]
    overlap_r = got["R"].data["dem"][:, :, : size - stride]
    np.testing.assert_allclose(overlap_l, overlap_r, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["B"].data["dem"][:, :size, :size], got["L"].data["dem"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["B"].data["dem"][:, :size, stride:], got["R"].data["dem"], rtol=1e-5, atol=1e-4)
    slope, shade, rel = got["B"].data["dem"]
    assert 0 < slope.max() < 90 and 0 <= shade.min() and shade.max() <= 1 and shade.std() > 0.01
    assert abs(float(np.median(rel))) < 5 and rel.std() > 1
    # the nodata hole and its slope ring are invalid, the rest is valid
    assert not got["B"].valid["dem"][50:55, 20:25].any()
    assert not got["B"].valid["dem"][49, 22] and got["B"].valid["dem"][47, 22]
    assert got["B"].valid["dem"].sum() == 104 * 104 - (5 * 5 + 4 * 5)  # hole + its 4-neighbour ring
    assert DEM_BUFFER_PX >= 16


def test_chunkstack_is_plain_data():
    stack = ChunkStack("c", YEAR, Affine.identity(), GRID_CRS, (1, 1), {}, {}, {}, {})
    assert stack.data == {} and stack.year == YEAR


# --- end to end on the synthetic demo region ------------------------------------------------


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    """The shared ``demo_region`` fixture where conftest provides one, else a small region."""
    try:
        return request.getfixturevalue("demo_region")
    except pytest.FixtureLookupError:
        from rtsmap.workflows.demo_region import generate_region  # tests may import workflows

        return generate_region(tmp_path_factory.mktemp("demo"), size_m=(1500.0, 1500.0), years=(2022,))


def test_load_a_demo_chunk_end_to_end(demo):
    from rasterio.features import geometry_mask

    from rtsmap.pipeline.aoi import read_aoi
    from rtsmap.pipeline.grid import plan_grid
    from rtsmap.pipeline.profiles import load_profile

    profiles = load_profile(Path(__file__).parents[1] / "workflows" / "profiles" / "demo.yaml").modalities
    items = list(pystac.ItemCollection.from_file(str(demo.items)))
    year = demo.years[0]
    by_modality = {
        m: [i for i in items if i.collection_id in p.collections and (not p.per_year or i.datetime.year == year)]
        for m, p in profiles.items()
    }
    aoi = read_aoi(demo.aoi)
    chunk = plan_grid(aoi.geometry, GridSpec())[0]

    stack = load_chunk(chunk, by_modality, profiles, year)

    inside = ~geometry_mask([aoi.geometry.buffer(-50)], chunk.shape, chunk.transform)
    assert inside.sum() > 1000
    assert set(stack.data) == {"optical", "sar", "dem"}
    for modality, bands in (("optical", 4), ("sar", 2), ("dem", 3)):
        assert stack.data[modality].shape == (bands, *chunk.shape) and stack.data[modality].dtype == np.float32
        assert stack.valid[modality][inside].mean() > (0.1 if modality == "optical" else 0.9), modality
        assert set(stack.item_ids[modality]) <= {i.id for i in by_modality[modality]}
    # Optical validity agrees with an independent GDAL warp of the best item's SCL and red band
    # (apart from a few pixels along class borders, where nearest and bilinear sample differently).
    best = next(i for i in by_modality["optical"] if i.id == stack.item_ids["optical"][0])
    expected_ok = np.ones(chunk.shape, bool)
    for key in ("scl", "red"):
        warped = np.zeros(chunk.shape, np.float32)
        with rasterio.open(best.assets[key].href) as src:
            rasterio.warp.reproject(
                rasterio.band(src, 1), warped, dst_transform=chunk.transform, dst_crs=GRID_CRS,
                dst_nodata=0, resampling=rasterio.enums.Resampling.nearest,
            )
        expected_ok &= ~np.isin(warped, profiles["optical"].mask.invalid) if key == "scl" else warped > 0
    if len(stack.item_ids["optical"]) == 1:
        agree = (stack.valid["optical"] == expected_ok)[inside].mean()
        assert agree > 0.97, agree
    optical = stack.data["optical"][:, stack.valid["optical"] & inside]
    assert 0.0 <= optical.min() and optical.max() <= 1.0 and optical[3].mean() > optical[2].mean()  # vegetation: nir > red
    sar = stack.data["sar"][:, stack.valid["sar"] & inside]
    assert -40 < sar.mean(axis=1).min() and sar.mean(axis=1).max() < 5 and sar[0].mean() > sar[1].mean()  # vv > vh
    slope, shade, _ = stack.data["dem"][:, stack.valid["dem"] & inside]
    assert 0 <= slope.min() and slope.max() < 90 and 0 <= shade.min() and shade.max() <= 1


def test_item_whose_declared_crs_disagrees_with_its_file_is_read_from_the_file(tmp_path, caplog):
    """proj:code says one UTM zone, the file is in another: the pixels land where the file says,
    and one warning per item names both CRSs (not one per read)."""
    import logging

    cx, cy = centre_3413()
    square = (cx + 3.0, cy - 7.0)
    transform = native_grid("EPSG:32608", square, 10.0, 60)
    path = write_tif(tmp_path / "a.tif", square_image("EPSG:32608", transform, 120, square, side_m=120.0),
                     "EPSG:32608", transform)
    chunk = make_chunk(cx - 320.0, cy + 320.0, (64, 64))
    profiles = {"a": profile("a", [BandSpec("b", "b")])}
    right = make_item("right-1", {"b": str(path)}, dt.datetime(YEAR, 7, 20), "test-a")
    wrong = make_item("wrong-1", {"b": str(path)}, dt.datetime(YEAR, 7, 20), "test-a")
    wrong.properties["proj:code"] = "EPSG:32633"
    expected = load_chunk(chunk, {"a": [right]}, profiles, YEAR).data["a"]
    with caplog.at_level(logging.WARNING, logger="rtsmap.pipeline.load"):
        got = load_chunk(chunk, {"a": [wrong]}, profiles, YEAR).data["a"]
        load_chunk(chunk, {"a": [wrong]}, profiles, YEAR)
    np.testing.assert_array_equal(got, expected)
    warnings = [r.getMessage() for r in caplog.records if "declares" in r.getMessage()]
    assert len(warnings) == 1 and "wrong-1" in warnings[0] and "EPSG:32633" in warnings[0] and "32608" in warnings[0]


def test_a_group_read_warns_about_a_wrong_declared_crs_too(tmp_path, caplog, monkeypatch):
    import logging

    import rtsmap.pipeline.load as load_module

    cx, cy = centre_3413()
    transform = native_grid("EPSG:32608", (cx, cy), 10.0, 20)
    path = write_tif(tmp_path / "a.tif", np.ones((40, 40), np.float32), "EPSG:32608", transform, nodata=-1)
    hole = write_tif(tmp_path / "hole.tif", np.full((40, 40), -1, np.float32), "EPSG:32608", transform, nodata=-1)
    first = make_item("empty-1", {"b": str(hole)}, dt.datetime(YEAR, 7, 20), "test-a")  # gives nothing
    wrong = make_item("wrong-group-1", {"b": str(path)}, dt.datetime(YEAR, 7, 21), "test-a")
    wrong.properties["proj:code"] = "EPSG:32633"
    monkeypatch.setattr(load_module, "FIRST_GROUP_ITEMS", 2)
    with caplog.at_level(logging.WARNING, logger="rtsmap.pipeline.load"):
        stack = load_chunk(make_chunk(cx - 100.0, cy + 100.0, (20, 20)), {"a": [first, wrong]},
                           {"a": profile("a", [BandSpec("b", "b")])}, YEAR)
    assert stack.item_ids["a"] == ["wrong-group-1"] and stack.valid["a"].all()
    warnings = [r.getMessage() for r in caplog.records if "declares" in r.getMessage()]
    assert len(warnings) == 1 and "wrong-group-1" in warnings[0]
