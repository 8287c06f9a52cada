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
- Groups are the connected components of that graph (each labelled by its first detection).
  IoS alone would let one big detection swallow its small neighbours, so each group is
  **verified**: for each tile, the union of the group's members from that tile is that tile's
  *view* of the slump; for every two tiles of the group whose views meet in their shared
  window, the views must agree there:
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
vectorized shapely calls, so the merge is O(n log n). There is no Python step per detection
or per group (but the join of each group's id strings): components come from numpy label
propagation, every group's view check, union and cleaning are a few vectorized shapely calls
over all groups (unions batched by group size), and only a group that fails its check is split
one join at a time. The view check takes a
pair of one-detection views straight from their edge (their cut shapes, ``|A & B|`` when both
lie in their tiles, and ``|A | B| = |A| + |B| - |A & B|``), so it overlays only views of several
detections and pairs without an edge. Each detection is cut to a shared window once per
neighbouring tile (not once per pair), and ``|A & B|`` is not overlaid for pairs whose bounding
boxes share too little to reach ``ios_threshold``. What is left is GEOS work (at 100k detections,
~7.4 CPU-s: ``|A & B|`` per candidate pair ~22 %, the cuts ~14 %, the groups' unions ~13 %,
overlap resolution ~20 %, the view check ~10 %; ~12,600 detections per CPU-second at 1M), so
speeding it up further on one core would mean other measures, hence other results (even an
equal area computed another way reorders edges of IoS 1, and so changes splits).
:func:`merge_by_blocks` gives the same result as :func:`merge_detections` while holding one
block of chunks at a time: groups that reach a block border are passed on to a pass with
blocks twice as large, shifted so that its block lines lie away from the previous ones (see
there); the blocks of a pass run in parallel (local processes or any
``concurrent.futures`` executor), and so does the overlap resolution
(:func:`resolve_overlaps_by_blocks`).

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
overlap by more than the tolerance (tests/test_merge.py checks it on random scenes). A slump's
outcome depends only on the slumps linked to it by such pairs, so
:func:`resolve_overlaps_by_blocks` resolves square blocks of the layer apart (deferring what
crosses a block border to larger blocks) with the same result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
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


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the graph on 0..n-1 with edges (left, right).

    Each node is labelled with the smallest node of its component, so labels do not depend on
    edge order. Min-label propagation with pointer jumping, all numpy: a few passes, as match
    groups are small (the number of passes grows with a group's diameter, not with n).
    """
    labels = np.arange(n, dtype=np.int64)
    if len(left) == 0:
        return labels
    while True:
        low = np.minimum(labels[left], labels[right])
        new = labels.copy()
        np.minimum.at(new, left, low)
        np.minimum.at(new, right, low)
        new = new[new]  # a label's own label is in the same component and no larger
        if np.array_equal(new, labels):
            return labels
        labels = new


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_inverse=True)`` of small int rows ``[N, k]``.

    Each row is packed into one int64 (mixed radix over the columns' ranges, which keeps the
    rows' lexicographic order), so the sort is a 1-D one: the same keys, in the same order.
    """
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return np.zeros((0, rows.shape[1]), np.int64), np.zeros(0, np.int64)
    lo = rows.min(axis=0)
    extent = rows.max(axis=0) - lo + 1
    code = np.zeros(len(rows), np.int64)
    for c in range(rows.shape[1]):
        code = code * extent[c] + (rows[:, c] - lo[c])
    packed, inverse = np.unique(code, return_inverse=True)
    keys = np.empty((len(packed), rows.shape[1]), np.int64)
    for c in reversed(range(rows.shape[1])):
        keys[:, c] = packed % extent[c] + lo[c]
        packed = packed // extent[c]
    return keys, inverse.reshape(-1)


def _grid_numbers(spec: Any) -> tuple[float, float, float]:
    """(resolution, tile size in metres, stride in metres) of a GridSpec-like object."""
    res = float(spec.resolution)
    return res, spec.tile_px * res, (spec.tile_px - spec.overlap_px) * res


def _tile_codes(tile_ids: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tile code per row (equal ids, equal codes) and the (i, j) of each row's tile.

    The id pattern is parsed once per distinct tile, not once per detection.
    """
    codes, uniques = pd.factorize(pd.Series(np.asarray(tile_ids, dtype=object), dtype=object).astype(str))
    ids = pd.Series(np.asarray(uniques, dtype=object), dtype=object)
    parts = ids.str.extract(_TILE_ID_PATTERN)
    bad = parts[0].isna()
    if bad.any():  # uniques come in order of first appearance: this is the first bad row's id
        raise RtsmapError(
            f"merge: tile_id {ids[bad].iloc[0]!r} does not look like '<epsg>_<res>m_t<i>_<j>' "
            "(docs/contracts.md, Grid); detections must come from pipeline/vectorize.py"
        )
    ij = parts.astype(np.int64).to_numpy().reshape(-1, 2)
    return codes.astype(np.int64), ij[codes]


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
    return _tile_codes(tile_ids)[1]


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


def _inside(box: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Whether each bounding box ``[N, 4]`` lies within the matching ``bounds`` ``[N, 4]``."""
    return (box[:, :2] >= bounds[:, :2]).all(axis=1) & (box[:, 2:] <= bounds[:, 2:]).all(axis=1)


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


def _sort_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value in sorted order (equal values, equal ranks), for np.lexsort keys.

    For str or bytes objects. Python-level comparisons are slow on a million objects, so the
    distinct values are sorted (strings), or fixed-width prefixes are sorted in C and only
    values sharing a prefix are compared whole (bytes). Zero-padded prefixes order as the
    values do, except that equal prefixes may hide a difference further on.
    """
    values = np.asarray(values, dtype=object)
    if len(values) == 0:
        return np.zeros(0, np.int64)
    if not isinstance(values[0], bytes):
        codes, uniques = pd.factorize(values)
        rank_of = np.empty(len(uniques), np.int64)
        rank_of[np.argsort(np.asarray(uniques, dtype=object), kind="stable")] = np.arange(len(uniques))
        return rank_of[codes]  # equal strings share a code, hence a rank
    _, prefix = np.unique(values.astype("S64"), return_inverse=True)
    prefix = prefix.reshape(-1).astype(np.int64)
    shared = np.bincount(prefix)[prefix] > 1
    rest = np.zeros(len(values), np.int64)
    if shared.any():
        rest[shared] = np.unique(values[shared], return_inverse=True)[1].reshape(-1)
    return prefix * (int(rest.max()) + 1) + rest


def _sorted_detections(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Detections in a stable order (year, tile, geometry, score), so input order never matters."""
    return _sorted_rows(gdf)[0]


def _sorted_rows(gdf: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """:func:`_sorted_detections` and the position in ``gdf`` of each of its rows.

    The geometry key is the WKB: raw bytes sort as their (upper-case) hex spelling does, which
    the order was first defined on.
    """
    df = gdf[list(DETECTION_COLUMNS)]
    geoms = np.asarray(df.geometry.values, dtype=object)
    present = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
    year = df["year"].to_numpy()[present].astype(np.int64)
    tile = df["tile_id"].to_numpy()[present].astype(str).astype(object)
    wkb = shapely.to_wkb(geoms[present])
    score = df["score"].to_numpy()[present].astype(np.float64)
    order = np.lexsort((score, _sort_rank(wkb), _sort_rank(tile), year))
    rows = present[order]
    df = df.iloc[rows].reset_index(drop=True)
    df["year"] = year[order]
    df["tile_id"] = tile[order]
    return df, rows


class _Graph:
    """Match edges and pair measures of a set of (sorted) detections."""

    def __init__(self, df: gpd.GeoDataFrame, spec: Any, ios_threshold: float, min_overlap_px: float) -> None:
        res, _, _ = _grid_numbers(spec)
        self.n = len(df)
        self.geoms = np.asarray(df.geometry.values, dtype=object)
        codes, self.ij = _tile_codes(df["tile_id"].to_numpy())
        years = df["year"].to_numpy(np.int64)
        # Bounding-box candidates first, then the exact test on the pairs that can match only:
        # the tree's own predicate would test the same-tile and mirrored pairs too.
        left, right = shapely.STRtree(self.geoms).query(self.geoms)
        keep = (left < right) & (years[left] == years[right]) & (codes[left] != codes[right])
        left, right = left[keep], right[keep]
        hit = shapely.intersects(self.geoms[left], self.geoms[right])
        left, right = left[hit], right[hit]
        # A detection within its own tile meets a neighbour's only inside their shared window,
        # so |A & B| is also the intersection of their cut views (the view check reuses it).
        # (The cut itself is not skipped for detections inside the window: the edges are ordered
        # by IoS, and a different but equal area would reorder ties of IoS 1.)
        self.in_tile = _inside(shapely.bounds(self.geoms), tile_boxes(self.ij, spec))
        self.spec, self.codes = spec, codes
        self._n_codes = int(codes.max()) + 1 if len(codes) else 1
        # Each detection is cut once per neighbouring tile, however many of that tile's
        # detections it meets (the same overlay of the same shapes as one cut per pair).
        self._cut_keys = np.zeros(0, np.int64)
        self._cut_geoms = np.zeros(0, dtype=object)
        a_in_o, b_in_o = self.cuts(left, right), self.cuts(right, left)
        a_o, b_o = shapely.area(a_in_o), shapely.area(b_in_o)
        smaller = np.minimum(a_o, b_o)
        # |A & B| is within both bounding boxes, so a pair whose boxes share less than
        # ios_threshold of the smaller cut cannot match: its overlay is skipped (the margin is
        # far above the areas' rounding, so no pair that would match is dropped).
        box_a, box_b = shapely.bounds(self.geoms[left]), shapely.bounds(self.geoms[right])
        box_inter = np.prod(np.clip(np.minimum(box_a[:, 2:], box_b[:, 2:]) - np.maximum(box_a[:, :2], box_b[:, :2]),
                                    0, None), axis=1)
        maybe = box_inter >= ios_threshold * smaller * (1 - 1e-9)
        inter = np.zeros(len(left))
        inter[maybe] = shapely.area(shapely.intersection(self.geoms[left[maybe]], self.geoms[right[maybe]]))
        ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        strong = (ios >= ios_threshold) & (inter > min_overlap_px * res * res) & maybe
        # Strongest first; ties broken by the stable detection order.
        order = np.lexsort((right[strong], left[strong], -ios[strong]))
        self.left = left[strong][order]
        self.right = right[strong][order]
        self.ios = ios[strong][order]
        # View IoU of each edge's pair alone (their views when a group is just these two).
        pair_union = (a_o + b_o - inter)[strong][order]
        self.pair_iou = np.divide(inter[strong][order], pair_union, out=np.zeros_like(pair_union), where=pair_union > 0)
        self.inter = inter[strong][order]
        # Each edge's detections inside their shared window: a one-detection view of a group
        # cut to that window is exactly this (the view check reuses it).
        self.left_in_window = a_in_o[strong][order]
        self.right_in_window = b_in_o[strong][order]
        self.edge_code = self.left * max(self.n, 1) + self.right
        self.edge_by_code = np.argsort(self.edge_code)

    def components(self) -> np.ndarray:
        return _components(self.n, self.left, self.right)

    def cuts(self, det: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Detections ``det`` cut to the window their tile shares with the tile of ``other``.

        Each (detection, tile) cut is computed once (``shapely.intersection`` with the window)
        and kept, so the view check gets the very same geometry.
        """
        key = det * self._n_codes + self.codes[other]
        known = self._cut_keys
        at = np.minimum(np.searchsorted(known, key), max(len(known) - 1, 0))
        found = known[at] == key if len(known) else np.zeros(len(key), bool)
        new, first = np.unique(key[~found], return_index=True)
        if len(new):
            d, o = det[~found][first], other[~found][first]
            made = shapely.intersection(self.geoms[d], _shared_windows(self.ij[d], self.ij[o], self.spec))
            keys = np.r_[known, new]
            by_key = np.argsort(keys, kind="stable")
            self._cut_keys, self._cut_geoms = keys[by_key], np.concatenate([self._cut_geoms, made])[by_key]
        return self._cut_geoms[np.searchsorted(self._cut_keys, key)]


class _ViewCheck:
    """The view check of one group at a time (:func:`_groups_agree`'s calls on the same
    geometries), for the split of a failed group.

    A split tries many joins of sub-groups that share most of their tiles' views, so views and
    the verdicts on pairs of views are kept: each is computed once.
    """

    def __init__(self, graph: _Graph, spec: Any, view_iou_threshold: float, min_overlap: float) -> None:
        self.graph, self.spec = graph, spec
        self.threshold, self.min_overlap = view_iou_threshold, min_overlap
        self.views: dict[tuple[int, ...], Any] = {}
        self.clipped: dict[tuple, Any] = {}
        self.windows: dict[tuple, Any] = {}
        self.verdicts: dict[tuple, bool] = {}

    def _view(self, members: tuple[int, ...], ta: tuple[int, int], tb: tuple[int, int]) -> Any:
        """The view of these members (one tile's) inside the window of tiles ta and tb."""
        if members not in self.views:
            self.views[members] = shapely.union_all(self.graph.geoms[list(members)])
        if (ta, tb) not in self.windows:
            self.windows[ta, tb] = _shared_windows(np.array([ta]), np.array([tb]), self.spec)[0]
        key = (members, ta, tb)
        if key not in self.clipped:
            self.clipped[key] = shapely.intersection(self.views[members], self.windows[ta, tb])
        return self.clipped[key]

    def _pair_agrees(self, ta: tuple[int, int], tb: tuple[int, int], ma: tuple[int, ...], mb: tuple[int, ...]) -> bool:
        key = (ta, tb, ma, mb)
        if key not in self.verdicts:
            va, vb = self._view(ma, ta, tb), self._view(mb, ta, tb)
            if min(shapely.area(va), shapely.area(vb)) <= self.min_overlap:
                verdict = True  # only one tile sees the slump here: a miss, not a conflict
            else:
                inter = shapely.area(shapely.intersection(va, vb))
                union = shapely.area(shapely.union(va, vb))
                verdict = bool(inter / union >= self.threshold)
            self.verdicts[key] = verdict
        return self.verdicts[key]

    def agree(self, members: list[int]) -> bool:
        """True if every two tiles of the group (members ascending) agree in their shared window."""
        tiles: dict[tuple[int, int], list[int]] = {}
        for m in members:
            tiles.setdefault(tuple(self.graph.ij[m].tolist()), []).append(m)
        keys = sorted(tiles)
        for x in range(len(keys)):
            for y in range(x + 1, len(keys)):
                ta, tb = keys[x], keys[y]
                if abs(ta[0] - tb[0]) > 1 or abs(ta[1] - tb[1]) > 1:
                    continue  # tiles that do not overlap have no shared window
                if not self._pair_agrees(ta, tb, tuple(tiles[ta]), tuple(tiles[tb])):
                    return False
        return True


def _runs(flat: np.ndarray, bounds: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs ``which`` of ``flat`` (run k is ``flat[bounds[k]:bounds[k + 1]]``) as a new
    (flat, bounds) pair."""
    sizes = np.diff(bounds)[which]
    if len(sizes) == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    offsets = np.arange(sizes.max())
    picks = (bounds[which][:, None] + offsets)[offsets < sizes[:, None]]  # row-major: run by run
    return flat[picks], np.r_[0, np.cumsum(sizes)]


def _as_is(geoms: np.ndarray) -> np.ndarray:
    """Valid polygons and multipolygons: their union with nothing else is themselves."""
    return shapely.is_valid(geoms) & np.isin(shapely.get_type_id(geoms), (3, 6))


def _ragged_union(geoms: np.ndarray, flat: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``shapely.union_all`` of each run ``flat[starts[k]:starts[k + 1]]`` of ``geoms``.

    One vectorized call per run length (a 2-D array reduced along its rows): the same GEOS
    unary union of the same geometries in the same order as one call per run. The union of
    one valid polygon is that polygon (GEOS returns it vertex for vertex), so it is not computed.
    """
    sizes = np.diff(starts)
    out = np.empty(len(sizes), dtype=object)
    for k in np.unique(sizes).tolist():
        runs = np.flatnonzero(sizes == k)
        if k == 1:
            one = geoms[flat[starts[runs]]]
            as_is = _as_is(one)
            out[runs[as_is]] = one[as_is]
            runs = runs[~as_is]
        out[runs] = shapely.union_all(geoms[flat[starts[runs][:, None] + np.arange(k)]], axis=1)
    return out


def _groups_agree(flat: np.ndarray, starts: np.ndarray, graph: _Graph, spec: Any, view_iou_threshold: float,
                  min_overlap: float) -> np.ndarray:
    """Whether each group's tiles agree on its shape in their shared windows (module docstring).

    ``flat[starts[g]:starts[g + 1]]`` are group g's members in ascending order. Each tile's view
    (the union of the group's members of that tile) is cut to every window it shares with
    another tile of the group; two views that both see the slump there must have an IoU of at
    least ``view_iou_threshold``. All groups are checked with a handful of vectorized calls.
    """
    n_groups = len(starts) - 1
    ok = np.ones(n_groups, bool)
    starts = np.asarray(starts, np.int64)
    if n_groups == 0:
        return ok
    group = np.repeat(np.arange(n_groups), np.diff(starts))
    ij = graph.ij[flat]
    # Members by (group, tile i, tile j), ascending within a tile: the views' unions.
    order = np.lexsort((flat, ij[:, 1], ij[:, 0], group))
    members, group, ij = flat[order], group[order], ij[order]
    new_unit = np.r_[True, (group[1:] != group[:-1]) | (ij[1:] != ij[:-1]).any(axis=1)]
    unit_starts = np.r_[np.flatnonzero(new_unit), len(members)]
    unit_group, unit_ij = group[new_unit], ij[new_unit]
    # Every two views of one group (x before y in tile order) whose tiles overlap.
    n_units = np.bincount(unit_group, minlength=n_groups)
    first_unit = np.r_[0, np.cumsum(n_units)[:-1]]
    rank = np.arange(len(unit_group)) - first_unit[unit_group]
    partners = n_units[unit_group] - 1 - rank
    x = np.repeat(np.arange(len(unit_group)), partners)
    y = x + 1 + (np.arange(len(x)) - np.repeat(np.cumsum(partners) - partners, partners))
    near = (np.abs(unit_ij[x] - unit_ij[y]) <= 1).all(axis=1)
    x, y = x[near], y[near]
    if len(x) == 0:
        return ok
    used = np.unique(np.r_[x, y])
    views = np.empty(len(unit_group), dtype=object)
    views[used] = _ragged_union(graph.geoms, *_runs(members, unit_starts, used))
    va = np.empty(len(x), dtype=object)
    vb = np.empty(len(x), dtype=object)
    # Two one-detection views whose detections share an edge: their cut views are the edge's.
    unit_size = np.diff(unit_starts)
    one = unit_size[x] == 1
    one &= unit_size[y] == 1
    mx, my = members[unit_starts[x]], members[unit_starts[y]]
    one[one] = _as_is(graph.geoms[mx[one]]) & _as_is(graph.geoms[my[one]])  # the view is the detection
    edge = np.full(len(x), -1)
    if one.any() and len(graph.edge_code):
        code = np.minimum(mx, my) * max(graph.n, 1) + np.maximum(mx, my)
        at = np.minimum(np.searchsorted(graph.edge_code[graph.edge_by_code], code[one]), len(graph.edge_code) - 1)
        found = graph.edge_code[graph.edge_by_code[at]] == code[one]
        edge[np.flatnonzero(one)[found]] = graph.edge_by_code[at[found]]
    reuse = edge >= 0
    e, x_is_left = edge[reuse], mx[reuse] < my[reuse]
    va[reuse] = np.where(x_is_left, graph.left_in_window[e], graph.right_in_window[e])
    vb[reuse] = np.where(x_is_left, graph.right_in_window[e], graph.left_in_window[e])
    # Other one-detection views are the graph's cuts of their detection (computed once); views
    # of several detections are cut here.
    for v, unit, me, other in ((va, x, mx, my), (vb, y, my, mx)):
        cut = ~reuse
        single = cut & (unit_size[unit] == 1)
        single[single] = _as_is(graph.geoms[me[single]])
        v[single] = graph.cuts(me[single], other[single])
        cut &= ~single
        v[cut] = shapely.intersection(views[unit[cut]], _shared_windows(unit_ij[x[cut]], unit_ij[y[cut]], spec))
    area_a, area_b = shapely.area(va), shapely.area(vb)
    # The intersection of an edge's two cut detections is the edge's own |A & B| when both lie
    # within their tiles (their overlap is then inside the window): only the others are overlaid.
    inter = np.full(len(x), np.nan)
    known = reuse.copy()
    known[reuse] = graph.in_tile[mx[reuse]] & graph.in_tile[my[reuse]]
    inter[known] = graph.inter[edge[known]]
    # Only one tile sees the slump here: a miss, not a conflict.
    both = np.minimum(area_a, area_b) > min_overlap
    todo = both & ~known
    inter[todo] = shapely.area(shapely.intersection(va[todo], vb[todo]))
    # |A | B| = |A| + |B| - |A & B|: no overlay for the union.
    union = area_a[both] + area_b[both] - inter[both]
    iou = np.divide(inter[both], union, out=np.zeros_like(union), where=union > 0)
    ok[unit_group[x[both]][iou < view_iou_threshold]] = False
    return ok


def _groups(graph: _Graph, component: np.ndarray, spec: Any, view_iou_threshold: float,
            min_overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """Verified groups of the detections whose ``component`` label is not negative.

    Returns
    -------
    flat, bounds : numpy.ndarray
        Group g's members (detection positions, ascending) are ``flat[bounds[g]:bounds[g + 1]]``;
        groups in the order of their component's label, a split component's parts in the order
        of their smallest member.
    """
    labels = component
    closed = np.flatnonzero(labels >= 0)
    flat = closed[np.argsort(labels[closed], kind="stable")]
    lab = labels[flat]
    starts = np.r_[np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]), len(flat)] if len(flat) else np.zeros(1, np.int64)
    sizes = np.diff(starts)
    # A new group starts at each of these member positions; failed checks add more below.
    cut = np.zeros(len(flat) + 1, bool)
    cut[starts] = True
    # Pairs: two detections of two tiles; their views are themselves, and the view IoU was
    # computed with their edge (each pair has exactly one).
    edge_label = labels[graph.left]
    edge_open = edge_label < 0
    pair_iou = np.full(len(labels), np.inf)
    pair_iou[edge_label[~edge_open]] = graph.pair_iou[~edge_open]
    pairs = np.flatnonzero(sizes == 2)
    failed_pairs = pairs[pair_iou[lab[starts[pairs]]] < view_iou_threshold]
    cut[starts[failed_pairs] + 1] = True
    # Larger groups: the full view check, all at once.
    big = np.flatnonzero(sizes >= 3)
    agree = _groups_agree(*_runs(flat, starts, big), graph, spec, view_iou_threshold, min_overlap)
    failed = big[~agree]
    if len(failed):
        # Edges of the failed components, in graph (strength) order.
        failed_labels = lab[starts[failed]]
        mine = np.flatnonzero(np.isin(edge_label, failed_labels))
        edges_of: dict[int, list[tuple[int, int]]] = {}
        check = _ViewCheck(graph, spec, view_iou_threshold, min_overlap)
        for e in mine.tolist():
            edges_of.setdefault(int(edge_label[e]), []).append((int(graph.left[e]), int(graph.right[e])))
        for g in failed.tolist():
            s, e = int(starts[g]), int(starts[g + 1])
            parts = _split(flat[s:e].tolist(), edges_of.get(int(lab[s]), []), check)
            flat[s:e] = [m for p in parts for m in p]
            cut[s:e] = False
            cut[s + np.r_[0, np.cumsum([len(p) for p in parts])[:-1]]] = True
    return flat, np.flatnonzero(cut)


def _split(members: list[int], edges: list[tuple[int, int]], check: _ViewCheck) -> list[list[int]]:
    """Split a group that fails the view check: replay its edges strongest first, joining two
    sub-groups only while their views still agree (Kruskal with a check)."""
    sub: dict[int, list[int]] = {m: [m] for m in members}
    root = {m: m for m in members}
    for a, b in edges:
        ra, rb = root[a], root[b]
        if ra == rb:
            continue
        joined = sorted(sub[ra] + sub[rb])
        if not check.agree(joined):
            continue
        keep, drop = min(ra, rb), max(ra, rb)
        sub[keep] = joined
        for m in sub.pop(drop):
            root[m] = keep
    log.debug("merge: split a group of %d detections into %d", len(members), len(sub))
    return [sub[k] for k in sorted(sub)]


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


def _clean_all(geoms: np.ndarray, min_area: float) -> np.ndarray:
    """:func:`_clean` of each geometry; the common case (nothing to drop) in vectorized calls.

    A valid Polygon, or MultiPolygon of two or more parts, none of whose parts or holes is
    below ``min_area``, is what ``_clean`` returns for it unchanged; only the others go
    through ``_clean`` one by one.
    """
    out = np.empty(len(geoms), dtype=object)
    if len(geoms) == 0:
        return out
    fixed = shapely.make_valid(geoms)
    kind = shapely.get_type_id(fixed)
    n_parts = shapely.get_num_geometries(fixed)
    simple = ((kind == 3) | ((kind == 6) & (n_parts >= 2))) & ~shapely.is_empty(fixed)
    parts, owner = shapely.get_parts(fixed[simple], return_index=True)
    owner = np.flatnonzero(simple)[owner]
    small = np.zeros(len(geoms), bool)
    small[owner[shapely.area(parts) < min_area]] = True
    n_holes = shapely.get_num_interior_rings(parts)
    with_holes = n_holes > 0
    if with_holes.any():
        rings, ring_owner = shapely.get_rings(parts[with_holes], return_index=True)
        first = np.r_[True, ring_owner[1:] != ring_owner[:-1]]  # the exterior comes first
        holes, hole_owner = rings[~first], owner[np.flatnonzero(with_holes)[ring_owner[~first]]]
        small[hole_owner[shapely.area(shapely.polygons(holes)) < min_area]] = True
    ready = simple & ~small
    out[ready] = fixed[ready]
    out[~ready] = [_clean(g, min_area) for g in geoms[~ready]]
    return out


def _distinct_joined(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """``",".join(sorted(set(...)))`` of the str ``values`` of each group ``0..n_groups - 1``.

    Distinct values are ranked once (Python's str order), so each group's are deduplicated and
    sorted as integers; only the joins are per group ("" for a group without values).
    """
    out = np.full(n_groups, "", dtype=object)
    if len(values) == 0:
        return out
    codes, uniques = pd.factorize(values)
    ordered = np.argsort(np.asarray(uniques, dtype=object), kind="stable")
    rank = np.empty(len(uniques), np.int64)
    rank[ordered] = np.arange(len(uniques))
    key = np.unique(group * len(uniques) + rank[codes])  # by group, then by value
    owner = key // len(uniques)
    text = np.asarray(uniques, dtype=object)[ordered][key % len(uniques)].tolist()
    cuts = np.r_[np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]), len(key)].tolist()
    out[owner[cuts[:-1]]] = [",".join(text[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return out


def _join_ids(values: list[str]) -> str:
    items = set()
    for v in values:
        items.update(x for x in str(v).split(",") if x)
    return ",".join(sorted(items))


def _build(df: gpd.GeoDataFrame, flat: np.ndarray, bounds: np.ndarray, min_part_area: float) -> gpd.GeoDataFrame:
    """One row per group ``flat[bounds[g]:bounds[g + 1]]`` (no rts_id yet)."""
    geoms = np.asarray(df.geometry.values, dtype=object)
    first, sizes = bounds[:-1], np.diff(bounds)
    score = df["score"].to_numpy(dtype=np.float64)
    year = df["year"].to_numpy()
    tile = df["tile_id"].to_numpy().astype(object)
    chunk = df["chunk_id"].astype(str).to_numpy().astype(object)
    items = df["source_items"].fillna("").astype(str).to_numpy().astype(object)
    out_geoms = np.empty(len(sizes), dtype=object)
    tile_ids = np.empty(len(sizes), dtype=object)
    chunk_ids = np.empty(len(sizes), dtype=object)
    source_items = np.empty(len(sizes), dtype=object)
    # Single detections: valid polygons pass as they are (vectorize's output); the rest are cleaned.
    one = np.flatnonzero(sizes == 1)
    m = flat[first[one]]
    g = geoms[m]
    as_is = shapely.is_valid(g) & np.isin(shapely.get_type_id(g), (3, 6))
    out_geoms[one[as_is]] = g[as_is]
    out_geoms[one[~as_is]] = [_clean(x, min_part_area) for x in g[~as_is]]
    tile_ids[one], chunk_ids[one] = tile[m], chunk[m]
    codes, uniques = pd.factorize(items[m])  # few distinct item lists: each is split and sorted once
    source_items[one] = np.asarray([_join_ids([u]) for u in uniques], dtype=object)[codes] if len(m) else []
    # Groups: the union of their members, cleaned.
    many = np.flatnonzero(sizes > 1)
    if len(many):
        many_flat, many_starts = _runs(flat, bounds, many)
        out_geoms[many] = _clean_all(_ragged_union(geoms, many_flat, many_starts), min_part_area)
        group = np.repeat(np.arange(len(many)), np.diff(many_starts))
        tile_ids[many] = _distinct_joined(tile[many_flat], group, len(many))
        chunk_ids[many] = _distinct_joined(chunk[many_flat], group, len(many))
        # Item lists: each distinct list is split once, then every group's parts are joined.
        codes, uniques = pd.factorize(items[many_flat])
        pairs = np.unique(group * len(uniques) + codes)  # each (group, list) once
        split = [[x for x in str(u).split(",") if x] for u in uniques]
        n_parts = np.array([len(x) for x in split], np.int64)
        parts = np.array([x for xs in split for x in xs], dtype=object)
        first_part = np.r_[0, np.cumsum(n_parts)[:-1]]
        lists = pairs % len(uniques)
        take = np.repeat(first_part[lists], n_parts[lists])
        take += np.arange(len(take)) - np.repeat(np.cumsum(n_parts[lists]) - n_parts[lists], n_parts[lists])
        source_items[many] = _distinct_joined(parts[take], np.repeat(pairs // len(uniques), n_parts[lists]), len(many))
    out_geoms = np.asarray(out_geoms, dtype=object)
    keep = ~shapely.is_empty(out_geoms) if len(out_geoms) else np.zeros(0, bool)
    kept = out_geoms[keep]
    out = gpd.GeoDataFrame({
        "year": year[flat[first]][keep].astype(np.int64),
        "score": np.maximum.reduceat(score[flat], first)[keep] if len(first) else np.zeros(0),
        "n_detections": sizes[keep].astype(np.int64),
        "tile_ids": tile_ids[keep], "chunk_ids": chunk_ids[keep], "source_items": source_items[keep],
    }, geometry=gpd.GeoSeries(kept, crs=df.crs), crs=df.crs)
    out["area_m2"] = shapely.area(kept)
    out["perimeter_m"] = shapely.length(kept)
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
    left, right = shapely.STRtree(geoms).query(geoms)
    keep = left < right
    left, right = left[keep], right[keep]
    area = shapely.area(geoms)
    # Pairs whose bounding boxes overlap by no more than the tolerance cannot overlap by more;
    # most neighbours that touch or nearly touch end here, before any exact test.
    box = shapely.bounds(geoms)
    box_inter = np.prod(np.clip(np.minimum(box[left, 2:], box[right, 2:]) - np.maximum(box[left, :2], box[right, :2]),
                                0, None), axis=1)
    maybe = box_inter > tolerance * np.minimum(area[left], area[right]) * (1 - 1e-9)
    left, right = left[maybe], right[maybe]
    hit = shapely.intersects(geoms[left], geoms[right])
    left, right = left[hit], right[hit]
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
    left, right, _ = overlapping_pairs(np.asarray(slumps.geometry.values, dtype=object), overlap_tolerance)
    return _resolve_pairs(slumps, left, right, min_kept_fraction, min_part_area)


def _resolve_pairs(slumps: gpd.GeoDataFrame, left: np.ndarray, right: np.ndarray, min_kept_fraction: float,
                   min_part_area: float) -> gpd.GeoDataFrame:
    """:func:`resolve_overlaps` of one year's slumps given their contested pairs.

    Each slump's outcome depends only on the slumps linked to it by contested pairs (its
    component), never on their positions, so any subset holding whole components gives the
    same shapes for them (:func:`resolve_overlaps_by_blocks` relies on it).
    """
    if len(left) == 0:
        return slumps.reset_index(drop=True)
    current, dropped, _ = _resolved_shapes(np.asarray(slumps.geometry.values, dtype=object),
                                           slumps["score"].to_numpy(np.float64), left, right, min_kept_fraction,
                                           min_part_area)
    return _with_shapes(slumps, current, dropped)


def _resolved_shapes(geoms: np.ndarray, score: np.ndarray, left: np.ndarray, right: np.ndarray,
                     min_kept_fraction: float, min_part_area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shapes of :func:`_resolve_pairs`: ``(shapes, dropped, cut)``, the last two bool per slump
    (``cut``: its shape was replaced by a trimmed one)."""
    area = shapely.area(geoms)
    # Rank only the slumps in contested pairs: their order among themselves is all that is used.
    involved = np.unique(np.r_[left, right])
    rank = np.full(len(geoms), -1, np.int64)
    rank[involved[np.lexsort((_sort_rank(shapely.to_wkb(geoms[involved])), -area[involved],
                               -score[involved]))]] = np.arange(len(involved))
    winner = np.where(rank[left] < rank[right], left, right)
    loser = np.where(rank[left] < rank[right], right, left)
    # Each loser is cut by its winners' final shapes. A winner is final once its own winners
    # are done, so losers go in rounds (a winner's round before its losers'), each round a few
    # vectorized calls: the same cuts of the same shapes as one loser at a time in rank order.
    depth = np.zeros(len(geoms), np.int64)
    while True:
        new = depth.copy()
        np.maximum.at(new, loser, depth[winner] + 1)
        if np.array_equal(new, depth):
            break
        depth = new
    # Winners of each loser, in rank order: the union of its winners then takes them in an order
    # that does not depend on the slumps' positions (nor on the tree's query order).
    by_loser = np.lexsort((rank[winner], loser))
    current = geoms.copy()
    dropped = np.zeros(len(geoms), bool)
    cut = np.zeros(len(geoms), bool)
    for level in range(1, int(depth.max()) + 1):
        pairs = by_loser[depth[loser[by_loser]] == level]
        pairs = pairs[~dropped[winner[pairs]]]
        if len(pairs) == 0:
            continue
        los = loser[pairs]
        bounds = np.r_[np.flatnonzero(np.r_[True, los[1:] != los[:-1]]), len(los)]
        cut_by = _ragged_union(current, winner[pairs], bounds)
        lo = los[bounds[:-1]]
        rest = _clean_all(shapely.difference(current[lo], cut_by), min_part_area)
        lost = shapely.is_empty(rest) | (shapely.area(rest) < min_kept_fraction * area[lo])
        dropped[lo[lost]] = True
        current[lo[~lost]] = rest[~lost]
        cut[lo[~lost]] = True
    log.debug("resolve_overlaps: %d contested slumps, %d dropped", len(np.unique(loser)), int(dropped.sum()))
    return current, dropped, cut & ~dropped


def _with_shapes(slumps: gpd.GeoDataFrame, current: np.ndarray, dropped: np.ndarray) -> gpd.GeoDataFrame:
    """The rows of ``slumps`` with the shapes ``current``, less the ``dropped`` ones (area and
    perimeter recomputed), index reset: :func:`_resolve_pairs`' frame."""
    out = slumps.copy()
    out = out.set_geometry(gpd.GeoSeries(current, index=slumps.index, crs=slumps.crs))
    if dropped.any():  # else no copy of every column (a whole year's in finish)
        out = out[~dropped]
    if "area_m2" in out.columns:
        out["area_m2"] = shapely.area(out.geometry.values)
    if "perimeter_m" in out.columns:
        out["perimeter_m"] = shapely.length(out.geometry.values)
    return out.reset_index(drop=True)


def _resolve_block(sub: gpd.GeoDataFrame, interior: np.ndarray, opts: dict) -> tuple:
    """Resolve the overlaps of one block's slumps (one year) whose components close in it.

    ``interior`` marks the slumps whose bounding box lies inside the block; the others reach
    over its border and are there only because they may overlap interior ones. A component of
    the contested pairs made of interior slumps only is a whole component of the layer (every
    slump that can overlap an interior one is in ``sub``), so it is resolved here; interior
    slumps linked to a border slump are returned (as positions in ``sub``) for a larger block.

    Returns ``(closed, contested, dropped, cut, shapes, still_open)``: positions in ``sub`` of
    the slumps resolved here, whether any pair among them was contested, which of them are
    dropped and which trimmed (bool per closed slump), the WKB of the trimmed shapes, and the
    positions deferred. Only what changed comes back: the caller holds the slumps already.
    """
    geoms = np.asarray(sub.geometry.values, dtype=object)
    left, right, _ = overlapping_pairs(geoms, opts["overlap_tolerance"])
    labels = _components(len(sub), left, right)
    closed = interior & ~np.isin(labels, labels[~interior])
    inside = closed[left]  # both slumps of a pair are in one component
    position = np.cumsum(closed) - 1
    still_open = np.flatnonzero(interior & ~closed)
    rows = np.flatnonzero(closed)
    if not inside.any():
        none = np.zeros(len(rows), bool)
        return rows, False, none, none, np.zeros(0, dtype=object), still_open
    current, dropped, cut = _resolved_shapes(geoms[rows], sub["score"].to_numpy(np.float64)[rows],
                                             position[left[inside]], position[right[inside]],
                                             opts["min_kept_fraction"], opts["min_part_area"])
    return rows, True, dropped, cut, shapely.to_wkb(current[cut]), still_open


def _resolve_block_task(args: tuple) -> tuple:
    """:func:`_resolve_block` on one tuple of arguments (what an executor's ``map`` passes)."""
    return _resolve_block(*args)


def _resolved_block(part: gpd.GeoDataFrame, contested: bool, dropped: np.ndarray, cut: np.ndarray,
                    shapes: np.ndarray) -> gpd.GeoDataFrame:
    """The frame :func:`_resolve_pairs` gives for a block's closed slumps ``part``, from what
    :func:`_resolve_block` sent back."""
    if not contested:
        return part.reset_index(drop=True)
    current = np.asarray(part.geometry.values, dtype=object).copy()
    current[cut] = shapely.from_wkb(shapes)
    return _with_shapes(part, current, dropped)


def resolve_overlaps_by_blocks(
    slumps: gpd.GeoDataFrame,
    *,
    block_m: float,
    workers: int = 1,
    executor: concurrent.futures.Executor | None = None,
    overlap_tolerance: float = OVERLAP_TOLERANCE,
    min_kept_fraction: float = MIN_KEPT_FRACTION,
    min_part_area: float = 0.0,
) -> gpd.GeoDataFrame:
    """The same result as :func:`resolve_overlaps`, one square block of the layer at a time.

    Contested pairs only link slumps that overlap, so a slump's outcome depends only on its
    component of the contested-pair graph. Each pass cuts the plane into ``block_m`` squares
    (anchored at the CRS origin, per year); a slump whose bounding box lies inside one square is
    *interior* to it. A block holds its interior slumps and the slumps reaching over its border
    into it; components of interior slumps only are resolved there, the rest are deferred to a
    pass with squares twice as large (as :func:`merge_by_blocks` defers groups), until the
    remainder spans at most two squares each way and is resolved at once. The blocks of a pass
    run in parallel like :func:`merge_by_blocks`' blocks.

    Parameters
    ----------
    slumps : geopandas.GeoDataFrame
        As for :func:`resolve_overlaps`.
    block_m : float
        Side of the first pass's squares, in CRS units (metres).
    workers : int
        Local processes resolving blocks at once (1: all in this process). Ignored when
        ``executor`` is given.
    executor : concurrent.futures.Executor, optional
        Where the blocks of each pass are resolved.
    overlap_tolerance, min_kept_fraction, min_part_area : float
        As for :func:`resolve_overlaps`.

    Returns
    -------
    geopandas.GeoDataFrame
        The rows of :func:`resolve_overlaps`' result (in another order), index reset.

    Raises
    ------
    RtsmapError
        If ``block_m`` is not a positive number or ``workers`` not a positive integer.
    """
    if not np.isfinite(block_m) or block_m <= 0:
        raise RtsmapError(f"merge: block_m must be a positive number, got {block_m!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise RtsmapError(f"merge: workers must be a positive integer, got {workers!r}")
    opts = {"overlap_tolerance": overlap_tolerance, "min_kept_fraction": min_kept_fraction,
            "min_part_area": min_part_area}
    if len(slumps) < 2:
        return resolve_overlaps(slumps, **opts)
    if executor is None and workers > 1:
        context = multiprocessing.get_context("spawn")  # as in merge_by_blocks
        with concurrent.futures.ProcessPoolExecutor(int(workers), mp_context=context) as pool:
            return resolve_overlaps_by_blocks(slumps, block_m=block_m, executor=pool, **opts)
    pending = slumps.reset_index(drop=True)
    size = float(block_m)
    done: list[gpd.GeoDataFrame] = []
    while len(pending):
        box = shapely.bounds(np.asarray(pending.geometry.values, dtype=object))
        span = float((box[:, 2:].max(axis=0) - box[:, :2].min(axis=0)).max())
        lo = np.floor(box[:, :2] / size).astype(np.int64)
        border = (np.floor(box[:, 2:] / size).astype(np.int64) != lo).any(axis=1)
        year = pending["year"].to_numpy(np.int64) if "year" in pending.columns else np.zeros(len(pending), np.int64)
        inner = np.flatnonzero(~border)
        keys, block = _distinct_rows(np.c_[year[inner], lo[inner]])
        if size >= span or len(inner) == 0 and size * 2 >= span or len(keys) == 1 and not border.any():
            done.append(resolve_overlaps(pending, **opts))
            break
        # Border slumps reaching into each block (the tree's boxes touching the block's square).
        edge = np.flatnonzero(border)
        cells, near = shapely.STRtree(shapely.box(*box[edge].T)).query(
            shapely.box(keys[:, 1] * size, keys[:, 2] * size, (keys[:, 1] + 1) * size, (keys[:, 2] + 1) * size))
        same_year = year[edge[near]] == keys[cells, 0]
        cells, near = cells[same_year], edge[near[same_year]]
        by_block = np.argsort(block.reshape(-1), kind="stable")
        inner_rows = np.split(inner[by_block], np.searchsorted(block.reshape(-1)[by_block], np.arange(1, len(keys))))
        order = np.argsort(cells, kind="stable")
        near_rows = np.split(near[order], np.searchsorted(cells[order], np.arange(1, len(keys))))
        # A block needs the shapes and scores only; the other columns stay here.
        needed = pending[["score", pending.geometry.name]]
        block_rows = [np.r_[own, reach] for own, reach in zip(inner_rows, near_rows)]
        tasks = [(needed.iloc[rows], np.arange(len(rows)) < len(own), opts)
                 for rows, own in zip(block_rows, inner_rows)]
        results = executor.map(_resolve_block_task, tasks) if executor is not None else map(_resolve_block_task, tasks)
        deferred = [edge]
        for rows, (closed, contested, dropped, cut, shapes, still_open) in zip(block_rows, results):  # in block order
            done.append(_resolved_block(pending.iloc[rows[closed]], contested, dropped, cut, shapes))
            deferred.append(rows[still_open])
        del tasks, results, needed
        log.debug("resolve_overlaps_by_blocks: side %.0f m, %d blocks, %d slumps deferred",
                  size, len(keys), sum(len(d) for d in deferred))
        pending = pending.iloc[np.sort(np.concatenate(deferred))].reset_index(drop=True)
        size *= 2
    done = [d for d in done if len(d)]
    if not done:
        return slumps.iloc[:0].reset_index(drop=True)
    return gpd.GeoDataFrame(pd.concat(done, ignore_index=True), crs=slumps.crs)


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
    # On the shapely objects: a GeometryArray would go through pandas' slower ufunc dispatch.
    c = shapely.centroid(np.asarray(merged.geometry.values, dtype=object))
    x = np.round(shapely.get_x(c)).astype(np.int64)
    y = np.round(shapely.get_y(c)).astype(np.int64)
    base = np.asarray([f"{epsg}_{yr}_x{a}_y{b}" for yr, a, b in zip(merged["year"].tolist(), x.tolist(), y.tolist())],
                      dtype=object)
    ids = base.copy()
    # Only ids shared by two or more slumps need the WKB to order them.
    shared = np.flatnonzero(pd.Series(base).duplicated(keep=False).to_numpy())
    if len(shared):
        wkb = shapely.to_wkb(merged.geometry.values[shared])
        seen: dict[str, int] = {}
        for pos in shared[np.lexsort((_sort_rank(wkb), _sort_rank(base[shared])))].tolist():
            n = seen.get(base[pos], 0) + 1
            seen[base[pos]] = n
            ids[pos] = base[pos] if n == 1 else f"{base[pos]}_{n}"
    out = merged.copy()
    out["rts_id"] = ids
    return out.sort_values("rts_id", kind="mergesort").reset_index(drop=True)[list(MERGED_COLUMNS)]


def _merge_sorted(df: gpd.GeoDataFrame, spec: Any, *, ios_threshold: float, view_iou_threshold: float,
                  min_overlap_px: float, min_part_px: float, open_tiles: np.ndarray | None = None,
                  ) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """Merge sorted detections but the components touching ``open_tiles`` (bool per row):
    ``(merged, open)``, ``open`` marking the rows left out."""
    res, _, _ = _grid_numbers(spec)
    graph = _Graph(df, spec, ios_threshold, min_overlap_px)
    labels = graph.components()
    if open_tiles is not None and open_tiles.any():
        open_labels = np.unique(labels[open_tiles])
        is_open = np.isin(labels, open_labels)
    else:
        is_open = np.zeros(len(df), dtype=bool)
    closed_labels = np.where(is_open, -1, labels)
    flat, bounds = _groups(graph, closed_labels, spec, view_iou_threshold, min_overlap_px * res * res)
    # The graph's cuts (one per detection and neighbouring tile) and edge measures are read by
    # the groups only: freed before the unions are made.
    del graph, labels, closed_labels
    merged = _build(df, flat, bounds, min_part_px * res * res)
    return merged, is_open


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
    del df  # the sorted copy is not read again
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
    origin: int = 0,
    **kwargs: Any,
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Merge the detections of one block of tiles; leave the groups at its border open.

    A block is ``block_tiles x block_tiles`` tiles anchored at tile ``(origin, origin)`` (tile
    (i, j) is in block ``((i - origin) // block_tiles, (j - origin) // block_tiles)``). A detection can only match detections
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
    origin : int
        Tile index (both axes) where the blocks are anchored (0: the grid origin).
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
    merged, df, is_open, _ = _merge_block(gdf, spec, block_tiles, origin, _thresholds(kwargs))
    return merged, df[is_open].reset_index(drop=True)


def _merge_block(gdf: gpd.GeoDataFrame, spec: Any, block_tiles: int, origin: int,
                 opts: dict) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, np.ndarray, np.ndarray]:
    """:func:`merge_block`'s work on checked, non-empty detections: ``(merged, sorted, open,
    rows)``, the sorted detections, which of them are open and their positions in ``gdf``."""
    df, rows = _sorted_rows(gdf)
    ij = tile_indices(df["tile_id"].to_numpy())
    local = np.mod(ij - int(origin), block_tiles)
    ring = ((local == 0) | (local == block_tiles - 1)).any(axis=1)
    merged, is_open = _merge_sorted(df, spec, open_tiles=ring, **opts)
    return merged, df, is_open, rows


def _thresholds(kwargs: dict) -> dict:
    known = {"ios_threshold": 0.5, "view_iou_threshold": 0.5, "min_overlap_px": 0.0, "min_part_px": 1.0}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"unknown merge option(s): {sorted(unknown)}")
    return {**known, **kwargs}


def _merge_block_task(args: tuple) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """:func:`merge_block` on one tuple of arguments (what an executor's ``map`` passes), but
    the open detections come back as their positions in the block (ascending): the caller has
    them already, so they are not sent back."""
    block, spec, block_tiles, origin, opts = args
    merged, _, is_open, rows = _merge_block(block, spec, block_tiles, origin, opts)
    return merged, np.sort(rows[is_open])


def merge_by_blocks(
    gdf: gpd.GeoDataFrame,
    *,
    spec: Any,
    block_chunks: int = 4,
    workers: int = 1,
    executor: concurrent.futures.Executor | None = None,
    **kwargs: Any,
) -> gpd.GeoDataFrame:
    """The same result as :func:`merge_detections`, one block of chunks at a time.

    Pass 1 merges each block of ``block_chunks x block_chunks`` chunks on its own
    (:func:`merge_block`); the detections of groups that reach a block border are kept open.
    Each further pass merges only the open detections, in blocks twice as large and shifted by
    half the previous side: the open groups lie along the previous pass's block lines, so most
    of them are inside a block of the next pass (merged in parallel there, not in one last
    serial pass). Passes go on until the open detections fit in one block or the blocks are
    twice their span; those left are then merged together in this process. Closed
    groups are whole components of the global match graph, and verification and splitting look
    only at a component's own members in the global stable order, so the result equals the
    all-at-once merge (tests/test_merge.py checks it).

    The blocks of a pass are independent (:func:`merge_block` is a pure function of its
    detections), so they can run in parallel: in ``workers`` local processes, or on any
    ``concurrent.futures`` executor (a Dask client's ``get_executor()`` runs them on the
    cluster). Results are collected in block order, so the output is the same for any number of
    workers.

    Parameters
    ----------
    gdf : geopandas.GeoDataFrame
        Detections as for :func:`merge_detections`.
    spec : GridSpec
        The grid.
    block_chunks : int
        Side of the first-pass blocks, in chunks.
    workers : int
        Local processes merging blocks at once (1: all in this process). Ignored when
        ``executor`` is given.
    executor : concurrent.futures.Executor, optional
        Where the blocks of each pass are merged (its ``map`` is called with picklable
        arguments).
    **kwargs
        Thresholds and overlap options as for :func:`merge_detections`.

    Returns
    -------
    geopandas.GeoDataFrame
        As :func:`merge_detections`.

    Raises
    ------
    RtsmapError
        As :func:`merge_detections`, or if ``workers`` is not a positive integer.
    """
    _check_detections(gdf)
    overlap_tolerance = kwargs.pop("overlap_tolerance", OVERLAP_TOLERANCE)
    min_kept_fraction = kwargs.pop("min_kept_fraction", MIN_KEPT_FRACTION)
    opts = _thresholds(kwargs)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise RtsmapError(f"merge: workers must be a positive integer, got {workers!r}")
    if len(gdf) == 0:
        return _empty(gdf.crs)
    if executor is None and workers > 1:
        # Spawned, not forked: the parent may hold threads (GDAL, Arrow, Dask) a fork would copy mid-use.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(int(workers), mp_context=context) as pool:
            return merge_by_blocks(gdf, spec=spec, block_chunks=block_chunks, executor=pool,
                                   overlap_tolerance=overlap_tolerance, min_kept_fraction=min_kept_fraction, **opts)
    # Unsorted: each block sorts its own detections (the stable order is a total order on their
    # content, so a block's order is the global one restricted to it).
    pending = gdf[list(DETECTION_COLUMNS)]
    geoms = np.asarray(pending.geometry.values, dtype=object)
    pending = pending[~(shapely.is_missing(geoms) | shapely.is_empty(geoms))]
    ij = tile_indices(pending["tile_id"].to_numpy())  # once: a pass keeps rows of the last
    side = max(1, int(block_chunks)) * int(spec.tiles_per_chunk)
    origin = 0
    done: list[gpd.GeoDataFrame] = []
    while len(pending):
        span = int((ij.max(axis=0) - ij.min(axis=0) + 1).max())
        keys, block = _distinct_rows(np.floor_divide(ij - origin, side))
        # Blocks of at least twice the span: at most two each way, and what is left after a
        # pass with blocks of at least the span is only what reaches that pass's lines.
        if len(keys) == 1 or side >= 2 * span:
            merged, _ = _merge_sorted(_sorted_detections(pending), spec, **opts)
            done.append(merged)
            break
        # Rows of each block (blocks in (i, j) order, rows in input order).
        by_block = np.argsort(block, kind="stable")
        block_rows = np.split(by_block, np.searchsorted(block[by_block], np.arange(1, len(keys))))
        tasks = [(pending.iloc[rows], spec, side, origin, opts) for rows in block_rows]
        results = executor.map(_merge_block_task, tasks) if executor is not None else map(_merge_block_task, tasks)
        still_open = []
        for rows, (merged, open_rows) in zip(block_rows, results):  # in block order, whoever merged them
            done.append(merged)
            still_open.append(rows[open_rows])
        del tasks, results
        keep = np.sort(np.concatenate(still_open))
        log.debug("merge_by_blocks: side %d tiles from %d, %d blocks, %d detections open",
                  side, origin, len(keys), len(keep))
        pending, ij = pending.iloc[keep], ij[keep]
        # The open groups lie along this pass's block lines: the next pass's lines are half a
        # block away from them, so most of those groups are inside a block there (merged in
        # parallel, not in one last pass here).
        origin += side // 2
        side *= 2
    done = [d for d in done if len(d)]
    if not done:
        return _empty(gdf.crs)
    merged = gpd.GeoDataFrame(pd.concat(done, ignore_index=True), crs=gdf.crs)
    if overlap_tolerance is not None and len(merged) > 1:
        # Overlaps are resolved by blocks too (on the same executor), with the same result as on
        # the whole layer: a slump's outcome depends only on the slumps it overlaps.
        res, _, stride = _grid_numbers(spec)
        merged = resolve_overlaps_by_blocks(
            merged, block_m=max(1, int(block_chunks)) * int(spec.tiles_per_chunk) * stride, executor=executor,
            overlap_tolerance=overlap_tolerance, min_kept_fraction=min_kept_fraction,
            min_part_area=opts["min_part_px"] * res * res)
    return assign_rts_ids(merged)
