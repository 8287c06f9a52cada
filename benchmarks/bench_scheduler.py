"""Scheduler overhead of `rtsmap run`: many near-empty chunk-years through the run loop.

    python -m benchmarks.bench_scheduler --tasks 10000 30000 --json runs/bench_scheduler.json

Each task is a real :class:`~rtsmap.workflows.tasks.ChunkTask` with no items, so
:func:`~rtsmap.workflows.tasks.process_chunk` records the chunk-year as ``no_data`` (one small
fragment and marker written, no raster read, no model run): what is left is the cost of making,
pickling, scheduling and collecting a task, and of writing its fragment. Tasks go through
:func:`rtsmap.workflows.run.execute` on a LocalCluster of 2 worker processes.

While it runs, a thread samples every 0.1 s the tasks the scheduler knows
(``len(scheduler.tasks)``) and those processing on workers (``client.processing()``), to show that
neither exceeds ``max_in_flight`` (plus the few released tasks the scheduler has not forgotten
yet); the client's resident memory is sampled too. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _tasks(n: int, store, profiles, spec, year: int = 2024):
    """``n`` near-empty chunk tasks (one year each), made lazily as the run asks for them."""
    import shapely

    from rtsmap.pipeline.grid import chunk_by_id
    from rtsmap.workflows.config import InferenceConfig
    from rtsmap.workflows.tasks import ChunkTask

    from rtsmap.pipeline.model_file import file_sha256
    from rtsmap.workflows.config import DEMO_MODEL

    side = int(n ** 0.5) + 1
    inference = InferenceConfig(threads=1)
    # A task reads the model's modalities before deciding a year is no_data; each worker opens
    # the model once (cached), so the tasks measure scheduling, not inference.
    model, sha = str(DEMO_MODEL), file_sha256(DEMO_MODEL)
    empty = {m: () for m in profiles}
    for k in range(n):
        chunk = chunk_by_id(spec.chunk_id(k % side, k // side), spec)
        yield ChunkTask(chunk=chunk, years=(year,), items={year: empty}, profiles=profiles, model_path=model,
                        model_sha256=sha, inference=inference, store=store,
                        core_wkb=shapely.box(*chunk.bounds).wkb)


def run_case(n: int, workers: int, max_in_flight: int, folder: Path) -> dict:
    """Run ``n`` tasks through ``execute``; return wall time, per-task overhead and the sampled peaks."""
    from io import StringIO

    from distributed import Client, LocalCluster

    from rtsmap.pipeline.grid import GridSpec
    from rtsmap.workflows.config import RunConfig
    from rtsmap.workflows.fragments import FragmentStore
    from rtsmap.workflows.planning import resolve_profile
    from rtsmap.workflows.run import RunPlan, execute

    spec = GridSpec()
    profiles = dict(resolve_profile("demo").modalities)
    store = FragmentStore(folder / f"work-{n}" / "bench")
    store.prepare()
    config = RunConfig(aoi="unused", years=(2024,), max_in_flight=max_in_flight, retries=0)
    plan = RunPlan(config=config, spec=spec, store=store, model_info=None, aoi=None, planned=None)
    me = psutil.Process()
    peaks = {"scheduler_tasks": 0, "processing": 0, "client_rss_mb": 0.0}
    stop = threading.Event()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:

        def sample():
            while not stop.is_set():
                try:
                    known = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
                    busy = sum(len(v) for v in client.processing().values())
                except Exception:  # the cluster is closing
                    break
                peaks["scheduler_tasks"] = max(peaks["scheduler_tasks"], known)
                peaks["processing"] = max(peaks["processing"], busy)
                peaks["client_rss_mb"] = max(peaks["client_rss_mb"], me.memory_info().rss / 2**20)
                stop.wait(0.1)

        rss_before = me.memory_info().rss / 2**20
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        summary = execute(plan, client, stream=StringIO(), tasks=_tasks(n, store, profiles, spec))
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
    statuses = dict(summary.statuses)
    return {
        "tasks": n,
        "workers": workers,
        "max_in_flight": max_in_flight,
        "seconds": round(seconds, 1),
        "ms_per_task": round(1000 * seconds / n, 2),
        "tasks_per_second": round(n / seconds, 1),
        "statuses": statuses,
        "peak_scheduler_tasks": peaks["scheduler_tasks"],
        "peak_processing": peaks["processing"],
        "client_rss_mb_before": round(rss_before, 1),
        "client_rss_mb_peak": round(peaks["client_rss_mb"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", type=int, default=[10_000, 30_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=8, help="default: 4 per worker, as `rtsmap run`")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.tasks:
            fig = run_case(n, args.workers, args.max_in_flight, Path(folder))
            print(json.dumps(fig), flush=True)
            figures.append(fig)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
