"""Region proposal network with a batch-vectorized inference path.

Training uses torchvision's :class:`~torchvision.models.detection.rpn.RegionProposalNetwork`
unchanged (anchor matching, sampling, losses). Its inference path loops over the
images of a batch, which an ONNX trace freezes to the example's batch size, so
:meth:`BatchedRPN.propose` does the same filtering on ``[B, N]`` tensors instead:
per-level top-k, decode, clip, one ``batched_nms`` over the flattened batch, then a
fixed number of proposals per image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import batched_nms, clip_boxes_to_image

from rtsmap.models.config import ModelConfig


class BatchedRPN(RegionProposalNetwork):
    """torchvision's RPN plus :meth:`propose`, an export-friendly inference path."""

    def propose(self, features: list[Tensor], image: Tensor) -> tuple[Tensor, Tensor]:
        """Proposals for a whole batch as fixed-size tensors.

        Parameters
        ----------
        features
            FPN maps ``[B, C, h_l, w_l]``, finest first (the levels the anchors were made for).
        image
            Any input tensor ``[B, C, T, T]``; only its size, dtype and device are used.

        Returns
        -------
        boxes : Tensor
            ``[B, R, 4]`` xyxy proposals in image pixels, best first, R = post-NMS top-n.
        valid : Tensor
            ``[B, R]`` bool; False for padding (suppressed or degenerate boxes that fill
            the fixed count when an image has fewer than R proposals).
        """
        size = (int(image.shape[-2]), int(image.shape[-1]))
        # Anchors depend on the (fixed) tile size only, so one image's anchors serve all.
        anchors = self.anchor_generator(ImageList(image[:1], [size]), features)[0]
        objectness, deltas = self.head(features)

        boxes_l, scores_l, levels_l = [], [], []
        start = 0
        for level, (obj, reg) in enumerate(zip(objectness, deltas)):
            a, h, w = obj.shape[1], obj.shape[2], obj.shape[3]
            # Same (location, anchor) order as the anchor generator; -1 keeps B dynamic.
            obj = obj.permute(0, 2, 3, 1).reshape(-1, h * w * a)
            reg = reg.reshape(-1, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, h * w * a, 4)
            level_anchors = anchors[start : start + h * w * a]
            start += h * w * a
            k = min(self.pre_nms_top_n(), h * w * a)
            top, idx = obj.topk(k, dim=1)
            reg = torch.gather(reg, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
            decoded = self.box_coder.decode_single(reg.reshape(-1, 4), level_anchors[idx.reshape(-1)])
            boxes_l.append(decoded.reshape(-1, k, 4))
            scores_l.append(top)
            levels_l.append(torch.full_like(top, level, dtype=torch.int64))
        boxes = clip_boxes_to_image(torch.cat(boxes_l, 1), size)
        scores = torch.cat(scores_l, 1)
        levels = torch.cat(levels_l, 1)
        num = scores.shape[1]

        # torchvision drops tiny boxes and low scores before NMS; here they stay in
        # (they can only suppress boxes like themselves) and are marked invalid.
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= self.min_size).all(-1) & (torch.sigmoid(scores) >= self.score_thresh)

        # One NMS for the whole batch: each (image, level) is its own group.
        image_idx = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(levels)
        groups = image_idx * len(features) + levels
        keep = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), groups.reshape(-1), self.nms_thresh)
        # Kept indices -> mask (index_put exports to ScatterND; index_fill does not trace).
        kept = torch.zeros_like(scores.reshape(-1), dtype=torch.bool)
        kept = kept.index_put((keep,), torch.ones_like(keep, dtype=torch.bool))
        valid = valid & kept.reshape(valid.shape)

        r = min(self.post_nms_top_n(), num)
        ranked = torch.where(valid, scores, torch.full_like(scores, -1e9))
        _, order = ranked.topk(r, dim=1)
        boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
        valid = torch.gather(valid, 1, order)
        return boxes, valid


def build_rpn(config: ModelConfig) -> BatchedRPN:
    """Build the RPN of ``config`` (anchors on P2..P6, one shared 3x3 conv head).

    Parameters
    ----------
    config
        The model configuration.

    Returns
    -------
    BatchedRPN
    """
    anchor_generator = AnchorGenerator(
        sizes=config.anchor_sizes,
        aspect_ratios=(config.aspect_ratios,) * len(config.anchor_sizes),
    )
    head = RPNHead(config.fpn_channels, anchor_generator.num_anchors_per_location()[0])
    return BatchedRPN(
        anchor_generator,
        head,
        fg_iou_thresh=config.rpn_fg_iou_threshold,
        bg_iou_thresh=config.rpn_bg_iou_threshold,
        batch_size_per_image=config.rpn_batch_size_per_image,
        positive_fraction=config.rpn_positive_fraction,
        pre_nms_top_n={"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test},
        nms_thresh=config.rpn_nms_threshold,
    )
