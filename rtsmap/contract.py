"""The model contract shared by ``rtsmap.models`` (training, export, evaluation) and
``rtsmap.pipeline`` (inference, inventory evaluation).

The exported ONNX file is the border between the two halves of the project; this module holds
every rule both sides must apply the same way, so that neither keeps its own copy:

- the file's tensor names, metadata key and format versions, and the presence input of
  missing modalities (:data:`PRESENCE_INPUT`, :func:`presence_vector`, :func:`modality_subsets`);
- the input normalisation (:func:`normalize`);
- the threshold rule (:func:`keep`): a value *at or above* a threshold is kept, for detection
  scores and mask probabilities alike;
- mask pasting (:func:`paste_mask`): a 28x28 box-relative mask onto the tile's pixels;
- the one-to-one matcher of predictions and true objects (:func:`match_one_to_one`) that both
  the COCO-style F1 (``models/evaluate.py``) and the inventory evaluation
  (``pipeline/evaluation.py``) count with.

numpy only: no torch (GPU workers install onnxruntime alone) and no onnxruntime (training
machines need not have it). docs/contracts.md describes the file this module reads and writes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MASK_SIZE",
    "METADATA_KEY",
    "MODEL_FORMAT",
    "MODEL_FORMAT_V1",
    "OUTPUT_NAMES",
    "PRESENCE_INPUT",
    "READABLE_MODEL_FORMATS",
    "canonical_subset",
    "input_names",
    "keep",
    "match_one_to_one",
    "modality_subsets",
    "normalize",
    "paste_mask",
    "presence_vector",
]

METADATA_KEY = "rtsmap"
"""Key of the JSON metadata in the ONNX model's ``metadata_props``."""

MODEL_FORMAT = "rtsmap-model/2"
"""Value of the metadata's ``format`` key that ``rtsmap export`` writes: version 2 files have the
:data:`PRESENCE_INPUT` input and a ``modality_subsets`` metadata key. Bump it only with a change
the pipeline cannot read the old way."""

MODEL_FORMAT_V1 = "rtsmap-model/1"
"""The first format (the first demo model): one input per modality, no presence input, so such
a model runs only with every modality present (its one supported subset is the full set)."""

READABLE_MODEL_FORMATS = (MODEL_FORMAT_V1, MODEL_FORMAT)
"""Format versions the pipeline and ``rtsmap evaluate`` read."""

PRESENCE_INPUT = "presence"
"""Name of the version 2 input that says which modalities each tile has: float32 ``[B, M]``, M
the metadata's ``modalities`` in order, 1.0 present, 0.0 absent. An absent modality's own input
holds the fill, zeros (what :func:`normalize` gives a modality whose pixels are all invalid)."""

OUTPUT_NAMES = ("boxes", "scores", "masks", "num_detections")
"""The model's outputs, in order: ``boxes [B, K, 4]``, ``scores [B, K]``,
``masks [B, K, MASK_SIZE, MASK_SIZE]``, ``num_detections [B]``."""

MASK_SIZE = 28
"""Side of the box-relative mask predictions (Mask R-CNN's 28x28)."""


def input_names(modalities: Sequence[str], *, presence: bool = False) -> tuple[str, ...]:
    """ONNX input names of a model over ``modalities``: one input per modality, named after it.

    Parameters
    ----------
    modalities : sequence of str
        Modalities in the model's order (the metadata's ``modalities``).
    presence : bool
        Append :data:`PRESENCE_INPUT` (format version 2 files).

    Returns
    -------
    tuple of str
        The input names, in the same order.
    """
    names = tuple(str(m) for m in modalities)
    return names + (PRESENCE_INPUT,) if presence else names


def canonical_subset(modalities: Sequence[str], subset: Iterable[str]) -> tuple[str, ...]:
    """A subset of a model's modalities in the model's order (how subsets are compared and stored).

    Parameters
    ----------
    modalities : sequence of str
        The model's modalities, in order.
    subset : iterable of str
        Some of them, in any order.

    Returns
    -------
    tuple of str
        The subset in the order of ``modalities``.

    Raises
    ------
    ValueError
        When ``subset`` names a modality the model does not have, or names one twice.
    """
    subset = [str(m) for m in subset]
    unknown = sorted(set(subset) - set(modalities))
    if unknown:
        raise ValueError(f"modalities {unknown} are not the model's (it takes {list(modalities)})")
    if len(set(subset)) != len(subset):
        raise ValueError(f"modality subset {subset} names a modality twice")
    return tuple(m for m in modalities if m in subset)


def modality_subsets(modalities: Sequence[str], dropout: Mapping[str, float]) -> tuple[tuple[str, ...], ...]:
    """The subsets of modalities a model trained with modality dropout has seen.

    Training drops each modality of a sample with its rate and never all of them (models/train.py),
    so every non-empty subset that leaves out only modalities with a rate above zero occurs.
    A model trained without dropout supports only the full set.

    Parameters
    ----------
    modalities : sequence of str
        The model's modalities, in order.
    dropout : mapping of str to float
        Modality -> dropout rate (missing: 0).

    Returns
    -------
    tuple of tuple of str
        The full set first, then the others from larger to smaller, each in model order (the
        order of the metadata's ``modality_subsets``).
    """
    droppable = [m for m in modalities if float(dropout.get(m, 0.0)) > 0.0]
    subsets = []
    for size in range(len(modalities), 0, -1):
        for subset in itertools.combinations(modalities, size):
            left_out = set(modalities) - set(subset)
            if left_out <= set(droppable):
                subsets.append(tuple(subset))
    return tuple(subsets)


def presence_vector(modalities: Sequence[str], present: Iterable[str]) -> np.ndarray:
    """The :data:`PRESENCE_INPUT` row of one tile: float32 ``[M]``, 1.0 where present.

    Parameters
    ----------
    modalities : sequence of str
        The model's modalities, in order.
    present : iterable of str
        The modalities the tile has.

    Returns
    -------
    ndarray
        float32 ``[len(modalities)]``.

    Raises
    ------
    ValueError
        When ``present`` names a modality the model does not have.
    """
    present = canonical_subset(modalities, present)
    return np.asarray([1.0 if m in present else 0.0 for m in modalities], np.float32)


def normalize(
    x: np.ndarray,
    valid: np.ndarray | None,
    mean: Sequence[float],
    std: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise one modality for the network: ``(x - mean) / std`` per band, invalid pixels 0.

    Training (``models/data.py``) and inference (``pipeline/infer.py``) both call this, so a
    model sees the same numbers in both. Invalid pixels are set to 0 *after* normalisation:
    the band mean, which carries no signal.

    Parameters
    ----------
    x : ndarray
        ``[C, H, W]`` band values in the model's band order.
    valid : ndarray of bool or None
        ``[H, W]``, True where the modality has data; None: every pixel is valid.
    mean, std : sequence of float
        Per band, length C (``std`` > 0).
    out : ndarray, optional
        float32 ``[C, H, W]`` to write into (saves an allocation per tile).

    Returns
    -------
    ndarray
        float32 ``[C, H, W]`` (``out`` when given).

    Raises
    ------
    ValueError
        When ``mean``/``std`` do not have one value per band.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if x.ndim != 3 or mean.shape != (x.shape[0],) or std.shape != (x.shape[0],):
        raise ValueError(f"normalize: x is {list(x.shape)}, expected [C, H, W] with C = {len(mean)} = {len(std)}")
    if out is None:
        out = np.empty(x.shape, np.float32)
    # Subtract, then divide, in float32: the same arithmetic in training and inference.
    np.subtract(x, mean[:, None, None], out=out, casting="same_kind")
    np.divide(out, std[:, None, None], out=out)
    if valid is not None:
        out[:, ~np.asarray(valid, bool)] = 0.0
    return out


def keep(values: Any, threshold: float) -> Any:
    """Which values pass a threshold: ``values >= threshold``.

    The one rule for every threshold on a model's outputs: the operating score
    (``score_threshold``), the graph's candidate cut (``candidate_score_threshold``) and the mask
    probability (``mask_threshold``), in the pipeline, in evaluation and in the exported graph.
    A value equal to the threshold is kept, so threshold 0 keeps everything and threshold 1
    keeps only values of exactly 1.

    Parameters
    ----------
    values : array-like
        Scores or probabilities: a numpy array, a scalar, or any array type with ``>=``
        (a torch tensor stays a tensor, so the rule traces into the ONNX graph).
    threshold : float
        The threshold.

    Returns
    -------
    array of bool
        Same shape (and array type) as ``values``.
    """
    if not hasattr(values, "shape"):
        values = np.asarray(values)
    return values >= threshold


def paste_mask(
    mask: np.ndarray, box: Sequence[float], height: int, width: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resample a box-relative mask prediction onto the image pixels its box covers.

    The pixels covered are those whose centres lie in ``[x1, x2) x [y1, y2)``, clipped to the
    image; each takes the bilinear interpolation of the ``M x M`` map at its centre (the map's
    cells spread evenly over the box, edge values repeat). torchvision's
    ``paste_masks_in_image`` does nearly the same with ``F.interpolate``, but on a box rounded to
    whole pixels and grown by one cell of zeros; tests/test_contract.py checks that the two agree
    within a pixel at the mask's edge. Written with numpy because the pipeline has no torch; the
    bilinear resize is separable, so it is two small matrix products per mask.

    Parameters
    ----------
    mask : ndarray
        ``[M, M]`` probabilities inside the box.
    box : sequence of float
        x1, y1, x2, y2 in image pixels (pixel edges: a box ``(0, 0, 3, 2)`` covers 3 columns and
        2 rows).
    height, width : int
        Image size in pixels.

    Returns
    -------
    probabilities : ndarray
        float32 ``[h, w]`` over the covered pixels (``h`` or ``w`` may be 0).
    offset : tuple of int
        (row0, col0) of the first covered pixel in the image.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    mh, mw = mask.shape
    # First/last pixel whose centre (i + 0.5) lies in [lo, hi), clipped to the image.
    c0 = max(int(np.ceil(x1 - 0.5)), 0)
    c1 = min(int(np.ceil(x2 - 0.5)), width)
    r0 = max(int(np.ceil(y1 - 0.5)), 0)
    r1 = min(int(np.ceil(y2 - 0.5)), height)
    if c1 <= c0 or r1 <= r0 or x2 <= x1 or y2 <= y1:
        return np.zeros((0, 0), np.float32), (max(r0, 0), max(c0, 0))
    # Pixel centre -> continuous mask coordinate (cell centres at 0 .. M-1).
    u = (np.arange(c0, c1) + 0.5 - x1) / (x2 - x1) * mw - 0.5
    v = (np.arange(r0, r1) + 0.5 - y1) / (y2 - y1) * mh - 0.5
    wx = _interpolation_matrix(u, mw)
    wy = _interpolation_matrix(v, mh)
    return wy @ mask.astype(np.float32, copy=False) @ wx.T, (r0, c0)


def _interpolation_matrix(positions: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation weights ``[len(positions), size]`` for sample positions on a grid.

    Positions outside ``[0, size - 1]`` are clamped (edge values repeat), as in PyTorch's
    bilinear ``interpolate(..., align_corners=False)``.
    """
    pos = np.clip(positions, 0.0, size - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(np.float32)
    weights = np.zeros((len(pos), size), np.float32)
    rows = np.arange(len(pos))
    weights[rows, lo] += 1.0 - frac
    weights[rows, hi] += frac
    return weights


def match_one_to_one(
    pred: np.ndarray, true: np.ndarray, iou: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of predictions to true objects by IoU, highest first.

    Each prediction and each true object is in at most one match; a pair matches when its IoU
    is at least ``threshold`` (:func:`keep`'s rule). Pairs are taken in order of IoU, highest
    first, ties by the lower prediction index, then the lower true index, so the result never
    depends on the order the pairs are given in. For slump polygons, which rarely overlap
    each other, this gives the same count as an optimal (Hungarian) assignment except in
    contrived ties, and needs no scipy.

    Parameters
    ----------
    pred, true : ndarray of int
        ``[P]``: the prediction and true-object index of each candidate pair (only pairs that
        overlap need be given: from a spatial index, or every pair of a dense IoU matrix).
    iou : ndarray of float
        ``[P]``: the IoU of each pair.
    threshold : float
        Least IoU of a match.

    Returns
    -------
    pred, true : ndarray of int
        The matched pairs, in the order they were taken.
    iou : ndarray of float
        Their IoUs.
    """
    pred = np.asarray(pred, np.int64).reshape(-1)
    true = np.asarray(true, np.int64).reshape(-1)
    iou = np.asarray(iou, np.float64).reshape(-1)
    if not len(pred) == len(true) == len(iou):
        raise ValueError(f"match_one_to_one: {len(pred)} pred, {len(true)} true and {len(iou)} IoU values")
    ok = keep(iou, threshold)
    pred, true, iou = pred[ok], true[ok], iou[ok]
    order = np.lexsort((true, pred, -iou))
    used_pred: set[int] = set()
    used_true: set[int] = set()
    taken = []
    for k in order.tolist():
        p, t = int(pred[k]), int(true[k])
        if p in used_pred or t in used_true:
            continue
        used_pred.add(p)
        used_true.add(t)
        taken.append(k)
    taken = np.asarray(taken, np.int64)
    return pred[taken], true[taken], iou[taken]
