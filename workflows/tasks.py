"""What one Dask task does: load -> infer -> vectorize -> write a fragment, for one chunk-year.

Runs on workers. The model is loaded once per worker process (a module-level cache keyed by
the model file, its hash and the providers), not once per task; so is the asset signer
(``pipeline.stac.shared_signer``, keyed by the signing scheme), so that a worker fetches one
token per collection, not one per task.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
import pystac
import shapely

from rtsmap.pipeline.errors import AssetError
from rtsmap.pipeline.grid import Chunk
from rtsmap.pipeline.infer import Detector, infer_chunk, load_model
from rtsmap.pipeline.load import load_chunk
from rtsmap.pipeline.profiles import ModalityProfile
from rtsmap.pipeline.stac import shared_signer
from rtsmap.pipeline.vectorize import empty_polygons, vectorize_detections
from rtsmap.workflows.config import InferenceConfig
from rtsmap.workflows.fragments import FragmentStore

log = logging.getLogger(__name__)

_DETECTORS: dict[tuple[str, str, tuple[str, ...]], Detector] = {}


@dataclass(frozen=True)
class ChunkTask:
    """The inputs of one chunk-year task (plain data, cheap to send to a worker)."""

    chunk: Chunk
    """The chunk, with the tiles that touch the AOI."""
    year: int
    """Year mapped."""
    items: dict[str, tuple[dict[str, Any], ...]]
    """Modality -> STAC items (as dictionaries) that cover the chunk."""
    profiles: dict[str, ModalityProfile]
    """Modality -> profile, for every modality the model needs."""
    model_path: str
    """The exported model."""
    model_sha256: str
    """Its hash (part of the cache key, so a replaced file is reloaded)."""
    inference: InferenceConfig
    """Providers, batch size, minimum area."""
    store: FragmentStore
    """Where the fragment goes."""
    core_wkb: bytes
    """The area this chunk answers for: its tiles' cores clipped to the AOI (grid CRS, WKB)."""
    signing: str | None = None
    """Asset URL signing of the catalog (``planetary-computer``), applied on the worker at read time."""


def get_detector(path: str, sha256: str, inference: InferenceConfig) -> Detector:
    """The worker process's detector for this model, loaded on first use."""
    key = (path, sha256, tuple(inference.providers))
    if key not in _DETECTORS:
        _DETECTORS[key] = load_model(
            path,
            providers=tuple(inference.providers),
            require_gpu=inference.require_gpu,
            intra_op_threads=inference.threads,
        )
    return _DETECTORS[key]


def _valid_fraction(stack, modality: str) -> float:
    valid = stack.valid.get(modality)
    return float(valid.mean()) if valid is not None else 0.0


def _no_data_geometry(stack, core: shapely.Geometry) -> shapely.Geometry:
    """Where no modality has data, inside the chunk's core, as a (coarse) polygon."""
    import rasterio.features

    any_valid = np.zeros(stack.shape, dtype=bool)
    for valid in stack.valid.values():
        any_valid |= valid
    if any_valid.all():
        return shapely.Polygon()
    shapes = rasterio.features.shapes(
        (~any_valid).astype(np.uint8), mask=~any_valid, transform=stack.transform, connectivity=4
    )
    holes = shapely.union_all([shapely.geometry.shape(geom) for geom, _ in shapes])
    return shapely.intersection(core, holes)


THUMBNAIL_STEP = 4
"""Hillshade thumbnails for the quick-look maps keep every 4th pixel (40 m at 10 m)."""


def _keep_hillshade(store: FragmentStore, chunk_id: str, stack) -> None:
    """Keep a coarse hillshade of the chunk for the quick-look maps (once per chunk: the DEM is static)."""
    names = list(stack.band_names.get("dem", ()))
    if "hillshade" not in names or store.has_thumbnail(chunk_id):
        return
    image = stack.data["dem"][names.index("hillshade")][::THUMBNAIL_STEP, ::THUMBNAIL_STEP]
    valid = stack.valid["dem"][::THUMBNAIL_STEP, ::THUMBNAIL_STEP]
    image = np.where(valid, image, np.nan).astype(np.float16)
    store.write_thumbnail(chunk_id, image, stack.transform * Affine.scale(THUMBNAIL_STEP))


def _record(task: ChunkTask, status: str, reason: str = "", **values: Any) -> dict[str, Any]:
    """The summary record of a chunk-year (what the client collects and the fragment's marker holds)."""
    base = {"chunk_id": task.chunk.id, "year": task.year, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    return {**base, "status": status, "reason": reason, **values}


def _write_no_data(task: ChunkTask, core: shapely.Geometry, missing: list[str]) -> dict[str, Any]:
    """Record a chunk-year lacking a modality the model needs as no_data (never run with zeros)."""
    reason = f"no {', '.join(missing)} items for {task.year}"
    record = _record(task, "no_data", reason, n_detections=0, seconds=0.0)
    record["coverage"] = [{"status": "no_data", "reason": reason, "wkb": core.wkb_hex}]
    task.store.write(task.year, task.chunk.id, empty_polygons(task.chunk.spec.crs), record)
    return record


def signed_items(task: ChunkTask) -> dict[str, list[pystac.Item]]:
    """The task's items, their asset hrefs signed with the process's shared signer where needed.

    Signed URLs live only in this worker's memory; messages redact query strings.
    """
    items = {m: [pystac.Item.from_dict(d) for d in task.items[m]] for m in task.profiles}
    if task.signing:
        sign = shared_signer(task.signing)
        for modality_items in items.values():
            for item in modality_items:
                for asset in item.assets.values():
                    asset.href = sign(asset.href, item.collection_id)
    return items


def _infer(task: ChunkTask, stack) -> Any:
    """Detections of the chunk's tiles as polygons (the model cached per process)."""
    detector = get_detector(task.model_path, task.model_sha256, task.inference)
    detections = infer_chunk(detector, stack, task.chunk.tiles, batch_size=task.inference.batch_size)
    source_items = sorted({i for ids in stack.item_ids.values() for i in ids})
    return vectorize_detections(
        detections,
        stack.transform,
        stack.crs,
        year=task.year,
        min_area_m2=task.inference.min_area_m2,
        source_items=source_items,
    )


def _coverage(stack, core: shapely.Geometry) -> list[dict[str, str]]:
    """The chunk's coverage rows: processed where some modality had data, no_data elsewhere."""
    no_data = _no_data_geometry(stack, core)
    coverage = [{"status": "processed", "reason": "", "wkb": shapely.difference(core, no_data).wkb_hex}]
    if not no_data.is_empty:
        coverage.append({"status": "no_data", "reason": "no valid pixels in any modality", "wkb": no_data.wkb_hex})
    return coverage


def process_chunk_year(task: ChunkTask) -> dict[str, Any]:
    """Process one chunk-year and write its fragment; return a small summary record.

    A chunk-year whose fragment exists is skipped. Asset errors (a missing or corrupt file, an
    unreachable host) are recorded as this chunk's failure and returned, not raised, so the run
    goes on; anything else raises, and Dask retries the task.

    Parameters
    ----------
    task
        The chunk-year.

    Returns
    -------
    dict
        ``chunk_id``, ``year``, ``status`` (``skipped``, ``no_data``, ``failed``, ``processed``),
        ``reason`` and, when processed, counts, item ids, valid fractions and timings.
    """
    chunk, year, store = task.chunk, task.year, task.store
    if store.is_done(year, chunk.id):
        return {"chunk_id": chunk.id, "year": year, "status": "skipped"}
    started = time.perf_counter()
    core = shapely.from_wkb(task.core_wkb)
    missing = [m for m in task.profiles if not task.items.get(m)]
    if missing:
        return _write_no_data(task, core, missing)
    try:
        stack = load_chunk(chunk, signed_items(task), task.profiles, year)
    except AssetError as exc:
        record = _record(task, "failed", str(exc))
        store.write_failure(year, chunk.id, record)
        return record
    loaded = time.perf_counter()
    _keep_hillshade(store, chunk.id, stack)
    gdf = _infer(task, stack)
    inferred = time.perf_counter()
    coverage = _coverage(stack, core)
    finished = time.perf_counter()
    record = _record(
        task,
        "processed",
        n_detections=int(len(gdf)),
        n_tiles=len(chunk.tiles),
        items={m: list(ids) for m, ids in stack.item_ids.items()},
        valid_fraction={m: _valid_fraction(stack, m) for m in stack.valid},
        seconds={"load": loaded - started, "infer": inferred - loaded, "vectorize": finished - inferred,
                 "total": finished - started},
        coverage=coverage,
    )
    store.write(year, chunk.id, gdf, record)
    return record
