"""Cascade R-CNN box heads and the Mask R-CNN mask head.

Three stages refine boxes one after another, each trained at a stricter IoU
(0.5, 0.6, 0.7) with its own box coder weights (Cai & Vasconcelos, 2018). Each
stage's classifier scores the RoIs it was given (its own pooled features, as
detectron2 and mmdetection do); at inference the three stages' probabilities are
averaged and the boxes come from the last stage. Boxes are class-agnostic (one
foreground class).

RoI pooling is :func:`torchvision.ops.roi_align` with ``aligned=True`` on the FPN
level chosen by torchvision's :class:`~torchvision.ops.poolers.LevelMapper`.
torchvision's ``MultiScaleRoIAlign`` is not used because it has no ``aligned``
option and builds its RoI batch index with a Python loop over images, which an
ONNX trace would freeze to one batch size; :class:`LevelRoIAlign` takes
``[K, 5]`` RoIs (batch index first) instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import box_iou, clip_boxes_to_image, roi_align
from torchvision.ops.poolers import LevelMapper

from rtsmap.models.config import ModelConfig


def rois_from_list(boxes: list[Tensor]) -> Tensor:
    """``[K, 5]`` RoIs (image index, x1, y1, x2, y2) from per-image box lists (training)."""
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(index, 0), torch.cat(boxes, 0)], 1)


def rois_from_batch(boxes: Tensor) -> Tensor:
    """``[B*R, 5]`` RoIs from ``[B, R, 4]`` boxes, keeping the batch size dynamic (inference)."""
    b, r = boxes.shape[0], boxes.shape[1]
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).reshape(-1, 1, 1).expand(b, r, 1)
    return torch.cat([index, boxes], 2).reshape(-1, 5)


class LevelRoIAlign(nn.Module):
    """RoIAlign (aligned) on one FPN level per RoI, chosen by box size (FPN paper eq. 1).

    Parameters
    ----------
    strides
        Strides of the pooled levels, finest first, powers of two (e.g. 4, 8, 16, 32).
    output_size
        Side of the pooled square (7 for boxes, 14 for masks).
    sampling_ratio
        Samples per bin side.
    """

    def __init__(self, strides: tuple[int, ...], output_size: int, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.scales = [1.0 / s for s in strides]
        levels = [int(math.log2(s)) for s in strides]
        self.mapper = LevelMapper(levels[0], levels[-1])
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """Pool ``rois`` ``[K, 5]`` from ``features`` (one map per stride) into ``[K, C, S, S]``."""
        levels = self.mapper([rois[:, 1:]])
        result = rois.new_zeros((rois.shape[0], features[0].shape[1]) + self.output_size)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(
                feature, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True
            )
            # Out-of-place index_put: exports to ScatterND and keeps autograd simple.
            result = result.index_put((idx,), pooled)
        return result


class CascadePredictor(nn.Module):
    """Class scores (background + classes) and class-agnostic box deltas (4)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        # Small initial outputs (as detectron2): near-uniform scores, near-identity boxes.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[K, D]`` features -> logits ``[K, num_classes]``, deltas ``[K, 4]``."""
        return self.cls_score(x), self.bbox_pred(x)


class CascadeStage(nn.Module):
    """One cascade stage: RoI features -> two FC layers -> scores and deltas."""

    def __init__(
        self,
        box_head: nn.Module,
        predictor: CascadePredictor,
        iou_threshold: float,
        bbox_reg_weights: tuple[float, float, float, float],
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.predictor = predictor
        self.iou_threshold = iou_threshold
        self.box_coder = det_utils.BoxCoder(bbox_reg_weights)
        # One threshold: below it is background; no "ignore" band (as Fast R-CNN).
        self.matcher = det_utils.Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``[K, C, 7, 7]`` pooled features -> logits ``[K, 2]``, deltas ``[K, 4]``."""
        return self.predictor(self.box_head(pooled))

    def decode(self, deltas: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Apply ``deltas`` ``[K, 4]`` to ``boxes`` ``[K, 4]`` and clip to the image."""
        return clip_boxes_to_image(self.box_coder.decode_single(deltas, boxes), image_size)

    def match(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Match each image's proposals to its ground truth at this stage's IoU.

        Returns
        -------
        labels : list of Tensor
            ``[R_i]`` int64: 0 background, else the matched box's label.
        matched_idxs : list of Tensor
            ``[R_i]`` int64 index of the matched ground-truth box (0 where background).
        """
        labels, matched = [], []
        for props, target in zip(proposals, targets):
            gt = target["boxes"]
            if gt.numel() == 0:
                # No object in this image: every proposal is background.
                labels.append(torch.zeros(props.shape[0], dtype=torch.int64, device=props.device))
                matched.append(torch.zeros(props.shape[0], dtype=torch.int64, device=props.device))
                continue
            idx = self.matcher(box_iou(gt, props))
            clamped = idx.clamp(min=0)
            lab = target["labels"][clamped].to(torch.int64)
            lab[idx < 0] = 0
            labels.append(lab)
            matched.append(clamped)
        return labels, matched

    def loss(
        self,
        logits: Tensor,
        deltas: Tensor,
        proposals: list[Tensor],
        labels: list[Tensor],
        matched: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """Fast R-CNN losses: cross-entropy on all RoIs, smooth L1 on the positives.

        Written here rather than with torchvision's ``fastrcnn_loss`` because the box
        deltas are class-agnostic (``[K, 4]``, not ``[K, 4 * classes]``).
        """
        labels_all = torch.cat(labels)
        cls_loss = F.cross_entropy(logits, labels_all)
        gt_boxes = [
            t["boxes"][m] if t["boxes"].numel() else torch.zeros_like(p)
            for t, m, p in zip(targets, matched, proposals)
        ]
        reg_targets = self.box_coder.encode_single(torch.cat(gt_boxes), torch.cat(proposals))
        pos = torch.where(labels_all > 0)[0]
        box_loss = F.smooth_l1_loss(deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum")
        return cls_loss, box_loss / max(labels_all.numel(), 1)


class MaskBranch(nn.Module):
    """Mask R-CNN mask head on 14x14 RoI features -> 28x28 mask logits for the foreground class."""

    def __init__(self, pooler: LevelRoIAlign, head: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.head = head
        self.predictor = predictor

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """RoIs ``[K, 5]`` -> mask logits ``[K, num_classes, 28, 28]``."""
        return self.predictor(self.head(self.pooler(features, rois)))


class CascadeRoIHeads(nn.Module):
    """Cascade box stages and the mask branch, with training losses and batched inference.

    Parameters
    ----------
    box_pooler
        7x7 RoI pooling over the FPN levels.
    stages
        The cascade stages, first to last.
    mask_branch
        The mask head.
    fg_bg_sampler
        Samples the first stage's RoIs (later stages reuse them, refined, as in Cascade R-CNN).
    """

    def __init__(
        self,
        box_pooler: LevelRoIAlign,
        stages: list[CascadeStage],
        mask_branch: MaskBranch,
        fg_bg_sampler: det_utils.BalancedPositiveNegativeSampler,
    ) -> None:
        super().__init__()
        self.box_pooler = box_pooler
        self.stages = nn.ModuleList(stages)
        self.mask_branch = mask_branch
        self.fg_bg_sampler = fg_bg_sampler

    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Add the ground-truth boxes to the proposals and sample them for stage one."""
        proposals = [torch.cat([p, t["boxes"].to(p)]) for p, t in zip(proposals, targets)]
        labels, _ = self.stages[0].match(proposals, targets)
        pos, neg = self.fg_bg_sampler(labels)
        return [p[torch.where(ps | ns)[0]] for p, ps, ns in zip(proposals, pos, neg)]

    def losses(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Training losses of every stage and of the mask head.

        Parameters
        ----------
        features
            FPN maps P2..P5.
        proposals
            RPN proposals, one ``[R_i, 4]`` tensor per image.
        targets
            Per image ``boxes`` ``[N, 4]``, ``labels`` ``[N]``, ``masks`` ``[N, T, T]``.
        image_size
            ``(T, T)``.

        Returns
        -------
        dict of Tensor
            ``loss_cls_stage{k}``, ``loss_box_stage{k}`` for each stage and ``loss_mask``.
        """
        proposals = self._sample([p.detach() for p in proposals], targets)
        counts = [p.shape[0] for p in proposals]
        losses: dict[str, Tensor] = {}
        labels: list[Tensor] = []
        matched: list[Tensor] = []
        for k, stage in enumerate(self.stages):
            if k > 0:
                # The previous stage's refined boxes, detached: each stage learns on its own.
                proposals = list(stage_boxes.detach().split(counts))
            labels, matched = stage.match(proposals, targets)
            logits, deltas = stage(self.box_pooler(features, rois_from_list(proposals)))
            cls_loss, box_loss = stage.loss(logits, deltas, proposals, labels, matched, targets)
            losses[f"loss_cls_stage{k}"] = cls_loss
            losses[f"loss_box_stage{k}"] = box_loss
            stage_boxes = stage.decode(deltas, torch.cat(proposals), image_size)

        # Mask head on the last stage's positive RoIs (its input boxes, matched at its IoU).
        pos_boxes = [p[lab > 0] for p, lab in zip(proposals, labels)]
        pos_matched = [m[lab > 0] for m, lab in zip(matched, labels)]
        mask_logits = self.mask_branch(features, rois_from_list(pos_boxes))
        losses["loss_mask"] = maskrcnn_loss(
            mask_logits,
            pos_boxes,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            pos_matched,
        )
        return losses

    def detect(
        self, features: list[Tensor], proposals: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Run the cascade on ``[B, R, 4]`` proposals.

        Returns
        -------
        boxes : Tensor
            ``[B, R, 4]`` boxes of the last stage.
        scores : Tensor
            ``[B, R]`` foreground probability averaged over the stages.
        """
        shape = proposals.shape
        boxes = proposals.reshape(-1, 4)
        rois = rois_from_batch(proposals)
        probs = []
        for stage in self.stages:
            logits, deltas = stage(self.box_pooler(features, rois))
            probs.append(F.softmax(logits, -1)[:, 1])
            boxes = stage.decode(deltas, boxes, image_size)
            rois = torch.cat([rois[:, :1], boxes], 1)
        scores = torch.stack(probs).mean(0)
        return boxes.reshape(shape), scores.reshape(shape[:2])

    def masks(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """Mask probabilities ``[B, K, 28, 28]`` for the foreground class inside ``[B, K, 4]`` boxes."""
        logits = self.mask_branch(features, rois_from_batch(boxes))
        probs = torch.sigmoid(logits[:, 1])
        return probs.reshape(boxes.shape[0], boxes.shape[1], probs.shape[-2], probs.shape[-1])


def build_roi_heads(config: ModelConfig, strides: tuple[int, ...] = (4, 8, 16, 32)) -> CascadeRoIHeads:
    """Build the cascade and mask heads of ``config``.

    Parameters
    ----------
    config
        The model configuration.
    strides
        Strides of the FPN levels RoIs are pooled from (P2..P5).

    Returns
    -------
    CascadeRoIHeads
    """
    c = config.fpn_channels
    num_classes = 1 + len(config.classes)
    stages = [
        CascadeStage(
            TwoMLPHead(c * 7 * 7, config.box_head_dim),
            CascadePredictor(config.box_head_dim, num_classes),
            iou,
            weights,
        )
        for iou, weights in zip(config.cascade_iou_thresholds, config.cascade_bbox_reg_weights)
    ]
    mask_branch = MaskBranch(
        LevelRoIAlign(strides, 14, sampling_ratio=2),
        MaskRCNNHeads(c, list(config.mask_head_layers), dilation=1),
        MaskRCNNPredictor(config.mask_head_layers[-1], config.mask_dim_reduced, num_classes),
    )
    return CascadeRoIHeads(
        LevelRoIAlign(strides, 7, sampling_ratio=2),
        stages,
        mask_branch,
        det_utils.BalancedPositiveNegativeSampler(config.roi_batch_size_per_image, config.roi_positive_fraction),
    )
