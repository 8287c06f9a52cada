"""Worker images, checked without a Docker engine (none runs here): parse the files and check
that their install lines name extras that pyproject defines and the right runtime per image."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def install_extras(text: str) -> list[set[str]]:
    """The extras of every `pip install '.[a,b]'` line."""
    return [set(m.split(",")) for m in re.findall(r"pip install[^\n]*?'\.\[([a-z,]+)\]'", text)]


@pytest.mark.parametrize(
    "name, runtime, other",
    [("Dockerfile.gpu", "gpu", "cpu"), ("Dockerfile.cpu", "cpu", "gpu"), ("rtsmap.def", "gpu", "cpu")],
)
def test_image_installs_one_runtime(name, runtime, other):
    text = (ROOT / "docker" / name).read_text()
    lines = install_extras(text)
    assert lines, f"{name} installs rtsmap with no extras"
    for extras in lines:
        assert extras <= EXTRAS, f"{name} names extras pyproject lacks: {extras - EXTRAS}"
        assert runtime in extras and other not in extras, "exactly one onnxruntime package per image"
        assert "train" not in extras, "worker images carry no torch"


def instructions(text: str) -> list[str]:
    """Logical Dockerfile lines: comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [l.strip() for l in joined.splitlines() if l.strip()]


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_structure(name):
    lines = instructions((ROOT / "docker" / name).read_text())
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert lines[0].startswith("FROM ")
    assert all(l.split()[0] in known for l in lines), [l for l in lines if l.split()[0] not in known]
    for line in lines:
        if line.startswith("COPY "):
            src = line.split()[1:-1]
            assert all((ROOT / s).exists() for s in src), f"{name}: {line}"
    if name.endswith("gpu"):
        assert "nvidia/cuda" in lines[0] and "cudnn" in lines[0]
        assert any("CUDAExecutionProvider" in l for l in lines), "the GPU image checks its CUDA provider"


def test_apptainer_definition_sections():
    text = (ROOT / "docker" / "rtsmap.def").read_text()
    header = dict(
        line.split(":", 1) for line in text.splitlines() if re.match(r"^(Bootstrap|From):", line)
    )
    assert header["Bootstrap"].strip() == "docker"
    assert "nvidia/cuda" in header["From"]
    for section in ("%files", "%post", "%environment", "%runscript", "%test"):
        assert re.search(rf"^{section}\b", text, re.M), section
    for src in re.findall(r"^\s+(\S+) /src/", text, re.M):
        assert (ROOT / src).exists(), src
