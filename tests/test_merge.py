"""Seam merge (pipeline/merge.py): copies of one slump join, distinct slumps never do.

Detections here are what a perfect detector would return: each tile's copy of a slump is the
slump clipped to the tile (the truncated copy near a tile edge). tests/test_seams.py does the
same with rasterized masks of real ARTS footprints.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import shapely
import geopandas as gpd

import merge_scenes
from rtsmap.pipeline.errors import RtsmapError
from rtsmap.pipeline.grid import GridSpec
from rtsmap.pipeline.merge import (
    _distinct_rows,
    merge_block,
    merge_by_blocks,
    merge_detections,
    overlapping_pairs,
    resolve_overlaps,
    resolve_overlaps_by_blocks,
    tile_indices,
)

# 64 px tiles at 10 m overlapping by 16 px: stride 480 m, tile 640 m, overlap strip 160 m.
SPEC = GridSpec(resolution=10.0, tile_px=64, overlap_px=16, tiles_per_chunk=2)
STRIDE = SPEC.stride_px * SPEC.resolution


def tile_box(i, j):
    return shapely.box(*SPEC.tile_bounds(i, j))


def detections(objects, *, year=2021, tiles=None, score=0.9, extra=()):
    """Clip each true polygon to every tile it overlaps: one detection per (object, tile)."""
    if tiles is None:
        tiles = [(i, j) for i in range(-1, 5) for j in range(-1, 5)]
    rows = []
    for k, geom in enumerate(objects):
        for i, j in tiles:
            part = geom.intersection(tile_box(i, j))
            if part.area > 0:
                rows.append(dict(geometry=part, tile=(i, j), score=score - 0.001 * k))
    rows.extend(extra)
    return make_gdf(rows, year)


def make_gdf(rows, year=2021):
    return gpd.GeoDataFrame(
        {
            "score": [r["score"] for r in rows],
            "area_m2": [r["geometry"].area for r in rows],
            "perimeter_m": [r["geometry"].length for r in rows],
            "year": [r.get("year", year) for r in rows],
            "chunk_id": [SPEC.chunk_id(r["tile"][0] // 2, r["tile"][1] // 2) for r in rows],
            "tile_id": [SPEC.tile_id(*r["tile"]) for r in rows],
            "source_items": [r.get("items", f"S2_{r['tile'][0]}_{r['tile'][1]},DEM") for r in rows],
        },
        geometry=[r["geometry"] for r in rows],
        crs="EPSG:3413",
    )


def iou(a, b):
    return a.intersection(b).area / a.union(b).area


# Seam between tile columns 0 and 1: x in [480, 640] is seen by both.
SEAM_X = STRIDE


def test_truncated_copies_across_a_seam_become_one_slump():
    slump = shapely.Point(SEAM_X + 60, -300).buffer(120)  # crosses both edges of the strip
    gdf = detections([slump])
    assert len(gdf) == 2  # one truncated copy per tile
    out = merge_detections(gdf, spec=SPEC)
    assert len(out) == 1
    assert iou(out.geometry.iloc[0], slump) > 0.999
    assert out["tile_ids"].iloc[0] == f"{SPEC.tile_id(0, 0)},{SPEC.tile_id(1, 0)}"
    assert out["source_items"].iloc[0] == "DEM,S2_0_0,S2_1_0"
    assert out["n_detections"].iloc[0] == 2
    assert out["area_m2"].iloc[0] == pytest.approx(out.geometry.iloc[0].area)


def test_slump_on_a_four_tile_corner_becomes_one():
    slump = shapely.Point(SEAM_X + 80, -SEAM_X - 80).buffer(200)
    gdf = detections([slump])
    assert len(gdf) >= 4
    out = merge_detections(gdf, spec=SPEC)
    assert len(out) == 1
    assert iou(out.geometry.iloc[0], slump) > 0.999


def test_touching_distinct_slumps_stay_separate():
    # Two slumps sharing an edge in the middle of the seam strip, seen by both tiles.
    left = shapely.box(SEAM_X - 150, -400, SEAM_X + 80, -200)
    right = shapely.box(SEAM_X + 80, -400, SEAM_X + 300, -200)
    out = merge_detections(detections([left, right]), spec=SPEC)
    assert len(out) == 2
    got = sorted(out.geometry, key=lambda g: g.bounds[0])
    assert iou(got[0], left) > 0.999 and iou(got[1], right) > 0.999


def test_slump_in_pieces_in_one_tile_joins_the_whole_copy():
    slump = shapely.box(SEAM_X - 200, -400, SEAM_X + 120, -200)
    whole_b = slump.intersection(tile_box(1, 0))
    in_a = slump.intersection(tile_box(0, 0))
    top, bottom = in_a.intersection(shapely.box(-1e4, -300, 1e4, 0)), in_a.intersection(shapely.box(-1e4, -1e4, 1e4, -300))
    rows = [dict(geometry=top, tile=(0, 0), score=0.8), dict(geometry=bottom, tile=(0, 0), score=0.7),
            dict(geometry=whole_b, tile=(1, 0), score=0.95)]
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 1
    assert iou(out.geometry.iloc[0], slump) > 0.999
    assert out["score"].iloc[0] == pytest.approx(0.95)


def test_noisy_copies_still_join():
    # The two tiles disagree on the boundary by ~2 pixels: still one slump.
    slump = shapely.Point(SEAM_X + 80, -300).buffer(150)
    a = slump.buffer(20).intersection(tile_box(0, 0))
    b = slump.buffer(-20).intersection(tile_box(1, 0))
    out = merge_detections(make_gdf([dict(geometry=a, tile=(0, 0), score=0.9),
                                     dict(geometry=b, tile=(1, 0), score=0.9)]), spec=SPEC)
    assert len(out) == 1


def test_small_slump_beside_a_big_one_is_not_swallowed():
    # Tile (0,0) sees a small slump S in the strip; tile (1,0)'s detection of a big slump L
    # bleeds over S. IoS of S in L is 1, but the tiles' views of the strip disagree: split.
    small = shapely.box(SEAM_X + 10, -330, SEAM_X + 60, -280)
    big_b = shapely.box(SEAM_X, -600, SEAM_X + 400, -100)
    rows = [dict(geometry=small, tile=(0, 0), score=0.8), dict(geometry=big_b, tile=(1, 0), score=0.9)]
    # Not joined: without the overlap rule both come out whole, one detection each.
    kept = merge_detections(make_gdf(rows), spec=SPEC, overlap_tolerance=None)
    assert len(kept) == 2 and sorted(kept["n_detections"]) == [1, 1]
    # With it (the default) the two cannot both claim S's ground: the higher score (L) keeps
    # it, S keeps nothing and is dropped; L is not changed by S.
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 1 and out["n_detections"].iloc[0] == 1
    assert iou(out.geometry.iloc[0], big_b) > 0.999
    # When S scores higher, S is kept whole and L loses S's area (a hole), both stay.
    rows[0]["score"] = 0.95
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 2
    got = {round(g.area): g for g in out.geometry}
    assert iou(got[round(small.area)], small) > 0.999
    assert iou(got[round(big_b.area - small.area)], big_b.difference(small)) > 0.999


def test_small_detection_overlapping_a_seam_slump_a_quarter_stays_apart():
    """Intersection over the smaller part 0.25 is below the default 0.5: no match.

    Slump L crosses the seam (a copy in each tile); tile (1,0) also sees a small slump S that
    overlaps L's copy from tile (0,0) by a quarter of S. The views check would not split them
    (S is small beside L, so the tiles' views still agree at IoU 0.94): only the IoS threshold
    keeps S apart, which the run with a lower threshold shows.
    """
    slump = shapely.box(SEAM_X - 200, -400, SEAM_X + 100, -200)
    small = shapely.box(SEAM_X + 60, -430, SEAM_X + 100, -390)  # 40 x 40 m, 10 m of it inside L
    window = tile_box(0, 0).intersection(tile_box(1, 0))
    assert small.intersection(slump).area / min(small.intersection(window).area,
                                                 slump.intersection(window).area) == pytest.approx(0.25)
    gdf = detections([slump], extra=[dict(geometry=small, tile=(1, 0), score=0.7)])
    assert len(gdf) == 3
    out = merge_detections(gdf, spec=SPEC)
    assert len(out) == 2 and sorted(out["n_detections"]) == [1, 2]
    kept = out.loc[out["n_detections"] == 1].geometry.iloc[0]
    # S keeps the three quarters L does not claim (L scores higher): no overlap left.
    assert iou(kept, small.difference(slump)) > 0.999
    assert iou(out.loc[out["n_detections"] == 2].geometry.iloc[0], slump) > 0.999
    # The same detections merge into one when the threshold drops below their IoS.
    assert len(merge_detections(gdf, spec=SPEC, ios_threshold=0.2)) == 1


def test_chain_through_a_big_detection_is_split():
    # S1 (tile 0,0) ~ L (tile 1,0) ~ S2 (tile 1,1 below): the group fails verification and is
    # split keeping the strongest consistent joins; no group holds all three.
    s1 = shapely.box(SEAM_X + 10, -330, SEAM_X + 60, -280)
    big = shapely.box(SEAM_X, -600, SEAM_X + 400, -100)
    rows = [dict(geometry=s1, tile=(0, 0), score=0.8), dict(geometry=big, tile=(1, 0), score=0.9),
            dict(geometry=shapely.box(SEAM_X + 300, -600, SEAM_X + 350, -STRIDE + 10), tile=(1, 1), score=0.7)]
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert out["n_detections"].max() < 3


def test_same_tile_overlaps_are_distinct_objects():
    a = shapely.box(100, -300, 300, -100)
    b = shapely.box(200, -350, 400, -150)
    out = merge_detections(make_gdf([dict(geometry=a, tile=(0, 0), score=0.9),
                                     dict(geometry=b, tile=(0, 0), score=0.8)]), spec=SPEC)
    assert len(out) == 2


def test_years_never_merge():
    slump = shapely.Point(SEAM_X + 60, -300).buffer(120)
    gdf = detections([slump])
    gdf.loc[gdf.index[1], "year"] = 2022
    out = merge_detections(gdf, spec=SPEC)
    assert sorted(out["year"]) == [2021, 2022]


def random_scene(seed, n=60):
    rng = np.random.default_rng(seed)
    objects = []
    while len(objects) < n:
        x, y = rng.uniform(-300, 4 * STRIDE), -rng.uniform(-300, 4 * STRIDE)
        g = shapely.affinity.scale(shapely.Point(x, y).buffer(rng.uniform(30, 250)), 1.0, rng.uniform(0.4, 1.0))
        if not any(g.intersects(o) for o in objects):
            objects.append(g)
    return objects


def canonical(gdf):
    cols = ["rts_id", "year", "score", "area_m2", "perimeter_m", "n_detections", "tile_ids", "chunk_ids", "source_items"]
    df = gdf[cols].copy()
    df["wkb"] = [g.wkb_hex for g in gdf.geometry]
    return df.sort_values("rts_id").reset_index(drop=True)


def test_random_scene_shuffled_gives_identical_output_and_whole_slumps():
    objects = random_scene(0)
    gdf = detections(objects)
    ref = merge_detections(gdf, spec=SPEC)
    assert len(ref) == len(objects)
    for g in objects:  # each true slump matches exactly one output, whole
        best = max(iou(g, o) for o in ref.geometry)
        assert best > 0.999
    for seed in (1, 2, 3):
        shuffled = gdf.sample(frac=1.0, random_state=seed)
        assert canonical(merge_detections(shuffled, spec=SPEC)).equals(canonical(ref))


@pytest.mark.parametrize("block_chunks", [1, 2])
def test_merge_by_blocks_equals_merging_everything(block_chunks, caplog):
    objects = random_scene(5, n=70)
    gdf = detections(objects, tiles=[(i, j) for i in range(-2, 6) for j in range(-2, 6)])
    whole = merge_detections(gdf, spec=SPEC)
    with caplog.at_level("DEBUG", logger="rtsmap.pipeline.merge"):
        blocks = merge_by_blocks(gdf.sample(frac=1.0, random_state=0), spec=SPEC, block_chunks=block_chunks)
    assert canonical(blocks).equals(canonical(whole))
    # Passes after the first have their blocks shifted by half of the previous side.
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merge_by_blocks")]
    side = 2 * block_chunks
    assert passes[0].startswith(f"merge_by_blocks: side {side} tiles from 0,")
    assert passes[1].startswith(f"merge_by_blocks: side {2 * side} tiles from {side // 2},")


def test_distinct_rows_are_numpys_unique_rows():
    rng = np.random.default_rng(0)
    for k in (2, 3):
        rows = rng.integers(-5, 6, size=(500, k))
        keys, inverse = _distinct_rows(rows)
        want, want_inverse = np.unique(rows, axis=0, return_inverse=True)
        assert np.array_equal(keys, want) and np.array_equal(inverse, want_inverse.reshape(-1))
    keys, inverse = _distinct_rows(np.zeros((0, 3), np.int64))
    assert keys.shape == (0, 3) and len(inverse) == 0


def test_merge_block_origin_moves_the_block_lines():
    # A slump on the seam between tiles 1 and 2: inside a block of tiles 0-3, but on the line
    # between the blocks of tiles -2..1 and 2..5 once the blocks are anchored at tile 2.
    slump = shapely.Point(2 * STRIDE + 60, -850).buffer(100)  # in tile row 1 only
    gdf = detections([slump])
    assert sorted({int(j) for j in tile_indices(gdf.tile_id.to_numpy())[:, 1]}) == [1]
    assert sorted({int(i) for i in tile_indices(gdf.tile_id.to_numpy())[:, 0]}) == [1, 2]
    merged, open_ = merge_block(gdf, spec=SPEC, block_tiles=4)
    assert len(merged) == 1 and len(open_) == 0
    merged, open_ = merge_block(gdf, spec=SPEC, block_tiles=4, origin=2)
    assert len(merged) == 0 and len(open_) == len(gdf)


def test_merge_block_leaves_border_groups_open():
    # Block of 2x2 tiles (one chunk): slump on the seam between tiles 1 and 2 (blocks 0 and 1).
    slump = shapely.Point(2 * STRIDE + 60, -300).buffer(100)
    gdf = detections([slump])
    in_block0 = gdf[[tile_indices([t])[0, 0] < 2 for t in gdf.tile_id]]
    merged, open_ = merge_block(in_block0, spec=SPEC, block_tiles=2)
    assert len(merged) == 0 and len(open_) == len(in_block0)


def test_rts_ids_are_stable_and_unique():
    objects = random_scene(3, n=20)
    a = merge_detections(detections(objects), spec=SPEC)
    b = merge_detections(detections(objects).sample(frac=1.0, random_state=9), spec=SPEC)
    assert list(a.rts_id) == list(b.rts_id)
    assert a.rts_id.is_unique
    assert all(r.startswith("3413_2021_x") for r in a.rts_id)


def test_bad_input_raises_clear_errors():
    gdf = detections([shapely.Point(100, -100).buffer(50)])
    with pytest.raises(RtsmapError, match="lack column"):
        merge_detections(gdf.drop(columns=["tile_id"]), spec=SPEC)
    bad = gdf.copy()
    bad["tile_id"] = "tile-7"
    with pytest.raises(RtsmapError, match="tile_id"):
        merge_detections(bad, spec=SPEC)
    empty = merge_detections(gdf.iloc[:0], spec=SPEC)
    assert len(empty) == 0 and "rts_id" in empty.columns


# ---- no overlapping slumps (resolve_overlaps) ----

def overlap_shares(gdf):
    """Overlap of every intersecting pair over the smaller polygon's area."""
    _, _, share = overlapping_pairs(gdf.geometry.values, tolerance=0.0)
    return share


def test_copies_whose_views_disagree_leave_no_overlap():
    # One slump in the seam strip; tile (1,0) returns it grossly dilated (60 m). Their views of
    # the strip disagree (IoU 0.27 < 0.5), so the merge does not join them, and the two polygons
    # overlap by all of the smaller one.
    slump = shapely.box(SEAM_X + 80, -400, SEAM_X + 140, -200)
    fat = slump.buffer(60, join_style="mitre")
    rows = [dict(geometry=slump, tile=(0, 0), score=0.8), dict(geometry=fat, tile=(1, 0), score=0.9)]
    raw = merge_detections(make_gdf(rows), spec=SPEC, overlap_tolerance=None)
    assert len(raw) == 2 and overlap_shares(raw).max() == pytest.approx(1.0)
    # The higher score keeps the overlap: the true copy keeps nothing and is dropped.
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 1 and iou(out.geometry.iloc[0], fat) > 0.999
    # The other way round the fat copy keeps its ring (79 % of its area): two disjoint slumps.
    rows[0]["score"] = 0.95
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 2 and len(overlap_shares(out)) == 0
    ring = out.loc[out["score"] < 0.95].iloc[0]
    assert ring["area_m2"] == pytest.approx(fat.area - slump.area) == pytest.approx(ring.geometry.area)


def test_bled_neighbour_keeps_its_own_ground():
    # Two distinct slumps, one detection bleeding 20 m over the other: both stay, disjoint.
    left = shapely.box(SEAM_X - 150, -400, SEAM_X + 60, -200)
    right = shapely.box(SEAM_X + 60, -400, SEAM_X + 300, -200)
    rows = [dict(geometry=left.buffer(20, join_style="mitre").intersection(tile_box(0, 0)), tile=(0, 0), score=0.9),
            dict(geometry=right.intersection(tile_box(1, 0)), tile=(1, 0), score=0.8)]
    out = merge_detections(make_gdf(rows), spec=SPEC)
    assert len(out) == 2
    assert len(overlap_shares(out)) == 0 or overlap_shares(out).max() <= 1e-9


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_no_output_pair_overlaps_more_than_the_tolerance(seed):
    """Property: noisy, shifted, bleeding copies of random slumps never leave overlaps."""
    rng = np.random.default_rng(seed)
    objects = random_scene(seed, n=40)
    rows = []
    for k, geom in enumerate(objects):
        for i in range(-1, 5):
            for j in range(-1, 5):
                # Each tile's copy is off by up to 5 px and sometimes grossly dilated.
                g = shapely.affinity.translate(geom, *rng.uniform(-50, 50, 2))
                if rng.random() < 0.2:
                    g = g.buffer(rng.uniform(20, 80))
                part = g.intersection(tile_box(i, j))
                if part.area > 0:
                    rows.append(dict(geometry=part, tile=(i, j), score=float(rng.uniform(0.5, 1.0))))
    gdf = make_gdf(rows)
    raw = merge_detections(gdf, spec=SPEC, overlap_tolerance=None)
    assert len(overlapping_pairs(raw.geometry.values)[0]) > 0  # the scene does produce overlaps
    out = merge_detections(gdf, spec=SPEC)
    share = overlap_shares(out)
    assert len(share) == 0 or share.max() <= 0.01 + 1e-9
    assert out.geometry.is_valid.all() and not out.geometry.is_empty.any()
    assert np.allclose(out["area_m2"], out.geometry.area)
    # The union of what was mapped barely shrinks: contested ground is reassigned, not lost,
    # except for dropped duplicates, which lie mostly under their winners.
    assert shapely.union_all(out.geometry.values).area >= 0.97 * shapely.union_all(raw.geometry.values).area
    # Same result one block at a time and for any input order.
    assert canonical(merge_by_blocks(gdf.sample(frac=1.0, random_state=seed), spec=SPEC, block_chunks=1)).equals(
        canonical(out))


# ---- the fast merge against the saved outputs of the merge before its speed-up ----

@pytest.mark.parametrize("name", ["clean", "noisy"])
def test_merge_gives_the_saved_groups_and_polygons(name):
    gdf = merge_scenes.scene(name)
    out = merge_detections(gdf, spec=merge_scenes.SPEC)
    if name == "noisy":  # the scene exercises splits and overlap resolution
        assert (out["n_detections"] == 1).sum() > 100 and out["year"].nunique() == 2
    merge_scenes.assert_matches_reference(out, name)
    blocks = merge_by_blocks(gdf.sample(frac=1.0, random_state=4), spec=merge_scenes.SPEC, block_chunks=1)
    assert canonical(blocks).equals(canonical(out))


def test_merge_by_blocks_in_two_processes_equals_merging_everything():
    objects = random_scene(5, n=70)
    gdf = detections(objects, tiles=[(i, j) for i in range(-2, 6) for j in range(-2, 6)])
    whole = merge_detections(gdf, spec=SPEC)
    parallel = merge_by_blocks(gdf.sample(frac=1.0, random_state=1), spec=SPEC, block_chunks=1, workers=2)
    assert canonical(parallel).equals(canonical(whole))
    # Any concurrent.futures executor will do (a Dask client's get_executor() too).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        threaded = merge_by_blocks(gdf, spec=SPEC, block_chunks=1, executor=pool)
    assert canonical(threaded).equals(canonical(whole))
    with pytest.raises(RtsmapError, match="workers"):
        merge_by_blocks(gdf, spec=SPEC, workers=0)


# ---- overlap resolution by blocks ----

def overlapping_layer(seed, n=400):
    """Two years of random, heavily overlapping slumps (chains of contested pairs across blocks),
    some with equal scores so the area and WKB tie-breaks are used too."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-2000, 6000, n), rng.uniform(-6000, 2000, n)
    geoms = shapely.buffer(shapely.points(x, y), rng.uniform(40, 400, n), quad_segs=6)
    return gpd.GeoDataFrame({"score": np.round(rng.uniform(0.5, 1.0, n), 2), "year": rng.choice([2021, 2022], n),
                             "area_m2": shapely.area(geoms), "perimeter_m": shapely.length(geoms)},
                            geometry=geoms, crs="EPSG:3413")


def layer_key(gdf):
    df = gdf[["year", "score", "area_m2", "perimeter_m"]].copy()
    df["wkb"] = [g.wkb_hex for g in gdf.geometry]
    return df.sort_values(["year", "wkb"]).reset_index(drop=True)


@pytest.mark.parametrize("block_m", [250.0, 1000.0, 1e6])
def test_resolve_overlaps_by_blocks_equals_the_whole_layer(block_m, caplog):
    layer = overlapping_layer(7)
    whole = resolve_overlaps(layer, min_part_area=100.0)
    assert len(whole) < len(layer)  # some slumps are dropped
    assert len(set(whole.geometry.to_wkb()) - set(layer.geometry.to_wkb())) > 50  # many are cut
    with caplog.at_level("DEBUG", logger="rtsmap.pipeline.merge"):
        blocks = resolve_overlaps_by_blocks(layer.sample(frac=1.0, random_state=3), block_m=block_m,
                                            min_part_area=100.0)
    assert layer_key(blocks).equals(layer_key(whole))
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolve_overlaps_by_blocks")]
    if block_m < 1e6:  # components really were deferred across block borders, more than once
        assert len(passes) >= 2 and any(not m.endswith(" 0 slumps deferred") for m in passes)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        threaded = resolve_overlaps_by_blocks(layer, block_m=block_m, executor=pool, min_part_area=100.0)
    assert layer_key(threaded).equals(layer_key(whole))


def test_resolve_overlaps_by_blocks_rejects_bad_blocks():
    layer = overlapping_layer(8, n=10)
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(RtsmapError, match="block_m"):
            resolve_overlaps_by_blocks(layer, block_m=bad)
    with pytest.raises(RtsmapError, match="workers"):
        resolve_overlaps_by_blocks(layer, block_m=100.0, workers=0)
    assert len(resolve_overlaps_by_blocks(layer.iloc[:1], block_m=100.0)) == 1


def test_resolve_overlaps_by_blocks_when_every_slump_crosses_a_block_line():
    """Slumps astride x = 0 cross a block border at every block size (no year column either):
    they are deferred until the blocks span them, then resolved together."""
    rng = np.random.default_rng(3)
    geoms = shapely.buffer(shapely.points(rng.uniform(-50, 50, 30), rng.uniform(-3000, 3000, 30)), 120)
    layer = gpd.GeoDataFrame({"score": rng.uniform(size=30)}, geometry=geoms, crs="EPSG:3413")
    whole = resolve_overlaps(layer)
    assert len(whole) < len(layer)
    blocks = resolve_overlaps_by_blocks(layer, block_m=10.0)
    assert sorted(blocks.geometry.to_wkb()) == sorted(whole.geometry.to_wkb())
