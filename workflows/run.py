"""`rtsmap run`: plan chunk-years, process them on a Dask cluster in waves, merge, write the inventory.

The flow (one direction):

1. plan: AOI -> grid (from the model's tile size and resolution) -> STAC items per modality and
   year -> one :class:`~workflows.tasks.ChunkTask` per chunk-year that is not done yet;
2. execute: submit tasks in waves (at most ``max_in_flight`` at a time, so the scheduler never
   holds a huge graph), collect them as they complete, show progress;
3. finish: per year, read the fragments, seam-merge, and write the GeoPackage (atomically).

Finished chunk-years live in the work directory as fragments; a rerun of the same command skips
them, so a crash, a preemption or Ctrl-C loses at most the tasks in flight.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import pyproj
import shapely

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.errors import ModelError, OutputError
from rtsmap.pipeline.grid import Chunk, GridSpec, plan_grid
from rtsmap.pipeline.infer import check_compatible
from rtsmap.pipeline.model_file import read_model_info
from rtsmap.pipeline.stac import open_catalog, search_modalities
from rtsmap.workflows.cluster import local_worker_count, open_cluster
from rtsmap.workflows.config import RunConfig, config_to_dict, load_run_config
from rtsmap.workflows.fragments import FragmentStore, run_key
from rtsmap.workflows.plan import footprint_in_grid, resolve_profile
from rtsmap.workflows.tasks import ChunkTask, process_chunk_year

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What a run will do."""

    config: RunConfig
    spec: GridSpec
    chunks: list[Chunk]
    tasks: list[ChunkTask]
    skipped: int
    store: FragmentStore
    model_info: Any
    aoi: Any
    item_ids: dict[str, list[str]] = field(default_factory=dict)


def chunk_core(chunk: Chunk, aoi_geometry: shapely.Geometry) -> shapely.Geometry:
    """The area a chunk answers for: its tiles' stride cells (no overlap) clipped to the AOI."""
    spec = chunk.spec
    step = spec.stride_px * spec.resolution
    cells = [shapely.box(t.bounds[0], t.bounds[3] - step, t.bounds[0] + step, t.bounds[3]) for t in chunk.tiles]
    return shapely.intersection(shapely.union_all(cells), aoi_geometry)


def make_plan(config: RunConfig) -> RunPlan:
    """Plan a run: everything that can be checked before work starts is checked here.

    Raises
    ------
    RtsmapError
        For a bad AOI, an unreachable catalog, a model that does not match the data, or an
        output that exists.
    """
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise OutputError(f"the output folder {out.parent} does not exist")
    info = read_model_info(config.model)
    profile = resolve_profile(config.profile)
    missing = [m for m in info.modalities if m not in profile.modalities]
    if missing:
        raise ModelError(
            f"the model needs {', '.join(missing)} but profile {profile.name} has no such modality"
        )
    profiles = {m: profile.modalities[m] for m in info.modalities}
    aoi = read_aoi(config.aoi, crs=config.grid.crs)
    spec = GridSpec(
        crs=config.grid.crs,
        resolution=info.resolution,
        tile_px=info.tile_size,
        overlap_px=config.grid.overlap_px,
        tiles_per_chunk=config.grid.tiles_per_chunk,
    )
    check_compatible(info, {m: list(p.band_names) for m, p in profiles.items()}, spec.resolution, spec.tile_px)
    chunks = plan_grid(aoi.geometry, spec)
    catalog = open_catalog(config.catalog or profile.url, signing=profile.signing)
    found = search_modalities(catalog, aoi, config.years, profile, modalities=list(profiles))
    settings = {
        "grid": config_to_dict(config)["grid"],
        "min_area_m2": config.inference.min_area_m2,
        "profile": profile.name,
    }
    store = FragmentStore(config.work_dir / run_key(info.sha256, settings))
    inference = config.inference
    if config.cluster.kind == "local" and inference.threads == 0:
        # onnxruntime's default (every core) in each of several local workers oversubscribes the
        # machine; give each worker its share.
        share = max(1, (os.cpu_count() or 1) // local_worker_count(config.cluster))
        inference = replace(inference, threads=share)
    index = {key: _ItemIndex(items, spec.crs) for key, items in found.items()}
    tasks: list[ChunkTask] = []
    skipped = 0
    for chunk in chunks:
        core = chunk_core(chunk, aoi.geometry)
        window = shapely.box(*chunk.bounds)
        for year in config.years:
            if store.is_done(year, chunk.id):
                skipped += 1
                continue
            items = {}
            for modality, prof in profiles.items():
                key = (modality, year if prof.per_year else None)
                items[modality] = index[key].covering(window) if key in index else ()
            tasks.append(
                ChunkTask(
                    chunk=chunk,
                    year=year,
                    items=items,
                    profiles=profiles,
                    model_path=str(config.model),
                    model_sha256=info.sha256,
                    inference=inference,
                    store=store,
                    core_wkb=core.wkb,
                    signing=profile.signing,
                )
            )
    item_ids = {f"{modality}:{year}": sorted(it.id for it in items) for (modality, year), items in found.items()}
    return RunPlan(config, spec, chunks, tasks, skipped, store, info, aoi, item_ids)


class _ItemIndex:
    """The items of one modality and year, their footprints projected once into the grid CRS."""

    def __init__(self, items, crs: str) -> None:
        to_grid = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        located = [it for it in items if it.geometry is not None]
        self.dicts = [it.to_dict() for it in located]
        self.tree = shapely.STRtree([footprint_in_grid(it.geometry, to_grid) for it in located])

    def covering(self, window: shapely.Geometry) -> tuple[dict, ...]:
        """Items (as dictionaries, in search order) whose footprint meets the chunk's read window."""
        hits = sorted(self.tree.query(window, predicate="intersects"))
        return tuple(self.dicts[i] for i in hits)


class Progress:
    """Chunks done of total, throughput and ETA: a bar on a terminal, log lines otherwise."""

    def __init__(self, total: int, *, every_s: float = 30.0, stream=None) -> None:
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
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(
                f"[rtsmap] {self.done}/{self.total} chunk-years done, {self.failed} failed, "
                f"{rate * 60:.1f}/min, ETA {_duration(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def execute(plan: RunPlan, client, *, stream=None) -> list[dict[str, Any]]:
    """Run the plan's tasks on the cluster in waves; return one record per task.

    At most ``max_in_flight`` tasks are submitted at a time (default 4 per worker), and a new one
    goes in as each completes, so memory on the scheduler stays bounded however large the AOI.
    A task that raises (after Dask's own retries, e.g. for a worker that died) is recorded as
    failed with its error; the others go on.
    """
    from distributed import as_completed

    config = plan.config
    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    limit = config.max_in_flight or 4 * n_workers
    # A fraction of a GPU per task: loading (CPU, I/O) of one task overlaps the model of another.
    resources = {"GPU": 1 / config.cluster.tasks_per_gpu} if config.cluster.gpus_per_worker > 0 else None
    progress = Progress(len(plan.tasks), stream=stream)
    pending = iter(plan.tasks)
    records: list[dict[str, Any]] = []

    def submit(task: ChunkTask):
        return client.submit(
            process_chunk_year,
            task,
            key=f"chunk-{task.chunk.id}-{task.year}-{plan.store.root.name}",
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
                record = {
                    "chunk_id": task.chunk.id,
                    "year": task.year,
                    "status": "failed",
                    "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                }
                plan.store.write_failure(task.year, task.chunk.id, record)
            else:
                record = fut.result()
            fut.release()
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


def finish(plan: RunPlan, *, started: float, started_iso: str) -> RunResult:
    """Merge each year's fragments and write the GeoPackage (atomically) and the quick-looks."""
    import geopandas as gpd
    import pandas as pd

    from rtsmap.pipeline.inventory import write_inventory
    from rtsmap.pipeline.merge import merge_detections
    from rtsmap.pipeline.vectorize import empty_polygons

    config, store, crs = plan.config, plan.store, plan.spec.crs
    layers, coverage, results, failures = {}, {}, [], []
    for year in config.years:
        frames, cov_rows = [], []
        failed = store.failures(year)
        for chunk in plan.chunks:
            if store.is_done(year, chunk.id):
                record = store.read_record(year, chunk.id)
                frames.append(store.read_detections(year, chunk.id))
                for row in record.get("coverage", []):
                    geom = shapely.from_wkb(bytes.fromhex(row["wkb"]))
                    if not geom.is_empty:
                        cov_rows.append({"status": row["status"], "reason": row["reason"], "chunk_id": chunk.id, "geometry": geom})
            else:
                record = failed.get(chunk.id, {"reason": "not processed"})
                failures.append({"chunk_id": chunk.id, "year": year, "reason": record.get("reason", "")})
                cov_rows.append(
                    {
                        "status": "failed",
                        "reason": record.get("reason", ""),
                        "chunk_id": chunk.id,
                        "geometry": chunk_core(chunk, plan.aoi.geometry),
                    }
                )
        frames = [f for f in frames if len(f)]
        detections = (
            gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs) if frames else None
        )
        merged = merge_detections(detections if detections is not None else empty_polygons(crs), spec=plan.spec)
        # Tiles reach past the AOI; keep the slumps that touch it, whole (never clipped).
        merged = merged[merged.intersects(plan.aoi.geometry)].reset_index(drop=True)
        layers[year] = merged
        cov = gpd.GeoDataFrame(cov_rows, geometry="geometry", crs=crs) if cov_rows else gpd.GeoDataFrame(
            {"status": [], "reason": [], "chunk_id": []}, geometry=[], crs=crs
        )
        coverage[year] = cov
        counts = cov["status"].value_counts() if len(cov) else {}
        results.append(
            YearResult(
                year=year,
                count=len(merged),
                area_m2=float(merged.geometry.area.sum()) if len(merged) else 0.0,
                processed=int(counts.get("processed", 0)),
                no_data=int(counts.get("no_data", 0)),
                failed=int(counts.get("failed", 0)),
            )
        )
    if not failures:
        # Every chunk-year is done, so any temporary file left is a dead writer's.
        store.remove_temporaries()
    info = plan.model_info
    metadata = {
        "configuration": config_to_dict(config),
        "model_sha256": info.sha256,
        "model_metadata": info.metadata,
        "software_version": _version(),
        "stac_items": plan.item_ids,
        "started": started_iso,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chunks": len(plan.chunks),
        "failures": failures,
    }
    write_inventory(config.out, layers, coverage, metadata, crs=crs, overwrite=True)
    result = RunResult(Path(config.out), results, failures, time.monotonic() - started)
    if config.quicklook:
        from rtsmap.workflows.quicklook import write_quicklooks

        from rtsmap.workflows.quicklook import mosaic_thumbnails

        thumbnails = store.read_thumbnails(chunk.id for chunk in plan.chunks)
        hillshade = mosaic_thumbnails(thumbnails) if thumbnails else None
        result.quicklooks = write_quicklooks(Path(config.out), layers, coverage, hillshade)
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


def run(config: RunConfig, *, stream=None) -> RunResult:
    """Plan, execute on the configured cluster, and write the inventory."""
    stream = stream or sys.stderr
    # Dask sets its loggers to INFO when imported (it is, by now); its messages follow the
    # command line's -v like ours instead.
    root_level = logging.getLogger().getEffectiveLevel()
    if root_level > logging.INFO:
        logging.getLogger("distributed").setLevel(root_level)
    started = time.monotonic()
    started_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    plan = make_plan(config)
    print(
        f"[rtsmap] {len(plan.chunks)} chunks x {len(config.years)} years: "
        f"{len(plan.tasks)} to do, {plan.skipped} already done (work dir {plan.store.root})",
        file=stream,
        flush=True,
    )
    if plan.tasks:
        with open_cluster(config.cluster) as client:
            if client.dashboard_link:
                print(f"[rtsmap] Dask dashboard: {client.dashboard_link}", file=stream, flush=True)
            execute(plan, client, stream=stream)
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
@click.option("--profile", help="Modality profile: demo, earth-search, planetary-computer, or a YAML path.")
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
def run_command(aoi, years, catalog, profile, model, config_path, out, workdir, cluster_kind, workers, providers, batch_size, truth, overwrite):
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
    config = load_run_config(config_path, overrides)
    if not config.aoi:
        raise click.UsageError("--aoi is required (or `aoi:` in the configuration file)")
    result = run(config)
    print_summary(result)
    if result.partial:
        sys.exit(EXIT_PARTIAL)
