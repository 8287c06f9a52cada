"""Feature-level fusion of modalities, one module per FPN level.

Every module takes the optical (query) feature map and a list of auxiliary maps (SAR, DEM) of
the same shape [B, C, H, W] and returns one map of that shape:

- :class:`ResidualCrossModalityAttention` (the model's fusion, after Li et al. 2025): optical
  tokens attend to the auxiliary tokens and the result is added back to the optical map
  through a learned gate that starts at zero, so the fused model starts as the optical model;
- :class:`AttentionFusion`: the same attention without the residual path (an ablation);
- :class:`ConvFusion`: concatenation and convolution (the classic feature-level baseline).

Data-level fusion (stacking all bands into one backbone) is not a module: see
``models/backbone.py``.

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (one fused kernel on GPU,
exports to ONNX as MatMul/Softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _CrossModalityAttention(nn.Module):
    """Optical queries, auxiliary keys/values: the attention shared by the two attention fusions.

    Parameters
    ----------
    channels : int
        Channels C of every map.
    num_heads : int
        Attention heads; must divide ``channels``.
    kv_reduction : int
        Stride of the spatial reduction of the auxiliary maps before they become keys/values.
    num_aux : int
        Number of auxiliary modalities.
    """

    def __init__(self, channels: int, num_heads: int, kv_reduction: int, num_aux: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"fusion: {channels} channels are not divisible by {num_heads} heads")
        if kv_reduction < 1:
            raise ValueError(f"fusion: kv_reduction must be >= 1, got {kv_reduction}")
        if num_aux < 1:
            raise ValueError(f"fusion: needs at least one auxiliary modality, got {num_aux}")
        self.channels = channels
        self.num_heads = num_heads
        self.num_aux = num_aux
        self.kv_reduction = kv_reduction
        self.norm_q = nn.LayerNorm(channels)
        # One strided depthwise conv per auxiliary modality (kernel = stride = kv_reduction),
        # as in MViT's pooling: each modality's statistics get their own reduction, and it costs
        # C * r^2 weights instead of a full conv's C^2 * r^2 (4M weights per modality at P2).
        # The k/v projections below mix channels anyway.
        self.reduce = nn.ModuleList(
            [
                nn.Conv2d(channels, channels, kv_reduction, kv_reduction, groups=channels)
                if kv_reduction > 1
                else nn.Identity()
                for _ in range(num_aux)
            ]
        )
        self.norm_kv = nn.ModuleList([nn.LayerNorm(channels) for _ in range(num_aux)])
        # Tells keys from different modalities apart after they are concatenated.
        self.modality_embed = nn.Parameter(torch.zeros(num_aux, channels))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def attend(self, optical: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Attention output as a map [B, C, H, W] (not yet added to anything)."""
        if len(aux) != self.num_aux:
            raise ValueError(f"fusion: expected {self.num_aux} auxiliary maps, got {len(aux)}")
        for a in aux:
            # Skipped while tracing for ONNX: the traced shapes are symbolic, the check is not.
            if not torch.jit.is_tracing() and a.shape[1:] != optical.shape[1:]:
                raise ValueError(
                    f"fusion: auxiliary map shape {list(a.shape)} differs from optical {list(optical.shape)}"
                )
        height, width = optical.shape[-2], optical.shape[-1]
        heads, head_dim = self.num_heads, self.channels // self.num_heads
        q = self.q(self.norm_q(optical.flatten(2).transpose(1, 2)))  # [B, HW, C]
        tokens = []
        for i, a in enumerate(aux):
            t = self.reduce[i](a).flatten(2).transpose(1, 2)  # [B, hw, C]
            tokens.append(self.norm_kv[i](t) + self.modality_embed[i])
        kv = self.kv(torch.cat(tokens, dim=1))  # [B, M*hw, 2C]
        q = q.reshape(-1, height * width, heads, head_dim).transpose(1, 2)
        kv = kv.reshape(-1, kv.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [B, heads, HW, head_dim]
        out = self.proj(out.transpose(1, 2).reshape(-1, height * width, self.channels))
        return out.transpose(1, 2).reshape(-1, self.channels, height, width)


class ResidualCrossModalityAttention(_CrossModalityAttention):
    """Cross-modality attention added to the optical map through a zero-initialised gate.

    ``out = optical + gate * attention(optical -> [sar, dem])`` with ``gate`` a per-channel
    scale starting at 0: at initialisation the fused model equals the optical-only model, so
    fine-tuning from unimodal checkpoints starts from the optical model's accuracy and the
    auxiliary modalities are let in as far as they help.

    Parameters
    ----------
    channels : int
        Channels C of every map.
    num_heads : int
        Attention heads; must divide ``channels``.
    kv_reduction : int
        Spatial reduction (1, 2, 4, 8) of the auxiliary maps, chosen per FPN level so the
        key/value count stays bounded on high-resolution levels.
    num_aux : int
        Number of auxiliary modalities (2 for SAR + DEM).

    Raises
    ------
    ValueError
        On inconsistent sizes.
    """

    def __init__(self, channels: int, num_heads: int, kv_reduction: int, num_aux: int = 2) -> None:
        super().__init__(channels, num_heads, kv_reduction, num_aux)
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, optical: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Fuse one FPN level.

        Parameters
        ----------
        optical : Tensor
            [B, C, H, W] query map.
        aux : list of Tensor
            ``num_aux`` maps of the same shape.

        Returns
        -------
        Tensor
            [B, C, H, W].
        """
        return optical + self.gate[None, :, None, None] * self.attend(optical, aux)


class AttentionFusion(_CrossModalityAttention):
    """Cross-modality attention without the residual path (ablation of the residual gate).

    The output is the LayerNorm-ed attention result only: optical features steer where to
    look (they are the queries) but reach the output only through the attention weights,
    which is what the residual variant fixes.

    Parameters
    ----------
    channels, num_heads, kv_reduction, num_aux
        As in :class:`ResidualCrossModalityAttention`.
    """

    def __init__(self, channels: int, num_heads: int, kv_reduction: int, num_aux: int = 2) -> None:
        super().__init__(channels, num_heads, kv_reduction, num_aux)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, optical: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Fuse one FPN level: [B, C, H, W] optical and auxiliary maps -> [B, C, H, W]."""
        out = self.attend(optical, aux)
        return self.norm_out(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvFusion(nn.Module):
    """Concatenate all modalities' maps, then 3x3 conv + GroupNorm + ReLU back to C channels.

    3x3 rather than 1x1 so that a pixel or two of misregistration between Sentinel-1/-2 and
    the DEM can be absorbed. GroupNorm, not BatchNorm: detection batches are small.

    Parameters
    ----------
    channels : int
        Channels C of every map.
    num_aux : int
        Number of auxiliary modalities.
    """

    def __init__(self, channels: int, num_aux: int = 2) -> None:
        super().__init__()
        self.num_aux = num_aux
        self.conv = nn.Conv2d(channels * (1 + num_aux), channels, 3, padding=1, bias=False)
        # Up to 32 groups (Detectron2's choice for 256 channels) but at least 8 channels each:
        # with one channel per group, a 1x1 map (P6 of a small tile) would normalise to zero.
        self.norm = nn.GroupNorm(math.gcd(32, max(channels // 8, 1)), channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, optical: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Fuse one FPN level: [B, C, H, W] optical and auxiliary maps -> [B, C, H, W]."""
        if len(aux) != self.num_aux:
            raise ValueError(f"fusion: expected {self.num_aux} auxiliary maps, got {len(aux)}")
        return self.act(self.norm(self.conv(torch.cat([optical, *aux], dim=1))))
