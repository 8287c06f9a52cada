"""Small, real ONNX detectors for tests, built with ``onnx.helper`` (no torch).

They have the model file's contract (docs/contracts.md, "The model file"): one float32
``[B, C, T, T]`` input per modality, outputs ``boxes [B, K, 4]``, ``scores [B, K]``,
``masks [B, K, 28, 28]``, ``num_detections [B]`` and the ``rtsmap`` JSON metadata, so tests run
real onnxruntime sessions through :func:`pipeline.infer.load_model`.

- :func:`make_constant_detector`: the same chosen detections in every tile (the graph reads only
  the batch size from its input).
- :func:`make_label_detector`: a "truth detector": one input band holds an instance-label
  raster (0 background, 1..K objects); each label present in a tile comes out as one detection
  with its tight box and its mask (RoiAlign of the label's pixels to 28x28). Write the true
  slumps into that band and the detector returns them, tile by tile, cut at tile edges like a
  real network.

Typical use::

    meta = model_metadata(tile_size=64, max_detections=4)
    path = make_label_detector(tmp_path / "truth.onnx", meta, label_band=("dem", "relative_elevation"))
    detector = pipeline.infer.load_model(path)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MASK_SIZE = 28
"""Side of the per-detection mask output."""

OPSET = 17
IR_VERSION = 8  # matches opset 17; readable by every onnxruntime >= 1.14

BANDS = {
    "optical": ["blue", "green", "red", "nir"],
    "sar": ["vv", "vh"],
    "dem": ["slope", "hillshade", "relative_elevation"],
}


def model_metadata(
    *,
    modalities: Sequence[str] = ("optical", "sar", "dem"),
    tile_size: int = 64,
    resolution: float = 10.0,
    max_detections: int = 8,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    normalization: Mapping[str, Mapping[str, list[float]]] | None = None,
    **extra,
) -> dict:
    """Contract-shaped ``rtsmap`` metadata (identity normalization unless given).

    Parameters
    ----------
    modalities : sequence of str
        Input modalities, from :data:`BANDS`.
    tile_size, resolution, max_detections, score_threshold, mask_threshold
        As in the contract.
    normalization : mapping, optional
        Modality -> {"mean": [...], "std": [...]}; default mean 0, std 1 (values pass through).
    **extra
        Other keys to set or override (e.g. ``format="other"``).

    Returns
    -------
    dict
    """
    norm = {m: {"mean": [0.0] * len(BANDS[m]), "std": [1.0] * len(BANDS[m])} for m in modalities}
    norm.update(normalization or {})
    meta = {
        "format": "rtsmap-model/1",
        "name": "test-detector",
        "version": "0.0-test",
        "fusion": "none",
        "modalities": list(modalities),
        "bands": {m: list(BANDS[m]) for m in modalities},
        "normalization": norm,
        "tile_size": tile_size,
        "resolution": resolution,
        "max_detections": max_detections,
        "score_threshold": score_threshold,
        "mask_threshold": mask_threshold,
        "classes": ["rts"],
        "weights_sha256": "",
        "trained_on": "nothing (test graph)",
        "config": {},
    }
    meta.update(extra)
    return meta


@dataclass(frozen=True)
class ConstantDetection:
    """One detection that a constant detector returns in every tile."""

    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in tile pixels."""
    score: float
    """Detection score."""
    mask: np.ndarray | None = None
    """``[28, 28]`` mask probabilities inside the box; None means all ones (fills the box)."""


def _inputs(metadata: Mapping, input_shapes: Mapping[str, list] | None) -> list:
    t = metadata["tile_size"]
    shapes = {m: ["batch", len(metadata["bands"][m]), t, t] for m in metadata["modalities"]}
    shapes.update(input_shapes or {})
    return [helper.make_tensor_value_info(m, TensorProto.FLOAT, s) for m, s in shapes.items()]


def _outputs(k: int) -> list:
    return [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["batch", k, MASK_SIZE, MASK_SIZE]),
        helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"]),
    ]


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def write_model(path: str | Path, graph: onnx.GraphProto, metadata: Mapping | str | None) -> Path:
    """Save a graph as a model file with the given ``rtsmap`` metadata.

    Parameters
    ----------
    path : str or Path
        Where to write.
    graph : onnx.GraphProto
        The graph.
    metadata : mapping, str or None
        Written as JSON (a str is written verbatim, None writes no ``rtsmap`` entry: for
        tests of broken files).

    Returns
    -------
    Path
    """
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtsmap-tests")
    model.ir_version = IR_VERSION
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        helper.set_model_props(model, {"rtsmap": text})
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path


def make_constant_detector(
    path: str | Path,
    detections: Sequence[ConstantDetection],
    metadata: Mapping | str | None,
    *,
    graph_metadata: Mapping | None = None,
    input_shapes: Mapping[str, list] | None = None,
) -> Path:
    """Write a model that returns the same detections for every tile of a batch.

    The graph takes the batch size B from the first input's shape and expands constant
    outputs to ``[B, ...]``; the input values are not used.

    Parameters
    ----------
    path : str or Path
        Where to write the .onnx file.
    detections : sequence of ConstantDetection
        At most ``max_detections``, best first; the rest of K is zero padding.
    metadata : mapping, str or None
        The ``rtsmap`` metadata written into the file (see :func:`write_model`).
    graph_metadata : mapping, optional
        Metadata to shape the graph by when it must differ from ``metadata`` (to build a file
        whose graph does not match its metadata); default ``metadata``.
    input_shapes : mapping, optional
        Input name -> shape overrides (e.g. a wrong channel count).

    Returns
    -------
    Path
    """
    shape_meta = graph_metadata or metadata
    k = shape_meta["max_detections"]
    if len(detections) > k:
        raise ValueError(f"{len(detections)} detections, max_detections is {k}")
    boxes = np.zeros((1, k, 4), np.float32)
    scores = np.zeros((1, k), np.float32)
    masks = np.zeros((1, k, MASK_SIZE, MASK_SIZE), np.float32)
    for i, det in enumerate(detections):
        boxes[0, i] = det.box
        scores[0, i] = det.score
        masks[0, i] = 1.0 if det.mask is None else det.mask
    inputs = _inputs(shape_meta, input_shapes)
    first = inputs[0].name
    nodes = [
        helper.make_node("Shape", [first], ["in_shape"]),
        helper.make_node("Gather", ["in_shape", "zero"], ["batch"], axis=0),  # [1] = [B]
        helper.make_node("Concat", ["batch", "tail_boxes"], ["shape_boxes"], axis=0),
        helper.make_node("Concat", ["batch", "tail_scores"], ["shape_scores"], axis=0),
        helper.make_node("Concat", ["batch", "tail_masks"], ["shape_masks"], axis=0),
        helper.make_node("Expand", ["const_boxes", "shape_boxes"], ["boxes"]),
        helper.make_node("Expand", ["const_scores", "shape_scores"], ["scores"]),
        helper.make_node("Expand", ["const_masks", "shape_masks"], ["masks"]),
        helper.make_node("Expand", ["const_num", "batch"], ["num_detections"]),
    ]
    initializers = [
        _const("zero", np.array([0], np.int64)),
        _const("tail_boxes", np.array([k, 4], np.int64)),
        _const("tail_scores", np.array([k], np.int64)),
        _const("tail_masks", np.array([k, MASK_SIZE, MASK_SIZE], np.int64)),
        _const("const_boxes", boxes),
        _const("const_scores", scores),
        _const("const_masks", masks),
        _const("const_num", np.array([len(detections)], np.int64)),
    ]
    graph = helper.make_graph(nodes, "constant_detector", inputs, _outputs(k), initializers)
    return write_model(path, graph, metadata)


def label_score(label: int) -> float:
    """The score the label detector gives instance ``label`` (distinct, falling with the id)."""
    return 0.99 - 0.001 * label


def make_label_detector(
    path: str | Path,
    metadata: Mapping,
    *,
    label_band: tuple[str, str] = ("dem", "relative_elevation"),
) -> Path:
    """Write a "truth detector": detections are the instance labels found in one input band.

    Label ``k`` (1..K, rounded; 0 and invalid pixels are background) present in a tile becomes a
    detection with score :func:`label_score` ``(k)``, box = the tight pixel box of its pixels in
    the tile, mask = its pixels resampled into the box with ONNX RoiAlign (half-pixel centres,
    averaged), so pasting and thresholding at 0.5 gives back the label's pixels (up to the
    28x28 resolution for objects larger than 28 px). Detections are sorted by score, padding
    last. Give the label band identity normalization (the default of :func:`model_metadata`),
    so labels reach the graph unchanged.

    Parameters
    ----------
    path : str or Path
        Where to write the .onnx file.
    metadata : mapping
        The ``rtsmap`` metadata (written into the file and used to shape the graph).
    label_band : (str, str)
        Modality and band name of the label raster.

    Returns
    -------
    Path
    """
    modality, band = label_band
    channel = metadata["bands"][modality].index(band)
    k = metadata["max_detections"]
    t = metadata["tile_size"]
    m = MASK_SIZE
    f32 = np.float32
    nodes = [
        helper.make_node("Shape", [modality], ["in_shape"]),
        helper.make_node("Gather", ["in_shape", "zero"], ["batch"], axis=0),  # [1] = [B]
        # label raster [B, 1, T, T] -> one 0/1 plane per label id [B, K, T, T]
        helper.make_node("Gather", [modality, "channel"], ["labels_raw"], axis=1),
        helper.make_node("Round", ["labels_raw"], ["labels"]),
        helper.make_node("Equal", ["labels", "label_ids"], ["is_label"]),
        helper.make_node("Cast", ["is_label"], ["planes"], to=TensorProto.FLOAT),
        # columns / rows where each label occurs: [B, K, T]
        helper.make_node("ReduceMax", ["planes"], ["in_col"], axes=[2], keepdims=0),
        helper.make_node("ReduceMax", ["planes"], ["in_row"], axes=[3], keepdims=0),
        helper.make_node("ReduceMax", ["in_col"], ["present"], axes=[2], keepdims=0),  # [B, K]
        # tight box: x1 = first column, x2 = last column + 1 (pixel edges)
        helper.make_node("Mul", ["in_col", "from_end"], ["col_from_end"]),
        helper.make_node("ReduceMax", ["col_from_end"], ["x1_rev"], axes=[2], keepdims=1),
        helper.make_node("Sub", ["tile", "x1_rev"], ["x1"]),
        helper.make_node("Mul", ["in_col", "one_based"], ["col_one_based"]),
        helper.make_node("ReduceMax", ["col_one_based"], ["x2"], axes=[2], keepdims=1),
        helper.make_node("Mul", ["in_row", "from_end"], ["row_from_end"]),
        helper.make_node("ReduceMax", ["row_from_end"], ["y1_rev"], axes=[2], keepdims=1),
        helper.make_node("Sub", ["tile", "y1_rev"], ["y1"]),
        helper.make_node("Mul", ["in_row", "one_based"], ["row_one_based"]),
        helper.make_node("ReduceMax", ["row_one_based"], ["y2"], axes=[2], keepdims=1),
        helper.make_node("Concat", ["x1", "y1", "x2", "y2"], ["boxes_unsorted"], axis=2),  # [B, K, 4]
        # masks: RoiAlign of each plane over its own box -> [B*K, 1, M, M]
        helper.make_node("Reshape", ["planes", "flat_planes"], ["planes_flat"]),
        helper.make_node("Reshape", ["boxes_unsorted", "flat_boxes"], ["rois"]),
        helper.make_node("Shape", ["rois"], ["rois_shape"]),
        helper.make_node("Gather", ["rois_shape", "zero_scalar"], ["n_rois"], axis=0),
        helper.make_node("Range", ["zero_scalar", "n_rois", "one_scalar"], ["roi_batch"]),
        helper.make_node(
            "RoiAlign",
            ["planes_flat", "rois", "roi_batch"],
            ["roi_masks"],
            output_height=m,
            output_width=m,
            sampling_ratio=0,
            spatial_scale=1.0,
            mode="avg",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Concat", ["batch", "tail_masks"], ["shape_masks"], axis=0),
        helper.make_node("Reshape", ["roi_masks", "shape_masks"], ["masks_unsorted"]),
        # scores, sorted best first (absent labels score 0 and sink to the end)
        helper.make_node("Mul", ["present", "label_scores"], ["scores_unsorted"]),
        helper.make_node("TopK", ["scores_unsorted", "k"], ["scores", "order"], axis=1, largest=1, sorted=1),
        helper.make_node("Unsqueeze", ["order", "axis2"], ["order3"]),
        helper.make_node("Concat", ["batch", "tail_boxes"], ["shape_boxes"], axis=0),
        helper.make_node("Expand", ["order3", "shape_boxes"], ["order_boxes"]),
        helper.make_node("GatherElements", ["boxes_unsorted", "order_boxes"], ["boxes"], axis=1),
        helper.make_node("Unsqueeze", ["order", "axes23"], ["order4"]),
        helper.make_node("Expand", ["order4", "shape_masks"], ["order_masks"]),
        helper.make_node("GatherElements", ["masks_unsorted", "order_masks"], ["masks"], axis=1),
        helper.make_node("ReduceSum", ["present", "axis1"], ["n_present"], keepdims=0),
        helper.make_node("Cast", ["n_present"], ["num_detections"], to=TensorProto.INT64),
    ]
    initializers = [
        _const("zero", np.array([0], np.int64)),
        _const("zero_scalar", np.array(0, np.int64)),
        _const("one_scalar", np.array(1, np.int64)),
        _const("channel", np.array([channel], np.int64)),
        _const("label_ids", np.arange(1, k + 1, dtype=f32).reshape(1, k, 1, 1)),
        _const("from_end", (t - np.arange(t)).astype(f32)),
        _const("one_based", np.arange(1, t + 1, dtype=f32)),
        _const("tile", np.array(t, f32)),
        _const("flat_planes", np.array([-1, 1, t, t], np.int64)),
        _const("flat_boxes", np.array([-1, 4], np.int64)),
        _const("tail_masks", np.array([k, m, m], np.int64)),
        _const("tail_boxes", np.array([k, 4], np.int64)),
        _const("label_scores", np.array([[label_score(i) for i in range(1, k + 1)]], f32)),
        _const("k", np.array([k], np.int64)),
        _const("axis1", np.array([1], np.int64)),
        _const("axis2", np.array([2], np.int64)),
        _const("axes23", np.array([2, 3], np.int64)),
    ]
    graph = helper.make_graph(nodes, "label_detector", _inputs(metadata, None), _outputs(k), initializers)
    return write_model(path, graph, metadata)
