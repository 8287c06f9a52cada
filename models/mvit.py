"""MViTv2 for 2D images: a multi-scale vision transformer backbone with four feature maps.

Li et al. 2022, "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection". Written here because torchvision only ships the 3D video MViT
(``torchvision.models.video.mvit_v2_s``) with a classification output: it has no 2D image
stem, no per-stage feature maps and no decomposed relative position embeddings for images.

The design, in the paper's words and with its choices:

- patch stem: one strided convolution (7x7, stride 4) to tokens;
- four stages; the first block of each stage after the first pools the queries with stride 2
  (halving the resolution) and, with ``dim_mul_in_att``, also doubles the channels inside its
  attention (the skip path gets a linear projection and a max pool to match);
- pooling attention: queries, keys and values are each pooled by a depthwise convolution over
  one head's channels (shared by the heads) followed by a LayerNorm; keys and values are pooled
  with an adaptive stride (4 at stage 1, divided by the query stride at each stage change) so
  the number of key/value tokens stays bounded on large images;
- residual pooling connection: the pooled query is added to the attention output;
- decomposed relative position embeddings along height and width (zero-initialised), no
  absolute position embedding;
- per-stage output LayerNorm, giving feature maps at strides 4, 8, 16 and 32 for an FPN.

The tile size is fixed at construction (the relative position tables and their gather indices
depend on it), so every reshape uses static spatial sizes and ``-1`` for the batch: the model
exports to ONNX with a dynamic batch axis.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.ops import StochasticDepth

STAGE_NAMES = ("s4", "s8", "s16", "s32")


@dataclasses.dataclass(frozen=True)
class MViTConfig:
    """Hyper-parameters of an MViTv2 backbone (four stages)."""

    embed_dims: tuple[int, ...]
    """Channels of each of the four stages."""
    depths: tuple[int, ...]
    """Number of MultiScaleBlocks in each stage."""
    num_heads: tuple[int, ...]
    """Attention heads in each stage (each stage's dim must divide by its heads)."""
    mlp_ratio: float = 4.0
    """Hidden width of the block MLP relative to the block's output channels."""
    qkv_bias: bool = True
    """Whether the q/k/v projection has a bias."""
    patch_kernel: int = 7
    """Kernel of the patch stem convolution."""
    patch_stride: int = 4
    """Stride of the patch stem convolution (the resolution of stage 1)."""
    patch_padding: int = 3
    """Padding of the patch stem convolution."""
    pool_kernel: int = 3
    """Kernel of the depthwise pooling convolutions of q, k and v."""
    kv_stride: int = 4
    """Key/value pooling stride at stage 1; divided by the query stride at each stage change."""
    q_stride: int = 2
    """Query pooling stride of the first block of every stage after the first."""
    residual_pooling: bool = True
    """Add the pooled query to the attention output (MViTv2's residual pooling connection)."""
    rel_pos_spatial: bool = True
    """Decomposed relative position embeddings along height and width (zero-initialised)."""
    dim_mul_in_att: bool = True
    """Expand channels inside the attention of a stage's first block (MViTv2's choice); if
    False, the MLP of the previous stage's last block expands them (MViTv1)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the last block, linearly increasing from 0 at the first."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""

    def __post_init__(self) -> None:
        if not (len(self.embed_dims) == len(self.depths) == len(self.num_heads) == 4):
            raise ValueError("MViTConfig needs exactly four stages of embed_dims, depths and num_heads")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"MViTConfig: stage dim {dim} is not divisible by its {heads} heads")
        if min(self.depths) < 1:
            raise ValueError("MViTConfig: every stage needs at least one block")


MVIT_VARIANTS: dict[str, MViTConfig] = {
    # MViTv2-T of the paper: 10 blocks, 23.4M parameters without a classification head.
    "tiny": MViTConfig(embed_dims=(96, 192, 384, 768), depths=(1, 2, 5, 2), num_heads=(1, 2, 4, 8)),
    # For CPU training of the demo region at 128-256 px tiles. A third of MViTv2-T's width and
    # half its depth: dims 32/64/128/256 keep a head width of 32 in every stage (as in T: 96/1,
    # 192/2, ...), and one block per stage except two at stride 16, where T puts most of its
    # depth, so all MViTv2 mechanisms (q pooling, adaptive kv pooling, channel expansion in
    # attention, residual pooling, relative positions) are exercised in every stage. 1.19M
    # parameters, 0.65 GMACs for a 256 px tile (MViTv2-T: 23.4M, 6.4 GMACs); no stochastic
    # depth (too few blocks to need it).
    "demo": MViTConfig(
        embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0
    ),
}


def _rel_pos_index(q_size: int, k_size: int) -> torch.Tensor:
    """Table row of the relative position between every query and key position along one axis.

    Query and key grids of different sizes are compared on the finer grid's scale (MViTv2's
    rule), so a pooled key covers the distance its stride spans. Rows go from 0 to
    ``2 * max(q_size, k_size) - 2``.
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio
    return (dist + (k_size - 1) * k_ratio).long()


class MultiScaleAttention(nn.Module):
    """Pooling attention with residual pooling and decomposed relative position embeddings.

    Parameters
    ----------
    dim, dim_out : int
        Input and output channels (they differ in a stage's first block).
    num_heads : int
        Attention heads.
    input_size : tuple of int
        (height, width) of the input token grid; fixed, so reshapes are static.
    q_stride, kv_stride : int
        Pooling strides of the queries and of the keys and values.
    pool_kernel : int
        Kernel of the depthwise pooling convolutions.
    qkv_bias, residual_pooling, rel_pos_spatial : bool
        See :class:`MViTConfig`.
    eps : float
        LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_size: tuple[int, int],
        q_stride: int,
        kv_stride: int,
        pool_kernel: int,
        qkv_bias: bool,
        residual_pooling: bool,
        rel_pos_spatial: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.dim_out = dim_out
        self.scale = self.head_dim**-0.5
        self.residual_pooling = residual_pooling
        self.input_size = input_size
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)

        def pool(stride: int) -> nn.Conv2d:
            # Depthwise over one head's channels, shared by all heads (MViTv2's conv pooling).
            return nn.Conv2d(
                self.head_dim, self.head_dim, pool_kernel, stride=stride,
                padding=pool_kernel // 2, groups=self.head_dim, bias=False,
            )

        self.pool_q, self.pool_k, self.pool_v = pool(q_stride), pool(kv_stride), pool(kv_stride)
        self.norm_q = nn.LayerNorm(self.head_dim, eps=eps)
        self.norm_k = nn.LayerNorm(self.head_dim, eps=eps)
        self.norm_v = nn.LayerNorm(self.head_dim, eps=eps)

        def pooled(size: int, stride: int) -> int:
            return (size + 2 * (pool_kernel // 2) - pool_kernel) // stride + 1

        height, width = input_size
        self.q_size = (pooled(height, q_stride), pooled(width, q_stride))
        self.kv_size = (pooled(height, kv_stride), pooled(width, kv_stride))
        self.rel_pos_spatial = rel_pos_spatial
        if rel_pos_spatial:
            rows_h = 2 * max(self.q_size[0], self.kv_size[0]) - 1
            rows_w = 2 * max(self.q_size[1], self.kv_size[1]) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(rows_h, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(rows_w, self.head_dim))
            # Not persistent: derived from the tile size, which the parameters' shapes pin.
            self.register_buffer("rel_index_h", _rel_pos_index(self.q_size[0], self.kv_size[0]), persistent=False)
            self.register_buffer("rel_index_w", _rel_pos_index(self.q_size[1], self.kv_size[1]), persistent=False)

    def _pool(self, x: torch.Tensor, conv: nn.Conv2d, norm: nn.LayerNorm) -> torch.Tensor:
        """Pool [B, heads, H*W, head_dim] tokens to [B, heads, H'*W', head_dim]."""
        height, width = self.input_size
        x = x.reshape(-1, height, width, self.head_dim).permute(0, 3, 1, 2)
        x = conv(x)
        x = x.reshape(-1, self.num_heads, self.head_dim, x.shape[-2] * x.shape[-1]).transpose(2, 3)
        return norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend from pooled queries to pooled keys/values.

        Parameters
        ----------
        x : Tensor
            [B, H*W, dim] tokens of the ``input_size`` grid.

        Returns
        -------
        Tensor
            [B, H'*W', dim_out] tokens of the query grid (``q_size``).
        """
        qkv = self.qkv(x).reshape(-1, x.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = self._pool(q, self.pool_q, self.norm_q)
        k = self._pool(k, self.pool_k, self.norm_k)
        v = self._pool(v, self.pool_v, self.norm_v)

        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_spatial:
            attn = self._add_rel_pos(attn, q)
        attn = attn.softmax(dim=-1)
        out = attn @ v
        if self.residual_pooling:
            out = out + q
        out = out.transpose(1, 2).reshape(-1, self.q_size[0] * self.q_size[1], self.dim_out)
        return self.proj(out)

    def _add_rel_pos(self, attn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Add the decomposed (height + width) relative position bias to attention logits."""
        (qh, qw), (kh, kw) = self.q_size, self.kv_size
        table_h = self.rel_pos_h[self.rel_index_h]  # [qh, kh, head_dim]
        table_w = self.rel_pos_w[self.rel_index_w]  # [qw, kw, head_dim]
        rq = q.reshape(-1, self.num_heads, qh, qw, self.head_dim)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, table_h)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, table_w)
        attn = attn.reshape(-1, self.num_heads, qh, qw, kh, kw)
        attn = attn + bias_h[:, :, :, :, :, None] + bias_w[:, :, :, :, None, :]
        return attn.reshape(-1, self.num_heads, qh * qw, kh * kw)


class MultiScaleBlock(nn.Module):
    """One MViTv2 block: pooling attention and an MLP, each with a pre-norm residual.

    Parameters
    ----------
    dim, dim_out : int
        Input and output channels.
    num_heads : int
        Attention heads.
    input_size : tuple of int
        (height, width) of the input token grid.
    q_stride, kv_stride : int
        Pooling strides.
    drop_path : float
        Stochastic depth probability of this block.
    cfg : MViTConfig
        The remaining choices (MLP ratio, pooling kernel, norms, ...).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_size: tuple[int, int],
        q_stride: int,
        kv_stride: int,
        drop_path: float,
        cfg: MViTConfig,
    ) -> None:
        super().__init__()
        self.dim_mul_in_att = cfg.dim_mul_in_att
        att_dim = dim_out if cfg.dim_mul_in_att else dim
        self.input_size = input_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = MultiScaleAttention(
            dim, att_dim, num_heads, input_size, q_stride, kv_stride, cfg.pool_kernel,
            cfg.qkv_bias, cfg.residual_pooling, cfg.rel_pos_spatial, cfg.layer_norm_eps,
        )
        self.output_size = self.attn.q_size
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(att_dim, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(att_dim, int(att_dim * cfg.mlp_ratio)),
            nn.GELU(),
            nn.Linear(int(att_dim * cfg.mlp_ratio), dim_out),
        )
        # Skip path: project where channels change, max-pool where queries are pooled.
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.pool_skip = (
            nn.MaxPool2d(q_stride + 1, q_stride, (q_stride + 1) // 2) if q_stride > 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [B, H*W, dim] tokens to [B, H'*W', dim_out] tokens (``output_size`` grid)."""
        x_norm = self.norm1(x)
        x_attn = self.attn(x_norm)
        if self.proj is not None and self.dim_mul_in_att:
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            height, width = self.input_size
            channels = x.shape[-1]
            x = x.transpose(1, 2).reshape(-1, channels, height, width)
            x = self.pool_skip(x).flatten(2).transpose(1, 2)
        x = x + self.drop_path(x_attn)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if self.proj is not None and not self.dim_mul_in_att:
            x = self.proj(x_norm)
        return x + self.drop_path(x_mlp)


class MViTv2(nn.Module):
    """MViTv2 backbone for images of one fixed size: feature maps at strides 4, 8, 16, 32.

    Parameters
    ----------
    cfg : MViTConfig
        Architecture (see :data:`MVIT_VARIANTS`).
    in_channels : int
        Input bands.
    img_size : int
        Height and width of the (square) input; must be divisible by 32.

    Attributes
    ----------
    out_channels : dict of str to int
        Channels of "s4", "s8", "s16", "s32".
    strides : dict of str to int
        Strides of the same maps (4, 8, 16, 32).

    Raises
    ------
    ValueError
        If ``img_size`` is not a positive multiple of 32 or ``in_channels`` < 1.
    """

    def __init__(self, cfg: MViTConfig, in_channels: int, img_size: int) -> None:
        super().__init__()
        if img_size <= 0 or img_size % 32:
            raise ValueError(f"MViTv2: img_size must be a positive multiple of 32, got {img_size}")
        if in_channels < 1:
            raise ValueError(f"MViTv2: in_channels must be >= 1, got {in_channels}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_channels = in_channels
        self.patch_embed = nn.Conv2d(
            in_channels, cfg.embed_dims[0], cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding
        )
        size = (img_size // cfg.patch_stride, img_size // cfg.patch_stride)
        self.stem_size = size
        total = sum(cfg.depths)
        drop_rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        self.blocks = nn.ModuleList()
        self.stage_ends: list[int] = []  # index of each stage's last block
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.out_sizes: dict[str, tuple[int, int]] = {}
        kv_stride = cfg.kv_stride
        dim = cfg.embed_dims[0]
        stride = cfg.patch_stride
        for stage, depth in enumerate(cfg.depths):
            for b in range(depth):
                q_stride = cfg.q_stride if (stage > 0 and b == 0) else 1
                kv_stride = max(kv_stride // q_stride, 1)
                stride *= q_stride
                if cfg.dim_mul_in_att:
                    dim_out = cfg.embed_dims[stage]
                    heads = cfg.num_heads[stage]
                else:
                    # MViTv1: the last block of a stage expands channels in its MLP.
                    last = b == depth - 1 and stage < 3
                    dim_out = cfg.embed_dims[stage + 1] if last else cfg.embed_dims[stage]
                    heads = cfg.num_heads[stage]
                block = MultiScaleBlock(
                    dim, dim_out, heads, size, q_stride, kv_stride, drop_rates[len(self.blocks)], cfg
                )
                self.blocks.append(block)
                dim, size = dim_out, block.output_size
            name = STAGE_NAMES[stage]
            self.stage_ends.append(len(self.blocks) - 1)
            self.out_channels[name] = dim
            self.strides[name] = stride
            self.out_sizes[name] = size
        self.norms = nn.ModuleDict(
            {name: nn.LayerNorm(ch, eps=cfg.layer_norm_eps) for name, ch in self.out_channels.items()}
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the four stage outputs.

        Parameters
        ----------
        x : Tensor
            [B, in_channels, img_size, img_size].

        Returns
        -------
        dict of str to Tensor
            "s4", "s8", "s16", "s32": [B, out_channels[name], img_size / stride, img_size / stride].

        Raises
        ------
        ValueError
            If the input's channels or spatial size differ from those given at construction.
        """
        # Skipped while tracing for ONNX: the traced shapes are symbolic, the check is not.
        expected = (self.in_channels, self.img_size, self.img_size)
        if not torch.jit.is_tracing() and (x.dim() != 4 or tuple(x.shape[1:]) != expected):
            raise ValueError(
                f"MViTv2: expected input [B, {self.in_channels}, {self.img_size}, {self.img_size}], "
                f"got {list(x.shape)}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        outputs: dict[str, torch.Tensor] = {}
        stage = 0
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.stage_ends[stage]:
                name = STAGE_NAMES[stage]
                height, width = self.out_sizes[name]
                y = self.norms[name](x)
                outputs[name] = y.transpose(1, 2).reshape(-1, self.out_channels[name], height, width)
                stage += 1
        return outputs


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (the MViT recipe)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
