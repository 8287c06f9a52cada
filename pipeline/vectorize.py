"""Turn detection masks into polygons in map coordinates.

Each detection becomes one row: its mask is polygonized with GDAL (``rasterio.features.shapes``),
holes kept, then simplified without breaking validity. The geometry is in the grid CRS, through
the chunk's read-window transform shifted by the mask's (row0, col0).

Overlapping instances of one tile
---------------------------------
The model's box NMS lets through instances whose masks overlap (a big instance around two small
ones, two copies of one slump in shifted boxes). Before polygonizing, each tile's masks are made
disjoint by :func:`suppress_overlaps`, the rule of panoptic merging: instances are taken by
score, highest first (ties: the model's order); each keeps the pixels no kept instance above it
holds; an instance left with less than ``min_kept_fraction`` (default
:data:`rtsmap.pipeline.merge.MIN_KEPT_FRACTION`, one half) of its own mask is a duplicate or a
part of a better one and is dropped, and claims nothing. So no two polygons of one tile share a
pixel. Overlaps across tiles are the seam merge's (pipeline/merge.py), which applies the same
rule to the polygons it could not join.

Disjoint masks make one GDAL call per tile enough: the tile's kept masks are painted into one
label image (instance k has label k + 1) and ``shapes`` traces every instance at once, which
gives the polygons the per-mask calls give (tests/test_vectorize.py compares them) at a fraction
of the cost (benchmarks/bench_vectorize.py). Masks that may overlap (``min_kept_fraction=None``)
are polygonized one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes

from rtsmap.pipeline.infer import TileDetections
from rtsmap.pipeline.merge import MIN_KEPT_FRACTION

COLUMNS = (
    "geometry",
    "score",
    "area_m2",
    "perimeter_m",
    "year",
    "chunk_id",
    "tile_id",
    "source_items",
    "invalid_fraction",
)
"""Columns of the polygons table, in order (docs/contracts.md plus ``invalid_fraction``)."""

_DTYPES = {
    "score": "float64",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "year": "int64",
    "chunk_id": "object",
    "tile_id": "object",
    "source_items": "object",
    "invalid_fraction": "float64",
}


def mask_to_geometry(mask: np.ndarray, transform: Affine, *, min_part_area: float = 0.0):
    """Polygonize one boolean mask.

    Pixels join 4-connected (edge neighbours). With 8-connectivity GDAL traces pixels that touch
    only at a corner as one ring that passes twice through that corner, which is an invalid
    polygon; 4-connected parts are valid and, as all parts of one mask stay in one
    MultiPolygon, nothing is lost.

    Parameters
    ----------
    mask : ndarray of bool
        ``[h, w]``, True inside the object.
    transform : Affine
        Pixel -> map transform of the mask's first pixel.
    min_part_area : float
        Parts smaller than this (map units squared) are dropped, except the largest part.

    Returns
    -------
    shapely.Polygon or shapely.MultiPolygon or None
        None when the mask is empty.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    parts = _polygons([geom for geom, _ in shapes(mask.view(np.uint8), mask=mask, connectivity=4, transform=transform)])
    return _assemble(list(parts), min_part_area)


def _polygons(features: list[dict]) -> np.ndarray:
    """Shapely polygons of GeoJSON-like polygons (shell, then holes), built in two vectorized
    calls rather than point by point (``shapely.Polygon`` of the same rings, vertex for vertex)."""
    rings = [np.asarray(ring, np.float64) for f in features for ring in f["coordinates"]]
    if not rings:
        return np.empty(0, dtype=object)
    ring_index = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    polygon_index = np.repeat(np.arange(len(features)), [len(f["coordinates"]) for f in features])
    return shapely.polygons(shapely.linearrings(np.concatenate(rings), indices=ring_index), indices=polygon_index)


def _assemble(parts: list, min_part_area: float):
    """One instance's 4-connected parts as one geometry: the largest part first (ties: in GDAL's
    order), parts below ``min_part_area`` dropped except the largest."""
    areas = shapely.area(parts)
    order = np.argsort(-areas, kind="stable")
    keep = [parts[order[0]]] + [parts[i] for i in order[1:] if areas[i] >= min_part_area]
    return keep[0] if len(keep) == 1 else shapely.MultiPolygon(keep)


def _tile_label_image(tile: TileDetections) -> tuple[np.ndarray, int, int]:
    """The tile's masks painted into one int32 image (mask d has label d + 1; 0 is background).

    Returns the image and the chunk pixel (row, col) of its first pixel. Masks must be disjoint
    (a later mask would overwrite an earlier one's pixels).
    """
    sizes = [np.shape(m) for m in tile.masks]
    rows0 = [int(o[0]) for o in tile.offsets]
    cols0 = [int(o[1]) for o in tile.offsets]
    r_min, c_min = min(rows0), min(cols0)
    height = max(r + h for r, (h, _) in zip(rows0, sizes)) - r_min
    width = max(c + w for c, (_, w) in zip(cols0, sizes)) - c_min
    labels = np.zeros((height, width), np.int32)
    for d, mask in enumerate(tile.masks):
        r, c = rows0[d] - r_min, cols0[d] - c_min
        window = labels[r : r + sizes[d][0], c : c + sizes[d][1]]
        window[np.asarray(mask, bool)] = d + 1
    return labels, r_min, c_min


def tile_geometries(tile: TileDetections, transform: Affine, *, min_part_area: float = 0.0) -> list:
    """Polygonize all masks of one tile with one GDAL call, on a label image.

    The masks must be disjoint, as :func:`suppress_overlaps` leaves them. Each instance's
    geometry is what :func:`mask_to_geometry` gives for its mask alone: the same 4-connected
    parts, holes and map coordinates.

    Parameters
    ----------
    tile : TileDetections
        One tile's detections with disjoint masks (offsets in chunk pixels).
    transform : Affine
        The chunk read window's transform.
    min_part_area : float
        As for :func:`mask_to_geometry`.

    Returns
    -------
    list
        One shapely Polygon or MultiPolygon per mask, in the tile's order (None for an empty
        mask).

    Raises
    ------
    ValueError
        If two masks share a pixel.
    """
    if len(tile.masks) == 0:
        return []
    labels, r_min, c_min = _tile_label_image(tile)
    painted = np.bincount(labels.reshape(-1), minlength=len(tile.masks) + 1)[1:]
    if int(painted.sum()) != sum(int(np.count_nonzero(m)) for m in tile.masks):
        raise ValueError(f"tile {tile.tile_id}: masks overlap; run suppress_overlaps first")
    features, owner = [], []
    for geom, value in shapes(labels, mask=labels > 0, connectivity=4,
                              transform=transform @ Affine.translation(c_min, r_min)):
        features.append(geom)
        owner.append(int(value) - 1)
    parts: list[list] = [[] for _ in tile.masks]
    for d, poly in zip(owner, _polygons(features)):  # GDAL's order kept within each instance
        parts[d].append(poly)
    return [_assemble(p, min_part_area) if p else None for p in parts]


def suppress_overlaps(tile: TileDetections, min_kept_fraction: float = MIN_KEPT_FRACTION) -> TileDetections:
    """Make a tile's instance masks disjoint: higher score wins its pixels.

    Parameters
    ----------
    tile : TileDetections
        One tile's detections (masks cropped to their boxes, offsets in chunk pixels).
    min_kept_fraction : float
        An instance keeping less than this share of its mask's pixels, after the instances
        scoring above it took theirs, is dropped (0 keeps every instance that keeps a pixel).

    Returns
    -------
    TileDetections
        The same tile with trimmed masks, in score order (highest first, ties in the input
        order); dropped instances removed. Boxes, offsets and invalid fractions are those of the
        kept instances (the box still bounds the trimmed mask).
    """
    n = len(tile.masks)
    if n < 2:
        return tile
    sizes = [np.asarray(m, bool).shape for m in tile.masks]
    rows0 = np.array([o[0] for o in tile.offsets], np.int64)
    cols0 = np.array([o[1] for o in tile.offsets], np.int64)
    r_min, c_min = int(rows0.min()), int(cols0.min())
    height = int(max(r + h for r, (h, _) in zip(rows0.tolist(), sizes))) - r_min
    width = int(max(c + w for c, (_, w) in zip(cols0.tolist(), sizes))) - c_min
    taken = np.zeros((height, width), bool)  # the tile's pixels held by a kept instance
    order = np.argsort(-np.asarray(tile.scores, np.float64), kind="stable")
    kept, masks = [], []
    # One pass over at most max_detections instances of one tile, each a numpy operation on
    # its own box: not a pairwise loop.
    for d in order.tolist():
        mask = np.asarray(tile.masks[d], bool)
        r, c = int(rows0[d]) - r_min, int(cols0[d]) - c_min
        window = taken[r : r + mask.shape[0], c : c + mask.shape[1]]
        own = mask & ~window
        total = int(mask.sum())
        if total == 0 or not own.any() or own.sum() < min_kept_fraction * total:
            continue
        window |= own
        kept.append(d)
        masks.append(own)
    index = np.asarray(kept, np.int64)
    return dataclasses.replace(
        tile,
        boxes=np.asarray(tile.boxes)[index],
        scores=np.asarray(tile.scores)[index],
        masks=tuple(masks),
        offsets=tuple(tile.offsets[d] for d in kept),
        invalid_fractions=np.asarray(tile.invalid_fractions)[index],
    )


def _join_items(source_items: str | Mapping[str, Iterable[str]] | Iterable[str]) -> str:
    """Comma-join STAC item ids (a mapping of modality -> ids is flattened in order)."""
    if isinstance(source_items, str):
        return source_items
    if isinstance(source_items, Mapping):
        source_items = [i for ids in source_items.values() for i in ids]
    return ",".join(dict.fromkeys(source_items))  # ordered, without duplicates


def empty_polygons(crs) -> gpd.GeoDataFrame:
    """An empty polygons table with the right columns, dtypes and CRS.

    Parameters
    ----------
    crs : str or pyproj.CRS
        The grid CRS.

    Returns
    -------
    geopandas.GeoDataFrame
    """
    frame = pd.DataFrame({c: pd.Series(dtype=d) for c, d in _DTYPES.items()})
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries([], crs=crs), crs=crs)[list(COLUMNS)]


def vectorize_detections(
    detections: Sequence[TileDetections],
    transform: Affine,
    crs,
    *,
    year: int,
    min_area_m2: float = 0.0,
    simplify_tolerance_m: float | None = None,
    source_items: str | Mapping[str, Iterable[str]] | Iterable[str] = (),
    min_kept_fraction: float | None = MIN_KEPT_FRACTION,
) -> gpd.GeoDataFrame:
    """Polygons of a chunk's detections, one row per detection, disjoint within each tile.

    Parameters
    ----------
    detections : sequence of TileDetections
        From :func:`pipeline.infer.infer_chunk` (masks in chunk pixels).
    transform : Affine
        The chunk read window's transform (``ChunkStack.transform``).
    crs : str or pyproj.CRS
        The grid CRS.
    year : int
        The year the data was loaded for.
    min_area_m2 : float
        Detections smaller than this after simplification are dropped; parts of a detection
        smaller than this are dropped, except its largest part.
    simplify_tolerance_m : float, optional
        Douglas-Peucker tolerance (topology-preserving); default half a pixel. 0 keeps the
        pixel outline.
    source_items : str, mapping or iterable of str
        STAC item ids the chunk was loaded from (``ChunkStack.item_ids`` works), comma-joined
        into the ``source_items`` column.
    min_kept_fraction : float or None
        Overlapping masks of one tile are made disjoint first (:func:`suppress_overlaps`): an
        instance keeping less than this share of its pixels is dropped. None leaves the masks
        as the model returned them (overlaps included).

    Returns
    -------
    geopandas.GeoDataFrame
        Columns :data:`COLUMNS`, in ``crs``; empty (same columns) when nothing is left.
    """
    resolution = abs(transform.a)
    tolerance = resolution / 2.0 if simplify_tolerance_m is None else float(simplify_tolerance_m)
    items = _join_items(source_items)

    geometries, scores, chunk_ids, tile_ids, invalid = [], [], [], [], []
    # One GDAL environment for all masks: rasterio otherwise sets one up per shapes() call,
    # a quarter of the time for small masks.
    with rasterio.Env():
        for tile in detections:
            if min_kept_fraction is not None:
                # Disjoint masks: one GDAL call for the whole tile.
                tile = suppress_overlaps(tile, min_kept_fraction)
                tile_geoms = tile_geometries(tile, transform, min_part_area=min_area_m2)
            else:
                tile_geoms = [
                    mask_to_geometry(mask, transform @ Affine.translation(col0, row0), min_part_area=min_area_m2)
                    for mask, (row0, col0) in zip(tile.masks, tile.offsets)
                ]
            for d, geom in enumerate(tile_geoms):
                if geom is None:
                    continue
                geometries.append(geom)
                scores.append(float(tile.scores[d]))
                chunk_ids.append(tile.chunk_id)
                tile_ids.append(tile.tile_id)
                invalid.append(float(tile.invalid_fractions[d]))
    if not geometries:
        return empty_polygons(crs)

    geoms = np.asarray(geometries, dtype=object)
    if tolerance > 0:
        geoms = shapely.simplify(geoms, tolerance, preserve_topology=True)
        broken = ~shapely.is_valid(geoms)
        if broken.any():  # rare; keep the rows rather than lose a detection
            geoms[broken] = shapely.make_valid(geoms[broken])
    area = shapely.area(geoms)
    keep = (area >= min_area_m2) & (area > 0)
    frame = gpd.GeoDataFrame(
        {
            "score": np.asarray(scores, np.float64)[keep],
            "area_m2": area[keep],
            "perimeter_m": shapely.length(geoms[keep]),
            "year": np.full(int(keep.sum()), int(year), np.int64),
            "chunk_id": np.asarray(chunk_ids, object)[keep],
            "tile_id": np.asarray(tile_ids, object)[keep],
            "source_items": np.full(int(keep.sum()), items, object),
            "invalid_fraction": np.asarray(invalid, np.float64)[keep],
        },
        geometry=gpd.GeoSeries(geoms[keep], crs=crs),
        crs=crs,
    )
    if frame.empty:
        return empty_polygons(crs)
    return frame[list(COLUMNS)].reset_index(drop=True)
