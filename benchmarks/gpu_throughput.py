"""GPU throughput of the exported detector: provider check, bare-model tiles/s, end to end.

    python -m benchmarks.gpu_throughput --model demo_model.onnx --model tiny_512.onnx --batches 8,16,32

For each model:

1. **Providers**: opens the model through the pipeline's own ``load_model`` with
   ``("tensorrt", "cuda", "cpu")`` (TensorRT only where onnxruntime offers it) and fails unless
   ``session.get_providers()`` really lists the CUDA provider first; onnxruntime-gpu silently
   runs on the CPU when CUDA or cuDNN libraries are missing, which is the failure this guards.
2. **Bare model**: tiles/s at each batch size on random normalized inputs (inputs built once,
   outside the clock; median of ``--repeats`` timed calls after a warm-up), with GPU
   utilisation sampled by NVML (``nvidia-ml-py``) during the timed calls.
3. **End to end** (``--region``): ``benchmarks.bench_run`` on a synthetic demo region with the
   GPU provider and ``--workers`` loading processes, reporting tiles/s, the share of task time
   spent loading vs inferring, and GPU utilisation over the run; so one sees how many CPU cores
   per GPU loading needs to keep up (target: 200 tiles/s of 512 px per H100/H200-class GPU).

Prints one JSON object; ``--json`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np


class GpuSampler:
    """Mean and peak GPU utilisation (percent) of GPU 0, sampled by NVML every ``every_s``."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: utilisation is reported as unknown, timings still stand
            return
        while not self._stop.is_set():
            self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            self._stop.wait(self.every_s)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None}
        return {"gpu_util_mean": round(statistics.fmean(self.samples), 1), "gpu_util_max": max(self.samples)}


def random_batch(info, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalized random inputs of the model's shapes (what the pipeline feeds it)."""
    rng = np.random.default_rng(seed)
    t = info.tile_size
    return {
        name: rng.standard_normal((batch, len(bands), t, t), dtype=np.float32)
        for name, bands in info.band_names.items()
    }


def bare_model(path: Path, batches: list[int], repeats: int) -> dict:
    """Provider check and tiles/s of one model at each batch size."""
    import onnxruntime as ort

    from rtsmap.pipeline.infer import load_model

    asked = ["cuda", "cpu"]
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        asked.insert(0, "tensorrt")
    detector = load_model(path, providers=tuple(asked), require_gpu=True)
    if detector.providers[0] not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        raise SystemExit(f"error: {path}: the session runs on {detector.providers}, not on the GPU")
    out = {"model": str(path), "tile_size": detector.info.tile_size, "providers": list(detector.providers), "batches": {}}
    for batch in batches:
        inputs = random_batch(detector.info, batch)
        detector.predict(inputs)  # warm-up: allocations, cuDNN autotuning, TensorRT engine build
        times = []
        with GpuSampler() as gpu:
            for _ in range(repeats):
                started = time.perf_counter()
                detector.predict(inputs)
                times.append(time.perf_counter() - started)
        median = statistics.median(times)
        out["batches"][batch] = {"seconds_per_call": round(median, 4), "tiles_per_s": round(batch / median, 1), **gpu.summary()}
    return out


def end_to_end(model: Path, size_m: float, workers: int, batch: int) -> dict:
    """benchmarks.bench_run on the GPU provider, with GPU utilisation over the whole run."""
    from benchmarks import bench_run

    with GpuSampler(every_s=0.2) as gpu:
        figures = bench_run.main(["--model", str(model), "--size-m", str(size_m), "--workers", str(workers),
                                  "--batch-size", str(batch), "--tiles-per-chunk", "8", "--providers", "cuda,cpu"])
    run = figures["runs"][-1]
    busy = run["task_load_s"] + run["task_infer_s"]
    return {
        "tiles": figures["tiles"],
        "tiles_per_s_end_to_end": round(figures["tiles"] / run["total_s"], 1),
        "tiles_per_s_execute": round(figures["tiles"] / run["execute_s"], 1),
        "load_share": round(run["task_load_s"] / busy, 3) if busy else None,
        "infer_share": round(run["task_infer_s"] / busy, 3) if busy else None,
        "loading_workers": workers,
        "bench_run": run,
        **gpu.summary(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="ONNX model (repeatable)")
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--region-size-m", type=float, default=0.0, help="also run end to end on a region this wide")
    parser.add_argument("--workers", type=int, default=8, help="loading worker processes for the end-to-end run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from rtsmap.pipeline.errors import RtsmapError

    try:
        report = {"models": [bare_model(m, batches, args.repeats) for m in args.model]}
    except RtsmapError as exc:  # no GPU provider: the check failed, say so in one line
        raise SystemExit(f"error: {exc}") from None
    if args.region_size_m > 0:
        report["end_to_end"] = end_to_end(args.model[0], args.region_size_m, args.workers, batches[0])
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return report


if __name__ == "__main__":
    main()
