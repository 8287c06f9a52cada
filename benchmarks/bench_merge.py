"""Seam-merge benchmark: quality against two baselines, then throughput and memory.

``python -m benchmarks.bench_merge [--sizes 10000,100000] [--workers 2] [--json out.json]``

1. Quality, on the seam-test scene (tests/test_seams.py: 32 real ARTS footprints across tile
   and chunk seams, per-tile masks vectorized by pipeline.vectorize): recall (one-to-one,
   IoU >= 0.5 with the slump's whole mask), whole slumps (IoU >= 0.95), duplicates (extra
   outputs lying mostly on a slump that already has one) and wrongly joined outputs (covering
   parts of two or more slumps), for
   - ``ours``: pipeline.merge.merge_detections;
   - ``drop-edge``: drop detections touching their tile's edge, keep the rest (DARTS);
   - ``greedy-nmm``: sort by score, merge every box whose intersection over the smaller box
     exceeds 0.5 into the top one, masks unioned (SAHI's greedy NMM).
2. Throughput: merge_detections on synthetic detections (slumps clipped to the tiles of the
   default grid, 10 m, 256 px tiles, 32 px overlap) at each size, each in its own process so its
   peak RSS and CPU time are its own: wall seconds, CPU seconds (process time, which a shared
   machine inflates less than wall time), detections per second of each, and the growth
   exponent (the log-log slope of wall and of CPU time against size).
   ``--workers N`` (N > 1) also runs ``merge_by_blocks(..., workers=N)`` at each size: the same
   result, blocks merged and their overlaps resolved in N processes (its peak RSS is the largest
   of the main process and any one worker; the main process's CPU seconds are the serial
   remainder: splitting into blocks, pickling the blocks out and their results back, the few
   detections still open after the shifted passes, ids; the CPU seconds add the workers').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from rtsmap.pipeline.evaluation import match_polygons
from rtsmap.pipeline.grid import GridSpec
from rtsmap.pipeline.merge import merge_by_blocks, merge_detections, tile_boxes, tile_indices

REPO = Path(__file__).resolve().parents[1]


def _seam_module():
    """tests/test_seams.py, whose scene the quality comparison reuses (one definition of it)."""
    spec = importlib.util.spec_from_file_location("_rtsmap_test_seams", REPO / "tests" / "test_seams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_edge(dets: gpd.GeoDataFrame, spec: GridSpec) -> list:
    """DARTS-style: keep only detections that do not touch their tile's edge."""
    boxes = tile_boxes(tile_indices(dets["tile_id"].to_numpy()), spec)
    inner = shapely.box(*(boxes + np.array([1, 1, -1, -1]) * spec.resolution * 0.5).T)
    keep = shapely.within(dets.geometry.values, inner)
    return list(dets.geometry.values[keep])


def greedy_nmm(dets: gpd.GeoDataFrame, threshold: float = 0.5) -> list:
    """SAHI-style greedy non-maximum merging on boxes (intersection over the smaller box)."""
    order = np.argsort(-dets["score"].to_numpy(), kind="stable")
    geoms = dets.geometry.values[order]
    b = shapely.bounds(geoms)
    boxes = shapely.box(*b.T)
    area = shapely.area(boxes)
    tree = shapely.STRtree(boxes)
    used = np.zeros(len(geoms), bool)
    out = []
    for k in range(len(geoms)):
        if used[k]:
            continue
        used[k] = True
        cand = tree.query(boxes[k], predicate="intersects")
        cand = cand[~used[cand]]
        ios = shapely.area(shapely.intersection(boxes[k], boxes[cand])) / np.minimum(area[k], area[cand])
        members = cand[ios > threshold]
        used[members] = True
        out.append(shapely.union_all(geoms[np.concatenate([[k], members])]))
    return out


def quality(outputs: list, truths: list) -> dict:
    """Recall, whole slumps, duplicates and wrong joins of outputs against true slumps."""
    m = match_polygons(outputs, truths, iou_threshold=0.5)
    whole = match_polygons(outputs, truths, iou_threshold=0.95).tp
    t_area = np.array([t.area for t in truths])
    tree = shapely.STRtree(truths)
    on_slump, joined = [], 0
    for g in outputs:
        idx = tree.query(g, predicate="intersects")
        cover = shapely.area(shapely.intersection(g, np.asarray(truths, dtype=object)[idx])) / t_area[idx] if len(idx) else np.zeros(0)
        if (cover > 0.2).sum() >= 2:
            joined += 1
        if len(idx):
            on_slump.append(int(idx[np.argmax(cover)]))
    duplicates = len(on_slump) - len(set(on_slump))
    return {"outputs": len(outputs), "recall": m.recall, "whole_iou95": whole / len(truths),
            "duplicates": duplicates, "wrongly_joined": joined}


def run_quality() -> dict:
    seams = _seam_module()
    arts = REPO.parent / "shared" / "data" / "arts" / "ARTS_main_dataset_v.0.0.7-alpha.geojson"
    truths = seams.footprints(arts, 30) + seams.touching_pair(seams.footprints(arts, 31)[-1])
    dets = seams.detect(truths)
    masks = [seams.raster_truth(t) for t in truths]
    ours = list(merge_detections(dets, spec=seams.SPEC).geometry)
    return {"detections": len(dets), "slumps": len(truths),
            "ours": quality(ours, masks),
            "drop-edge": quality(drop_edge(dets, seams.SPEC), masks),
            "greedy-nmm": quality(greedy_nmm(dets), masks)}


def synthetic(n_detections: int, spec: GridSpec, seed: int = 0) -> gpd.GeoDataFrame:
    """About n detections: random slumps (radius 20-150 m) clipped to every tile they touch."""
    rng = np.random.default_rng(seed)
    n_slumps = int(n_detections / 1.45)  # measured: ~1.45 detections per slump on this grid
    stride, size = spec.stride_px * spec.resolution, spec.tile_px * spec.resolution
    side = np.sqrt(n_slumps * 0.12e6)  # one slump per ~0.12 km2: slumps rarely overlap
    x, y = rng.uniform(0, side, n_slumps), -rng.uniform(0, side, n_slumps)
    r = rng.uniform(20, 150, n_slumps)
    slumps = shapely.buffer(shapely.points(x, y), r, quad_segs=4)
    # Tiles each slump's bbox touches (column i: i*stride <= x < i*stride + size).
    i0 = np.floor((x - r - size) / stride).astype(int) + 1
    i1 = np.floor((x + r) / stride).astype(int)
    j0 = np.floor((-y - r - size) / stride).astype(int) + 1
    j1 = np.floor((-y + r) / stride).astype(int)
    rows_s, rows_i, rows_j = [], [], []
    for di in range(3):
        for dj in range(3):
            ok = (i0 + di <= i1) & (j0 + dj <= j1)
            rows_s.append(np.nonzero(ok)[0])
            rows_i.append(i0[ok] + di)
            rows_j.append(j0[ok] + dj)
    s, i, j = (np.concatenate(a) for a in (rows_s, rows_i, rows_j))
    tiles = shapely.box(*tile_boxes(np.stack([i, j], 1), spec).T)
    geoms = shapely.intersection(slumps[s], tiles)
    keep = shapely.area(geoms) > 0
    s, i, j, geoms = s[keep], i[keep], j[keep], geoms[keep]
    tpc = spec.tiles_per_chunk
    return gpd.GeoDataFrame({
        "score": rng.uniform(0.5, 1.0, len(s)), "area_m2": shapely.area(geoms), "perimeter_m": shapely.length(geoms),
        "year": np.full(len(s), 2021), "chunk_id": [spec.chunk_id(a // tpc, b // tpc) for a, b in zip(i.tolist(), j.tolist())],
        "tile_id": [spec.tile_id(a, b) for a, b in zip(i.tolist(), j.tolist())],
        "source_items": np.full(len(s), "S2A_x,S1A_y,DEM_z", dtype=object),
    }, geometry=geoms, crs=spec.crs)


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Log-log slope of seconds against sizes (1: linear)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def run_one(n: int, workers: int = 1) -> dict:
    """One size in this process: merge_detections, or merge_by_blocks in ``workers`` processes."""
    spec = GridSpec()
    dets = synthetic(n, spec)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu()
    if workers > 1:
        merged = merge_by_blocks(dets, spec=spec, workers=workers)
    else:
        merged = merge_detections(dets, spec=spec)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    workers_cpu = _children_cpu() - w0  # the pool's processes have exited and been waited for
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"detections": len(dets), "slumps_out": len(merged), "workers": workers, "seconds": seconds,
            "main_process_cpu_seconds": cpu, "cpu_seconds": cpu + workers_cpu, "peak_rss_mb": peak / 1024, "rss_before_merge_mb": rss_before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated detection counts (add 1000000 to opt in)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--workers", type=int, default=1,
                        help="also time merge_by_blocks in this many processes (> 1)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.exit(2, f"error: --sizes must be comma-separated integers, got {args.sizes!r}\n")
    if any(n < 100 for n in sizes) or args.workers < 1:
        parser.exit(2, "error: --sizes must be at least 100 and --workers at least 1\n")
    if args.json and Path(args.json).exists():
        parser.exit(2, f"error: {args.json} exists\n")
    if args.one:
        print(json.dumps(run_one(args.one, args.one_workers)))
        return
    report: dict = {}
    if not args.skip_quality:
        report["quality"] = run_quality()
        print(f"quality on the seam scene ({report['quality']['detections']} detections, {report['quality']['slumps']} slumps):")
        print(f"{'method':>11} {'outputs':>8} {'recall':>7} {'whole':>6} {'dupl':>5} {'joined':>7}")
        for name in ("ours", "drop-edge", "greedy-nmm"):
            q = report["quality"][name]
            print(f"{name:>11} {q['outputs']:>8} {q['recall']:>7.3f} {q['whole_iou95']:>6.3f} {q['duplicates']:>5} {q['wrongly_joined']:>7}")
    for workers in sorted({1, args.workers}):
        runs = []
        for n in sizes:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_merge", "--one", str(n),
                                  "--one-workers", str(workers)], capture_output=True, text=True, env=env, cwd=REPO,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            how = "merge_detections" if workers == 1 else f"merge_by_blocks, {workers} processes"
            print(f"{how}: {r['detections']:>9} detections -> {r['slumps_out']:>8} slumps: {r['seconds']:8.2f} s, "
                  f"{r['detections'] / r['seconds']:9.0f} det/s; {r['cpu_seconds']:8.2f} CPU-s, "
                  f"{r['detections'] / r['cpu_seconds']:9.0f} det/CPU-s "
                  f"(main process {r['main_process_cpu_seconds']:.1f}); peak RSS {r['peak_rss_mb']:.0f} MB (before merge {r['rss_before_merge_mb']:.0f} MB)")
        key = "throughput" if workers == 1 else f"throughput_{workers}_workers"
        report[key] = runs
        if len(runs) >= 2:
            sizes_run = [r["detections"] for r in runs]
            slope = growth_exponent(sizes_run, [r["seconds"] for r in runs])
            cpu_slope = growth_exponent(sizes_run, [r["cpu_seconds"] for r in runs])
            print(f"growth exponent (log-log slope against detections): wall time {slope:.2f}, CPU time {cpu_slope:.2f}")
            suffix = "" if workers == 1 else f"_{workers}_workers"
            report["growth_exponent" + suffix] = slope
            report["growth_exponent_cpu" + suffix] = cpu_slope
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
