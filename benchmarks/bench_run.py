"""Benchmark of `rtsmap run`: the whole pipeline against onnxruntime alone, 1 worker against 2.

    python -m benchmarks.bench_run                       # 5 km demo region, 2 years, untrained demo model
    python -m benchmarks.bench_run --size-m 3000 --json bench.json
    python -m benchmarks.bench_run --model rts.onnx      # any exported model
    python -m benchmarks.bench_run --repeat 3            # median of 3 ratios, each to its own reference

What it measures, on a synthetic demo region (``workflows.demo_region``):

- **onnxruntime alone**: the same tiles (loaded and normalized beforehand, outside the clock),
  in the same batches (per chunk, ``--batch-size``), through one bare onnxruntime session in this
  process: once with 1 intra-op thread, once with one thread per worker of the largest run.
- **end to end**: ``rtsmap run`` itself (``workflows.run.run``: cluster start, plan while the
  workers open the model, execute, merge/GeoPackage/quick-looks, cluster close), timed by the
  phases the run records (its imports before that are not timed), with 1 and with 2
  (``--workers``) worker processes of 1 thread each, each run from an empty work directory in a
  Python process of its own, as a user runs it. The workers open the model from onnxruntime's optimized
  graph, kept by the bare-model reference's session (``pipeline/graph_cache.py``), as every run
  after a model's first on a machine does; ``RTSMAP_CACHE_DIR=none`` measures without it.
- **overhead ratio**: end-to-end time over the onnxruntime time the same cores would need at
  best (single-thread time / workers). 1.0 would mean loading, vectorizing, Dask and writing
  cost nothing.
- **peak memory**: the largest resident set of each worker process (psutil, sampled every
  0.1 s), its proportional set (PSS: pages shared with the client, as a forked worker's are,
  counted in part) and the resident set of the run's process (client and scheduler).

The model is the untrained ``demo`` variant of ``models/`` exported to ONNX (random weights: the
compute is the real network's; its detections are noise, so vectorizing and merging them is
heavier than with a trained model). Needs the train extra (torch) for that; pass ``--model``
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from io import StringIO
from pathlib import Path

import numpy as np


class MemorySampler:
    """Peak RSS of this process and of its Dask worker processes, sampled in a thread, and the
    workers' peak PSS (their share of pages shared with others, as forked workers share this
    process's: RSS counts those pages once per process), sampled every tenth time (it costs more)."""

    def __init__(self, every_s: float = 0.1) -> None:
        import psutil

        self.me = psutil.Process()
        self.every_s = every_s
        self.peaks: dict[int, int] = {}
        self.pss_peaks: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self._worker: dict[int, bool] = {}
        self.main_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        rounds = 0
        while not self._stop.is_set():
            self.main_peak = max(self.main_peak, self.me.memory_info().rss)
            for child in self.me.children(recursive=True):
                try:
                    # LocalCluster's worker processes are forked or spawned children; the other
                    # children are multiprocessing's trackers (command line read once per process:
                    # the sampler should not load the run).
                    if child.pid not in self._worker:
                        self._worker[child.pid] = "_tracker" not in " ".join(child.cmdline())
                    if not self._worker[child.pid]:
                        continue
                    rss = child.memory_info().rss
                    times = child.cpu_times()
                    pss = child.memory_full_info().pss if rounds % 10 == 0 else 0
                except (psutil.Error, AttributeError):  # AttributeError: no PSS outside Linux
                    continue
                self.cpu_s[child.pid] = times.user + times.system
                self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
                self.pss_peaks[child.pid] = max(self.pss_peaks.get(child.pid, 0), pss)
            rounds += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def export_demo_model(path: Path, seed: int = 0) -> Path:
    """Export the untrained ``demo`` model variant (random weights) to ``path``."""
    import torch

    from rtsmap.models.config import build_config
    from rtsmap.models.detector import RTSDetector
    from rtsmap.models.export import export_onnx

    torch.manual_seed(seed)
    config = build_config("demo")
    export_onnx(RTSDetector(config), config, path, trained_on="untrained (benchmark)")
    return path


def reference_batches(plan, batch_size: int) -> list:
    """The plan's tiles loaded and cut into normalized batches exactly as the pipeline cuts them:
    per chunk, ``batch_size`` tiles at a time, tiles without any valid pixel left out (made once,
    before any run writes fragments)."""
    import pystac

    from rtsmap.pipeline.infer import _normalized_batch  # the pipeline's own batching
    from rtsmap.pipeline.load import load_chunk
    from rtsmap.pipeline.model_file import read_model_info

    info = read_model_info(plan.config.model)
    t = info.tile_size
    batches = []
    for task, year in ((t, y) for t in plan.tasks for y in t.years):
        items = {m: [pystac.Item.from_dict(json.loads(d)) for d in task.items[year][m]] for m in task.profiles}
        if any(not v for v in items.values()):
            continue
        stack = load_chunk(task.chunk, items, task.profiles, year)
        any_valid = np.zeros(stack.shape, bool)
        for valid in stack.valid.values():
            any_valid |= valid
        windows = []
        for tile in task.chunk.tiles:
            r0, c0 = (int(v) for v in tile.offset)
            window = (slice(r0, r0 + t), slice(c0, c0 + t))
            if any_valid[window].any():
                windows.append(window)
        for start in range(0, len(windows), batch_size):
            batches.append(_normalized_batch(info, stack, windows[start : start + batch_size]))
    return batches


def onnxruntime_alone(model, batches: list, threads: int) -> tuple[float, int, int, float]:
    """Seconds one bare onnxruntime session needs for ``batches``, the number of tiles and of model
    calls, and the CPU seconds of those calls."""
    from rtsmap.pipeline.infer import load_model

    detector = load_model(model, providers=("cpu",), intra_op_threads=threads)
    detector.predict(batches[0])  # warm-up: first-call allocations are not part of the steady state
    started, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        detector.predict(batch)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, sum(len(next(iter(b.values()))) for b in batches), len(batches), cpu


def end_to_end(config) -> dict:
    """One ``rtsmap run`` in a Python process of its own, as a user runs it (what this process
    holds, the reference batches and sessions, is then not copied into forked workers); its
    figures from :func:`timed_run`."""
    import pickle
    import subprocess

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="rtsmap-bench-run-") as tmp:
        Path(tmp, "config.pickle").write_bytes(pickle.dumps(config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", "benchmarks.bench_run", "--one-run", tmp], cwd=root, env=env, check=True)
        return json.loads(Path(tmp, "figures.json").read_text())


def _one_run(folder: str) -> None:
    """The child of :func:`end_to_end`: the run's figures into ``folder``/figures.json."""
    import pickle

    import rtsmap.workflows.run  # noqa: F401 - what `rtsmap run` has imported before it starts (not timed)

    config = pickle.loads(Path(folder, "config.pickle").read_bytes())
    Path(folder, "figures.json").write_text(json.dumps(timed_run(config)))


def timed_run(config) -> dict:
    """One ``rtsmap run`` (:func:`rtsmap.workflows.run.run`) from an empty work directory, timed by
    phase as the run times them, with peak memory."""
    from rtsmap.workflows.run import run

    shutil.rmtree(config.work_dir, ignore_errors=True)
    with MemorySampler() as memory:
        started = time.monotonic()
        result = run(config, stream=StringIO())
        finished = time.monotonic()
    summary, phases = result.summary, result.phases
    if summary.failed:
        raise RuntimeError(f"benchmark run had failures: {summary.failures[:3]}")
    seconds = summary.seconds
    processed = summary.statuses.get("processed", 0)
    return {
        "workers": config.cluster.n_workers,
        "total_s": finished - started,
        "cluster_start_s": phases["cluster_start"],
        "plan_s": phases["plan"],
        "execute_s": phases["execute"],
        # What closing the cluster added after the finish (0 when it closed during the finish).
        "cluster_close_s": phases["close"],
        "finish_s": phases["finish"],
        # Inside the tasks (summed over chunk-years): a load's own time (mostly on the prefetch
        # thread), the time a year waited for its load (what the prefetch did not hide), the model,
        # polygons and coverage rows (on the prefetch thread, behind the next load), and each
        # chunk-year from its wait for the load to its record (these overlap one another).
        "task_load_s": seconds.get("load", 0.0),
        "task_load_wait_s": seconds.get("load_wait", 0.0),
        "task_infer_s": seconds.get("infer", 0.0),
        "task_vectorize_s": seconds.get("vectorize", 0.0),
        "task_total_s": seconds.get("total", 0.0),
        # CPU seconds of the worker processes over their life (a spawned worker's imports
        # included; a forked one has them from this process).
        "worker_cpu_s": sum(memory.cpu_s.values()),
        "load_s_per_chunk_year": seconds.get("load", 0.0) / max(1, processed),
        "chunk_years": summary.chunk_years,
        "slumps": sum(y.count for y in result.years),
        "worker_peak_rss_mib": sorted(round(v / 2**20) for v in memory.peaks.values()),
        "worker_peak_pss_mib": sorted(round(v / 2**20) for v in memory.pss_peaks.values()),
        "main_peak_rss_mib": round(memory.main_peak / 2**20),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its figures; return them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-m", type=float, default=5000.0, help="side of the square demo region (m)")
    parser.add_argument("--years", default="2021,2022", help="years of the region and the run")
    parser.add_argument("--tiles-per-chunk", type=int, default=2, help="tiles along a chunk side")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per model call")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    parser.add_argument("--model", help="ONNX model (default: export the untrained demo model)")
    parser.add_argument("--dir", help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per worker count, each after a new bare-model reference; the median ratio is printed")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # the child process of end_to_end
    parser.add_argument("--providers", default="cpu",
                        help="onnxruntime providers of the runs, e.g. cuda,cpu (the bare-model reference stays on the CPU)")
    args = parser.parse_args(argv)
    if args.one_run:
        _one_run(args.one_run)
        return {"one_run": args.one_run}

    from rtsmap.workflows.config import ClusterConfig, GridConfig, InferenceConfig, RunConfig, parse_years
    from rtsmap.workflows.demo_region import generate_region
    from rtsmap.workflows.run import make_plan

    years = parse_years(args.years)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rtsmap-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.monotonic()
        region = generate_region(folder / "region", seed=0, years=years, size_m=(args.size_m, args.size_m))
        print(f"region: {args.size_m:g} m square, years {','.join(map(str, years))} ({time.monotonic() - t0:.1f} s)")
        model = Path(args.model) if args.model else export_demo_model(folder / "demo_untrained.onnx")
        config = RunConfig(
            aoi=str(region.aoi),
            years=years,
            catalog=str(region.items),
            profile="demo",
            model=str(model),
            out=str(folder / "inventory.gpkg"),
            overwrite=True,
            grid=GridConfig(tiles_per_chunk=args.tiles_per_chunk),
            inference=InferenceConfig(batch_size=args.batch_size, threads=1,
                                      providers=tuple(p.strip() for p in args.providers.split(","))),
            cluster=ClusterConfig(n_workers=1, timeout_s=120),
        )
        plan = make_plan(config)
        tasks = plan.tasks
        n_chunk_years = sum(len(t.years) for t in tasks)
        batches = reference_batches(plan, args.batch_size)
        ort_1, n_tiles, n_calls, ort_cpu = onnxruntime_alone(model, batches, threads=1)
        most = max(args.workers)
        ort_n = onnxruntime_alone(model, batches, threads=most)[0] if most > 1 else ort_1
        figures = {
            "machine_cpus": os.cpu_count(),
            "model": str(model),
            "chunks": len(tasks),
            "chunk_years": n_chunk_years,
            "tiles": n_tiles,
            "model_calls": n_calls,
            "batch_size": args.batch_size,
            "onnxruntime_1_thread_s": ort_1,
            "onnxruntime_1_thread_cpu_s": ort_cpu,
            f"onnxruntime_{most}_threads_s": ort_n,
            "runs": [],
        }
        print(
            f"plan: {len(tasks)} chunks, {n_chunk_years} chunk-years, {n_tiles} tiles in {n_calls} calls "
            f"of <= {args.batch_size}"
        )
        print(f"onnxruntime alone: {ort_1:.2f} s with 1 thread ({ort_cpu:.2f} CPU s), {ort_n:.2f} s with {most} threads")
        for n, repeat in ((n, r) for n in args.workers for r in range(args.repeat)):
            if repeat:
                # The reference again just before each repeat: a shared machine drifts over minutes.
                ort_1, _, _, ort_cpu = onnxruntime_alone(model, batches, threads=1)
                print(f"onnxruntime alone: {ort_1:.2f} s with 1 thread ({ort_cpu:.2f} CPU s)")
            run_config = replace(config, cluster=replace(config.cluster, n_workers=n))
            fig = end_to_end(run_config)
            fig["onnxruntime_1_thread_s"] = ort_1
            fig["overhead_ratio"] = fig["total_s"] / (ort_1 / n)
            fig["execute_ratio"] = fig["execute_s"] / (ort_1 / n)
            # CPU seconds are what a loaded machine (or a noisy neighbour) changes least.
            fig["cpu_ratio"] = fig["worker_cpu_s"] / ort_cpu
            figures["runs"].append(fig)
            print(
                f"{n} worker(s): total {fig['total_s']:.2f} s (cluster start {fig['cluster_start_s']:.2f}, plan "
                f"{fig['plan_s']:.2f}, execute {fig['execute_s']:.2f}, close {fig['cluster_close_s']:.2f}, "
                f"finish {fig['finish_s']:.2f}); in tasks: load {fig['task_load_s']:.2f} s "
                f"({fig['load_s_per_chunk_year']:.2f} s per chunk-year; waited for {fig['task_load_wait_s']:.2f} s), "
                f"model {fig['task_infer_s']:.2f} s, vectorize+coverage {fig['task_vectorize_s']:.2f} s; "
                f"worker CPU {fig['worker_cpu_s']:.2f} s ({fig['cpu_ratio']:.2f}x the bare model's); "
                f"ratio to onnxruntime/{n}: total {fig['overhead_ratio']:.2f}, "
                f"execute only {fig['execute_ratio']:.2f}; peak RSS per worker {fig['worker_peak_rss_mib']} MiB "
                f"(PSS {fig['worker_peak_pss_mib']} MiB), "
                f"run's process {fig['main_peak_rss_mib']} MiB; {fig['slumps']} slumps"
            )
        if args.repeat > 1:
            for n in args.workers:
                mine = [f for f in figures["runs"] if f["workers"] == n]
                medians = {k: float(np.median([f[k] for f in mine])) for k in ("overhead_ratio", "execute_ratio")}
                figures.setdefault("median", {})[n] = medians
                each = ", ".join(format(f["overhead_ratio"], ".2f") for f in mine)
                print(f"{n} worker(s), median of {len(mine)}: ratio total {medians['overhead_ratio']:.2f} "
                      f"(runs {each}), execute only {medians['execute_ratio']:.2f}")
        runs = {f["workers"]: f for f in figures["runs"]}
        if 1 in runs and 2 in runs:
            figures["speedup_2_vs_1"] = runs[1]["total_s"] / runs[2]["total_s"]
            print(f"2 workers vs 1: {figures['speedup_2_vs_1']:.2f}x faster end to end")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return figures
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
