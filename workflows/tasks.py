"""What one Dask task does: for one chunk and all its missing years, load -> infer -> vectorize
-> write one fragment per chunk-year.

Runs on workers. The model is loaded once per worker process (a module-level cache keyed by
the model file, its hash and the providers), not once per task; so is the asset signer
(``pipeline.stac.shared_signer``, keyed by the signing scheme), so that a worker fetches one
token per collection, not one per task.
"""

from __future__ import annotations

import dataclasses
import json
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
    """The inputs of one chunk's task, all its years (plain data, cheap to send to a worker)."""

    chunk: Chunk
    """The chunk, with the tiles that touch the AOI."""
    years: tuple[int, ...]
    """Years still to map (those whose fragment is missing), ascending."""
    items: dict[int, dict[str, tuple[bytes, ...]]]
    """Year -> modality -> the slim items (JSON bytes of :class:`~rtsmap.pipeline.stac.ItemRecord`)
    that cover the chunk. A static modality's items are the same objects in every year (sent once)."""
    profiles: dict[str, ModalityProfile]
    """Modality -> profile, for every modality the model needs."""
    model_path: str
    """The exported model."""
    model_sha256: str
    """Its hash (part of the cache key, so a replaced file is reloaded)."""
    inference: InferenceConfig
    """Providers, batch size, minimum area."""
    store: FragmentStore
    """Where the fragments go (one per chunk-year, so resume works per year)."""
    core_wkb: bytes
    """The area this chunk answers for: its tiles' cores clipped to the AOI (grid CRS, WKB)."""
    signing: str | None = None
    """Asset URL signing of the catalog (``planetary-computer``), applied on the worker at read time."""


@dataclass(frozen=True)
class _Year:
    """One year of a chunk task (what the per-year helpers need)."""

    chunk: Chunk
    """The chunk."""
    year: int
    """The year."""
    store: FragmentStore
    """Where its fragment goes."""
    inference: InferenceConfig
    """Providers, batch size, minimum area."""
    model_path: str
    """The exported model."""
    model_sha256: str
    """Its hash."""


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


def _record(task: _Year, status: str, reason: str = "", **values: Any) -> dict[str, Any]:
    """The summary record of a chunk-year (what the client collects and the fragment's marker holds)."""
    base = {"chunk_id": task.chunk.id, "year": task.year, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    return {**base, "status": status, "reason": reason, **values}


def _write_no_data(task: _Year, core: shapely.Geometry, missing: list[str]) -> dict[str, Any]:
    """Record a chunk-year lacking a modality the model needs as no_data (never run with zeros)."""
    reason = f"no {', '.join(missing)} items for {task.year}"
    record = _record(task, "no_data", reason, n_detections=0, seconds=0.0)
    record["coverage"] = [{"status": "no_data", "reason": reason, "wkb": core.wkb_hex}]
    task.store.write(task.year, task.chunk.id, empty_polygons(task.chunk.spec.crs), record)
    return record


def signed_items(task: ChunkTask, year: int, modalities=None) -> dict[str, list[pystac.Item]]:
    """The task's items of one year as ``pystac.Item``, hrefs signed with the process's shared signer.

    Signed URLs live only in this worker's memory; messages redact query strings.
    """
    names = task.profiles if modalities is None else modalities
    items = {m: [pystac.Item.from_dict(json.loads(d), preserve_dict=False) for d in task.items[year].get(m, ())]
             for m in names}
    if task.signing:
        sign = shared_signer(task.signing)
        for modality_items in items.values():
            for item in modality_items:
                for asset in item.assets.values():
                    asset.href = sign(asset.href, item.collection_id)
    return items


def _infer(task: _Year, stack) -> Any:
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


def _static_stack(task: ChunkTask, static: dict[str, ModalityProfile]):
    """The static modalities (the DEM and its derivatives) of the chunk, loaded once for all years."""
    year = task.years[0]
    return load_chunk(task.chunk, signed_items(task, year, static), static, year)


def process_chunk(task: ChunkTask) -> list[dict[str, Any]]:
    """Process one chunk for all its missing years; write one fragment per chunk-year.

    The chunk's grid, its static modalities (DEM, slope, hillshade) and the model are made once
    for the task, not once per year. A year whose fragment exists is skipped (a rerun of a
    partly done chunk runs only the missing years). Asset errors are recorded as that
    chunk-year's failure (a static modality's as every year's) and returned, not raised, so the
    run goes on; anything else raises, and Dask retries the task.

    Parameters
    ----------
    task
        The chunk and its years.

    Returns
    -------
    list of dict
        One record per year: ``chunk_id``, ``year``, ``status`` (``skipped``, ``no_data``,
        ``failed``, ``processed``), ``reason`` and, when processed, counts, item ids, valid
        fractions and timings.
    """
    static = {m: p for m, p in task.profiles.items() if not p.per_year}
    per_year = {m: p for m, p in task.profiles.items() if p.per_year}
    core = shapely.from_wkb(task.core_wkb)
    records: list[dict[str, Any]] = []
    static_stack, static_error = None, None
    for year in task.years:
        one = _Year(task.chunk, year, task.store, task.inference, task.model_path, task.model_sha256)
        if task.store.is_done(year, task.chunk.id):
            records.append({"chunk_id": task.chunk.id, "year": year, "status": "skipped"})
            continue
        started = time.perf_counter()
        missing = [m for m in task.profiles if not task.items[year].get(m)]
        if missing:
            records.append(_write_no_data(one, core, missing))
            continue
        try:
            stack = load_chunk(task.chunk, signed_items(task, year, per_year), per_year, year)
            if static and static_stack is None:
                if static_error is not None:
                    raise static_error  # the DEM failed for an earlier year: it fails every year
                try:
                    static_stack = _static_stack(task, static)
                except AssetError as exc:
                    static_error = exc
                    raise
        except AssetError as exc:
            record = _record(one, "failed", str(exc))
            task.store.write_failure(year, task.chunk.id, record)
            records.append(record)
            continue
        if static_stack is not None:
            stack = dataclasses.replace(
                stack,
                data={**static_stack.data, **stack.data},
                valid={**static_stack.valid, **stack.valid},
                item_ids={**static_stack.item_ids, **stack.item_ids},
                band_names={**static_stack.band_names, **stack.band_names},
            )
        records.append(_process_stack(one, stack, core, started))
    return records


def _process_stack(one: _Year, stack, core: shapely.Geometry, started: float) -> dict[str, Any]:
    """Infer, vectorize and write one chunk-year whose stack is loaded."""
    loaded = time.perf_counter()
    _keep_hillshade(one.store, one.chunk.id, stack)
    gdf = _infer(one, stack)
    inferred = time.perf_counter()
    coverage = _coverage(stack, core)
    finished = time.perf_counter()
    record = _record(
        one,
        "processed",
        n_detections=int(len(gdf)),
        n_tiles=len(one.chunk.tiles),
        items={m: list(ids) for m, ids in stack.item_ids.items()},
        valid_fraction={m: _valid_fraction(stack, m) for m in stack.valid},
        seconds={"load": loaded - started, "infer": inferred - loaded, "vectorize": finished - inferred,
                 "total": finished - started},
        coverage=coverage,
    )
    one.store.write(one.year, one.chunk.id, gdf, record)
    return record
