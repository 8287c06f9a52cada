"""Run the exported detector over the tiles of a loaded chunk.

``load_model`` opens the ONNX file in onnxruntime on the asked-for execution providers and
checks that they are really in use; ``infer_chunk`` cuts tiles out of a :class:`ChunkStack`,
normalizes them with the model's metadata, runs them in batches and pastes the 28x28 mask
predictions back into chunk pixels as boolean masks (:class:`TileDetections`).

Normalisation, the threshold rule and mask pasting are the model contract's
(``rtsmap.contract``), the same functions training and evaluation use. No torch here (a GPU
worker needs onnxruntime alone).

Missing modalities: a model file of format 2 takes a ``presence`` input, and its metadata lists
the modality subsets it was trained for (:attr:`ModelInfo.modality_subsets`,
:meth:`ModelInfo.supports`). ``Detector.predict(batch, presence)`` and
``infer_chunk(..., presence=[...])`` run tiles with only some modalities; an absent modality is
fed as the zero fill with presence 0. A subset the model was not trained for, and any partial
subset for a format 1 model (no presence input), is a :class:`ModelError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsmap.contract import OUTPUT_NAMES, PRESENCE_INPUT, canonical_subset, input_names, keep, normalize, paste_mask
from rtsmap.pipeline import graph_cache
from rtsmap.pipeline.errors import ModelError
from rtsmap.pipeline.model_file import (
    ModelInfo,
    check_compatible,
    import_onnxruntime,
    model_info_from_session,
    open_kept_graph,
    open_session,
    readable_sha256,
)

__all__ = [
    "Detector",
    "ModelInfo",
    "TileDetections",
    "check_compatible",
    "check_presence",
    "infer_chunk",
    "load_model",
    "paste_mask",
]

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""Short provider names accepted by :func:`load_model` -> onnxruntime's names."""


@dataclass
class Detector:
    """An open onnxruntime session of a model file, with what the pipeline knows about it."""

    session: object
    """The ``onnxruntime.InferenceSession``."""
    info: ModelInfo
    """The model's metadata and signature."""
    providers: tuple[str, ...]
    """Execution providers in use, as reported by the session after it was created."""
    graph: Path | None = None
    """The cached optimized graph the session was opened from (:mod:`rtsmap.pipeline.graph_cache`);
    None: the model file itself, optimized as it opened."""

    def predict(self, batch: Mapping[str, np.ndarray], presence: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run one batch through the network.

        Parameters
        ----------
        batch : mapping of str to ndarray
            Modality -> float32 ``[B, C, T, T]``, already normalized.
        presence : array-like, optional
            ``[B, M]`` (or ``[M]`` for the whole batch), M the model's modalities in order,
            1 (True) where the tile has the modality, 0 where it is absent: its input is
            replaced by the fill, zeros, here. Each row must be one of the model's
            :attr:`ModelInfo.modality_subsets`. None: every modality present (for a format 1
            model, the only way it runs).

        Returns
        -------
        dict of str to ndarray
            ``boxes [B, K, 4]``, ``scores [B, K]``, ``masks [B, K, M, M]``,
            ``num_detections [B]`` (docs/contracts.md, "The model file").

        Raises
        ------
        ModelError
            When ``presence`` has the wrong shape or values, or asks for a subset the model does
            not support.
        """
        info = self.info
        names = list(OUTPUT_NAMES)
        inputs = {m: batch[m] for m in info.modalities}
        size = int(inputs[info.modalities[0]].shape[0])
        rows = None if presence is None else check_presence(info, presence, size)
        if rows is not None and not rows.all():
            # The documented fill of an absent modality: zeros, whatever the caller put there
            # (copied only when not zeros already, as infer_chunk's batches are).
            for i, m in enumerate(info.modalities):
                absent = rows[:, i] == 0
                if absent.any() and np.any(inputs[m][absent]):
                    inputs[m] = np.array(inputs[m], np.float32, copy=True)
                    inputs[m][absent] = 0.0
        feed = dict(zip(input_names(info.modalities), (inputs[m] for m in info.modalities)))
        if info.has_presence_input:
            feed[PRESENCE_INPUT] = rows if rows is not None else np.ones((size, len(info.modalities)), np.float32)
        return dict(zip(names, self.session.run(names, feed)))


def check_presence(info: ModelInfo, presence, batch: int) -> np.ndarray:
    """Check a presence array against a model and return it as float32 ``[batch, M]``.

    Parameters
    ----------
    info : ModelInfo
        The model.
    presence : array-like
        ``[batch, M]`` or ``[M]`` of 0/1 (or bool), M = ``len(info.modalities)``, in model order.
    batch : int
        Tiles in the batch.

    Returns
    -------
    ndarray
        float32 ``[batch, M]`` of 0.0 and 1.0.

    Raises
    ------
    ModelError
        Wrong shape, values other than 0 and 1, or a row whose subset the model does not support
        (a format 1 model supports only the full set: it has no presence input).
    """
    m = len(info.modalities)
    rows = np.asarray(presence, np.float32)
    if rows.ndim == 1:
        rows = np.broadcast_to(rows, (batch, rows.shape[0]))
    if rows.shape != (batch, m):
        raise ModelError(f"presence must be [{batch}, {m}] (tiles x modalities {list(info.modalities)}), "
                         f"got {list(np.shape(presence))}")
    if not np.isin(rows, (0.0, 1.0)).all():
        raise ModelError("presence values must be 0 (absent) or 1 (present)")
    for row in np.unique(rows, axis=0):
        present = [mod for mod, flag in zip(info.modalities, row) if flag]
        if not info.supports(present):
            raise ModelError(_unsupported(info, present))
    return np.ascontiguousarray(rows, np.float32)


def _unsupported(info: ModelInfo, present: Sequence[str]) -> str:
    """Why a model cannot run with the modalities ``present``."""
    subsets = [list(s) for s in (info.modality_subsets or (info.modalities,))]
    if not info.has_presence_input:
        why = (f"it is a {info.format} file without a presence input, so it runs only with all of "
               f"{list(info.modalities)}; export a model trained with modality dropout")
    else:
        why = (f"it was trained for {subsets} (train with modality_dropout to map with fewer)")
    return f"model {info.path} cannot run with modalities {list(present)}: {why}"


def _resolve_providers(providers: Sequence[str]) -> list[str]:
    names = []
    for p in providers:
        name = PROVIDERS.get(p.lower(), p)
        if name not in PROVIDERS.values():
            raise ModelError(f"unknown execution provider {p!r}: use one of {', '.join(PROVIDERS)}")
        names.append(name)
    if "CPUExecutionProvider" not in names:
        # CPU is always last: nodes a GPU provider cannot run fall back to it.
        names.append("CPUExecutionProvider")
    return names


def check_providers(
    asked: Sequence[str], available: Sequence[str], in_use: Sequence[str] | None, require_gpu: bool
) -> list[str]:
    """Compare the GPU providers asked for with those available and those in use.

    onnxruntime-gpu silently runs on CPU when the CUDA/cuDNN/TensorRT libraries cannot be
    loaded, so a run asked to use a GPU must check what the session really uses.

    Parameters
    ----------
    asked : sequence of str
        onnxruntime provider names asked for, in order.
    available : sequence of str
        ``onnxruntime.get_available_providers()``.
    in_use : sequence of str or None
        ``session.get_providers()``; None before the session exists (then only ``available``
        is checked).
    require_gpu : bool
        Raise when a GPU provider is missing; otherwise log a warning.

    Returns
    -------
    list of str
        The asked providers that can be used (the missing GPU ones removed).

    Raises
    ------
    ModelError
        When ``require_gpu`` and an asked GPU provider is not available or not in use.
    """
    gpu_asked = [p for p in asked if p != "CPUExecutionProvider"]
    have = set(available) if in_use is None else set(in_use)
    missing = [p for p in gpu_asked if p not in have]
    if not missing:
        return list(asked)
    if in_use is None:
        what = f"this onnxruntime offers only {list(available)}"
        fix = "install rtsmap[gpu] (onnxruntime-gpu, not onnxruntime)"
    else:
        what = f"the session runs on {list(in_use)} (onnxruntime fell back silently)"
        fix = "check that the CUDA 12 / cuDNN 9 (and TensorRT) libraries are on the library path"
    message = f"asked for {missing} but {what}: {fix}, or run on CPU"
    if require_gpu:
        raise ModelError(message)
    log.warning("%s; going on with %s", message, [p for p in asked if p not in missing])
    return [p for p in asked if p not in missing]


def load_model(
    path: str | Path,
    providers: Sequence[str] = ("cpu",),
    *,
    require_gpu: bool = True,
    intra_op_threads: int = 0,
) -> Detector:
    """Open a model file for inference.

    Parameters
    ----------
    path : str or Path
        The ONNX file exported by ``rtsmap export``.
    providers : sequence of str
        Execution providers in order of preference: ``("cpu",)``, ``("cuda", "cpu")`` or
        ``("tensorrt", "cuda", "cpu")`` (onnxruntime's full names work too). CPU is added last
        when missing.
    require_gpu : bool
        When a GPU provider was asked for and cannot be used: raise (True) or log a warning and
        go on without it (False).
    intra_op_threads : int
        Threads onnxruntime uses inside one operator; 0 lets onnxruntime decide (all cores).
        Set it to the cores a Dask worker owns.

    Returns
    -------
    Detector

    Raises
    ------
    ModelError
        onnxruntime not installed, missing or unreadable file, invalid metadata, a graph that
        does not match its metadata, or (with ``require_gpu``) a GPU provider that is not usable.
    """
    ort = import_onnxruntime()
    path = Path(path)
    asked = _resolve_providers(providers)
    asked = check_providers(asked, ort.get_available_providers(), None, require_gpu)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1  # the graph is one chain of large ops; parallelism is within ops
    options.log_severity_level = 3  # keep onnxruntime's own warnings out of the run log
    # Idle intra-op threads spin by default, which steals the cores that chunk loading and the
    # other workers' tasks need; a pipeline shares its cores, so they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sha256 = readable_sha256(path)
    session, graph = _open_session_cached(ort, path, sha256, options, asked)
    in_use = session.get_providers()
    check_providers(asked, ort.get_available_providers(), in_use, require_gpu)
    info = model_info_from_session(session, path, sha256)
    log.info("model %s (%s %s, sha256 %s) on %s%s", path, info.name, info.version, info.sha256[:12], in_use,
             f", its optimized graph read from {graph}" if graph else "")
    return Detector(session=session, info=info, providers=tuple(in_use), graph=graph)


def _open_session_cached(ort, path: Path, sha256: str | None, options, providers: Sequence[str]):
    """Open a session of ``path``, from its optimized graph in the cache when there is one
    (:mod:`rtsmap.pipeline.graph_cache`), else optimizing it and keeping the graph for next time.

    Returns the session and the cached graph's path (None: opened from the model file itself).
    """
    kept = open_kept_graph(sha256, options, providers)
    if kept is not None:
        return kept
    target = graph_cache.graph_path(sha256, providers, ort.__version__) if sha256 else None
    staged = graph_cache.staging_path(target) if target is not None else None
    if staged is None:
        return open_session(path, options, providers), None
    options.optimized_model_filepath = str(staged)
    try:
        session = open_session(path, options, providers)
    except ModelError:
        # onnxruntime fails the whole session when it cannot save the graph (a full disk):
        # open it again without keeping the graph, so that only a bad model raises.
        staged.unlink(missing_ok=True)
        options.optimized_model_filepath = ""
        return open_session(path, options, providers), None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    graph_cache.publish(staged, target)
    return session, None


@dataclass(frozen=True)
class TileDetections:
    """The detections of one tile, in the pixels of the chunk's read window."""

    tile_id: str
    """Grid tile id (``pipeline.grid``)."""
    chunk_id: str
    """Grid chunk id."""
    boxes: np.ndarray
    """float32 ``[N, 4]``: x1, y1, x2, y2 in chunk pixels (clipped to the tile)."""
    scores: np.ndarray
    """float32 ``[N]``: detection scores, descending."""
    masks: tuple[np.ndarray, ...]
    """N bool arrays, each the box's pixel footprint: True inside the object."""
    offsets: tuple[tuple[int, int], ...]
    """N (row0, col0): chunk pixel of each mask's first row and column."""
    invalid_fractions: np.ndarray
    """float32 ``[N]``: share of each mask's pixels where any model modality had no valid data."""
    skipped: bool = False
    """True when no modality had a valid pixel in the tile, so the model was not run on it."""
    modalities: tuple[str, ...] = ()
    """The modalities the model ran with on this tile (its presence flags); empty when skipped."""

    def __len__(self) -> int:
        return len(self.scores)


def _check_stack(info: ModelInfo, stack) -> None:
    """Raise ModelError when a modality in the stack has another number of bands than the model."""
    band_names = getattr(stack, "band_names", None) or {}
    problems = []
    for m in info.modalities:
        if m not in stack.data:
            continue
        n = stack.data[m].shape[0]
        if n != len(info.bands[m]):
            wanted = info.bands[m]
            problems.append(f"'{m}' has {n} bands, the model takes {len(wanted)} ({', '.join(wanted)})")
        elif m in band_names and list(band_names[m]) != list(info.bands[m]):
            problems.append(f"'{m}' bands are {list(band_names[m])}, the model takes {list(info.bands[m])}")
    if problems:
        raise ModelError(f"chunk {stack.chunk_id} does not match model {info.path}: " + "; ".join(problems))


def _normalized_batch(
    info: ModelInfo, stack, windows: list[tuple[slice, slice]], presence: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Cut, normalize and zero-fill one batch of tiles for every model modality.

    ``presence`` ``[B, M]``: a tile's absent modalities stay zeros (the fill) even when the stack
    has them.
    """
    t = info.tile_size
    batch = {}
    for i, m in enumerate(info.modalities):
        out = np.zeros((len(windows), len(info.bands[m]), t, t), np.float32)
        if m in stack.data:
            norm = info.normalization[m]
            for b, (rows, cols) in enumerate(windows):
                if presence is None or presence[b, i]:
                    normalize(stack.data[m][:, rows, cols], stack.valid[m][rows, cols], norm.mean, norm.std,
                              out=out[b])
        # A modality absent from the chunk stays all zeros, as if every pixel were invalid.
        batch[m] = out
    return batch


def _tile_detections(
    outputs: Mapping[str, np.ndarray],
    b: int,
    tile,
    tile_size: int,
    score_threshold: float,
    mask_threshold: float,
    invalid: np.ndarray,
    modalities: tuple[str, ...] = (),
) -> TileDetections:
    """Turn one batch item's padded outputs into thresholded masks in chunk pixels."""
    row0, col0 = (int(v) for v in tile.offset)
    k = outputs["scores"].shape[1]
    n = min(max(int(outputs["num_detections"][b]), 0), k)
    boxes, scores, masks, offsets, invalid_fractions = [], [], [], [], []
    for d in range(n):
        score = float(outputs["scores"][b, d])
        if not keep(score, score_threshold):
            continue
        box = outputs["boxes"][b, d]
        prob, (r, c) = paste_mask(outputs["masks"][b, d], box, tile_size, tile_size)
        inside = keep(prob, mask_threshold)
        if not inside.any():
            continue
        r, c = r + row0, c + col0
        h, w = inside.shape
        boxes.append(np.clip(box, 0, tile_size) + np.array([col0, row0, col0, row0], np.float32))
        scores.append(score)
        masks.append(inside)
        offsets.append((r, c))
        invalid_fractions.append(float(invalid[r : r + h, c : c + w][inside].mean()))
    return TileDetections(
        tile_id=tile.id,
        chunk_id=tile.chunk_id,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        scores=np.asarray(scores, np.float32),
        masks=tuple(masks),
        offsets=tuple(offsets),
        invalid_fractions=np.asarray(invalid_fractions, np.float32),
        modalities=modalities,
    )


def _empty(tile, skipped: bool) -> TileDetections:
    return TileDetections(
        tile_id=tile.id,
        chunk_id=tile.chunk_id,
        boxes=np.zeros((0, 4), np.float32),
        scores=np.zeros(0, np.float32),
        masks=(),
        offsets=(),
        invalid_fractions=np.zeros(0, np.float32),
        skipped=skipped,
    )


def infer_chunk(
    detector: Detector,
    stack,
    tiles: Sequence,
    *,
    batch_size: int = 8,
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    presence: Sequence[str] | None = None,
) -> list[TileDetections]:
    """Detect slumps in every tile of a loaded chunk.

    Parameters
    ----------
    detector : Detector
        From :func:`load_model` (or any object with ``info`` and ``predict``).
    stack : ChunkStack
        The chunk's loaded data (``pipeline.load``): uses ``chunk_id``, ``data`` and ``valid``.
        A model modality absent from ``data`` is fed as zeros (all invalid).
    tiles : sequence of Tile
        The chunk's tiles (``pipeline.grid``): uses ``id``, ``chunk_id`` and ``offset``
        (row0, col0) in the chunk's read window; each is ``tile_size`` pixels square.
    batch_size : int
        Tiles per model call (the last batch may be smaller).
    score_threshold, mask_threshold : float, optional
        Override the model metadata's thresholds. A detection is kept when its score is at or
        above the score threshold, a mask pixel when its probability is at or above the mask
        threshold (``rtsmap.contract.keep``).
    presence : sequence of str, optional
        The modalities the chunk has (e.g. those with items for the year); the others are fed
        as absent (zero fill, presence 0) even when the stack holds them. Must be one of the
        model's :attr:`ModelInfo.modality_subsets`. Within it, a modality with no valid pixel
        in a tile is flagged absent for that tile when the smaller subset is supported too
        (otherwise it stays present, its invalid pixels zero, as partial coverage always is).
        None: every model modality is flagged present and one the stack lacks is fed as zeros
        (the behaviour before presence existed; a format 1 model knows nothing else).

    Returns
    -------
    list of TileDetections
        One per tile, in the order of ``tiles``. Tiles where no modality has a valid pixel are
        not run and come back empty with ``skipped=True``. ``modalities`` says what each tile
        ran with. ``invalid_fractions`` still count a pixel invalid where any model modality,
        absent ones included, lacks data.

    Raises
    ------
    ModelError
        When a modality in the stack has another number of bands than the model takes, or the
        model does not support the ``presence`` subset.
    ValueError
        When a tile does not lie inside the chunk's read window (a grid bug), or
        ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = detector.info
    score_threshold = info.score_threshold if score_threshold is None else float(score_threshold)
    mask_threshold = info.mask_threshold if mask_threshold is None else float(mask_threshold)
    chunk_present = None if presence is None else _chunk_presence(info, stack, presence)
    if not tiles:
        return []
    _check_stack(info, stack)
    any_valid, invalid = _validity(info, stack, chunk_present)
    results, to_run = _windows_to_run(stack, tiles, info.tile_size, any_valid)
    for start in range(0, len(to_run), batch_size):
        part = to_run[start : start + batch_size]
        windows = [w for _, w in part]
        if chunk_present is None:
            rows = None
            outputs = detector.predict(_normalized_batch(info, stack, windows))
        else:
            rows = np.stack([_tile_presence(info, stack, chunk_present, w) for w in windows])
            outputs = detector.predict(_normalized_batch(info, stack, windows, rows), rows)
        for b, (k, _) in enumerate(part):
            ran = info.modalities if rows is None else tuple(m for m, f in zip(info.modalities, rows[b]) if f)
            results[k] = _tile_detections(outputs, b, tiles[k], info.tile_size, score_threshold, mask_threshold,
                                          invalid, ran)
    return results


def _chunk_presence(info: ModelInfo, stack, presence: Sequence[str]) -> tuple[str, ...]:
    """The chunk's ``presence`` in model order, checked against the model and the loaded stack."""
    try:
        chunk_present = canonical_subset(info.modalities, presence)
    except ValueError as exc:
        raise ModelError(f"chunk {stack.chunk_id}: presence: {exc}") from None
    if not info.supports(chunk_present):
        raise ModelError(f"chunk {stack.chunk_id}: " + _unsupported(info, chunk_present))
    lacking = [m for m in chunk_present if m not in stack.data]
    if lacking:
        raise ValueError(f"chunk {stack.chunk_id}: presence names {lacking}, which the loaded stack lacks")
    return chunk_present


def _validity(info: ModelInfo, stack, chunk_present: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Chunk masks (any present modality valid, any model modality invalid)."""
    height, width = stack.shape
    # A pixel counts as invalid for a detection when any modality the model uses lacks data
    # (a modality absent from the chunk lacks it everywhere).
    loaded = [m for m in info.modalities if m in stack.data]
    any_valid = np.zeros((height, width), bool)
    all_valid = np.full((height, width), len(loaded) == len(info.modalities))
    for m in loaded:
        all_valid &= stack.valid[m]
        if chunk_present is None or m in chunk_present:
            any_valid |= stack.valid[m]
    return any_valid, ~all_valid


def _windows_to_run(
    stack, tiles: Sequence, t: int, any_valid: np.ndarray,
) -> tuple[list[TileDetections | None], list[tuple[int, tuple[slice, slice]]]]:
    """Results with tiles lacking valid data filled as skipped, and (index, window) of the tiles to run."""
    height, width = stack.shape
    results: list[TileDetections | None] = [None] * len(tiles)
    to_run = []
    for k, tile in enumerate(tiles):
        r0, c0 = (int(v) for v in tile.offset)
        if r0 < 0 or c0 < 0 or r0 + t > height or c0 + t > width:
            raise ValueError(
                f"tile {tile.id} at {tile.offset} does not fit in chunk {stack.chunk_id} "
                f"of {height}x{width} px"
            )
        window = (slice(r0, r0 + t), slice(c0, c0 + t))
        if any_valid[window].any():
            to_run.append((k, window))
        else:
            results[k] = _empty(tile, skipped=True)
    if len(to_run) < len(tiles):
        log.debug(
            "chunk %s: %d of %d tiles have no valid data, skipped",
            stack.chunk_id, len(tiles) - len(to_run), len(tiles),
        )
    return results, to_run


def _tile_presence(info: ModelInfo, stack, present: tuple[str, ...], window: tuple[slice, slice]) -> np.ndarray:
    """The presence row of one tile: the chunk's modalities, less those with no valid pixel here
    when the model supports the smaller subset (never fewer than one modality)."""
    here = [m for m in present if stack.valid[m][window].any()]
    chosen = tuple(here) if here and info.supports(here) else present
    return np.asarray([1.0 if m in chosen else 0.0 for m in info.modalities], np.float32)
