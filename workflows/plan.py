"""``rtsmap plan``: what a run would do, before doing it.

Reads the AOI, lays the grid, searches the catalog for every modality and year, and reports the
chunks and tiles, the items found, the chunks no item covers, and a rough estimate of the work.
It reads no rasters and needs no model, so it is cheap to run before a long job.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyproj
import shapely

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.grid import Chunk, GridSpec, plan_grid
from rtsmap.pipeline.profiles import CatalogProfile, ModalityProfile, load_profile
from rtsmap.pipeline.stac import Catalog, open_catalog, redact, search_modalities
from rtsmap.workflows.config import parse_years

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# Assumed time per tile on one GPU worker (read, normalize, infer, vectorize). A stated guess for
# the estimate, not a measurement: override with --tile-seconds after a benchmark.
DEFAULT_TILE_SECONDS = 0.1

_DTYPE_BYTES = {"uint8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "float32": 4, "float64": 8}


# --- profiles by name ---------------------------------------------------------------------------


def profile_names() -> list[str]:
    """Names of the profiles shipped in ``workflows/profiles``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped profile name (``demo``, ``earth-search``...) or a path.

    Raises
    ------
    ConfigError
        If it is neither a shipped profile nor an existing file.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    if re.fullmatch(r"[A-Za-z0-9_.-]+", text) and (PROFILES_DIR / f"{text}.yaml").is_file():
        return PROFILES_DIR / f"{text}.yaml"
    raise ConfigError(
        f"profile {text!r} is neither a shipped profile ({', '.join(profile_names())}) nor a YAML file"
    )


def resolve_profile(name_or_path: str | Path | CatalogProfile) -> CatalogProfile:
    """Load a profile given by shipped name or path (a loaded profile is returned as is).

    Raises
    ------
    ConfigError
        If it cannot be found or is invalid.
    """
    if isinstance(name_or_path, CatalogProfile):
        return name_or_path
    return load_profile(profile_path(name_or_path))


def _default_profile(catalog: str | None) -> str:
    """The profile to use when none is given: the shipped one with this URL, or demo for files."""
    if catalog is None:
        raise ConfigError("give --catalog (a STAC API URL or a local catalog file) or --profile")
    if not re.match(r"^https?://", catalog):
        return "demo"
    for name in profile_names():
        profile = load_profile(PROFILES_DIR / f"{name}.yaml")
        if profile.url and profile.url.rstrip("/") == catalog.rstrip("/"):
            return name
    raise ConfigError(f"no shipped profile is for {redact(catalog)}: give --profile (a name or a YAML file)")


# --- the plan -----------------------------------------------------------------------------------


def make_plan(
    aoi_path: str | Path,
    years: Sequence[int],
    catalog: str | Path | Catalog | None = None,
    profile: str | Path | CatalogProfile | None = None,
    spec: GridSpec | None = None,
    *,
    tile_seconds: float = DEFAULT_TILE_SECONDS,
    page_size: int = 100,
) -> dict[str, Any]:
    """Plan a run without reading rasters: grid, items per modality and year, gaps, estimate.

    Parameters
    ----------
    aoi_path
        AOI file (any vector format ``read_aoi`` reads).
    years
        Years to map.
    catalog
        STAC API URL, local catalog path, or an open :class:`~pipeline.stac.Catalog`; default:
        the profile's URL.
    profile
        Shipped profile name, YAML path, or a loaded profile; default: the shipped profile whose
        URL is ``catalog``, or ``demo`` for a local catalog.
    spec
        The grid; default ``GridSpec()`` (EPSG:3413, 10 m, 256 px tiles).
    tile_seconds
        Assumed seconds per tile for the time estimate.
    page_size
        Items per STAC API page.

    Returns
    -------
    dict
        Plain JSON-ready data: ``aoi``, ``catalog``, ``profile``, ``years``, ``grid``,
        ``chunks``, ``tiles``, ``items`` (modality -> year or ``"static"`` -> count),
        ``missing`` (modality -> year -> chunk ids no item touches), ``partial`` (same shape:
        chunks whose AOI part items cover only in part) and ``estimate``.

    Raises
    ------
    RtsmapError
        For a bad AOI, profile or years, or a catalog that cannot be searched.
    """
    years = sorted(set(int(y) for y in years))
    if not years:
        raise ConfigError("no years given: pass e.g. --years 2021-2023")
    spec = spec or GridSpec()
    if profile is None:
        profile = _default_profile(None if catalog is None or isinstance(catalog, Catalog) else str(catalog))
    prof = resolve_profile(profile)
    if catalog is None:
        if prof.url is None:
            raise ConfigError(f"profile {prof.name} has no URL: give --catalog (a STAC API URL or a local file)")
        catalog = prof.url
    if not isinstance(catalog, Catalog):
        catalog = open_catalog(catalog, headers=prof.headers or None, signing=prof.signing)

    aoi = read_aoi(aoi_path, crs=spec.crs)
    chunks = plan_grid(aoi.geometry, spec)
    found = search_modalities(catalog, aoi, years, prof, page_size=page_size)

    items: dict[str, dict[str, int]] = {}
    missing: dict[str, dict[str, list[str]]] = {}
    partial: dict[str, dict[str, list[str]]] = {}
    to_grid = pyproj.Transformer.from_crs("EPSG:4326", spec.crs, always_xy=True)
    for (modality, year), found_items in found.items():
        key = "static" if year is None else str(year)
        items.setdefault(modality, {})[key] = len(found_items)
        footprints = [footprint_in_grid(it.geometry, to_grid) for it in found_items if it.geometry is not None]
        gaps, parts = _coverage(chunks, footprints, aoi.geometry)
        missing.setdefault(modality, {})[key] = gaps
        partial.setdefault(modality, {})[key] = parts

    n_tiles = sum(len(c.tiles) for c in chunks)
    estimate = _estimate(chunks, n_tiles, years, prof, tile_seconds)
    return {
        "aoi": str(aoi.source),
        "aoi_area_km2": round(aoi.geometry.area / 1e6, 3),
        "catalog": catalog.source,
        "profile": prof.name,
        "years": years,
        "grid": {
            "crs": spec.crs,
            "resolution": spec.resolution,
            "tile_px": spec.tile_px,
            "overlap_px": spec.overlap_px,
            "tiles_per_chunk": spec.tiles_per_chunk,
        },
        "chunks": len(chunks),
        "tiles": n_tiles,
        "chunk_ids": [c.id for c in chunks],
        "items": items,
        "missing": missing,
        "partial": partial,
        "estimate": estimate,
    }


def footprint_in_grid(geometry: dict, transformer: pyproj.Transformer) -> shapely.Geometry:
    """An item footprint (GeoJSON, WGS84) in the grid CRS, densified so long edges bend right."""
    geom = shapely.segmentize(shapely.geometry.shape(geometry), 0.01)  # degrees
    projected = shapely.transform(geom, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    return shapely.make_valid(projected)


def _coverage(chunks: list[Chunk], footprints: list, aoi: shapely.Geometry) -> tuple[list[str], list[str]]:
    """Chunk ids no footprint touches, and ids whose AOI part the footprints cover only in part."""
    if not footprints:
        return [c.id for c in chunks], []
    tree = shapely.STRtree(footprints)
    gaps, parts = [], []
    for chunk in chunks:
        box = shapely.box(*chunk.bounds)
        hits = tree.query(box, predicate="intersects")
        if len(hits) == 0:
            gaps.append(chunk.id)
            continue
        needed = shapely.intersection(box, aoi)
        covered = shapely.union_all([footprints[i] for i in hits])
        # A sliver (< 0.1 % of the needed area) is reprojection noise, not a gap.
        if shapely.difference(needed, covered).area > 1e-3 * max(needed.area, 1.0):
            parts.append(chunk.id)
    return gaps, parts


def _modality_bytes_per_pixel(modality: ModalityProfile) -> int:
    size = sum(_DTYPE_BYTES[b.dtype] for b in modality.bands)
    if modality.mask is not None:
        size += _DTYPE_BYTES[modality.mask.dtype]
    return size


def _estimate(chunks: list[Chunk], n_tiles: int, years: list[int], profile: CatalogProfile, tile_seconds: float) -> dict:
    """Work and input size, stated with their assumptions."""
    pixels = sum(c.shape[0] * c.shape[1] for c in chunks)
    per_pixel = sum(_modality_bytes_per_pixel(m) for m in profile.modalities.values())
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
@click.option("--aoi", "aoi_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="AOI vector file.")
@click.option("--years", required=True, help="Years: 2021-2023 or 2021,2023.")
@click.option("--catalog", default=None, help="STAC API URL or local catalog (items .json/.ndjson, catalog.json, .parquet); default: the profile's URL.")
@click.option("--profile", default=None, help=f"Profile name ({', '.join(profile_names())}) or YAML file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (logs go to stderr).")
@click.option("--crs", default="EPSG:3413", show_default=True, help="Grid CRS.")
@click.option("--resolution", default=10.0, show_default=True, type=float, help="Grid resolution in CRS units.")
@click.option("--tile-px", default=256, show_default=True, type=int, help="Tile side in pixels.")
@click.option("--overlap-px", default=32, show_default=True, type=int, help="Tile overlap in pixels.")
@click.option("--tiles-per-chunk", default=8, show_default=True, type=int, help="Tiles along a chunk side.")
@click.option("--tile-seconds", default=DEFAULT_TILE_SECONDS, show_default=True, type=float, help="Assumed seconds per tile for the time estimate.")
def plan_command(
    aoi_path: Path,
    years: str,
    catalog: str | None,
    profile: str | None,
    as_json: bool,
    crs: str,
    resolution: float,
    tile_px: int,
    overlap_px: int,
    tiles_per_chunk: int,
    tile_seconds: float,
) -> None:
    """Show the chunks, tiles, scenes and gaps of a run, and estimate its work, reading no rasters."""
    spec = GridSpec(crs=crs, resolution=resolution, tile_px=tile_px, overlap_px=overlap_px, tiles_per_chunk=tiles_per_chunk)
    plan = make_plan(aoi_path, parse_years(years), catalog, profile, spec, tile_seconds=tile_seconds)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
    else:
        click.echo(format_plan(plan))
