"""Compare trained models (unimodal and fused) on held-out data: the fusion study of Li et al.

    python -m benchmarks.fusion_study --model optical=runs/demo-train/training/unimodal_optical \
        --model residual_attention=runs/demo-train/training/fusion \
        --model conv=runs/fusion-study/conv/fusion --chips runs/demo-train/chips \
        --region demo-out/region --out runs/fusion-study/results

For every checkpoint: export to ONNX, COCO AP on the chips' test split (``models.evaluate``),
optionally on every chip of a second region no model saw (``--heldout-chips``: more instances
than a test split can spare; there also with each modality in turn absent, for a model trained
with modality dropout), and precision/recall/F1 of a whole `rtsmap run` on a demo region
that no model saw in training (the end-to-end figure users get). Prints a markdown table and
writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from rtsmap.models.data import ChipDataset
from rtsmap.models.evaluate import at_operating_point, coco_metrics, evaluate_model, f1_at, predict_onnx
from rtsmap.models.export import export_onnx
from rtsmap.models.train import load_detector, resolve_checkpoint
from rtsmap.workflows.config import ClusterConfig, GridConfig, RunConfig
from rtsmap.workflows.run import run


def training_record(checkpoint: Path) -> dict | None:
    """What trained a checkpoint: seed, steps, time and config, from its stage's ``record.json``."""
    path = resolve_checkpoint(checkpoint).parent / "record.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    keys = ("stage", "seed", "steps", "train_seconds", "seconds_per_step", "device", "train_chips", "train_config")
    return {k: record.get(k) for k in keys}


def recall_by_optical_view(results: list[dict], dataset: ChipDataset, score_threshold: float, hidden: float = 0.5) -> dict:
    """Recall at the operating point, for slumps optical sees and for those it does not.

    A true slump counts as hidden when at least ``hidden`` of its pixels are invalid in the
    chip's optical mosaic (cloud, shadow or nodata in every scene of the season): only SAR and
    the DEM can find those, so this shows what a fusion takes from them.

    Parameters
    ----------
    results, dataset, score_threshold
        What :func:`models.evaluate.predict_onnx` returns for the chips.
    hidden
        Smallest invalid fraction of a hidden slump.

    Returns
    -------
    dict
        ``{"visible": {...}, "hidden": {...}}``, each ``instances, tp, recall``.
    """
    kept = at_operating_point(results, score_threshold)
    gt = dataset.coco
    files = {image["id"]: image["file_name"] for image in gt["images"]}
    valid_by_image: dict[int, np.ndarray] = {}  # a chip holds several slumps: read its mask once
    groups: dict[str, list] = {"visible": [], "hidden": []}
    for ann in gt["annotations"]:
        if ann["image_id"] not in valid_by_image:
            with np.load(dataset.root / files[ann["image_id"]]) as z:
                valid_by_image[ann["image_id"]] = z["optical_valid"]
        valid = valid_by_image[ann["image_id"]]
        seg = ann["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        covered = 1.0 - float(valid[mask].mean()) if mask.any() else 0.0
        groups["hidden" if covered >= hidden else "visible"].append(ann)
    out = {}
    for name, anns in groups.items():
        m = f1_at({"images": gt["images"], "annotations": anns}, kept, 0.5)
        out[name] = {"instances": len(anns), "tp": m["tp"], "recall": m["recall"]}
    return out


def evaluate_heldout(onnx_path: Path, chips: Path, present: list[str] | None = None) -> tuple[dict, dict]:
    """COCO metrics on every chip of an unseen region and recall by optical view, from one ORT pass
    (``present``: only these modalities, the others fed as absent; None: all)."""
    results, dataset, threshold = predict_onnx(onnx_path, chips, "all", present=present)
    metrics = {"model": str(onnx_path), "split": "all", "chips": len(dataset),
               "instances": len(dataset.coco["annotations"]), "score_threshold": threshold,
               **coco_metrics(dataset.coco, results, threshold)}
    return metrics, recall_by_optical_view(results, dataset, threshold)


def missing_modality_metrics(onnx_path: Path, config, chips: Path) -> dict[str, dict]:
    """Held-out metrics with each modality in turn absent, for a model trained for that subset.

    Returns
    -------
    dict
        ``{"sar": metrics, ...}``: the modality left out -> :func:`evaluate_heldout`'s metrics;
        a modality the model does not take, or whose absence it was not trained for, is left out.
    """
    out = {}
    for missing in config.modalities:
        present = [m for m in config.modalities if m != missing]
        if present and tuple(present) in {tuple(s) for s in config.supported_subsets}:
            out[missing] = evaluate_heldout(onnx_path, chips, present)[0]
    return out


def study(models: dict[str, Path], chips: Path, region: Path, out: Path, workers: int = 2,
          heldout_chips: Path | None = None) -> dict:
    """Export, evaluate on the test split (and on all held-out chips), and run end to end, per checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    years = json.loads((region / "region.json").read_text())["years"]
    results = {}
    for name, checkpoint in models.items():
        model = load_detector(checkpoint, "cpu")
        config = model.config
        onnx_path = out / f"{name}.onnx"
        started = time.perf_counter()
        export_onnx(model, config, onnx_path, trained_on=f"fusion study: {checkpoint}")
        exported = time.perf_counter() - started
        test = evaluate_model(onnx_path, chips, "test")
        heldout, by_view = evaluate_heldout(onnx_path, heldout_chips) if heldout_chips else (None, None)
        robustness = missing_modality_metrics(onnx_path, config, heldout_chips) if heldout_chips else {}
        result = run(
            RunConfig(
                aoi=str(region / "aoi.geojson"),
                years=tuple(years),
                catalog=str(region / "stac" / "items.json"),
                profile="demo",
                model=str(onnx_path),
                out=str(out / f"{name}.gpkg"),
                overwrite=True,
                truth=str(region / "truth.gpkg"),
                quicklook=False,
                grid=GridConfig(tiles_per_chunk=2),
                cluster=ClusterConfig(kind="local", n_workers=workers),
            )
        )
        per_year = {
            str(y): {"tp": m.tp, "fp": m.fp, "fn": m.fn, "precision": m.precision, "recall": m.recall, "f1": m.f1}
            for y, m in (result.evaluation or {}).items()
        }
        results[name] = {"checkpoint": str(checkpoint), "training": training_record(checkpoint),
                         "export_seconds": exported, "test_split": test,
                         "heldout_chips": heldout, "recall_by_optical_view": by_view,
                         "heldout_without": robustness, "end_to_end": per_year}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # AP is None on a split without true instances


def format_table(results: dict) -> str:
    """A markdown table: test-split box/mask AP and end-to-end F1 per year."""
    years = sorted({y for r in results.values() for y in r["end_to_end"]})
    heldout = all(r.get("heldout_chips") for r in results.values())
    extra = "held-out mask AP | held-out mask AP50 | held-out F1 | " if heldout else ""
    head = "| model | box AP | box AP50 | mask AP | mask AP50 | F1@0.5 (test) | " + extra + " | ".join(f"F1 {y}" for y in years) + " |"
    lines = [head, "|" + "---|" * (6 + 3 * heldout + len(years))]
    for name, r in results.items():
        t, h = r["test_split"], r.get("heldout_chips")
        cells = [t["bbox_AP"], t["bbox_AP50"], t["segm_AP"], t["segm_AP50"], t["f1"]]
        cells += [h["segm_AP"], h["segm_AP50"], h["f1"]] if heldout else []
        cells += [r["end_to_end"][y]["f1"] for y in years]
        lines.append(f"| {name} | " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def format_robustness(results: dict) -> str:
    """A markdown table: held-out F1 and mask AP50 with every modality, then without each one."""
    head = "| model | all: F1 | all: mask AP50 | " + " | ".join(
        f"without {m}: F1 | without {m}: mask AP50" for m in ("sar", "optical", "dem")) + " |"
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        h, without = r.get("heldout_chips"), r.get("heldout_without", {})
        if not h:
            continue
        cells = [h["f1"], h["segm_AP50"]]
        for m in ("sar", "optical", "dem"):
            w = without.get(m)
            cells += [w["f1"], w["segm_AP50"]] if w else [None, None]
        lines.append(f"| {name} | " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeat)")
    parser.add_argument("--chips", type=Path, required=True, help="chip folder with the test split")
    parser.add_argument("--region", type=Path, required=True, help="held-out demo region (rtsmap demo-data)")
    parser.add_argument("--heldout-chips", type=Path, help="chips of another unseen region, all evaluated")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)
    results = study({k: Path(v) for k, v in models.items()}, args.chips, args.region, args.out, args.workers,
                    args.heldout_chips)
    print(format_table(results))
    print()
    print(format_robustness(results))


if __name__ == "__main__":
    main()
