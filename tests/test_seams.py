"""Real slump footprints across tile and chunk seams come out of the inventory whole, once.

Real ARTS footprints (EPSG:3413) are placed across the tile and chunk seams of a small grid and
rasterized into per-tile masks: each tile sees only its own part of each slump (the truncated
copy at its edge). The "detector" that returns exactly those masks is a stand-in at the model
boundary only (no trained model can run in a unit test); everything after it is real:
pipeline.vectorize turns the masks into polygons, pipeline.merge joins the copies,
pipeline.inventory writes the GeoPackage and GDAL (pyogrio) reads it back.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio.features
import shapely
from affine import Affine

from rtsmap.pipeline.grid import GridSpec, plan_grid
from rtsmap.pipeline.infer import TileDetections
from rtsmap.pipeline.inventory import write_inventory
from rtsmap.pipeline.merge import merge_detections
from rtsmap.pipeline.vectorize import mask_to_geometry, vectorize_detections

# 3 m pixels (the ARTS imagery's resolution), 64 px tiles overlapping by 16 px, 2x2 tiles a
# chunk: tiles are 192 m, seams 144 m apart, a chunk seam every 288 m, so 50-200 m slumps cross
# one to three seams each.
SPEC = GridSpec(resolution=3.0, tile_px=64, overlap_px=16, tiles_per_chunk=2)
YEAR = 2021
SPACING = 420.0  # metres between slump centres: no two placed slumps overlap


def footprints(arts_path, n=30):
    """n real footprints (single polygons, 2,000-30,000 m2) of the ARTS sample, centred on seams of the grid."""
    arts = gpd.read_file(arts_path).to_crs("EPSG:3413")
    arts = arts[~(arts.geometry.isna() | arts.geometry.is_empty)]
    geoms = [shapely.make_valid(g) for g in arts.sort_values("UID").geometry]
    polys = [g for g in geoms if g.geom_type == "Polygon" and 2_000 < g.area < 30_000
             and (g.bounds[2] - g.bounds[0]) < SPACING - 60 and (g.bounds[3] - g.bounds[1]) < SPACING - 60]
    rng = np.random.default_rng(7)
    picks = rng.choice(len(polys), size=n, replace=False)
    stride = SPEC.stride_px * SPEC.resolution
    placed = []
    for k, idx in enumerate(sorted(picks.tolist())):
        g = polys[idx]
        c = g.centroid
        # Lattice point k, snapped onto a seam strip (tile seams, every other one a chunk seam),
        # with a random offset so slumps sit at all positions across the strip.
        col, row = k % 6, k // 6
        x = round(col * SPACING / stride) * stride + rng.uniform(0, SPEC.overlap_px * SPEC.resolution)
        y = -(round(row * SPACING / stride) * stride + rng.uniform(0, SPEC.overlap_px * SPEC.resolution))
        placed.append(shapely.affinity.translate(g, x - c.x, y - c.y))
    return placed


def touching_pair(base):
    """Two distinct slumps sharing an edge: one real footprint cut in two inside a seam strip."""
    stride = SPEC.stride_px * SPEC.resolution
    x_cut = 8 * stride + 20.0  # inside the overlap strip of tile columns 7/8
    c = base.centroid
    g = shapely.affinity.translate(base, x_cut - c.x, -2 * SPACING - c.y)
    left = g.intersection(shapely.box(-1e9, -1e9, x_cut, 1e9))
    right = g.intersection(shapely.box(x_cut, -1e9, 1e9, 1e9))
    return [left, right]


def detect(slumps, rng=None, duplicates=(), suppress=True):
    """Per-tile instance masks of the true slumps, vectorized per chunk (pipeline.vectorize).

    ``duplicates``: extra instances the tile also returns (shapes, each with a score below every
    slump's), as a model whose box NMS lets overlapping masks through does. ``suppress=False``
    vectorizes without the per-tile overlap rule (as fragments of older runs were).
    """
    aoi = shapely.box(*shapely.union_all(slumps).buffer(50).bounds)
    frames = []
    chunks = plan_grid(aoi, SPEC)
    if rng is not None:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    for chunk in chunks:
        tiles = list(chunk.tiles)
        if rng is not None:
            tiles = [tiles[i] for i in rng.permutation(len(tiles))]
        dets = []
        for tile in tiles:
            row0, col0 = tile.offset
            transform = chunk.transform @ Affine.translation(col0, row0)
            masks, scores = [], []
            shapes = [(s, 0.99 - 0.001 * k) for k, s in enumerate(slumps)]
            shapes += [(s, 0.5 - 0.001 * k) for k, s in enumerate(duplicates)]
            for s, score in shapes:
                if not s.intersects(shapely.box(*tile.bounds)):
                    continue
                m = rasterio.features.rasterize([s], out_shape=(SPEC.tile_px, SPEC.tile_px), transform=transform,
                                                dtype="uint8").astype(bool)
                if m.any():
                    masks.append(m)
                    scores.append(score)
            if masks:
                n = len(masks)
                dets.append(TileDetections(
                    tile_id=tile.id, chunk_id=chunk.id,
                    boxes=np.tile(np.array([[col0, row0, col0 + SPEC.tile_px, row0 + SPEC.tile_px]], np.float32), (n, 1)),
                    scores=np.asarray(scores, np.float32), masks=tuple(masks), offsets=tuple([(row0, col0)] * n),
                    invalid_fractions=np.zeros(n, np.float32)))
        frames.append(vectorize_detections(dets, chunk.transform, SPEC.crs, year=YEAR,
                                           source_items=["S2_demo_" + chunk.id, "DEM_1"],
                                           min_kept_fraction=0.5 if suppress else None))
    gdf = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(gdf, geometry="geometry", crs=SPEC.crs)


def raster_truth(slump):
    """The true slump as a whole mask on the grid's pixels: the best any detector can return."""
    minx, miny, maxx, maxy = slump.bounds
    res = SPEC.resolution
    x0, y1 = np.floor(minx / res) * res - res, np.ceil(maxy / res) * res + res
    w, h = int(np.ceil((maxx - x0) / res)) + 2, int(np.ceil((y1 - miny) / res)) + 2
    transform = Affine(res, 0, x0, 0, -res, y1)
    mask = rasterio.features.rasterize([slump], out_shape=(h, w), transform=transform, dtype="uint8").astype(bool)
    return mask_to_geometry(mask, transform)


def iou(a, b):
    return a.intersection(b).area / a.union(b).area


def write_and_read(slumps_gdf, path):
    write_inventory(path, {YEAR: slumps_gdf}, {YEAR: gpd.GeoDataFrame(
        {"status": ["processed"], "reason": [""]}, geometry=[shapely.box(*slumps_gdf.total_bounds)], crs=SPEC.crs)},
        {"software_version": "test"}, overwrite=True)
    return pyogrio.read_dataframe(path, layer=f"rts_{YEAR}")


@pytest.fixture(scope="module")
def scene(arts_path):
    """The ARTS sample from ../shared (tests/conftest.py); skips only where it is absent."""
    placed = footprints(arts_path, 30)
    pair = touching_pair(footprints(arts_path, 31)[-1])
    truth = placed + pair
    return truth, detect(truth)


def test_every_slump_whole_once_in_the_inventory(scene, tmp_path):
    truth, dets = scene
    assert dets["tile_id"].nunique() > 50
    assert len(dets) > 1.8 * len(truth)  # most slumps really are cut by seams
    merged = merge_detections(dets, spec=SPEC)
    got = write_and_read(merged, tmp_path / "inv.gpkg")
    assert len(got) == len(truth)  # no duplicates, no splits, touching pair kept apart
    geoms = list(got.geometry)
    tree = shapely.STRtree(geoms)
    for k, slump in enumerate(truth):
        best = raster_truth(slump)
        ious = [iou(best, geoms[i]) for i in tree.query(best, predicate="intersects")]
        good = [v for v in ious if v > 0.5]
        assert len(good) == 1, f"slump {k}: {len(good)} outputs overlap it well (ious {ious})"
        assert good[0] >= 0.95, f"slump {k} comes out cut: IoU {good[0]:.3f} with its whole mask"
        assert iou(slump, geoms[tree.query(best, predicate="intersects")[int(np.argmax(ious))]]) > 0.8
    # Slumps that span several tiles really were merged from several detections.
    assert (got["n_detections"] >= 2).sum() >= 20
    assert got["rts_id"].is_unique


def test_shuffled_tile_order_gives_identical_inventory(scene, tmp_path):
    truth, dets = scene
    ref = write_and_read(merge_detections(dets, spec=SPEC), tmp_path / "a.gpkg")
    shuffled = detect(truth, rng=np.random.default_rng(3)).sample(frac=1.0, random_state=1)
    other = write_and_read(merge_detections(shuffled, spec=SPEC), tmp_path / "b.gpkg")
    key = lambda df: df.sort_values("rts_id").reset_index(drop=True)
    a, b = key(ref), key(other)
    pd.testing.assert_frame_equal(a.drop(columns="geometry"), b.drop(columns="geometry"))
    assert all(x.equals_exact(y, 0.0) for x, y in zip(a.geometry, b.geometry))


def test_overlapping_instances_leave_no_overlapping_slumps(scene, tmp_path):
    """The model also returns overlapping instances: a 2-pixel-dilated copy of every slump, and
    one instance around the touching pair (its hull), all scoring lower. The inventory still has every
    slump whole once, and no two of its slumps overlap by more than 1 % of the smaller."""
    from rtsmap.pipeline.merge import OVERLAP_TOLERANCE, overlapping_pairs

    truth, _ = scene
    dilated = [shapely.make_valid(s.buffer(2 * SPEC.resolution)) for s in truth[:-2]]
    around_pair = shapely.union_all(truth[-2:]).convex_hull.buffer(SPEC.resolution)
    dets = detect(truth, duplicates=dilated + [around_pair])
    raw = merge_detections(dets, spec=SPEC, overlap_tolerance=None)
    got = write_and_read(merge_detections(dets, spec=SPEC), tmp_path / "inv.gpkg")
    left, _, share = overlapping_pairs(got.geometry.values, tolerance=0.0)
    assert len(share) == 0 or share.max() <= OVERLAP_TOLERANCE
    geoms = list(got.geometry)
    matched = set()
    for k, slump in enumerate(truth):
        best = raster_truth(slump)
        ious = [iou(best, g) for g in geoms]
        good = [i for i, v in enumerate(ious) if v > 0.5]
        assert len(good) == 1 and ious[good[0]] >= 0.95, f"slump {k}: IoUs {sorted(ious)[-2:]}"
        matched.add(good[0])
    # What is left are the dilated copies' rims where a tile saw the rim but not the slump
    # (the slump missed that tile by under a pixel): small and beside, never on, a slump.
    extra = [g for i, g in enumerate(geoms) if i not in matched]
    assert all(g.area < 50 * SPEC.resolution ** 2 for g in extra)
    assert sum(g.area for g in extra) < 0.01 * sum(s.area for s in truth)
    # The vectorizer, not the merge's overlap rule, dropped the duplicates inside tiles.
    assert len(raw) == len(got)


def test_duplicates_must_go_before_the_merge(scene):
    """Why the rule runs on each tile's masks: left to the merge, a tile's dilated duplicate
    matches the neighbour tile's copy like any seam copy and is joined into the slump, which
    comes out fatter (fragments of runs before the rule); after it the slumps are as drawn."""
    from rtsmap.pipeline.merge import overlapping_pairs

    truth, _ = scene
    dilated = [shapely.make_valid(s.buffer(2 * SPEC.resolution)) for s in truth[:-2]]
    late = merge_detections(detect(truth, duplicates=dilated, suppress=False), spec=SPEC)
    early = merge_detections(detect(truth, duplicates=dilated), spec=SPEC)
    for out in (late, early):
        assert len(overlapping_pairs(out.geometry.values)[0]) == 0

    def median_iou(out):
        tree = shapely.STRtree(list(out.geometry))
        return np.median([max(iou(raster_truth(s), out.geometry.iloc[i]) for i in tree.query(s, predicate="intersects"))
                          for s in truth[:-2]])

    assert median_iou(early) >= 0.97 > median_iou(late)


def test_merge_gives_the_saved_groups_and_polygons(scene):
    """The seam scene's inventory equals the one saved before the merge and vectorize speed-up
    (tests/merge_scenes.py): same groups, ids and polygons."""
    from merge_scenes import assert_matches_reference

    _, dets = scene
    assert_matches_reference(merge_detections(dets, spec=SPEC), "seam")
