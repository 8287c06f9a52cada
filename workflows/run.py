"""`rtsmap run`: plan chunk-years, process them on a Dask cluster in waves, merge, write the inventory.

The flow (one direction):

1. plan: AOI -> blocks of chunks (grid from the model's tile size and resolution) -> STAC items
   per block, modality and year, kept on disk as compact records -> one
   :class:`~workflows.tasks.ChunkTask` per chunk holding all its years not done yet, made lazily;
2. execute: make and submit tasks in waves (at most ``max_in_flight`` exist at a time, so neither
   client nor scheduler holds a huge graph), collect them as they complete, show progress;
3. finish: per year, each block of chunks is read and seam-merged on its own (a cluster task per
   block, :func:`gather_block`; groups reaching a block border are merged together at the end),
   so the client never holds a year's detections; each year is then linked to the year before
   and appended to the GeoPackage in slices (atomically: renamed into place at the end).

Finished chunk-years live in the work directory as fragments; a rerun of the same command skips
them, so a crash, a preemption or Ctrl-C loses at most the tasks in flight.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import shapely

from rtsmap.pipeline.errors import ConfigError, OutputError
from rtsmap.pipeline.grid import BlockCells, Chunk, GridSpec
from rtsmap.pipeline.outputs import check_output_file
from rtsmap.workflows.cluster import close_in_background, open_cluster
from rtsmap.workflows.config import RunConfig, config_to_dict, load_run_config
from rtsmap.workflows.fragments import FragmentStore, run_key
from rtsmap.workflows.planning import (
    DEFAULT_BLOCK_CHUNKS,
    Planned,
    check_readable,
    check_workers,
    plan_chunks,
)
from rtsmap.workflows.tasks import ChunkTask

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What a run will do. Tasks are made lazily, a block of chunks at a time (:meth:`iter_tasks`)."""

    config: RunConfig
    """The run configuration."""
    spec: GridSpec
    """The grid (tile size and resolution from the model)."""
    store: FragmentStore
    """The fragments of this run key."""
    model_info: Any
    """The model's :class:`~pipeline.model_file.ModelInfo`."""
    aoi: Any
    """The AOI in the grid CRS."""
    planned: Planned
    """The shared plan (profile, catalog, blocks, items on disk) this run plan was made from."""
    inference: Any = None
    """The inference settings the tasks get (threads set for local workers)."""
    region_name: str = ""
    """ARTS ``RegionName`` of the inventory: the AOI file's stem or ``--region-name``."""
    skipped: int = 0
    """Chunk-years found done so far by :meth:`iter_tasks`."""
    stopped: str = ""
    """Why the run stopped submitting tasks (the work directory could not be written), or ``""``."""
    block_chunks: int = DEFAULT_BLOCK_CHUNKS
    """Chunks along a block side (the unit of the search, the task order and the merge in finish)."""

    def iter_chunks(self):
        """Every chunk of the AOI (with its tiles), done or not, a block at a time."""
        return self.planned.iter_chunks()

    def iter_cells(self):
        """The chunks of each block as arrays (no tiles made), a block at a time."""
        return self.planned.iter_cells()

    def iter_tasks(self):
        """One :class:`ChunkTask` per chunk with a year not done, made as the run asks for them.

        A chunk whose years are all done makes no task; one partly done gets only its missing
        years. Items are read from the plan's store one block at a time.
        """
        planned, years = self.planned, sorted(set(self.config.years))
        keys = {year: planned.keys_for(year) for year in years}
        for block in planned.iter_blocks():
            for chunk in block.chunks:
                todo = tuple(y for y in years if not self.store.is_done(y, chunk.id))
                self.skipped += len(years) - len(todo)
                if not todo:
                    continue
                per_key: dict[str, tuple[bytes, ...]] = {}
                items = {}
                for year in todo:
                    items[year] = {}
                    for modality, key in keys[year].items():
                        if key not in per_key:  # a static modality's items once for all years
                            found = block.chunk_items(chunk, {modality: key})[modality]
                            per_key[key] = tuple(r.data for r in found)
                        items[year][modality] = per_key[key]
                yield ChunkTask(
                    chunk=chunk,
                    years=todo,
                    items=items,
                    profiles=planned.modalities,
                    model_path=str(self.config.model),
                    model_sha256=self.model_info.sha256,
                    inference=self.inference,
                    store=self.store,
                    core_wkb=chunk_core(chunk, self.aoi.geometry).wkb,
                    signing=planned.catalog.signing,
                )

    @property
    def tasks(self) -> list[ChunkTask]:
        """Every task at once (small AOIs and tests; a run uses :meth:`iter_tasks`)."""
        return list(self.iter_tasks())


def chunk_core(chunk: Chunk, aoi_geometry: shapely.Geometry) -> shapely.Geometry:
    """The area a chunk answers for: its tiles' stride cells (no overlap) clipped to the AOI."""
    spec = chunk.spec
    step = spec.stride_px * spec.resolution
    cells = [shapely.box(t.bounds[0], t.bounds[3] - step, t.bounds[0] + step, t.bounds[3]) for t in chunk.tiles]
    return shapely.intersection(shapely.union_all(cells), aoi_geometry)


def check_run_inputs(config: RunConfig) -> None:
    """The checks on outputs and inputs that need no catalog and no model, before anything else.

    Raises
    ------
    RtsmapError
        For an output that is not a ``.gpkg``, exists (without ``overwrite``) or cannot be
        written, or a truth file that cannot be read.
    """
    if not config.aoi:
        raise ConfigError("--aoi is required (or `aoi:` in the configuration file)")
    check_output_file(config.out, suffix=".gpkg", overwrite=config.overwrite, create_folder=True)
    if config.quicklook:
        from rtsmap.workflows.quicklook import check_quicklooks

        check_quicklooks(config.out, config.years, overwrite=config.overwrite)
    check_readable(config.truth, "--truth")
    if config.cluster.kind == "local":
        check_workers(config.cluster.n_workers or None)


def make_plan(config: RunConfig, *, region_name: str | None = None,
              block_chunks: int = DEFAULT_BLOCK_CHUNKS) -> RunPlan:
    """Plan a run: everything that can be checked before work starts is checked here.

    Parameters
    ----------
    config
        The run configuration (``profile`` None: chosen by the rule of ``workflows.planning``).
    region_name
        ARTS ``RegionName`` (default: the AOI file's stem).
    block_chunks
        Chunks along a block side.

    Returns
    -------
    RunPlan

    Raises
    ------
    RtsmapError
        For a bad AOI, an unreachable catalog, a model that does not match the data, an output
        that exists or cannot be written, or a modality with no item at all.
    """
    check_run_inputs(config)
    planned = plan_chunks(config, block_chunks=block_chunks)
    for line in planned.warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    info = planned.model
    settings = {
        "grid": config_to_dict(config)["grid"],
        "min_area_m2": config.inference.min_area_m2,
        "profile": planned.profile.name,
    }
    store = FragmentStore(config.work_dir / run_key(info.sha256, settings))
    store.prepare()  # a work directory that cannot be written ends the run before any work
    from rtsmap.workflows.cluster import task_inference

    inference = task_inference(config.inference, config.cluster)  # local workers share the cores
    region = region_name or Path(config.aoi).stem
    return RunPlan(config, planned.spec, store, info, planned.aoi, planned, inference, region,
                   block_chunks=block_chunks)


class Progress:
    """Chunks done of total, throughput and ETA: a bar on a terminal, log lines otherwise."""

    def __init__(self, total: int | None, *, every_s: float = 30.0, stream=None) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.started = time.monotonic()
        self.every_s, self.last = every_s, 0.0
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="chunk", file=self.stream, dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += record.get("status") == "failed"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else float("inf")
        total = "" if self.total is None else f"/{self.total}"
        print(
            f"[rtsmap] {self.done}{total} chunk-years done, {self.failed} failed, "
            f"{rate * 60:.1f}/min, ETA {_duration(eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """End the bar, or print the last line (a lazy run learns its total only at the end)."""
        if self.bar is not None:
            self.bar.close()
        elif self.total is None and self.done:
            self.total = self.done
            self._line(time.monotonic())


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


MAX_FAILURES_KEPT = 1_000
"""Failure records :func:`execute` keeps in memory (the rest are counted; all are on disk)."""


@dataclass
class ExecuteSummary:
    """What :func:`execute` ran, in memory bounded however many tasks: counts, and the first failures.

    Mutable: it is filled a record at a time. Every chunk-year's record is on disk (its fragment
    or failure record), so nothing more is kept here.
    """

    chunk_years: int = 0
    """Chunk-year records received (skipped years of a partly done chunk included)."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Status (``done``, ``no_data``, ``failed``, ``skipped``, ...) -> chunk-years."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Stage (``load``, ``infer``, ...) -> seconds summed over the records that timed it."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    """The first :data:`MAX_FAILURES_KEPT` failure records (chunk id, year, reason)."""
    first_submit_s: float | None = None
    """Seconds from the start of :func:`execute` to its first ``client.submit`` returning."""
    workers: set[str] = field(default_factory=set)
    """Addresses of the workers that ran tasks (as many as the cluster has, so bounded)."""

    @property
    def failed(self) -> int:
        """Chunk-years that failed (all of them, kept or not)."""
        return self.statuses.get("failed", 0)

    def add(self, record: dict[str, Any]) -> None:
        """Count one chunk-year record."""
        self.chunk_years += 1
        status = str(record.get("status"))
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if isinstance(record.get("seconds"), dict):
            for stage, value in record["seconds"].items():
                if isinstance(value, (int, float)):
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + float(value)
        if status == "failed" and len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(record)
        if record.get("worker"):
            self.workers.add(str(record["worker"]))


def execute(plan: RunPlan, client, *, stream=None, tasks=None) -> ExecuteSummary:
    """Run the plan's tasks on the cluster in waves; return their counts and first failures.

    Tasks are made as they are submitted (:meth:`RunPlan.iter_tasks`): at most
    ``max_in_flight`` Dask tasks exist at a time (default 4 per worker), and a new one is made and
    submitted as each completes, so memory on the client and the scheduler stays bounded
    however large the AOI. Consecutive chunks are chained, up to
    :data:`~rtsmap.workflows.tasks.CHAIN_CHUNKS` in one Dask task
    (:func:`~rtsmap.workflows.tasks.process_chunks`: a chunk's first year loads while the one
    before is inferred), fewer at the end of the run so that every worker gets a share
    (:func:`~rtsmap.workflows.tasks.chain_length`). A Dask task that raises (after Dask's own
    retries, e.g. for a worker that died) is recorded as failed for each of its chunk-years not
    written yet, with its error; the others go on.

    Parameters
    ----------
    plan
        The run plan.
    client
        A ``distributed.Client``.
    stream
        Where progress goes.
    tasks
        The tasks to run (default: ``plan.iter_tasks()``).

    Returns
    -------
    ExecuteSummary
        Counts by status, summed stage seconds and the first failures: memory stays flat in the
        number of tasks (each chunk-year's record is on disk).

    The time to the first submitted task is logged (``[rtsmap] first task submitted after``).
    """
    from collections import deque

    from distributed import as_completed

    from rtsmap.workflows.tasks import CHAIN_CHUNKS, chain_length, process_chunks

    t0 = time.monotonic()

    config = plan.config
    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    limit = config.max_in_flight or 4 * n_workers
    # A fraction of a GPU per task: loading (CPU, I/O) of one task overlaps the model of another.
    resources = {"GPU": 1 / config.cluster.tasks_per_gpu} if config.cluster.gpus_per_worker > 0 else None
    progress = Progress(None, stream=stream)
    pending = iter(plan.iter_tasks() if tasks is None else tasks)
    waiting: deque[ChunkTask] = deque()  # tasks made ahead, to see how long a chain may be
    summary = ExecuteSummary()

    def next_group() -> list[ChunkTask]:
        while len(waiting) < n_workers * CHAIN_CHUNKS and (task := next(pending, None)) is not None:
            waiting.append(task)
        return [waiting.popleft() for _ in range(chain_length(len(waiting), n_workers))]

    def submit(group: list[ChunkTask]):
        first = group[0]
        more = f"+{len(group) - 1}" if len(group) > 1 else ""
        return client.submit(
            process_chunks,
            group,
            key=f"chunk-{first.chunk.id}{more}-{'-'.join(map(str, first.years))}-{plan.store.root.name}",
            retries=config.retries,
            resources=resources,
            pure=False,
        )

    futures = as_completed()
    owner = {}
    while group := next_group():
        fut = submit(group)
        if summary.first_submit_s is None:
            summary.first_submit_s = time.monotonic() - t0
            print(f"[rtsmap] first task submitted after {summary.first_submit_s:.1f} s", file=stream or sys.stderr,
                  flush=True)
        owner[fut.key] = group
        futures.add(fut)
        if futures.count() >= limit:
            break
    try:
        for fut in futures:
            group = owner.pop(fut.key)
            if fut.status == "error":
                exc = fut.exception()
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                if isinstance(exc, OutputError) and not plan.stopped:
                    # The work directory cannot be written (disk full, ...): every later task would
                    # fail the same way. Submit no more, let those in flight end, keep what finished.
                    plan.stopped = str(exc)
                    print(f"[rtsmap] stopping: {exc}", file=stream or sys.stderr, flush=True)
                done = []
                for task in group:
                    for year in task.years:
                        if plan.store.is_done(year, task.chunk.id):
                            # Written by an earlier chunk of the chain before another one raised.
                            done.append({"chunk_id": task.chunk.id, "year": year, "status": "processed"})
                            continue
                        record = {"chunk_id": task.chunk.id, "year": year, "status": "failed", "reason": reason}
                        try:
                            plan.store.write_failure(year, task.chunk.id, record)
                        except OutputError:
                            pass  # not even the failure can be kept; the next run retries the chunk-year anyway
                        done.append(record)
            else:
                done = [record for records in fut.result() for record in records]
            fut.release()
            for record in done:
                summary.add(record)
                progress.update(record)
            nxt = [] if plan.stopped else next_group()
            if nxt:
                new = submit(nxt)
                owner[new.key] = nxt
                futures.add(new)
    finally:
        progress.close()
    return summary


@dataclass
class YearResult:
    """What the inventory says for one year."""

    year: int
    count: int
    area_m2: float
    processed: int
    no_data: int
    failed: int


@dataclass
class RunResult:
    """The outcome of a run, for the summary and the exit status."""

    out: Path
    years: list[YearResult]
    failures: list[dict[str, Any]]
    seconds: float
    quicklooks: list[Path] = field(default_factory=list)
    evaluation: dict | None = None
    change: dict = field(default_factory=dict)
    """Year -> new / grown / stable / ... counts and area change (``pipeline.inventory.change_summary``)."""
    summary: ExecuteSummary | None = None
    """The execute phase's counts and summed task seconds (None: nothing was run)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of each phase of :func:`run`: ``cluster_start``, ``plan``, ``execute``, ``finish``
    (the merge, the GeoPackage and the quick-looks) and ``close`` (what closing the cluster
    added: 0 when it closed while the run finished)."""

    @property
    def partial(self) -> bool:
        return bool(self.failures)


@dataclass
class _Year:
    """One year of the inventory, gathered from its fragments."""

    layer: Any
    """The merged slumps (GeoDataFrame; without ``chunk_ids``, which nothing after the merge reads)."""
    coverage: Any
    """The coverage rows (GeoDataFrame)."""
    result: YearResult
    """Counts for the summary."""
    failures: list[dict[str, Any]]
    """Chunk-years not done, with the reason."""
    used_items: set[str]
    """Ids of the items that gave pixels."""


@dataclass(frozen=True)
class BlockYear:
    """One block of chunks in one year, as :func:`gather_block` reads it (plain data, sent to a worker)."""

    store: FragmentStore
    """The fragments of the run."""
    year: int
    """The year."""
    cells: BlockCells
    """The block's chunks."""
    aoi_wkb: bytes
    """The AOI cut to the block (with a margin of one window), grid CRS: the cores of chunks not done."""
    block_tiles: int
    """Side of the block in tiles (the merge block: groups reaching its outer ring stay open)."""
    stopped: str = ""
    """The reason the run stopped early (given to chunks with neither a fragment nor a failure)."""


@dataclass
class BlockResult:
    """What one block of one year adds to the inventory."""

    merged: Any
    """Slumps whose every copy lies inside the block, merged (no ``rts_id`` yet)."""
    open: Any
    """Raw detections of the groups that reach the block's border (merged with the neighbours' later)."""
    coverage: list[dict]
    """Coverage rows (status, reason, chunk_id, geometry)."""
    failures: list[dict]
    """Chunk-years not done, with the reason."""
    used: set[str]
    """Ids of the items that gave pixels."""


def gather_block(job: BlockYear) -> BlockResult:
    """Read one block's fragments of one year and merge them as far as the block allows.

    Runs on a worker (or in a thread of the client when no cluster is up): the client never
    holds more than the merged slumps and the open detections of each block.

    Parameters
    ----------
    job
        The block and year.

    Returns
    -------
    BlockResult
    """
    import geopandas as gpd
    import pandas as pd

    from rtsmap.pipeline.merge import merge_block
    from rtsmap.pipeline.vectorize import empty_polygons

    store, year, cells = job.store, job.year, job.cells
    crs = cells.spec.crs
    frames, rows, failures, used = [], [], [], set()
    aoi = None
    for i, chunk_id in enumerate(cells.ids):
        if store.is_done(year, chunk_id):
            record = store.read_record(year, chunk_id)
            frame = store.read_detections(year, chunk_id)
            if len(frame):
                frames.append(frame)
            used.update(item for ids in (record.get("items") or {}).values() for item in ids)
            for row in record.get("coverage", []):
                geom = shapely.from_wkb(bytes.fromhex(row["wkb"]))
                if not geom.is_empty:
                    rows.append({"status": row["status"], "reason": row["reason"], "chunk_id": chunk_id,
                                 "modalities": row.get("modalities", ""), "geometry": geom})
            continue
        failed = store.read_failure(year, chunk_id)
        reason = (failed or {}).get("reason") or job.stopped or "not processed"
        failures.append({"chunk_id": chunk_id, "year": year, "reason": reason})
        aoi = shapely.from_wkb(job.aoi_wkb) if aoi is None else aoi
        rows.append({"status": "failed", "reason": reason, "chunk_id": chunk_id, "modalities": "",
                     "geometry": chunk_core(cells.chunk(i), aoi)})
    detections = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs) if frames else empty_polygons(crs)
    merged, open_ = merge_block(detections, spec=cells.spec, block_tiles=job.block_tiles)
    return BlockResult(merged, open_, rows, failures, used)


def bounded_map(executor, fn, jobs, limit: int):
    """``executor.map(fn, jobs)`` in order, with at most ``limit`` jobs submitted and not yet taken.

    ``concurrent.futures`` and Dask's ``get_executor()`` submit every job at once; this keeps
    the jobs (and their results) of a pan-Arctic year from piling up in the client and scheduler.
    """
    from collections import deque

    window: deque = deque()
    for job in jobs:
        window.append(executor.submit(fn, job))
        if len(window) >= limit:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def merge_blocks(results: list[tuple[Any, Any]], spec: GridSpec, crs: Any):
    """The year's slumps from the blocks' ``(merged, open)`` parts: equal to one global merge.

    ``results`` is emptied (its parts are released as they are merged, for memory).

    A closed group is a whole component of the global match graph (no copy of it lies in its
    block's border ring, and copies match only across neighbouring tiles), so merging the open
    detections of every block together completes the merge; overlaps are then resolved and ids
    given once, on the whole layer, as :func:`rtsmap.pipeline.merge.merge_detections` does.
    Between the steps the freed copies are given back (:func:`_release_free_memory`): each step's peak
    is then the layer and its own work, not every earlier step's leftovers.
    """
    import geopandas as gpd
    import pandas as pd

    from rtsmap.pipeline.merge import (
        MIN_KEPT_FRACTION,
        OVERLAP_TOLERANCE,
        assign_rts_ids,
        merge_by_blocks,
        merge_detections,
        resolve_overlaps,
    )
    from rtsmap.pipeline.vectorize import empty_polygons

    opens = [o for _, o in results if len(o)]
    closed = [m for m, _ in results if len(m)]
    results.clear()  # the parts are held once, by the lists above, and released as they are merged
    if opens:
        pending = gpd.GeoDataFrame(pd.concat(opens, ignore_index=True), crs=crs)
        opens.clear()
        # In this process: on the cluster (its executor) the client's peak was ~2x higher.
        rest = merge_by_blocks(pending, spec=spec, overlap_tolerance=None)
        del pending
        _release_free_memory()
        if len(rest):
            closed.append(rest.drop(columns="rts_id"))
    if not closed:
        return merge_detections(empty_polygons(crs), spec=spec)
    merged = gpd.GeoDataFrame(pd.concat(closed, ignore_index=True), crs=crs)
    closed.clear()
    _release_free_memory()
    if len(merged) > 1:
        merged = resolve_overlaps(merged, overlap_tolerance=OVERLAP_TOLERANCE, min_kept_fraction=MIN_KEPT_FRACTION,
                                  min_part_area=spec.resolution ** 2)
        _release_free_memory()
    return assign_rts_ids(merged)


def gather_year(store: FragmentStore, year: int, spec: GridSpec, aoi: shapely.Geometry, cells, *,
                block_chunks: int, executor, limit: int = 8, stopped: str = "") -> tuple[Any, list, list, set]:
    """One year's slumps, merged block by block, and its coverage rows, failures and used items.

    Parameters
    ----------
    store
        The fragments.
    year
        The year.
    spec
        The grid.
    aoi
        The AOI in the grid CRS (slumps touching it are kept, whole).
    cells
        The blocks' :class:`~rtsmap.pipeline.grid.BlockCells`, one at a time.
    block_chunks
        Chunks along a block side (as the cells were made).
    executor
        Where :func:`gather_block` runs (``submit``); at most ``limit`` blocks are in flight.
    limit
        Blocks submitted and not yet collected.
    stopped
        Why the run stopped early ("" if it did not).

    Returns
    -------
    (merged, coverage rows, failures, used item ids)
    """
    margin = spec.window_px * spec.resolution

    def jobs():
        for block in cells:
            minx, miny, maxx, maxy = block.block.bounds
            part = shapely.intersection(aoi, shapely.box(minx - margin, miny - margin, maxx + margin, maxy + margin))
            yield BlockYear(store, year, block, shapely.to_wkb(part), block_chunks * spec.tiles_per_chunk, stopped)

    parts, rows, failures, used = [], [], [], set()
    for result in bounded_map(executor, gather_block, jobs(), limit):
        parts.append((result.merged, result.open))
        rows.extend(result.coverage)
        failures.extend(result.failures)
        used |= result.used
    merged = merge_blocks(parts, spec, spec.crs)
    # Tiles reach past the AOI; keep the slumps that touch it, whole (never clipped). Most
    # touch it: the layer is copied only when some do not.
    touches = merged.intersects(aoi).to_numpy()
    if not touches.all():
        merged = merged[touches].reset_index(drop=True)
    return merged, rows, failures, used


def _gather_year(plan: RunPlan, year: int, executor) -> _Year:
    """Merge one year's fragments block by block and gather its coverage."""
    import geopandas as gpd

    crs = plan.spec.crs
    merged, rows, failures, used = gather_year(plan.store, year, plan.spec, plan.aoi.geometry, plan.iter_cells(),
                                               block_chunks=plan.block_chunks, executor=executor,
                                               stopped=plan.stopped)
    if rows:
        cov = gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
    else:
        cov = gpd.GeoDataFrame({"status": [], "reason": [], "chunk_id": [], "modalities": []}, geometry=[], crs=crs)
    # Nothing after this reads the chunk ids (the inventory keeps tile ids): one string a slump less held.
    merged = merged.drop(columns=["chunk_ids"], errors="ignore")
    counts = cov["status"].value_counts() if len(cov) else {}
    result = YearResult(
        year=year,
        count=len(merged),
        area_m2=float(merged.geometry.area.sum()) if len(merged) else 0.0,
        processed=int(counts.get("processed", 0)),
        no_data=int(counts.get("no_data", 0)),
        failed=int(counts.get("failed", 0)),
    )
    return _Year(merged, cov, result, failures, used)


def base_map_dates(plan: RunPlan, used: dict[int, set[str]]) -> dict[str, str]:
    """ARTS ``BaseMapDate`` per year: the first and last date of the per-year scenes that gave pixels.

    Static scenes (the DEM) are left out: they date the terrain, not the year's map.
    """
    dates = plan.planned.items.dates(i for ids in used.values() for i in ids)
    out = {}
    for year, ids in sorted(used.items()):
        days = sorted(dates[i] for i in ids if i in dates)
        if days:
            out[str(year)] = days[0] if days[0] == days[-1] else f"{days[0]},{days[-1]}"
    return out


def arts_metadata(plan: RunPlan) -> dict[str, Any]:
    """The run facts the inventory's ARTS fields are filled from (``Notes``, ``RegionName``, ...).

    Known before the first year is written; :func:`run_metadata` adds the rest at the end.
    ``finished`` here is when the writing began (the ARTS ``ContributionDate``).
    """
    info = plan.model_info
    return {
        "model": {
            "name": info.name,
            "version": info.version,
            "weights_sha256": info.metadata.get("weights_sha256") or info.sha256,
            "file_sha256": info.sha256,
            "trained_on": info.trained_on,
        },
        "region_name": plan.region_name,
        "base_map_resolution": plan.spec.resolution,
        "software_version": _version(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_metadata(plan: RunPlan, used: dict[int, set[str]], failures: list[dict[str, Any]], *,
                 started_iso: str) -> dict[str, Any]:
    """The ``run_metadata`` table: configuration, model, items, times, and the ARTS keys.

    ``model``, ``base_map_dates`` and ``region_name`` are the keys ``pipeline.inventory`` reads for
    the ARTS ``Notes``, ``BaseMapDate`` and ``RegionName`` columns.

    Parameters
    ----------
    plan
        The run plan.
    used
        Year -> ids of the items that gave pixels.
    failures
        The chunk-years not done, with the reason.
    started_iso
        When the run started.
    """
    info = plan.model_info
    return {
        **arts_metadata(plan),
        "configuration": config_to_dict(plan.config),
        "profile": plan.planned.profile.name if plan.planned is not None else plan.config.profile,
        "model_sha256": info.sha256,
        "model_metadata": info.metadata,
        "base_map_dates": base_map_dates(plan, used),
        "stac_items": plan.planned.item_ids(),
        "started": started_iso,
        "chunks": sum(len(cells) for cells in plan.iter_cells()),
        "failures": failures,
    }


def finish(plan: RunPlan, *, started: float, started_iso: str, executor=None) -> RunResult:
    """Merge each year's fragments block by block and write the GeoPackage (atomically) and the quick-looks.

    A year at a time: its blocks are merged (:func:`_gather_year`), then linked to the year
    before and appended to the GeoPackage in slices (``pipeline.inventory.InventoryWriter``);
    the change summary and the change quick-look of the pair come from the linked layers the
    writer returns (never read back from the file). The client holds the year being written,
    of the year before its ``UID``, ``track_id`` and ``change`` and its polygons as WKB (the
    tracks' bytes, :class:`_Before`), the tracks' state (polygons as WKB) and the coverage of
    every year: no GEOS polygon of an earlier year while a year is merged.
    Quick-looks are drawn as the years pass into a folder in the work directory and moved
    beside ``--out`` once the GeoPackage is in place.

    Parameters
    ----------
    plan
        The run plan.
    started, started_iso
        When the run started (monotonic seconds, ISO text).
    executor
        Where the blocks are read and merged (a Dask client's ``get_executor()``); None: a
        pool of threads in this process (reading parquet and GEOS release the GIL).

    Raises
    ------
    OutputError
        When the inventory cannot be written, or a file appeared at ``--out`` during the run
        (without ``--overwrite``): the finished file is then kept in the work directory.
    """
    import concurrent.futures
    import shutil
    import tempfile

    from rtsmap.pipeline.inventory import InventoryWriter, change_summary

    config, store = plan.config, plan.store
    if executor is None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
            return finish(plan, started=started, started_iso=started_iso, executor=pool)
    out = Path(config.out)
    staging = Path(tempfile.mkdtemp(prefix=".quicklooks-", dir=config.work_dir)) if config.quicklook else None
    # Quick-looks are drawn on a thread of their own while the years are written and merged
    # (matplotlib holds the GIL; reading fragments, GEOS and GDAL's writes mostly do not).
    drawing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="quicklook") if staging else None
    drawn: list[concurrent.futures.Future] = []
    try:
        hillshade = _hillshade(plan) if staging else None
        results, failures, used, change = [], [], {}, {}
        previous = None  # _Before: what the next pair's summary and quick-look read of the year before
        # Never replace a file that appeared at --out during the run (a second run with the same
        # --out): without --overwrite it is kept, and ours stays in the work directory.
        with InventoryWriter(out, arts_metadata(plan), crs=plan.spec.crs, overwrite=config.overwrite,
                             keep_dir=config.work_dir) as writer:
            for year in sorted(set(config.years)):
                y = _gather_year(plan, year, executor)
                _release_free_memory()  # the merge's freed copies, before the year is linked and written
                results.append(y.result)
                failures.extend(y.failures)
                used[year] = y.used_items
                date = base_map_dates(plan, {year: y.used_items}).get(str(year))
                if staging:
                    drawn.append(drawing.submit(_draw_quicklook, staging / out.name, year, y.layer, y.coverage,
                                                hillshade))
                linked = writer.add_year(year, y.layer, y.coverage, base_map_date=date)
                y.layer = None  # the merged layer's columns not in the inventory schema
                if previous is not None:
                    # Only the slumps of the year before that are not continued can be no
                    # longer seen: their polygons alone are read back.
                    before = _slumps_before(previous, linked)
                    change.update(change_summary({previous.year: before, year: linked}, {year: y.coverage}))
                    if staging:
                        drawn.append(drawing.submit(_draw_change_quicklook, staging / out.name, year, y.coverage,
                                                    linked, (previous.year, before, previous.coverage), hillshade))
                    del before
                previous = _Before(year, linked[["UID", "track_id", "change"]], writer.linker.last_wkb,
                                   y.coverage, linked.crs)
                if y.result.count > QUICKLOOK_OVERLAP_SLUMPS:
                    _wait_for(drawn)  # a large year's polygons are not held while the next one merges
                del y, linked
                _release_free_memory()
            previous = None
            _wait_for(drawn)
            if not failures:
                # Every chunk-year is done, so any temporary file left is a dead writer's.
                store.remove_temporaries()
            writer.close(run_metadata(plan, used, failures, started_iso=started_iso))
        result = RunResult(out, results, failures, time.monotonic() - started, change=change)
        if staging:
            result.quicklooks = _place_quicklooks(staging, out, sorted(set(config.years)), overwrite=config.overwrite)
    finally:
        if drawing is not None:
            drawing.shutdown(wait=True, cancel_futures=True)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    if config.truth:
        from rtsmap.pipeline.evaluation import evaluate_inventory

        result.evaluation = evaluate_inventory(config.out, config.truth)
    return result


@dataclass(frozen=True)
class _Before:
    """What the change summary and change quick-look of the next pair read of a year."""

    year: int
    """The year."""
    ids: Any
    """Its linked slumps' ``UID``, ``track_id`` and ``change`` (DataFrame, text; no geometry)."""
    wkb: Any
    """Their polygons as WKB, row for row (numpy object array: the bytes the tracks keep)."""
    coverage: Any
    """Its coverage (GeoDataFrame)."""
    crs: Any
    """The layer's CRS."""


def _slumps_before(before: _Before, linked) -> Any:
    """The slumps of the year before that ``linked`` does not continue, their polygons read back.

    The only rows ``no_longer_seen`` can count or the change quick-look draws (the others are
    continued or merged), in their order: the summary and the picture are those of the whole
    year before, without its polygons held while the next year is merged.
    """
    import geopandas as gpd
    import numpy as np

    from rtsmap.pipeline.inventory import not_continued

    rows = np.flatnonzero(not_continued(before.ids, linked))
    geoms = shapely.from_wkb(before.wkb[rows]) if len(rows) else np.zeros(0, dtype=object)
    return gpd.GeoDataFrame(before.ids.iloc[rows].reset_index(drop=True),
                            geometry=gpd.GeoSeries(geoms, crs=before.crs), crs=before.crs)


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    A year's merge frees several copies of its layer in small blocks (GEOS, pandas); glibc keeps
    them, and the next step's allocations do not all fit in them: trimming between the steps
    lowered the client's peak by ~45 MB at 300,000 detections (``benchmarks/bench_finish.py``).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc's soname; dlopen hands back the loaded library
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _hillshade(plan: RunPlan):
    """The hillshade mosaic under the quick-looks (None without thumbnails)."""
    from rtsmap.workflows.quicklook import mosaic_thumbnails

    thumbnails = plan.store.read_thumbnails(i for cells in plan.iter_cells() for i in cells.ids)
    return mosaic_thumbnails(thumbnails) if thumbnails else None


QUICKLOOK_OVERLAP_SLUMPS = 50_000
"""A year with more slumps than this waits for its quick-looks before the next year merges, so
that the client never holds a large year's polygons and the next one's at once (~1 KB a slump)."""


def _wait_for(drawn: list) -> None:
    """Wait for the quick-looks being drawn; raise the first one's error."""
    while drawn:
        drawn.pop(0).result()


def _draw_quicklook(staged_out: Path, year: int, layer, coverage, hillshade) -> None:
    """The year's quick-look (its merged slumps over its coverage) into the staging folder."""
    from rtsmap.workflows.quicklook import write_quicklooks

    write_quicklooks(staged_out, {year: layer}, {year: coverage}, hillshade, overwrite=True)


def _draw_change_quicklook(staged_out: Path, year: int, coverage, linked, previous, hillshade) -> None:
    """The change quick-look from the year before to ``year`` into the staging folder."""
    from rtsmap.workflows.quicklook import write_change_quicklooks

    before, prev_linked, prev_coverage = previous
    write_change_quicklooks(staged_out, {before: prev_linked, year: linked},
                            {before: prev_coverage, year: coverage}, hillshade, overwrite=True)


def _place_quicklooks(staging: Path, out: Path, years: list[int], *, overwrite: bool) -> list[Path]:
    """Move the staged quick-looks beside ``out``; without overwrite never over a file that appeared."""
    import shutil

    from rtsmap.workflows.quicklook import change_quicklook_paths, place_png, quicklook_paths

    placed = []
    for target in quicklook_paths(out, years) + change_quicklook_paths(out, years):
        # Copied beside the target first (the work directory may be on another file system).
        place_png(target, lambda tmp, staged=staging / target.name: shutil.copyfile(staged, tmp), overwrite=overwrite)
        placed.append(target)
    return placed


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rtsmap")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _start_cluster(stack, config: RunConfig):
    """Enter the configured cluster on ``stack`` and start its workers opening the model; return the client.

    Leaving ``stack`` first waits for those warm-ups (seconds at most): a worker closed in the
    middle of one prints tracebacks on stderr (a plan that fails right after a local start).
    """
    from rtsmap.workflows.cluster import settle, task_inference, warm_workers

    client = stack.enter_context(open_cluster(config.cluster))
    stack.callback(settle, warm_workers(client, str(config.model), task_inference(config.inference, config.cluster)))
    return client


def run(config: RunConfig, *, stream=None, region_name: str | None = None) -> RunResult:
    """Plan, execute on the configured cluster, and write the inventory.

    A local cluster starts before the plan, once the checks that need no catalog pass, and its
    workers open the model while the run plans (:func:`~rtsmap.workflows.cluster.warm_workers`);
    a batch or remote cluster starts only for a valid plan with work to do.

    Parameters
    ----------
    config
        The run configuration.
    stream
        Where progress goes (default stderr).
    region_name
        ARTS ``RegionName`` (default: the AOI file's stem).

    Returns
    -------
    RunResult

    Raises
    ------
    RtsmapError
        For bad input, before any work starts.
    """
    stream = stream or sys.stderr
    # Dask sets its loggers to INFO when imported (it is, by now); its messages follow the
    # command line's -v like ours instead.
    root_level = logging.getLogger().getEffectiveLevel()
    if root_level > logging.INFO:
        logging.getLogger("distributed").setLevel(root_level)
    started = time.monotonic()
    started_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    import contextlib
    import itertools

    phases: dict[str, float] = {}
    mark = started

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[phase] = phases.get(phase, 0.0) + now - mark
        mark = now

    with contextlib.ExitStack() as stack:
        client = None
        if config.cluster.kind == "local":
            # A local cluster starts once the inputs that need no catalog are checked, and its
            # workers open the model while the run plans. A batch or remote cluster starts only
            # for a valid plan (it costs queue time or money).
            check_run_inputs(config)
            client = _start_cluster(stack, config)
            lap("cluster_start")
        plan = make_plan(config, region_name=region_name)
        lap("plan")
        tasks = plan.iter_tasks()
        first = next(tasks, None)
        print(
            f"[rtsmap] {len(plan.planned.blocks)} blocks of chunks x {len(config.years)} years "
            f"(work dir {plan.store.root}); {'nothing to do' if first is None else 'tasks made as they run'}",
            file=stream,
            flush=True,
        )
        if first is None:
            result = finish(plan, started=started, started_iso=started_iso)
            lap("finish")
            result.phases = phases
            return result
        if client is None:
            client = _start_cluster(stack, config)
            lap("cluster_start")
        if client.dashboard_link:
            print(f"[rtsmap] Dask dashboard: {client.dashboard_link}", file=stream, flush=True)
        _import_finish_code(config.quicklook)
        summary = execute(plan, client, stream=stream, tasks=itertools.chain([first], tasks))
        print(f"[rtsmap] {summary.chunk_years} chunk-years run, {plan.skipped} already done", file=stream, flush=True)
        lap("execute")
        if len(plan.planned.blocks) > 1:
            # The blocks are read and merged on the cluster's workers.
            result = finish(plan, started=started, started_iso=started_iso, executor=client.get_executor(pure=False))
        else:
            # One block a year: merged in this process (sending it to a worker and its merged
            # layer back costs more than the merge), while the cluster closes.
            closing = close_in_background(client)
            try:
                result = finish(plan, started=started, started_iso=started_iso)
            finally:
                closing.join()
        lap("finish")
    lap("close")
    result.summary, result.phases = summary, phases
    return result


def _import_finish_code(quicklook: bool) -> None:
    """Import what ``finish`` runs (the GeoPackage writer, the merge, matplotlib for the quick-looks)
    on a thread while the tasks run, when this process only waits: ~0.6 s a run spent before
    its first year could be merged (``benchmarks/bench_run.py``)."""
    import importlib
    import threading

    names = ["rtsmap.pipeline.inventory", "rtsmap.pipeline.merge", "rtsmap.pipeline.tracks"]
    if quicklook:
        names.append("rtsmap.workflows.quicklook")

    def load() -> None:
        try:
            for name in names:
                importlib.import_module(name)
            if quicklook:
                from rtsmap.workflows.quicklook import prepare_pyplot

                prepare_pyplot()
        except Exception:  # noqa: BLE001 - finish imports them again and reports it in its words
            pass

    threading.Thread(target=load, name="rtsmap-import-finish", daemon=True).start()


def print_summary(result: RunResult, stream=None) -> None:
    """The end-of-run report: where the file is, per-year counts and areas, failures, time."""
    out = stream or sys.stdout
    print(f"inventory: {result.out}", file=out)
    for y in result.years:
        print(
            f"  {y.year}: {y.count} slumps, {y.area_m2 / 1e4:.2f} ha; coverage: {y.processed} processed, "
            f"{y.no_data} no-data, {y.failed} failed parts",
            file=out,
        )
    if result.change:
        from rtsmap.pipeline.inventory import format_change

        for year, row in sorted(result.change.items()):
            print(f"  {format_change(year, row)}", file=out)
    for path in result.quicklooks:
        print(f"quick-look: {path}", file=out)
    if result.evaluation:
        for year, scores in sorted(result.evaluation.items()):
            print(
                f"  {year} vs truth: precision {scores.precision:.3f}, recall {scores.recall:.3f}, "
                f"F1 {scores.f1:.3f} ({scores.tp} matched, {scores.fp} false, {scores.fn} missed)",
                file=out,
            )
    if result.failures:
        print(f"PARTIAL: {len(result.failures)} chunk-years failed (see coverage layers):", file=out)
        for f in result.failures[:10]:
            print(f"  {f['chunk_id']} {f['year']}: {f['reason']}", file=out)
    print(f"time: {_duration(result.seconds)}", file=out)


EXIT_PARTIAL = 3


@click.command("run")
@click.option("--aoi", type=click.Path(dir_okay=False), help="Area of interest (GeoJSON, GeoPackage, Shapefile).")
@click.option("--years", help="Years to map, e.g. 2021-2023 or 2021,2023.")
@click.option("--catalog", help="STAC API URL or local catalog (item collection, NDJSON, catalog.json, geoparquet).")
@click.option("--profile", help="Modality profile: demo, earth-search, planetary-computer, arcticdem-pgc, or a YAML path; default: the one that fits the catalog (README).")
@click.option("--model", type=click.Path(dir_okay=False), help="Exported ONNX model (default: the demo model).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run configuration YAML (flags override it).")
@click.option("--out", type=click.Path(dir_okay=False), help="Output GeoPackage (default rts_inventory.gpkg).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Fragment directory (default <out>.work); keep it to resume.")
@click.option("--cluster", "cluster_kind", help="local, slurm, pbs, kubernetes, or a scheduler address tcp://host:8786.")
@click.option("--workers", type=int, help="Worker processes of a local cluster (default: one per core, at most 4).")
@click.option("--providers", help="onnxruntime providers in order, e.g. cuda,cpu (default cpu).")
@click.option("--batch-size", type=int, help="Tiles per model call.")
@click.option("--truth", type=click.Path(dir_okay=False), help="Reference inventory: report precision/recall/F1 at the end.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output GeoPackage.")
@click.option("--region-name", help="ARTS RegionName of the inventory (default: the AOI file's name without suffix).")
def run_command(aoi, years, catalog, profile, model, config_path, out, workdir, cluster_kind, workers, providers, batch_size, truth, overwrite, region_name):
    """Map thaw slumps in an AOI, one inventory layer per year.

    Finished chunk-years are kept in the work directory: after a crash, a preemption or Ctrl-C,
    run the same command again and only what is missing is computed. Exit status 0 when every
    chunk-year was processed, 3 when some failed (the inventory is written and its coverage
    layers say where and why), 2 for bad input.
    """
    overrides: dict[str, Any] = {
        "aoi": aoi,
        "years": years,
        "catalog": catalog,
        "profile": profile,
        "model": model,
        "out": out,
        "workdir": workdir,
        "truth": truth,
        "overwrite": overwrite,
        "cluster.n_workers": workers,
        "inference.batch_size": batch_size,
        "inference.providers": providers.split(",") if providers else None,
    }
    if cluster_kind:
        if "://" in cluster_kind:
            overrides["cluster.kind"], overrides["cluster.address"] = "address", cluster_kind
        else:
            overrides["cluster.kind"] = cluster_kind
    check_workers(workers)
    config = load_run_config(config_path, overrides)
    result = run(config, region_name=region_name)
    print_summary(result)
    if result.partial:
        sys.exit(EXIT_PARTIAL)
