"""The model contract (rtsmap/contract.py): one rule per thing, shared by models/ and pipeline/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtsmap import contract
from rtsmap.contract import MASK_SIZE, keep, match_one_to_one, normalize, paste_mask

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "workflows" / "assets" / "demo_model.onnx"


def test_contract_is_numpy_only():
    tree = ast.parse((REPO / "rtsmap" / "contract.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"numpy", "__future__", "collections", "itertools", "typing"}, imported
    code = "import sys, rtsmap.contract; bad = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_both_sides_use_the_contract_not_copies():
    """The pipeline's names are the contract's objects, and the copies are gone from the sources."""
    from rtsmap.pipeline import evaluation, infer, model_file

    assert model_file.MODEL_FORMAT is contract.MODEL_FORMAT and model_file.METADATA_KEY is contract.METADATA_KEY
    assert model_file.OUTPUT_NAMES is contract.OUTPUT_NAMES and infer.paste_mask is contract.paste_mask
    assert evaluation.match_one_to_one is contract.match_one_to_one
    for path in ("pipeline/model_file.py", "pipeline/infer.py", "models/export.py", "models/detector.py",
                 "models/evaluate.py", "models/data.py", "pipeline/evaluation.py"):
        text = (REPO / path).read_text()
        assert '"rtsmap-model/1"' not in text and "def paste_mask" not in text, path
        assert "paste_masks_in_image" not in text.replace("``paste_masks_in_image``", ""), path
    # The one fusion-mode list lives in the configuration.
    backbone = (REPO / "models/backbone.py").read_text()
    assert "from rtsmap.models.config import FUSION_MODES" in backbone and '"data_level", "conv"' not in backbone


# --- threshold rule -------------------------------------------------------------------------------


def test_keep_is_at_or_above_everywhere():
    scores = np.array([0.2, 0.5, 0.5000001, 0.4999999, 1.0], np.float32)
    assert keep(scores, 0.5).tolist() == [False, True, True, False, True]
    assert bool(keep(0.5, 0.5)) and not bool(keep(0.49, 0.5))
    assert keep([0.0, 0.3], 0.0).tolist() == [True, True]  # threshold 0 keeps everything
    assert keep(scores, 1.0).tolist() == [False, False, False, False, True]


def test_keep_stays_in_the_array_type_it_is_given():
    torch = pytest.importorskip("torch")
    out = keep(torch.tensor([0.05, 0.04, 0.06]), 0.05)
    assert isinstance(out, torch.Tensor) and out.tolist() == [True, False, True]


def test_pipeline_keeps_a_detection_scoring_exactly_the_threshold(tmp_path):
    """infer_chunk (the inventory's operating point) keeps a detection scoring the threshold."""
    from onnx_models import BANDS, ConstantDetection, make_constant_detector, model_metadata
    from rtsmap.pipeline.grid import GridSpec, chunk_by_id
    from rtsmap.pipeline.infer import infer_chunk, load_model
    from rtsmap.pipeline.load import ChunkStack

    spec = GridSpec(tile_px=64, overlap_px=16, tiles_per_chunk=2)
    chunk = chunk_by_id(spec.chunk_id(0, 0), spec)
    meta = model_metadata(tile_size=64, max_detections=2, score_threshold=0.5)
    det = load_model(make_constant_detector(tmp_path / "m.onnx", [ConstantDetection((8, 8, 24, 24), 0.5)], meta))
    h, w = chunk.shape
    stack = ChunkStack(
        chunk_id=chunk.id, year=2021, transform=chunk.transform, crs=spec.crs, shape=(h, w),
        data={m: np.ones((len(b), h, w), np.float32) for m, b in BANDS.items()},
        valid={m: np.ones((h, w), bool) for m in BANDS}, item_ids={m: [] for m in BANDS},
        band_names={m: tuple(b) for m, b in BANDS.items()},
    )
    kept = infer_chunk(det, stack, chunk.tiles[:1])
    assert len(kept[0]) == 1 and kept[0].scores[0] == pytest.approx(0.5)
    assert len(infer_chunk(det, stack, chunk.tiles[:1], score_threshold=0.5001)[0]) == 0


def test_evaluation_counts_a_result_scoring_exactly_the_threshold():
    """The COCO-style F1 counts the same boundary detection the pipeline keeps."""
    pytest.importorskip("torch")
    from rtsmap.models.evaluate import at_operating_point

    results = [{"score": 0.5}, {"score": 0.4999}, {"score": 0.9}]
    assert at_operating_point(results, 0.5) == [results[0], results[2]]


def test_evaluation_pastes_masks_as_the_pipeline_does():
    """rtsmap evaluate's masks are the pipeline's: same paste, same >= mask threshold."""
    pytest.importorskip("torch")
    from pycocotools import mask as mask_utils

    from rtsmap.models.evaluate import results_from_outputs

    t = 64
    half = np.full((MASK_SIZE, MASK_SIZE), 0.5, np.float32)  # exactly the mask threshold
    half[:, MASK_SIZE // 2 :] = 0.2
    outputs = {"boxes": np.array([[[10.4, 20.0, 30.4, 44.0]]], np.float32), "scores": np.array([[0.8]], np.float32),
               "masks": half[None, None], "num_detections": np.array([1])}
    (result,) = results_from_outputs([7], outputs, t, mask_threshold=0.5)
    got = mask_utils.decode({"size": result["segmentation"]["size"], "counts": result["segmentation"]["counts"].encode()})
    prob, (r, c) = paste_mask(half, outputs["boxes"][0, 0], t, t)
    want = np.zeros((t, t), bool)
    want[r : r + prob.shape[0], c : c + prob.shape[1]] = keep(prob, 0.5)
    np.testing.assert_array_equal(got.astype(bool), want)
    assert want.sum() > 0 and result["image_id"] == 7 and result["bbox"] == pytest.approx([10.4, 20.0, 20.0, 24.0])


# --- normalisation --------------------------------------------------------------------------------


def test_normalize_formula_invalid_pixels_and_out():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 5, 6)).astype(np.float32)
    valid = rng.random((5, 6)) > 0.3
    mean, std = [3.0, -1.0], [2.0, 0.5]
    got = normalize(x, valid, mean, std)
    expected = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:, valid], expected[:, valid])  # bit-identical float32 arithmetic
    assert (got[:, ~valid] == 0).all()
    out = np.full((2, 5, 6), 7.0, np.float32)
    assert normalize(x, None, mean, std, out=out) is out
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="C = 3"):
        normalize(x, valid, [0, 0, 0], [1, 1, 1])


def test_pipeline_batches_are_normalised_by_the_contract():
    """pipeline.infer's batches equal contract.normalize of each tile window (bench_run uses it too)."""
    from rtsmap.pipeline.infer import _normalized_batch
    from rtsmap.pipeline.model_file import BandNormalization

    class Info:  # only what _normalized_batch reads
        modalities = ("sar",)
        bands = {"sar": ("vv", "vh")}
        normalization = {"sar": BandNormalization(mean=(-13.0, -20.0), std=(1.9, 1.8))}
        tile_size = 4

    class Stack:
        data = {"sar": np.random.default_rng(1).normal(-15, 2, (2, 8, 8)).astype(np.float32)}
        valid = {"sar": np.random.default_rng(2).random((8, 8)) > 0.2}

    windows = [(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(2, 6))]
    batch = _normalized_batch(Info, Stack, windows)["sar"]
    for b, (rows, cols) in enumerate(windows):
        want = normalize(Stack.data["sar"][:, rows, cols], Stack.valid["sar"][rows, cols], (-13.0, -20.0), (1.9, 1.8))
        np.testing.assert_array_equal(batch[b], want)


# --- mask pasting ---------------------------------------------------------------------------------


def _dilate(a: np.ndarray) -> np.ndarray:
    """One-pixel (8-neighbour) dilation of a boolean image."""
    p = np.pad(a, 1)
    out = np.zeros_like(a)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            out |= p[dr : dr + a.shape[0], dc : dc + a.shape[1]]
    return out


def test_paste_mask_agrees_with_torchvision():
    """Ours and torchvision's paste_masks_in_image give the same slump to within one pixel.

    torchvision rounds the box to whole pixels and grows it by a cell of zeros, ours samples the
    exact box, so edges may move by one pixel; nothing else may differ.
    """
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(0)
    t = 128
    yy, xx = np.mgrid[0:MASK_SIZE, 0:MASK_SIZE] + 0.5
    ious = []
    for _ in range(100):
        cx, cy = rng.uniform(10, 18, 2)
        sx, sy = rng.uniform(5, 9, 2)
        mask = np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2)).astype(np.float32)  # a blob
        w, h = rng.uniform(12, 100, 2)
        x1, y1 = rng.uniform(-5, t - w + 5), rng.uniform(-5, t - h + 5)  # some reach past the tile
        box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
        theirs = paste_masks_in_image(torch.from_numpy(mask)[None, None], torch.from_numpy(box)[None], (t, t))[0, 0]
        prob, (r, c) = paste_mask(mask, box, t, t)
        ours = np.zeros((t, t), np.float32)
        ours[r : r + prob.shape[0], c : c + prob.shape[1]] = prob
        a, b = keep(ours, 0.5), keep(theirs.numpy(), 0.5)
        assert not (a & ~_dilate(b)).any() and not (b & ~_dilate(a)).any()
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    assert np.median(ious) > 0.93 and min(ious) > 0.7


def test_full_mask_fills_its_box_exactly():
    ones = np.ones((MASK_SIZE, MASK_SIZE), np.float32)
    prob, offset = paste_mask(ones, (10.0, 20.0, 17.0, 25.0), 64, 64)
    assert offset == (20, 10) and prob.shape == (5, 7) and np.allclose(prob, 1.0)
    prob, offset = paste_mask(ones, (-3.0, 60.0, 5.0, 70.0), 64, 64)  # clipped to the image
    assert offset == (60, 0) and prob.shape == (4, 5)


# --- one-to-one matching --------------------------------------------------------------------------


def test_match_takes_highest_iou_first_and_each_object_once():
    # pred 0 overlaps true 0 (0.6) and true 1 (0.9); pred 1 overlaps true 1 (0.8) only.
    pred, true, iou = [0, 0, 1], [0, 1, 1], [0.6, 0.9, 0.8]
    p, t, v = match_one_to_one(pred, true, iou, 0.5)
    assert list(zip(p.tolist(), t.tolist())) == [(0, 1)] and v.tolist() == [0.9]
    # Greedy, not optimal: documented (pred 0 -> true 0 and pred 1 -> true 1 would match two).
    assert len(match_one_to_one(pred, true, iou, 0.7)[0]) == 1


def test_match_threshold_boundary_and_order_independence():
    assert len(match_one_to_one([0], [0], [0.5], 0.5)[0]) == 1  # at the threshold: a match
    assert len(match_one_to_one([0], [0], [0.4999], 0.5)[0]) == 0
    rng = np.random.default_rng(4)
    pred, true = rng.integers(0, 12, 60), rng.integers(0, 9, 60)
    iou = np.round(rng.random(60), 1)  # many ties
    ref = match_one_to_one(pred, true, iou, 0.3)
    assert len(set(ref[0].tolist())) == len(ref[0]) and len(set(ref[1].tolist())) == len(ref[1])
    for _ in range(5):
        perm = rng.permutation(60)
        got = match_one_to_one(pred[perm], true[perm], iou[perm], 0.3)
        assert sorted(zip(got[0].tolist(), got[1].tolist())) == sorted(zip(ref[0].tolist(), ref[1].tolist()))
    with pytest.raises(ValueError):
        match_one_to_one([0, 1], [0], [0.5], 0.5)


def test_format_1_model_metadata_is_still_accepted(v1_model):
    """The first demo model (exported before the contract module) reads as format 1: no presence
    input, so it runs only with every modality."""
    pytest.importorskip("onnxruntime")
    from rtsmap.pipeline.model_file import read_model_info

    info = read_model_info(v1_model)
    assert info.metadata["format"] == contract.MODEL_FORMAT_V1 == info.format
    assert contract.MODEL_FORMAT_V1 in contract.READABLE_MODEL_FORMATS
    assert info.output_names == contract.OUTPUT_NAMES
    assert info.input_names == contract.input_names(info.modalities)
    assert not info.has_presence_input
    assert info.modality_subsets == (info.modalities,)
    assert info.supports(reversed(info.modalities)) and not info.supports(info.modalities[:1])


# --- missing modalities -----------------------------------------------------------------------------


def test_presence_names_and_vector_follow_the_model_order():
    mods = ("optical", "sar", "dem")
    assert contract.input_names(mods, presence=True) == (*mods, contract.PRESENCE_INPUT)
    assert contract.canonical_subset(mods, ["dem", "optical"]) == ("optical", "dem")
    np.testing.assert_array_equal(contract.presence_vector(mods, ["dem", "optical"]), [1.0, 0.0, 1.0])
    assert contract.presence_vector(mods, ["sar"]).dtype == np.float32
    with pytest.raises(ValueError, match="lidar"):
        contract.presence_vector(mods, ["lidar"])
    with pytest.raises(ValueError, match="twice"):
        contract.canonical_subset(mods, ["sar", "sar"])


def test_modality_subsets_from_dropout_rates():
    mods = ("optical", "sar", "dem")
    assert contract.modality_subsets(mods, {}) == (mods,)
    assert contract.modality_subsets(mods, {"sar": 0.3}) == (mods, ("optical", "dem"))
    both = contract.modality_subsets(mods, {"sar": 0.3, "dem": 0.1, "optical": 0.0})
    assert both == (mods, ("optical", "sar"), ("optical", "dem"), ("optical",))
    every = contract.modality_subsets(mods, {"optical": 0.15, "sar": 0.3, "dem": 0.1})
    assert every[0] == mods and len(every) == 7 and () not in every
    assert len(set(every)) == 7 and all(contract.canonical_subset(mods, s) == s for s in every)
