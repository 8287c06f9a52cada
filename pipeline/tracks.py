"""Link the per-year slump layers into tracks: one identity per slump through the years.

The rules (docs/tracking.md has the reasoning and the measured figures):

- **Link.** A slump of year ``t`` is linked to a track when it overlaps the track's last mapped
  polygon by at least ``link_ios`` (0.5) of the smaller of the two (intersection over the
  smaller). Slumps grow by headwall retreat, so last year's footprint lies inside this year's
  and the measure stays near 1 however fast the slump grows, where IoU would fall; distinct
  neighbours share at most an edge. Candidate pairs come from one ``shapely.STRtree`` query per
  year; every measure is a vectorised shapely call.
- **Gaps.** A track whose last polygon lies (for at least ``seen_fraction`` of its area) in
  ground that was not processed in year ``t`` (coverage ``no_data``/``failed``, or outside the
  coverage) stays open and can link in a later year. A track whose ground *was* processed and
  where no slump links has ended: "not seen".
- **Identity.** Each track continues into at most one slump and each slump continues at most one
  track: linked pairs are taken by intersection area, largest first
  (:func:`rtsmap.contract.match_one_to_one`). A track's ``track_id`` is uuid5 of the ``UID`` of
  its first polygon, so reruns give the same ids.
- **Relations (the ARTS generated fields, UIDs of last year's polygons).** A slump linked to
  two or more tracks lists them in ``MergedRTS`` (the track with the largest overlap continues,
  the others end as "merged"); one of two or more slumps linked to one track lists it in
  ``SplitRTS`` (the largest overlap continues it, the others start tracks); a slump that
  continues its track without growing lists its predecessor in ``StabilizedRTS``; a slump with
  no link whose ground was processed in an earlier year is new, and ``NewRTS`` lists the ended
  tracks' polygons (scars) it intersects; polygons it overlaps below the link rule go to
  ``UnknownRelationship``.
- **Grown vs stable.** ``area_change_m2`` is the area minus the predecessors' area (a split
  track's area shared among its pieces by their overlap). Grown: the change exceeds both
  ``grown_relative`` (10 %) of the previous area and ``grown_absolute_m2`` (500 m2, five 10 m
  pixels, about what half a pixel of boundary noise gives on a 100 m slump); otherwise stable.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from rtsmap.contract import match_one_to_one
from rtsmap.pipeline.errors import RtsmapError

#: Namespace of track ids: ``uuid5(TRACK_NAMESPACE, first UID)``.
TRACK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/rtsmap/rtsmap/track_id")

#: ARTS relation fields filled by :func:`link_years` (UIDs, comma-separated, sorted).
RELATION_FIELDS = ("MergedRTS", "SplitRTS", "NewRTS", "StabilizedRTS", "UnknownRelationship")

#: Values of the per-slump ``change`` column.
CHANGES = ("first_seen", "new", "grown", "stable", "merged", "split")

#: Values of the ``status`` column of the tracks table (in the last year).
STATUSES = ("active", "stabilised", "not_seen", "no_data", "merged")


@dataclass(frozen=True)
class TrackRules:
    """Thresholds of the linking and change rules."""

    link_ios: float = 0.5
    """Least intersection over the smaller polygon for a slump to link to a track."""
    grown_relative: float = 0.10
    """Grown: area change above this share of the previous area (and above the absolute one)."""
    grown_absolute_m2: float = 500.0
    """Grown: area change above this many square metres (and above the relative one)."""
    seen_fraction: float = 0.5
    """A polygon's ground counts as processed in a year when this share of it lies in processed coverage."""


def track_id_of(uid: str) -> str:
    """The track id of a track whose first polygon has ARTS ``UID`` ``uid`` (uuid5)."""
    return str(uuid.uuid5(TRACK_NAMESPACE, str(uid)))


def processed_fraction(geoms: Any, coverage: gpd.GeoDataFrame | None) -> np.ndarray:
    """Share of each polygon's area inside the ``processed`` rows of a coverage layer.

    Parameters
    ----------
    geoms : array-like of shapely geometries
        Polygons in the coverage's CRS.
    coverage : geopandas.GeoDataFrame or None
        A ``coverage_<year>`` layer (``status`` processed / no_data / failed). None: all ground
        was processed (every fraction 1).

    Returns
    -------
    numpy.ndarray
        float ``[N]`` in 0..1. Coverage rows do not overlap (chunk cores tile the AOI), so the
        pieces are summed without a union of the coverage.
    """
    geoms = np.asarray(geoms, dtype=object)
    if coverage is None:
        return np.ones(len(geoms))
    if len(geoms) == 0:
        return np.zeros(0)
    done = coverage[coverage["status"].astype(str) == "processed"]
    cov = np.asarray(done.geometry.values, dtype=object)
    if len(cov) == 0:
        return np.zeros(len(geoms))
    gi, ci = shapely.STRtree(cov).query(geoms, predicate="intersects")
    inter = shapely.area(shapely.intersection(geoms[gi], cov[ci]))
    area = shapely.area(geoms)
    got = np.bincount(gi, weights=inter, minlength=len(geoms))
    return np.clip(np.divide(got, area, out=np.zeros(len(geoms)), where=area > 0), 0.0, 1.0)


def _uids(gdf: gpd.GeoDataFrame) -> np.ndarray:
    if "UID" in gdf.columns:
        return gdf["UID"].astype(str).to_numpy(dtype=object)
    if "rts_id" in gdf.columns:
        from rtsmap.pipeline.inventory import rts_uid

        return np.array([rts_uid(str(r)) for r in gdf["rts_id"]], dtype=object)
    raise RtsmapError("tracks: a year's slumps have neither a UID nor an rts_id column; "
                      "give the merged layers (pipeline.merge) or the inventory's rts_<year> layers")


def _join(values: pd.Series, index: np.ndarray, n: int) -> np.ndarray:
    """Comma-joined sorted unique strings per position ``index`` (0..n-1), '' where none."""
    out = np.full(n, "", dtype=object)
    if len(index):
        joined = pd.Series(np.asarray(values, dtype=object)).groupby(np.asarray(index)).agg(
            lambda v: ",".join(sorted(set(v))))
        out[joined.index.to_numpy()] = joined.to_numpy()
    return out


@dataclass
class _Tracks:
    """Growing lists of every track's state (one entry per track), and each year's areas.

    A track's areas are kept per year as arrays (:class:`_YearAreas`), not as a dict per track:
    a dict and its float objects cost ~500 bytes a track, the arrays 24 bytes a track a year.
    A track's id is not kept: it is ``track_id_of(first_uid)`` (:func:`_track_id`).
    Its first and last polygon are kept as WKB (:func:`_geoms` reads them back, exactly): a
    17-vertex polygon is ~310 bytes of WKB against ~880 as a GEOS object, and between years the
    tracks' polygons are all the client holds of the years before; a new track's first and
    last polygon are one bytes object.
    """

    last_geom: list
    last_uid: list
    last_year: list
    open: list
    end: list  # '' while open or seen; 'merged' / 'not_seen' when ended
    merged_into: list
    split_from: list
    first_year: list
    first_geom: list
    last_change: list
    first_uid: list  # its first slump's UID; the track id is derived from it
    by_year: dict = field(default_factory=dict)  # year -> _YearAreas


@dataclass(frozen=True)
class _YearAreas:
    """The tracks seen in one year and their area and area change that year."""

    tracks: np.ndarray
    """Track positions, ascending (int64)."""
    area: np.ndarray
    """Area of the track's slump that year, m2 (float64)."""
    change: np.ndarray
    """Its area change from the predecessors, m2 (float64; NaN without one)."""

    def at(self, tracks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(area, change) of ``tracks`` (each seen this year)."""
        pos = np.searchsorted(self.tracks, tracks)
        return self.area[pos], self.change[pos]


def _geoms(wkb: list) -> np.ndarray:
    """The polygons of a list of the tracks' WKB (object array; the same coordinates, bit for bit)."""
    return shapely.from_wkb(np.asarray(wkb, dtype=object)) if wkb else np.zeros(0, dtype=object)


#: Tracks whose polygons are read back from WKB at a time (with their intersections: a few
#: tens of MB, where the whole of a pan-Arctic year's tracks would be ~1 GB).
GEOM_ROWS = 50_000


def _overlaps(T: _Tracks, open_idx: np.ndarray, geoms: np.ndarray, area: np.ndarray,
              cov: gpd.GeoDataFrame | None) -> tuple[np.ndarray, ...]:
    """The (open track, slump) pairs that intersect: positions in ``open_idx`` and in ``geoms``,
    intersection area and the smaller of the two areas; and each open track's processed
    fraction in ``cov``. The tracks' last polygons are read back :data:`GEOM_ROWS` at a time:
    one tree query per slice gives the pairs of the whole query, in its order.
    """
    parts = []
    tree = shapely.STRtree(geoms) if len(geoms) else None
    for start in range(0, len(open_idx), GEOM_ROWS):
        last = _geoms([T.last_geom[k] for k in open_idx[start:start + GEOM_ROWS].tolist()])
        frac = processed_fraction(last, cov)
        if tree is None:
            parts.append((np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), frac))
            continue
        ti, ci = tree.query(last, predicate="intersects")
        inter = shapely.area(shapely.intersection(last[ti], geoms[ci]))
        smaller = np.minimum(shapely.area(last[ti]), area[ci])
        parts.append((ti + start, ci, inter, smaller, frac))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
    ti, ci, inter, smaller, frac = (np.concatenate(p) for p in zip(*parts))
    return ti.astype(np.int64), ci.astype(np.int64), inter.astype(np.float64), smaller.astype(np.float64), frac


def _track_id(T: _Tracks, k: int) -> str:
    """Track ``k``'s id (as given when it began: :func:`track_id_of` of its first slump's UID)."""
    return track_id_of(T.first_uid[k])


def _area_in(T: _Tracks, tracks: np.ndarray, years: np.ndarray) -> np.ndarray:
    """Area of each track in the matching year of ``years`` (a year it was seen)."""
    out = np.full(len(tracks), np.nan)
    for year in np.unique(years).tolist():
        here = years == year
        out[here] = T.by_year[year].at(tracks[here])[0]
    return out


def link_years(
    layers: Mapping[int, gpd.GeoDataFrame],
    coverage: Mapping[int, gpd.GeoDataFrame | None] | None = None,
    *,
    rules: TrackRules = TrackRules(),
) -> tuple[dict[int, gpd.GeoDataFrame], pd.DataFrame]:
    """Give each slump its track and fill the ARTS relation fields; build the tracks table.

    Parameters
    ----------
    layers : mapping of int to geopandas.GeoDataFrame
        One year's slumps each (pipeline.merge output, or an inventory's ``rts_<year>`` layer),
        in one projected CRS (the grid CRS), with ``UID`` or ``rts_id``.
    coverage : mapping of int to geopandas.GeoDataFrame, optional
        ``coverage_<year>`` layers (``status`` processed / no_data / failed). A year without one
        counts as processed everywhere; without the mapping every year does.
    rules : TrackRules
        Thresholds (see the module docstring).

    Returns
    -------
    layers : dict of int to geopandas.GeoDataFrame
        Each year's frame (rows in the given order) with ``UID``, ``track_id``, ``change``
        (one of :data:`CHANGES`), ``area_change_m2`` (NaN without a predecessor),
        ``prev_year`` (year of the predecessors; -1 without) and the :data:`RELATION_FIELDS`.
    tracks : pandas.DataFrame
        One row per track, sorted by ``track_id``: ``track_id, first_year, last_year`` (last
        seen), ``years_seen`` (comma-separated), ``n_years``, ``status`` (in the last year, one
        of :data:`STATUSES`), ``merged_into``, ``split_from``, ``first_uid``, ``last_uid``,
        ``area_m2_<year>`` and ``area_change_m2_<year>`` per year (NaN where not seen),
        ``growth_m2_per_yr`` (first to last seen), ``retreat_m`` (Hausdorff distance between the
        first and the last polygon: how far the outline moved at most) and
        ``growth_azimuth_deg`` (grid azimuth, clockwise from grid north, from the first
        polygon's centroid to the centroid of the ground gained; NaN unless the track grew).

    Raises
    ------
    RtsmapError
        A layer lacks UID and rts_id, or the layers' CRSs differ.
    """
    years = sorted(int(y) for y in layers)
    crs = {str(layers[y].crs) for y in years if len(layers[y])}
    if len(crs) > 1:
        raise RtsmapError(f"tracks: the yearly layers are in different CRSs {sorted(crs)}; reproject them to the grid CRS")
    coverage = coverage or {}
    linker = YearLinker(rules)
    out = {year: linker.add(year, layers[year], coverage.get(year)) for year in years}
    return out, linker.table()


class YearLinker:
    """:func:`link_years` a year at a time, for a writer that streams the years.

    It keeps one entry per track (its first and last polygon as WKB, its area per year) and
    the coverage of the years added, never an earlier year's layer or GEOS polygons: :meth:`add` links a year's
    slumps against the open tracks' last polygons and returns the linked frame; :meth:`table`
    gives the tracks table of the years added so far. Adding the years of ``link_years`` in
    ascending order gives exactly its layers and table (``link_years`` is this loop).

    Parameters
    ----------
    rules : TrackRules
        Thresholds (see the module docstring).
    """

    def __init__(self, rules: TrackRules = TrackRules()) -> None:
        self.rules = rules
        self._tracks = _Tracks(*([] for _ in range(11)))
        self._years: list[int] = []
        # Earlier years' coverage: whether a lone slump's ground was looked at before (new vs first seen).
        self._coverage: dict[int, gpd.GeoDataFrame | None] = {}
        self._crs: str | None = None
        #: WKB of the slumps of the year added last, in the returned frame's row order: the
        #: bytes the tracks keep as their last polygons (a writer keeps them, not a copy).
        self.last_wkb: np.ndarray = np.zeros(0, dtype=object)

    @property
    def years(self) -> list[int]:
        """The years added, ascending."""
        return list(self._years)

    def add(self, year: int, layer: gpd.GeoDataFrame, coverage: gpd.GeoDataFrame | None = None) -> gpd.GeoDataFrame:
        """Link one year's slumps to the tracks of the years added before it.

        Parameters
        ----------
        year : int
            The year; later than every year added before.
        layer : geopandas.GeoDataFrame
            Its slumps, as :func:`link_years` takes them.
        coverage : geopandas.GeoDataFrame, optional
            Its ``coverage_<year>`` layer; None: processed everywhere.

        Returns
        -------
        geopandas.GeoDataFrame
            The frame (rows in the given order) with the fields :func:`link_years` adds.

        Raises
        ------
        RtsmapError
            The year is not later than those added, the layer lacks UID and rts_id, or its CRS
            differs from the earlier layers'.
        """
        year = int(year)
        if self._years and year <= self._years[-1]:
            raise RtsmapError(f"tracks: year {year} added after {self._years[-1]}; add the years in ascending order")
        if len(layer):
            if self._crs is not None and str(layer.crs) != self._crs:
                raise RtsmapError(f"tracks: the yearly layers are in different CRSs {sorted({self._crs, str(layer.crs)})}; "
                                  "reproject them to the grid CRS")
            self._crs = str(layer.crs)
        frame, self.last_wkb = self._link(year, layer, coverage)
        self._years.append(year)
        self._coverage[year] = coverage
        return frame

    def table(self) -> pd.DataFrame:
        """The tracks table of the years added so far (see :func:`link_years`)."""
        return _table(self._tracks, self._years, self.rules)

    def _link(self, year: int, layer: gpd.GeoDataFrame, cov: gpd.GeoDataFrame | None) -> tuple[gpd.GeoDataFrame, np.ndarray]:
        """One year of :func:`link_years` (the tracks' state is updated in place), and its slumps' WKB."""
        rules, T = self.rules, self._tracks
        frame = layer.reset_index(drop=True).copy()
        geoms = np.asarray(frame.geometry.values, dtype=object)
        n = len(frame)
        uid = _uids(frame)
        area = shapely.area(geoms) if n else np.zeros(0)

        open_idx = np.array([k for k, o in enumerate(T.open) if o], dtype=np.int64)
        # Pairs (open track, slump) that overlap at all, and whether each open track's ground
        # was processed this year (for those that end).
        ti, ci, inter, smaller, frac = _overlaps(T, open_idx, geoms, area, cov)
        ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        linked = ios >= rules.link_ios
        unknown = (~linked) & (inter > 0)
        lt, lc, li = ti[linked], ci[linked], inter[linked]
        # Continuations: one-to-one, largest shared area first.
        mc, mt, _ = match_one_to_one(lc, lt, li, 0.0)
        cont_of_slump = np.full(n, -1, np.int64)
        cont_of_slump[mc] = open_idx[mt]
        n_pred = np.bincount(lc, minlength=n)
        n_succ = np.bincount(lt, minlength=len(open_idx))

        # Predecessor area, a split track's area shared by overlap among its pieces.
        if len(lt):
            last_area = _area_in(T, open_idx, np.asarray([T.last_year[k] for k in open_idx.tolist()], np.int64))
            succ_total = np.bincount(lt, weights=li, minlength=len(open_idx))
            share = li / succ_total[lt]
            prev_area = np.bincount(lc, weights=last_area[lt] * share, minlength=n)
            prev_year = np.full(n, -1, np.int64)
            np.maximum.at(prev_year, lc, np.asarray([T.last_year[k] for k in open_idx[lt].tolist()], np.int64))
        else:
            prev_area = np.zeros(n)
            prev_year = np.full(n, -1, np.int64)
        has_pred = n_pred > 0
        change_m2 = np.where(has_pred, area - prev_area, np.nan)
        grown = has_pred & (change_m2 > np.maximum(rules.grown_relative * prev_area, rules.grown_absolute_m2))

        last_uid = np.asarray([T.last_uid[k] for k in open_idx.tolist()], dtype=object)
        split_track = n_succ >= 2
        merged_rts = _join(last_uid[lt], lc, n)
        merged_rts[n_pred < 2] = ""
        sl = split_track[lt]
        split_rts = _join(last_uid[lt][sl], lc[sl], n)
        unknown_rts = _join(last_uid[ti[unknown]], ci[unknown], n)

        # Ground seen before: new (processed earlier, nothing linked) vs first seen.
        lone = np.flatnonzero(~has_pred)
        seen_before = np.zeros(n, bool)
        for earlier in self._years:
            if len(lone):
                seen_before[lone] |= processed_fraction(geoms[lone], self._coverage.get(earlier)) >= rules.seen_fraction
        # NewRTS: scars (ended tracks' last polygons) under a new slump.
        new_rts = np.full(n, "", dtype=object)
        ended = np.array([k for k, e in enumerate(T.end) if e == "not_seen"], dtype=np.int64)
        is_new = (~has_pred) & seen_before
        if len(ended) and is_new.any():
            scars = _geoms([T.last_geom[k] for k in ended.tolist()])
            si, ni = shapely.STRtree(scars).query(geoms[is_new], predicate="intersects")
            targets = np.flatnonzero(is_new)[si]
            new_rts = _join(np.asarray([T.last_uid[k] for k in ended[ni].tolist()], dtype=object), targets, n)

        change = np.where(grown, "grown", "stable").astype(object)
        change[~has_pred] = np.where(seen_before[~has_pred], "new", "first_seen")
        child = has_pred & (cont_of_slump < 0)  # a piece of a split that does not continue the track
        cont_split = np.zeros(n, bool)
        if len(mt):
            cont_split[mc] = split_track[mt]
        change[child | cont_split] = "split"
        change[n_pred >= 2] = "merged"
        stabilized_rts = np.full(n, "", dtype=object)
        plain = change == "stable"
        if plain.any():
            stabilized_rts[plain] = [T.last_uid[cont_of_slump[c]] for c in np.flatnonzero(plain).tolist()]

        # Track bookkeeping: continued tracks, tracks that ended, new tracks. Each slump becomes
        # its track's last polygon, kept as WKB (the layer's GEOS objects go with the layer).
        wkb = shapely.to_wkb(geoms) if n else np.zeros(0, dtype=object)
        track_of = np.full(n, "", dtype=object)
        for c, k in zip(mc.tolist(), open_idx[mt].tolist()):
            track_of[c] = _track_id(T, k)
            T.last_geom[k], T.last_uid[k], T.last_year[k] = wkb[c], uid[c], year
            T.last_change[k] = change[c]
        continued = set(open_idx[mt].tolist())
        linked_tracks = set(open_idx[lt].tolist())
        if len(open_idx):
            for pos, k in enumerate(open_idx.tolist()):
                if k in continued:
                    continue
                if k in linked_tracks:  # its slump was continued by another track: merged
                    T.open[k], T.end[k] = False, "merged"
                    into = cont_of_slump[lc[lt == pos]]
                    into = into[into >= 0]
                    T.merged_into[k] = _track_id(T, int(into[0])) if len(into) else ""
                elif frac[pos] >= rules.seen_fraction:
                    T.open[k], T.end[k] = False, "not_seen"
                # else: no data over it this year; the track stays open
        new_track = track_of == ""
        first_new = len(T.first_uid)
        for c in np.flatnonzero(new_track).tolist():
            T.last_geom.append(wkb[c]); T.last_uid.append(uid[c]); T.last_year.append(year)
            T.open.append(True); T.end.append(""); T.merged_into.append("")
            parents = lt[lc == c]
            T.split_from.append(_track_id(T, int(open_idx[parents[0]])) if len(parents) else "")
            T.first_year.append(year); T.first_geom.append(wkb[c])
            T.last_change.append(change[c])
            T.first_uid.append(uid[c])
            track_of[c] = track_id_of(uid[c])

        # This year's areas of the tracks it continued or began (each slump is in one track).
        seen = np.r_[mc, np.flatnonzero(new_track)].astype(np.int64)
        ks = np.r_[open_idx[mt], np.arange(first_new, len(T.first_uid))].astype(np.int64)
        order = np.argsort(ks, kind="stable")
        T.by_year[year] = _YearAreas(ks[order], area[seen][order].astype(np.float64),
                                     change_m2[seen][order].astype(np.float64))

        frame["UID"] = uid
        frame["track_id"] = track_of
        frame["change"] = change
        frame["area_change_m2"] = change_m2
        frame["prev_year"] = prev_year
        for name, values in (("MergedRTS", merged_rts), ("SplitRTS", split_rts), ("NewRTS", new_rts),
                             ("StabilizedRTS", stabilized_rts), ("UnknownRelationship", unknown_rts)):
            frame[name] = np.asarray(values, dtype=object)
        return frame, wkb


def _table(T: _Tracks, years: list[int], rules: TrackRules) -> pd.DataFrame:
    """The tracks table (see :func:`link_years`)."""
    n = len(T.first_uid)
    final = years[-1] if years else None
    status = []
    for k in range(n):
        if T.end[k] == "merged":
            status.append("merged")
        elif T.last_year[k] == final:
            status.append("stabilised" if T.last_change[k] == "stable" else "active")
        elif T.end[k] == "not_seen":
            status.append("not_seen")
        else:
            status.append("no_data")
    # Per track and year: seen, area, area change (NaN where not seen).
    seen = np.zeros((n, len(years)), bool)
    area = np.full((n, len(years)), np.nan)
    change = np.full((n, len(years)), np.nan)
    for j, y in enumerate(years):
        ya = T.by_year[y]
        seen[ya.tracks, j], area[ya.tracks, j], change[ya.tracks, j] = True, ya.area, ya.change
    kinds, kind = np.unique(seen, axis=0, return_inverse=True) if n else (np.zeros((0, len(years)), bool), np.zeros(0, np.int64))
    labels = np.asarray([",".join(str(y) for y, s in zip(years, row) if s) for row in kinds.tolist()] + [""], dtype=object)
    years_seen = labels[np.asarray(kind, np.int64).reshape(-1)].tolist()
    table = pd.DataFrame({
        "track_id": pd.Series([track_id_of(u) for u in T.first_uid], dtype=object),
        "first_year": np.asarray(T.first_year, np.int64),
        "last_year": np.asarray(T.last_year, np.int64),
        "years_seen": years_seen,
        "n_years": seen.sum(axis=1).astype(np.int64),
        "status": pd.Series(status, dtype=object),
        "merged_into": pd.Series(T.merged_into, dtype=object),
        "split_from": pd.Series(T.split_from, dtype=object),
        "first_uid": pd.Series(T.first_uid, dtype=object),
        "last_uid": pd.Series(T.last_uid, dtype=object),
    })
    for y, col in zip(years, area.T):
        table[f"area_m2_{y}"] = col
    for y, col in zip(years, change.T):
        table[f"area_change_m2_{y}"] = col
    span = table["last_year"].to_numpy() - table["first_year"].to_numpy()
    tracks = np.arange(n, dtype=np.int64)
    a_first = _area_in(T, tracks, np.asarray(T.first_year, np.int64))
    a_last = _area_in(T, tracks, np.asarray(T.last_year, np.int64))
    table["growth_m2_per_yr"] = np.divide(a_last - a_first, span, out=np.full(n, np.nan), where=span > 0)
    retreat = np.full(n, np.nan)
    azimuth = np.full(n, np.nan)
    moved = span > 0
    # Direction only where the track grew by the grown rule: a noise ring has no direction.
    grew = moved & ((a_last - a_first) > np.maximum(rules.grown_relative * a_first, rules.grown_absolute_m2))
    # Per track, so a slice of tracks at a time (their polygons read back from WKB).
    for start in np.flatnonzero(moved)[::GEOM_ROWS].tolist():
        rows = np.flatnonzero(moved[start:])[:GEOM_ROWS] + start
        first = _geoms([T.first_geom[k] for k in rows.tolist()])
        last = _geoms([T.last_geom[k] for k in rows.tolist()])
        retreat[rows] = shapely.hausdorff_distance(first, last)
        g = grew[rows]
        if g.any():
            gained = shapely.difference(last[g], first[g])
            ok = ~shapely.is_empty(gained)
            c0 = shapely.centroid(first[g][ok])
            c1 = shapely.centroid(gained[ok])
            dx, dy = shapely.get_x(c1) - shapely.get_x(c0), shapely.get_y(c1) - shapely.get_y(c0)
            azimuth[rows[g][ok]] = np.degrees(np.arctan2(dx, dy)) % 360.0
    table["retreat_m"] = retreat
    table["growth_azimuth_deg"] = azimuth
    return table.sort_values("track_id", kind="mergesort").reset_index(drop=True)
