"""Evaluate a detector on a chip split: COCO box/mask AP (pycocotools) and F1 at IoU 0.5.

The model is a PyTorch checkpoint (``models.train.load_detector``) or an exported ONNX file
(run with onnxruntime, fed exactly as the pipeline feeds it: normalised with the file's
metadata, invalid pixels 0). Both give the padded outputs of docs/contracts.md; masks (28x28
inside each box) are pasted into the tile and thresholded at the model's ``mask_threshold``
exactly as the pipeline does it (``rtsmap.contract.paste_mask`` and ``keep``), then
RLE-encoded for COCOeval.

AP is computed over every detection the model emits (at or above its
``candidate_score_threshold``, 0.05 by default, as COCO evaluations do: AP over a list cut at 0.5
would cap recall); COCOeval matches detections to truth its own way (by score, as COCO defines
AP). F1 counts one-to-one matches of mask IoU >= 0.5 (``rtsmap.contract.match_one_to_one``,
the inventory evaluation's matcher) over the detections at or above the model's
``score_threshold``: the operating point the inventory sees.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from rtsmap.contract import PRESENCE_INPUT, canonical_subset, keep, match_one_to_one, paste_mask, presence_vector
from rtsmap.models.data import ChipDataset, collate

#: Keys of the metrics dict, in order.
METRIC_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75",
               "precision", "recall", "f1", "tp", "fp", "fn")


def results_from_outputs(
    image_ids: Iterable[int], outputs: Mapping[str, np.ndarray], tile_size: int, mask_threshold: float
) -> list[dict[str, Any]]:
    """COCO result entries from the model's padded outputs of one batch.

    Parameters
    ----------
    image_ids
        COCO image id of each batch entry.
    outputs
        ``boxes`` ``[B, K, 4]``, ``scores`` ``[B, K]``, ``masks`` ``[B, K, 28, 28]``, ``num_detections`` ``[B]``.
    tile_size
        T.
    mask_threshold
        Mask probability at or above which a pixel belongs to the slump.

    Returns
    -------
    list of dict
        ``image_id, category_id, bbox (x, y, w, h), score, segmentation (RLE)`` per detection.
    """
    results = []
    for b, image_id in enumerate(image_ids):
        n = int(outputs["num_detections"][b])
        if n == 0:
            continue
        boxes = np.asarray(outputs["boxes"][b, :n], np.float32)
        binary = np.zeros((tile_size, tile_size, n), np.uint8, order="F")
        for k in range(n):
            prob, (r, c) = paste_mask(np.asarray(outputs["masks"][b, k]), boxes[k], tile_size, tile_size)
            binary[r : r + prob.shape[0], c : c + prob.shape[1], k] = keep(prob, mask_threshold)
        rles = mask_utils.encode(binary)
        for k in range(n):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            rle = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
            results.append({"image_id": int(image_id), "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(outputs["scores"][b, k]), "segmentation": rle})
    return results


def _quiet(fn, *args):
    """Run a pycocotools call without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _rle(segmentation: dict) -> dict:
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def at_operating_point(results: Iterable[dict[str, Any]], score_threshold: float) -> list[dict[str, Any]]:
    """The results the pipeline would keep at ``score_threshold`` (``rtsmap.contract.keep``).

    Parameters
    ----------
    results
        COCO result entries with ``score``.
    score_threshold
        The operating point.

    Returns
    -------
    list of dict
        The entries scoring at or above it, in their order.
    """
    return [r for r in results if keep(r["score"], score_threshold)]


def f1_at(gt: Mapping[str, Any], results: list[dict[str, Any]], iou_threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of one-to-one mask matches at ``iou_threshold``.

    Matching is ``rtsmap.contract.match_one_to_one`` per image (greedy by IoU, highest first),
    as in the inventory evaluation.

    Parameters
    ----------
    gt
        COCO ground truth dict (``images``, ``annotations``).
    results
        COCO result entries with ``segmentation`` RLEs.
    iou_threshold
        Smallest IoU of a match.

    Returns
    -------
    dict
        ``precision, recall, f1, tp, fp, fn``.
    """
    by_image_gt: dict[int, list] = {}
    by_image_dt: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image_gt.setdefault(a["image_id"], []).append(_rle(a["segmentation"]))
    for r in results:
        by_image_dt.setdefault(r["image_id"], []).append(_rle(r["segmentation"]))
    tp = fp = fn = 0
    for image in gt["images"]:
        g = by_image_gt.get(image["id"], [])
        d = by_image_dt.get(image["id"], [])
        matched = 0
        if g and d:
            iou = np.asarray(mask_utils.iou(d, g, [0] * len(g)), dtype=float).reshape(len(d), len(g))
            di, gi = np.indices(iou.shape).reshape(2, -1)
            matched = len(match_one_to_one(di, gi, iou.ravel(), iou_threshold)[0])
        tp += matched
        fp += len(d) - matched
        fn += len(g) - matched
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def coco_metrics(gt: Mapping[str, Any], results: list[dict[str, Any]], score_threshold: float = 0.0) -> dict[str, float | int | None]:
    """COCO box and mask AP, AP50, AP75 (pycocotools COCOeval) and F1 at IoU 0.5.

    Parameters
    ----------
    gt
        COCO ground truth dict (``images``, ``annotations``, ``categories``).
    results
        COCO result entries (``image_id, category_id, bbox, score, segmentation``).
    score_threshold
        Operating point of F1: only results scoring at or above it count there (AP takes all).

    Returns
    -------
    dict
        :data:`METRIC_KEYS`; an AP is None where the split has no true instance.
    """
    coco_gt = COCO()
    coco_gt.dataset = {"images": list(gt["images"]), "annotations": list(gt["annotations"]),
                       "categories": list(gt["categories"])}
    _quiet(coco_gt.createIndex)
    metrics: dict[str, Any] = {}
    for iou_type in ("bbox", "segm"):
        if not gt["annotations"]:
            stats = [None] * 3
        elif not results:  # loadRes cannot take an empty list; no detection is AP 0
            stats = [0.0] * 3
        else:
            coco_dt = _quiet(coco_gt.loadRes, [dict(r) for r in results])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = [1, 10, 100]
            _quiet(ev.evaluate)
            _quiet(ev.accumulate)
            _quiet(ev.summarize)
            stats = [None if s < 0 else float(s) for s in ev.stats[:3]]
        for key, value in zip(("AP", "AP50", "AP75"), stats):
            metrics[f"{iou_type}_{key}"] = value
    metrics.update(f1_at(gt, at_operating_point(results, score_threshold), 0.5))
    return metrics


def _presence_row(modalities: Sequence[str], present: Sequence[str] | None, supported) -> np.ndarray | None:
    """The presence row of ``present`` (None: every modality), refused when the model lacks the subset."""
    if present is None:
        return None
    subset = canonical_subset(modalities, present)
    if subset not in {tuple(s) for s in supported}:
        raise ValueError(f"the model was not trained for modalities {list(subset)}; it supports "
                         f"{[list(s) for s in supported]}")
    return presence_vector(modalities, subset)


def _fill_absent(inputs: dict, row: np.ndarray | None, modalities: Sequence[str]) -> dict:
    """The documented fill of absent modalities: zeros (every pixel invalid after normalisation)."""
    if row is None:
        return inputs
    return {m: x if row[modalities.index(m)] else x * 0 for m, x in inputs.items()}


@torch.no_grad()
def predict_detector(model: torch.nn.Module, dataset: ChipDataset, *, batch_size: int = 4, device: str = "cpu",
                     present: Sequence[str] | None = None) -> list[dict]:
    """COCO results of a PyTorch detector on every chip of ``dataset``.

    ``present``: run as if only these modalities existed (the others fed as the zero fill with
    presence 0); None: all. Must be one of ``model.config.supported_subsets``.
    """
    modalities = list(model.config.modalities)
    row = _presence_row(modalities, present, model.config.supported_subsets)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    try:
        for inputs, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            inputs = _fill_absent(inputs, row, modalities)
            presence = None
            if row is not None:
                presence = torch.from_numpy(np.tile(row, (len(targets), 1))).to(device)
            out = model({m: x.to(device) for m, x in inputs.items()}, presence=presence)
            out = {k: v.cpu().numpy() for k, v in out.items()}
            results += results_from_outputs([int(t["image_id"]) for t in targets], out,
                                            dataset.tile_size, model.config.mask_threshold)
    finally:
        model.train(was_training)
    return results


def predict_onnx(path: str | os.PathLike, root: str | os.PathLike, split: str, *, batch_size: int = 4,
                 present: Sequence[str] | None = None) -> tuple[list[dict], ChipDataset, float]:
    """COCO results of an exported ONNX model (onnxruntime) on a split, fed as the pipeline feeds it.

    ``present``: run with only these modalities (one of the file's ``modality_subsets``; a
    format 1 file supports only the full set); None: all.

    Returns
    -------
    tuple
        The results, the dataset (its ``coco`` is the ground truth) and the operating score
        threshold from the file's metadata.

    Raises
    ------
    ValueError
        If the file has no rtsmap metadata or its tile size differs from the chips'.
    """
    import onnxruntime as ort

    from rtsmap.models.export import read_model_metadata

    meta = read_model_metadata(path)
    dataset = ChipDataset(root, split, meta["bands"], meta["normalization"])
    if int(meta["tile_size"]) != dataset.tile_size:
        raise ValueError(f"{path}: tile size {meta['tile_size']} but the chips in {root} are {dataset.tile_size} px")
    modalities = list(meta["modalities"])
    row = _presence_row(modalities, present, meta.get("modality_subsets", [modalities]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    has_presence = PRESENCE_INPUT in {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    results: list[dict] = []
    for inputs, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        inputs = _fill_absent(inputs, row, modalities)
        feed = {m: inputs[m].numpy() for m in modalities}
        if has_presence:
            full = np.ones(len(modalities), np.float32)
            feed[PRESENCE_INPUT] = np.tile(full if row is None else row, (len(targets), 1))
        out = dict(zip(names, session.run(None, feed)))
        results += results_from_outputs([int(t["image_id"]) for t in targets], out,
                                        dataset.tile_size, float(meta["mask_threshold"]))
    return results, dataset, float(meta["score_threshold"])


def evaluate_detector(model: torch.nn.Module, root: str | os.PathLike, split: str, *, device: str = "cpu",
                      present: Sequence[str] | None = None) -> dict:
    """:func:`coco_metrics` of a PyTorch detector on a split (``present``: as in :func:`predict_detector`).

    Raises
    ------
    ValueError
        If the split has no chips.
    """
    dataset = ChipDataset(root, split, model.config.modalities, model.config.normalization)
    if len(dataset) == 0:
        raise ValueError(f"{root}: the {split!r} split has no chips")
    results = predict_detector(model, dataset, device=device, present=present)
    metrics = coco_metrics(dataset.coco, results, model.config.score_threshold)
    return {"split": split, "chips": len(dataset), "instances": len(dataset.coco["annotations"]), **metrics}


def evaluate_model(model_path: str | os.PathLike, root: str | os.PathLike, split: str = "test", *, device: str = "cpu",
                   score_threshold: float | None = None, present: Sequence[str] | None = None) -> dict:
    """Evaluate a checkpoint (``.safetensors`` or stage folder) or an exported ``.onnx`` on a split.

    Parameters
    ----------
    model_path
        The model.
    root
        Chip folder.
    split
        ``train``, ``val``, ``test`` or ``all``.
    device
        Torch device for checkpoints.
    score_threshold
        Operating point of precision/recall/F1 (default: the model's own); AP does not depend on it.
    present
        Evaluate with only these modalities present (one of the model's supported subsets);
        None: all.

    Returns
    -------
    dict
        ``split, chips, instances, model, score_threshold`` and :data:`METRIC_KEYS`.

    Raises
    ------
    ValueError
        If the model or the chips cannot be read, or the split is empty.
    """
    path = Path(model_path)
    if path.suffix == ".onnx":
        results, dataset, own_threshold = predict_onnx(path, root, split, present=present)
        if len(dataset) == 0:
            raise ValueError(f"{root}: the {split!r} split has no chips")
        threshold = own_threshold if score_threshold is None else score_threshold
        metrics = coco_metrics(dataset.coco, results, threshold)
        return {"model": str(path), "split": split, "chips": len(dataset),
                "instances": len(dataset.coco["annotations"]), "score_threshold": threshold, **metrics}
    import dataclasses

    from rtsmap.models.train import load_detector

    model = load_detector(path, device)
    if score_threshold is not None:
        model.config = dataclasses.replace(model.config, score_threshold=score_threshold)
    return {"model": str(path), "score_threshold": model.config.score_threshold,
            **evaluate_detector(model, root, split, device=device, present=present)}
