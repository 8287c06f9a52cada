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

Missing modalities: every ``forward`` takes an optional ``presence`` [B, 1 + num_aux] (1 present,
0 absent; optical first), the model file's presence input (docs/contracts.md). An absent
modality's feature map is zeroed, so whatever its branch made of the zero fill is ignored. In
the attention fusions an absent auxiliary modality's keys get a logit of -1e4 (weight exactly
0), and the residual fusion multiplies its gate by "any auxiliary modality present": with SAR
and DEM both absent its output is exactly the optical map, the optical model's path. With
optical absent, the zeroed optical map makes every query the same vector (the query
LayerNorm's bias), so the attention becomes a learned, content-weighted pooling of the SAR/DEM
neighbourhood (keys still differ by content, modality and offset) and the output is that
pooling through the gate; the ``query`` gate sees the constant "no optical" token and can learn
its own opening for this case, the ``channel`` gate cannot. No new weights: a model trained
without dropout keeps its state dict, and presence all ones gives bit-identical outputs.

The ``query_open`` gate does not leave that case to learning: it is held fully open in the
cells where the optical input has no data, per pixel (``optical_valid``, which the backbone
reads off the zero fill: a cloud-masked pixel, a swath gap, or optical absent altogether), so
there the fused map is the optical branch's response to the fill plus the full SAR/DEM
attention. The query gate alone learned to open under cloud on the first synthetic SAR
(docs/fusion-study.md) but not on the realistic one, where only the DEM shows a hidden slump.
Held open, the attention path still came out about five times weaker than the optical features
the heads are trained on (its gate is tiny wherever optical is present), so the heads found
nothing without optical. ``query_fill`` adds, in the same cells, a zero-initialised 1x1
projection of the SAR and DEM maps (``fill_from_aux``) that learns to stand in for the optical
features there; it is the one new weight, and it is zero until trained.

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


def _zero_absent(
    optical: torch.Tensor, aux: list[torch.Tensor], presence: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Zero the maps of absent modalities; return them and the auxiliary presence [B, num_aux].

    A present modality's map is multiplied by exactly 1, so its values do not change.
    """
    if not torch.jit.is_tracing() and (presence.dim() != 2 or presence.shape[1] != 1 + len(aux)):
        raise ValueError(f"fusion: presence must be [B, {1 + len(aux)}], got {list(presence.shape)}")
    presence = presence.to(optical.dtype)
    optical = optical * presence[:, 0, None, None, None]
    aux = [a * presence[:, i + 1, None, None, None] for i, a in enumerate(aux)]
    return optical, aux, presence[:, 1:]


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

    def attend(
        self, tokens: torch.Tensor, aux: list[torch.Tensor], aux_presence: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention output as a map [B, C, H, W] (not yet added to anything).

        ``tokens`` are :meth:`query_tokens` of the optical map, so a caller that also needs them
        (the query gate) normalises once. ``aux_presence`` [B, num_aux] (1 present, 0 absent)
        masks the keys of absent modalities out (weight exactly 0 when another is present).
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
        logits = logits + self.position_bias[None, :, :, None, None]
        if aux_presence is not None:
            # -1e4 for an absent modality's keys: exp underflows to exactly 0 in float32; 0 added
            # for present ones, so all-present gives the very logits of a call without presence.
            per_key = aux_presence[:, :, None].expand(-1, self.num_aux, self.window * self.window)
            logits = logits + ((per_key.reshape(per_key.shape[0], -1) - 1.0) * 1e4)[:, None, :, None, None]
        weights = torch.softmax(logits, dim=2)
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
        if gate in ("query", "query_open", "query_fill"):
            self.gate_from_query = nn.Linear(channels, channels, bias=False)
            nn.init.zeros_(self.gate_from_query.weight)
        self.open_where_missing = gate in ("query_open", "query_fill")
        self.fill_from_aux = None
        if gate == "query_fill":
            # Zero at start (the fused model starts as the optical model); trained where optical
            # has no data, it gives the heads SAR/DEM features at the scale optical ones have.
            self.fill_from_aux = nn.Conv2d(channels * num_aux, channels, 1)
            nn.init.zeros_(self.fill_from_aux.weight)
            nn.init.zeros_(self.fill_from_aux.bias)

    def forward(
        self, optical: torch.Tensor, aux: list[torch.Tensor], presence: torch.Tensor | None = None,
        optical_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse one FPN level.

        Parameters
        ----------
        optical : Tensor
            [B, C, H, W] query map.
        aux : list of Tensor
            ``num_aux`` maps of the same shape.
        presence : Tensor, optional
            [B, 1 + num_aux] float, 1 where the modality is present (optical first); None: all.
        optical_valid : Tensor, optional
            [B, 1, H, W] share of valid optical input pixels under each cell (0..1); used by
            the ``query_open`` and ``query_fill`` gates only, which are then ``v * gate + (1 - v)``:
            fully open where optical has no data (cloud, swath gaps, optical absent), learned
            elsewhere; ``query_fill`` also adds ``(1 - v) * fill_from_aux([sar, dem])``.

        Returns
        -------
        Tensor
            [B, C, H, W]. With every auxiliary modality absent, exactly ``optical``.
        """
        aux_presence = None
        if presence is not None:
            optical, aux, aux_presence = _zero_absent(optical, aux, presence)
        tokens = self.query_tokens(optical)
        gate = self.gate[None, :, None, None]
        if self.gate_from_query is not None:
            gate = gate + self.gate_from_query(tokens).permute(0, 3, 1, 2)
        if self.open_where_missing and optical_valid is not None:
            gate = optical_valid * gate + (1.0 - optical_valid)
        if aux_presence is not None:
            # Closed when no auxiliary modality is present: the output is the optical path.
            gate = gate * aux_presence.amax(dim=1)[:, None, None, None]
        out = optical + gate * self.attend(tokens, aux, aux_presence)
        if self.fill_from_aux is not None and optical_valid is not None:
            # aux are zero where absent, so with SAR and DEM both absent this adds exactly 0.
            out = out + (1.0 - optical_valid) * self.fill_from_aux(torch.cat(aux, dim=1))
        return out


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

    def forward(
        self, optical: torch.Tensor, aux: list[torch.Tensor], presence: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fuse one FPN level: [B, C, H, W] optical and auxiliary maps -> [B, C, H, W].

        ``presence`` [B, 1 + num_aux] as in :class:`ResidualCrossModalityAttention`; with every
        auxiliary modality absent the keys are all masked alike and the output carries no signal
        (this ablation has no optical path to fall back on).
        """
        aux_presence = None
        if presence is not None:
            optical, aux, aux_presence = _zero_absent(optical, aux, presence)
        out = self.attend(self.query_tokens(optical), aux, aux_presence)
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

    def forward(
        self, optical: torch.Tensor, aux: list[torch.Tensor], presence: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fuse one FPN level: [B, C, H, W] optical and auxiliary maps -> [B, C, H, W].

        ``presence`` [B, 1 + num_aux] (optical first): absent modalities' maps are zeroed.
        """
        if len(aux) != self.num_aux:
            raise ValueError(f"fusion: expected {self.num_aux} auxiliary maps, got {len(aux)}")
        if presence is not None:
            optical, aux, _ = _zero_absent(optical, aux, presence)
        return self.act(self.norm(self.conv(torch.cat([optical, *aux], dim=1))))
