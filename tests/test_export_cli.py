"""`rtsmap export` end to end through the real command: written once, never replaced without --overwrite."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rtsmap.models.config import build_config  # noqa: E402
from rtsmap.models.detector import RTSDetector  # noqa: E402
from rtsmap.models.train import save_weights  # noqa: E402
from rtsmap.pipeline.errors import OutputError  # noqa: E402
from rtsmap.workflows.cli import main  # noqa: E402


def _export(argv):
    with pytest.raises(SystemExit) as done:
        main(["export", *argv])
    return done.value.code


def test_export_writes_then_refuses_then_replaces_with_overwrite(tmp_path, capsys):
    torch.manual_seed(0)
    model = RTSDetector(build_config("demo", tile_size=64, fusion="none", modalities={"optical": ("blue", "green", "red", "nir")}))
    weights = tmp_path / "model.safetensors"
    save_weights(model, weights)
    out = tmp_path / "m.onnx"
    assert _export(["--checkpoint", str(weights), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert first[:2] != b"" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert _export(["--checkpoint", str(weights), "--out", str(out), "--score-threshold", "0.3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert _export(["--checkpoint", str(weights), "--out", str(out), "--score-threshold", "0.3", "--overwrite"]) == 0
    assert out.read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staged file left


def test_place_never_replaces_a_file_that_appeared(tmp_path):
    from rtsmap.workflows.model_commands import _place

    staged, target = tmp_path / ".staged.onnx", tmp_path / "m.onnx"
    staged.write_bytes(b"new")
    target.write_bytes(b"appeared meanwhile")
    with pytest.raises(OutputError, match="appeared while exporting"):
        _place(staged, target, overwrite=False)
    assert target.read_bytes() == b"appeared meanwhile"
