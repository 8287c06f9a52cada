"""Tests for pipeline.grid: anchoring, ids, polygon filtering, chunk rebuild, speed."""

import json
import math
import time

import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import LineString, Point, Polygon, box, mapping

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.grid import Chunk, GridSpec, Tile, chunk_by_id, parse_chunk_id, plan_grid

# A small grid so tests see many chunks, seams and boundary tiles with little work.
SMALL = GridSpec(crs="EPSG:3413", resolution=10.0, tile_px=16, overlap_px=4, tiles_per_chunk=3)


def contract_tile_bounds(spec, i, j):
    """Tile bounds written out from docs/contracts.md, independent of the module."""
    s, t = spec.stride_px * spec.resolution, spec.tile_px * spec.resolution
    return (i * s, -(j * s) - t, i * s + t, -(j * s))


def brute_force_tiles(geom, spec):
    """Every tile sharing area with geom, by testing each tile one by one."""
    s, t = spec.stride_px * spec.resolution, spec.tile_px * spec.resolution
    minx, miny, maxx, maxy = geom.bounds
    found = set()
    for i in range(math.floor(minx / s) - 2, math.floor(maxx / s) + 2):
        for j in range(math.floor(-maxy / s) - 2, math.floor(-miny / s) + 2):
            if box(*contract_tile_bounds(spec, i, j)).intersection(geom).area > 0:
                found.add((i, j))
    return found


def all_tiles(chunks):
    return [tile for chunk in chunks for tile in chunk.tiles]


def test_gridspec_defaults():
    spec = GridSpec()
    assert (spec.stride_px, spec.chunk_px, spec.window_px, spec.epsg) == (224, 1792, 1824, 3413)
    assert spec.chunk_id(-12, 40) == "3413_10m_c-12_r40"
    assert spec.tile_id(-96, 322) == "3413_10m_t-96_322"
    assert GridSpec(resolution=2.5).chunk_id(0, 0) == "3413_2.5m_c0_r0"
    # An int resolution is the same grid as the float one.
    assert GridSpec(resolution=10) == spec and isinstance(GridSpec(resolution=10).resolution, float)


@pytest.mark.parametrize("kwargs", [
    dict(tile_px=32, overlap_px=32),
    dict(overlap_px=-1),
    dict(tile_px=2.5),
    dict(tiles_per_chunk=0),
    dict(resolution=0),
    dict(resolution=-10),
    dict(resolution=float("nan")),
    dict(resolution="ten"),
    dict(crs="EPSG:4326"),
    dict(crs="not a crs"),
])
def test_gridspec_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        GridSpec(**kwargs)


def test_tile_bounds_and_offsets_follow_the_contract():
    # An AOI around the origin: negative and positive columns and rows.
    aoi = box(-700.0, -700.0, 700.0, 700.0)
    chunks = plan_grid(aoi, SMALL)
    tiles = all_tiles(chunks)
    assert {t.col for t in tiles} >= {-1, 0} and {t.row for t in tiles} >= {-1, 0}
    for chunk in chunks:
        assert isinstance(chunk, Chunk)
        assert chunk.id == f"3413_10m_c{chunk.col}_r{chunk.row}"
        assert chunk.shape == (SMALL.window_px, SMALL.window_px)
        for tile in chunk.tiles:
            assert isinstance(tile, Tile)
            assert tile.id == f"3413_10m_t{tile.col}_{tile.row}"
            assert tile.bounds == pytest.approx(contract_tile_bounds(SMALL, tile.col, tile.row))
            # Floor division: tile -1 belongs to chunk -1.
            assert (tile.col // 3, tile.row // 3) == (chunk.col, chunk.row)
            assert tile.chunk_id == chunk.id
            rows, cols = chunk.tile_window(tile)
            assert rows.stop - rows.start == cols.stop - cols.start == SMALL.tile_px
            assert 0 <= rows.start and rows.stop <= chunk.shape[0]
            assert 0 <= cols.start and cols.stop <= chunk.shape[1]
            # The window's pixels are exactly the tile's map extent.
            x0, y1 = chunk.transform @ (cols.start, rows.start)
            x1, y0 = chunk.transform @ (cols.stop, rows.stop)
            assert (x0, y0, x1, y1) == pytest.approx(tile.bounds)


def test_read_window_holds_exactly_its_tiles():
    chunk = chunk_by_id(SMALL.chunk_id(-2, 5), SMALL)
    assert len(chunk.tiles) == SMALL.tiles_per_chunk ** 2
    union = shapely.union_all([box(*t.bounds) for t in chunk.tiles])
    assert union.equals(box(*chunk.bounds))
    minx, miny, maxx, maxy = chunk.bounds
    assert (maxx - minx, maxy - miny) == (SMALL.window_px * 10.0, SMALL.window_px * 10.0)
    assert chunk.transform @ (0, 0) == (minx, maxy)
    assert chunk.transform @ (chunk.shape[1], chunk.shape[0]) == pytest.approx((maxx, miny))


def test_neighbouring_windows_overlap_by_overlap_px():
    spec = GridSpec()
    here = chunk_by_id(spec.chunk_id(3, 7), spec)
    east = chunk_by_id(spec.chunk_id(4, 7), spec)
    south = chunk_by_id(spec.chunk_id(3, 8), spec)
    overlap = spec.overlap_px * spec.resolution
    assert here.bounds[2] - east.bounds[0] == pytest.approx(overlap)
    assert south.bounds[3] - here.bounds[1] == pytest.approx(overlap)
    assert here.bounds[1] == south.bounds[1] + spec.chunk_px * spec.resolution
    # Across the seam, tiles overlap exactly as inside the chunk.
    last_here = max(here.tiles, key=lambda t: t.col)
    first_east = min(east.tiles, key=lambda t: t.col)
    assert first_east.col == last_here.col + 1
    assert last_here.bounds[2] - first_east.bounds[0] == pytest.approx(overlap)
    assert here.tiles[1].bounds[0] - here.tiles[0].bounds[0] == pytest.approx(
        spec.stride_px * spec.resolution)


def test_ids_are_stable_across_aois():
    spec = GridSpec()
    a = plan_grid(box(-2.0e6, 1.00e6, -1.95e6, 1.05e6), spec)
    b = plan_grid(Point(-1.95e6, 1.05e6).buffer(20e3), spec)
    tiles_a = {t.id: t for t in all_tiles(a)}
    tiles_b = {t.id: t for t in all_tiles(b)}
    shared = tiles_a.keys() & tiles_b.keys()
    assert len(shared) > 50 and tiles_a.keys() != tiles_b.keys()
    for tile_id in shared:
        assert tiles_a[tile_id] == tiles_b[tile_id]
    chunks_a = {c.id: c for c in a}
    for chunk in b:
        if chunk.id in chunks_a:
            assert chunk.bounds == chunks_a[chunk.id].bounds
            assert chunk.transform == chunks_a[chunk.id].transform


def test_polygon_not_bbox():
    # A thin diagonal strip: its bbox holds ~2000 tiles, the strip itself a few hundred.
    spec = GridSpec()
    strip = LineString([(-1.5e6, 0.8e6), (-1.4e6, 0.7e6)]).buffer(200.0)
    chunks = plan_grid(strip, spec)
    tiles = all_tiles(chunks)
    bbox_tiles = brute_force_tiles(box(*strip.bounds), spec)
    assert len(bbox_tiles) > 1800
    assert 0 < len(tiles) < len(bbox_tiles) / 4
    assert {(t.col, t.row) for t in tiles} == brute_force_tiles(strip, spec)
    assert all(chunk.tiles for chunk in chunks)
    assert [c.id for c in chunks] == sorted(c.id for c in chunks)


def test_plan_matches_brute_force_on_polygon_with_hole():
    # Interior chunks (taken whole), boundary chunks (tested tile by tile), a hole, and
    # edges lying exactly on tile edges.
    shell = [(-2960.0, 2000.0), (4000.0, 2000.0), (2500.0, -4000.0), (-2960.0, -3000.0)]
    hole = Point(500.0, -500.0).buffer(1200.0).exterior.coords
    aoi = Polygon(shell, [hole])
    chunks = plan_grid(aoi, SMALL)
    tiles = all_tiles(chunks)
    got = [(t.col, t.row) for t in tiles]
    assert len(got) == len(set(got))
    assert set(got) == brute_force_tiles(aoi, SMALL)
    assert any(len(c.tiles) == 9 for c in chunks) and any(len(c.tiles) < 9 for c in chunks)
    assert not any(box(*t.bounds).within(Point(500.0, -500.0).buffer(1190.0)) for t in tiles)
    # The AOI's west edge x=-2960 is where column -26 ends, and its north edge y=2000 where
    # row -18 ends: those tiles only touch the AOI and must be left out.
    assert min(t.bounds[2] for t in tiles) > -2960.0
    assert max(t.bounds[1] for t in tiles) < 2000.0


def test_chunk_by_id_rebuilds_planned_chunks():
    aoi = Point(-1.2e6, -0.9e6).buffer(8000.0)
    spec = GridSpec()
    for chunk in plan_grid(aoi, spec):
        assert chunk_by_id(chunk.id, spec, aoi) == chunk
        full = chunk_by_id(chunk.id, spec)
        assert set(full.tiles) >= set(chunk.tiles) and len(full.tiles) == 64
    assert parse_chunk_id("3413_10m_c-12_r40") == (3413, 10.0, -12, 40)
    assert chunk_by_id("3413_10m_c0_r0", spec, box(1e7, 1e7, 1e7 + 1, 1e7 + 1)).tiles == ()


@pytest.mark.parametrize("bad", ["3413_10m_c1", "chunk", "3413_10m_t1_2", "3995_10m_c1_r2",
                                 "3413_20m_c1_r2"])
def test_chunk_by_id_refuses_foreign_ids(bad):
    with pytest.raises(ConfigError):
        chunk_by_id(bad, GridSpec())


def test_tile_window_refuses_tiles_of_other_chunks():
    spec = GridSpec()
    a = chunk_by_id(spec.chunk_id(0, 0), spec)
    b = chunk_by_id(spec.chunk_id(1, 0), spec)
    with pytest.raises(ValueError, match="belongs to chunk"):
        a.tile_window(b.tiles[0])


def test_empty_aoi_plans_nothing():
    assert plan_grid(Polygon(), GridSpec()) == []


def _write_geojson(path, geometry):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": mapping(geometry)}]}))
    return path


def _covers_and_is_tight(aoi_geometry, chunks, spec):
    """All tiles share area with the AOI, and together they cover it."""
    tiles = all_tiles(chunks)
    boxes = shapely.box(*np.array([t.bounds for t in tiles]).T)
    areas = shapely.area(shapely.intersection(boxes, aoi_geometry))
    assert (areas > 0).all()
    assert shapely.union_all(boxes).buffer(1e-6).covers(aoi_geometry)
    return tiles


def test_pole_aoi_gives_a_grid_around_the_pole(tmp_path):
    # lat >= 89.5 written as a lon/lat polygon; in EPSG:3413 a disc of ~55 km around (0, 0).
    path = _write_geojson(tmp_path / "pole.geojson", box(-180.0, 89.5, 180.0, 90.0))
    aoi = read_aoi(path)
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3413", always_xy=True).transform(45.0, 89.5)
    expected = math.pi * (x * x + y * y)
    assert aoi.geometry.area == pytest.approx(expected, rel=1e-3)
    spec = GridSpec()
    chunks = plan_grid(aoi.geometry, spec)
    tiles = _covers_and_is_tight(aoi.geometry, chunks, spec)
    # Tiles in all four quadrants around the pole; count close to area / stride^2.
    assert {(t.col < 0, t.row < 0) for t in tiles} == {(a, b) for a in (0, 1) for b in (0, 1)}
    stride = spec.stride_px * spec.resolution
    assert expected / stride**2 < len(tiles) < 1.2 * expected / stride**2


def test_antimeridian_aoi_gives_one_compact_grid(tmp_path):
    # A naive GeoJSON ring hopping from +179.5 to -179.5: 1 degree wide, not 359.
    ring = [(179.5, 70.0), (-179.5, 70.0), (-179.5, 70.5), (179.5, 70.5), (179.5, 70.0)]
    aoi = read_aoi(_write_geojson(tmp_path / "am.geojson", Polygon(ring)))
    # Polar stereographic is symmetric about the pole: the same box at longitude 0.
    reference = read_aoi(_write_geojson(tmp_path / "ref.geojson", box(-0.5, 70.0, 0.5, 70.5)))
    assert aoi.geometry.area == pytest.approx(reference.geometry.area, rel=1e-6)
    spec = GridSpec()
    chunks = plan_grid(aoi.geometry, spec)
    tiles = _covers_and_is_tight(aoi.geometry, chunks, spec)
    # The shape is rotated against the grid there, so counts agree only roughly.
    n_reference = len(all_tiles(plan_grid(reference.geometry, spec)))
    assert abs(len(tiles) - n_reference) < 0.1 * n_reference
    minx, miny, maxx, maxy = aoi.geometry.bounds
    assert maxx - minx < 100e3 and maxy - miny < 100e3  # not a band round the pole


def test_large_aoi_plans_quickly():
    spec = GridSpec()
    start = time.perf_counter()
    chunks = plan_grid(box(-2.0e6, 0.5e6, -1.9e6, 0.6e6), spec)
    elapsed_100 = time.perf_counter() - start
    assert elapsed_100 < 10.0
    assert sum(len(c.tiles) for c in chunks) == 45 * 45
    start = time.perf_counter()
    chunks = plan_grid(Point(-1.0e6, -1.0e6).buffer(100e3, quad_segs=64), spec)
    elapsed_200 = time.perf_counter() - start
    print(f"plan_grid: 100 km square {elapsed_100:.2f} s; 200 km disc "
          f"{sum(len(c.tiles) for c in chunks)} tiles in {elapsed_200:.2f} s")
    assert elapsed_200 < 30.0
