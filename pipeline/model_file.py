"""Read and check the exported model file (ONNX plus its ``rtsmap`` metadata).

The ONNX file written by ``models/export.py`` is the whole contract between training and the
pipeline: ``metadata_props["rtsmap"]`` (a JSON object, see docs/contracts.md) says which
modalities and bands the network takes, how to normalize them, the tile size, the resolution
and the thresholds. This module turns that into a :class:`ModelInfo` and refuses files or data
that do not match, before any work starts. The metadata key, format versions and tensor names are
``rtsmap.contract``'s, the module the exporter writes them with. Format 2 files also take a
``presence`` input and list the modality subsets they run on (:attr:`ModelInfo.modality_subsets`);
format 1 files (the first demo model) run only with every modality.

onnxruntime is imported lazily, so ``pipeline`` can be imported (and plans made) on a machine
that has neither ``rtsmap[cpu]`` nor ``rtsmap[gpu]`` installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtsmap.contract import (
    METADATA_KEY,
    MODEL_FORMAT,
    MODEL_FORMAT_V1,
    OUTPUT_NAMES,
    PRESENCE_INPUT,
    READABLE_MODEL_FORMATS,
    canonical_subset,
    input_names,
)
from rtsmap.pipeline import graph_cache
from rtsmap.pipeline.errors import ModelError

log = logging.getLogger(__name__)

# The file's names and format version are the contract's (rtsmap/contract.py); re-exported here
# because callers of this module know them by these names.
__all__ = [
    "METADATA_KEY", "MODEL_FORMAT", "OUTPUT_NAMES", "BandNormalization", "ModelInfo", "check_compatible",
    "file_sha256", "import_onnxruntime", "model_info_from_session", "open_kept_graph", "open_session",
    "read_model_info", "readable_sha256",
]

Dim = int | str | None
"""One dimension of an ONNX input/output: a fixed size, a symbolic name, or unknown."""


@dataclass(frozen=True)
class BandNormalization:
    """Per-band normalization of one modality: ``(x - mean) / std``."""

    mean: tuple[float, ...]
    """Mean per band, in the model's band order."""
    std: tuple[float, ...]
    """Standard deviation per band (all > 0), in the model's band order."""


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline knows about a model file: its identity, metadata and signature."""

    path: Path
    """The ONNX file."""
    sha256: str
    """SHA-256 of the file's bytes (hex): identifies the model in fragment names and run metadata."""
    name: str
    """Model name from the metadata."""
    version: str
    """Model version from the metadata."""
    fusion: str
    """Fusion method the network was trained with (e.g. ``"rcma"``)."""
    trained_on: str
    """Free text: the data the model was trained on."""
    modalities: tuple[str, ...]
    """Input modalities in the model's order (e.g. ``("optical", "sar", "dem")``)."""
    bands: Mapping[str, tuple[str, ...]] = field(hash=False)
    """Band names per modality, in the channel order the model expects."""
    normalization: Mapping[str, BandNormalization] = field(hash=False)
    """Mean/std per band for each modality."""
    tile_size: int
    """Tile side T in pixels: inputs are ``[B, C, T, T]``."""
    resolution: float
    """Pixel size in CRS units (metres) the model was trained at."""
    max_detections: int
    """K: the fixed, padded number of detections per tile in the outputs."""
    score_threshold: float
    """Detections scoring at or above this are kept (``rtsmap.contract.keep``)."""
    mask_threshold: float
    """Mask probabilities at or above this are inside the object (``rtsmap.contract.keep``)."""
    classes: tuple[str, ...]
    """Class names (``("rts",)``)."""
    weights_sha256: str
    """SHA-256 of the weights the file was exported from (may be empty)."""
    input_shapes: Mapping[str, tuple[Dim, ...]] = field(hash=False)
    """ONNX input name -> shape as declared in the graph."""
    output_shapes: Mapping[str, tuple[Dim, ...]] = field(hash=False)
    """ONNX output name -> shape as declared in the graph."""
    metadata: Mapping[str, Any] = field(hash=False, repr=False)
    """The whole ``rtsmap`` metadata object, as read (for provenance records)."""
    format: str = MODEL_FORMAT_V1
    """The file's format version (``rtsmap.contract.READABLE_MODEL_FORMATS``)."""
    modality_subsets: tuple[tuple[str, ...], ...] = ()
    """The subsets of :attr:`modalities` the model runs on, the full set first, each in model
    order: the metadata's ``modality_subsets`` (format 2); only the full set for format 1.
    Empty only for a ModelInfo built by hand, read as the full set alone."""

    @property
    def has_presence_input(self) -> bool:
        """True when the graph takes ``presence`` (format 2): it can be told a modality is absent."""
        return PRESENCE_INPUT in self.input_shapes

    def supports(self, present: Sequence[str]) -> bool:
        """Whether the model runs with exactly these modalities present (any order).

        Parameters
        ----------
        present : sequence of str
            Modality names.

        Returns
        -------
        bool
            False also for names the model does not have.
        """
        try:
            subset = canonical_subset(self.modalities, present)
        except ValueError:
            return False
        return subset in (self.modality_subsets or (self.modalities,))

    @property
    def input_names(self) -> tuple[str, ...]:
        """ONNX input names, in graph order."""
        return tuple(self.input_shapes)

    @property
    def output_names(self) -> tuple[str, ...]:
        """ONNX output names, in graph order."""
        return tuple(self.output_shapes)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_onnxruntime():
    """Import onnxruntime, or raise a ModelError that says which extra to install.

    Returns
    -------
    module
        The ``onnxruntime`` module.

    Raises
    ------
    ModelError
        When onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            f"onnxruntime is not installed ({exc}): install rtsmap[cpu] or rtsmap[gpu]"
        ) from None
    return onnxruntime


def read_model_info(path: str | Path) -> ModelInfo:
    """Read and check a model file's metadata and signature without keeping a session.

    For plan time: opens a CPU session with graph optimizations off, reads what it needs and
    drops it. The optimized graph a worker keeps of the file (:mod:`rtsmap.pipeline.graph_cache`,
    same metadata and signature, keyed by the file's hash) opens in half the time (0.2 s
    against 0.4 s for the demo model) and is read instead when there is one.

    Parameters
    ----------
    path : str or Path
        The ONNX file.

    Returns
    -------
    ModelInfo

    Raises
    ------
    ModelError
        Missing file, not ONNX, missing or invalid metadata, or inputs/outputs that do not
        match the metadata.
    """
    ort = import_onnxruntime()
    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sha256 = readable_sha256(path)
    kept = open_kept_graph(sha256, options, graph_cache.CPU_ONLY)
    if kept is not None:
        try:
            return model_info_from_session(kept[0], path, sha256)
        except ModelError:
            pass  # a damaged graph: the file itself says what it holds
    session = open_session(path, options, ["CPUExecutionProvider"])
    return model_info_from_session(session, path, sha256)


def readable_sha256(path: Path) -> str | None:
    """The file's SHA-256, or None when it is missing or unreadable (opening it then says why)."""
    try:
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def open_kept_graph(sha256: str | None, options, providers: Sequence[str]):
    """A session of the optimized graph kept for the model with this hash
    (:mod:`rtsmap.pipeline.graph_cache`), opened with graph optimizations off.

    Parameters
    ----------
    sha256 : str or None
        The model file's hash (None: nothing kept).
    options : onnxruntime.SessionOptions
        Session options; their optimization level is left off only when a session is returned.
    providers : sequence of str
        Execution provider names.

    Returns
    -------
    tuple of (onnxruntime.InferenceSession, Path) or None
        The session and the graph's path; None when none is kept or it cannot be opened (a
        damaged file: the caller opens the model itself, and may keep its graph anew).
    """
    ort = import_onnxruntime()
    kept = graph_cache.graph_path(sha256, providers, ort.__version__) if sha256 else None
    if kept is None or not kept.is_file():
        return None
    level = options.graph_optimization_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once already
    try:
        return open_session(kept, options, providers), kept
    except ModelError:
        log.info("optimized graph %s cannot be opened: the model file is read instead", kept)
        options.graph_optimization_level = level
        return None


def open_session(path: Path, options, providers: Sequence[str]):
    """Create an ``onnxruntime.InferenceSession``, turning file problems into ModelError.

    Parameters
    ----------
    path : Path
        The ONNX file.
    options : onnxruntime.SessionOptions
        Session options.
    providers : sequence of str
        Execution provider names, in order of preference.

    Returns
    -------
    onnxruntime.InferenceSession

    Raises
    ------
    ModelError
        When the file is missing or onnxruntime cannot load it.
    """
    ort = import_onnxruntime()
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist: give the path of an exported .onnx file")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model file {path} cannot be loaded by onnxruntime ({first_line}): "
            "is it an ONNX model exported with `rtsmap export`?"
        ) from None


def model_info_from_session(session, path: Path, sha256: str | None = None) -> ModelInfo:
    """Build a ModelInfo from an open session: parse the metadata, check the signature.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        A session of the model file.
    path : Path
        The file (for messages and the hash).
    sha256 : str, optional
        The file's hash when already known.

    Returns
    -------
    ModelInfo

    Raises
    ------
    ModelError
        Missing or invalid metadata, or a graph signature that does not match it.
    """
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ModelError(
            f"model file {path} has no '{METADATA_KEY}' metadata: it was not exported by "
            "`rtsmap export` (or by an older version); export it again"
        )
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"model file {path}: the '{METADATA_KEY}' metadata is not valid JSON ({exc})"
        ) from None
    if not isinstance(meta, dict):
        raise ModelError(f"model file {path}: the '{METADATA_KEY}' metadata is not a JSON object")
    if meta.get("format") not in READABLE_MODEL_FORMATS:
        raise ModelError(
            f"model file {path}: metadata format is {meta.get('format')!r}, this pipeline reads "
            f"{' and '.join(repr(f) for f in READABLE_MODEL_FORMATS)}; export the model again with this "
            "version of rtsmap"
        )
    problems = _metadata_problems(meta)
    if problems:
        raise ModelError(f"model file {path}: invalid '{METADATA_KEY}' metadata: " + "; ".join(problems))

    modalities = tuple(meta["modalities"])
    bands = {m: tuple(meta["bands"][m]) for m in modalities}
    normalization = {
        m: BandNormalization(
            mean=tuple(float(v) for v in meta["normalization"][m]["mean"]),
            std=tuple(float(v) for v in meta["normalization"][m]["std"]),
        )
        for m in modalities
    }
    input_shapes = {i.name: tuple(i.shape) for i in session.get_inputs()}
    output_shapes = {o.name: tuple(o.shape) for o in session.get_outputs()}
    input_types = {i.name: i.type for i in session.get_inputs()}

    problems = _signature_problems(meta, bands, input_shapes, input_types, output_shapes)
    if meta["format"] == MODEL_FORMAT_V1:
        subsets = (modalities,)
    else:
        subsets = tuple(canonical_subset(modalities, s) for s in meta["modality_subsets"])
    if problems:
        raise ModelError(
            f"model file {path}: the graph does not match its metadata: " + "; ".join(problems)
        )
    return ModelInfo(
        path=path,
        sha256=sha256 if sha256 is not None else file_sha256(path),
        name=str(meta.get("name", "")),
        version=str(meta.get("version", "")),
        fusion=str(meta.get("fusion", "")),
        trained_on=str(meta.get("trained_on", "")),
        modalities=modalities,
        bands=bands,
        normalization=normalization,
        tile_size=int(meta["tile_size"]),
        resolution=float(meta["resolution"]),
        max_detections=int(meta["max_detections"]),
        score_threshold=float(meta["score_threshold"]),
        mask_threshold=float(meta["mask_threshold"]),
        classes=tuple(meta.get("classes", ("rts",))),
        weights_sha256=str(meta.get("weights_sha256", "")),
        input_shapes=input_shapes,
        output_shapes=output_shapes,
        metadata=meta,
        format=str(meta["format"]),
        modality_subsets=subsets,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metadata_problems(meta: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a metadata object (empty when it is usable)."""
    problems = []
    modalities = meta.get("modalities")
    if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
        return ["'modalities' must be a non-empty list of names"]
    if len(set(modalities)) != len(modalities):
        problems.append(f"'modalities' has duplicates: {modalities}")
    bands = meta.get("bands")
    norm = meta.get("normalization")
    if not isinstance(bands, dict):
        return problems + ["'bands' must be an object: modality -> list of band names"]
    if not isinstance(norm, dict):
        return problems + ["'normalization' must be an object: modality -> {mean, std}"]
    for m in modalities:
        names = bands.get(m)
        if not isinstance(names, list) or not names or not all(isinstance(b, str) for b in names):
            problems.append(f"'bands.{m}' must be a non-empty list of band names")
            continue
        stats = norm.get(m)
        if not isinstance(stats, dict):
            problems.append(f"'normalization.{m}' is missing")
            continue
        for key in ("mean", "std"):
            values = stats.get(key)
            if not isinstance(values, list) or len(values) != len(names) or not all(map(_is_number, values)):
                problems.append(f"'normalization.{m}.{key}' must be {len(names)} numbers (one per band)")
            elif key == "std" and any(v <= 0 for v in values):
                problems.append(f"'normalization.{m}.std' must be > 0, got {values}")
    for key in ("tile_size", "max_detections"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"'{key}' must be a positive integer, got {value!r}")
    if not _is_number(meta.get("resolution")) or meta["resolution"] <= 0:
        problems.append(f"'resolution' must be a positive number, got {meta.get('resolution')!r}")
    for key in ("score_threshold", "mask_threshold"):
        value = meta.get(key)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            problems.append(f"'{key}' must be a number in [0, 1], got {value!r}")
    if meta.get("format") != MODEL_FORMAT_V1:
        problems += _subset_problems(meta.get("modality_subsets"), modalities)
    return problems


def _subset_problems(subsets: Any, modalities: list[str]) -> list[str]:
    """What is wrong with a format 2 file's ``modality_subsets`` (empty when usable)."""
    want = f"'modality_subsets' must be a list of non-empty lists of modalities, the full set {modalities} first"
    if not isinstance(subsets, list) or not subsets:
        return [want]
    seen = set()
    for subset in subsets:
        if not isinstance(subset, list) or not subset or not all(isinstance(m, str) for m in subset):
            return [want]
        try:
            seen.add(canonical_subset(modalities, subset))
        except ValueError as exc:
            return [f"'modality_subsets': {exc}"]
    if canonical_subset(modalities, subsets[0]) != tuple(modalities):
        return [want]
    if len(seen) != len(subsets):
        return [f"'modality_subsets' lists a subset twice: {subsets}"]
    return []


def _signature_problems(meta, bands, input_shapes, input_types, output_shapes) -> list[str]:
    """Differences between the graph's inputs/outputs and what the metadata promises."""
    problems = []
    tile = meta["tile_size"]
    presence = meta["format"] != MODEL_FORMAT_V1
    if set(input_shapes) != set(input_names(meta["modalities"], presence=presence)):
        what = f"metadata modalities are {meta['modalities']}"
        if presence:
            what += f" plus '{PRESENCE_INPUT}' (format {meta['format']})"
        problems.append(f"inputs are {sorted(input_shapes)}, {what}")
    if presence and PRESENCE_INPUT in input_shapes:
        shape, m = input_shapes[PRESENCE_INPUT], len(meta["modalities"])
        if input_types[PRESENCE_INPUT] != "tensor(float)":
            problems.append(f"input '{PRESENCE_INPUT}' is {input_types[PRESENCE_INPUT]}, expected tensor(float)")
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != m):
            problems.append(f"input '{PRESENCE_INPUT}' has shape {list(shape)}, expected [B, {m}]")
    for m, shape in input_shapes.items():
        if m not in bands:
            continue
        if input_types[m] != "tensor(float)":
            problems.append(f"input '{m}' is {input_types[m]}, expected tensor(float)")
        expected = (None, len(bands[m]), tile, tile)
        want = f"[B, {len(bands[m])}, {tile}, {tile}]"
        if len(shape) != 4:
            problems.append(f"input '{m}' has shape {list(shape)}, expected {want}")
            continue
        for axis in (1, 2, 3):
            # A symbolic dimension cannot be checked here; a fixed one must match.
            if isinstance(shape[axis], int) and shape[axis] != expected[axis]:
                problems.append(f"input '{m}' has shape {list(shape)}, expected {want}")
                break
    missing = [name for name in OUTPUT_NAMES if name not in output_shapes]
    if missing:
        problems.append(f"outputs {missing} are missing (has {sorted(output_shapes)})")
    k = meta["max_detections"]
    for name, axis_k in (("boxes", 1), ("scores", 1), ("masks", 1)):
        shape = output_shapes.get(name)
        fixed = shape is not None and len(shape) > axis_k and isinstance(shape[axis_k], int)
        if fixed and shape[axis_k] != k:
            problems.append(f"output '{name}' has {shape[axis_k]} detections, metadata max_detections is {k}")
    return problems


def check_compatible(
    info: ModelInfo,
    stack_band_names: Mapping[str, Sequence[str]],
    resolution: float,
    tile_size: int,
) -> None:
    """Refuse data that the model was not made for, listing every difference.

    Modalities present in the data but not used by the model are ignored. A model modality the
    data lacks is a difference unless the modalities the data has are one of the model's
    :attr:`ModelInfo.modality_subsets` (a model trained with modality dropout).

    Parameters
    ----------
    info : ModelInfo
        The model.
    stack_band_names : mapping of str to sequence of str
        Modality -> band names the loader will produce (model-facing names, in order).
    resolution : float
        The grid's pixel size in CRS units.
    tile_size : int
        The grid's tile side in pixels.

    Raises
    ------
    ModelError
        When anything differs; the message lists all differences.
    """
    differences = []
    can_lack = info.supports([m for m in info.modalities if m in stack_band_names])
    for m in info.modalities:
        wanted = list(info.bands[m])
        if m not in stack_band_names:
            if not can_lack:
                runs_on = "; it runs only with all of them" if len(info.modality_subsets) <= 1 else (
                    f"; it runs with {[list(s) for s in info.modality_subsets]}")
                differences.append(f"modality '{m}' (bands {', '.join(wanted)}) is needed but the data has none{runs_on}")
        elif list(stack_band_names[m]) != wanted:
            differences.append(f"'{m}' bands: model {wanted}, data {list(stack_band_names[m])}")
    if not math.isclose(float(resolution), info.resolution, rel_tol=1e-9, abs_tol=1e-9):
        differences.append(f"resolution: model {info.resolution:g}, data grid {float(resolution):g}")
    if int(tile_size) != info.tile_size:
        differences.append(f"tile size: model {info.tile_size} px, data grid {int(tile_size)} px")
    if differences:
        raise ModelError(
            f"model {info.path} does not match the data:\n  - "
            + "\n  - ".join(differences)
            + "\nUse a model exported for this data, or change the run's grid/profiles to match the model."
        )
