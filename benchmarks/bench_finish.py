"""`finish` benchmark: client and worker memory and wall time of the finishing stage at 100k-1M detections a year.

``python -m benchmarks.bench_finish [--sizes 100000,300000] [--years 1] [--workers 2] [--block-chunks 4] [--json out.json]``
(``--sizes 1000000`` for the issue's goal: client peak RSS under 2 GB at 1M detections a year).

For each size, in its own processes (so each peak RSS is that run's own):

1. build: synthetic detections of one year (``benchmarks.bench_merge.synthetic``: random slumps,
   radius 20-150 m, clipped to every tile of the default grid they touch, ~1.45 detections a
   slump), written as the tasks write them (``workflows.fragments.FragmentStore.write``: one
   GeoParquet fragment and its JSON marker per chunk, with the chunk's coverage row); with
   ``--years N``, N years from 2021, each year's detections those of the year before grown by
   5 m (every slump continues its track, most grow), to measure what the client carries from
   one year to the next;
2. finish: ``workflows.run.finish`` on a Dask LocalCluster of ``--workers`` worker processes (one
   thread each): blocks of ``--block-chunks`` chunks a side read and merged on the workers, the
   year linked and appended to the GeoPackage in slices on the client. Reported: wall time, the
   client's peak RSS (the client process also hosts the LocalCluster's scheduler) and each
   worker's peak RSS.

The run plan is a stand-in for the parts ``finish`` reads of a planned run (no catalog and no
model: the AOI's blocks of chunks, the grid, a model name; no STAC item dates), since the stage
measured starts from fragments on disk. Quick-looks are off (a pan-Arctic run turns them off).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import shapely

REPO = Path(__file__).resolve().parents[1]
YEAR = 2021


def _aoi_side(n_detections: int) -> float:
    # As bench_merge.synthetic lays its slumps: x in [0, side), y in (-side, 0].
    return float(np.sqrt(int(n_detections / 1.45) * 0.12e6))


def build(n_detections: int, root: Path, years: int = 1) -> dict:
    """Write ``years`` years of synthetic fragments under ``root/work`` the way the tasks write them."""
    from benchmarks.bench_merge import synthetic
    from rtsmap.pipeline.grid import GridSpec
    from rtsmap.workflows.fragments import FragmentStore

    spec = GridSpec()
    dets = synthetic(n_detections, spec)
    store = FragmentStore(root / "work" / "bench")
    store.prepare()
    for k in range(years):
        if k:  # the year before, grown (each tile's piece of a slump stays in its tile's window)
            dets = dets.set_geometry(shapely.buffer(dets.geometry.values, 5.0, quad_segs=2))
            dets["year"] = YEAR + k
        for chunk_id, part in dets.groupby("chunk_id", sort=True):
            col, row = (int(v) for v in chunk_id.rsplit("_c", 1)[1].split("_r"))
            window = spec.chunk_bounds(col, row)
            record = {"chunk_id": chunk_id, "year": YEAR + k, "status": "processed", "items": {"optical": ["S2A_x"]},
                      "coverage": [{"status": "processed", "reason": "", "modalities": "optical",
                                    "wkb": shapely.box(*window).wkb_hex}]}
            store.write(YEAR + k, chunk_id, part.reset_index(drop=True), record)
    return {"detections": len(dets), "years": years, "chunks_with_detections": int(dets["chunk_id"].nunique())}


def _plan(root: Path, n_detections: int, block_chunks: int, years: int = 1):
    """A RunPlan with the parts finish reads (see the module docstring)."""
    from rtsmap.pipeline.grid import GridSpec, block_cells, plan_blocks
    from rtsmap.workflows.config import RunConfig
    from rtsmap.workflows.fragments import FragmentStore
    from rtsmap.workflows.run import RunPlan

    spec = GridSpec()
    side = _aoi_side(n_detections)
    aoi = shapely.box(0.0, -side, side, 0.0)
    blocks = plan_blocks(aoi, spec, block_chunks)
    planned = SimpleNamespace(
        iter_cells=lambda: (block_cells(aoi, spec, b) for b in blocks),
        items=SimpleNamespace(dates=lambda ids: {}), item_ids=lambda: [], profile=SimpleNamespace(name="synthetic"))
    model = SimpleNamespace(sha256="0" * 64, metadata={}, name="synthetic", version="0", trained_on="none")
    config = RunConfig(aoi=str(root / "aoi.geojson"), years=tuple(range(YEAR, YEAR + years)), out=str(root / "inventory.gpkg"),
                       workdir=str(root / "work"), quicklook=False)
    return RunPlan(config, spec, FragmentStore(root / "work" / "bench"), model, SimpleNamespace(geometry=aoi), planned,
                   region_name="bench", block_chunks=block_chunks), len(blocks)


def run_finish(n_detections: int, root: Path, workers: int, block_chunks: int, years: int = 1) -> dict:
    """``finish`` on a LocalCluster; wall time and peak RSS of the client and of each worker."""
    from distributed import Client, LocalCluster

    from rtsmap.workflows.run import finish

    plan, n_blocks = _plan(root, n_detections, block_chunks, years)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        result = finish(plan, started=time.monotonic(), started_iso="", executor=client.get_executor(pure=False))
        seconds = time.perf_counter() - t0
        worker_peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": seconds, "slumps": result.years[0].count, "blocks": n_blocks,
            "slumps_per_year": [y.count for y in result.years],
            "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "client_rss_before_finish_mb": rss_start,
            "worker_peak_rss_mb": sorted(worker_peaks.values()),
            "gpkg_mb": Path(plan.config.out).stat().st_size / 1e6}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_finish", *args], capture_output=True, text=True,
                         env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000", help="comma-separated detections a year (1000000: the goal)")
    parser.add_argument("--years", type=int, default=1, help="years of detections (each the year before grown)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--block-chunks", type=int, default=4, help="chunks along a block side in finish")
    parser.add_argument("--json", help="also write the results here (never replaced)")
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--finish", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        print(json.dumps(build(args.build, Path(args.root), args.years)))
        return
    if args.finish:
        print(json.dumps(run_finish(args.finish, Path(args.root), args.workers, args.block_chunks, args.years)))
        return
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.exit(2, f"error: --sizes must be comma-separated integers, got {args.sizes!r}\n")
    if not sizes or any(n < 1000 for n in sizes) or min(args.workers, args.block_chunks, args.years) < 1:
        parser.exit(2, "error: --sizes must be at least 1000, --workers, --block-chunks and --years at least 1\n")
    if args.json and Path(args.json).exists():
        parser.exit(2, f"error: {args.json} exists\n")
    runs = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench_finish-") as tmp:
            built = _child(["--build", str(n), "--root", tmp, "--years", str(args.years)])
            r = {**built, **_child(["--finish", str(n), "--root", tmp, "--workers", str(args.workers),
                                    "--block-chunks", str(args.block_chunks), "--years", str(args.years)])}
        runs.append(r)
        print(f"{r['detections']:>9} detections a year x {args.years} -> {r['slumps']:>8} slumps (first year), {r['blocks']} blocks: "
              f"{r['seconds']:8.1f} s; client peak RSS {r['client_peak_rss_mb']:.0f} MB "
              f"(before finish {r['client_rss_before_finish_mb']:.0f} MB); workers "
              f"{', '.join(f'{w:.0f}' for w in r['worker_peak_rss_mb'])} MB; GeoPackage {r['gpkg_mb']:.0f} MB",
              flush=True)
    report = {"workers": args.workers, "block_chunks": args.block_chunks, "years": args.years, "runs": runs}
    if len(runs) >= 2:
        x = [r["detections"] for r in runs]
        slope = float(np.polyfit(x, [r["client_peak_rss_mb"] for r in runs], 1)[0])
        report["client_mb_per_100k_detections"] = slope * 1e5
        print(f"client peak RSS grows by {slope * 1e5:.0f} MB per 100k detections "
              f"(at 1M: ~{runs[-1]['client_peak_rss_mb'] + slope * (1e6 - x[-1]):.0f} MB by this slope)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
