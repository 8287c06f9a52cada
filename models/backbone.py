"""The multimodal backbone: MViTv2 encoders, FPNs and the fusion of modalities.

One class covers every fusion strategy the project compares:

- ``"none"``: one modality, one MViTv2 + FPN (the unimodal models, also used for pretraining);
- ``"data_level"``: one MViTv2 + FPN on the channel concatenation of all modalities;
- ``"conv"``, ``"attention"``, ``"residual_attention"``: one MViTv2 + FPN per modality, then a
  fusion module (``models/fusion.py``) at every FPN level P2..P6, with the first modality
  (optical) as the query.

State-dict layout (what :meth:`MultimodalBackbone.load_unimodal_state` relies on):
``encoders.<branch>.*`` (MViTv2), ``fpns.<branch>.*`` (torchvision FPN) and, for the feature
fusions, ``fusions.<level>.*``. A branch is named after its modality, except for data-level
fusion, whose single branch is ``stacked``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rtsmap.models.config import FUSION_MODES
from rtsmap.models.fusion import AttentionFusion, ConvFusion, ResidualCrossModalityAttention
from rtsmap.models.mvit import STAGE_NAMES, MViTConfig, MViTv2

# The fusion modes are the configuration's (one list for the config check and the backbone);
# FUSIONS is the name the tests and benchmarks know them by here.
FUSIONS = FUSION_MODES
LEVELS = ("p2", "p3", "p4", "p5", "p6")
LEVEL_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
# Side of the auxiliary neighbourhood each optical token attends to, at every level (at P2 one
# step is 4 px, at P6 64 px, so the same window covers more ground on coarser levels).
FUSION_WINDOW = 3
STACKED = "stacked"


class LoadResult(NamedTuple):
    """Keys left out by :meth:`MultimodalBackbone.load_unimodal_state`."""

    missing_keys: list[str]
    """Keys of the target branch that the given state dict did not provide."""
    unexpected_keys: list[str]
    """Keys of the given state dict (after the prefix) that are not in the target branch."""


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a module.

    Parameters
    ----------
    module : nn.Module
        Any module.
    trainable_only : bool
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        The parameter count.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _valid_share(optical: torch.Tensor, strides: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per level, the share [B, 1, H/s, W/s] of optical input pixels that hold data.

    An invalid pixel is the contract's zero fill in every band (``rtsmap.contract.normalize``);
    a normalised valid pixel is exactly zero in all bands with probability zero.
    """
    valid = (optical != 0).any(dim=1, keepdim=True).to(optical.dtype)
    return {lvl: F.avg_pool2d(valid, s, s, ceil_mode=True) for lvl, s in strides.items()}


class MultimodalBackbone(nn.Module):
    """MViTv2 + FPN per branch and a per-level fusion; returns FPN levels P2..P6.

    Parameters
    ----------
    modalities : mapping of str to int
        Modality name -> input channels, in model order ("optical" first when present; the
        first modality is the fusion query).
    mvit : MViTConfig
        Encoder architecture (one encoder per branch, not shared).
    img_size : int
        Tile size in pixels (multiple of 32; fixed, as in the exported model).
    fusion : str
        One of :data:`FUSIONS`.
    fpn_channels : int
        Channels of every FPN level.
    fusion_heads : int, optional
        Heads of the attention fusions; default ``fpn_channels // 32`` (head width 32).
    fusion_gate : str
        Gate of the residual attention fusion, ``channel``, ``query``, ``query_open`` or ``query_fill``
        (:class:`models.fusion.ResidualCrossModalityAttention`).

    Attributes
    ----------
    out_channels : int
        ``fpn_channels``.
    modalities : tuple of str
        Modality names in input order.
    strides : dict of str to int
        Stride of each output level.

    Raises
    ------
    ValueError
        For an unknown fusion, or a modality count that does not fit it.
    """

    def __init__(
        self,
        modalities: Mapping[str, int],
        mvit: MViTConfig,
        img_size: int,
        fusion: str,
        fpn_channels: int = 256,
        fusion_heads: int | None = None,
        fusion_gate: str = "channel",
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"MultimodalBackbone: unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if not modalities:
            raise ValueError("MultimodalBackbone: no modalities given")
        if fusion == "none" and len(modalities) != 1:
            raise ValueError(
                f"MultimodalBackbone: fusion 'none' takes exactly one modality, got {list(modalities)}"
            )
        if fusion not in ("none", "data_level") and len(modalities) < 2:
            raise ValueError(f"MultimodalBackbone: fusion {fusion!r} needs at least two modalities")
        self.fusion = fusion
        self.fusion_gate = fusion_gate if fusion == "residual_attention" else None
        self.modalities = tuple(modalities)
        self.in_channels = dict(modalities)
        self.img_size = img_size
        self.out_channels = fpn_channels
        self.strides = dict(LEVEL_STRIDES)

        if fusion == "data_level":
            branches = {STACKED: sum(modalities.values())}
        else:
            branches = dict(modalities)
        self.encoders = nn.ModuleDict(
            {name: MViTv2(mvit, channels, img_size) for name, channels in branches.items()}
        )
        self.fpns = nn.ModuleDict(
            {
                name: FeaturePyramidNetwork(
                    [enc.out_channels[s] for s in STAGE_NAMES], fpn_channels, extra_blocks=LastLevelMaxPool()
                )
                for name, enc in self.encoders.items()
            }
        )
        num_aux = len(modalities) - 1
        heads = fusion_heads if fusion_heads is not None else max(1, fpn_channels // 32)
        if fusion == "residual_attention":
            fusions = {lvl: ResidualCrossModalityAttention(fpn_channels, heads, FUSION_WINDOW, num_aux, fusion_gate) for lvl in LEVELS}
        elif fusion == "attention":
            fusions = {lvl: AttentionFusion(fpn_channels, heads, FUSION_WINDOW, num_aux) for lvl in LEVELS}
        elif fusion == "conv":
            fusions = {lvl: ConvFusion(fpn_channels, num_aux) for lvl in LEVELS}
        else:
            fusions = None
        self.fusions = nn.ModuleDict(fusions) if fusions is not None else None

    def _pyramid(self, branch: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Encoder + FPN of one branch, renamed to p2..p6."""
        feats = self.encoders[branch](x)
        pyramid = self.fpns[branch](OrderedDict((s, feats[s]) for s in STAGE_NAMES))
        # torchvision names the levels after its inputs plus "pool" for LastLevelMaxPool's P6.
        return OrderedDict(zip(LEVELS, pyramid.values()))

    def forward(
        self, inputs: Mapping[str, torch.Tensor], presence: torch.Tensor | None = None
    ) -> OrderedDict[str, torch.Tensor]:
        """Compute the fused pyramid.

        Parameters
        ----------
        inputs : mapping of str to Tensor
            One [B, C_m, img_size, img_size] tensor per modality (extra keys are ignored).
        presence : Tensor, optional
            [B, M] float in :attr:`modalities` order, 1 where the modality is present, 0 where
            it is absent (its input is then the fill, zeros); None: every modality present.
            Data-level fusion zeroes absent inputs; the feature fusions zero absent feature maps
            and mask them out of the attention (``models/fusion.py``); ``none`` ignores it.

        Returns
        -------
        OrderedDict of str to Tensor
            "p2".."p6", each [B, fpn_channels, img_size / stride, img_size / stride] for
            strides 4, 8, 16, 32, 64.

        Raises
        ------
        ValueError
            If a modality is missing.
        """
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ValueError(f"MultimodalBackbone: inputs lack modalities {missing}; expected {list(self.modalities)}")
        if self.fusion == "data_level":
            stacked = [inputs[m] for m in self.modalities]
            if presence is not None:
                stacked = [x * presence[:, i, None, None, None].to(x.dtype) for i, x in enumerate(stacked)]
            return self._pyramid(STACKED, torch.cat(stacked, dim=1))
        pyramids = [self._pyramid(m, inputs[m]) for m in self.modalities]
        if self.fusions is None:
            return pyramids[0]
        query, aux = pyramids[0], pyramids[1:]
        if self.fusion_gate in ("query_open", "query_fill"):
            valid = _valid_share(inputs[self.modalities[0]], self.strides)
            return OrderedDict((lvl, self.fusions[lvl](query[lvl], [p[lvl] for p in aux], presence, valid[lvl]))
                               for lvl in LEVELS)
        if presence is None:
            return OrderedDict((lvl, self.fusions[lvl](query[lvl], [p[lvl] for p in aux])) for lvl in LEVELS)
        return OrderedDict((lvl, self.fusions[lvl](query[lvl], [p[lvl] for p in aux], presence)) for lvl in LEVELS)

    def load_unimodal_state(
        self, modality: str, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
    ) -> LoadResult:
        """Load a unimodal (``fusion="none"``) backbone's weights into this model's branch.

        Lets multimodal fine-tuning start from one pretrained checkpoint per modality. For
        data-level fusion, the one checkpoint fills the whole stacked branch: the patch stem's
        weights go to that modality's input channels and the other bands' weights are zero, so
        the stacked model at step 0 equals the unimodal one and learns to use the other bands.

        Parameters
        ----------
        modality : str
            The branch to fill (one of :attr:`modalities`; for data-level fusion, the modality
            whose checkpoint initialises the stacked branch).
        state_dict : mapping of str to Tensor
            State dict of a ``MultimodalBackbone(..., fusion="none")`` for that modality, with
            keys ``encoders.<modality>.*`` and ``fpns.<modality>.*`` after ``prefix``.
        prefix : str
            Leading part of the keys to strip, e.g. ``"backbone."`` for a detector's state dict;
            keys not starting with it are ignored.

        Returns
        -------
        LoadResult
            ``missing_keys`` (branch keys not provided) and ``unexpected_keys`` (keys under the
            prefix that do not belong to the branch, with the prefix stripped).

        Raises
        ------
        ValueError
            If this model has no input for ``modality``, or a tensor's shape differs (other
            bands, architecture or tile size).
        """
        if modality not in self.modalities:
            raise ValueError(
                f"MultimodalBackbone: no {modality!r} branch to load into "
                f"(fusion {self.fusion!r}, modalities {list(self.modalities)})"
            )
        branch = STACKED if self.fusion == "data_level" else modality
        own = {k: v for k, v in self.state_dict().items() if k.startswith((f"encoders.{branch}.", f"fpns.{branch}."))}
        stem_key = f"encoders.{branch}.patch_embed.weight"
        # Where this modality's bands start in the stacked input (data-level fusion).
        offset = sum(self.in_channels[m] for m in self.modalities[: self.modalities.index(modality)])
        selected: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            for part in ("encoders.", "fpns."):
                if key.startswith(f"{part}{modality}."):
                    key = f"{part}{branch}." + key[len(part) + len(modality) + 1:]
            if key not in own:
                unexpected.append(key)
                continue
            if key == stem_key and branch == STACKED and value.shape[1] == self.in_channels[modality]:
                stem = torch.zeros_like(own[key])
                stem[:, offset : offset + value.shape[1]] = value
                value = stem
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"MultimodalBackbone: cannot load {prefix}{key} into the {branch!r} branch: "
                    f"shape {list(value.shape)} != {list(own[key].shape)} (different bands, "
                    f"architecture or tile size?)"
                )
            selected[key] = value
        self.load_state_dict(selected, strict=False)
        missing = sorted(set(own) - set(selected))
        return LoadResult(missing_keys=missing, unexpected_keys=unexpected)
