"""Fusion modules and the multimodal backbone: shapes, gradients, zero-gate equivalence, loading
unimodal checkpoints, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from rtsmap.models.backbone import FUSIONS, MultimodalBackbone, count_parameters  # noqa: E402
from rtsmap.models.fusion import AttentionFusion, ConvFusion, ResidualCrossModalityAttention  # noqa: E402
from rtsmap.models.mvit import MVIT_VARIANTS  # noqa: E402

torch.set_num_threads(1)
DEMO = MVIT_VARIANTS["demo"]
MODS = {"optical": 4, "sar": 2, "dem": 3}
SIZE = 64
FPN = 32


def _inputs(modalities, batch=2, size=SIZE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, c, size, size, generator=gen) for m, c in modalities.items()}


def _backbone(fusion, modalities=MODS, size=SIZE):
    torch.manual_seed(0)
    return MultimodalBackbone(modalities, DEMO, size, fusion, fpn_channels=FPN)


def _open_gates(model, value=0.5):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(value)


# --- fusion modules ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 5])
def test_fusion_modules_keep_the_shape(window):
    opt, sar, dem = (torch.randn(2, 16, 8, 8) for _ in range(3))
    for module in (
        ResidualCrossModalityAttention(16, 2, window),
        AttentionFusion(16, 2, window),
        ConvFusion(16),
    ):
        assert module(opt, [sar, dem]).shape == (2, 16, 8, 8)


def test_residual_attention_starts_as_identity_and_gate_learns():
    module = ResidualCrossModalityAttention(16, 2, 3)
    opt = torch.randn(2, 16, 8, 8)
    aux = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)]
    out = module(opt, aux)
    assert torch.equal(out, opt)
    out.square().sum().backward()
    # Zero gate: only the gate gets a gradient at step 0; the attention weights get none.
    assert module.gate.grad.abs().sum() > 0
    assert module.q.weight.grad.abs().sum() == 0
    with torch.no_grad():
        module.gate.fill_(1.0)
    assert not torch.allclose(module(opt, aux), opt)


def test_query_gate_starts_shut_and_can_open_per_position():
    module = ResidualCrossModalityAttention(16, 2, 3, gate="query")
    opt = torch.randn(2, 16, 8, 8)
    aux = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)]
    out = module(opt, aux)
    assert torch.equal(out, opt)
    out.square().sum().backward()
    assert module.gate_from_query.weight.grad.abs().sum() > 0
    # A gate that depends on the optical token lets the same weights add SAR at one pixel
    # (here: where the optical map is zero, as under cloud) and not at another.
    with torch.no_grad():
        module.gate_from_query.weight.copy_(-torch.eye(16))
        module.norm_q.bias.fill_(1.0)  # normalised all-zero token = the bias = 1 -> gate -1
    opt[:, :, :4] = 0.0
    with torch.no_grad():
        fused = module(opt, aux)
    assert not torch.allclose(fused[:, :, :4], opt[:, :, :4])
    with pytest.raises(ValueError, match="gate must be"):
        ResidualCrossModalityAttention(16, 2, 3, gate="pixel")


def test_attention_fusion_output_depends_on_the_auxiliary_maps():
    module = AttentionFusion(16, 2, 1).eval()
    opt = torch.randn(1, 16, 4, 4)
    a = module(opt, [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)])
    b = module(opt, [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)])
    assert not torch.allclose(a, b)


def test_fusion_refuses_wrong_number_of_maps():
    with pytest.raises(ValueError, match="expected 2 auxiliary maps"):
        ResidualCrossModalityAttention(16, 2, 1)(torch.randn(1, 16, 4, 4), [torch.randn(1, 16, 4, 4)])
    with pytest.raises(ValueError, match="not divisible"):
        AttentionFusion(16, 3, 1)
    with pytest.raises(ValueError, match="window must be odd"):
        AttentionFusion(16, 2, 2)


def test_attention_is_local_and_knows_where_each_key_is():
    """A query sees only auxiliary tokens within the window, and knows which offset each is at."""
    module = AttentionFusion(16, 2, 3).eval()
    opt = torch.randn(1, 16, 9, 9)
    aux = [torch.randn(1, 16, 9, 9), torch.randn(1, 16, 9, 9)]
    changed = [a.clone() for a in aux]
    changed[0][:, :, 8, 8] += 5.0  # far corner
    with torch.no_grad():
        a, b = module(opt, aux), module(opt, changed)
    diff = (a - b).abs().sum(dim=1)[0]
    assert diff[7:, 7:].min() > 0  # the corner's 3x3 neighbourhood sees it
    assert diff[:7].max() == 0 and diff[:, :7].max() == 0  # nothing else does
    # With a strong bias towards the centre key of the SAR modality, the output at a pixel
    # follows SAR at that pixel only: the attention can pick "SAR right here".
    with torch.no_grad():
        module.position_bias.zero_()
        module.position_bias[:, 4] = 50.0  # modality 0, offset (1, 1) = the query's own pixel
        c, d = module(opt, aux), module(opt, changed)
    diff = (c - d).abs().sum(dim=1)[0]
    assert diff[8, 8] > 0 and diff.sum() == pytest.approx(diff[8, 8].item(), rel=1e-3)


# --- backbone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_mode_forward_backward(fusion):
    modalities = {"optical": 4} if fusion == "none" else MODS
    model = _backbone(fusion, modalities).train()
    _open_gates(model)  # a closed gate would cut SAR/DEM off from the loss (tested below)
    out = model(_inputs(modalities))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert model.modalities == tuple(modalities) and model.out_channels == FPN
    for level, feat in out.items():
        side = SIZE // model.strides[level]
        assert feat.shape == (2, FPN, side, side), level
    # Random weights, not a plain sum: the sum of a LayerNorm's output over channels is a
    # constant, so a plain sum would give the attention fusion's inputs no gradient at all.
    gen = torch.Generator().manual_seed(1)
    sum((v * torch.randn(v.shape, generator=gen)).sum() for v in out.values()).backward()
    for branch, encoder in model.encoders.items():
        assert encoder.patch_embed.weight.grad.abs().sum() > 0, branch
    if fusion == "data_level":
        # The stem sees all 9 bands: every band's input weights get a gradient.
        grad = model.encoders["stacked"].patch_embed.weight.grad
        assert (grad.abs().sum(dim=(0, 2, 3)) > 0).all()
    if model.fusions is not None:
        for name, p in model.fusions.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_closed_gate_passes_gradient_to_the_gate_only():
    model = _backbone("residual_attention").train()
    out = model(_inputs(MODS))
    sum(v.sum() for v in out.values()).backward()
    for level, fusion in model.fusions.items():
        assert fusion.gate.grad.abs().sum() > 0, level
        assert fusion.kv.weight.grad.abs().sum() == 0, level
    assert model.encoders["optical"].patch_embed.weight.grad.abs().sum() > 0
    # SAR/DEM are in the graph (through gate * attention) but a zero gate zeroes their gradient.
    assert model.encoders["sar"].patch_embed.weight.grad.abs().sum() == 0


def test_zero_gate_model_equals_the_optical_model():
    unimodal = _backbone("none", {"optical": 4}).eval()
    fused = MultimodalBackbone(MODS, DEMO, SIZE, "residual_attention", fpn_channels=FPN).eval()
    result = fused.load_unimodal_state("optical", unimodal.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = _inputs(MODS, batch=2, seed=3)
    with torch.no_grad():
        expected = unimodal({"optical": x["optical"]})
        got = fused(x)
    for level in expected:
        assert torch.equal(got[level], expected[level]), level


def test_load_unimodal_state_prefix_mismatch_and_unknown_branch():
    fused = _backbone("conv")
    sar_model = _backbone("none", {"sar": 2})
    state = {f"backbone.{k}": v for k, v in sar_model.state_dict().items()}
    state["roi_heads.w"] = torch.zeros(1)  # outside the prefix: ignored
    state["backbone.fpns.optical.extra"] = torch.zeros(1)
    result = fused.load_unimodal_state("sar", state, prefix="backbone.")
    assert result.unexpected_keys == ["fpns.optical.extra"]
    assert result.missing_keys == []
    key = "encoders.sar.patch_embed.weight"
    assert torch.equal(fused.state_dict()[key], sar_model.state_dict()[key])
    # A SAR (2-band) checkpoint cannot go into the optical (4-band) branch.
    renamed = {k.replace(".sar.", ".optical."): v for k, v in sar_model.state_dict().items()}
    with pytest.raises(ValueError, match="patch_embed.weight.*shape"):
        fused.load_unimodal_state("optical", renamed)
    partial = {k: v for k, v in sar_model.state_dict().items() if k.startswith("encoders.")}
    assert fused.load_unimodal_state("sar", partial).missing_keys[0].startswith("fpns.sar.")
    with pytest.raises(ValueError, match="no 'optical' branch"):
        _backbone("conv", {"sar": 2, "dem": 3}).load_unimodal_state("optical", {})


def test_data_level_model_from_the_optical_checkpoint_equals_it():
    """The stacked stem gets the optical weights on the optical bands and zeros elsewhere."""
    unimodal = _backbone("none", {"optical": 4}).eval()
    stacked = MultimodalBackbone(MODS, DEMO, SIZE, "data_level", fpn_channels=FPN).eval()
    result = stacked.load_unimodal_state("optical", unimodal.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    stem = stacked.encoders["stacked"].patch_embed.weight
    assert torch.equal(stem[:, :4], unimodal.encoders["optical"].patch_embed.weight)
    assert stem[:, 4:].abs().sum() == 0
    x = _inputs(MODS, batch=2, seed=4)
    with torch.no_grad():
        expected = unimodal({"optical": x["optical"]})
        got = stacked(x)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=0, atol=1e-5)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="exactly one modality"):
        MultimodalBackbone(MODS, DEMO, SIZE, "none")
    with pytest.raises(ValueError, match="at least two"):
        MultimodalBackbone({"optical": 4}, DEMO, SIZE, "residual_attention")
    with pytest.raises(ValueError, match="unknown fusion"):
        MultimodalBackbone(MODS, DEMO, SIZE, "late")
    with pytest.raises(ValueError, match="lack modalities"):
        _backbone("conv")({"optical": torch.randn(1, 4, SIZE, SIZE)})


def test_parameter_counts_grow_with_the_branches():
    counts = {f: count_parameters(_backbone(f, {"optical": 4} if f == "none" else MODS)) for f in FUSIONS}
    # Data-level adds only stem weights for the extra bands; feature fusions triplicate the
    # encoder + FPN and add their fusion modules.
    assert counts["none"] < counts["data_level"] < 1.1 * counts["none"]
    assert counts["residual_attention"] > 3 * counts["none"]
    assert counts["attention"] - counts["residual_attention"] == 5 * (2 * FPN - FPN)  # norm_out vs gate
    model = _backbone("none", {"optical": 4})
    for p in model.fpns.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model.encoders)


class _Positional(torch.nn.Module):
    """Positional-tensor wrapper: one ONNX input per modality, one output per level."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, *tensors):
        return tuple(self.backbone(dict(zip(self.backbone.modalities, tensors))).values())


def test_residual_attention_backbone_exports_to_onnx(tmp_path):
    size = 128
    model = _backbone("residual_attention", size=size).eval()
    _open_gates(model)  # so the exported graph's fusion path is actually compared
    names_in, names_out = list(MODS), ["p2", "p3", "p4", "p5", "p6"]
    path = tmp_path / "backbone.onnx"
    torch.onnx.export(
        _Positional(model),
        tuple(_inputs(MODS, batch=1, size=size).values()),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names_in,
        output_names=names_out,
        dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = _inputs(MODS, batch=batch, size=size, seed=batch)
        with torch.no_grad():
            ref = model(x)
        got = session.run(names_out, {m: t.numpy() for m, t in x.items()})
        for name, value in zip(names_out, got):
            np.testing.assert_allclose(value, ref[name].numpy(), rtol=1e-4, atol=1e-4)


# --- missing modalities (presence) ------------------------------------------------------------------


def _presence(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("gate", ["channel", "query"])
def test_residual_fusion_with_sar_and_dem_absent_is_exactly_the_optical_map(gate):
    torch.manual_seed(1)
    fusion = ResidualCrossModalityAttention(16, 2, 3, 2, gate).eval()
    _open_gates(fusion)
    if fusion.gate_from_query is not None:
        torch.nn.init.normal_(fusion.gate_from_query.weight, std=0.5)
    opt, sar, dem = (torch.randn(2, 16, 8, 8) for _ in range(3))
    with torch.no_grad():
        out = fusion(opt, [sar, dem], _presence([1, 0, 0], [1, 1, 1]))
        full = fusion(opt, [sar, dem])
    assert torch.equal(out[0], opt[0])  # gate closed: bit for bit the optical path
    assert not torch.allclose(out[1], opt[1])  # the open gate does add SAR/DEM
    assert torch.equal(out[1], full[1])  # all present == no presence at all, bit for bit


def test_absent_modality_is_masked_out_of_the_attention():
    torch.manual_seed(2)
    for fusion in (ResidualCrossModalityAttention(16, 2, 3, 2), AttentionFusion(16, 2, 3, 2), ConvFusion(16, 2)):
        fusion.eval()
        _open_gates(fusion)
        opt, sar, dem = (torch.randn(1, 16, 8, 8) for _ in range(3))
        no_sar = _presence([1, 0, 1])
        with torch.no_grad():
            a = fusion(opt, [sar, dem], no_sar)
            b = fusion(opt, [torch.randn_like(sar) * 50, dem], no_sar)  # whatever SAR holds
            c = fusion(opt, [sar, torch.randn_like(dem)], no_sar)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=type(fusion).__name__)
        assert not torch.allclose(a, c, atol=1e-3), type(fusion).__name__  # DEM still counts


def test_residual_fusion_without_optical_leans_on_sar():
    torch.manual_seed(3)
    fusion = ResidualCrossModalityAttention(16, 2, 3, 2, "query").eval()
    _open_gates(fusion)
    opt, sar, dem = (torch.randn(1, 16, 8, 8) for _ in range(3))
    no_optical = _presence([0, 1, 1])
    with torch.no_grad():
        a = fusion(opt, [sar, dem], no_optical)
        b = fusion(torch.randn_like(opt) * 50, [sar, dem], no_optical)
        c = fusion(opt, [torch.randn_like(sar), dem], no_optical)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the optical map does not reach the output
    assert a.abs().sum() > 0 and not torch.allclose(a, c, atol=1e-3)  # SAR does


@pytest.mark.parametrize("fusion", ["residual_attention", "attention", "conv", "data_level"])
def test_backbone_presence_all_ones_changes_nothing_and_absent_inputs_are_ignored(fusion):
    model = _backbone(fusion).eval()
    _open_gates(model)
    x = _inputs(MODS, seed=5)
    with torch.no_grad():
        plain = model(x)
        ones = model(x, _presence([1, 1, 1], [1, 1, 1]))
        absent = model(x, _presence([1, 0, 1], [1, 1, 1]))
        other_sar = model({**x, "sar": torch.randn_like(x["sar"]) * 9}, _presence([1, 0, 1], [1, 1, 1]))
    for level in plain:
        assert torch.equal(plain[level], ones[level]), level
        torch.testing.assert_close(absent[level][0], other_sar[level][0], rtol=0, atol=1e-5)
        assert torch.equal(absent[level][1], plain[level][1]), level  # samples do not mix


def test_fused_model_with_sar_and_dem_absent_equals_its_optical_path():
    """The whole backbone with SAR and DEM absent equals the same backbone with its gates shut
    (the optical model's path), whatever the gates learned."""
    model = _backbone("residual_attention").eval()
    _open_gates(model, 0.7)
    x = _inputs(MODS, seed=6)
    with torch.no_grad():
        absent = model(x, _presence([1, 0, 0], [1, 0, 0]))
        _open_gates(model, 0.0)
        shut = model(x)
    for level in shut:
        assert torch.equal(absent[level], shut[level]), level


# --- the query_open gate ---------------------------------------------------------------------------


def test_query_open_gate_is_fully_open_where_optical_has_no_data_and_learned_elsewhere():
    fusion = ResidualCrossModalityAttention(16, 2, 3, 2, "query_open").eval()  # gate weights start at 0
    opt, sar, dem = (torch.randn(1, 16, 8, 8) for _ in range(3))
    valid = torch.ones(1, 1, 8, 8)
    valid[..., :4] = 0.0  # the western half under cloud
    with torch.no_grad():
        out = fusion(opt, [sar, dem], None, valid)
        attention = fusion.attend(fusion.query_tokens(opt), [sar, dem])
        no_mask = fusion(opt, [sar, dem])
        no_aux = fusion(opt, [sar, dem], _presence([1, 0, 0]), valid)
    assert torch.equal(out[..., 4:], opt[..., 4:])  # valid optical: the learned gate (still shut)
    torch.testing.assert_close(out[..., :4], opt[..., :4] + attention[..., :4])  # no optical: fully open
    assert torch.equal(no_mask, opt)  # without a validity map it is the query gate
    assert torch.equal(no_aux, opt)  # SAR and DEM absent: still exactly the optical path


def test_query_open_backbone_reads_missing_optical_off_the_zero_fill_and_exports_to_onnx(tmp_path):
    size = 128
    torch.manual_seed(0)
    model = MultimodalBackbone(MODS, DEMO, size, "residual_attention", fpn_channels=FPN, fusion_gate="query_open").eval()
    x = _inputs(MODS, batch=1, size=size, seed=7)
    cloudy = {**x, "optical": x["optical"].clone()}
    cloudy["optical"][..., :64] = 0.0  # the contract's fill: invalid pixels are zeros
    with torch.no_grad():
        clear_out, cloudy_out = model(x), model(cloudy)
        shut = MultimodalBackbone(MODS, DEMO, size, "residual_attention", fpn_channels=FPN, fusion_gate="query")
        shut.load_state_dict(model.state_dict())
        shut_out = shut.eval()(cloudy)
    # Gates at their initial 0: clear pixels are the optical model; under the fill SAR/DEM come in.
    assert torch.equal(clear_out["p3"], shut.eval()(x)["p3"])
    assert not torch.allclose(cloudy_out["p3"][..., :6], shut_out["p3"][..., :6])
    torch.testing.assert_close(cloudy_out["p3"][..., 10:], shut_out["p3"][..., 10:])
    names_out = ["p2", "p3", "p4", "p5", "p6"]
    path = tmp_path / "backbone.onnx"
    torch.onnx.export(_Positional(model), tuple(cloudy.values()), str(path), dynamo=False, opset_version=17,
                      input_names=list(MODS), output_names=names_out)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        names_out, {m: t.numpy() for m, t in cloudy.items()})
    for name, value in zip(names_out, got):
        np.testing.assert_allclose(value, cloudy_out[name].numpy(), rtol=1e-4, atol=1e-4)


def test_query_fill_starts_as_query_open_and_fills_only_where_optical_has_no_data():
    torch.manual_seed(4)
    fill = ResidualCrossModalityAttention(16, 2, 3, 2, "query_fill").eval()
    opened = ResidualCrossModalityAttention(16, 2, 3, 2, "query_open").eval()
    opened.load_state_dict({k: v for k, v in fill.state_dict().items() if not k.startswith("fill_from_aux")})
    opt, sar, dem = (torch.randn(1, 16, 8, 8) for _ in range(3))
    valid = torch.ones(1, 1, 8, 8)
    valid[..., :4] = 0.0
    with torch.no_grad():
        assert torch.equal(fill(opt, [sar, dem], None, valid), opened(opt, [sar, dem], None, valid))  # zero at start
        torch.nn.init.normal_(fill.fill_from_aux.weight, std=0.3)
        out, before = fill(opt, [sar, dem], None, valid), opened(opt, [sar, dem], None, valid)
        no_aux = fill(opt, [sar, dem], _presence([1, 0, 0]), valid)
    assert torch.equal(out[..., 4:], before[..., 4:])  # optical valid: untouched
    assert not torch.allclose(out[..., :4], before[..., :4])  # no optical: SAR/DEM filled in
    assert torch.equal(no_aux, opt)  # SAR and DEM absent: exactly the optical path
