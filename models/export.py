"""Export the detector to ONNX with the metadata the pipeline configures itself from.

The file's inputs, outputs and ``metadata_props["rtsmap"]`` follow
docs/contracts.md ("The model file"); their names and the format version are
``rtsmap.contract``'s, the module the pipeline reads the file with. Files are written in format 2:
one input per modality plus ``presence`` ``[B, M]``, and the metadata lists the modality subsets
the model was trained for (``modality_subsets``; only the full set without modality dropout). The TorchScript-based exporter
(``dynamo=False``) is used: it exports torchvision's ``roi_align`` and ``nms``
to the standard ONNX ``RoiAlign`` and ``NonMaxSuppression`` operators and keeps
the batch axis dynamic.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from rtsmap.contract import MASK_SIZE, METADATA_KEY, OUTPUT_NAMES, PRESENCE_INPUT, READABLE_MODEL_FORMATS, input_names
from rtsmap.contract import MODEL_FORMAT as METADATA_FORMAT  # the name callers of this module know
from rtsmap.models.config import ModelConfig
from rtsmap.models.detector import RTSDetector

__all__ = ["METADATA_FORMAT", "METADATA_KEY", "MIN_OPSET", "OUTPUT_NAMES", "build_metadata", "export_onnx",
           "read_model_metadata", "weights_sha256"]

#: Lowest opset accepted: RoIAlign with aligned=True (half_pixel) needs opset 16,
#: and below it torchvision's exporter only warns and writes a shifted RoIAlign.
MIN_OPSET = 17


class _ExportWrapper(nn.Module):
    """Positional modality tensors and presence in, the four output tensors out (ONNX wants flat I/O)."""

    def __init__(self, model: RTSDetector) -> None:
        super().__init__()
        self.model = model
        self.modalities = list(model.config.modalities)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        *images, presence = tensors
        out = self.model(dict(zip(self.modalities, images)), presence=presence)
        return tuple(out[name] for name in OUTPUT_NAMES)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the bytes of every ``state_dict`` tensor, in key order.

    Parameters
    ----------
    model
        The model.

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rtsmap_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("rtsmap")
    except PackageNotFoundError:
        return "0+unknown"


def build_metadata(
    model: RTSDetector, config: ModelConfig, *, trained_on: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``rtsmap`` metadata object of docs/contracts.md for ``model``.

    Parameters
    ----------
    model
        The detector (for the weights hash).
    config
        Its configuration.
    trained_on
        Free text: what data the weights were trained on.
    extra
        More keys to store (may not replace the contract's keys).

    Returns
    -------
    dict
        JSON-safe metadata.

    Raises
    ------
    ValueError
        If ``extra`` would replace a contract key.
    """
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "name": config.name,
        "version": _rtsmap_version(),
        "fusion": config.fusion,
        "modalities": list(config.modalities),
        "bands": {m: list(b) for m, b in config.modalities.items()},
        "normalization": {
            m: {"mean": list(s["mean"]), "std": list(s["std"])} for m, s in config.normalization.items()
        },
        "tile_size": config.tile_size,
        "resolution": config.resolution,
        "max_detections": config.max_detections,
        "score_threshold": config.score_threshold,
        "candidate_score_threshold": config.candidate_score_threshold,
        "mask_threshold": config.mask_threshold,
        "classes": list(config.classes),
        "modality_subsets": [list(subset) for subset in config.supported_subsets],
        "weights_sha256": weights_sha256(model),
        "trained_on": trained_on,
        "config": config.to_dict(),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra or {}) & set(meta))
    if clash:
        raise ValueError(f"metadata_extra: key {clash[0]!r} is set by the exporter and cannot be replaced")
    meta.update(extra or {})
    return meta


def export_onnx(
    model: RTSDetector,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    trained_on: str = "untrained",
    metadata_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX model file with ``rtsmap`` metadata.

    Parameters
    ----------
    model
        The detector; exported in eval mode (its training mode is restored afterwards).
    config
        The model's configuration (must equal ``model.config``).
    path
        Output ``.onnx`` file (written to a temporary name, then renamed).
    opset
        ONNX opset, at least 17.
    trained_on
        What the weights were trained on (stored in the metadata).
    metadata_extra
        Further JSON-safe metadata keys.

    Returns
    -------
    dict
        The metadata written.

    Raises
    ------
    ValueError
        If ``opset`` is below 17, ``config`` is not the model's, or ``metadata_extra``
        clashes with a contract key.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset: {opset} is too low; RoIAlign(aligned=True) needs >= 16 and rtsmap requires >= {MIN_OPSET}"
        )
    if getattr(model, "config", None) != config:
        raise ValueError("config: differs from model.config; export the model with the config it was built from")
    meta = build_metadata(model, config, trained_on=trained_on, extra=metadata_extra)
    json.dumps(meta)  # fail early on non-JSON extras

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    was_training = model.training
    model.eval()
    try:
        t = config.tile_size
        # Batch 2 in the example, so no batch-1 special case gets traced into the graph.
        example = tuple(torch.zeros(2, c, t, t) for c in config.in_channels.values())
        example += (torch.ones(2, len(config.modalities)),)
        names = list(input_names(config.modalities, presence=True))
        dynamic = {n: {0: "batch"} for n in names + list(OUTPUT_NAMES)}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python ints taken from shapes; T and C are fixed
            # by design and the batch axis is checked by the parity tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _ExportWrapper(model),
                example,
                str(tmp),
                input_names=names,
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        _fix_output_shapes(proto, config)
        _keep_presence_input(proto, len(config.modalities))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps(meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return meta


def _keep_presence_input(proto: onnx.ModelProto, n_modalities: int) -> None:
    """Declare ``presence`` [batch, M] again where the tracer dropped it as unused (a one-modality
    model), so every format 2 file has the same inputs: the pipeline feeds it whatever the model."""
    if any(i.name == PRESENCE_INPUT for i in proto.graph.input):
        return
    proto.graph.input.append(onnx.helper.make_tensor_value_info(
        PRESENCE_INPUT, onnx.TensorProto.FLOAT, ["batch", n_modalities]))


def _fix_output_shapes(proto: onnx.ModelProto, config: ModelConfig) -> None:
    """Declare the outputs' fixed sizes (K, 4, 28): the tracer leaves them symbolic."""
    k = config.max_detections
    shapes = {"boxes": (k, 4), "scores": (k,), "masks": (k, MASK_SIZE, MASK_SIZE), "num_detections": ()}
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        sizes = shapes[output.name]
        if len(dims) != 1 + len(sizes):
            raise RuntimeError(f"export: output {output.name!r} has rank {len(dims)}, expected {1 + len(sizes)}")
        dims[0].dim_param = "batch"
        for dim, size in zip(dims[1:], sizes):
            dim.dim_value = size


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``rtsmap`` metadata of an exported model file.

    Parameters
    ----------
    path
        The ``.onnx`` file.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        If the file has no ``rtsmap`` metadata, or metadata of a format version the pipeline
        does not read (it reads ``rtsmap.contract.READABLE_MODEL_FORMATS``).
    """
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            meta = json.loads(entry.value)
            if not isinstance(meta, dict) or meta.get("format") not in READABLE_MODEL_FORMATS:
                got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
                raise ValueError(f"{path}: metadata format {got!r}, expected one of {list(READABLE_MODEL_FORMATS)}; "
                                 "export it again")
            return meta
    raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; was it written by models.export.export_onnx?")
