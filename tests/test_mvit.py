"""MViTv2 backbone: size, shapes, relative positions, gradients and ONNX export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from rtsmap.models.mvit import MVIT_VARIANTS, MViTv2, _rel_pos_index  # noqa: E402

torch.set_num_threads(1)
DEMO = MVIT_VARIANTS["demo"]


def _randomize_rel_pos(model: torch.nn.Module) -> None:
    """Relative position tables start at zero; give them values so they affect the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_tiny_has_the_papers_parameter_count():
    model = MViTv2(MVIT_VARIANTS["tiny"], in_channels=3, img_size=512)
    n = sum(p.numel() for p in model.parameters())
    # MViTv2-T: 24.2M with its 0.77M ImageNet head, i.e. 23.4M without it.
    assert abs(n - 23.4e6) / 23.4e6 < 0.03, n
    assert model.out_channels == {"s4": 96, "s8": 192, "s16": 384, "s32": 768}
    assert not any("head" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("batch", [1, 2])
def test_demo_output_shapes_and_strides(batch):
    model = MViTv2(DEMO, in_channels=5, img_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 5, 64, 64))
    assert list(out) == ["s4", "s8", "s16", "s32"]
    assert model.strides == {"s4": 4, "s8": 8, "s16": 16, "s32": 32}
    for name, feat in out.items():
        side = 64 // model.strides[name]
        assert feat.shape == (batch, model.out_channels[name], side, side)
        assert torch.isfinite(feat).all()


def test_adaptive_kv_stride_and_channel_expansion_follow_mvitv2():
    model = MViTv2(MVIT_VARIANTS["tiny"], in_channels=3, img_size=256)
    # (q_stride, kv_stride, dim in, dim out) per block: q pooled and channels doubled in the
    # first block of stages 2-4; kv stride 4 at stage 1, divided by 2 at each stage change.
    got = [
        (b.attn.pool_q.stride[0], b.attn.pool_k.stride[0], b.norm1.normalized_shape[0], b.attn.dim_out)
        for b in model.blocks
    ]
    assert got == [
        (1, 4, 96, 96),
        (2, 2, 96, 192), (1, 2, 192, 192),
        (2, 1, 192, 384), (1, 1, 384, 384), (1, 1, 384, 384), (1, 1, 384, 384), (1, 1, 384, 384),
        (2, 1, 384, 768), (1, 1, 768, 768),
    ]
    # Stage 1 at 256 px: 64x64 queries attend to 16x16 pooled keys.
    assert model.blocks[0].attn.q_size == (64, 64) and model.blocks[0].attn.kv_size == (16, 16)


def test_rel_pos_index_compares_grids_on_the_finer_scale():
    # Same size: plain offset q - k shifted to start at 0.
    assert _rel_pos_index(3, 3).tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]
    # Keys pooled by 2: key j sits at position 2j of the query grid.
    assert _rel_pos_index(4, 2).tolist() == [[2, 0], [3, 1], [4, 2], [5, 3]]
    assert _rel_pos_index(4, 2).max() < 2 * 4 - 1


def test_relative_positions_change_the_output():
    model = MViTv2(DEMO, in_channels=3, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["s32"]
        _randomize_rel_pos(model)
        after = model(x)["s32"]
    assert not torch.allclose(before, after)


def test_mvitv1_style_channel_expansion_in_mlp():
    cfg = dataclasses.replace(DEMO, dim_mul_in_att=False)
    model = MViTv2(cfg, in_channels=3, img_size=64)
    # The last block of each stage expands channels in its MLP, so stage outputs carry the
    # next stage's width.
    assert model.out_channels == {"s4": 64, "s8": 128, "s16": 256, "s32": 256}
    out = model(torch.randn(1, 3, 64, 64))
    assert out["s4"].shape == (1, 64, 16, 16)


def test_gradients_reach_stem_and_rel_pos_tables():
    cfg = dataclasses.replace(DEMO, drop_path_rate=0.2)
    model = MViTv2(cfg, in_channels=3, img_size=64).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


def test_wrong_input_size_is_refused():
    model = MViTv2(DEMO, in_channels=3, img_size=64)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="multiple of 32"):
        MViTv2(DEMO, in_channels=3, img_size=100)


def test_onnx_export_with_dynamic_batch_matches_eager(tmp_path):
    model = MViTv2(DEMO, in_channels=4, img_size=128).eval()
    _randomize_rel_pos(model)
    names = list(model.out_channels)
    path = tmp_path / "mvit.onnx"
    # The TorchScript exporter (dynamo=False) still exists in torch 2.14 (deprecated) and takes
    # ~0.5 s here; dynamo=True also works (opset 18 converted down to 17) but takes ~11 s.
    torch.onnx.export(
        model,
        (torch.randn(1, 4, 128, 128),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=names,
        dynamic_axes={"x": {0: "batch"}, **{n: {0: "batch"} for n in names}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 4, 128, 128)
        with torch.no_grad():
            ref = model(x)
        got = session.run(names, {"x": x.numpy()})
        for name, value in zip(names, got):
            assert value.shape == tuple(ref[name].shape)
            np.testing.assert_allclose(value, ref[name].numpy(), rtol=1e-4, atol=1e-4)
