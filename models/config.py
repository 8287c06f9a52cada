"""Configuration of the RTS detector (multimodal Cascade Mask R-CNN).

A :class:`ModelConfig` is plain, frozen data: everything needed to rebuild the
network (besides its weights) and everything the pipeline must know to feed it
(modalities, band order, normalization, tile size, resolution, thresholds).
It round-trips through JSON (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`) and is stored whole in the exported ONNX file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rtsmap.config_schema import Float, Int, Str, schema, validate
from rtsmap.contract import canonical_subset

#: Fusion modes understood by ``models.backbone.MultimodalBackbone``.
FUSION_MODES = ("none", "data_level", "conv", "attention", "residual_attention")

#: Gates of ``models.fusion.ResidualCrossModalityAttention``.
FUSION_GATES = ("channel", "query", "query_open", "query_fill")

DEFAULT_MODALITIES: dict[str, tuple[str, ...]] = {
    "optical": ("blue", "green", "red", "nir"),
    "sar": ("vv", "vh"),
    "dem": ("slope", "hillshade", "relative_elevation"),
}

# Defaults for summer tundra scenes: surface reflectance (0..1), gamma0 in dB,
# slope in degrees, hillshade 0..1, elevation relative to the local mean in metres.
# They only need to put each band near zero mean and unit spread; a trained
# model's own statistics replace them through the config.
DEFAULT_NORMALIZATION: dict[str, dict[str, tuple[float, ...]]] = {
    "optical": {"mean": (0.045, 0.070, 0.075, 0.250), "std": (0.030, 0.035, 0.045, 0.080)},
    "sar": {"mean": (-12.0, -19.0), "std": (4.0, 4.0)},
    "dem": {"mean": (5.0, 0.70, 0.0), "std": (6.0, 0.15, 3.0)},
}


@schema
@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the detector except its weights."""

    name: Str = "tiny"
    """Name of the variant (a key of :data:`MODEL_VARIANTS` or a user name)."""

    backbone: Str = "tiny"
    """MViTv2 variant name, a key of ``models.mvit.MVIT_VARIANTS``."""

    fusion: Str = "residual_attention"
    """Cross-modality fusion mode, one of :data:`FUSION_MODES`."""

    fusion_gate: Str = "channel"
    """Gate of the residual attention fusion: ``channel`` (one learned scale per channel) or
    ``query`` (also a linear function of each optical token, so it can open where optical sees
    nothing, e.g. under cloud). Both start at zero. The named variants use ``query``
    (docs/fusion-study.md); ``channel`` is what checkpoints without this field were trained with."""

    modalities: dict[Str, tuple[Str, ...]] = field(default_factory=lambda: dict(DEFAULT_MODALITIES))
    """Ordered mapping modality -> band names; the order is the model's input order."""

    tile_size: Int = 512
    """Tile side T in pixels; the model takes ``[B, C, T, T]`` per modality."""

    resolution: Float = 10.0
    """Ground sampling distance in metres per pixel."""

    fpn_channels: Int = 256
    """Channels of every FPN level (P2..P6)."""

    anchor_sizes: tuple[tuple[Int, ...], ...] = ((8,), (16,), (32,), (64,), (128,))
    """Anchor sizes in pixels, one tuple per FPN level P2..P6 (slumps are small at 10 m)."""

    aspect_ratios: tuple[Float, ...] = (0.5, 1.0, 2.0)
    """Anchor aspect ratios (height / width), the same on every level."""

    rpn_pre_nms_top_n_train: Int = 2000
    """Proposals kept per level and image before NMS, in training."""

    rpn_pre_nms_top_n_test: Int = 1000
    """Proposals kept per level and image before NMS, at inference."""

    rpn_post_nms_top_n_train: Int = 2000
    """Proposals kept per image after NMS, in training."""

    rpn_post_nms_top_n_test: Int = 1000
    """Proposals kept per image after NMS, at inference."""

    rpn_nms_threshold: Float = 0.7
    """IoU threshold of the RPN's NMS."""

    rpn_fg_iou_threshold: Float = 0.7
    """Anchors with IoU >= this to a ground-truth box are RPN positives."""

    rpn_bg_iou_threshold: Float = 0.3
    """Anchors with IoU < this to every ground-truth box are RPN negatives."""

    rpn_batch_size_per_image: Int = 256
    """Anchors sampled per image for the RPN losses."""

    rpn_positive_fraction: Float = 0.5
    """Largest fraction of positives among the sampled anchors."""

    cascade_iou_thresholds: tuple[Float, ...] = (0.5, 0.6, 0.7)
    """Foreground IoU of each cascade stage (one stage per value)."""

    cascade_bbox_reg_weights: tuple[tuple[Float, Float, Float, Float], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    """Box coder weights (wx, wy, ww, wh) of each cascade stage."""

    roi_batch_size_per_image: Int = 128
    """RoIs sampled per image for the first cascade stage in training."""

    roi_positive_fraction: Float = 0.25
    """Largest fraction of positives among the sampled RoIs."""

    box_head_dim: Int = 1024
    """Width of the two fully connected layers of each stage's box head."""

    mask_head_layers: tuple[Int, ...] = (256, 256, 256, 256)
    """Channels of the mask head's 3x3 convolutions."""

    mask_dim_reduced: Int = 256
    """Channels of the mask predictor's transposed convolution."""

    max_detections: Int = 50
    """K: detections per tile in the fixed-shape outputs (padded with zero scores)."""

    score_threshold: Float = 0.5
    """Operating point: the pipeline keeps detections (stage-averaged score) at or above this, and F1 is
    counted there. Stored in the exported file's metadata; a run may override it."""

    candidate_score_threshold: Float = 0.05
    """Detections below this score are dropped inside the model. Low (COCO evaluation's
    usual 0.05) so that AP sees the whole ranked list and a run can lower ``score_threshold``."""

    nms_threshold: Float = 0.5
    """IoU threshold of the final per-tile NMS."""

    mask_threshold: Float = 0.5
    """Mask probability at or above which a pixel belongs to the slump (``rtsmap.contract.keep``)."""

    normalization: dict[Str, dict[Str, tuple[Float, ...]]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_NORMALIZATION.items()}
    )
    """Per modality ``{"mean": (...), "std": (...)}``, one value per band, applied by the pipeline."""

    classes: tuple[Str, ...] = ("rts",)
    """Foreground class names (background is implicit)."""

    modality_subsets: tuple[tuple[Str, ...], ...] = ()
    """Subsets of ``modalities`` the model was trained to run on (modality dropout in fine-tuning),
    the full set first, each in model order (``rtsmap.contract.modality_subsets``); empty: only the
    full set. The exported file lists them; the pipeline refuses any other subset. Set by the
    training stage from ``TrainConfig.modality_dropout``."""

    def __post_init__(self) -> None:
        # Freeze the mappings' contents into tuples so equality and JSON are stable.
        object.__setattr__(self, "modalities", {str(k): tuple(v) for k, v in self.modalities.items()})
        try:
            norm = {
                str(m): {key: tuple(float(x) for x in stats[key]) for key in ("mean", "std")}
                for m, stats in self.normalization.items()
            }
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"ModelConfig.normalization: must map each modality to {{'mean': [...], 'std': [...]}} ({exc!r})"
            ) from exc
        object.__setattr__(self, "normalization", norm)
        object.__setattr__(self, "anchor_sizes", tuple(tuple(int(s) for s in a) for a in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        object.__setattr__(self, "cascade_iou_thresholds", tuple(float(a) for a in self.cascade_iou_thresholds))
        object.__setattr__(
            self, "cascade_bbox_reg_weights", tuple(tuple(float(w) for w in ws) for ws in self.cascade_bbox_reg_weights)
        )
        object.__setattr__(self, "mask_head_layers", tuple(int(c) for c in self.mask_head_layers))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "modality_subsets", tuple(tuple(str(m) for m in s) for s in self.modality_subsets))
        self.validate()

    @property
    def num_stages(self) -> int:
        """Number of cascade stages."""
        return len(self.cascade_iou_thresholds)

    @property
    def supported_subsets(self) -> tuple[tuple[str, ...], ...]:
        """The modality subsets the model runs on: :attr:`modality_subsets`, or the full set alone."""
        return self.modality_subsets or (tuple(self.modalities),)

    @property
    def in_channels(self) -> dict[str, int]:
        """Input channels per modality, in input order."""
        return {m: len(b) for m, b in self.modalities.items()}

    def validate(self) -> None:
        """Check every field.

        Raises
        ------
        ValueError
            Naming the first invalid field and why.
        """

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        if not self.name:
            raise bad("name", "must be a non-empty string")
        if self.fusion not in FUSION_MODES:
            raise bad("fusion", f"must be one of {FUSION_MODES}")
        if self.fusion_gate not in FUSION_GATES:
            raise bad("fusion_gate", f"must be one of {FUSION_GATES}")
        if not self.modalities or any(len(b) == 0 for b in self.modalities.values()):
            raise bad("modalities", "needs at least one modality, each with at least one band")
        if self.fusion == "none" and len(self.modalities) != 1:
            raise bad("fusion", "'none' is the unimodal model and takes exactly one modality")
        if set(self.normalization) != set(self.modalities):
            raise bad("normalization", f"must have exactly the modalities {list(self.modalities)}")
        for m, bands in self.modalities.items():
            stats = self.normalization[m]
            if len(stats["mean"]) != len(bands) or len(stats["std"]) != len(bands):
                raise bad("normalization", f"{m!r} needs one mean and one std per band ({len(bands)})")
            if any(not math.isfinite(s) or s <= 0 for s in stats["std"]):
                raise bad("normalization", f"{m!r} std values must be finite and > 0")
        if self.tile_size < 64 or self.tile_size % 64:
            raise bad("tile_size", "must be a positive multiple of 64 (the coarsest FPN stride)")
        if not self.resolution > 0:
            raise bad("resolution", "must be > 0")
        if self.fpn_channels <= 0:
            raise bad("fpn_channels", "must be > 0")
        if len(self.anchor_sizes) != 5 or any(len(a) == 0 or min(a) <= 0 for a in self.anchor_sizes):
            raise bad("anchor_sizes", "needs one non-empty tuple of positive sizes per level P2..P6")
        if len({len(a) for a in self.anchor_sizes}) != 1:
            raise bad("anchor_sizes", "every level needs the same number of sizes (one RPN head)")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise bad("aspect_ratios", "must be positive")
        for name in (
            "rpn_pre_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "roi_batch_size_per_image",
            "box_head_dim",
            "mask_dim_reduced",
            "max_detections",
        ):
            if int(getattr(self, name)) <= 0:
                raise bad(name, "must be a positive integer")
        for name in (
            "rpn_nms_threshold",
            "rpn_fg_iou_threshold",
            "rpn_bg_iou_threshold",
            "rpn_positive_fraction",
            "roi_positive_fraction",
            "score_threshold",
            "candidate_score_threshold",
            "nms_threshold",
            "mask_threshold",
        ):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, "must be within [0, 1]")
        if self.rpn_bg_iou_threshold > self.rpn_fg_iou_threshold:
            raise bad("rpn_bg_iou_threshold", "must not exceed rpn_fg_iou_threshold")
        if not self.cascade_iou_thresholds or any(not 0 < t < 1 for t in self.cascade_iou_thresholds):
            raise bad("cascade_iou_thresholds", "needs at least one IoU in (0, 1)")
        if len(self.cascade_bbox_reg_weights) != self.num_stages or any(
            len(w) != 4 or min(w) <= 0 for w in self.cascade_bbox_reg_weights
        ):
            raise bad("cascade_bbox_reg_weights", "needs four positive weights per cascade stage")
        if not self.mask_head_layers or min(self.mask_head_layers) <= 0:
            raise bad("mask_head_layers", "needs at least one positive channel count")
        if list(self.classes) != ["rts"]:
            raise bad("classes", "only the single class ('rts',) is supported")
        if self.modality_subsets:
            full = tuple(self.modalities)
            if self.modality_subsets[0] != full:
                raise bad("modality_subsets", f"must start with the full set {list(full)}")
            for subset in self.modality_subsets:
                try:
                    canonical = canonical_subset(full, subset)
                except ValueError as exc:
                    raise bad("modality_subsets", str(exc)) from None
                if not subset or canonical != subset:
                    raise bad("modality_subsets", f"each subset must be non-empty and in model order {list(full)}")
            if len(set(self.modality_subsets)) != len(self.modality_subsets):
                raise bad("modality_subsets", "lists a subset twice")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (tuples become lists) that :meth:`from_dict` reads back."""

        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output (e.g. parsed from JSON).

        Read by the strict reader of :mod:`rtsmap.config_schema`: every key must be a field and
        every value of the field's type (lists fill tuples; ``true`` is not an integer).

        Raises
        ------
        rtsmap.errors.ConfigError
            A ``ValueError``: a key is unknown or a field is invalid (the message names it).
        """
        return validate(cls, data, None, root="ModelConfig")


MODEL_VARIANTS: dict[str, ModelConfig] = {
    # MViTv2-T at 512 px: the production model.
    "tiny": ModelConfig(name="tiny", backbone="tiny", tile_size=512, fpn_channels=256, fusion_gate="query"),
    # The demo backbone at 256 px with slim heads: trains and runs on a laptop CPU.
    "demo": ModelConfig(
        name="demo",
        backbone="demo",
        tile_size=256,
        fpn_channels=64,
        fusion_gate="query",
        rpn_pre_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_train=500,
        rpn_post_nms_top_n_test=200,
        roi_batch_size_per_image=128,
        box_head_dim=256,
        mask_head_layers=(64, 64),
        mask_dim_reduced=64,
    ),
}


def build_config(name: str, **overrides: Any) -> ModelConfig:
    """Return the variant ``name`` with some fields replaced.

    Parameters
    ----------
    name
        A key of :data:`MODEL_VARIANTS`.
    **overrides
        Field values to replace (validated like any config). When ``modalities`` is
        given without ``normalization``, the default statistics of those modalities
        are used (e.g. ``modalities={"optical": (...)}, fusion="none"`` for a
        unimodal model).

    Returns
    -------
    ModelConfig

    Raises
    ------
    ValueError
        If ``name`` is unknown or an override is invalid.
    """
    if name not in MODEL_VARIANTS:
        raise ValueError(f"ModelConfig.name: unknown variant {name!r}; choose one of {sorted(MODEL_VARIANTS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"ModelConfig.{key}: unknown field")
    if "modalities" in overrides and "normalization" not in overrides:
        missing = sorted(set(overrides["modalities"]) - set(DEFAULT_NORMALIZATION))
        if missing:
            raise ValueError(f"ModelConfig.normalization: no default statistics for {missing[0]!r}; pass them")
        overrides["normalization"] = {m: DEFAULT_NORMALIZATION[m] for m in overrides["modalities"]}
    return dataclasses.replace(MODEL_VARIANTS[name], **overrides)
