"""The RTS detector: a multimodal Cascade Mask R-CNN.

backbone (MViTv2 per modality + fusion + FPN, P2..P6) -> RPN -> three cascade
box stages -> mask head. Training returns a dict of losses like torchvision's
detection models. Inference returns FIXED-SHAPE, padded tensors (the ONNX model
file's outputs, see docs/contracts.md), computed without Python loops over the
images of a batch so that an exported model keeps a dynamic batch size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from rtsmap import contract
from rtsmap.contract import MASK_SIZE
from rtsmap.models.cascade import CascadeRoIHeads, build_roi_heads
from rtsmap.models.config import ModelConfig
from rtsmap.models.rpn import BatchedRPN, build_rpn

#: FPN levels the backbone returns; RoIs are pooled from all but the last (P6).
FEATURE_NAMES = ("p2", "p3", "p4", "p5", "p6")

__all__ = ["FEATURE_NAMES", "MASK_SIZE", "RTSDetector", "build_backbone"]  # MASK_SIZE: the contract's


def build_backbone(config: ModelConfig) -> nn.Module:
    """The multimodal MViTv2 + fusion + FPN backbone of ``config``.

    Parameters
    ----------
    config
        The model configuration.

    Returns
    -------
    nn.Module
        ``models.backbone.MultimodalBackbone``.
    """
    # Imported here so the heads can be built and tested with another backbone.
    from rtsmap.models.backbone import MultimodalBackbone
    from rtsmap.models.mvit import MVIT_VARIANTS

    if config.backbone not in MVIT_VARIANTS:
        raise ValueError(f"ModelConfig.backbone: unknown MViT variant {config.backbone!r}")
    return MultimodalBackbone(
        modalities=config.in_channels,
        mvit=MVIT_VARIANTS[config.backbone],
        img_size=config.tile_size,
        fusion=config.fusion,
        fpn_channels=config.fpn_channels,
        fusion_gate=config.fusion_gate,
    )


class RTSDetector(nn.Module):
    """Multimodal Cascade Mask R-CNN for retrogressive thaw slumps.

    Parameters
    ----------
    config
        The model configuration.
    backbone
        Module mapping ``{modality: [B, C, T, T]}`` to an ordered dict ``p2..p6`` of
        ``[B, fpn_channels, T/s, T/s]`` (s = 4..64), with attribute ``out_channels``.
        Default: :func:`build_backbone` of ``config``.
    rpn
        Default: :func:`models.rpn.build_rpn` of ``config``.
    roi_heads
        Default: :func:`models.cascade.build_roi_heads` of ``config``.
    """

    def __init__(
        self,
        config: ModelConfig,
        backbone: nn.Module | None = None,
        rpn: BatchedRPN | None = None,
        roi_heads: CascadeRoIHeads | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config)
        if getattr(self.backbone, "out_channels", config.fpn_channels) != config.fpn_channels:
            raise ValueError(
                f"ModelConfig.fpn_channels: {config.fpn_channels} but the backbone gives "
                f"{self.backbone.out_channels} channels"
            )
        self.rpn = rpn if rpn is not None else build_rpn(config)
        self.roi_heads = roi_heads if roi_heads is not None else build_roi_heads(config)

    def _check_inputs(self, inputs: dict[str, Tensor], presence: Tensor | None = None) -> Tensor:
        """Validate the modality tensors (and presence); return one of them (for size, dtype, device)."""
        if set(inputs) != set(self.config.modalities):
            raise ValueError(f"inputs: expected modalities {list(self.config.modalities)}, got {list(inputs)}")
        t = self.config.tile_size
        for m, c in self.config.in_channels.items():
            x = inputs[m]
            if x.dim() != 4 or tuple(x.shape[1:]) != (c, t, t):
                raise ValueError(f"inputs[{m!r}]: expected [B, {c}, {t}, {t}], got {list(x.shape)}")
        image = inputs[next(iter(self.config.modalities))]
        if presence is not None and not torch.jit.is_tracing():
            m = len(self.config.modalities)
            if tuple(presence.shape) != (image.shape[0], m):
                raise ValueError(f"presence: expected [B, {m}] = {[image.shape[0], m]}, got {list(presence.shape)}")
            if bool((presence.sum(dim=1) <= 0).any()):
                raise ValueError("presence: every image needs at least one modality present")
        return image

    def _features(self, inputs: dict[str, Tensor], presence: Tensor | None = None) -> list[Tensor]:
        ordered = OrderedDict((m, inputs[m]) for m in self.config.modalities)
        # A backbone given from outside (tests) may not know presence: only pass it when set.
        feats = self.backbone(ordered) if presence is None else self.backbone(ordered, presence)
        return [feats[name] for name in FEATURE_NAMES]

    def forward(
        self,
        inputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        presence: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses (training) or padded detections (inference).

        Parameters
        ----------
        inputs
            ``{modality: [B, C_m, T, T]}`` float32, normalized.
        targets
            Training only, one dict per image: ``boxes`` ``[N, 4]`` float xyxy pixels,
            ``labels`` ``[N]`` int64 (1 = rts), ``masks`` ``[N, T, T]`` uint8.
        presence
            ``[B, M]`` float in ``config.modalities`` order, 1 where the modality is present,
            0 where it is absent (its input is the fill, zeros; the model file's ``presence``
            input); None: every modality present. See ``models/fusion.py`` for what the fusion
            does with it.

        Returns
        -------
        dict of Tensor
            Training: ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_cls_stage{k}``,
            ``loss_box_stage{k}``, ``loss_mask``. Inference: ``boxes`` ``[B, K, 4]``,
            ``scores`` ``[B, K]`` (descending, 0 for padding), ``masks`` ``[B, K, 28, 28]``
            (probabilities), ``num_detections`` ``[B]`` int64.

        Raises
        ------
        ValueError
            If the inputs do not match the configuration or targets are missing in training.
        """
        image = self._check_inputs(inputs, presence)
        size = (self.config.tile_size, self.config.tile_size)
        features = self._features(inputs, presence)
        if self.training:
            if targets is None or len(targets) != image.shape[0]:
                raise ValueError("targets: training needs one target dict per image")
            images = ImageList(image, [size] * image.shape[0])
            named = OrderedDict(zip(FEATURE_NAMES, features))
            proposals, losses = self.rpn(images, named, targets)
            losses.update(self.roi_heads.losses(features[:4], proposals, targets, size))
            return losses
        return self.detect(features, image)

    def detect(self, features: list[Tensor], image: Tensor) -> dict[str, Tensor]:
        """Batched inference from FPN features (see :meth:`forward`)."""
        cfg = self.config
        size = (cfg.tile_size, cfg.tile_size)
        proposals, valid = self.rpn.propose(features, image)
        boxes, scores = self.roi_heads.detect(features[:4], proposals, size)

        # Score threshold, small boxes and RPN padding are masked, not removed, so
        # shapes stay fixed; masked entries (score 0) can never suppress a real one.
        # The candidate cut is the contract's rule (at or above), as the pipeline's cut.
        wh = boxes[..., 2:] - boxes[..., :2]
        candidate = valid & (wh >= 1e-2).all(-1) & contract.keep(scores, cfg.candidate_score_threshold)
        scores = torch.where(candidate, scores, torch.zeros_like(scores))
        image_idx = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(scores)
        keep = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), image_idx.reshape(-1), cfg.nms_threshold)
        # Kept indices -> mask (index_put exports to ScatterND; index_fill does not trace).
        kept = torch.zeros_like(scores.reshape(-1), dtype=torch.bool)
        kept = kept.index_put((keep,), torch.ones_like(keep, dtype=torch.bool))
        scores = torch.where(kept.reshape(scores.shape) & candidate, scores, torch.zeros_like(scores))

        k = min(cfg.max_detections, scores.shape[1])
        scores, order = scores.topk(k, dim=1)
        boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
        if k < cfg.max_detections:
            pad = cfg.max_detections - k
            scores = nn.functional.pad(scores, (0, pad))
            boxes = nn.functional.pad(boxes, (0, 0, 0, pad))
        real = scores > 0
        boxes = boxes * real.unsqueeze(-1).to(boxes.dtype)
        masks = self.roi_heads.masks(features[:4], boxes) * real[..., None, None].to(boxes.dtype)
        return {
            "boxes": boxes,
            "scores": scores,
            "masks": masks,
            "num_detections": real.sum(1).to(torch.int64),
        }
