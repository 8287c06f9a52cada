"""The optimized-graph cache (pipeline/graph_cache.py) with real onnxruntime sessions of the shipped model."""

from __future__ import annotations

import numpy as np
import pytest

from rtsmap.pipeline import graph_cache
from rtsmap.pipeline.infer import load_model
from rtsmap.workflows.config import DEMO_MODEL


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(folder))
    return folder


def graphs(folder):
    return sorted((folder / "onnx-graphs").glob("*.onnx")) if (folder / "onnx-graphs").is_dir() else []


def batch(detector, size=2, seed=0):
    rng = np.random.default_rng(seed)
    t = detector.info.tile_size
    return {m: rng.standard_normal((size, len(detector.info.bands[m]), t, t)).astype(np.float32)
            for m in detector.info.modalities}


def test_second_session_opens_the_kept_graph_with_the_same_outputs(cache):
    first = load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    assert first.graph is None  # optimized as it opened, and the graph kept
    kept = graphs(cache)
    assert len(kept) == 1 and kept[0].stat().st_size > 0
    assert not [p for p in (cache / "onnx-graphs").iterdir() if p.suffix == ".tmp"]
    second = load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    assert second.graph == kept[0]
    assert second.info == first.info  # the metadata and the signature survive the optimized graph
    x = batch(first)
    a, b = first.predict(x), second.predict(x)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_damaged_graph_is_replaced(cache):
    load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    (kept,) = graphs(cache)
    kept.write_bytes(b"not an onnx graph")
    detector = load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    assert detector.graph is None  # opened from the model file again
    assert kept.stat().st_size > 1000  # and the graph written anew
    assert load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1).graph == kept


def test_cache_off_or_unwritable_changes_nothing_but_time(tmp_path, monkeypatch):
    monkeypatch.setenv(graph_cache.CACHE_ENV, "none")
    assert graph_cache.cache_root() is None
    assert load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1).graph is None
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(blocker / "cache"))  # its parent is a file
    detector = load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    assert detector.graph is None and detector.info.modalities
    assert blocker.read_text() == "x"


def test_the_key_follows_model_version_and_providers(cache, monkeypatch):
    path = graph_cache.graph_path("a" * 64, ["CPUExecutionProvider"], "1.20.0")
    assert path.parent == cache / "onnx-graphs" and path.name.startswith("a" * 16)
    assert graph_cache.graph_path("b" * 64, ["CPUExecutionProvider"], "1.20.0") != path
    assert graph_cache.graph_path("a" * 64, ["CPUExecutionProvider"], "1.21.0") != path
    # A GPU provider's graph is that provider's: never kept.
    assert graph_cache.graph_path("a" * 64, ["CUDAExecutionProvider", "CPUExecutionProvider"], "1.20.0") is None
    monkeypatch.delenv(graph_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent / "xdg"))
    assert graph_cache.cache_root() == cache.parent / "xdg" / "rtsmap"


def test_a_graph_that_cannot_be_saved_costs_only_the_time(cache, monkeypatch, tmp_path):
    # onnxruntime fails the session when it cannot write the optimized graph (a full disk): the
    # model opens anyway, and nothing is kept.
    monkeypatch.setattr(graph_cache, "staging_path", lambda target: tmp_path / "no-such-folder" / "graph.onnx")
    detector = load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    assert detector.graph is None and detector.info.modalities
    assert graphs(cache) == []


def test_plan_time_reads_the_kept_graph_or_the_file(cache):
    from rtsmap.pipeline.model_file import read_model_info

    from_file = read_model_info(DEMO_MODEL)  # nothing kept yet
    load_model(DEMO_MODEL, providers=("cpu",), intra_op_threads=1)
    (kept,) = graphs(cache)
    assert read_model_info(DEMO_MODEL) == from_file
    kept.write_bytes(b"damaged")
    assert read_model_info(DEMO_MODEL) == from_file
