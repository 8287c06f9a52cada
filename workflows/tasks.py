"""What one Dask task does: for one chunk and all its missing years, load -> infer -> vectorize
-> write one fragment per chunk-year.

Runs on workers. The model is loaded once per worker process (a module-level cache keyed by
the model file, its hash and the providers), not once per task; so is the asset signer
(``pipeline.stac.shared_signer``, keyed by the signing scheme), so that a worker fetches one
token per collection, not one per task.

A chunk-year lacking some modality's items runs with the others when the model was trained for
that subset (``ModelInfo.supports``), else it is no_data; records and coverage rows name the
modalities used. The next year loads on one background thread while this one is inferred;
:func:`process_chunks` runs several chunks in one task with one such chain through all their
years, so a chunk's first year loads while the previous chunk's last year is inferred.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
import pystac
import shapely

from rtsmap.pipeline.aoi import polygonal_parts
from rtsmap.pipeline.errors import AssetError
from rtsmap.pipeline.grid import Chunk
from rtsmap.pipeline.infer import infer_chunk
from rtsmap.pipeline.load import load_chunk
from rtsmap.pipeline.profiles import ModalityProfile
from rtsmap.pipeline.stac import shared_signer
from rtsmap.pipeline.vectorize import vectorize_detections
from rtsmap.workflows.config import InferenceConfig
from rtsmap.workflows.detectors import get_detector
from rtsmap.workflows.fragments import FragmentStore

log = logging.getLogger(__name__)

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
    """Asset URL signing of the catalog (``planetary-computer``), applied on the worker at read time
    to the modalities whose profile names no signing of its own (``ModalityProfile.signing``)."""


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
    store.write_thumbnail(chunk_id, image, stack.transform @ Affine.scale(THUMBNAIL_STEP))


def _record(task: _Year, status: str, reason: str = "", **values: Any) -> dict[str, Any]:
    """The summary record of a chunk-year (what the client collects and the fragment's marker holds)."""
    base = {"chunk_id": task.chunk.id, "year": task.year, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    return {**base, "status": status, "reason": reason, **values}


def _write_no_data(task: _Year, core: shapely.Geometry, missing: list[str], needs: str = "") -> dict[str, Any]:
    """Record a chunk-year lacking a modality the model needs as no_data (never run with zeros).

    ``needs`` says why the model cannot do without it (appended to the reason).
    """
    reason = f"no {', '.join(missing)} items for {task.year}" + (f": {needs}" if needs else "")
    record = _record(task, "no_data", reason, n_detections=0, seconds=0.0, modalities="")
    record["coverage"] = [{"status": "no_data", "reason": reason, "modalities": "", "wkb": core.wkb_hex}]
    task.store.write(task.year, task.chunk.id, None, record, crs=task.chunk.spec.crs)
    return record


def _needs(info, missing: list[str]) -> str:
    """Why a model cannot map without the ``missing`` modalities (the no_data reason's tail)."""
    if len(info.modality_subsets) <= 1:
        return f"model {info.name} needs {', '.join(missing)} (it runs only with all of {list(info.modalities)})"
    return (f"model {info.name} needs {', '.join(missing)} here "
            f"(it runs with {['+'.join(s) for s in info.modality_subsets]})")


def modality_label(modalities) -> str:
    """The modalities a coverage part was mapped with, as written in records: ``optical+sar+dem``."""
    return "+".join(modalities)


def signed_items(task: ChunkTask, year: int, modalities=None) -> dict[str, list[pystac.Item]]:
    """The task's items of one year as ``pystac.Item``, hrefs signed with the process's shared signer
    of each modality's signing scheme.

    Signed URLs live only in this worker's memory; messages redact query strings.
    """
    names = task.profiles if modalities is None else modalities
    items = {m: [pystac.Item.from_dict(json.loads(d), preserve_dict=False) for d in task.items[year].get(m, ())]
             for m in names}
    signers: dict[str, Any] = {}
    for modality, modality_items in items.items():
        # Each modality's own catalog says how its hrefs are signed (optical from Earth Search
        # unsigned, SAR from Planetary Computer signed); a profile made in code may leave it to the task.
        scheme = task.profiles[modality].signing or task.signing
        if not scheme:
            continue
        if scheme not in signers:
            signers[scheme] = shared_signer(scheme)
        sign = signers[scheme]
        for item in modality_items:
            for asset in item.assets.values():
                asset.href = sign(asset.href, item.collection_id)
    return items


def _infer(task: _Year, stack, present: list[str]) -> list:
    """The per-tile detections of the chunk (the model cached per process); the model runs with
    the modalities ``present`` (those with items)."""
    detector = get_detector(task.model_path, task.model_sha256, task.inference)
    return infer_chunk(detector, stack, task.chunk.tiles, batch_size=task.inference.batch_size, presence=present)


def _vectorize(task: _Year, stack, detections: list):
    """The detections of a chunk-year as polygons (one row each, disjoint within a tile)."""
    source_items = sorted({i for ids in stack.item_ids.values() for i in ids})
    return vectorize_detections(
        detections,
        stack.transform,
        stack.crs,
        year=task.year,
        min_area_m2=task.inference.min_area_m2,
        source_items=source_items,
    )


def _tile_cell(tile, spec) -> shapely.Geometry:
    """The part of the chunk a tile answers for: its stride cell (as ``run.chunk_core`` cuts it)."""
    step = spec.stride_px * spec.resolution
    return shapely.box(tile.bounds[0], tile.bounds[3] - step, tile.bounds[0] + step, tile.bounds[3])


GAP_STEP = 4
"""Where a modality has no data inside a processed part is traced every 4th pixel (40 m at 10 m)."""
MIN_GAP_PX = 6
"""Gaps of fewer traced pixels (~1 ha at 10 m) are folded into their surroundings
(``rasterio.features.sieve``): SAR layover specks or DEM voids of a few pixels name no part."""


def _coverage(stack, core: shapely.Geometry, chunk: Chunk | None = None, detections=(),
              present: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The chunk's coverage rows: processed where some modality had data, no_data elsewhere.

    Each processed row names the modalities that had data where the model ran (``modalities``),
    one row per set. Per tile, these are the modalities it ran with (a model trained with
    modality dropout drops, per tile, a modality with no valid pixel in it; skipped tiles count
    as ``present``, the chunk's modalities); within a tile, a modality's gaps of about a
    hectare or more (cloud, a swath edge, a DEM void) are split off as a part mapped without it.
    """
    no_data = _no_data_geometry(stack, core)
    processed = shapely.difference(core, no_data)
    groups: dict[tuple[str, ...], list] = {}
    for tile, found in zip(chunk.tiles if chunk is not None else (), detections):
        groups.setdefault(tuple(found.modalities) or tuple(present), []).append(tile)
    if len(groups) <= 1:
        parts = [(tuple(next(iter(groups), present)), processed)]
    else:
        parts = [(modalities, shapely.intersection(processed, shapely.union_all([_tile_cell(t, chunk.spec) for t in tiles])))
                 for modalities, tiles in groups.items()]
    by_label: dict[tuple[str, ...], list] = {}
    for modalities, part in parts:
        for label, piece in _split_by_gaps(stack, part, modalities):
            by_label.setdefault(label, []).append(piece)
    coverage = []
    for label, pieces in sorted(by_label.items(), key=lambda kv: (-len(kv[0]), kv[0])):
        part = _polygonal(shapely.union_all(pieces))
        if not part.is_empty:
            coverage.append({"status": "processed", "reason": "", "modalities": modality_label(label),
                             "wkb": part.wkb_hex})
    no_data = _polygonal(no_data)
    if not no_data.is_empty:
        coverage.append({"status": "no_data", "reason": "no valid pixels in any modality", "modalities": "",
                         "wkb": no_data.wkb_hex})
    return coverage


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """The (multi)polygon part of an overlay result: cuts along shared edges can leave lines or
    points in a collection, which a MULTIPOLYGON coverage layer must not hold."""
    if shapely.get_type_id(geom) in (3, 6):  # Polygon, MultiPolygon
        return geom
    parts = polygonal_parts(geom)
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _split_by_gaps(stack, area: shapely.Geometry, modalities: tuple[str, ...]) -> list[tuple[tuple[str, ...], shapely.Geometry]]:
    """``area`` (mapped with ``modalities``) cut into (modalities with data there, part).

    Traced every :data:`GAP_STEP` pixels; gaps under :data:`MIN_GAP_PX` traced pixels are
    sieved away. Pixels where none of them has data are the chunk's no_data, not cut here.
    """
    import rasterio.features

    partial = [m for m in modalities if m in stack.valid and not stack.valid[m][::GAP_STEP, ::GAP_STEP].all()]
    if area.is_empty or not partial:
        return [(modalities, area)]
    code = np.zeros(stack.valid[partial[0]][::GAP_STEP, ::GAP_STEP].shape, np.uint8)
    for bit, m in enumerate(modalities):
        valid = stack.valid.get(m)
        code |= (np.ones_like(code, bool) if valid is None else valid[::GAP_STEP, ::GAP_STEP]).astype(np.uint8) << bit
    full = (1 << len(modalities)) - 1
    code = rasterio.features.sieve(code, size=MIN_GAP_PX, connectivity=4)
    cut = (code != full) & (code != 0)
    if not cut.any():
        return [(modalities, area)]
    transform = stack.transform @ Affine.scale(GAP_STEP)
    shapes: dict[int, list] = {}
    for geom, value in rasterio.features.shapes(code, mask=cut, transform=transform, connectivity=4):
        shapes.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    out, rest = [], area
    for value, geoms in sorted(shapes.items(), reverse=True):
        piece = shapely.intersection(area, shapely.union_all(geoms))
        if not piece.is_empty:
            out.append((tuple(m for bit, m in enumerate(modalities) if value >> bit & 1), piece))
            rest = shapely.difference(rest, piece)
    return [(modalities, rest)] + out


class _Loader:
    """Loads a chunk's years; the static modalities (the DEM) once for all of them.

    Used by one thread at a time (the task's thread, or its one prefetch thread, whose loads
    are waited for in order), so the static stack needs no lock.
    """

    def __init__(self, task: ChunkTask, static: dict[str, ModalityProfile], per_year: dict[str, ModalityProfile]):
        self.task, self.static, self.per_year = task, static, per_year
        self.static_stack = None
        self.static_error: AssetError | None = None

    def load(self, year: int, present: list[str], *, parallel: bool = False) -> tuple[Any, float]:
        """The stack of one year with the modalities ``present``, and the seconds it took.

        ``parallel``: load the static modalities (when not loaded yet) on a thread of their own
        beside the year's: for a load nothing else runs beside (a task's first, which the model
        waits for); GDAL reads and warps without the GIL.

        Raises
        ------
        AssetError
            An item could not be read (a static item's error is raised for every year).
        """
        started = time.perf_counter()
        per_year = {m: p for m, p in self.per_year.items() if m in present}
        static = {m: p for m, p in self.static.items() if m in present}

        def load_static():
            return load_chunk(self.task.chunk, signed_items(self.task, year, static), static, year)

        static_load = None
        if static and self.static_stack is None and self.static_error is None and per_year and parallel:
            static_load = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-static")
            load_static = static_load.submit(load_static).result
        try:
            stack = load_chunk(self.task.chunk, signed_items(self.task, year, per_year), per_year, year) if per_year else None
        finally:
            if static_load is not None:
                static_load.shutdown(wait=True)
        if static:
            if self.static_stack is None:
                if self.static_error is not None:
                    raise self.static_error  # the DEM failed for an earlier year: it fails every year
                try:
                    self.static_stack = load_static()  # or the result of the load on the thread
                except AssetError as exc:
                    self.static_error = exc
                    raise
            stack = self.static_stack if stack is None else dataclasses.replace(
                stack,
                data={**self.static_stack.data, **stack.data},
                valid={**self.static_stack.valid, **stack.valid},
                item_ids={**self.static_stack.item_ids, **stack.item_ids},
                band_names={**self.static_stack.band_names, **stack.band_names},
            )
        return stack, time.perf_counter() - started


CHAIN_CHUNKS = 4
"""Chunks one Dask task processes at most (:func:`process_chunks`): its prefetch chain then waits
for one first load in four instead of one per chunk. The tail of a run gets shorter chains
(:func:`chain_length`) so that every worker still has work."""


def chain_length(waiting: int, workers: int, longest: int = CHAIN_CHUNKS) -> int:
    """How many of the ``waiting`` tasks (those made and not submitted) to chain into the next
    Dask task: ``longest`` while each of the ``workers`` can get as many, else the waiting tasks
    shared out (at least 1; 0 when none wait)."""
    if waiting <= 0:
        return 0
    return max(1, min(longest, math.ceil(waiting / max(1, workers))))


def process_chunk(task: ChunkTask, *, prefetch: bool = True) -> list[dict[str, Any]]:
    """Process one chunk for all its missing years; write one fragment per chunk-year.

    The chunk's grid, its static modalities (DEM, slope, hillshade) and the model are made once
    for the task, not once per year. A year whose fragment exists is skipped (a rerun of a
    partly done chunk runs only the missing years). A year lacking some modality's items runs
    with the others when the model supports that subset (``ModelInfo.supports``: trained with
    modality dropout); else it is no_data, the reason naming what is missing. While a year is
    inferred, the next one loads on one background thread (at most one year ahead). Asset
    errors, of a background load too, are recorded as that chunk-year's failure (a static
    modality's as every year's) and returned, not raised, so the run goes on; anything else
    raises, and Dask retries the task. A year is vectorized and written on the same thread
    while the next one is inferred.

    Parameters
    ----------
    task
        The chunk and its years.
    prefetch
        Load the next year while this one is inferred (False: load each year when its turn comes;
        the fragments are the same).

    Returns
    -------
    list of dict
        One record per year: ``chunk_id``, ``year``, ``status`` (``skipped``, ``no_data``,
        ``failed``, ``processed``), ``reason`` and, when processed, the ``modalities`` used
        (``optical+sar+dem``), counts, item ids, valid fractions and timings.
    """
    return process_chunks([task], prefetch=prefetch)[0]


def process_chunks(tasks: list[ChunkTask], *, prefetch: bool = True) -> list[list[dict[str, Any]]]:
    """Process several chunks, one after the other, as :func:`process_chunk` does each.

    One prefetch chain runs through them: while the last year of a chunk is inferred, the first
    year of the next chunk loads, so only the first chunk's first load is waited for (a task of
    one chunk waits for every chunk's first load). On the same thread, after that load, a
    chunk-year whose model has run is vectorized, covered and written while the next one is
    inferred; the model's thread does nothing but the model. The fragments are those
    :func:`process_chunk` writes for each task alone, loading in turn. At most two chunk-years'
    stacks (and two chunks' static modalities) are held at once.

    Parameters
    ----------
    tasks
        The chunks and their years, in the order they are processed.
    prefetch
        Load the next chunk-year while this one is inferred.

    Returns
    -------
    list of list of dict
        Per task, what :func:`process_chunk` returns for it.
    """
    records: list[dict[int, dict[str, Any]]] = []
    jobs: list[tuple[int, int, list[str]]] = []  # (task index, year, modalities to load), in order
    loaders: list[_Loader | None] = []
    cores = []
    for i, task in enumerate(tasks):
        done, to_load = _decide_years(task)
        records.append(done)
        jobs += [(i, year, present) for year, present in to_load]
        loaders.append(_Loader(task, {m: p for m, p in task.profiles.items() if not p.per_year},
                               {m: p for m, p in task.profiles.items() if p.per_year}))
        cores.append(shapely.from_wkb(task.core_wkb))
    last_job = {i: k for k, (i, _, _) in enumerate(jobs)}  # a chunk's loader is dropped after its last year

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        ahead = None  # the next chunk-year's load, submitted while this one is inferred
        # The chunk-year inferred last: (task index, year, its vectorize-and-write on the loader
        # thread, which runs while the next chunk-year is inferred).
        writing: tuple[int, int, Any] | None = None
        for k, (i, year, present) in enumerate(jobs):
            task = tasks[i]
            one = _Year(task.chunk, year, task.store, task.inference, task.model_path, task.model_sha256)
            started = time.perf_counter()
            try:
                # Only a load nothing runs beside (the first) spreads over two threads.
                stack, load_s = ahead.result() if ahead is not None else loaders[i].load(year, present, parallel=True)
            except AssetError as exc:
                record = _record(one, "failed", str(exc), modalities=modality_label(present))
                task.store.write_failure(year, task.chunk.id, record)
                records[i][year] = record
                stack = None
            ahead = None
            if last_job[i] == k:
                loaders[i] = None  # its static stack (the DEM) is not needed any more
            # Bounded memory: at most this year's stack and the next one's exist at once.
            if prefetch and k + 1 < len(jobs):
                nxt, nxt_year, nxt_present = jobs[k + 1]
                ahead = pool.submit(loaders[nxt].load, nxt_year, nxt_present)
            if stack is None:
                continue
            loaded = time.perf_counter()
            _keep_hillshade(one.store, one.chunk.id, stack)
            detections = _infer(one, stack, present)
            inferred = time.perf_counter()
            if writing is not None:  # long done, as a rule: it ran during this inference
                records[writing[0]][writing[1]] = writing[2].result()
            times = {"started": started, "load": load_s, "loaded": loaded, "inferred": inferred}
            if prefetch:
                # Queued behind the next load: it vectorizes while the next chunk-year is inferred
                # (and, as it holds this stack, the load after the next waits for it: two stacks at most).
                writing = (i, year, pool.submit(_write_year, one, stack, cores[i], detections, present, times))
            else:
                records[i][year] = _write_year(one, stack, cores[i], detections, present, times)
            del stack, detections
        if writing is not None:
            records[writing[0]][writing[1]] = writing[2].result()
    return [[done[year] for year in task.years] for done, task in zip(records, tasks)]


def _decide_years(task: ChunkTask) -> tuple[dict[int, dict[str, Any]], list[tuple[int, list[str]]]]:
    """What each year of a task does, decided before any load: the records of the years skipped
    (fragment exists) or written as no_data, and the (year, modalities) to load and run."""
    info = get_detector(task.model_path, task.model_sha256, task.inference).info
    core = shapely.from_wkb(task.core_wkb)
    records: dict[int, dict[str, Any]] = {}
    to_load: list[tuple[int, list[str]]] = []
    for year in task.years:
        one = _Year(task.chunk, year, task.store, task.inference, task.model_path, task.model_sha256)
        if task.store.is_done(year, task.chunk.id):
            records[year] = {"chunk_id": task.chunk.id, "year": year, "status": "skipped"}
            continue
        present = [m for m in info.modalities if task.items[year].get(m)]
        missing = [m for m in info.modalities if m not in present]
        if missing and not info.supports(present):
            records[year] = _write_no_data(one, core, missing, _needs(info, missing))
            continue
        to_load.append((year, present))
    return records, to_load


def _write_year(one: _Year, stack, core: shapely.Geometry, detections: list, present: list[str],
                times: dict[str, float]) -> dict[str, Any]:
    """Vectorize, cover and write one chunk-year whose model has run; return its record.

    ``times``: ``perf_counter`` marks of the chunk-year (``started``, ``loaded``, ``inferred``)
    and its load's own seconds (``load``).
    """
    vectorizing = time.perf_counter()
    gdf = _vectorize(one, stack, detections)
    coverage = _coverage(stack, core, one.chunk, detections, tuple(present))
    finished = time.perf_counter()
    record = _record(
        one,
        "processed",
        modalities=modality_label(present),
        n_detections=int(len(gdf)),
        n_tiles=len(one.chunk.tiles),
        items={m: list(ids) for m, ids in stack.item_ids.items()},
        valid_fraction={m: _valid_fraction(stack, m) for m in stack.valid},
        # load: the load's own time (on the prefetch thread, mostly hidden behind the previous
        # year's inference); load_wait: how long this year waited for it; infer: the model;
        # vectorize: polygons and coverage rows (on the prefetch thread too, while the next
        # chunk-year is inferred); total: from the wait for the load to the record.
        seconds={"load": times["load"], "load_wait": times["loaded"] - times["started"],
                 "infer": times["inferred"] - times["loaded"], "vectorize": finished - vectorizing,
                 "total": finished - times["started"]},
        coverage=coverage,
    )
    one.store.write(one.year, one.chunk.id, gdf, record)
    return record
