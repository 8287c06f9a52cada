"""The multimodal Cascade Mask R-CNN: training losses, gradients, batched inference.

Every test runs the real model (MViTv2 demo backbone, fusion, FPN, RPN, cascade,
mask head) on tiny 128 px inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rtsmap.models.cascade import rois_from_batch
from rtsmap.models.config import FUSION_MODES, MODEL_VARIANTS, ModelConfig, build_config
from rtsmap.models.detector import RTSDetector

torch.set_num_threads(1)

TILE = 128


def _inputs(cfg: ModelConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, c, TILE, TILE, generator=gen) for m, c in cfg.in_channels.items()}


def _target(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), TILE, TILE, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, int(y1) : int(y2), int(x1) : int(x2)] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": masks,
    }


def _model(fusion: str = "residual_attention", seed: int = 0, **overrides) -> RTSDetector:
    torch.manual_seed(seed)
    if fusion == "none":  # the unimodal baseline: optical only
        overrides["modalities"] = {"optical": MODEL_VARIANTS["demo"].modalities["optical"]}
    return RTSDetector(build_config("demo", tile_size=TILE, fusion=fusion, **overrides))


# --- configuration ----------------------------------------------------------------------------


def test_config_round_trips_through_json():
    for cfg in MODEL_VARIANTS.values():
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    assert MODEL_VARIANTS["tiny"].tile_size == 512 and MODEL_VARIANTS["tiny"].fpn_channels == 256
    assert list(MODEL_VARIANTS["demo"].modalities) == ["optical", "sar", "dem"]


def test_config_knows_the_backbone_fusions_and_variants():
    from rtsmap.models.backbone import FUSIONS
    from rtsmap.models.mvit import MVIT_VARIANTS

    assert FUSIONS is FUSION_MODES  # one list: the backbone takes the configuration's
    assert all(cfg.backbone in MVIT_VARIANTS for cfg in MODEL_VARIANTS.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fusion", "late"),
        ("tile_size", 100),
        ("score_threshold", 1.5),
        ("cascade_bbox_reg_weights", ((10.0, 10.0, 5.0, 5.0),)),
        ("normalization", {"optical": {"mean": (0.0,), "std": (1.0,)}}),
        ("max_detections", 0),
        ("fusion", "none"),  # 'none' is unimodal: three modalities are refused
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        build_config("demo", **{field: value})


def test_config_rejects_unknown_keys_and_variants():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**MODEL_VARIANTS["demo"].to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="name"):
        build_config("huge")


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_training_losses_and_gradients(fusion):
    model = _model(fusion).train()
    targets = [_target([[20, 30, 60, 62], [80, 80, 100, 110]]), _target([[10, 10, 40, 50]])]
    losses = model(_inputs(model.config, 2), targets)

    stages = range(model.config.num_stages)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    expected |= {f"loss_{kind}_stage{k}" for kind in ("cls", "box") for k in stages}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    # Each stage sees positives: its box loss is defined (GT boxes are among stage 1's RoIs).
    assert all(losses[f"loss_cls_stage{k}"] > 0 for k in stages)

    sum(losses.values()).backward()
    parts = {
        "backbone": model.backbone,
        "rpn": model.rpn.head,
        "mask": model.roi_heads.mask_branch,
        **{f"stage{k}": model.roi_heads.stages[k] for k in stages},
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads, f"{name}: no gradient"
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"{name}: zero gradient"


def test_training_accepts_an_image_without_objects():
    model = _model().train()
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, TILE, TILE, dtype=torch.uint8),
    }
    losses = model(_inputs(model.config, 2), [_target([[20, 20, 50, 50]]), empty])
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_needs_targets():
    model = _model().train()
    with pytest.raises(ValueError, match="targets"):
        model(_inputs(model.config, 2))


def test_overfits_one_image():
    """A few AdamW steps on one image with one square slump: the total loss must drop a lot."""
    model = _model("residual_attention", seed=1, rpn_post_nms_top_n_train=200, roi_batch_size_per_image=64)
    model.train()
    inputs = _inputs(model.config, 1, seed=1)
    for m in inputs:
        inputs[m][:, :, 40:80, 48:88] += 3.0  # the slump stands out in every modality
    targets = [_target([[48, 40, 88, 80]])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    history = []
    for _ in range(25):
        loss = sum(model(inputs, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    print(f"overfit: loss {history[0]:.3f} -> {history[-1]:.3f}")
    assert all(math.isfinite(v) for v in history)
    assert min(history[-3:]) < 0.5 * history[0], history


# --- inference --------------------------------------------------------------------------------


def test_inference_shapes_and_padding():
    model = _model(candidate_score_threshold=0.0).eval()
    k = model.config.max_detections
    with torch.no_grad():
        out = model(_inputs(model.config, 2))
    assert out["boxes"].shape == (2, k, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (2, k) and out["masks"].shape == (2, k, 28, 28)
    assert out["num_detections"].shape == (2,) and out["num_detections"].dtype == torch.int64
    assert (out["num_detections"] > 0).all()
    assert (out["scores"][:, :-1] >= out["scores"][:, 1:]).all()
    assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()
    boxes = out["boxes"]
    n0 = int(out["num_detections"][0])
    assert (boxes[0, :n0, 2:] > boxes[0, :n0, :2]).all() and (boxes >= 0).all() and (boxes <= TILE).all()

    # A threshold at one of the scores keeps that detection (the contract's rule: at or above),
    # leaves fewer detections and pads the rest with zeros.
    scores = out["scores"][0, :n0]
    cut = float(scores[n0 // 2])
    model.config = dataclasses.replace(model.config, candidate_score_threshold=cut)
    with torch.no_grad():
        out = model(_inputs(model.config, 2))
    n = out["num_detections"]
    assert int(n[0]) == int((scores >= cut).sum()) and 0 < int(n[0]) < n0
    assert (out["scores"][0] == cut).any()
    for b in range(2):
        nb = int(n[b])
        assert (out["scores"][b, :nb] >= cut).all()
        assert (out["scores"][b, nb:] == 0).all()
        assert (out["boxes"][b, nb:] == 0).all() and (out["masks"][b, nb:] == 0).all()

    # Nothing above the threshold: every output is padding.
    model.config = dataclasses.replace(model.config, candidate_score_threshold=1.0)
    with torch.no_grad():
        out = model(_inputs(model.config, 2))
    assert (out["num_detections"] == 0).all() and (out["scores"] == 0).all() and (out["masks"] == 0).all()


def test_inference_rejects_wrong_inputs():
    model = _model().eval()
    inputs = _inputs(model.config, 1)
    with pytest.raises(ValueError, match="modalities"):
        model({"optical": inputs["optical"]})
    inputs["sar"] = inputs["sar"][:, :1]
    with pytest.raises(ValueError, match="sar"):
        model(inputs)


def test_scores_are_the_mean_of_the_stages():
    """Final scores = mean over stages of each stage's softmax on its own input boxes."""
    # NMS threshold 1 suppresses nothing, so the outputs are the top K of the mean scores.
    model = _model(candidate_score_threshold=0.0, nms_threshold=1.0, rpn_post_nms_top_n_test=30, max_detections=30)
    model.eval()
    inputs = _inputs(model.config, 1, seed=3)
    with torch.no_grad():
        out = model(inputs)
        features = model._features(inputs)
        boxes, valid = model.rpn.propose(features, inputs["optical"])
        heads = model.roi_heads
        per_stage = []
        rois = rois_from_batch(boxes)
        for stage in heads.stages:
            logits, deltas = stage(heads.box_pooler(features[:4], rois))
            per_stage.append(F.softmax(logits, -1)[:, 1])
            refined = stage.decode(deltas, rois[:, 1:], (TILE, TILE))
            rois = torch.cat([rois[:, :1], refined], 1)
    manual = (per_stage[0] + per_stage[1] + per_stage[2]) / 3
    manual = torch.where(valid[0], manual, torch.zeros_like(manual))
    # The three stages really disagree (else averaging would be untested).
    assert (per_stage[0] - per_stage[2]).abs().max() > 1e-4
    n = int(out["num_detections"][0])
    assert n == int((manual > 0).sum())
    expected = manual.sort(descending=True).values[:n]
    torch.testing.assert_close(out["scores"][0, :n], expected, rtol=1e-5, atol=1e-6)
    # The boxes are the last stage's, in score order.
    order = manual.argsort(descending=True)[:n]
    torch.testing.assert_close(out["boxes"][0, :n], rois[order, 1:], rtol=1e-5, atol=1e-4)


# --- missing modalities -------------------------------------------------------------------------


def test_detector_with_sar_and_dem_absent_gives_the_optical_path():
    """Residual fusion, gates open: with SAR and DEM absent the detections are exactly those of
    the same weights with the gates shut (the optical model's path), per image in a batch."""
    model = _model(candidate_score_threshold=0.0, fusion_gate="query").eval()
    with torch.no_grad():
        for fusion in model.backbone.fusions.values():
            fusion.gate.fill_(0.5)
            torch.nn.init.normal_(fusion.gate_from_query.weight, std=0.1)
    inputs = _inputs(model.config, 2, seed=4)
    presence = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    with torch.no_grad():
        absent = model(inputs, presence=presence)
        full = model(inputs)
        for fusion in model.backbone.fusions.values():
            fusion.gate.zero_()
            torch.nn.init.zeros_(fusion.gate_from_query.weight)
        shut = model(inputs)
    assert int(absent["num_detections"][0]) > 0
    for key in ("boxes", "scores", "masks", "num_detections"):
        assert torch.equal(absent[key][0], shut[key][0]), key
        assert torch.equal(absent[key][1], full[key][1]), key
    assert not torch.equal(full["scores"][0], shut["scores"][0])  # the open gates did matter


def test_presence_is_checked():
    model = _model().eval()
    inputs = _inputs(model.config, 2)
    with pytest.raises(ValueError, match=r"presence: expected \[B, 3\]"):
        model(inputs, presence=torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least one modality"):
        model(inputs, presence=torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_training_with_modalities_absent_reaches_every_branch():
    """One training step with per-sample presence: losses are finite, and a branch gets gradient
    only through the samples where its modality is present."""
    model = _model().train()
    inputs = _inputs(model.config, 2, seed=5)
    targets = [_target([[10, 10, 40, 50]]), _target([[60, 20, 100, 90]])]
    with torch.no_grad():
        for fusion in model.backbone.fusions.values():
            fusion.gate.fill_(0.5)
    presence = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    losses = model(inputs, targets, presence=presence)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    for branch in ("optical", "sar", "dem"):
        assert model.backbone.encoders[branch].patch_embed.weight.grad.abs().sum() > 0, branch
    # With SAR absent everywhere, the SAR branch gets no gradient at all.
    model.zero_grad(set_to_none=True)
    model(inputs, targets, presence=torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))["loss_mask"].backward()
    assert model.backbone.encoders["sar"].patch_embed.weight.grad is None or \
        model.backbone.encoders["sar"].patch_embed.weight.grad.abs().sum() == 0
