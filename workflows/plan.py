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
import shapely

from rtsmap.pipeline.grid import Chunk
from rtsmap.pipeline.profiles import ModalityProfile
from rtsmap.workflows.config import RunConfig, load_run_config, replace
from rtsmap.workflows.planning import (  # noqa: F401  (re-exported: older imports use workflows.plan)
    PROFILES_DIR,
    ItemIndex,
    Planned,
    describe,
    footprint_in_grid,
    plan_chunks,
    profile_given,
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


def plan_report(config: RunConfig, *, tile_seconds: float = DEFAULT_TILE_SECONDS, page_size: int = 100) -> dict[str, Any]:
    """Plan a run without reading rasters: grid, items per modality and year, gaps, estimate.

    Parameters
    ----------
    config
        The run configuration (AOI, years, catalog, profile or None for the rule, model, grid).
    tile_seconds
        Assumed seconds per tile for the time estimate.
    page_size
        Items per STAC API page.

    Returns
    -------
    dict
        Plain JSON-ready data: ``aoi``, ``catalog``, ``profile``, ``model``, ``years``, ``grid``,
        ``chunks``, ``tiles``, ``chunk_ids``, ``items`` (modality -> year or ``"static"`` ->
        count), ``missing`` (modality -> year -> chunk ids no item touches), ``partial`` (same
        shape: chunks whose AOI part items cover only in part), ``estimate`` and ``warnings``.

    Raises
    ------
    RtsmapError
        For a bad AOI, model, profile or years, a catalog that cannot be searched, or a modality
        the model needs with no item at all.
    """
    planned = plan_chunks(config, page_size=page_size)
    return report(planned, tile_seconds=tile_seconds)


def report(planned: Planned, *, tile_seconds: float = DEFAULT_TILE_SECONDS) -> dict[str, Any]:
    """The plan report of a :class:`~workflows.planning.Planned` (see :func:`plan_report`)."""
    chunks, aoi = planned.chunks, planned.aoi
    years = sorted(set(int(y) for y in planned.config.years))
    items: dict[str, dict[str, int]] = {}
    missing: dict[str, dict[str, list[str]]] = {}
    partial: dict[str, dict[str, list[str]]] = {}
    for (modality, year), found_items in planned.found.items():
        key = "static" if year is None else str(year)
        items.setdefault(modality, {})[key] = len(found_items)
        gaps, parts = _coverage(chunks, planned.index[(modality, year)], aoi.geometry)
        missing.setdefault(modality, {})[key] = gaps
        partial.setdefault(modality, {})[key] = parts
    n_tiles = sum(len(c.tiles) for c in chunks)
    facts = describe(planned)
    return {
        "aoi": str(aoi.source),
        "aoi_area_km2": round(aoi.geometry.area / 1e6, 3),
        "catalog": facts["catalog"],
        "profile": facts["profile"],
        "model": {"path": str(planned.model.path), "name": planned.model.name, "version": planned.model.version},
        "years": years,
        "grid": facts["grid"],
        "chunks": len(chunks),
        "tiles": n_tiles,
        "chunk_ids": facts["chunk_ids"],
        "items": items,
        "missing": missing,
        "partial": partial,
        "estimate": _estimate(chunks, n_tiles, years, list(planned.modalities.values()), tile_seconds),
        "warnings": list(planned.warnings),
    }


def _coverage(chunks: list[Chunk], index: ItemIndex, aoi: shapely.Geometry) -> tuple[list[str], list[str]]:
    """Chunk ids no footprint touches, and ids whose AOI part the footprints cover only in part.

    The items of a chunk are those ``rtsmap run`` gives its task (``ItemIndex.covering``).
    """
    gaps, parts = [], []
    for chunk in chunks:
        hits = index.covering(chunk)
        if not hits:
            gaps.append(chunk.id)
            continue
        needed = shapely.intersection(shapely.box(*chunk.bounds), aoi)
        covered = shapely.union_all([index.footprints[i] for i in hits])
        # A sliver (< 0.1 % of the needed area) is reprojection noise, not a gap.
        if shapely.difference(needed, covered).area > 1e-3 * max(needed.area, 1.0):
            parts.append(chunk.id)
    return gaps, parts


def _modality_bytes_per_pixel(modality: ModalityProfile) -> int:
    size = sum(_DTYPE_BYTES[b.dtype] for b in modality.bands)
    if modality.mask is not None:
        size += _DTYPE_BYTES[modality.mask.dtype]
    return size


def _estimate(chunks: list[Chunk], n_tiles: int, years: list[int], modalities: list[ModalityProfile],
              tile_seconds: float) -> dict:
    """Work and input size of the modalities the model reads, stated with their assumptions."""
    pixels = sum(c.shape[0] * c.shape[1] for c in chunks)
    per_pixel = sum(_modality_bytes_per_pixel(m) for m in modalities)
    input_bytes = pixels * per_pixel * len(years)
    tile_years = n_tiles * len(years)
    return {
        "chunk_years": len(chunks) * len(years),
        "tile_years": tile_years,
        "input_bytes": int(input_bytes),
        "input_bytes_note": "uncompressed, at grid resolution, one scene per modality and chunk-year "
        "(the DEM is read again each year); overlapping scenes read more",
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
            gaps = len(plan["missing"][modality][year])
            parts = len(plan["partial"][modality][year])
            lines.append(f"{modality:<10}{year:<8}{count:>6}  {gaps:>20}  {parts:>15}")
    gap_lines = []
    for modality, per_year in plan["missing"].items():
        for year, ids in per_year.items():
            if ids:
                shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
                gap_lines.append(f"  {modality} {year}: {shown}")
    if gap_lines:
        lines += ["", "chunks with no item (they will be recorded as no_data):", *gap_lines]
    lines += [
        "",
        f"work      {est['tile_years']} tile-years ({est['chunk_years']} chunk-years)",
        f"input     ~{_size(est['input_bytes'])} to read ({est['input_bytes_note']})",
        f"time      ~{_duration(est['seconds'])} ({est['seconds_note']})",
    ]
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
    if not profile_given(profile, config_path):
        config = replace(config, profile=None)
    plan = plan_report(config, tile_seconds=tile_seconds)
    for line in plan["warnings"]:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
    else:
        click.echo(format_plan(plan))
