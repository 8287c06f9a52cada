"""ONNX export of the detector: contract metadata, dynamic batch, parity with PyTorch.

Real exports (TorchScript exporter) run with real onnxruntime CPU sessions and are
compared with the eager model on fresh random inputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rtsmap import contract
from rtsmap.models.config import ModelConfig, build_config
from rtsmap.models.detector import RTSDetector
from rtsmap.models.export import METADATA_FORMAT, OUTPUT_NAMES, export_onnx, read_model_metadata, weights_sha256

torch.set_num_threads(1)

CONTRACT_KEYS = {
    "format", "name", "version", "fusion", "modalities", "bands", "normalization", "tile_size",
    "resolution", "max_detections", "score_threshold", "mask_threshold", "classes",
    "weights_sha256", "trained_on", "config",
}  # fmt: skip


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_inputs(cfg: ModelConfig, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = cfg.tile_size
    return {m: torch.randn(batch, c, t, t, generator=gen) for m, c in cfg.in_channels.items()}


def _assert_parity(
    model: RTSDetector, session: ort.InferenceSession, inputs: dict[str, torch.Tensor], presence: torch.Tensor | None = None
) -> int:
    """Eager and ORT agree on every output; returns the number of detections."""
    with torch.no_grad():
        eager = model(inputs, presence=presence)
    batch = next(iter(inputs.values())).shape[0]
    feed = {m: x.numpy() for m, x in inputs.items()}
    feed[contract.PRESENCE_INPUT] = (torch.ones(batch, len(inputs)) if presence is None else presence).numpy()
    got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feed)))
    np.testing.assert_array_equal(got["num_detections"], eager["num_detections"].numpy())
    np.testing.assert_allclose(got["boxes"], eager["boxes"].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["scores"], eager["scores"].numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["masks"], eager["masks"].numpy(), rtol=0, atol=1e-3)
    batch = next(iter(inputs.values())).shape[0]
    k = model.config.max_detections
    assert got["boxes"].shape == (batch, k, 4) and got["masks"].shape == (batch, k, 28, 28)
    assert got["num_detections"].dtype == np.int64 and got["scores"].dtype == np.float32
    return int(got["num_detections"].sum())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model (residual attention, 128 px) with score threshold 0 so it detects, declared
    trained with dropout of every modality (all seven subsets), its fusion gates open so that
    SAR and DEM change the outputs."""
    torch.manual_seed(0)
    subsets = contract.modality_subsets(("optical", "sar", "dem"), {"optical": 0.1, "sar": 0.1, "dem": 0.1})
    cfg = build_config("demo", tile_size=128, fusion="residual_attention", candidate_score_threshold=0.0,
                       modality_subsets=subsets)
    model = RTSDetector(cfg).eval()
    with torch.no_grad():
        for fusion in model.backbone.fusions.values():
            fusion.gate.fill_(0.5)
    path = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    meta = export_onnx(model, cfg, path, trained_on="random init (test)", metadata_extra={"note": "test"})
    return model, cfg, path, meta


@pytest.fixture(scope="module")
def demo_session(demo):
    return _session(demo[2])


def test_metadata_follows_the_contract(demo):
    model, cfg, path, meta = demo
    stored = read_model_metadata(path)
    assert stored == meta
    assert CONTRACT_KEYS <= set(stored) and stored["note"] == "test" and stored["exported_at"]
    assert stored["format"] == METADATA_FORMAT
    assert stored["modalities"] == ["optical", "sar", "dem"]
    assert stored["bands"]["dem"] == ["slope", "hillshade", "relative_elevation"]
    assert stored["normalization"]["sar"] == {"mean": list(cfg.normalization["sar"]["mean"]),
                                             "std": list(cfg.normalization["sar"]["std"])}  # fmt: skip
    assert stored["tile_size"] == 128 and stored["max_detections"] == cfg.max_detections
    assert stored["classes"] == ["rts"] and stored["fusion"] == "residual_attention"
    assert stored["trained_on"] == "random init (test)"
    assert stored["weights_sha256"] == weights_sha256(model) and len(stored["weights_sha256"]) == 64
    assert ModelConfig.from_dict(stored["config"]) == cfg
    onnx.checker.check_model(onnx.load(str(path)))


def test_graph_inputs_and_outputs(demo, demo_session):
    _, cfg, _, _ = demo
    session = demo_session
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == [*cfg.modalities, "presence"]
    for i, c in zip(inputs, cfg.in_channels.values()):
        assert isinstance(i.shape[0], str) and i.shape[1:] == [c, 128, 128] and i.type == "tensor(float)"
    assert isinstance(inputs[-1].shape[0], str) and inputs[-1].shape[1:] == [3] and inputs[-1].type == "tensor(float)"
    outputs = {o.name: o for o in session.get_outputs()}
    assert list(outputs) == list(OUTPUT_NAMES)
    assert outputs["num_detections"].type == "tensor(int64)"
    assert outputs["masks"].shape[1:] == [cfg.max_detections, 28, 28]
    assert all(isinstance(o.shape[0], str) for o in outputs.values())


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(demo, demo_session, batch):
    model, cfg, _, _ = demo
    detections = _assert_parity(model, demo_session, _random_inputs(cfg, batch, seed=10 + batch))
    assert detections > 0  # the comparison covers real detections, not only padding


def test_onnxruntime_matches_pytorch_without_detections(demo, tmp_path):
    """Same weights, threshold 1: nothing passes, every output is padding in both runtimes."""
    model, cfg, _, _ = demo
    strict = RTSDetector(build_config("demo", tile_size=128, fusion="residual_attention", candidate_score_threshold=1.0))
    strict.load_state_dict(model.state_dict())
    strict.eval()
    path = tmp_path / "strict.onnx"
    export_onnx(strict, strict.config, path)
    session = _session(path)
    inputs = _random_inputs(cfg, 2, seed=5)
    inputs["optical"][1] = 0.0  # an all-zero tile too
    assert _assert_parity(strict, session, inputs) == 0
    # Exported without modality dropout: the file lists only the full set, and the pipeline
    # refuses to run it with a modality absent.
    from rtsmap.pipeline.errors import ModelError
    from rtsmap.pipeline.infer import load_model

    assert read_model_metadata(path)["modality_subsets"] == [["optical", "sar", "dem"]]
    detector = load_model(path)
    assert detector.info.modality_subsets == (("optical", "sar", "dem"),) and detector.info.has_presence_input
    with pytest.raises(ModelError, match=r"cannot run with modalities \['optical', 'dem'\].*trained for"):
        detector.predict({m: x.numpy() for m, x in inputs.items()}, presence=[1, 0, 1])


def test_export_refuses_bad_arguments(demo, tmp_path):
    model, cfg, _, _ = demo
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, cfg, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="config"):
        export_onnx(model, build_config("demo"), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="weights_sha256"):
        export_onnx(model, cfg, tmp_path / "m.onnx", metadata_extra={"weights_sha256": "x"})
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="rtsmap"):
        read_model_metadata(_write_plain_onnx(tmp_path / "plain.onnx"))


def test_exported_file_is_read_by_the_pipeline_through_the_contract(demo):
    """export writes what pipeline.model_file reads: the contract's names and format version."""
    from rtsmap.pipeline.model_file import read_model_info

    _, cfg, path, meta = demo
    assert METADATA_FORMAT == contract.MODEL_FORMAT and OUTPUT_NAMES == contract.OUTPUT_NAMES
    info = read_model_info(path)
    assert info.metadata == meta and info.output_names == contract.OUTPUT_NAMES
    assert info.input_names == contract.input_names(cfg.modalities, presence=True)
    assert info.normalization["sar"].mean == tuple(cfg.normalization["sar"]["mean"])
    assert info.format == contract.MODEL_FORMAT == "rtsmap-model/2"
    assert info.modality_subsets == cfg.modality_subsets and len(info.modality_subsets) == 7


def test_read_model_metadata_accepts_both_formats_and_refuses_others(tmp_path, v1_model):
    demo_model = Path(__file__).resolve().parents[1] / "workflows" / "assets" / "demo_model.onnx"
    assert read_model_metadata(demo_model)["format"] in contract.READABLE_MODEL_FORMATS
    assert read_model_metadata(v1_model)["format"] == contract.MODEL_FORMAT_V1
    proto = onnx.load(str(_write_plain_onnx(tmp_path / "plain.onnx")))
    entry = proto.metadata_props.add()
    entry.key, entry.value = contract.METADATA_KEY, json.dumps({"format": "rtsmap-model/0"})
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(ValueError, match="rtsmap-model/0"):
        read_model_metadata(tmp_path / "old.onnx")


@pytest.mark.parametrize("absent", ["sar", "optical", "sar+dem"])
def test_onnxruntime_matches_pytorch_with_modalities_absent(demo, absent):
    """Through the pipeline's Detector: absent modalities fed as zeros with presence 0, every
    output as the eager model's; the second tile of the batch has every modality."""
    from rtsmap.pipeline.infer import load_model

    model, cfg, path, _ = demo
    detector = load_model(path, intra_op_threads=1)
    mods = list(cfg.modalities)
    row = [0.0 if m in absent.split("+") else 1.0 for m in mods]
    presence = torch.tensor([row, [1.0, 1.0, 1.0]])
    inputs = _random_inputs(cfg, 2, seed=21)
    filled = {m: x * presence[:, i, None, None, None] for i, (m, x) in enumerate(inputs.items())}
    with torch.no_grad():
        eager = model(filled, presence=presence)
        full = model(inputs)
    # The pipeline zero-fills the absent modality itself: the random values given must not count.
    got = detector.predict({m: x.numpy() for m, x in inputs.items()}, presence=presence.numpy())
    np.testing.assert_array_equal(got["num_detections"], eager["num_detections"].numpy())
    np.testing.assert_allclose(got["scores"], eager["scores"].numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["boxes"], eager["boxes"].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["masks"], eager["masks"].numpy(), rtol=0, atol=1e-3)
    assert got["num_detections"][0] > 0
    # The absence changed the first tile and not the second.
    assert not np.allclose(got["scores"][0], full["scores"][0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["scores"][1], full["scores"][1].numpy(), rtol=1e-3, atol=1e-5)


def _write_plain_onnx(path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])]
    )
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


@pytest.mark.slow
def test_a_one_modality_model_keeps_the_presence_input(tmp_path):
    """The tracer drops ``presence`` where no layer reads it (a unimodal model); the exporter
    declares it again, so the pipeline reads and feeds every format 2 file alike."""
    from rtsmap.pipeline.infer import load_model

    torch.manual_seed(0)
    cfg = build_config("demo", tile_size=128, fusion="none", modalities={"sar": ("vv", "vh")})
    path = tmp_path / "sar.onnx"
    export_onnx(RTSDetector(cfg).eval(), cfg, path)
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["sar", contract.PRESENCE_INPUT]
    detector = load_model(path, intra_op_threads=1)
    assert detector.info.has_presence_input and detector.info.modalities == ("sar",)
    out = detector.predict({"sar": np.zeros((2, 2, 128, 128), np.float32)})
    assert out["boxes"].shape == (2, cfg.max_detections, 4)


def test_tiny_exports_at_512_and_matches_pytorch(tmp_path):
    """The production variant (MViTv2-T, 512 px, FPN 256) exports and keeps parity."""
    torch.manual_seed(0)
    cfg = build_config("tiny", candidate_score_threshold=0.0)
    model = RTSDetector(cfg).eval()
    start = time.perf_counter()
    export_onnx(model, cfg, tmp_path / "tiny.onnx")
    print(f"tiny export: {time.perf_counter() - start:.1f} s")
    session = _session(tmp_path / "tiny.onnx")
    assert _assert_parity(model, session, _random_inputs(cfg, 2, seed=7)) > 0
