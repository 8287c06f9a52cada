"""``rtsmap plan``: what a run would do, before doing it.

Reads the AOI, lays the grid, searches the catalog for every modality and year, and reports the
chunks and tiles, the items found, the chunks no item covers, and a rough estimate of the work.
It reads no rasters and runs no model, so it is cheap to run before a long job. It plans through
the same path as ``rtsmap run`` (``workflows.planning``): the same profile rule, the grid from
the same model (default: the demo model), so both name the same chunks and items.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import numpy as np
import shapely

from rtsmap.pipeline.errors import OutputError
from rtsmap.pipeline.profiles import ModalityProfile
from rtsmap.workflows.config import RunConfig, load_run_config
from rtsmap.workflows.planning import (  # noqa: F401  (re-exported: older imports use workflows.plan)
    PROFILES_DIR,
    ItemIndex,
    Planned,
    describe,
    footprint_in_grid,
    key_text,
    plan_chunks,
    profile_names,
    profile_path,
    resolve_profile,
)

log = logging.getLogger(__name__)

# Assumed time per tile on one GPU worker (read, normalize, infer, vectorize). A stated guess for
# the estimate, not a measurement: override with --tile-seconds after a benchmark.
DEFAULT_TILE_SECONDS = 0.1

_DTYPE_BYTES = {"uint8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "float32": 4, "float64": 8}


# --- the plan -----------------------------------------------------------------------------------


DEFAULT_LIST_LIMIT = 10_000
"""Most chunk ids a report lists per list (``chunk_ids`` and each gap list); counts are always whole."""


def plan_report(config: RunConfig, *, tile_seconds: float = DEFAULT_TILE_SECONDS, page_size: int = 100,
                list_limit: int = DEFAULT_LIST_LIMIT, chunks_file: Path | None = None) -> dict[str, Any]:
    """Plan a run without reading rasters: grid, items per modality and year, gaps, estimate.

    Parameters
    ----------
    config
        The run configuration (AOI, years, catalog, profile or None for the rule, model, grid).
    tile_seconds
        Assumed seconds per tile for the time estimate.
    page_size
        Items per STAC API page.
    list_limit
        Most chunk ids in ``chunk_ids`` and in each ``missing``/``partial`` list (the first in
        sorted order); the report's memory stays bounded however large the AOI.
    chunks_file
        Where to write every chunk as one NDJSON line (``chunk_id``, ``tiles``, ``missing`` and
        ``partial`` as ``modality:year`` keys), in plan order; None: no file. The caller checks
        that it may be written (see :func:`check_chunks_file`).

    Returns
    -------
    dict
        Plain JSON-ready data: ``aoi``, ``catalog``, ``profile``, ``model``, ``years``, ``grid``,
        ``chunks``, ``tiles``, ``chunk_ids`` (sorted, at most ``list_limit``), ``items``
        (modality -> year or ``"static"`` -> count), ``missing`` (modality -> year -> chunk ids
        no item touches, at most ``list_limit``), ``partial`` (same shape: chunks whose AOI part
        items cover only in part), ``missing_counts`` and ``partial_counts`` (same shape: the
        whole counts), ``list_limit``, ``truncated`` (True when any list was cut),
        ``chunks_file``, ``estimate`` and ``warnings``.

    Raises
    ------
    RtsmapError
        For a bad AOI, model, profile or years, a catalog that cannot be searched, or a modality
        the model needs with no item at all.
    """
    planned = plan_chunks(config, page_size=page_size)
    return report(planned, tile_seconds=tile_seconds, list_limit=list_limit, chunks_file=chunks_file)


class _FirstIds:
    """The ``limit`` smallest ids of a stream and its count, in at most ``2 * limit`` memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._ids: list[str] = []

    def extend(self, ids) -> None:
        self._ids.extend(ids)
        self.count += len(ids)
        # Cut only when twice over: sorting stays amortised O(n log limit) per id.
        if len(self._ids) > 2 * self.limit:
            self._ids = sorted(self._ids)[: self.limit]

    def ids(self) -> list[str]:
        return sorted(self._ids)[: self.limit]

    @property
    def truncated(self) -> bool:
        return self.count > self.limit


def check_chunks_file(path: Path, overwrite: bool) -> None:
    """Refuse a chunks file that exists (without ``overwrite``) or whose folder does not.

    Raises
    ------
    OutputError
        For an existing file without ``overwrite``, a directory, or a missing parent folder.
    """
    if path.is_dir():
        raise OutputError(f"--chunks-file {path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"--chunks-file {path} exists; pass --overwrite to replace it, or give a new path")
    if not path.parent.is_dir():
        raise OutputError(f"--chunks-file {path}: folder {path.parent} does not exist")


def report(planned: Planned, *, tile_seconds: float = DEFAULT_TILE_SECONDS, list_limit: int = DEFAULT_LIST_LIMIT,
           chunks_file: Path | None = None) -> dict[str, Any]:
    """The plan report of a :class:`~workflows.planning.Planned` (see :func:`plan_report`).

    Goes through the plan one block at a time: only one block's chunks, tiles and items exist
    at once, and the report keeps counts and at most ``list_limit`` ids per list, so its memory
    does not grow with the AOI; every chunk goes to ``chunks_file`` as it is planned.
    """
    aoi = planned.aoi
    years = sorted(set(int(y) for y in planned.config.years))
    keys = {(m, y) for y in years for m in planned.modalities for (m, y) in [planned.key(m, y)]}
    texts = sorted(({key_text(k): k for k in keys}).items())
    missing: dict[str, dict[str, _FirstIds]] = {}
    partial: dict[str, dict[str, _FirstIds]] = {}
    for text, (modality, year) in texts:
        label = "static" if year is None else str(year)
        missing.setdefault(modality, {})[label] = _FirstIds(list_limit)
        partial.setdefault(modality, {})[label] = _FirstIds(list_limit)
    chunk_ids = _FirstIds(list_limit)
    n_tiles = 0
    out = None if chunks_file is None else open(chunks_file, "w", encoding="utf-8")
    try:
        for block in planned.iter_blocks():
            ids = block.cells.ids
            chunk_ids.extend(ids)
            n_tiles += int(block.cells.tile_counts.sum())
            windows = block.cells.windows()
            cut = shapely.intersection(aoi.geometry, shapely.box(*_grown(block.block.bounds, planned)))
            needed = needed_parts(windows, cut)
            # Coverage depends only on the distinct footprints: years (or modalities) whose items
            # have the same footprints in this block share one answer.
            memo: dict[int, tuple[list[str], list[str]]] = {}
            block_gaps: dict[str, tuple[list[str], list[str]]] = {}
            for text, (modality, year) in texts:
                label = "static" if year is None else str(year)
                index = block.index.get(text)
                key = None if index is None else index.shape_key
                if key not in memo:
                    memo[key] = block_coverage(ids, windows, index, cut, needed=needed)
                gaps, parts = memo[key]
                missing[modality][label].extend(gaps)
                partial[modality][label].extend(parts)
                block_gaps[f"{modality}:{label}"] = (gaps, parts)
            if out is not None:
                _write_chunk_lines(out, ids, block.cells.tile_counts, block_gaps)
    finally:
        if out is not None:
            out.close()
    counts = planned.item_counts()
    items: dict[str, dict[str, int]] = {}
    for text, (modality, year) in texts:
        items.setdefault(modality, {})["static" if year is None else str(year)] = counts.get(text, 0)
    lists = [chunk_ids, *(f for per in (*missing.values(), *partial.values()) for f in per.values())]
    facts = describe(planned)
    return {
        "aoi": str(aoi.source),
        "aoi_area_km2": round(aoi.geometry.area / 1e6, 3),
        "catalog": facts["catalog"],
        "profile": facts["profile"],
        "model": {"path": str(planned.model.path), "name": planned.model.name, "version": planned.model.version},
        "years": years,
        "grid": facts["grid"],
        "chunks": chunk_ids.count,
        "tiles": n_tiles,
        "chunk_ids": chunk_ids.ids(),
        "items": items,
        "missing": {m: {y: f.ids() for y, f in per.items()} for m, per in missing.items()},
        "partial": {m: {y: f.ids() for y, f in per.items()} for m, per in partial.items()},
        "missing_counts": {m: {y: f.count for y, f in per.items()} for m, per in missing.items()},
        "partial_counts": {m: {y: f.count for y, f in per.items()} for m, per in partial.items()},
        "list_limit": list_limit,
        "truncated": any(f.truncated for f in lists),
        "chunks_file": None if chunks_file is None else str(chunks_file),
        "estimate": _estimate(planned.spec, chunk_ids.count, n_tiles, years, list(planned.modalities.values()),
                              tile_seconds),
        "warnings": list(planned.warnings),
    }


def _write_chunk_lines(out, ids, tile_counts, block_gaps: dict[str, tuple[list[str], list[str]]]) -> None:
    """One NDJSON line per chunk of a block: its tiles and the modality-years it lacks."""
    gap_of: dict[str, list[str]] = {}
    part_of: dict[str, list[str]] = {}
    for key, (gaps, parts) in block_gaps.items():
        for cid in gaps:
            gap_of.setdefault(cid, []).append(key)
        for cid in parts:
            part_of.setdefault(cid, []).append(key)
    for cid, n in zip(ids, tile_counts):
        out.write(json.dumps({"chunk_id": cid, "tiles": int(n), "missing": gap_of.get(cid, []),
                              "partial": part_of.get(cid, [])}) + "\n")


def _grown(bounds, planned: Planned):
    margin = planned.spec.window_px * planned.spec.resolution
    return (bounds[0] - margin, bounds[1] - margin, bounds[2] + margin, bounds[3] + margin)


SLIVER_M = 3.0
"""Width (grid CRS units) under which an uncovered strip is reprojection noise (see ``FOOTPRINT_STEP_DEG``)."""


def needed_parts(windows: np.ndarray, aoi: shapely.Geometry) -> np.ndarray:
    """The AOI's part of each chunk window (the window itself where it lies inside the AOI)."""
    shapely.prepare(aoi)
    inside = shapely.contains(aoi, windows)
    needed = windows.copy()
    needed[~inside] = shapely.intersection(windows[~inside], aoi)
    return needed


def block_coverage(ids: list[str], windows: np.ndarray, index: ItemIndex | None,
                   aoi: shapely.Geometry, *, needed: np.ndarray | None = None) -> tuple[list[str], list[str]]:
    """Chunk ids no footprint touches, and ids whose AOI part the footprints cover only in part.

    The items of a chunk are those ``rtsmap run`` gives its task (``ItemIndex.covering``). A
    chunk whose AOI part lies inside one footprint is covered (one vectorised test of the
    chunk-footprint pairs); for the others, one union of the distinct footprints meeting them
    per block (not one per chunk), then vectorised tests; only the chunks not inside the union
    measure what is left out.

    Parameters
    ----------
    ids
        The ids of the chunks of one block.
    windows
        Their read windows (shapely boxes, grid CRS), in the same order.
    index
        The items of one modality-year meeting the block (None: no item).
    aoi
        The AOI (or its part around the block) in the grid CRS.
    needed
        :func:`needed_parts` of ``windows`` and ``aoi``, when the caller has it already.

    Returns
    -------
    (gaps, parts) : lists of chunk ids
    """
    if not len(ids):
        return [], []
    if index is None or not len(index.items):
        return list(ids), []
    hit_chunk, hit_shape = index.meeting_shapes(windows)
    has = np.zeros(len(ids), dtype=bool)
    has[hit_chunk] = True
    gaps = [i for i, h in zip(ids, has) if not h]
    hit_ids = [i for i, h in zip(ids, has) if h]
    needed_all = needed_parts(windows, aoi) if needed is None else needed
    needed = needed_all[has]
    # Scenes are larger than chunks: most chunks' AOI part lies within one footprint (one
    # vectorised test of the pairs); only the others need the union of the footprints that meet them.
    held = shapely.contains(index.shapes[hit_shape], needed_all[hit_chunk]) if len(hit_chunk) else np.zeros(0, bool)
    rest = ~np.isin(np.flatnonzero(has), hit_chunk[held])
    if not rest.any():
        return gaps, []
    rest_rows = np.flatnonzero(has)[rest]
    # Distinct footprints only (scenes of one place share theirs): each is unioned once.
    footprints = index.shapes[np.unique(hit_shape[np.isin(hit_chunk, rest_rows)])]
    covered = shapely.union_all(footprints)
    shapely.prepare(covered)
    rest_ids = [c for c, r in zip(hit_ids, rest) if r]
    rest_needed = needed[rest]
    open_ = ~shapely.contains(covered, rest_needed)
    # A sliver is reprojection noise, not a gap: less than 0.1 % of the needed area, or
    # narrower than SLIVER_M (chords of footprints densified apart meet within ~1.3 m).
    left = shapely.difference(rest_needed[open_], covered)
    big = shapely.area(left) > 1e-3 * np.maximum(shapely.area(rest_needed[open_]), 1.0)
    wide = ~shapely.is_empty(shapely.buffer(left, -SLIVER_M / 2))
    parts = [c for c, p in zip([c for c, o in zip(rest_ids, open_) if o], big & wide) if p]
    return gaps, parts


def _modality_bytes_per_pixel(modality: ModalityProfile) -> int:
    size = sum(_DTYPE_BYTES[b.dtype] for b in modality.bands)
    if modality.mask is not None:
        size += _DTYPE_BYTES[modality.mask.dtype]
    return size


def _estimate(spec, n_chunks: int, n_tiles: int, years: list[int], modalities: list[ModalityProfile],
              tile_seconds: float) -> dict:
    """Work and input size of the modalities the model reads, stated with their assumptions."""
    pixels = n_chunks * spec.window_px * spec.window_px
    per_year = sum(_modality_bytes_per_pixel(m) for m in modalities if m.per_year)
    static = sum(_modality_bytes_per_pixel(m) for m in modalities if not m.per_year)
    input_bytes = pixels * (per_year * len(years) + static)
    tile_years = n_tiles * len(years)
    return {
        "chunk_years": n_chunks * len(years),
        "tasks": n_chunks,
        "tile_years": tile_years,
        "input_bytes": int(input_bytes),
        "input_bytes_note": "uncompressed, at grid resolution, one scene per modality and chunk-year "
        "(static modalities such as the DEM once per chunk: one task per chunk holds all its years); "
        "overlapping scenes read more",
        "seconds_per_tile": tile_seconds,
        "seconds": round(tile_years * tile_seconds, 1),
        "seconds_note": f"assumed {tile_seconds:g} s per tile on one GPU worker; divide by the workers",
    }


# --- output -------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text for people."""
    g = plan["grid"]
    est = plan["estimate"]
    lines = [
        f"AOI       {plan['aoi']} ({plan['aoi_area_km2']:g} km2)",
        f"catalog   {plan['catalog']} (profile {plan['profile']})",
        f"model     {plan['model']['name']} {plan['model']['version']} ({plan['model']['path']})",
        f"grid      {g['crs']}, {g['resolution']:g} m, tiles {g['tile_px']} px (overlap {g['overlap_px']}), "
        f"chunks of {g['tiles_per_chunk']}x{g['tiles_per_chunk']} tiles",
        f"years     {', '.join(str(y) for y in plan['years'])}",
        f"chunks    {plan['chunks']} ({plan['tiles']} tiles)",
        "",
        f"{'modality':<10}{'year':<8}{'items':>6}  {'chunks with no item':>20}  {'partly covered':>15}",
    ]
    for modality, per_year in plan["items"].items():
        for year, count in per_year.items():
            gaps = plan["missing_counts"][modality][year]
            parts = plan["partial_counts"][modality][year]
            lines.append(f"{modality:<10}{year:<8}{count:>6}  {gaps:>20}  {parts:>15}")
    gap_lines = []
    for modality, per_year in plan["missing"].items():
        for year, ids in per_year.items():
            if ids:
                total = plan["missing_counts"][modality][year]
                shown = ", ".join(ids[:10]) + (f" and {total - 10} more" if total > 10 else "")
                gap_lines.append(f"  {modality} {year}: {shown}")
    if gap_lines:
        lines += ["", "chunks with no item (they will be recorded as no_data):", *gap_lines]
    lines += [
        "",
        f"work      {est['tile_years']} tile-years ({est['chunk_years']} chunk-years)",
        f"input     ~{_size(est['input_bytes'])} to read ({est['input_bytes_note']})",
        f"time      ~{_duration(est['seconds'])} ({est['seconds_note']})",
    ]
    if plan.get("chunks_file"):
        lines.append(f"chunks    every chunk with its gaps in {plan['chunks_file']} (NDJSON)")
    return "\n".join(lines)


@click.command("plan")
@click.option("--aoi", "aoi_path", type=click.Path(dir_okay=False, path_type=Path), help="AOI vector file.")
@click.option("--years", help="Years: 2021-2023 or 2021,2023.")
@click.option("--catalog", default=None, help="STAC API URL or local catalog (items .json/.ndjson, catalog.json, .parquet); default: the profile's URL.")
@click.option("--profile", default=None, help=f"Profile name ({', '.join(profile_names())}) or YAML file; default: the one that fits the catalog (README).")
@click.option("--model", type=click.Path(dir_okay=False), help="Exported ONNX model whose tile size and resolution set the grid (default: the demo model).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Run configuration YAML, as for `rtsmap run` (flags override it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (logs go to stderr).")
@click.option("--crs", default=None, help="Grid CRS (default EPSG:3413).")
@click.option("--overlap-px", default=None, type=int, help="Tile overlap in pixels (default 32).")
@click.option("--tiles-per-chunk", default=None, type=int, help="Tiles along a chunk side (default 8).")
@click.option("--tile-seconds", default=DEFAULT_TILE_SECONDS, show_default=True, type=float, help="Assumed seconds per tile for the time estimate.")
@click.option("--list-limit", default=DEFAULT_LIST_LIMIT, show_default=True, type=click.IntRange(min=0), help="Most chunk ids the report lists per list (chunk_ids, each gap list); counts are always whole.")
@click.option("--chunks-file", type=click.Path(path_type=Path), default=None, help="Write every chunk (id, tiles, modality-years with no item or partly covered) to this NDJSON file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --chunks-file.")
def plan_command(
    aoi_path: Path | None,
    years: str | None,
    catalog: str | None,
    profile: str | None,
    model: str | None,
    config_path: str | None,
    as_json: bool,
    crs: str | None,
    overlap_px: int | None,
    tiles_per_chunk: int | None,
    tile_seconds: float,
    list_limit: int,
    chunks_file: Path | None,
    overwrite: bool,
) -> None:
    """Show the chunks, tiles, scenes and gaps of a run, and estimate its work, reading no rasters."""
    overrides = {
        "aoi": None if aoi_path is None else str(aoi_path),
        "years": years,
        "catalog": catalog,
        "profile": profile,
        "model": model,
        "grid.crs": crs,
        "grid.overlap_px": overlap_px,
        "grid.tiles_per_chunk": tiles_per_chunk,
    }
    config = load_run_config(config_path, overrides)
    if chunks_file is not None:
        check_chunks_file(chunks_file, overwrite)
    plan = plan_report(config, tile_seconds=tile_seconds, list_limit=list_limit, chunks_file=chunks_file)
    for line in plan["warnings"]:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
    else:
        click.echo(format_plan(plan))
