"""Model benchmark: size, compute, export time and CPU latency of the detector, eager vs ONNX.

``python -m benchmarks.bench_model [--variants demo,tiny] [--fusions all|none,data_level,...]
[--batches 1,4,8] [--repeats N] [--threads 2] [--json OUT]``

For each model variant (``models.config.MODEL_VARIANTS``) and fusion mode:

1. Cost: parameters (whole detector and backbone) and multiply-accumulates per tile at batch 1,
   counted by ``torch.utils.flop_counter.FlopCounterMode`` on the eager inference forward. That
   counter knows matmuls, convolutions and attention only: ``roi_align``, ``nms`` and
   elementwise ops (norms, activations, softmax) are not counted, so the figures are a lower
   bound dominated by what matters (the backbone and the box/mask heads).
2. Export: seconds for ``models.export.export_onnx`` (opset 17) into a temporary folder, and the
   file's size.
3. Latency per tile at each batch size: eager PyTorch (``model.eval()``,
   ``torch.inference_mode``) against onnxruntime's CPUExecutionProvider with the same thread
   count (``torch.set_num_threads`` and ``intra_op_num_threads``); median of N timed calls after
   one warm-up call per engine and batch size (``--warmup``), eager and ORT calls alternating so
   both see the same background load, divided by the batch size.

Models have random (untrained) weights and ``candidate_score_threshold=0.0``, so every tile yields K
detections and the mask head and final NMS do their full inference work; inputs are random
normal (the inputs are already normalized in the pipeline). ``fusion="none"`` is the unimodal
optical model (one branch); the other fusions take optical + SAR + DEM.

Defaults (about 15 minutes on an idle 2-core machine): cost for all five fusions of both
variants; export and latency for all five demo fusions at batch 1, 4 and 8, and for tiny's
``residual_attention`` at batch 1 only (a tiny tile takes tens of seconds on 2 cores).
``--fusions`` and ``--batches``, when given, apply to every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from rtsmap.models.backbone import count_parameters
from rtsmap.models.config import DEFAULT_MODALITIES, FUSION_MODES, ModelConfig, build_config
from rtsmap.models.detector import RTSDetector
from rtsmap.models.export import MIN_OPSET, export_onnx

#: Latency fusions per variant when ``--fusions`` is not given.
DEFAULT_FUSIONS = {"demo": FUSION_MODES, "tiny": ("residual_attention",)}

#: Batch sizes per variant when ``--batches`` is not given.
DEFAULT_BATCHES = {"demo": (1, 4, 8), "tiny": (1,)}

FLOP_NOTE = (
    "GMACs: FlopCounterMode on the eager inference forward at batch 1 (matmul, conv, attention); "
    "roi_align, nms and elementwise ops are not counted, so these are lower bounds."
)


def bench_config(variant: str, fusion: str) -> ModelConfig:
    """The benchmarked configuration: ``variant`` with ``fusion`` and every detection kept.

    Parameters
    ----------
    variant
        A key of ``models.config.MODEL_VARIANTS``.
    fusion
        One of ``models.config.FUSION_MODES``; ``"none"`` gets the optical modality alone.

    Returns
    -------
    ModelConfig
    """
    overrides: dict = {"fusion": fusion, "candidate_score_threshold": 0.0}
    if fusion == "none":
        overrides["modalities"] = {"optical": DEFAULT_MODALITIES["optical"]}
    return build_config(variant, **overrides)


def build_model(config: ModelConfig, seed: int = 0) -> RTSDetector:
    """A random-weight detector in eval mode (seeded, so runs build the same weights)."""
    torch.manual_seed(seed)
    return RTSDetector(config).eval()


def random_inputs(config: ModelConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normal ``{modality: [batch, C, T, T]}`` float32 arrays."""
    rng = np.random.default_rng(seed)
    t = config.tile_size
    return {m: rng.standard_normal((batch, c, t, t), dtype=np.float32) for m, c in config.in_channels.items()}


def model_cost(model: RTSDetector, config: ModelConfig) -> dict:
    """Parameters and counted multiply-accumulates per tile of one model.

    Parameters
    ----------
    model
        The detector (eval mode).
    config
        Its configuration.

    Returns
    -------
    dict
        ``params``, ``backbone_params``, ``gmacs`` and ``backbone_gmacs`` (at batch 1), and
        ``detections`` (the number the counted forward returned).
    """
    inputs = {m: torch.from_numpy(a) for m, a in random_inputs(config, 1).items()}
    counter = FlopCounterMode(display=False)
    # no_grad rather than inference_mode: the counter's dispatch mode is the same either way,
    # and no_grad is the one its documentation uses.
    with torch.no_grad(), counter:
        out = model(inputs)
    per_module = counter.get_flop_counts()
    backbone_flops = sum(per_module.get("RTSDetector.backbone", {}).values())
    # FlopCounterMode counts a multiply-add as two FLOPs.
    return {
        "params": count_parameters(model),
        "backbone_params": count_parameters(model.backbone),
        "gmacs": counter.get_total_flops() / 2e9,
        "backbone_gmacs": backbone_flops / 2e9,
        "detections": int(out["num_detections"][0]),
    }


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session using ``threads`` intra-op threads (as many as torch gets)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One graph branch at a time, as torch's eager forward runs.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(
    model: RTSDetector,
    config: ModelConfig,
    session: ort.InferenceSession,
    batches: tuple[int, ...],
    repeats: int,
    warmup: int = 1,
) -> list[dict]:
    """Per-tile latency of eager PyTorch and onnxruntime at each batch size.

    Parameters
    ----------
    model
        The detector in eval mode.
    config
        Its configuration.
    session
        An onnxruntime session of the same model's export.
    batches
        Batch sizes.
    repeats
        Timed calls per engine and batch size, eager and ORT alternating.
    warmup
        Untimed calls per engine and batch size first (the first calls allocate and pick kernels).

    Returns
    -------
    list of dict
        One row per batch size: ``batch``, ``eager_ms`` and ``ort_ms`` (median per tile),
        ``eager_times`` and ``ort_times`` (seconds per call), ``ratio`` (eager / ort),
        ``eager_detections`` and ``ort_detections`` (mean detections per tile).
    """
    rows = []
    for b in batches:
        arrays = random_inputs(config, b, seed=b)
        tensors = {m: torch.from_numpy(a) for m, a in arrays.items()}
        out: dict = {}

        def eager() -> None:
            with torch.inference_mode():
                out["eager"] = model(tensors)["num_detections"].numpy()

        def onnx() -> None:
            out["ort"] = session.run(["num_detections"], arrays)[0]

        for _ in range(warmup):
            eager()
            onnx()
        # Interleaved, so both engines see the same background load on a shared machine.
        eager_times, ort_times = [], []
        for _ in range(repeats):
            eager_times += timed(eager, 1, warmup=0)
            ort_times += timed(onnx, 1, warmup=0)
        eager_ms = statistics.median(eager_times) / b * 1e3
        ort_ms = statistics.median(ort_times) / b * 1e3
        rows.append(
            {
                "batch": b,
                "eager_ms": eager_ms,
                "ort_ms": ort_ms,
                "ratio": eager_ms / ort_ms,
                "eager_times": eager_times,
                "ort_times": ort_times,
                "eager_detections": float(np.mean(out["eager"])),
                "ort_detections": float(np.mean(out["ort"])),
            }
        )
    return rows


def run_benchmark(
    variants: tuple[str, ...],
    cost_fusions: dict[str, tuple[str, ...]],
    latency_fusions: dict[str, tuple[str, ...]],
    batches: dict[str, tuple[int, ...]],
    repeats: int = 3,
    threads: int = 2,
    warmup: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure cost, export time and latency.

    Parameters
    ----------
    variants
        Model variants, in report order.
    cost_fusions
        Per variant, the fusions whose parameters and MACs are counted.
    latency_fusions
        Per variant, the fusions exported and timed.
    batches
        Per variant, the batch sizes timed.
    repeats
        Timed calls per engine and batch size.
    threads
        Threads for torch and onnxruntime.
    warmup
        Untimed calls per engine and batch size before the timed ones.
    log
        Progress messages.

    Returns
    -------
    dict
        ``environment``, ``cost`` (rows per variant x fusion), ``latency`` (rows per variant x
        fusion x batch, with the export figures) and ``note``.
    """
    torch.set_num_threads(threads)
    report: dict = {
        "environment": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "opset": MIN_OPSET,
            "loadavg_start": list(os.getloadavg()),
        },
        "cost": [],
        "latency": [],
        "note": FLOP_NOTE,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rtsmap-bench-model-") as tmp:
        for variant in variants:
            for fusion in FUSION_MODES:
                do_cost = fusion in cost_fusions[variant]
                do_latency = fusion in latency_fusions[variant]
                if not (do_cost or do_latency):
                    continue
                config = bench_config(variant, fusion)
                model = build_model(config)
                if do_cost:
                    log(f"[{time.perf_counter() - start:6.0f} s] cost {variant}/{fusion}")
                    report["cost"].append({"variant": variant, "fusion": fusion, **model_cost(model, config)})
                if not do_latency:
                    continue
                log(f"[{time.perf_counter() - start:6.0f} s] export {variant}/{fusion}")
                path = Path(tmp) / f"{variant}-{fusion}.onnx"
                t0 = time.perf_counter()
                export_onnx(model, config, path, opset=MIN_OPSET, trained_on="random weights (benchmark)")
                export_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                session = ort_session(path, threads)
                load_s = time.perf_counter() - t0
                log(f"[{time.perf_counter() - start:6.0f} s] latency {variant}/{fusion} batches {batches[variant]}")
                for row in latency(model, config, session, batches[variant], repeats, warmup):
                    report["latency"].append(
                        {
                            "variant": variant,
                            "fusion": fusion,
                            "export_s": export_s,
                            "onnx_mb": path.stat().st_size / 1e6,
                            "session_s": load_s,
                            **row,
                        }
                    )
                del session
                path.unlink()
    report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["environment"]["total_s"] = time.perf_counter() - start
    return report


def format_report(report: dict) -> str:
    """Markdown tables of a :func:`run_benchmark` report."""
    env = report["environment"]
    lines = [
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['threads']} threads, "
        f"{env['cpu_count']} CPUs, median of {env['repeats']} after {env['warmup']} warm-up, opset {env['opset']}; "
        f"load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end "
        f"(a shared machine: latencies are noisy); random weights, candidate_score_threshold=0; "
        f"total {env['total_s']:.0f} s.",
        "",
    ]
    if env["loadavg_start"][0] + env["threads"] > env["cpu_count"]:
        # Measured here: on a loaded 2-core machine, 2 threads made eager demo tiles up to ~10x
        # slower than 1 thread (each op's OpenMP barrier waits for a descheduled thread);
        # onnxruntime suffers less, so the eager/ORT ratio is inflated.
        lines += [
            f"warning: load average + threads exceed the {env['cpu_count']} CPUs; CPU oversubscription "
            "inflates eager latency (and the eager/ORT ratio) most; compare with --threads 1.",
            "",
        ]
    if report["cost"]:
        lines += [
            "| variant | fusion | params (M) | backbone params (M) | GMACs/tile | backbone GMACs/tile |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in report["cost"]:
            lines.append(
                f"| {r['variant']} | {r['fusion']} | {r['params'] / 1e6:.2f} | {r['backbone_params'] / 1e6:.2f} "
                f"| {r['gmacs']:.2f} | {r['backbone_gmacs']:.2f} |"
            )
        lines += ["", report["note"], ""]
    if report["latency"]:
        lines += [
            "| variant | fusion | export (s) | ONNX (MB) | batch | eager ms/tile | ORT ms/tile | eager/ORT "
            "| dets/tile eager, ORT |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["latency"]:
            lines.append(
                f"| {r['variant']} | {r['fusion']} | {r['export_s']:.1f} | {r['onnx_mb']:.1f} | {r['batch']} "
                f"| {r['eager_ms']:.0f} | {r['ort_ms']:.0f} | {r['ratio']:.2f} "
                f"| {r['eager_detections']:.0f}, {r['ort_detections']:.0f} |"
            )
    return "\n".join(lines)


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text == "all":
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"--{what}: {bad[0] if bad else text!r} is not one of {', '.join(allowed)} (or 'all')")
    return names


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    from rtsmap.models.config import MODEL_VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="demo,tiny", help="comma-separated model variants")
    parser.add_argument(
        "--fusions",
        help="fusions to export and time, for every variant: 'all' or a comma-separated list "
        "(default: all for demo, residual_attention for tiny); their cost is counted too",
    )
    parser.add_argument(
        "--cost-fusions",
        help="fusions whose parameters and MACs are counted (default: all, or --fusions when given)",
    )
    parser.add_argument(
        "--batches", help="comma-separated batch sizes for every variant (default: 1,4,8 for demo, 1 for tiny)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per engine and batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and onnxruntime")
    parser.add_argument("--json", type=Path, help="also write the full report (with every timing) here")
    args = parser.parse_args(argv)

    variants = _names(args.variants, tuple(MODEL_VARIANTS), "variants")
    if args.fusions:
        chosen = _names(args.fusions, FUSION_MODES, "fusions")
        latency_fusions = {v: chosen for v in variants}
    else:
        latency_fusions = {v: tuple(DEFAULT_FUSIONS.get(v, ("residual_attention",))) for v in variants}
    if args.cost_fusions:
        chosen = _names(args.cost_fusions, FUSION_MODES, "cost-fusions")
        cost_fusions = {v: chosen for v in variants}
    elif args.fusions:
        cost_fusions = dict(latency_fusions)
    else:
        cost_fusions = {v: FUSION_MODES for v in variants}
    if args.batches:
        try:
            sizes = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            raise SystemExit(f"--batches: {args.batches!r} is not a comma-separated list of integers") from None
        if not sizes or min(sizes) < 1:
            raise SystemExit(f"--batches: {args.batches!r} needs positive batch sizes")
        batches = {v: sizes for v in variants}
    else:
        batches = {v: tuple(DEFAULT_BATCHES.get(v, (1,))) for v in variants}
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --threads must be >= 1, --warmup >= 0")

    report = run_benchmark(
        variants,
        cost_fusions,
        latency_fusions,
        batches,
        repeats=args.repeats,
        threads=args.threads,
        warmup=args.warmup,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
