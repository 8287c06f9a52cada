"""The one planning path of ``rtsmap plan``, ``rtsmap run`` and ``rtsmap training-data``.

Everything a command decides before reading a raster is decided here, once:

- which profile: :func:`open_profile_catalog` applies the one rule (README, "Catalogs and
  profiles"): ``--profile`` if given; else, for a STAC API URL, the shipped profile with that
  URL; for a local catalog, the shipped profile whose collections and assets the catalog holds;
  with no catalog either, ``planetary-computer`` and its URL;
- the catalog of each modality (its own, else the profile's; ``--catalog`` overrides all),
  always opened with the modality's signing and headers, one per distinct catalog;
- the grid, from the model's tile size and resolution (:func:`grid_spec`);
- the search, by blocks of chunks, into compact item records kept on disk
  (:class:`~rtsmap.workflows.item_blocks.ItemStore`), and the items that cover each chunk
  (:class:`ItemIndex`, one block at a time), so memory does not grow with the AOI or the years;
- the checks that end a command before work starts (no item at all for a modality the model
  needs; outputs that cannot be written; inputs that cannot be read).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely

from rtsmap.pipeline.aoi import AOI, read_aoi
from rtsmap.pipeline.errors import CatalogError, ConfigError, ModelError
from rtsmap.pipeline.grid import Block, BlockCells, Chunk, GridSpec, block_cells, estimate_chunks, plan_blocks
from rtsmap.pipeline.infer import check_compatible
from rtsmap.pipeline.model_file import ModelInfo, read_model_info
from rtsmap.pipeline.profiles import CatalogProfile, ModalityProfile, load_profile
from rtsmap.pipeline.stac import (
    Catalog,
    ItemRecord,
    LocalCatalog,
    ModalityCatalogs,
    item_dict_ok,
    open_catalog,
    record_from_dict,
    redact,
    season_window,
)
from rtsmap.workflows.config import DEMO_MODEL, RunConfig
from rtsmap.workflows.item_blocks import ItemStore, key_text

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

DEFAULT_PROFILE = "planetary-computer"
"""The profile taken when neither a profile nor a catalog is given."""

DEFAULT_BLOCK_CHUNKS = 32
"""Chunks along a block side: 1,024 chunks a block (~570 km square at 10 m with 256 px tiles),
about the size of a Sentinel-1 frame, so an item meets few blocks (fewer rows on disk, fewer
API queries) while a block's chunks and items stay a few MB."""


# --- profiles -----------------------------------------------------------------------------------


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


def shipped_profiles() -> list[CatalogProfile]:
    """Every shipped profile, by name."""
    return [load_profile(PROFILES_DIR / f"{name}.yaml") for name in profile_names()]


def modality_assets(modality: ModalityProfile) -> frozenset[str]:
    """The asset keys a modality reads (its bands' and its mask's)."""
    keys = {band.asset for band in modality.bands}
    if modality.mask is not None:
        keys.add(modality.mask.asset)
    return frozenset(keys)


def _holds(profile: CatalogProfile, holdings: dict[str, frozenset[str]], *, assets: bool = True) -> bool:
    """Whether every modality of the profile has a collection in the catalog (with its assets)."""
    return all(
        any(c in holdings and (not assets or modality_assets(m) <= holdings[c]) for c in m.collections)
        for m in profile.modalities.values()
    )


def infer_profile(catalog: LocalCatalog) -> CatalogProfile:
    """The shipped profile a local catalog is for, from the collections and assets it holds.

    A profile matches when each of its modalities has a collection in the catalog whose items
    carry the assets it reads; of several matches, the one with the most modalities wins.

    Raises
    ------
    ConfigError
        If no shipped profile matches, or two match equally: the message lists the catalog's
        collections and asks for ``--profile``.
    """
    holdings = catalog.holdings()
    shipped = shipped_profiles()
    matches = [p for p in shipped if _holds(p, holdings)]
    best = max((len(p.modalities) for p in matches), default=0)
    matches = [p for p in matches if len(p.modalities) == best]
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(holdings) or "none"
    if matches:
        names = " and ".join(p.name for p in matches)
        raise ConfigError(f"catalog {catalog.source} fits the profiles {names} (collections: {found}); give --profile")
    near = [p.name for p in shipped if _holds(p, holdings, assets=False)]
    lacking = f" (the items lack assets that profile {' and '.join(near)} reads)" if near else ""
    raise ConfigError(
        f"no shipped profile fits catalog {catalog.source} (its collections: {found}){lacking}; "
        "give --profile (a shipped name or a YAML file naming these collections and assets)"
    )


def _profile_for_url(url: str) -> CatalogProfile:
    for profile in shipped_profiles():
        if profile.url and profile.url.rstrip("/") == url.rstrip("/"):
            return profile
    raise ConfigError(f"no shipped profile is for {redact(url)}: give --profile (a name or a YAML file)")


def open_profile_catalog(
    catalog: str | Path | None, profile: str | Path | CatalogProfile | None,
    modalities: Sequence[str] | None = None,
) -> tuple[Catalog, CatalogProfile]:
    """Choose the profile by the one rule and open each modality's catalog with its signing and headers.

    Parameters
    ----------
    catalog
        STAC API URL or local catalog path for every modality; None: each modality's own catalog
        (the profile's URL unless the modality names another).
    profile
        Shipped name, YAML path or loaded profile; None: chosen by the rule (module docstring).
    modalities
        Open the catalogs of these modalities of the profile only (those a model needs);
        None: of all.

    Returns
    -------
    (Catalog, CatalogProfile)
        The catalog is a :class:`~rtsmap.pipeline.stac.ModalityCatalogs` when the modalities
        live in more than one catalog; ``Catalog.for_modality`` gives each one's.

    Raises
    ------
    RtsmapError
        For a profile that cannot be found or chosen, a modality with no catalog, or a catalog
        that cannot be opened (naming the modalities it serves when there are several catalogs).
    """
    source = None if catalog is None else str(catalog)
    if profile is None and source is not None and not re.match(r"^https?://", source):
        opened = open_catalog(source)
        chosen = infer_profile(opened)
        # The items are read once; the profile's access settings are recorded on the catalog.
        opened.signing, opened.headers = chosen.signing, dict(chosen.headers) or None
        return opened, chosen
    if profile is None:
        chosen = _profile_for_url(source) if source is not None else resolve_profile(DEFAULT_PROFILE)
    else:
        chosen = resolve_profile(profile)
    return open_modality_catalogs(chosen, modalities, source), chosen


def open_modality_catalogs(profile: CatalogProfile, modalities: Sequence[str] | None = None,
                           override: str | None = None) -> Catalog:
    """Open one catalog per distinct (catalog, signing, headers) of the profile's modalities.

    Parameters
    ----------
    profile
        The profile (its modalities carry the catalog, signing and headers that apply).
    modalities
        Only these modalities (those of them the profile has); None or none of them: all.
    override
        A catalog (``--catalog``) used for every modality instead of its own.

    Returns
    -------
    Catalog
        The one catalog, or a :class:`~rtsmap.pipeline.stac.ModalityCatalogs` over several.

    Raises
    ------
    ConfigError
        For a modality with no catalog and no override.
    CatalogError
        For a catalog that cannot be opened.
    """
    names = [m for m in (modalities or ()) if m in profile.modalities] or list(profile.modalities)
    keys: dict[str, tuple] = {}
    for name in names:
        m = profile.modalities[name]
        where = override if override is not None else m.catalog
        if where is None:
            raise ConfigError(f"profile {profile.name} has no URL for {name}: give --catalog "
                              "(a STAC API URL or a local file) or name the modality's catalog in the profile")
        keys[name] = (where, m.signing, tuple(sorted((m.headers or {}).items())))
    opened: dict[tuple, Catalog] = {}
    for key in dict.fromkeys(keys.values()):
        where, signing, headers = key
        try:
            opened[key] = open_catalog(where, headers=dict(headers) or None, signing=signing)
        except CatalogError as exc:
            if len({k[0] for k in keys.values()}) == 1:
                raise
            users = "+".join(n for n, k in keys.items() if k == key)
            raise CatalogError(f"the {users} catalog of profile {profile.name}: {exc}") from None
    if len(opened) == 1:
        return next(iter(opened.values()))
    return ModalityCatalogs({n: opened[k] for n, k in keys.items()},
                            {n: profile.modalities[n].collections for n in names})


# --- the grid and the items of each chunk -------------------------------------------------------


def grid_spec(info: ModelInfo, config: RunConfig) -> GridSpec:
    """The run's grid: tile size and resolution from the model, the layout from the configuration."""
    return GridSpec(
        crs=config.grid.crs,
        resolution=info.resolution,
        tile_px=info.tile_size,
        overlap_px=config.grid.overlap_px,
        tiles_per_chunk=config.grid.tiles_per_chunk,
    )


FOOTPRINT_STEP_DEG = 0.1
"""Longest footprint edge (degrees) before projection. A parallel is a circle in a polar grid:
a 0.1 degree chord strays at most ~1.3 m from it at 60 N (less further north), a tenth of a
10 m pixel; finer steps multiply the vertices (and the cost of every footprint test) for nothing."""


def footprint_in_grid(geometry: dict, transformer: pyproj.Transformer) -> shapely.Geometry:
    """An item footprint (GeoJSON, WGS84) in the grid CRS, densified so long edges bend right."""
    return footprints_in_grid([geometry], transformer)[0]


def footprints_in_grid(geometries: list[dict], transformer: pyproj.Transformer) -> np.ndarray:
    """Footprints (GeoJSON, WGS84) in the grid CRS, densified, all coordinates projected in one call."""
    geoms = np.array([shapely.geometry.shape(g) for g in geometries], dtype=object)
    geoms = shapely.segmentize(geoms, FOOTPRINT_STEP_DEG)
    projected = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    return shapely.make_valid(projected)


class ItemIndex:
    """Item records of one modality and year (of one block), indexed by footprint in the grid CRS.

    Footprints are prepared once: the tree finds candidates by bounding box and the prepared
    footprints decide (several times faster than the tree's own predicate, which prepares the
    query geometries instead).
    """

    def __init__(self, records: list[ItemRecord]) -> None:
        self.items = list(records)
        # Scenes of one place often share their footprint (one tile, many dates): each distinct
        # footprint is parsed, prepared and tested once.
        wkbs = np.array([r.footprint_wkb for r in self.items], dtype=object)
        distinct, self.shape_of = np.unique(wkbs, return_inverse=True) if len(wkbs) else (wkbs, np.zeros(0, np.int64))
        self.shape_of = np.asarray(self.shape_of).reshape(-1)
        self.shapes = shapely.from_wkb(distinct)
        """The distinct footprints (grid CRS), prepared."""
        self.shape_key = hash(tuple(distinct.tolist()))
        """A key of the set of distinct footprints (equal sets cover equally)."""
        shapely.prepare(self.shapes)
        self.tree = shapely.STRtree(self.shapes)

    @property
    def footprints(self) -> np.ndarray:
        """The footprint of every item, in item order."""
        return self.shapes[self.shape_of]

    def meeting_shapes(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(geometry positions, distinct-footprint positions) of the pairs that intersect."""
        at, shape = self.tree.query(geoms)
        hit = shapely.intersects(self.shapes[shape], geoms[at]) if len(at) else np.zeros(0, bool)
        return at[hit], shape[hit]

    def meeting(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(geometry positions, item positions) of every item footprint that intersects a geometry."""
        at, shape = self.meeting_shapes(geoms)
        if not len(at):
            return at, shape
        order = np.argsort(self.shape_of, kind="stable")
        starts = np.searchsorted(self.shape_of[order], np.arange(len(self.shapes) + 1))
        counts = np.diff(starts)[shape]
        at_items = np.repeat(at, counts)
        items = np.concatenate([order[starts[k]:starts[k + 1]] for k in shape.tolist()])
        return at_items, items

    def covering(self, chunk: Chunk) -> list[int]:
        """Positions (in id order) of the items whose footprint meets the chunk's read window."""
        _, item = self.meeting(np.array([shapely.box(*chunk.bounds)]))
        return sorted(int(i) for i in item)


@dataclass(frozen=True)
class PlannedBlock:
    """One block of the plan: its chunks (as arrays) and the items that meet it, by modality and year."""

    block: Block
    """The block."""
    cells: BlockCells
    """Its chunks as arrays (ids, tile masks, windows), sorted by id; no Tile objects."""
    index: dict[str, ItemIndex]
    """``"modality:year"`` -> the items meeting the block."""

    @cached_property
    def chunks(self) -> list[Chunk]:
        """Its chunks with their tiles, sorted by id (made on first use; a plan needs only ``cells``)."""
        return self.cells.chunks()

    def chunk_items(self, chunk: Chunk, keys: dict[str, str]) -> dict[str, list[ItemRecord]]:
        """Modality -> the records (id order) whose footprint meets the chunk's read window.

        ``keys`` maps each modality to its ``"modality:year"`` key (see :meth:`Planned.keys_for`).
        """
        out = {}
        for modality, key in keys.items():
            index = self.index.get(key)
            out[modality] = [] if index is None else [index.items[i] for i in index.covering(chunk)]
        return out


PLAN_BYTES_PER_CHUNK = 600
"""Client memory a planned chunk costs at most (its id in the report, gap lists, task bookkeeping)."""

DEFAULT_PLAN_MEMORY_GB = 1.5
"""Memory budget of a plan, unless ``RTSMAP_PLAN_MEMORY_GB`` says otherwise."""


@dataclass(frozen=True)
class Planned:
    """What plan and run both know before any raster is read (items on disk, by block)."""

    config: RunConfig
    """The run configuration (years, grid layout, model, catalog)."""
    model: ModelInfo
    """The model's metadata (tile size, resolution, modalities)."""
    profile: CatalogProfile
    """The profile chosen by the rule."""
    catalog: Catalog
    """The catalog, opened with the profile's signing and headers; for modalities in several
    catalogs a :class:`~rtsmap.pipeline.stac.ModalityCatalogs` (``catalog.for_modality(name)``)."""
    modalities: dict[str, ModalityProfile]
    """Modality -> profile, for every modality the model needs, in the model's order."""
    aoi: AOI
    """The AOI in the grid CRS."""
    spec: GridSpec
    """The grid (from the model and the configuration)."""
    blocks: tuple[Block, ...]
    """Blocks of chunks that meet the AOI, row-major."""
    items: ItemStore
    """The items found, as compact records by block (on disk)."""
    warnings: tuple[str, ...] = ()
    """One-line warnings for the user (e.g. synthetic demo weights on real scenes)."""

    def key(self, modality: str, year: int) -> tuple[str, int | None]:
        """The search key of a modality in a year (None for static modalities)."""
        return (modality, year if self.modalities[modality].per_year else None)

    def keys_for(self, year: int) -> dict[str, str]:
        """Modality -> ``"modality:year"`` key of its items in ``year``."""
        return {m: key_text(self.key(m, year)) for m in self.modalities}

    def iter_blocks(self) -> Iterator[PlannedBlock]:
        """The blocks with chunks, one at a time, each with its chunks (as arrays) and items."""
        for cells in self.iter_cells():
            records = self.items.block_records(cells.block)
            index = {key: ItemIndex(recs) for key, recs in records.items()}
            yield PlannedBlock(cells.block, cells, index)

    def iter_cells(self) -> Iterator[BlockCells]:
        """The chunks of each block with chunks, as arrays (the grid only; no item is read)."""
        for block in self.blocks:
            cells = block_cells(self.aoi.geometry, self.spec, block)
            if len(cells):
                yield cells

    def iter_chunks(self) -> Iterator[Chunk]:
        """Every chunk with its tiles, block by block (the grid only; no item is read)."""
        for cells in self.iter_cells():
            yield from cells.chunks()

    def chunk_ids(self) -> list[str]:
        """Ids of every chunk, sorted (as :func:`rtsmap.pipeline.grid.plan_grid` orders them)."""
        return sorted(i for cells in self.iter_cells() for i in cells.ids)

    def item_ids(self) -> dict[str, list[str]]:
        """``"modality:year"`` (or ``"modality:None"``) -> the ids found, sorted."""
        return self.items.ids()

    def item_counts(self) -> dict[str, int]:
        """``"modality:year"`` -> number of items found."""
        return self.items.counts()


def is_demo_model(path: str | Path) -> bool:
    """Whether ``path`` is the shipped demo model (weights trained on synthetic scenes only)."""
    try:
        return Path(path).resolve() == DEMO_MODEL.resolve()
    except OSError:
        return False


def check_plan_memory(aoi: AOI, spec: GridSpec, budget_gb: float | None = None) -> int:
    """Refuse an AOI whose plan would not fit the memory budget, before anything is allocated.

    Returns
    -------
    int
        The estimated number of chunks.

    Raises
    ------
    ConfigError
        Naming the AOI's area, the estimated chunks and memory, and the budget.
    """
    if budget_gb is None:
        try:
            budget_gb = float(os.environ.get("RTSMAP_PLAN_MEMORY_GB", DEFAULT_PLAN_MEMORY_GB))
        except ValueError:
            raise ConfigError("RTSMAP_PLAN_MEMORY_GB must be a number of gigabytes") from None
    n = estimate_chunks(aoi.geometry, spec)
    need = n * PLAN_BYTES_PER_CHUNK / 1e9
    if need > budget_gb:
        raise ConfigError(
            f"the AOI ({aoi.geometry.area / 1e6:,.0f} km2) would plan ~{n:,} chunks of "
            f"{spec.chunk_px * spec.resolution / 1000:g} km, ~{need:,.1f} GB of plan in memory at "
            f"{PLAN_BYTES_PER_CHUNK} bytes a chunk, over the budget of {budget_gb:g} GB "
            "(RTSMAP_PLAN_MEMORY_GB): split the AOI or raise the budget"
        )
    return n


def plan_chunks(config: RunConfig, *, page_size: int = 100, block_chunks: int = DEFAULT_BLOCK_CHUNKS) -> Planned:
    """The shared planning path: model, profile, catalog, AOI, grid, search by blocks, checks.

    Parameters
    ----------
    config
        The run configuration (``profile`` None means: chosen by the rule).
    page_size
        Items per STAC API page.
    block_chunks
        Chunks along a block side (a STAC API is searched once per block, modality and year).

    Returns
    -------
    Planned

    Raises
    ------
    RtsmapError
        For a bad AOI, model, profile or years, an AOI too large for the memory budget, a
        catalog that cannot be searched, a model that does not match the profile, or a
        modality the model needs with no item at all.
    """
    years = sorted(set(int(y) for y in config.years))
    if not years:
        raise ConfigError("no years given: pass e.g. --years 2021-2023")
    if not config.aoi:
        raise ConfigError("--aoi is required (or `aoi:` in the configuration file)")
    # The local inputs first: a broken AOI is reported as such, also offline (before the catalog).
    aoi = read_aoi(config.aoi, crs=config.grid.crs)
    info = read_model_info(config.model)
    catalog, profile = open_profile_catalog(config.catalog, config.profile, info.modalities)
    missing = [m for m in info.modalities if m not in profile.modalities]
    if missing:
        raise ModelError(f"the model needs {', '.join(missing)} but profile {profile.name} has no such modality")
    modalities = {m: profile.modalities[m] for m in info.modalities}
    spec = grid_spec(info, config)
    check_compatible(info, {m: list(p.band_names) for m, p in modalities.items()}, spec.resolution, spec.tile_px)
    check_plan_memory(aoi, spec)
    blocks = plan_blocks(aoi.geometry, spec, block_chunks)
    store = ItemStore(spec, blocks)
    search_blocks(catalog, aoi, spec, blocks, store, years, modalities, page_size=page_size)
    warnings = check_found(store.counts(), modalities, catalog, profile, supports=info.supports)
    if is_demo_model(config.model) and profile.name != "demo":
        warnings.append(
            f"the demo model's weights are synthetic (trained on the synthetic demo region only); "
            f"with profile {profile.name} give --model with real weights to map real slumps"
        )
    return Planned(config, info, profile, catalog, modalities, aoi, spec, tuple(blocks), store, tuple(warnings))


def _records(dicts: Iterable[dict], modality: ModalityProfile, to_grid: pyproj.Transformer,
             batch: int = 2000) -> Iterator[ItemRecord]:
    """Compact records of item dictionaries, footprints projected a batch at a time."""
    chunk: list[dict] = []

    def flush():
        footprints = footprints_in_grid([d["geometry"] for d in chunk], to_grid)
        for data, geom in zip(chunk, footprints):
            yield record_from_dict(data, modality, shapely.to_wkb(geom))

    for data in dicts:
        if not data.get("geometry"):
            continue
        chunk.append(data)
        if len(chunk) >= batch:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def _block_wgs84(block: Block, aoi: AOI, to_wgs84: pyproj.Transformer) -> shapely.Geometry:
    """The AOI's part in a block, in WGS84 (the whole AOI where the part would cross the antimeridian)."""
    part = shapely.intersection(aoi.geometry, shapely.box(*block.bounds))
    part = shapely.segmentize(part, (block.bounds[2] - block.bounds[0]) / 16)
    projected = shapely.transform(part, lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
    minx, _, maxx, _ = projected.bounds
    if maxx - minx > 180 or not projected.is_valid:
        return aoi.geometry_wgs84
    return projected


def search_blocks(catalog: Catalog, aoi: AOI, spec: GridSpec, blocks: list[Block], store: ItemStore,
                  years: list[int], modalities: dict[str, ModalityProfile], *, page_size: int = 100) -> None:
    """Search every modality-year and keep the items, as compact records, by block.

    A local catalog is streamed once per modality-year (stac-geoparquet with pushdown on the
    AOI's bounds, NDJSON line by line); a STAC API is asked once per block, modality and year,
    so no query spans the whole AOI and no answer holds more than a block's items.

    Raises
    ------
    CatalogError
        If the catalog cannot be read or searched.
    """
    to_grid = pyproj.Transformer.from_crs("EPSG:4326", spec.crs, always_xy=True)
    to_wgs84 = pyproj.Transformer.from_crs(spec.crs, "EPSG:4326", always_xy=True)
    area = aoi.geometry_wgs84
    shapely.prepare(area)
    for name, modality in modalities.items():
        source = catalog.for_modality(name)
        for year in years if modality.per_year else [None]:
            window = season_window(year, modality.season) if year is not None and modality.season else None
            key = (name, year)
            if isinstance(source, LocalCatalog):
                dicts = (d for d in source.iter_dicts(modality.collections, bbox=area.bounds, datetime=window)
                         if item_dict_ok(d, area, modality.cloud_property, modality.max_cloud))
                n = store.add(key, _records(dicts, modality, to_grid))
            else:
                n = 0
                for block in blocks:
                    items = source.search(modality.collections, intersects=_block_wgs84(block, aoi, to_wgs84),
                                           datetime=window, cloud_property=modality.cloud_property,
                                           max_cloud=modality.max_cloud, page_size=page_size)
                    dicts = [it.to_dict(include_self_link=False, transform_hrefs=False) for it in items]
                    n += store.add(key, _records(dicts, modality, to_grid))
            log.info("%s %s: %d items read", name, year if year is not None else "(static)", n)


def check_found(counts: dict[str, int], modalities: dict[str, ModalityProfile], catalog: Catalog,
                profile: CatalogProfile, supports: Callable[[list[str]], bool] | None = None) -> list[str]:
    """Refuse a search that found no item at all (in any year) for a modality the model needs.

    A modality the model can do without (it was trained with modality dropout and ``supports``
    the others alone) is no reason to stop: the run maps with the others, and a warning says so.

    Returns
    -------
    list of str
        Warnings for the modalities the run will do without.

    Raises
    ------
    ConfigError
        Naming the collections searched and the ones the catalog holds.
    """
    empty = [m for m in modalities if not any(n for key, n in counts.items() if key.split(":")[0] == m)]
    if not empty:
        return []
    rest = [m for m in modalities if m not in empty]
    if rest and supports is not None and supports(rest):
        return [f"no {' or '.join(empty)} item in any year: the model maps with {'+'.join(rest)} alone"]
    searched = sorted({c for m in empty for c in modalities[m].collections})
    catalog = catalog.for_modality(empty[0])  # where the first empty modality was searched
    held = catalog.collection_ids()
    holds = ", ".join(held) if held else ("none" if held is not None else "(the API does not list them)")
    raise ConfigError(
        f"no {' or '.join(empty)} item in any year: searched collection(s) {', '.join(searched)} of profile "
        f"{profile.name} in {catalog.source}, which holds: {holds}; give the --profile that fits the catalog"
    )


# --- checks before work starts ------------------------------------------------------------------


def check_readable(path: str | Path | None, what: str) -> None:
    """Refuse an input file that does not exist or cannot be read.

    Raises
    ------
    ConfigError
    """
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if path.is_dir() and path.suffix.lower() != ".gdb":  # a FileGDB is a folder
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} cannot be read (permission denied)")


def check_workers(workers: int | None) -> None:
    """Refuse a worker count that is given and not positive.

    Raises
    ------
    ConfigError
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")


def describe(planned: Planned) -> dict[str, Any]:
    """Plain facts of a plan shared by the plan report and the run metadata.

    No chunk ids: a pan-Arctic plan has ~500,000 (``Planned.chunk_ids`` walks the grid for them).
    """
    return {
        "profile": planned.profile.name,
        "catalog": planned.catalog.source,
        "grid": {
            "crs": planned.spec.crs,
            "resolution": planned.spec.resolution,
            "tile_px": planned.spec.tile_px,
            "overlap_px": planned.spec.overlap_px,
            "tiles_per_chunk": planned.spec.tiles_per_chunk,
        },
    }
