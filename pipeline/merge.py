"""Seam merge: detections from overlapping tiles -> one polygon per slump.

Tiles overlap, so a slump near a seam comes back whole from one tile, truncated at the tile
edge from its neighbour, and sometimes in pieces. The merge joins those copies and nothing else.

How pairs are matched (and why)
-------------------------------
Two detections can only be copies of one slump if they come from different tiles (two
detections of the same tile are distinct objects by the model's own NMS) and they overlap.
Their overlap then lies inside the two tiles' shared window ``O``, where both tiles saw the same
pixels. So the measures are taken *inside O*:

- ``IoS_O = |A & B| / min(|A & O|, |B & O|)`` (intersection over the smaller part in the shared
  window). A truncated copy and the whole copy agree in O, so IoS_O is ~1 even when the
  truncated copy is a sliver of the whole; a piece of a slump lying inside the other tile's copy
  also gives ~1. Two distinct slumps that touch share only a boundary: ~0. A pair is an edge of
  the match graph when ``IoS_O >= ios_threshold`` and they share area (more than
  ``min_overlap_px`` pixels, default 0).
- Groups are the connected components of that graph (union-find). IoS alone would let one big
  detection swallow its small neighbours, so each group is **verified**: for each tile, the
  union of the group's members from that tile is that tile's *view* of the slump; for every two
  tiles of the group whose views meet in their shared window, the views must agree there:
  ``IoU(view_t & O_ts, view_s & O_ts) >= view_iou_threshold`` (a pair where one tile sees
  nothing in O_ts is a miss, not a conflict, and is not checked). Both tiles saw the same pixels in
  O_ts, so copies of one slump agree (~1 for a good model), while a chain through a big slump
  (its view covers much more of O than the small one's) does not.
- A group that fails is split: its edges are replayed strongest first (IoS_O, then the stable
  detection order), and an edge joins two sub-groups only if the joined sub-group still passes
  the verification (Kruskal with a check). Deterministic, and it keeps the strong matches.

Thresholds (tested in tests/test_merge.py): ``ios_threshold=0.5`` and
``view_iou_threshold=0.5``. Perfect truncated copies score 1.0 on both, copies whose edges are
off by a pixel or two still score > 0.8, and touching distinct slumps or a small slump beside a
big one score < 0.2, so 0.5 sits in the wide gap between the two.

Scale
-----
Candidate pairs come from one ``shapely.STRtree`` bulk query and all pair measures are
vectorized shapely calls, so the merge is O(n log n). :func:`merge_by_blocks` gives the same
result as :func:`merge_detections` while holding one block of chunks at a time: groups that
reach a block border are passed on to a pass with blocks twice as large (see there).

Each group becomes one slump: the union of its members (``shapely.union_all``, made valid,
parts and holes below ``min_part_px`` pixels dropped), the max score, every tile, chunk and
source item, area and perimeter recomputed, and a stable ``rts_id`` from the rounded centroid.

No overlapping slumps
---------------------
Polygons the merge does not join (distinct by its rules, but overlapping: a detection bleeding
over its neighbour across a seam, or two copies whose views disagree) must not both claim the
same ground in a year's layer. :func:`resolve_overlaps` applies the rule the vectorizer applies
to one tile's masks (pipeline/vectorize.py): slumps are ranked by score (ties: larger area, then
geometry), and for every pair overlapping by more than ``overlap_tolerance`` (default
:data:`OVERLAP_TOLERANCE`, 1 % of the smaller one's area) the overlap goes to the higher-ranked
slump; a slump left with less than ``min_kept_fraction`` (:data:`MIN_KEPT_FRACTION`, one half)
of its area is a duplicate and is dropped (and claims nothing). After it, no two output slumps
overlap by more than the tolerance (tests/test_merge.py checks it on random scenes).
"""

from __future__ import annotations

import logging
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from rtsmap.pipeline.errors import RtsmapError

log = logging.getLogger(__name__)

#: Columns a detections GeoDataFrame must have (docs/contracts.md, pipeline/vectorize.py).
DETECTION_COLUMNS = ("geometry", "score", "area_m2", "perimeter_m", "year", "chunk_id", "tile_id", "source_items")

#: Columns of the merged output, in order.
MERGED_COLUMNS = (
    "rts_id", "year", "score", "area_m2", "perimeter_m", "n_detections",
    "tile_ids", "chunk_ids", "source_items", "geometry",
)

_TILE_ID_PATTERN = r"_t(-?\d+)_(-?\d+)$"

#: Two slumps of one year may overlap by at most this share of the smaller one's area; larger
#: overlaps are resolved by :func:`resolve_overlaps`.
OVERLAP_TOLERANCE = 0.01

#: A slump (or a tile's instance mask, pipeline/vectorize.py) that keeps less than this share of
#: its area after higher-scored ones took the overlap is dropped as a duplicate.
MIN_KEPT_FRACTION = 0.5


class _UnionFind:
    """Disjoint sets over 0..n-1.

    Hand-written because it is twenty lines and the Kruskal split below needs to try a union
    and roll it back, which scipy's connected_components cannot do (and scipy is not a
    dependency of the pipeline).
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        # The smaller index stays root, so labels do not depend on edge order.
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return lo

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _grid_numbers(spec: Any) -> tuple[float, float, float]:
    """(resolution, tile size in metres, stride in metres) of a GridSpec-like object."""
    res = float(spec.resolution)
    return res, spec.tile_px * res, (spec.tile_px - spec.overlap_px) * res


def tile_indices(tile_ids: pd.Series | np.ndarray) -> np.ndarray:
    """Column and row (i, j) of each tile from its contract id (``..._t{i}_{j}``).

    Parameters
    ----------
    tile_ids : array-like of str
        Ids as written by pipeline/grid.py, e.g. ``3413_10m_t-12_40``.

    Returns
    -------
    numpy.ndarray
        int64 ``[N, 2]`` of (i, j).

    Raises
    ------
    RtsmapError
        If an id does not follow the contract.
    """
    ids = pd.Series(np.asarray(tile_ids, dtype=object), dtype=object).astype(str)
    parts = ids.str.extract(_TILE_ID_PATTERN)
    bad = parts[0].isna()
    if bad.any():
        raise RtsmapError(
            f"merge: tile_id {ids[bad].iloc[0]!r} does not look like '<epsg>_<res>m_t<i>_<j>' "
            "(docs/contracts.md, Grid); detections must come from pipeline/vectorize.py"
        )
    return parts.astype(np.int64).to_numpy()


def tile_boxes(ij: np.ndarray, spec: Any) -> np.ndarray:
    """Bounds ``[N, 4]`` (minx, miny, maxx, maxy) of tiles (i, j) per the contract's grid."""
    _, size, stride = _grid_numbers(spec)
    x0 = ij[:, 0] * stride
    y1 = -(ij[:, 1] * stride)
    return np.stack([x0, y1 - size, x0 + size, y1], axis=1).astype(np.float64)


def _shared_windows(ij_a: np.ndarray, ij_b: np.ndarray, spec: Any) -> np.ndarray:
    """Polygons of the windows two tiles share (empty where they do not overlap)."""
    ba, bb = tile_boxes(ij_a, spec), tile_boxes(ij_b, spec)
    lo = np.maximum(ba[:, :2], bb[:, :2])
    hi = np.minimum(ba[:, 2:], bb[:, 2:])
    ok = (hi > lo).all(axis=1)
    out = np.full(len(ba), shapely.Polygon(), dtype=object)
    if ok.any():
        out[ok] = shapely.box(lo[ok, 0], lo[ok, 1], hi[ok, 0], hi[ok, 1])
    return out


def _check_detections(gdf: gpd.GeoDataFrame) -> None:
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise RtsmapError(f"merge: expected a GeoDataFrame of detections, got {type(gdf).__name__}")
    missing = [c for c in DETECTION_COLUMNS if c not in gdf.columns]
    if missing:
        raise RtsmapError(
            f"merge: detections lack column(s) {missing}; expected {list(DETECTION_COLUMNS)} "
            "(docs/contracts.md, pipeline/vectorize.py)"
        )
    if len(gdf) and gdf.crs is None:
        raise RtsmapError("merge: detections have no CRS; they must be in the grid CRS")


def _sorted_detections(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Detections in a stable order (year, tile, geometry), so input order never matters."""
    df = gdf[list(DETECTION_COLUMNS)].copy()
    df = df[~(df.geometry.isna() | df.geometry.is_empty)]
    key = pd.DataFrame({
        "year": df["year"].astype(np.int64).to_numpy(),
        "tile": df["tile_id"].astype(str).to_numpy(),
        "wkb": shapely.to_wkb(df.geometry.values, hex=True),
        "score": df["score"].astype(np.float64).to_numpy(),
    })
    order = key.sort_values(["year", "tile", "wkb", "score"], kind="mergesort").index.to_numpy()
    df = df.iloc[order].reset_index(drop=True)
    df["year"] = df["year"].astype(np.int64)
    df["tile_id"] = df["tile_id"].astype(str)
    return df


class _Graph:
    """Match edges and pair measures of a set of (sorted) detections."""

    def __init__(self, df: gpd.GeoDataFrame, spec: Any, ios_threshold: float, min_overlap_px: float) -> None:
        res, _, _ = _grid_numbers(spec)
        self.df = df
        self.spec = spec
        self.geoms = df.geometry.values.to_numpy() if hasattr(df.geometry.values, "to_numpy") else np.asarray(df.geometry.values)
        self.ij = tile_indices(df["tile_id"].to_numpy())
        years = df["year"].to_numpy()
        tiles = df["tile_id"].to_numpy()
        tree = shapely.STRtree(self.geoms)
        left, right = tree.query(self.geoms, predicate="intersects")
        keep = (left < right) & (years[left] == years[right]) & (tiles[left] != tiles[right])
        left, right = left[keep], right[keep]
        windows = _shared_windows(self.ij[left], self.ij[right], spec)
        a, b = self.geoms[left], self.geoms[right]
        inter = shapely.area(shapely.intersection(a, b))
        a_o = shapely.area(shapely.intersection(a, windows))
        b_o = shapely.area(shapely.intersection(b, windows))
        smaller = np.minimum(a_o, b_o)
        ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        strong = (ios >= ios_threshold) & (inter > min_overlap_px * res * res)
        # Strongest first; ties broken by the stable detection order.
        order = np.lexsort((right[strong], left[strong], -ios[strong]))
        self.left = left[strong][order]
        self.right = right[strong][order]
        self.ios = ios[strong][order]
        # View IoU of each edge's pair alone (their views when a group is just these two).
        pair_union = (a_o + b_o - inter)[strong][order]
        self.pair_iou = np.divide(inter[strong][order], pair_union, out=np.zeros_like(pair_union), where=pair_union > 0)

    def components(self) -> np.ndarray:
        uf = _UnionFind(len(self.df))
        for a, b in zip(self.left.tolist(), self.right.tolist()):
            uf.union(a, b)
        return uf.labels()


def _views_agree(members: list[int], graph: _Graph, spec: Any, view_iou_threshold: float, min_overlap: float) -> bool:
    """True if every two tiles of a group agree on the group's shape in their shared window."""
    tiles: dict[tuple[int, int], list[int]] = {}
    for m in members:
        tiles.setdefault(tuple(graph.ij[m]), []).append(m)
    if len(tiles) < 2:
        return True
    keys = sorted(tiles)
    views = {k: shapely.union_all(graph.geoms[tiles[k]]) for k in keys}
    for x in range(len(keys)):
        for y in range(x + 1, len(keys)):
            ta, tb = keys[x], keys[y]
            if abs(ta[0] - tb[0]) > 1 or abs(ta[1] - tb[1]) > 1:
                continue  # tiles that do not overlap have no shared window
            window = _shared_windows(np.array([ta]), np.array([tb]), spec)[0]
            va = shapely.intersection(views[ta], window)
            vb = shapely.intersection(views[tb], window)
            if min(shapely.area(va), shapely.area(vb)) <= min_overlap:
                continue  # only one tile sees the slump here: a miss, not a conflict
            inter = shapely.area(shapely.intersection(va, vb))
            union = shapely.area(shapely.union(va, vb))
            if inter / union < view_iou_threshold:
                return False
    return True


def _groups(graph: _Graph, component: np.ndarray, spec: Any, view_iou_threshold: float, min_overlap: float) -> list[list[int]]:
    """Verified groups (lists of detection positions) of the detections flagged in ``component``."""
    labels = component
    by_label: dict[int, list[int]] = {}
    for pos, lab in enumerate(labels.tolist()):
        by_label.setdefault(lab, []).append(pos)
    # Edges of each component, in graph (strength) order.
    edges_of: dict[int, list[tuple[int, int]]] = {}
    pair_iou: dict[int, float] = {}
    for a, b, v in zip(graph.left.tolist(), graph.right.tolist(), graph.pair_iou.tolist()):
        edges_of.setdefault(int(labels[a]), []).append((a, b))
        pair_iou[int(labels[a])] = v
    groups: list[list[int]] = []
    for lab in sorted(by_label):
        if lab < 0:
            continue  # open: left for a later pass
        members = by_label[lab]
        if len(members) == 2:
            # Fast path, same rule: two detections of two tiles; their views are themselves,
            # and the view IoU was computed with the edge.
            if pair_iou[lab] >= view_iou_threshold:
                groups.append(members)
            else:
                groups.extend([[members[0]], [members[1]]])
            continue
        if len(members) == 1 or _views_agree(members, graph, spec, view_iou_threshold, min_overlap):
            groups.append(members)
            continue
        # Split: replay the edges strongest first, join only while the views still agree.
        sub: dict[int, list[int]] = {m: [m] for m in members}
        root = {m: m for m in members}
        for a, b in edges_of.get(lab, []):
            ra, rb = root[a], root[b]
            if ra == rb:
                continue
            joined = sorted(sub[ra] + sub[rb])
            if not _views_agree(joined, graph, spec, view_iou_threshold, min_overlap):
                continue
            keep, drop = min(ra, rb), max(ra, rb)
            sub[keep] = joined
            for m in sub.pop(drop):
                root[m] = keep
        log.debug("merge: split a group of %d detections into %d", len(members), len(sub))
        groups.extend(sub[k] for k in sorted(sub))
    return groups


def _clean(geom: shapely.Geometry, min_area: float) -> shapely.Geometry:
    """Valid polygonal geometry without parts or holes smaller than ``min_area``."""
    geom = shapely.make_valid(geom)
    polys = []
    for part in shapely.get_parts(geom):
        if isinstance(part, shapely.GeometryCollection) or part.geom_type == "MultiPolygon":
            polys.extend(p for p in shapely.get_parts(part) if p.geom_type == "Polygon")
        elif part.geom_type == "Polygon":
            polys.append(part)
    out = []
    for poly in polys:
        if poly.area < min_area:
            continue
        holes = [r for r in poly.interiors if shapely.Polygon(r).area >= min_area]
        out.append(shapely.Polygon(poly.exterior, holes) if len(holes) != len(poly.interiors) else poly)
    if not out:
        return shapely.Polygon()
    return out[0] if len(out) == 1 else shapely.MultiPolygon(out)


def _join_ids(values: list[str]) -> str:
    items = set()
    for v in values:
        items.update(x for x in str(v).split(",") if x)
    return ",".join(sorted(items))


def _build(df: gpd.GeoDataFrame, groups: list[list[int]], min_part_area: float) -> gpd.GeoDataFrame:
    """One row per group (no rts_id yet)."""
    geoms = np.asarray(df.geometry.values, dtype=object)
    valid = shapely.is_valid(geoms)
    rows = {k: [] for k in ("year", "score", "n_detections", "tile_ids", "chunk_ids", "source_items")}
    out_geoms = []
    score = df["score"].to_numpy(dtype=np.float64)
    year = df["year"].to_numpy()
    tile = df["tile_id"].to_numpy()
    chunk = df["chunk_id"].astype(str).to_numpy()
    items = df["source_items"].fillna("").astype(str).to_numpy()
    for members in groups:
        if len(members) == 1:
            m = members[0]
            # Valid single polygons pass as they are (vectorize's output); the rest are cleaned.
            out_geoms.append(geoms[m] if valid[m] and geoms[m].geom_type in ("Polygon", "MultiPolygon")
                             else _clean(geoms[m], min_part_area))
            rows["tile_ids"].append(tile[m])
            rows["chunk_ids"].append(chunk[m])
            rows["source_items"].append(_join_ids([items[m]]))
        else:
            out_geoms.append(_clean(shapely.union_all(geoms[members]), min_part_area))
            rows["tile_ids"].append(",".join(sorted(set(tile[members]))))
            rows["chunk_ids"].append(",".join(sorted(set(chunk[members]))))
            rows["source_items"].append(_join_ids(items[members].tolist()))
        rows["year"].append(int(year[members[0]]))
        rows["score"].append(float(score[members].max()))
        rows["n_detections"].append(len(members))
    out = gpd.GeoDataFrame(rows, geometry=gpd.GeoSeries(out_geoms, crs=df.crs), crs=df.crs)
    out = out[~out.geometry.is_empty].reset_index(drop=True)
    out["area_m2"] = out.geometry.area
    out["perimeter_m"] = out.geometry.length
    return out


def _empty(crs: Any) -> gpd.GeoDataFrame:
    cols = {c: pd.Series(dtype=t) for c, t in (
        ("rts_id", object), ("year", np.int64), ("score", np.float64), ("area_m2", np.float64),
        ("perimeter_m", np.float64), ("n_detections", np.int64), ("tile_ids", object),
        ("chunk_ids", object), ("source_items", object))}
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs)[list(MERGED_COLUMNS)]


def overlapping_pairs(geoms: Any, tolerance: float = OVERLAP_TOLERANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of polygons overlapping by more than ``tolerance`` of the smaller one's area.

    Parameters
    ----------
    geoms : array-like of shapely geometries
        Polygons of one year, in a projected CRS.
    tolerance : float
        Share of the smaller polygon's area an overlap may have without counting.

    Returns
    -------
    left, right : ndarray of int
        Positions of each pair (``left < right``).
    share : ndarray of float
        Intersection area over the smaller polygon's area.
    """
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = left < right
    left, right = left[keep], right[keep]
    area = shapely.area(geoms)
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    smaller = np.minimum(area[left], area[right])
    share = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    hit = share > tolerance
    return left[hit], right[hit], share[hit]


def resolve_overlaps(
    slumps: gpd.GeoDataFrame,
    *,
    overlap_tolerance: float = OVERLAP_TOLERANCE,
    min_kept_fraction: float = MIN_KEPT_FRACTION,
    min_part_area: float = 0.0,
) -> gpd.GeoDataFrame:
    """Give each contested area to the higher-scored slump, so no two slumps overlap.

    Slumps are ranked by ``score`` (ties: larger area, then WKB, so the input order never
    matters). Each slump overlapping higher-ranked ones by more than ``overlap_tolerance`` of
    the smaller area loses that area to them (to their already trimmed shapes); one left with
    less than ``min_kept_fraction`` of its area is dropped. Only slumps in such pairs are
    touched: a Python step per contested slump (rare), never per pair of the layer.

    Parameters
    ----------
    slumps : geopandas.GeoDataFrame
        One year's slumps (or several years: each year is resolved on its own when a ``year``
        column is present) with ``score`` and polygon geometry in a projected CRS.
    overlap_tolerance : float
        Overlaps up to this share of the smaller slump's area are left alone.
    min_kept_fraction : float
        A slump keeping less than this share of its area is dropped.
    min_part_area : float
        Parts and holes smaller than this (map units squared) left by the cut are dropped.

    Returns
    -------
    geopandas.GeoDataFrame
        The same rows and columns less the dropped slumps, trimmed geometries, ``area_m2`` and
        ``perimeter_m`` recomputed where those columns exist; index reset.
    """
    if len(slumps) < 2:
        return slumps.reset_index(drop=True)
    if "year" in slumps.columns and slumps["year"].nunique() > 1:
        parts = [resolve_overlaps(g, overlap_tolerance=overlap_tolerance, min_kept_fraction=min_kept_fraction,
                                  min_part_area=min_part_area)
                 for _, g in slumps.groupby("year", sort=True)]
        return gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=slumps.crs)
    geoms = np.asarray(slumps.geometry.values, dtype=object)
    left, right, _ = overlapping_pairs(geoms, overlap_tolerance)
    if len(left) == 0:
        return slumps.reset_index(drop=True)
    area = shapely.area(geoms)
    key = pd.DataFrame({"score": -slumps["score"].to_numpy(np.float64), "area": -area,
                        "wkb": shapely.to_wkb(geoms, hex=True)})
    rank = np.empty(len(geoms), np.int64)
    rank[key.sort_values(["score", "area", "wkb"], kind="mergesort").index.to_numpy()] = np.arange(len(geoms))
    winner = np.where(rank[left] < rank[right], left, right)
    loser = np.where(rank[left] < rank[right], right, left)
    beaten_by: dict[int, list[int]] = {}
    for w, lo in zip(winner.tolist(), loser.tolist()):
        beaten_by.setdefault(lo, []).append(w)
    current = geoms.copy()
    dropped = np.zeros(len(geoms), bool)
    # Higher-ranked slumps first, so each winner's shape is final when a loser is cut by it.
    for lo in sorted(beaten_by, key=lambda k: rank[k]):
        winners = [w for w in beaten_by[lo] if not dropped[w]]
        if not winners:
            continue
        rest = _clean(shapely.difference(current[lo], shapely.union_all(current[winners])), min_part_area)
        if rest.is_empty or rest.area < min_kept_fraction * area[lo]:
            dropped[lo] = True
        else:
            current[lo] = rest
    log.debug("resolve_overlaps: %d contested slumps, %d dropped", len(beaten_by), int(dropped.sum()))
    out = slumps.copy()
    out = out.set_geometry(gpd.GeoSeries(current, index=slumps.index, crs=slumps.crs))
    out = out[~dropped]
    if "area_m2" in out.columns:
        out["area_m2"] = shapely.area(out.geometry.values)
    if "perimeter_m" in out.columns:
        out["perimeter_m"] = shapely.length(out.geometry.values)
    return out.reset_index(drop=True)


def assign_rts_ids(merged: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Stable ids from the geometry: ``<epsg>_<year>_x<cx>_y<cy>`` (centroid rounded to 1 m).

    The same slump polygon gets the same id on every rerun; the id also says where to look.
    Two slumps whose centroids round to the same metre (nested polygons) get ``_2``, ``_3``
    in the order of their WKB, so the ids stay unique and stable.

    Parameters
    ----------
    merged : geopandas.GeoDataFrame
        Merged slumps with ``year`` and geometry in the grid CRS.

    Returns
    -------
    geopandas.GeoDataFrame
        The rows sorted by ``rts_id``, with the column set.
    """
    if len(merged) == 0:
        return _empty(merged.crs)
    epsg = merged.crs.to_epsg() if merged.crs is not None else None
    c = shapely.centroid(merged.geometry.values)
    x = np.round(shapely.get_x(c)).astype(np.int64)
    y = np.round(shapely.get_y(c)).astype(np.int64)
    base = [f"{epsg}_{yr}_x{a}_y{b}" for yr, a, b in zip(merged["year"].tolist(), x.tolist(), y.tolist())]
    wkb = shapely.to_wkb(merged.geometry.values, hex=True)
    key = pd.DataFrame({"base": base, "wkb": wkb})
    order = key.sort_values(["base", "wkb"], kind="mergesort").index.to_numpy()
    ids = [""] * len(base)
    seen: dict[str, int] = {}
    for pos in order.tolist():
        n = seen.get(base[pos], 0) + 1
        seen[base[pos]] = n
        ids[pos] = base[pos] if n == 1 else f"{base[pos]}_{n}"
    out = merged.copy()
    out["rts_id"] = ids
    return out.sort_values("rts_id", kind="mergesort").reset_index(drop=True)[list(MERGED_COLUMNS)]


def _merge_sorted(df: gpd.GeoDataFrame, spec: Any, *, ios_threshold: float, view_iou_threshold: float,
                  min_overlap_px: float, min_part_px: float, open_tiles: np.ndarray | None = None,
                  ) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Merge sorted detections; components touching ``open_tiles`` (bool per row) are returned raw."""
    res, _, _ = _grid_numbers(spec)
    graph = _Graph(df, spec, ios_threshold, min_overlap_px)
    labels = graph.components()
    if open_tiles is not None and open_tiles.any():
        open_labels = np.unique(labels[open_tiles])
        is_open = np.isin(labels, open_labels)
    else:
        is_open = np.zeros(len(df), dtype=bool)
    closed_labels = np.where(is_open, -1, labels)
    groups = _groups(graph, closed_labels, spec, view_iou_threshold, min_overlap_px * res * res)
    merged = _build(df, groups, min_part_px * res * res)
    return merged, df[is_open].reset_index(drop=True)


def merge_detections(
    gdf: gpd.GeoDataFrame,
    *,
    spec: Any,
    ios_threshold: float = 0.5,
    view_iou_threshold: float = 0.5,
    min_overlap_px: float = 0.0,
    min_part_px: float = 1.0,
    overlap_tolerance: float | None = OVERLAP_TOLERANCE,
    min_kept_fraction: float = MIN_KEPT_FRACTION,
) -> gpd.GeoDataFrame:
    """Merge the copies of each slump that overlapping tiles return into one polygon.

    Parameters
    ----------
    gdf : geopandas.GeoDataFrame
        Detections, one row per detection of one tile, in the grid CRS, with columns
        ``geometry, score, area_m2, perimeter_m, year, chunk_id, tile_id, source_items``.
    spec : GridSpec
        The grid the tiles come from (``resolution, tile_px, overlap_px, tiles_per_chunk``).
    ios_threshold : float
        Least intersection over the smaller part, inside the two tiles' shared window, for two
        detections of different tiles to match.
    view_iou_threshold : float
        Least IoU, inside each shared window, between the tiles' views of a group; groups below
        it are split (see the module docstring).
    min_overlap_px : float
        A match needs an intersection larger than this many pixels (0: any area, not just a
        shared edge). A one-pixel bleed of one slump's mask over its neighbour is caught by the
        view check, not by this, because a one-pixel truncated copy is a real copy.
    min_part_px : float
        Parts and holes of a merged polygon smaller than this many pixels are dropped.
    overlap_tolerance : float or None
        After merging, slumps still overlapping by more than this share of the smaller one's
        area are resolved by :func:`resolve_overlaps` (None: left overlapping).
    min_kept_fraction : float
        :func:`resolve_overlaps` drops a slump left with less than this share of its area.

    Returns
    -------
    geopandas.GeoDataFrame
        One row per slump, sorted by ``rts_id``, columns ``rts_id, year, score, area_m2,
        perimeter_m, n_detections, tile_ids, chunk_ids, source_items, geometry`` (the id lists
        comma-joined and sorted). The same detections in any order give the same result; no
        two slumps of a year overlap by more than ``overlap_tolerance``.

    Raises
    ------
    RtsmapError
        If columns are missing, the CRS is unknown or a tile id does not follow the contract.
    """
    _check_detections(gdf)
    if len(gdf) == 0:
        return _empty(gdf.crs)
    df = _sorted_detections(gdf)
    merged, _ = _merge_sorted(df, spec, ios_threshold=ios_threshold, view_iou_threshold=view_iou_threshold,
                              min_overlap_px=min_overlap_px, min_part_px=min_part_px)
    merged = _resolve(merged, spec, overlap_tolerance, min_kept_fraction, min_part_px)
    return assign_rts_ids(merged)


def _resolve(merged: gpd.GeoDataFrame, spec: Any, overlap_tolerance: float | None, min_kept_fraction: float,
             min_part_px: float) -> gpd.GeoDataFrame:
    if overlap_tolerance is None or len(merged) < 2:
        return merged
    res, _, _ = _grid_numbers(spec)
    return resolve_overlaps(merged, overlap_tolerance=overlap_tolerance, min_kept_fraction=min_kept_fraction,
                            min_part_area=min_part_px * res * res)


def merge_block(
    gdf: gpd.GeoDataFrame,
    *,
    spec: Any,
    block_tiles: int,
    **kwargs: Any,
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Merge the detections of one block of tiles; leave the groups at its border open.

    A block is ``block_tiles x block_tiles`` tiles anchored at the grid origin (tile (i, j) is
    in block ``(i // block_tiles, j // block_tiles)``). A detection can only match detections
    of the 8 neighbouring tiles, so a group none of whose members lies in the block's outer ring
    of tiles is complete: it is merged here. Groups with a member in the ring may continue in
    the next block; their raw detections come back as ``open`` for a pass with larger blocks.
    This lets a Dask task hold one block (its fragments) at a time.

    Parameters
    ----------
    gdf : geopandas.GeoDataFrame
        Detections of tiles of one block (any order).
    spec : GridSpec
        The grid.
    block_tiles : int
        Block side in tiles (a multiple of ``spec.tiles_per_chunk`` keeps chunks whole).
    **kwargs
        Thresholds as for :func:`merge_detections`.

    Returns
    -------
    tuple of geopandas.GeoDataFrame
        ``(merged, open)``: finished slumps without ``rts_id`` (ids are given once, at the end,
        by :func:`assign_rts_ids`) and the open detections, unchanged.
    """
    _check_detections(gdf)
    if len(gdf) == 0:
        return _empty(gdf.crs).drop(columns="rts_id"), gdf.iloc[:0]
    df = _sorted_detections(gdf)
    ij = tile_indices(df["tile_id"].to_numpy())
    local = np.mod(ij, block_tiles)
    ring = ((local == 0) | (local == block_tiles - 1)).any(axis=1)
    merged, open_ = _merge_sorted(df, spec, open_tiles=ring, **_thresholds(kwargs))
    return merged, open_


def _thresholds(kwargs: dict) -> dict:
    known = {"ios_threshold": 0.5, "view_iou_threshold": 0.5, "min_overlap_px": 0.0, "min_part_px": 1.0}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"unknown merge option(s): {sorted(unknown)}")
    return {**known, **kwargs}


def merge_by_blocks(
    gdf: gpd.GeoDataFrame,
    *,
    spec: Any,
    block_chunks: int = 4,
    **kwargs: Any,
) -> gpd.GeoDataFrame:
    """The same result as :func:`merge_detections`, one block of chunks at a time.

    Pass 1 merges each block of ``block_chunks x block_chunks`` chunks on its own
    (:func:`merge_block`); the detections of groups that reach a block border are kept open.
    Each further pass doubles the block side and merges only the open detections, until they fit
    in one block (or span at most two blocks each way, then they are merged together). Closed
    groups are whole components of the global match graph, and verification and splitting look
    only at a component's own members in the global stable order, so the result equals the
    all-at-once merge (tests/test_merge.py checks it).

    Parameters
    ----------
    gdf : geopandas.GeoDataFrame
        Detections as for :func:`merge_detections`.
    spec : GridSpec
        The grid.
    block_chunks : int
        Side of the first-pass blocks, in chunks.
    **kwargs
        Thresholds and overlap options as for :func:`merge_detections`.

    Returns
    -------
    geopandas.GeoDataFrame
        As :func:`merge_detections`.
    """
    _check_detections(gdf)
    overlap_tolerance = kwargs.pop("overlap_tolerance", OVERLAP_TOLERANCE)
    min_kept_fraction = kwargs.pop("min_kept_fraction", MIN_KEPT_FRACTION)
    opts = _thresholds(kwargs)
    if len(gdf) == 0:
        return _empty(gdf.crs)
    pending = _sorted_detections(gdf)
    side = max(1, int(block_chunks)) * int(spec.tiles_per_chunk)
    done: list[gpd.GeoDataFrame] = []
    while len(pending):
        ij = tile_indices(pending["tile_id"].to_numpy())
        span = (ij.max(axis=0) - ij.min(axis=0) + 1).max()
        blocks = np.floor_divide(ij, side)
        keys = [tuple(b) for b in blocks.tolist()]
        if len(set(keys)) == 1 or side >= span:
            merged, _ = _merge_sorted(pending, spec, **opts)
            done.append(merged)
            break
        still_open = []
        by_block: dict[tuple[int, int], list[int]] = {}
        for pos, k in enumerate(keys):
            by_block.setdefault(k, []).append(pos)
        for k in sorted(by_block):
            merged, open_ = merge_block(pending.iloc[by_block[k]], spec=spec, block_tiles=side, **opts)
            done.append(merged)
            still_open.append(open_)
        log.debug("merge_by_blocks: side %d tiles, %d blocks, %d detections open",
                  side, len(by_block), sum(len(o) for o in still_open))
        pending = _sorted_detections(pd.concat(still_open, ignore_index=True)) if still_open else pending.iloc[:0]
        side *= 2
    done = [d for d in done if len(d)]
    if not done:
        return _empty(gdf.crs)
    merged = gpd.GeoDataFrame(pd.concat(done, ignore_index=True), crs=gdf.crs)
    # Overlaps are resolved once, on the whole layer: the ranking does not depend on blocks.
    merged = _resolve(merged, spec, overlap_tolerance, min_kept_fraction, opts["min_part_px"])
    return assign_rts_ids(merged)
