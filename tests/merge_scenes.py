"""Seeded detection scenes for the seam merge's regression test (tests/test_merge.py).

The merge's expected outputs on these scenes and on the ARTS seam scene of tests/test_seams.py
were saved (tests/data/merge_reference.csv.gz) with the merge as it was before its speed-up, so
the faster merge is held to the same groups and polygons. ``cd tests && python merge_scenes.py
--seam-scene --overwrite`` rewrites the file from the current merge (only when a change of
results is intended); without ``--overwrite`` it prints the counts only.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import shapely.affinity

from rtsmap.pipeline.grid import GridSpec

#: 64 px tiles at 10 m overlapping by 16 px, 2x2 tiles a chunk (as tests/test_merge.py).
SPEC = GridSpec(resolution=10.0, tile_px=64, overlap_px=16, tiles_per_chunk=2)
STRIDE = SPEC.stride_px * SPEC.resolution
TILE = SPEC.tile_px * SPEC.resolution

REFERENCE = Path(__file__).resolve().parent / "data" / "merge_reference.csv.gz"

#: What is compared per output slump: exact columns, then float measures of the geometry.
EXACT = ("rts_id", "year", "score", "n_detections", "tile_ids", "chunk_ids", "source_items")
MEASURES = ("area_m2", "perimeter_m", "cx", "cy", "minx", "miny", "maxx", "maxy")


def random_detections(seed: int, n_slumps: int, n_tiles: int, *, noisy: bool) -> gpd.GeoDataFrame:
    """Random slumps (overlapping ones too) clipped to every tile of an n x n grid they touch.

    ``noisy``: each tile's copy is shifted by up to 3 px, one in five is dilated by 2-8 px,
    one in ten comes back in two pieces, and a third of the slumps are in two years: the
    merge's split, view check and overlap resolution all get work.
    """
    rng = np.random.default_rng(seed)
    side = n_tiles * STRIDE
    x, y = rng.uniform(0, side, n_slumps), -rng.uniform(0, side, n_slumps)
    radius = rng.uniform(25, 260, n_slumps)
    squash = rng.uniform(0.4, 1.0, n_slumps)
    rows = []
    for k in range(n_slumps):
        g = shapely.affinity.scale(shapely.Point(x[k], y[k]).buffer(radius[k], quad_segs=6), 1.0, squash[k])
        years = [2021, 2022] if rng.random() < 0.33 else [2021]
        i0, i1 = int((g.bounds[0] - TILE) // STRIDE) + 1, int(g.bounds[2] // STRIDE)
        j0, j1 = int((-g.bounds[3] - TILE) // STRIDE) + 1, int(-g.bounds[1] // STRIDE)
        for year in years:
            for i in range(max(i0, 0), min(i1, n_tiles - 1) + 1):
                for j in range(max(j0, 0), min(j1, n_tiles - 1) + 1):
                    copy = g
                    if noisy:
                        copy = shapely.affinity.translate(copy, *rng.uniform(-30, 30, 2))
                        if rng.random() < 0.2:
                            copy = copy.buffer(rng.uniform(20, 80))
                    part = copy.intersection(shapely.box(*SPEC.tile_bounds(i, j)))
                    if part.area <= 0:
                        continue
                    score = float(rng.uniform(0.5, 1.0))
                    pieces = [part]
                    if noisy and rng.random() < 0.1:
                        cy = part.centroid.y
                        pieces = [part.intersection(shapely.box(-1e7, cy, 1e7, 1e7)),
                                  part.intersection(shapely.box(-1e7, -1e7, 1e7, cy))]
                    for p in pieces:
                        if p.area > 0:
                            rows.append((p, i, j, year, score))
    geoms = [r[0] for r in rows]
    return gpd.GeoDataFrame({
        "score": [r[4] for r in rows],
        "area_m2": shapely.area(geoms),
        "perimeter_m": shapely.length(geoms),
        "year": [r[3] for r in rows],
        "chunk_id": [SPEC.chunk_id(r[1] // 2, r[2] // 2) for r in rows],
        "tile_id": [SPEC.tile_id(r[1], r[2]) for r in rows],
        "source_items": [f"S2_{r[1]}_{r[2]},DEM" for r in rows],
    }, geometry=geoms, crs="EPSG:3413")


#: Scene name -> (seed, slumps, tiles per side, noisy).
SCENES = {
    "clean": (21, 350, 12, False),
    "noisy": (22, 300, 12, True),
}


def scene(name: str) -> gpd.GeoDataFrame:
    """The detections of a named scene."""
    seed, n, tiles, noisy = SCENES[name]
    return random_detections(seed, n, tiles, noisy=noisy)


def summary(merged: gpd.GeoDataFrame, name: str) -> pd.DataFrame:
    """What the regression test compares: ids, groups and geometry measures per output slump."""
    g = merged.geometry.values
    c = shapely.centroid(g)
    b = shapely.bounds(g)
    df = pd.DataFrame({k: merged[k].to_numpy() for k in EXACT})
    df["area_m2"] = shapely.area(g)
    df["perimeter_m"] = shapely.length(g)
    df["cx"], df["cy"] = shapely.get_x(c), shapely.get_y(c)
    df["minx"], df["miny"], df["maxx"], df["maxy"] = b.T
    df.insert(0, "scene", name)
    return df.sort_values("rts_id", kind="mergesort").reset_index(drop=True)


def assert_matches_reference(got: gpd.GeoDataFrame, name: str) -> None:
    """Every output slump of a scene equals the saved one: ids, groups and geometry measures."""
    ref = pd.read_csv(REFERENCE, keep_default_na=False)
    ref = ref[ref["scene"] == name].reset_index(drop=True)
    got = summary(got, name)
    assert len(got) == len(ref) > 0
    for col in EXACT:
        if col == "score":
            assert np.array_equal(got[col].to_numpy(np.float64), ref[col].to_numpy(np.float64)), col
        else:
            assert list(got[col].astype(str)) == list(ref[col].astype(str)), col
    for col in MEASURES:
        assert np.allclose(got[col].to_numpy(), ref[col].to_numpy(np.float64), rtol=1e-9, atol=1e-6), col


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="rewrite tests/data/merge_reference.csv.gz")
    parser.add_argument("--seam-scene", action="store_true", help="also the ARTS seam scene (needs ../shared)")
    args = parser.parse_args()
    from rtsmap.pipeline.merge import merge_detections

    frames = [summary(merge_detections(scene(n), spec=SPEC), n) for n in SCENES]
    if args.seam_scene:
        import test_seams

        from conftest import ARTS_SAMPLE

        pair = test_seams.touching_pair(test_seams.footprints(ARTS_SAMPLE, 31)[-1])
        truth = test_seams.footprints(ARTS_SAMPLE, 30) + pair
        dets = test_seams.detect(truth)
        frames.append(summary(merge_detections(dets, spec=test_seams.SPEC), "seam"))
    out = pd.concat(frames, ignore_index=True)
    for name, g in out.groupby("scene"):
        print(f"{name}: {len(g)} slumps")
    if args.overwrite:
        REFERENCE.parent.mkdir(exist_ok=True)
        with gzip.open(REFERENCE, "wt") as f:
            out.to_csv(f, index=False, float_format="%.17g")
        print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
