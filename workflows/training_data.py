"""Training chips from a region, through the real pipeline: AOI -> grid -> STAC -> load_chunk.

A chip is one grid tile in one year: every modality as float32 ``[C, T, T]`` raw physical
values (reflectance, dB, degrees...) exactly as ``pipeline.load.load_chunk`` gives them to
inference, its valid mask, and the true slump polygons of that year rasterized per instance.
The model code never imports the pipeline: the chip files and the COCO JSON written here are
the interface (``models/data.py`` reads them).

Output layout under ``out_dir``::

    chips/<tile_id>_<year>.npz   arrays <modality> float32 [C, T, T] and <modality>_valid bool [T, T]
    annotations.json             COCO: images (chips, with tile id, year, region, split),
                                 annotations (instances: bbox, area, RLE segmentation)
    dataset.json                 the manifest: bands, tile size, resolution, split counts and
                                 per-band mean/std over the train split's valid pixels

Leak-free split. Chips are cut WITHOUT overlap (unlike inference tiles) so that no pixel
lies in two chips. Tiles are gathered into square blocks of ``block_tiles`` x ``block_tiles``;
blocks are merged when one slump cluster (the true polygons of all years, buffered by
``cluster_buffer_m`` and dissolved) touches both; all years of a tile share its block. Whole
merged blocks are dealt to train/val/test in a seeded order, so a slump (in any year, cut by
any tile edge) and its neighbourhood never land in two splits.

ARTS-schema truth (one layer, ``Year``/``BaseMapDate`` columns) is read by the same
:func:`build_training_chips`: give the truth file and a catalog of scenes covering it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import rasterio.features
import shapely
from affine import Affine
from pycocotools import mask as mask_utils

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.evaluation import read_truth
from rtsmap.pipeline.grid import GridSpec, plan_grid
from rtsmap.pipeline.load import load_chunk
from rtsmap.pipeline.stac import search_modalities
from rtsmap.pipeline.outputs import check_writable_dir
from rtsmap.workflows.planning import check_readable, open_profile_catalog

log = logging.getLogger(__name__)

#: Format tag of dataset.json (models/data.py checks it).
DATASET_FORMAT = "rtsmap-chips/1"

#: Columns tried, in order, for a stable id of a true polygon (demo region, then ARTS).
ID_COLUMNS = ("slump_id", "UID", "id")

SPLITS = ("train", "val", "test")

#: Chip sides accepted (the model variants use 128-512 px; 4096 px chunks of 8 tiles stay < 1 GiB).
MIN_TILE_PX, MAX_TILE_PX = 32, 2048

#: What a finished chip folder holds; an existing one is replaced only with ``overwrite``.
OUTPUT_FILES = ("annotations.json", "dataset.json")


@dataclass(frozen=True)
class ChipOptions:
    """How chips are cut and split."""

    tile_px: int = 256
    """Chip side T in pixels: the model's tile size."""
    resolution: float = 10.0
    """Grid resolution in metres: the model's resolution."""
    crs: str = "EPSG:3413"
    """Grid CRS."""
    tiles_per_chunk: int = 8
    """Tiles per chunk side: how many chips one ``load_chunk`` call reads."""
    block_tiles: int = 2
    """Side of the square spatial blocks (in tiles) that are dealt to splits whole."""
    cluster_buffer_m: float = 100.0
    """True polygons closer than this (any year) form one slump cluster (kept in one split)."""
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Target share of chips in train, val and test."""
    seed: int = 0
    """Seed of the split (the same seed and inputs give the same split)."""
    min_instance_px: int = 4
    """Instances with fewer pixels inside a chip (slivers cut by the chip edge) are dropped."""
    min_valid_fraction: float = 0.1
    """Chips where no modality has at least this share of valid pixels are dropped."""

    def __post_init__(self) -> None:
        # Bounds before any allocation: a chunk holds (tiles_per_chunk * tile_px)^2 pixels per band.
        if not MIN_TILE_PX <= self.tile_px <= MAX_TILE_PX:
            raise ConfigError(f"--tile-size must be between {MIN_TILE_PX} and {MAX_TILE_PX} pixels, got {self.tile_px}")
        if not (math.isfinite(self.resolution) and 0.1 <= self.resolution <= 1000.0):
            raise ConfigError(f"--resolution must be between 0.1 and 1000 m, got {self.resolution}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or sum(self.split_fractions) <= 0:
            raise ConfigError(f"split_fractions must be three non-negative shares, got {self.split_fractions}")
        if self.block_tiles < 1:
            raise ConfigError(f"block_tiles must be >= 1, got {self.block_tiles}")


@dataclass(frozen=True)
class ChipDataset:
    """What :func:`build_training_chips` wrote."""

    root: Path
    """The output directory."""
    annotations: Path
    """``annotations.json`` (COCO)."""
    manifest: Path
    """``dataset.json``."""
    counts: dict[str, int]
    """Chips per split."""
    instances: int
    """Instances over all chips."""


def _truth_id(row: Any, index: int, year: int) -> str:
    for column in ID_COLUMNS:
        if column in row and row[column] is not None and str(row[column]) != "nan":
            return str(row[column])
    return f"{year}-{index}"


def _clusters(truth: dict[int, Any], buffer_m: float) -> tuple[list[Any], shapely.STRtree]:
    """Dissolved, buffered outlines of all true polygons of all years (one per slump cluster)."""
    geoms = [g for gdf in truth.values() for g in gdf.geometry if g is not None and not g.is_empty]
    if not geoms:
        return [], shapely.STRtree([])
    merged = shapely.union_all(shapely.buffer(np.asarray(geoms, dtype=object), buffer_m / 2.0))
    parts = list(shapely.get_parts(merged))
    return parts, shapely.STRtree(parts)


def _assign_splits(groups: dict[Any, int], fractions: Sequence[float], seed: int) -> dict[Any, str]:
    """Deal groups (key -> chip count) to splits: seeded order, each to the split furthest below its share."""
    keys = sorted(groups, key=repr)
    order = np.random.default_rng(seed).permutation(len(keys))
    shares = np.asarray(fractions, dtype=float) / float(sum(fractions))
    counts = np.zeros(3)
    out: dict[Any, str] = {}
    for i in order:
        key = keys[i]
        total = counts.sum() + groups[key]
        deficit = shares * total - counts
        deficit[shares == 0] = -np.inf
        k = int(np.argmax(deficit))
        counts[k] += groups[key]
        out[key] = SPLITS[k]
    return out


class _UnionFind:
    """Disjoint sets over hashable keys (blocks merged through shared slump clusters)."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Root = the smaller key by repr, so the result does not depend on merge order.
            lo, hi = sorted((ra, rb), key=repr)
            self.parent[hi] = lo


@dataclass
class _Cutter:
    """What cutting chips accumulates: images, annotations, blocks for the split."""

    out: Path
    """Output directory."""
    options: ChipOptions
    """Chip size, grid and split settings."""
    truth: dict[int, Any]
    """Year -> true polygons in the grid CRS."""
    region: str
    """Region name stored with each chip."""
    clusters: shapely.STRtree
    """Slump clusters (all years), for the leak-free split."""
    band_names: dict[str, tuple[str, ...]]
    """Modality -> band names."""
    images: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """COCO images (chips)."""
    annotations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """COCO annotations (instances)."""
    blocks: _UnionFind = dataclasses.field(default_factory=_UnionFind)
    """Blocks merged through shared slump clusters."""
    tile_block: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Tile id -> its block."""

    def __post_init__(self) -> None:
        self.truth_trees = {y: shapely.STRtree(list(gdf.geometry)) for y, gdf in self.truth.items()}


def _chip_arrays(cutter: _Cutter, stack: Any, rows: slice, cols: slice) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One tile's arrays per modality (zeros, all invalid, where a modality has no scene)."""
    t = cutter.options.tile_px
    arrays: dict[str, np.ndarray] = {}
    valid_fraction: dict[str, float] = {}
    for m, names in cutter.band_names.items():
        if m in stack.data:
            arrays[m] = np.ascontiguousarray(stack.data[m][:, rows, cols], dtype=np.float32)
            arrays[f"{m}_valid"] = np.ascontiguousarray(stack.valid[m][rows, cols])
        else:  # no scene of this modality: all invalid, the model sees zeros
            arrays[m] = np.zeros((len(names), t, t), np.float32)
            arrays[f"{m}_valid"] = np.zeros((t, t), bool)
        valid_fraction[m] = float(arrays[f"{m}_valid"].mean())
    return arrays, valid_fraction


def _annotate(cutter: _Cutter, tile: Any, year: int, image_id: int) -> int:
    """Rasterize the true polygons touching a tile as instances; return how many were kept."""
    t, res = cutter.options.tile_px, cutter.options.resolution
    minx, miny, maxx, maxy = tile.bounds
    transform = Affine(res, 0.0, minx, 0.0, -res, maxy)
    gdf = cutter.truth[year]
    n_inst = 0
    for idx in sorted(cutter.truth_trees[year].query(shapely.box(*tile.bounds), predicate="intersects")):
        geom = gdf.geometry.iloc[idx]
        mask = rasterio.features.rasterize([(geom, 1)], out_shape=(t, t), transform=transform, fill=0, dtype="uint8")
        if int(mask.sum()) < cutter.options.min_instance_px:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask))
        cluster = sorted(int(c) for c in cutter.clusters.query(geom, predicate="intersects"))
        cutter.annotations.append({
            "id": len(cutter.annotations) + 1,
            "image_id": image_id,
            "category_id": 1,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "area": float(mask_utils.area(rle)),
            "segmentation": {"size": [t, t], "counts": rle["counts"].decode("ascii")},
            "iscrowd": 0,
            "truth_id": _truth_id(gdf.iloc[idx], idx, year),
            "cluster": cluster[0] if cluster else -1,
        })
        n_inst += 1
    return n_inst


def _cut_chunk_year(cutter: _Cutter, chunk: Any, year: int, stack: Any) -> None:
    """Write the chips of one loaded chunk-year and record them for the split."""
    options = cutter.options
    for tile in chunk.tiles:
        rows, cols = chunk.tile_window(tile)
        arrays, valid_fraction = _chip_arrays(cutter, stack, rows, cols)
        if max(valid_fraction.values()) < options.min_valid_fraction:
            continue
        image_id = len(cutter.images) + 1
        n_inst = _annotate(cutter, tile, year, image_id)
        name = f"{tile.id}_{year}.npz"
        np.savez_compressed(cutter.out / "chips" / name, **arrays)
        block = ("block", tile.col // options.block_tiles, tile.row // options.block_tiles)
        cutter.blocks.find(block)
        cutter.tile_block[tile.id] = block
        # Every cluster touching the tile ties the tile's block to the cluster.
        for c in cutter.clusters.query(shapely.box(*tile.bounds), predicate="intersects"):
            cutter.blocks.union(block, ("cluster", int(c)))
        cutter.images.append({
            "id": image_id,
            "file_name": f"chips/{name}",
            "width": options.tile_px,
            "height": options.tile_px,
            "tile_id": tile.id,
            "chunk_id": chunk.id,
            "year": year,
            "region": cutter.region,
            "bounds": list(tile.bounds),
            "crs": options.crs,
            "valid_fraction": valid_fraction,
            "items": {m: list(stack.item_ids.get(m, [])) for m in cutter.band_names},
            "instances": n_inst,
        })


def _split(cutter: _Cutter) -> dict[str, int]:
    """Deal merged blocks (all years of their tiles) whole to splits; return chips per split.

    Groups with slumps and groups without are dealt separately, so that every split gets slumps
    (when there are at least three groups with some) and background alike.
    """
    group_size: dict[Any, int] = defaultdict(int)
    positive: set[Any] = set()
    for image in cutter.images:
        group = cutter.blocks.find(cutter.tile_block[image["tile_id"]])
        group_size[group] += 1
        if image["instances"]:
            positive.add(group)
    fractions, seed = cutter.options.split_fractions, cutter.options.seed
    split_of = _assign_splits({g: n for g, n in group_size.items() if g in positive}, fractions, seed)
    split_of.update(_assign_splits({g: n for g, n in group_size.items() if g not in positive}, fractions, seed))
    for image in cutter.images:
        image["split"] = split_of[cutter.blocks.find(cutter.tile_block[image["tile_id"]])]
    return {s: sum(i["split"] == s for i in cutter.images) for s in SPLITS}


def _read_truth_years(truth_path: str | os.PathLike, crs: str, years: Sequence[int] | None) -> dict[int, Any]:
    """The true polygons of the requested years (default: all), in the grid CRS.

    Raises
    ------
    ConfigError
        If the truth has none of the requested years.
    """
    truth = {y: gdf.to_crs(crs) for y, gdf in read_truth(truth_path).items()}
    years = sorted(truth) if years is None else sorted(int(y) for y in years)
    missing = [y for y in years if y not in truth]
    if missing or not years:
        raise ConfigError(f"truth file {truth_path} has no polygons for year(s) {missing or years}; it has {sorted(truth)}")
    return {y: truth[y] for y in years}


def build_training_chips(
    aoi_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    catalog: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    profile: str | os.PathLike | None = None,
    options: ChipOptions = ChipOptions(),
    years: Sequence[int] | None = None,
    region_name: str | None = None,
    overwrite: bool = False,
) -> ChipDataset:
    """Cut training chips with instance masks and a leak-free split.

    Parameters
    ----------
    aoi_path
        AOI file (any CRS; see ``pipeline.aoi.read_aoi``).
    truth_path
        True polygons: ``rts_<year>`` layers or an ARTS-schema file (``pipeline.evaluation.read_truth``).
    catalog
        STAC catalog path or URL holding optical, SAR and DEM scenes (``pipeline.stac.open_catalog``).
    out_dir
        Output directory (created). One that already holds a chip set (``annotations.json`` or
        ``dataset.json``) is refused unless ``overwrite``, before any work.
    profile
        Catalog profile name or YAML path; None: chosen by the rule of ``workflows.planning``
        (the same as ``rtsmap run``), and the catalog is opened with its signing and headers.
    options
        Chip size, grid and split settings.
    years
        Years to cut (default: every year of the truth file).
    region_name
        Name stored with each chip (default: the AOI file's parent folder name).
    overwrite
        Replace the chip set already in ``out_dir``.

    Returns
    -------
    ChipDataset

    Raises
    ------
    RtsmapError
        If the truth or AOI cannot be read, the output cannot be written or holds a chip set
        (without ``overwrite``), the truth has none of the requested years, or no chip can be cut.
    """
    check_readable(truth_path, "--truth")
    check_writable_dir(out_dir, "--out")
    _refuse_existing_chip_set(out_dir, overwrite)
    aoi = read_aoi(aoi_path, crs=options.crs)
    truth = _read_truth_years(truth_path, options.crs, years)
    years = sorted(truth)
    stac, catalog_profile = open_profile_catalog(catalog, profile)
    found = search_modalities(stac, aoi, years, catalog_profile)
    modalities = list(catalog_profile.modalities)
    spec = GridSpec(crs=options.crs, resolution=options.resolution, tile_px=options.tile_px,
                    overlap_px=0, tiles_per_chunk=options.tiles_per_chunk)
    out = Path(out_dir)
    (out / "chips").mkdir(parents=True, exist_ok=True)
    cutter = _Cutter(
        out=out,
        options=options,
        truth=truth,
        region=region_name or Path(aoi_path).resolve().parent.name,
        clusters=_clusters(truth, options.cluster_buffer_m)[1],
        band_names={m: tuple(catalog_profile.modalities[m].band_names) for m in modalities},
    )
    _cut_all(cutter, plan_grid(aoi.geometry, spec), years, found, catalog_profile)
    if not cutter.images:
        raise ConfigError(f"no chip could be cut: the AOI {aoi_path} has no valid pixels in catalog {catalog}")
    counts = _split(cutter)
    manifest = {
        "format": DATASET_FORMAT,
        "region": cutter.region,
        "aoi": str(Path(aoi_path).resolve()),
        "truth": str(Path(truth_path).resolve()),
        "catalog": str(catalog),
        "profile": catalog_profile.name,
        "years": years,
        "tile_size": options.tile_px,
        "resolution": options.resolution,
        "crs": options.crs,
        "modalities": list(modalities),
        "bands": {m: list(b) for m, b in cutter.band_names.items()},
        "normalization": _train_statistics(out, cutter.images, cutter.band_names),
        "options": dataclasses.asdict(options),
        "counts": counts,
        "instances": len(cutter.annotations),
    }
    _write_chip_set(cutter, manifest)
    return ChipDataset(out, out / "annotations.json", out / "dataset.json", counts, len(cutter.annotations))


def _refuse_existing_chip_set(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Raise ConfigError when ``out_dir`` already holds a chip set and ``overwrite`` is not set."""
    existing = [name for name in OUTPUT_FILES if (Path(out_dir) / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out {out_dir} already holds a chip set ({', '.join(existing)}): "
                          "choose another folder or pass --overwrite")


def _cut_all(cutter: _Cutter, chunks: Sequence[Any], years: Sequence[int], found: dict, catalog_profile: Any) -> None:
    """Load every chunk for every year and cut its chips into ``cutter``."""
    modalities = list(catalog_profile.modalities)
    for chunk in chunks:
        for year in years:
            items = {m: found.get((m, year), found.get((m, None), [])) for m in modalities}
            _cut_chunk_year(cutter, chunk, year, load_chunk(chunk, items, catalog_profile.modalities, year))
            log.info("chunk %s year %d: %d chips so far", chunk.id, year, len(cutter.images))


def _write_chip_set(cutter: _Cutter, manifest: dict[str, Any]) -> None:
    """Write the COCO ``annotations.json`` and the ``dataset.json`` manifest into ``cutter.out``."""
    coco = {
        "info": {"description": f"rtsmap training chips of {cutter.region}",
                 **{k: manifest[k] for k in ("format", "tile_size", "resolution", "years")}},
        "images": cutter.images,
        "annotations": cutter.annotations,
        "categories": [{"id": 1, "name": "rts"}],
    }
    _write_json(cutter.out / "annotations.json", coco)
    _write_json(cutter.out / "dataset.json", manifest)


def _train_statistics(root: Path, images: list[dict], band_names: dict[str, tuple[str, ...]]) -> dict:
    """Per-band mean and std over the valid pixels of the train chips (all chips if no train)."""
    chosen = [i for i in images if i["split"] == "train"] or images
    sums = {m: np.zeros((len(b), 3)) for m, b in band_names.items()}  # count, sum, sum of squares
    for image in chosen:
        with np.load(root / image["file_name"]) as z:
            for m in band_names:
                valid = z[f"{m}_valid"]
                x = z[m][:, valid].astype(np.float64)
                sums[m] += np.stack([np.full(len(x), x.shape[1]), x.sum(1), (x * x).sum(1)], 1)
    stats = {}
    for m, s in sums.items():
        n = np.maximum(s[:, 0], 1)
        mean = s[:, 1] / n
        std = np.sqrt(np.maximum(s[:, 2] / n - mean**2, 0.0))
        stats[m] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(max(v, 1e-3)), 6) for v in std]}
    return stats


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def chips_from_region(region_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      options: ChipOptions = ChipOptions(), overwrite: bool = False) -> ChipDataset:
    """:func:`build_training_chips` on a demo region (``aoi.geojson``, ``truth.gpkg``, ``stac/items.json``).

    Parameters
    ----------
    region_dir
        Written by ``workflows.demo_region.generate_region`` (``rtsmap demo-data``).
    out_dir
        Output directory.
    options
        Chip size, grid and split settings.
    overwrite
        Replace the chip set already in ``out_dir``.

    Returns
    -------
    ChipDataset

    Raises
    ------
    ConfigError
        If the folder is not a demo region.
    """
    root = Path(region_dir)
    for name in ("aoi.geojson", "truth.gpkg", "stac/items.json"):
        if not (root / name).is_file():
            raise ConfigError(f"{root} is not a demo region: {name} is missing (make one with `rtsmap demo-data`)")
    return build_training_chips(root / "aoi.geojson", root / "truth.gpkg", root / "stac/items.json", out_dir,
                                profile="demo", options=options, region_name=root.resolve().name,
                                overwrite=overwrite)


@click.command("training-data")
@click.option("--region", "region_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A demo region folder (aoi.geojson, truth.gpkg, stac/). Or give --aoi, --truth and --catalog.")
@click.option("--aoi", type=click.Path(dir_okay=False, path_type=Path), default=None, help="AOI file.")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="True polygons: rts_<year> layers or an ARTS-schema file.")
@click.option("--catalog", default=None, help="STAC catalog path or URL.")
@click.option("--profile", default=None, help="Catalog profile name or YAML file; default: the one that fits the catalog (README).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tile-size", default=256, show_default=True, type=int, help="Chip side in pixels (the model's tile size).")
@click.option("--resolution", default=10.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/val/test split.")
@click.option("--overwrite", is_flag=True, help="Replace the chip set already in --out.")
def training_data_command(region_dir, aoi, truth, catalog, profile, out_dir, tile_size, resolution, seed, overwrite) -> None:
    """Cut training chips (npz + COCO JSON, leak-free split) from scenes and true polygons."""
    options = ChipOptions(tile_px=tile_size, resolution=resolution, seed=seed)
    if region_dir is not None:
        result = chips_from_region(region_dir, out_dir, options=options, overwrite=overwrite)
    elif aoi and truth and catalog:
        result = build_training_chips(aoi, truth, catalog, out_dir, profile=profile, options=options, overwrite=overwrite)
    else:
        raise ConfigError("give --region DIR, or all of --aoi, --truth and --catalog")
    click.echo(f"{sum(result.counts.values())} chips ({', '.join(f'{k} {v}' for k, v in result.counts.items())}), "
               f"{result.instances} instances -> {result.root}")
