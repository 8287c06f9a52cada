"""`rtsmap run`: plan chunk-years, process them on a Dask cluster in waves, merge, write the inventory.

The flow (one direction):

1. plan: AOI -> blocks of chunks (grid from the model's tile size and resolution) -> STAC items
   per block, modality and year, kept on disk as compact records -> one
   :class:`~workflows.tasks.ChunkTask` per chunk holding all its years not done yet, made lazily;
2. execute: make and submit tasks in waves (at most ``max_in_flight`` exist at a time, so neither
   client nor scheduler holds a huge graph), collect them as they complete, show progress;
3. finish: per year, read the fragments, seam-merge, and write the GeoPackage (atomically).

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

from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.grid import Chunk, GridSpec
from rtsmap.workflows.cluster import local_worker_count, open_cluster
from rtsmap.workflows.config import RunConfig, config_to_dict, load_run_config, replace
from rtsmap.workflows.fragments import FragmentStore, run_key
from rtsmap.workflows.planning import (
    Planned,
    check_output_file,
    check_readable,
    check_workers,
    plan_chunks,
)
from rtsmap.workflows.tasks import ChunkTask, process_chunk

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

    def iter_chunks(self):
        """Every chunk of the AOI, done or not, a block at a time."""
        return self.planned.iter_chunks()

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
    check_output_file(config.out, suffix=".gpkg", overwrite=config.overwrite)
    if config.quicklook:
        from rtsmap.workflows.quicklook import check_quicklooks

        check_quicklooks(config.out, config.years, overwrite=config.overwrite)
    check_readable(config.truth, "--truth")
    if config.cluster.kind == "local":
        check_workers(config.cluster.n_workers or None)


def make_plan(config: RunConfig, *, region_name: str | None = None) -> RunPlan:
    """Plan a run: everything that can be checked before work starts is checked here.

    Parameters
    ----------
    config
        The run configuration (``profile`` None: chosen by the rule of ``workflows.planning``).
    region_name
        ARTS ``RegionName`` (default: the AOI file's stem).

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
    planned = plan_chunks(config)
    for line in planned.warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    info = planned.model
    settings = {
        "grid": config_to_dict(config)["grid"],
        "min_area_m2": config.inference.min_area_m2,
        "profile": planned.profile.name,
    }
    store = FragmentStore(config.work_dir / run_key(info.sha256, settings))
    inference = config.inference
    if config.cluster.kind == "local" and inference.threads == 0:
        # onnxruntime's default (every core) in each of several local workers oversubscribes the
        # machine; give each worker its share.
        share = max(1, (os.cpu_count() or 1) // local_worker_count(config.cluster))
        inference = replace(inference, threads=share)
    region = region_name or Path(config.aoi).stem
    return RunPlan(config, planned.spec, store, info, planned.aoi, planned, inference, region)


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


def execute(plan: RunPlan, client, *, stream=None, tasks=None) -> list[dict[str, Any]]:
    """Run the plan's tasks on the cluster in waves; return one record per chunk-year.

    Tasks are made as they are submitted (:meth:`RunPlan.iter_tasks`): at most
    ``max_in_flight`` exist at a time (default 4 per worker), and a new one is made and
    submitted as each completes, so memory on the client and the scheduler stays bounded
    however large the AOI. A task that raises (after Dask's own retries, e.g. for a worker that
    died) is recorded as failed, for each of its years, with its error; the others go on.

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
    """
    from distributed import as_completed

    config = plan.config
    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    limit = config.max_in_flight or 4 * n_workers
    # A fraction of a GPU per task: loading (CPU, I/O) of one task overlaps the model of another.
    resources = {"GPU": 1 / config.cluster.tasks_per_gpu} if config.cluster.gpus_per_worker > 0 else None
    progress = Progress(None, stream=stream)
    pending = iter(plan.iter_tasks() if tasks is None else tasks)
    records: list[dict[str, Any]] = []

    def submit(task: ChunkTask):
        return client.submit(
            process_chunk,
            task,
            key=f"chunk-{task.chunk.id}-{'-'.join(map(str, task.years))}-{plan.store.root.name}",
            retries=config.retries,
            resources=resources,
            pure=False,
        )

    futures = as_completed()
    owner = {}
    for task in pending:
        fut = submit(task)
        owner[fut.key] = task
        futures.add(fut)
        if futures.count() >= limit:
            break
    try:
        for fut in futures:
            task = owner.pop(fut.key)
            if fut.status == "error":
                exc = fut.exception()
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                done = []
                for year in task.years:
                    record = {"chunk_id": task.chunk.id, "year": year, "status": "failed", "reason": reason}
                    plan.store.write_failure(year, task.chunk.id, record)
                    done.append(record)
            else:
                done = fut.result()
            fut.release()
            for record in done:
                records.append(record)
                progress.update(record)
            nxt = next(pending, None)
            if nxt is not None:
                new = submit(nxt)
                owner[new.key] = nxt
                futures.add(new)
    finally:
        progress.close()
    return records


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

    @property
    def partial(self) -> bool:
        return bool(self.failures)


@dataclass
class _Year:
    """One year of the inventory, gathered from its fragments."""

    layer: Any
    """The merged slumps (GeoDataFrame)."""
    coverage: Any
    """The coverage rows (GeoDataFrame)."""
    result: YearResult
    """Counts for the summary."""
    failures: list[dict[str, Any]]
    """Chunk-years not done, with the reason."""
    used_items: set[str]
    """Ids of the items that gave pixels."""


def _coverage_rows(plan: RunPlan, year: int) -> tuple[list, list[dict], list[dict], set[str]]:
    """Detections, coverage rows, failures and used item ids of one year's chunks."""
    store = plan.store
    frames, rows, failures, used = [], [], [], set()
    failed = store.failures(year)
    for chunk in plan.iter_chunks():
        if store.is_done(year, chunk.id):
            record = store.read_record(year, chunk.id)
            frames.append(store.read_detections(year, chunk.id))
            used.update(i for ids in (record.get("items") or {}).values() for i in ids)
            for row in record.get("coverage", []):
                geom = shapely.from_wkb(bytes.fromhex(row["wkb"]))
                if not geom.is_empty:
                    rows.append({"status": row["status"], "reason": row["reason"], "chunk_id": chunk.id, "geometry": geom})
            continue
        reason = failed.get(chunk.id, {"reason": "not processed"}).get("reason", "")
        failures.append({"chunk_id": chunk.id, "year": year, "reason": reason})
        rows.append({"status": "failed", "reason": reason, "chunk_id": chunk.id,
                     "geometry": chunk_core(chunk, plan.aoi.geometry)})
    return frames, rows, failures, used


def _gather_year(plan: RunPlan, year: int) -> _Year:
    """Seam-merge one year's fragments and gather its coverage (slumps touching the AOI kept whole)."""
    import geopandas as gpd
    import pandas as pd

    from rtsmap.pipeline.merge import merge_detections
    from rtsmap.pipeline.vectorize import empty_polygons

    crs = plan.spec.crs
    frames, rows, failures, used = _coverage_rows(plan, year)
    frames = [f for f in frames if len(f)]
    detections = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs) if frames else empty_polygons(crs)
    merged = merge_detections(detections, spec=plan.spec)
    # Tiles reach past the AOI; keep the slumps that touch it, whole (never clipped).
    merged = merged[merged.intersects(plan.aoi.geometry)].reset_index(drop=True)
    if rows:
        cov = gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
    else:
        cov = gpd.GeoDataFrame({"status": [], "reason": [], "chunk_id": []}, geometry=[], crs=crs)
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


def run_metadata(plan: RunPlan, years: dict[int, _Year], *, started_iso: str) -> dict[str, Any]:
    """The ``run_metadata`` table: configuration, model, items, times, and the ARTS keys.

    ``model``, ``base_map_dates`` and ``region_name`` are the keys ``pipeline.inventory`` reads for
    the ARTS ``Notes``, ``BaseMapDate`` and ``RegionName`` columns.
    """
    info = plan.model_info
    failures = [f for y in years.values() for f in y.failures]
    return {
        "configuration": config_to_dict(plan.config),
        "profile": plan.planned.profile.name if plan.planned is not None else plan.config.profile,
        "model_sha256": info.sha256,
        "model_metadata": info.metadata,
        "model": {
            "name": info.name,
            "version": info.version,
            "weights_sha256": info.metadata.get("weights_sha256") or info.sha256,
            "file_sha256": info.sha256,
            "trained_on": info.trained_on,
        },
        "region_name": plan.region_name,
        "base_map_dates": base_map_dates(plan, {y: v.used_items for y, v in years.items()}),
        "base_map_resolution": plan.spec.resolution,
        "software_version": _version(),
        "stac_items": plan.planned.item_ids(),
        "started": started_iso,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chunks": sum(1 for _ in plan.iter_chunks()),
        "failures": failures,
    }


def finish(plan: RunPlan, *, started: float, started_iso: str) -> RunResult:
    """Merge each year's fragments and write the GeoPackage (atomically) and the quick-looks."""
    from rtsmap.pipeline.inventory import write_inventory

    config, store = plan.config, plan.store
    years = {year: _gather_year(plan, year) for year in config.years}
    failures = [f for y in years.values() for f in y.failures]
    if not failures:
        # Every chunk-year is done, so any temporary file left is a dead writer's.
        store.remove_temporaries()
    layers = {year: y.layer for year, y in years.items()}
    coverage = {year: y.coverage for year, y in years.items()}
    metadata = run_metadata(plan, years, started_iso=started_iso)
    write_inventory(config.out, layers, coverage, metadata, crs=plan.spec.crs, overwrite=True)
    result = RunResult(Path(config.out), [y.result for y in years.values()], failures, time.monotonic() - started)
    if config.quicklook:
        from rtsmap.workflows.quicklook import mosaic_thumbnails, write_quicklooks

        thumbnails = store.read_thumbnails(chunk.id for chunk in plan.iter_chunks())
        hillshade = mosaic_thumbnails(thumbnails) if thumbnails else None
        result.quicklooks = write_quicklooks(Path(config.out), layers, coverage, hillshade, overwrite=config.overwrite)
    if config.truth:
        from rtsmap.pipeline.evaluation import evaluate_inventory

        result.evaluation = evaluate_inventory(config.out, config.truth)
    return result


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rtsmap")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def run(config: RunConfig, *, stream=None, region_name: str | None = None) -> RunResult:
    """Plan, execute on the configured cluster, and write the inventory.

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
    plan = make_plan(config, region_name=region_name)
    tasks = plan.iter_tasks()
    first = next(tasks, None)
    print(
        f"[rtsmap] {len(plan.planned.blocks)} blocks of chunks x {len(config.years)} years "
        f"(work dir {plan.store.root}); {'nothing to do' if first is None else 'tasks made as they run'}",
        file=stream,
        flush=True,
    )
    if first is not None:
        import itertools

        with open_cluster(config.cluster) as client:
            if client.dashboard_link:
                print(f"[rtsmap] Dask dashboard: {client.dashboard_link}", file=stream, flush=True)
            records = execute(plan, client, stream=stream, tasks=itertools.chain([first], tasks))
        print(f"[rtsmap] {len(records)} chunk-years run, {plan.skipped} already done", file=stream, flush=True)
    return finish(plan, started=started, started_iso=started_iso)


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
