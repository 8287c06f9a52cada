"""Feature-level fusion of modalities, one module per FPN level.

Every module takes the optical (query) feature map and a list of auxiliary maps (SAR, DEM) of
the same shape [B, C, H, W] and returns one map of that shape:

- :class:`ResidualCrossModalityAttention` (the model's fusion, after Li et al. 2025): each optical
  token attends to the auxiliary tokens around its own position and the result is added back
  to the optical map through a learned gate that starts at zero, so the fused model starts as
  the optical model;
- :class:`AttentionFusion`: the same attention without the residual path (an ablation);
- :class:`ConvFusion`: concatenation and convolution (the classic feature-level baseline).

Data-level fusion (stacking all bands into one backbone) is not a module: see
``models/backbone.py``.

The attention is written with shifted views, products and one softmax (plain ONNX ops at opset
17): each query has only ``num_aux * window**2`` keys, so a dense attention kernel would spend
almost all its work on masked-out pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtsmap.models.config import FUSION_GATES


class _CrossModalityAttention(nn.Module):
    """Local cross-modality attention: the attention shared by the two attention fusions.

    Each optical token (query) attends to the auxiliary tokens (SAR, DEM) in a ``window`` x
    ``window`` neighbourhood of its own position, all modalities at once (one softmax over
    ``num_aux * window**2`` keys). Keys carry a modality embedding, and every (modality, offset)
    pair has a learned per-head bias, so a query can tell "SAR right here" from "DEM one pixel
    east". Why local: our first version let every query attend to all (spatially reduced)
    auxiliary tokens with no position information; such attention cannot find the SAR token at
    its own location, returned a near-global average, and added nothing over the optical model
    (docs/fusion-study.md). The co-registered grid makes the neighbourhood the natural key set;
    a 3x3 window absorbs a pixel of misregistration, as :class:`ConvFusion`'s kernel does.
    Outside the map, keys and values are zero: a "nothing here" option, not a wrapped value.

    Parameters
    ----------
    channels : int
        Channels C of every map.
    num_heads : int
        Attention heads; must divide ``channels``.
    window : int
        Odd side of the neighbourhood each query attends to.
    num_aux : int
        Number of auxiliary modalities.
    """

    def __init__(self, channels: int, num_heads: int, window: int, num_aux: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"fusion: {channels} channels are not divisible by {num_heads} heads")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"fusion: window must be odd and >= 1, got {window}")
        if num_aux < 1:
            raise ValueError(f"fusion: needs at least one auxiliary modality, got {num_aux}")
        self.channels = channels
        self.num_heads = num_heads
        self.num_aux = num_aux
        self.window = window
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.ModuleList([nn.LayerNorm(channels) for _ in range(num_aux)])
        # Tells keys from different modalities apart: they share the k/v projection.
        self.modality_embed = nn.Parameter(torch.zeros(num_aux, channels))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        # One bias per head and (modality, offset) key, added to the logits.
        self.position_bias = nn.Parameter(torch.zeros(num_heads, num_aux * window * window))
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def query_tokens(self, optical: torch.Tensor) -> torch.Tensor:
        """The normalised optical tokens [B, H, W, C] of a map [B, C, H, W] (queries and gate input)."""
        return self.norm_q(optical.permute(0, 2, 3, 1))

    def attend(self, tokens: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Attention output as a map [B, C, H, W] (not yet added to anything).

        ``tokens`` are :meth:`query_tokens` of the optical map, so a caller that also needs them
        (the query gate) normalises once.
        """
        if len(aux) != self.num_aux:
            raise ValueError(f"fusion: expected {self.num_aux} auxiliary maps, got {len(aux)}")
        batch, height, width, channels = tokens.shape
        for a in aux:
            # Skipped while tracing for ONNX: the traced shapes are symbolic, the check is not.
            if not torch.jit.is_tracing() and tuple(a.shape[1:]) != (channels, height, width):
                raise ValueError(
                    f"fusion: auxiliary map shape {list(a.shape)} differs from optical {[batch, channels, height, width]}"
                )
        heads, head_dim = self.num_heads, self.channels // self.num_heads
        radius = self.window // 2
        q = self.q(tokens)  # [B, H, W, C]
        q = q.permute(0, 3, 1, 2).reshape(-1, heads, head_dim, height, width) * head_dim**-0.5
        keys, values = [], []
        for i, a in enumerate(aux):
            kv = self.kv(self.norm_kv[i](a.permute(0, 2, 3, 1)) + self.modality_embed[i])
            kv = F.pad(kv.permute(0, 3, 1, 2), (radius, radius, radius, radius))  # [B, 2C, H+2r, W+2r]
            # One shifted view per neighbourhood offset: no unfold, so memory stays O(C*H*W).
            for dy in range(self.window):
                for dx in range(self.window):
                    shifted = kv[:, :, dy : dy + height, dx : dx + width]
                    keys.append(shifted[:, : self.channels].reshape(-1, heads, head_dim, height, width))
                    values.append(shifted[:, self.channels :].reshape(-1, heads, head_dim, height, width))
        logits = torch.stack([(q * k).sum(dim=2) for k in keys], dim=2)  # [B, heads, N, H, W]
        weights = torch.softmax(logits + self.position_bias[None, :, :, None, None], dim=2)
        out = weights[:, :, 0, None] * values[0]
        for n in range(1, len(values)):
            out = out + weights[:, :, n, None] * values[n]
        out = self.proj(out.reshape(-1, self.channels, height, width).permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2)


class ResidualCrossModalityAttention(_CrossModalityAttention):
    """Cross-modality attention added to the optical map through a zero-initialised gate.

    ``out = optical + gate * attention(optical -> [sar, dem])`` with ``gate`` starting at 0: at
    initialisation the fused model equals the optical-only model, so fine-tuning from unimodal
    checkpoints starts from the optical model's accuracy and the auxiliary modalities are let in
    as far as they help. The ``channel`` gate is one scale per channel, the same everywhere; the
    ``query`` gate adds a linear function of each (normalised) optical token, so it can open
    where the optical map carries nothing, e.g. under cloud, and stay shut elsewhere.

    Parameters
    ----------
    channels : int
        Channels C of every map.
    num_heads : int
        Attention heads; must divide ``channels``.
    window : int
        Odd side of the neighbourhood of auxiliary tokens each optical token attends to.
    num_aux : int
        Number of auxiliary modalities (2 for SAR + DEM).
    gate : str
        ``channel`` or ``query``.

    Raises
    ------
    ValueError
        On inconsistent sizes.
    """

    def __init__(self, channels: int, num_heads: int, window: int = 3, num_aux: int = 2, gate: str = "channel") -> None:
        super().__init__(channels, num_heads, window, num_aux)
        if gate not in FUSION_GATES:
            raise ValueError(f"fusion: gate must be one of {FUSION_GATES}, got {gate!r}")
        self.gate = nn.Parameter(torch.zeros(channels))
        self.gate_from_query = None
        if gate == "query":
            self.gate_from_query = nn.Linear(channels, channels, bias=False)
            nn.init.zeros_(self.gate_from_query.weight)

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
        tokens = self.query_tokens(optical)
        gate = self.gate[None, :, None, None]
        if self.gate_from_query is not None:
            gate = gate + self.gate_from_query(tokens).permute(0, 3, 1, 2)
        return optical + gate * self.attend(tokens, aux)


class AttentionFusion(_CrossModalityAttention):
    """Cross-modality attention without the residual path (ablation of the residual gate).

    The output is the LayerNorm-ed attention result only: optical features steer where to
    look (they are the queries) but reach the output only through the attention weights,
    which is what the residual variant fixes.

    Parameters
    ----------
    channels, num_heads, window, num_aux
        As in :class:`ResidualCrossModalityAttention`.
    """

    def __init__(self, channels: int, num_heads: int, window: int = 3, num_aux: int = 2) -> None:
        super().__init__(channels, num_heads, window, num_aux)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, optical: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """Fuse one FPN level: [B, C, H, W] optical and auxiliary maps -> [B, C, H, W]."""
        out = self.attend(self.query_tokens(optical), aux)
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
