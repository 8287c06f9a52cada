"""Masks -> polygons: areas, holes, coordinates, filtering, simplification, empty inputs."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine

from rtsmap.pipeline.grid import GridSpec, chunk_by_id
from rtsmap.pipeline.infer import TileDetections, infer_chunk, load_model
from rtsmap.pipeline.load import ChunkStack
from rtsmap.pipeline.merge import overlapping_pairs
from rtsmap.pipeline import vectorize as vectorize_module
from rtsmap.pipeline.vectorize import (
    COLUMNS, mask_to_geometry, suppress_overlaps, tile_geometries, vectorize_detections,
)
from onnx_models import BANDS, make_label_detector, model_metadata

CRS = "EPSG:3413"
RES = 10.0
# A chunk read window whose first pixel's corner is at (-2_000_000, 1_000_000).
TRANSFORM = Affine(RES, 0.0, -2_000_000.0, 0.0, -RES, 1_000_000.0)


def detections(masks_offsets, scores=None, tile_id="3413_10m_t0_0", chunk_id="3413_10m_c0_r0", invalid=None):
    n = len(masks_offsets)
    return TileDetections(
        tile_id=tile_id,
        chunk_id=chunk_id,
        boxes=np.zeros((n, 4), np.float32),  # not used by vectorize
        scores=np.asarray(scores if scores is not None else [0.9] * n, np.float32),
        masks=tuple(np.asarray(m, bool) for m, _ in masks_offsets),
        offsets=tuple(o for _, o in masks_offsets),
        invalid_fractions=np.asarray(invalid if invalid is not None else [0.0] * n, np.float32),
    )


def ring_mask(outer=20, hole=6):
    """A square of ``outer`` px with a square hole of ``hole`` px in its middle."""
    mask = np.ones((outer, outer), bool)
    a = (outer - hole) // 2
    mask[a : a + hole, a : a + hole] = False
    return mask


def test_rectangle_with_hole_keeps_area_and_hole():
    mask = ring_mask(20, 6)
    gdf = vectorize_detections(
        [detections([(mask, (5, 7))], invalid=[0.25])], TRANSFORM, CRS, year=2022, source_items=["s2-a", "s1-b"]
    )
    assert list(gdf.columns) == list(COLUMNS)
    assert len(gdf) == 1 and gdf.crs == CRS
    geom = gdf.geometry.iloc[0]
    assert geom.geom_type == "Polygon" and len(geom.interiors) == 1
    expected = (20 * 20 - 6 * 6) * RES * RES
    # Axis-aligned outlines survive half-pixel simplification unchanged; within a pixel anyway.
    assert abs(gdf.area_m2.iloc[0] - expected) <= RES * RES
    assert gdf.area_m2.iloc[0] == pytest.approx(geom.area)
    assert gdf.perimeter_m.iloc[0] == pytest.approx((4 * 20 + 4 * 6) * RES)
    row = gdf.iloc[0]
    assert row.year == 2022 and row.source_items == "s2-a,s1-b"
    assert row.tile_id == "3413_10m_t0_0" and row.chunk_id == "3413_10m_c0_r0"
    assert row.score == pytest.approx(0.9) and row.invalid_fraction == pytest.approx(0.25)


def test_pixel_lands_at_its_map_coordinates():
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True  # one pixel: chunk row 10 + 1, column 20 + 2
    gdf = vectorize_detections(
        [detections([(mask, (10, 20))])], TRANSFORM, CRS, year=2021, simplify_tolerance_m=0.0
    )
    minx, miny, maxx, maxy = gdf.geometry.iloc[0].bounds
    assert (minx, maxy) == (-2_000_000.0 + 22 * RES, 1_000_000.0 - 11 * RES)
    assert (maxx, miny) == (minx + RES, maxy - RES)
    # source_items from ChunkStack.item_ids (a mapping): flattened, duplicates once.
    gdf = vectorize_detections(
        [detections([(mask, (10, 20))])], TRANSFORM, CRS, year=2021, source_items={"optical": ["a", "b"], "dem": ["a"]}
    )
    assert gdf.source_items.iloc[0] == "a,b"


def test_min_area_drops_small_detections_and_parts():
    big = np.zeros((30, 30), bool)
    big[0:10, 0:10] = True  # 100 px = 10,000 m2
    big[20:22, 20:22] = True  # 4 px part, below min area
    big[20:28, 0:8] = True  # 64 px part, kept
    small = np.ones((4, 4), bool)  # 16 px = 1,600 m2
    gdf = vectorize_detections(
        [detections([(big, (0, 0)), (small, (40, 40))], scores=[0.9, 0.8])],
        TRANSFORM,
        CRS,
        year=2022,
        min_area_m2=2_000.0,
    )
    assert len(gdf) == 1
    geom = gdf.geometry.iloc[0]
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2  # one detection = one row
    assert gdf.area_m2.iloc[0] == pytest.approx((100 + 64) * RES * RES)
    # Without a minimum area everything stays, the small part too.
    gdf = vectorize_detections([detections([(big, (0, 0)), (small, (40, 40))])], TRANSFORM, CRS, year=2022)
    assert len(gdf) == 2 and len(gdf.geometry.iloc[0].geoms) == 3


def test_diagonal_pixels_give_a_valid_geometry():
    mask = np.eye(6, dtype=bool)  # pixels touching only at corners
    mask[0:3, 0:3] = True
    geom = mask_to_geometry(mask, TRANSFORM)
    assert geom.is_valid and geom.area == pytest.approx(mask.sum() * RES * RES)


def test_simplification_keeps_random_blobs_valid():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(40):
        noise = rng.random((40, 40)) < 0.55
        # Smooth a little so the blobs are ragged shapes with holes, not salt and pepper.
        blob = (noise[:-2, :-2].astype(int) + noise[1:-1, 1:-1] + noise[2:, 2:] + noise[1:-1, :-2]) >= 2
        masks.append((blob, (int(rng.integers(0, 50)), int(rng.integers(0, 50)))))
    # The blobs overlap; keep them all (no suppression): this test is about the outlines.
    gdf = vectorize_detections([detections(masks)], TRANSFORM, CRS, year=2022, simplify_tolerance_m=RES,
                               min_kept_fraction=None)
    assert len(gdf) == 40
    assert shapely.is_valid(gdf.geometry.values).all()
    raw = vectorize_detections([detections(masks)], TRANSFORM, CRS, year=2022, simplify_tolerance_m=0.0,
                               min_kept_fraction=None)
    # Simplified outlines have fewer vertices and about the same area.
    assert shapely.get_num_coordinates(gdf.geometry.values).sum() < shapely.get_num_coordinates(raw.geometry.values).sum()
    assert np.allclose(gdf.area_m2, raw.area_m2, rtol=0.15)


def test_empty_inputs_give_an_empty_table_with_the_columns():
    for given in ([], [detections([])]):
        gdf = vectorize_detections(given, TRANSFORM, CRS, year=2022)
        assert gdf.empty and list(gdf.columns) == list(COLUMNS)
        assert gdf.crs == CRS and gdf.geometry.name == "geometry"
        assert gdf["year"].dtype == np.int64 and gdf["score"].dtype == np.float64


def test_chunk_inference_to_polygons(tmp_path):
    """Labels -> real ORT truth detector -> masks -> polygons close to the labelled shapes."""
    spec = GridSpec(crs=CRS, resolution=RES, tile_px=64, overlap_px=8, tiles_per_chunk=2)
    chunk = chunk_by_id(spec.chunk_id(-4, 7), spec)
    h, w = chunk.shape
    modalities = ("optical", "sar", "dem")
    stack = ChunkStack(
        chunk_id=chunk.id,
        year=2023,
        transform=chunk.transform,
        crs=CRS,
        shape=(h, w),
        data={m: np.zeros((len(BANDS[m]), h, w), np.float32) for m in modalities},
        valid={m: np.ones((h, w), bool) for m in modalities},
        item_ids={"optical": ["S2A_X"], "sar": ["S1A_Y"], "dem": ["DEM"]},
        band_names={m: tuple(BANDS[m]) for m in modalities},
    )
    detector = load_model(make_label_detector(tmp_path / "truth.onnx", model_metadata(tile_size=64, max_detections=4)))
    # Nothing labelled: no detections, an empty table.
    found = infer_chunk(detector, stack, chunk.tiles)
    empty = vectorize_detections(found, stack.transform, stack.crs, year=2023, source_items=stack.item_ids)
    assert empty.empty and list(empty.columns) == list(COLUMNS)
    # A ring (with a hole) wholly inside the first tile.
    ring = ring_mask(24, 8).astype(np.float32)
    stack.data["dem"][2, 20:44, 10:34] = ring
    found = infer_chunk(detector, stack, chunk.tiles)
    gdf = vectorize_detections(found, stack.transform, stack.crs, year=2023, source_items=stack.item_ids)
    assert len(gdf) == 1 and gdf.tile_id.iloc[0] == chunk.tiles[0].id
    x0, y0 = chunk.transform.c + 10 * RES, chunk.transform.f - 20 * RES  # column 10, row 20
    truth = shapely.box(x0, y0 - 24 * RES, x0 + 24 * RES, y0).difference(
        shapely.box(x0 + 8 * RES, y0 - 16 * RES, x0 + 16 * RES, y0 - 8 * RES)
    )
    geom = gdf.geometry.iloc[0]
    assert len(geom.interiors) == 1
    iou = geom.intersection(truth).area / geom.union(truth).area
    assert iou > 0.95
    assert gdf.source_items.iloc[0] == "S2A_X,S1A_Y,DEM" and gdf.year.iloc[0] == 2023


# ---- overlapping instances of one tile (suppress_overlaps) ----

def nested_output():
    """What the model returned on one tile: a big instance around two small slumps, and the two."""
    big = np.zeros((30, 50), bool)
    big[2:28, 2:48] = True
    small_a = np.ones((20, 18), bool)  # at chunk (5, 5)
    small_b = np.ones((20, 18), bool)  # at chunk (5, 28)
    return [(big, (3, 3)), (small_a, (5, 5)), (small_b, (5, 28))]


def test_big_instance_nesting_two_small_ones_scoring_lower_is_dropped():
    masks = nested_output()
    gdf = vectorize_detections([detections(masks, scores=[0.6, 0.9, 0.8])], TRANSFORM, CRS, year=2022,
                               simplify_tolerance_m=0.0)
    # The small ones keep their pixels; the big one keeps 1196 - 720 of 1196 px (40 %): dropped.
    assert len(gdf) == 2
    assert sorted(gdf.area_m2) == pytest.approx([360 * RES * RES] * 2)
    assert list(gdf.score) == pytest.approx([0.9, 0.8])
    # Without suppression all three come out, overlapping.
    raw = vectorize_detections([detections(masks, scores=[0.6, 0.9, 0.8])], TRANSFORM, CRS, year=2022,
                               min_kept_fraction=None)
    assert len(raw) == 3 and len(overlapping_pairs(raw.geometry.values)[0]) == 2


def test_big_instance_nesting_two_small_ones_scoring_higher_wins():
    masks = nested_output()
    gdf = vectorize_detections([detections(masks, scores=[0.9, 0.8, 0.7])], TRANSFORM, CRS, year=2022,
                               simplify_tolerance_m=0.0)
    assert len(gdf) == 1 and gdf.area_m2.iloc[0] == pytest.approx(26 * 46 * RES * RES)


def test_partial_overlap_is_cut_by_score_and_pixels_are_never_shared():
    a = np.ones((10, 10), bool)
    b = np.ones((10, 10), bool)
    tile = detections([(a, (0, 0)), (b, (0, 4))], scores=[0.7, 0.9])  # overlap: 10 x 6 px
    assert len(suppress_overlaps(tile)) == 1  # a would keep 40 % (< one half): dropped
    kept = suppress_overlaps(tile, min_kept_fraction=0.3)
    assert list(kept.scores) == pytest.approx([0.9, 0.7])  # score order
    assert kept.masks[0].sum() == 100 and kept.masks[1].sum() == 40
    assert not kept.masks[1][:, 4:].any()  # a lost exactly the shared columns
    assert len(suppress_overlaps(tile, min_kept_fraction=0.0)) == 2


def test_random_overlapping_instances_give_disjoint_polygons():
    rng = np.random.default_rng(4)
    masks, scores = [], []
    for _ in range(30):
        h, w = rng.integers(5, 30, 2)
        m = rng.random((h, w)) < 0.9
        masks.append((m, (int(rng.integers(0, 40)), int(rng.integers(0, 40)))))
        scores.append(float(rng.random()))
    gdf = vectorize_detections([detections(masks, scores=scores)], TRANSFORM, CRS, year=2022,
                               simplify_tolerance_m=0.0)
    assert 0 < len(gdf) < 30
    left, right, share = overlapping_pairs(gdf.geometry.values, tolerance=0.0)
    assert len(left) == 0  # pixel outlines: not one shared pixel
    # Simplified outlines may overlap along shared edges by a sliver, within the tolerance.
    simple = vectorize_detections([detections(masks, scores=scores)], TRANSFORM, CRS, year=2022)
    assert len(overlapping_pairs(simple.geometry.values, tolerance=0.01)[0]) == 0


# ---- one GDAL call per tile (tile_geometries) ----

def random_tile(seed, n=40):
    """Overlapping ragged masks with holes and several parts, some sharing edges after the rule."""
    rng = np.random.default_rng(seed)
    masks, scores = [], []
    for _ in range(n):
        noise = rng.random((int(rng.integers(6, 40)), int(rng.integers(6, 40)))) < 0.6
        blob = np.zeros_like(noise)
        blob[1:-1, 1:-1] = (noise[:-2, :-2].astype(int) + noise[1:-1, 1:-1] + noise[2:, 2:] + noise[1:-1, :-2]) >= 2
        masks.append((blob, (int(rng.integers(0, 60)), int(rng.integers(0, 60)))))
        scores.append(float(rng.random()))
    return detections(masks, scores=scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_part_area", [0.0, 300.0])
def test_one_call_per_tile_gives_the_polygons_of_one_call_per_mask(seed, min_part_area):
    tile = suppress_overlaps(random_tile(seed), min_kept_fraction=0.2)
    assert len(tile) >= 10
    # The scene has what makes tracing one label image differ from tracing one mask: instances
    # sharing edges, holes, and instances in several parts.
    together = tile_geometries(tile, TRANSFORM, min_part_area=min_part_area)
    geoms = np.asarray(together, dtype=object)
    assert shapely.touches(geoms[:, None], geoms[None, :]).any()
    alone = [mask_to_geometry(m, TRANSFORM @ Affine.translation(c, r), min_part_area=min_part_area)
             for m, (r, c) in zip(tile.masks, tile.offsets)]
    assert len(together) == len(alone) == len(tile)
    assert any(g.geom_type == "MultiPolygon" for g in alone)
    assert any(len(p.interiors) for g in alone for p in shapely.get_parts(g))
    for a, b in zip(together, alone):
        # The same vertices in the same order (a stricter check than the same polygon).
        assert a.wkb == b.wkb


def test_vectorize_makes_one_gdal_call_per_tile(monkeypatch):
    calls = []
    real = vectorize_module.shapes

    def counting(*args, **kwargs):  # the real GDAL polygonizer, counted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vectorize_module, "shapes", counting)
    tiles = [random_tile(3), random_tile(4)]
    fast = vectorize_detections(tiles, TRANSFORM, CRS, year=2022)
    assert len(calls) == 2 and len(fast) > 20
    # Overlapping masks (no rule) are traced one by one; with the rule applied beforehand the
    # per-mask way gives the same table.
    calls.clear()
    slow = vectorize_detections([suppress_overlaps(t) for t in tiles], TRANSFORM, CRS, year=2022,
                                min_kept_fraction=None)
    assert len(calls) == len(slow) == len(fast)
    assert fast.drop(columns="geometry").equals(slow.drop(columns="geometry"))
    assert all(a.wkb == b.wkb for a, b in zip(fast.geometry, slow.geometry))


def test_overlapping_masks_are_refused_by_the_one_call_way():
    a = np.ones((10, 10), bool)
    with pytest.raises(ValueError, match="overlap"):
        tile_geometries(detections([(a, (0, 0)), (a, (0, 4))]), TRANSFORM)
