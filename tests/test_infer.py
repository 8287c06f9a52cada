"""Model file checks, provider checks, mask pasting and chunk inference with real ORT sessions."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtsmap.pipeline.errors import ModelError
from rtsmap.pipeline.grid import GridSpec, chunk_by_id
from rtsmap.pipeline.infer import Detector, check_providers, infer_chunk, load_model, paste_mask
from rtsmap.pipeline.load import ChunkStack
from rtsmap.pipeline.model_file import check_compatible, read_model_info
from onnx_models import (
    BANDS,
    MASK_SIZE,
    ConstantDetection,
    label_score,
    make_constant_detector,
    make_label_detector,
    model_metadata,
)

# 2x2 tiles of 64 px overlapping by 8: the chunk read window is 120 x 120 px.
SPEC = GridSpec(crs="EPSG:3413", resolution=10.0, tile_px=64, overlap_px=8, tiles_per_chunk=2)
CHUNK = chunk_by_id(SPEC.chunk_id(3, -5), SPEC)
T = SPEC.tile_px


def make_stack(fill: float = 0.0, valid: bool = True, modalities=("optical", "sar", "dem")) -> ChunkStack:
    h, w = CHUNK.shape
    return ChunkStack(
        chunk_id=CHUNK.id,
        year=2022,
        transform=CHUNK.transform,
        crs=SPEC.crs,
        shape=(h, w),
        data={m: np.full((len(BANDS[m]), h, w), fill, np.float32) for m in modalities},
        valid={m: np.full((h, w), valid, bool) for m in modalities},
        item_ids={m: [f"{m}-item"] for m in modalities},
        band_names={m: tuple(BANDS[m]) for m in modalities},
    )


@pytest.fixture
def meta():
    return model_metadata(tile_size=T, max_detections=4)


def count_predict_calls(detector: Detector) -> list[int]:
    """Wrap the real session's predict to record each batch's size."""
    sizes = []
    real = detector.predict

    def predict(batch):
        sizes.append(next(iter(batch.values())).shape[0])
        return real(batch)

    detector.predict = predict
    return sizes


# --- the model file ---------------------------------------------------------------------------


def test_load_model_reads_metadata_and_signature(tmp_path, meta):
    path = make_constant_detector(tmp_path / "m.onnx", [ConstantDetection((1, 2, 9, 7), 0.9)], meta)
    det = load_model(path)
    info = det.info
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.modalities == ("optical", "sar", "dem")
    assert info.bands["dem"] == ("slope", "hillshade", "relative_elevation")
    assert info.tile_size == T and info.max_detections == 4 and info.resolution == 10.0
    assert info.input_names == ("optical", "sar", "dem")
    assert info.input_shapes["sar"][1:] == (2, T, T)
    assert set(info.output_names) == {"boxes", "scores", "masks", "num_detections"}
    assert det.providers == ("CPUExecutionProvider",)
    assert read_model_info(path) == info


@pytest.mark.parametrize(
    "metadata, expected",
    [
        (None, "no 'rtsmap' metadata"),
        ("{not json", "not valid JSON"),
        ({"format": "rtsmap-model/0"}, "rtsmap-model/1"),
        ("__bad_std__", "normalization.optical.std"),
        ("__bad_tile__", "'tile_size' must be a positive integer"),
    ],
)
def test_bad_metadata_is_a_model_error(tmp_path, meta, metadata, expected):
    graph_meta = meta
    if metadata == "__bad_std__":
        metadata = dict(meta, normalization=dict(meta["normalization"], optical={"mean": [0] * 4, "std": [1, 1, 0, 1]}))
    elif metadata == "__bad_tile__":
        metadata = dict(meta, tile_size="64")
    path = make_constant_detector(tmp_path / "m.onnx", [], metadata, graph_metadata=graph_meta)
    with pytest.raises(ModelError, match=expected):
        load_model(path)


def test_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf")
    with pytest.raises(ModelError, match="cannot be loaded by onnxruntime"):
        load_model(junk)


def test_graph_that_does_not_match_its_metadata(tmp_path, meta):
    # The graph's optical input has 3 channels and tile 32, the metadata says 4 bands, tile 64.
    path = make_constant_detector(tmp_path / "m.onnx", [], meta, input_shapes={"optical": ["batch", 3, 32, 32]})
    with pytest.raises(ModelError, match=r"input 'optical' has shape \['batch', 3, 32, 32\]"):
        load_model(path)
    # A graph without the sar input its metadata promises.
    meta_two = model_metadata(modalities=("optical", "dem"), tile_size=T, max_detections=4)
    path = make_constant_detector(tmp_path / "m2.onnx", [], meta, graph_metadata=meta_two)
    with pytest.raises(ModelError, match="inputs are"):
        load_model(path)


def test_onnxruntime_missing(tmp_path, meta, monkeypatch):
    # Stand-in for an environment without onnxruntime: a None entry in sys.modules makes the
    # import fail exactly as if the package were not installed.
    path = make_constant_detector(tmp_path / "m.onnx", [], meta)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r"install rtsmap\[cpu\] or rtsmap\[gpu\]"):
        load_model(path)


# --- execution providers ------------------------------------------------------------------------
# No GPU can run here: this onnxruntime is the CPU build, so asking for CUDA exercises the
# "provider not available" path for real; the "fell back silently" path (onnxruntime-gpu without
# CUDA libraries) is checked on check_providers with the lists such a session reports.


def test_asking_for_cuda_without_it(tmp_path, meta, caplog):
    path = make_constant_detector(tmp_path / "m.onnx", [], meta)
    with pytest.raises(ModelError, match="CUDAExecutionProvider"):
        load_model(path, providers=("cuda", "cpu"))
    with caplog.at_level(logging.WARNING, logger="rtsmap.pipeline.infer"):
        det = load_model(path, providers=("cuda", "cpu"), require_gpu=False)
    assert det.providers == ("CPUExecutionProvider",)
    assert "CUDAExecutionProvider" in caplog.text
    with pytest.raises(ModelError, match="unknown execution provider 'tpu'"):
        load_model(path, providers=("tpu",))


def test_silent_cpu_fallback_is_caught(caplog):
    asked = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    in_use = ["CPUExecutionProvider"]  # what get_providers() says after a silent fallback
    with pytest.raises(ModelError, match="fell back silently"):
        check_providers(asked, available, in_use, require_gpu=True)
    with caplog.at_level(logging.WARNING, logger="rtsmap.pipeline.infer"):
        kept = check_providers(asked, available, in_use, require_gpu=False)
    assert kept == ["CPUExecutionProvider"] and "TensorrtExecutionProvider" in caplog.text
    assert check_providers(asked, available, available, require_gpu=True) == asked


# --- model vs data -------------------------------------------------------------------------------


def test_check_compatible_lists_every_difference(tmp_path, meta):
    info = load_model(make_constant_detector(tmp_path / "m.onnx", [], meta)).info
    check_compatible(info, BANDS, 10.0, T)  # matches: no error
    data_bands = {"optical": ["blue", "green", "red"], "dem": BANDS["dem"], "extra": ["x"]}
    with pytest.raises(ModelError) as err:
        check_compatible(info, data_bands, 20.0, 256)
    message = str(err.value)
    assert "'optical' bands: model ['blue', 'green', 'red', 'nir'], data ['blue', 'green', 'red']" in message
    assert "modality 'sar' (bands vv, vh) is needed" in message
    assert "resolution: model 10, data grid 20" in message
    assert "tile size: model 64 px, data grid 256 px" in message
    assert "extra" not in message  # data the model does not use is fine


@pytest.mark.parametrize("optical", [
    ["blue", "green", "nir", "red"],  # same bands, red and nir swapped
    ["blue", "green", "red", "swir16"],  # same count, another band
])
def test_check_compatible_refuses_bands_out_of_order_or_renamed(tmp_path, meta, optical):
    """Band count alone is not enough: the model's bands must be the data's, in the same order."""
    info = load_model(make_constant_detector(tmp_path / "m.onnx", [], meta)).info
    with pytest.raises(ModelError) as err:
        check_compatible(info, {**BANDS, "optical": optical}, 10.0, T)
    assert f"'optical' bands: model ['blue', 'green', 'red', 'nir'], data {optical}" in str(err.value)
    assert "'sar'" not in str(err.value) and "'dem'" not in str(err.value)


def test_stack_with_swapped_band_names_is_refused(tmp_path, meta):
    """A chunk whose loader wrote the optical bands in another order never reaches the model."""
    det = load_model(make_constant_detector(tmp_path / "m.onnx", [], meta))
    stack = make_stack()
    stack.band_names["optical"] = ("blue", "green", "nir", "red")
    with pytest.raises(ModelError, match=r"'optical' bands are \['blue', 'green', 'nir', 'red'\]"):
        infer_chunk(det, stack, CHUNK.tiles)


def test_stack_with_wrong_band_count(tmp_path, meta):
    det = load_model(make_constant_detector(tmp_path / "m.onnx", [], meta))
    stack = make_stack()
    stack.data["sar"] = stack.data["sar"][:1]
    with pytest.raises(ModelError, match="'sar' has 1 bands, the model takes 2"):
        infer_chunk(det, stack, CHUNK.tiles)


# --- pasting -------------------------------------------------------------------------------------


def test_full_mask_fills_an_odd_box():
    ones = np.ones((MASK_SIZE, MASK_SIZE), np.float32)
    prob, offset = paste_mask(ones, (10.0, 20.0, 17.0, 25.0), 64, 64)
    assert offset == (20, 10) and prob.shape == (5, 7)
    assert np.allclose(prob, 1.0)
    # Fractional edges: pixels whose centres lie inside the box.
    prob, offset = paste_mask(ones, (10.4, 20.6, 16.6, 25.4), 64, 64)
    assert offset == (21, 10) and prob.shape == (4, 7)
    # Clipped at the image edge.
    prob, offset = paste_mask(ones, (-3.0, 60.0, 5.0, 70.0), 64, 64)
    assert offset == (60, 0) and prob.shape == (4, 5)
    # Degenerate box: nothing.
    assert paste_mask(ones, (5, 5, 5, 9), 64, 64)[0].size == 0


def test_pasted_half_mask_keeps_its_half():
    half = np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
    half[:, : MASK_SIZE // 2] = 1.0  # left half
    prob, _ = paste_mask(half, (0, 0, 42, 42), 64, 64)
    inside = prob >= 0.5
    assert inside.shape == (42, 42)
    assert inside[:, :21].all() and not inside[:, 21:].any()
    # Interpolated, not nearest: the values fall from 1 to 0 across the edge.
    assert 0.0 < prob[0, 20] < 1.0 or 0.0 < prob[0, 21] < 1.0


# --- chunk inference ------------------------------------------------------------------------------


def test_constant_detector_over_a_chunk(tmp_path, meta):
    low = ConstantDetection((30, 30, 40, 40), 0.3)  # below the 0.5 score threshold
    empty = ConstantDetection((0, 0, 8, 8), 0.8, mask=np.zeros((MASK_SIZE, MASK_SIZE), np.float32))
    dets = [ConstantDetection((4.0, 6.0, 15.0, 11.0), 0.9), empty, low]
    det = load_model(make_constant_detector(tmp_path / "m.onnx", dets, meta))
    sizes = count_predict_calls(det)
    result = infer_chunk(det, make_stack(), CHUNK.tiles, batch_size=3)
    assert sizes == [3, 1]
    assert [r.tile_id for r in result] == [t.id for t in CHUNK.tiles]
    assert len(CHUNK.tiles) == 4
    for tile, found in zip(CHUNK.tiles, result):
        row0, col0 = tile.offset
        assert found.chunk_id == CHUNK.id and not found.skipped
        assert len(found) == 1  # the empty mask and the low score are dropped
        assert found.scores[0] == pytest.approx(0.9)
        assert found.offsets[0] == (row0 + 6, col0 + 4)
        assert found.masks[0].shape == (5, 11) and found.masks[0].all()
        assert np.allclose(found.boxes[0], [col0 + 4, row0 + 6, col0 + 15, row0 + 11])
        assert found.invalid_fractions[0] == 0.0
    # The threshold from the metadata can be overridden.
    lower = infer_chunk(det, make_stack(), CHUNK.tiles, score_threshold=0.2)
    assert all(len(r) == 2 for r in lower)


def label_stack() -> ChunkStack:
    """A stack whose dem relative_elevation band holds three labelled objects."""
    stack = make_stack()
    labels = stack.data["dem"][2]
    labels[10:30, 12:50] = 1  # inside tile (0, 0) only
    labels[50:70, 20:40] = 2  # across the horizontal tile seam (rows 56..63 are in both)
    yy, xx = np.mgrid[: CHUNK.shape[0], : CHUNK.shape[1]]
    labels[(yy - 90) ** 2 + (xx - 90) ** 2 < 12**2] = 3  # a disc in the last tile
    return stack


def test_label_detector_returns_the_labels_per_tile(tmp_path, meta):
    det = load_model(make_label_detector(tmp_path / "truth.onnx", meta))
    stack = label_stack()
    labels = stack.data["dem"][2]
    result = infer_chunk(det, stack, CHUNK.tiles)
    for tile, found in zip(CHUNK.tiles, result):
        rows, cols = CHUNK.tile_window(tile)
        present = sorted(set(np.unique(labels[rows, cols]).astype(int)) - {0})
        assert sorted(round((0.99 - s) * 1000) for s in found.scores) == present
        for score, mask, (r, c) in zip(found.scores, found.masks, found.offsets):
            label = round((0.99 - score) * 1000)
            assert score == pytest.approx(label_score(label))
            canvas = np.zeros(CHUNK.shape, bool)
            canvas[r : r + mask.shape[0], c : c + mask.shape[1]] = mask
            truth = np.zeros(CHUNK.shape, bool)
            truth[rows, cols] = labels[rows, cols] == label
            # Up to the 28x28 mask resolution: objects here are at most 38 px wide.
            assert (canvas ^ truth).sum() <= 0.03 * truth.sum()


def test_batch_size_does_not_change_results(tmp_path, meta):
    det = load_model(make_label_detector(tmp_path / "truth.onnx", meta))
    stack = label_stack()
    one = infer_chunk(det, stack, CHUNK.tiles, batch_size=1)
    eight = infer_chunk(det, stack, CHUNK.tiles, batch_size=8)
    assert [len(r) for r in one] == [2, 0, 1, 1]
    for a, b in zip(one, eight):
        assert a.tile_id == b.tile_id and a.offsets == b.offsets
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma, mb)


def test_all_invalid_tiles_are_skipped(tmp_path, meta):
    det = load_model(make_constant_detector(tmp_path / "m.onnx", [ConstantDetection((0, 0, 8, 8), 0.9)], meta))
    sizes = count_predict_calls(det)
    stack = make_stack()
    first = CHUNK.tiles[0]
    rows, cols = CHUNK.tile_window(first)
    # The first tile: no modality valid anywhere in it; its neighbours keep valid pixels
    # outside the overlap they share with it.
    for m in stack.valid:
        stack.valid[m][rows, cols] = False
    result = infer_chunk(det, stack, CHUNK.tiles)
    assert result[0].skipped and len(result[0]) == 0
    assert not any(r.skipped for r in result[1:])
    assert sizes == [len(CHUNK.tiles) - 1]
    # Only the optical modality invalid: the tile is still run (SAR and DEM can see).
    stack = make_stack()
    stack.valid["optical"][rows, cols] = False
    result = infer_chunk(det, stack, CHUNK.tiles)
    assert not result[0].skipped and len(result[0]) == 1
    assert result[0].invalid_fractions[0] == 1.0


def test_missing_modality_and_invalid_pixels_reach_the_model_as_zeros(tmp_path):
    # Normalization with a mean: labels only survive if normalize-then-zero is done right.
    meta = model_metadata(
        tile_size=T, max_detections=4, normalization={"dem": {"mean": [5.0, 0.5, 10.0], "std": [2.0, 1.0, 2.0]}}
    )
    det = load_model(make_label_detector(tmp_path / "truth.onnx", meta))
    stack = make_stack(modalities=("optical", "dem"))  # no SAR scene for this chunk
    stack.data["dem"][2] = 10.0  # normalizes to 0: background
    stack.data["dem"][2, 10:30, 12:50] = 12.0  # normalizes to 1: label 1
    stack.valid["dem"][10:30, 12:31] = False  # left part invalid: zeroed after normalization
    result = infer_chunk(det, stack, CHUNK.tiles)
    found = result[0]
    assert len(found) == 1 and found.scores[0] == pytest.approx(label_score(1))
    assert found.offsets[0] == (10, 31) and found.masks[0].shape == (20, 19)
    assert found.invalid_fractions[0] == 1.0  # SAR is missing everywhere
    assert sum(len(r) for r in result) == 1


def test_no_tiles_and_no_detections(tmp_path, meta):
    det = load_model(make_label_detector(tmp_path / "truth.onnx", meta))
    assert infer_chunk(det, make_stack(), ()) == []
    result = infer_chunk(det, make_stack(), CHUNK.tiles)
    assert len(result) == 4 and all(len(r) == 0 and not r.skipped for r in result)
    # A chunk where no modality had any scene: every tile skipped, the model never called.
    sizes = count_predict_calls(det)
    result = infer_chunk(det, make_stack(modalities=()), CHUNK.tiles)
    assert all(r.skipped for r in result) and sizes == []


def test_pipeline_needs_neither_torch_nor_onnx():
    code = (
        "import sys, pipeline.infer, pipeline.vectorize, pipeline.model_file; "
        "bad = {'torch', 'onnx', 'torchvision'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- missing modalities: the presence input ---------------------------------------------------------

ALL = ("optical", "sar", "dem")


def with_presence_input(path: Path, subsets) -> Path:
    """Turn a format 1 test graph into format 2: add the ``presence`` input and list ``subsets``.

    The test graphs ignore the flags (a real model's use of them is tested against PyTorch in
    tests/test_export.py); what these tests check is what the pipeline feeds and refuses.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    meta = json.loads(model.metadata_props[0].value)
    model.graph.input.append(helper.make_tensor_value_info("presence", TensorProto.FLOAT, ["batch", len(meta["modalities"])]))
    meta.update(format="rtsmap-model/2", modality_subsets=[list(s) for s in subsets])
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(path))
    return path


class RecordingSession:
    """The real onnxruntime session, keeping a copy of every feed it was given."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def run(self, names, feed):
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.session.run(names, feed)


def dropout_detector(tmp_path, meta, subsets=None) -> Detector:
    subsets = subsets or [ALL, ("optical", "dem"), ("sar", "dem"), ("optical",)]
    det = load_model(with_presence_input(make_label_detector(tmp_path / "truth.onnx", meta), subsets))
    det.session = RecordingSession(det.session)
    return det


def test_format_2_model_lists_its_subsets(tmp_path, meta):
    det = dropout_detector(tmp_path, meta)
    info = det.info
    assert info.format == "rtsmap-model/2" and info.has_presence_input
    assert info.modality_subsets == (ALL, ("optical", "dem"), ("sar", "dem"), ("optical",))
    assert info.supports(["dem", "sar"]) and info.supports(ALL) and not info.supports(["sar"])
    assert not info.supports(["optical", "lidar"])
    # A format 1 model: only the full set.
    v1 = load_model(make_label_detector(tmp_path / "v1.onnx", meta)).info
    assert v1.format == "rtsmap-model/1" and not v1.has_presence_input and v1.modality_subsets == (ALL,)


@pytest.mark.parametrize(
    "subsets, expected",
    [
        (None, "'modality_subsets' must be a list"),
        ([["optical", "dem"], list(ALL)], "full set"),
        ([list(ALL), ["optical", "lidar"]], "lidar"),
        ([list(ALL), ["dem", "optical"], ["optical", "dem"]], "twice"),
        ([list(ALL), []], "'modality_subsets' must be"),
    ],
)
def test_bad_modality_subsets_are_a_model_error(tmp_path, meta, subsets, expected):
    path = with_presence_input(make_label_detector(tmp_path / "m.onnx", meta), [ALL])
    import onnx

    model = onnx.load(str(path))
    stored = json.loads(model.metadata_props[0].value)
    if subsets is None:
        del stored["modality_subsets"]
    else:
        stored["modality_subsets"] = subsets
    model.metadata_props[0].value = json.dumps(stored)
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=expected):
        read_model_info(path)


def test_format_2_metadata_without_the_presence_input_is_refused(tmp_path):
    meta = model_metadata(tile_size=T, max_detections=4, format="rtsmap-model/2", modality_subsets=[list(ALL)])
    with pytest.raises(ModelError, match="plus 'presence'"):
        read_model_info(make_label_detector(tmp_path / "m.onnx", meta))


def test_format_1_model_refuses_a_partial_subset(tmp_path, meta):
    det = load_model(make_label_detector(tmp_path / "v1.onnx", meta))
    batch = {m: np.zeros((2, len(BANDS[m]), T, T), np.float32) for m in ALL}
    with pytest.raises(ModelError, match="without a presence input.*runs only with all of"):
        det.predict(batch, presence=[1, 0, 1])
    with pytest.raises(ModelError, match=r"cannot run with modalities \['optical', 'dem'\]"):
        infer_chunk(det, label_stack(), CHUNK.tiles, presence=["dem", "optical"])
    # The full set is what it always ran with: the same detections with or without presence.
    plain = infer_chunk(det, label_stack(), CHUNK.tiles)
    full = infer_chunk(det, label_stack(), CHUNK.tiles, presence=ALL)
    assert [len(r) for r in plain] == [len(r) for r in full] == [2, 0, 1, 1]
    assert all(r.modalities == ALL for r in full + plain)
    assert len(det.predict(batch, presence=[1, 1, 1])["scores"]) == 2


def test_predict_checks_presence_and_fills_absent_modalities_with_zeros(tmp_path, meta):
    det = dropout_detector(tmp_path, meta)
    batch = {m: np.full((2, len(BANDS[m]), T, T), 3.0, np.float32) for m in ALL}
    det.predict(batch, presence=[[1, 0, 1], [0, 1, 1]])
    feed = det.session.feeds[-1]
    np.testing.assert_array_equal(feed["presence"], [[1, 0, 1], [0, 1, 1]])
    assert (feed["sar"][0] == 0).all() and (feed["sar"][1] == 3).all()
    assert (feed["optical"][1] == 0).all() and (feed["optical"][0] == 3).all() and (feed["dem"] == 3).all()
    assert (batch["sar"] == 3).all()  # the caller's arrays are not changed
    det.predict(batch)  # no presence: every modality present
    np.testing.assert_array_equal(det.session.feeds[-1]["presence"], np.ones((2, 3)))
    det.predict(batch, presence=np.array([True, False, True]))  # one row for the whole batch
    np.testing.assert_array_equal(det.session.feeds[-1]["presence"], [[1, 0, 1], [1, 0, 1]])
    with pytest.raises(ModelError, match=r"cannot run with modalities \['sar'\].*trained for"):
        det.predict(batch, presence=[[0, 1, 0], [1, 1, 1]])
    with pytest.raises(ModelError, match=r"presence must be \[2, 3\]"):
        det.predict(batch, presence=[1, 1])
    with pytest.raises(ModelError, match="0 .absent. or 1"):
        det.predict(batch, presence=[1, 0.5, 1])


def test_chunk_without_sar_runs_with_sar_absent(tmp_path, meta):
    det = dropout_detector(tmp_path, meta)
    stack = label_stack()
    del stack.data["sar"], stack.valid["sar"]
    result = infer_chunk(det, stack, CHUNK.tiles, presence=["optical", "dem"])
    assert [len(r) for r in result] == [2, 0, 1, 1]  # the DEM labels, as with every modality
    assert all(r.modalities == ("optical", "dem") for r in result)
    assert all((f["presence"] == [1, 0, 1]).all() and (f["sar"] == 0).all() for f in det.session.feeds)
    assert result[0].invalid_fractions.tolist() == [1.0, 1.0]  # SAR has no data under them


def test_absent_modality_is_fed_as_zeros_even_when_loaded(tmp_path, meta):
    # The label detector reads the DEM: flagged absent, its labels must not reach the model.
    det = dropout_detector(tmp_path, meta, [ALL, ("optical", "sar")])
    result = infer_chunk(det, label_stack(), CHUNK.tiles, presence=["optical", "sar"])
    assert sum(len(r) for r in result) == 0
    assert all((f["dem"] == 0).all() for f in det.session.feeds)
    with pytest.raises(ModelError, match="trained for"):
        infer_chunk(det, label_stack(), CHUNK.tiles, presence=["sar", "dem"])
    with pytest.raises(ValueError, match="stack lacks"):
        infer_chunk(det, make_stack(modalities=("optical", "dem")), CHUNK.tiles, presence=ALL)


def test_tile_without_valid_pixels_of_a_modality_runs_without_it_when_supported(tmp_path, meta):
    det = dropout_detector(tmp_path, meta)
    stack = label_stack()
    first = CHUNK.tiles[0]
    rows, cols = CHUNK.tile_window(first)
    stack.valid["sar"][rows, cols] = False  # SAR swath edge: nothing in the first tile
    stack.valid["optical"][:] = False  # optical clouded everywhere
    result = infer_chunk(det, stack, CHUNK.tiles, presence=ALL)
    # Tile 0 has DEM only -> (dem,) is not supported, so it keeps the chunk's set; the others
    # have SAR and DEM -> (sar, dem).
    assert result[0].modalities == ALL
    assert all(r.modalities == ("sar", "dem") for r in result[1:])
    assert [len(r) for r in result] == [2, 0, 1, 1]


def test_check_compatible_accepts_data_without_a_modality_the_model_can_lack(tmp_path, meta):
    det = dropout_detector(tmp_path, meta)
    no_sar = {m: BANDS[m] for m in ("optical", "dem")}
    check_compatible(det.info, no_sar, 10.0, T)
    with pytest.raises(ModelError, match="'optical'.*needed.*it runs with"):
        check_compatible(det.info, {"dem": BANDS["dem"]}, 10.0, T)
    v1 = load_model(make_label_detector(tmp_path / "v1.onnx", meta)).info
    with pytest.raises(ModelError, match="'sar'.*needed but the data has none; it runs only with all"):
        check_compatible(v1, no_sar, 10.0, T)
