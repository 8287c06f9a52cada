"""Compare an inventory with true polygons: one-to-one matches by IoU, precision, recall, F1.

Matching is ``rtsmap.contract.match_one_to_one`` (greedy by IoU, highest first; each true slump
is claimed by at most one prediction and vice versa), the same matcher as the F1 of
``rtsmap evaluate`` (models/evaluate.py), over candidate pairs from a ``shapely.STRtree``.

:func:`evaluate_tracking` scores change through the years against a truth whose slumps carry an
identity (the demo region's ``slump_id``): whether each true slump keeps one ``track_id``,
identity switches, "new this year", and the error of the area change per slump.

Truth may be an inventory-like GeoPackage (``rts_<year>`` layers) or any file in the ARTS schema
(one layer; the year from a ``year``/``Year`` column, else from ``BaseMapDate``, whose last date
gives the year: ARTS writes a date or a "start,end" range there).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from rtsmap.contract import match_one_to_one
from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.inventory import read_inventory

_RTS_LAYER = re.compile(r"^rts_(\d{4})$")


@dataclass(frozen=True)
class MatchResult:
    """Counts and scores of one comparison (one year)."""

    tp: int
    """Predictions matched one-to-one to a true polygon with IoU >= the threshold."""
    fp: int
    """Predictions left unmatched."""
    fn: int
    """True polygons left unmatched."""
    mean_iou: float
    """Mean IoU of the matched pairs (0 when none)."""

    @property
    def precision(self) -> float:
        """tp / (tp + fp); 1.0 when there are no predictions (no false claims)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """tp / (tp + fn); 1.0 when there is nothing to find."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1, "mean_iou": self.mean_iou}


def match_polygons(pred, truth, *, iou_threshold: float = 0.5) -> MatchResult:
    """Match predicted and true polygons one-to-one by IoU.

    Parameters
    ----------
    pred, truth : sequence of shapely geometries
        In the same projected CRS.
    iou_threshold : float
        Least IoU for a match (a pair at exactly the threshold matches).

    Returns
    -------
    MatchResult
    """
    p = np.asarray(list(pred), dtype=object)
    t = np.asarray(list(truth), dtype=object)
    _, _, matched = matched_pairs(p, t, iou_threshold=iou_threshold)
    tp = len(matched)
    return MatchResult(tp=tp, fp=len(p) - tp, fn=len(t) - tp, mean_iou=float(np.mean(matched)) if tp else 0.0)


def matched_pairs(pred, truth, *, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one matches of :func:`match_polygons`: positions and IoU of each pair.

    Parameters
    ----------
    pred, truth : sequence of shapely geometries
        In the same projected CRS.
    iou_threshold : float
        Least IoU for a match.

    Returns
    -------
    pred, truth : ndarray of int
        Positions of the matched pairs.
    iou : ndarray of float
        Their IoU.
    """
    p = np.asarray(list(pred), dtype=object)
    t = np.asarray(list(truth), dtype=object)
    if len(p) == 0 or len(t) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    pi, ti = shapely.STRtree(t).query(p, predicate="intersects")
    inter = shapely.area(shapely.intersection(p[pi], t[ti]))
    union = shapely.area(shapely.union(p[pi], t[ti]))
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return match_one_to_one(pi, ti, iou, iou_threshold)


def _year_of(value: Any) -> int | None:
    """Year from a year number or an ARTS BaseMapDate ('YYYY-MM-DD' or 'start,end': the last)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    years = re.findall(r"(?<!\d)(\d{4})(?!\d)", str(value))
    return int(years[-1]) if years else None


def _clean(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)].copy()
    gdf["geometry"] = shapely.make_valid(gdf.geometry.values)
    return gdf


def read_truth(path: str | os.PathLike) -> dict[int, gpd.GeoDataFrame]:
    """True polygons per year from an inventory-like GPKG or an ARTS-schema file.

    Parameters
    ----------
    path : path-like
        ``rts_<year>`` layers, or one layer with ``year``/``Year`` or ``BaseMapDate``.

    Returns
    -------
    dict of int to geopandas.GeoDataFrame
        Non-empty, valid geometries per year, in the file's CRS.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or no year can be found for its polygons.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"truth file {path} does not exist")
    try:
        layers = [str(n) for n, _ in pyogrio.list_layers(path)]
    except pyogrio.errors.DataSourceError as exc:
        raise ConfigError(f"truth file {path} is not a vector file GDAL can read ({exc})") from exc
    per_year = {int(m.group(1)): n for n in layers if (m := _RTS_LAYER.match(n))}
    if per_year:
        return {y: _clean(pyogrio.read_dataframe(path, layer=n)) for y, n in sorted(per_year.items())}
    gdf = pyogrio.read_dataframe(path, layer=layers[0])
    column = next((c for c in ("year", "Year", "BaseMapDate") if c in gdf.columns), None)
    if column is None:
        raise ConfigError(f"truth file {path}: no rts_<year> layers and no year, Year or BaseMapDate column; "
                          "add the year of each polygon")
    years = gdf[column].map(_year_of)
    gdf = gdf.assign(_year=years)[years.notna()]
    if gdf.empty:
        raise ConfigError(f"truth file {path}: no polygon has a readable year in column {column!r}")
    return {int(y): _clean(g.drop(columns="_year")) for y, g in sorted(gdf.groupby("_year"))}


def evaluate_inventory(inventory: str | os.PathLike, truth: str | os.PathLike, *,
                       iou_threshold: float = 0.5) -> dict[int, MatchResult]:
    """Per-year precision, recall and F1 of an inventory against true polygons.

    Parameters
    ----------
    inventory : path-like
        A GeoPackage from :func:`pipeline.inventory.write_inventory`.
    truth : path-like
        See :func:`read_truth`.
    iou_threshold : float
        Least IoU for a match.

    Returns
    -------
    dict of int to MatchResult
        For the years both files have, ascending.

    Raises
    ------
    RtsmapError
        A file is missing or unreadable, or the two share no year.
    """
    pred = read_inventory(inventory)
    true = read_truth(truth)
    years = sorted(set(pred) & set(true))
    if not years:
        raise ConfigError(f"inventory {inventory} (years {sorted(pred)}) and truth {truth} (years {sorted(true)}) "
                          "share no year")
    out = {}
    for y in years:
        p, t = pred[y], true[y]
        if t.crs is not None and p.crs is not None and t.crs != p.crs:
            t = t.to_crs(p.crs)
        out[y] = match_polygons(p.geometry.values, t.geometry.values, iou_threshold=iou_threshold)
    return out


def _fraction(num: int, den: int, empty: float = 1.0) -> float:
    return num / den if den else empty


def evaluate_tracking(
    pred: Mapping[int, gpd.GeoDataFrame],
    truth: Mapping[int, gpd.GeoDataFrame],
    *,
    truth_id: str = "slump_id",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Score tracks and change against a truth whose slumps carry an identity.

    Each year, predictions and true slumps are matched one-to-one by IoU
    (:func:`matched_pairs`). Then, over the years both have:

    - ``tracked_whole``: of the true slumps present in two or more years, the share matched in
      every one of them, always to one ``track_id``; ``consistent_when_matched``: of those
      matched in two or more years, the share whose matches carry one ``track_id`` (linking
      alone, detection misses aside);
    - ``id_switches``: times the matched ``track_id`` of a true slump changes from one matched
      year to its next (MOT-style);
    - ``new``: precision and recall of "new this year" (the year a slump id first appears,
      after the first year) against predictions with ``change == "new"``; a predicted new slump
      is right when it matches a true slump new that year;
    - ``area_change``: for true slumps matched in two consecutive years, the error of the
      predicted area change (mean absolute, median absolute, bias, in m2, and the mean absolute
      error over the mean absolute true change) and the share whose grown/stable call agrees
      (``grown``: change > 10 % and > 500 m2, pipeline/tracks.py's rule on both sides).

    Parameters
    ----------
    pred : mapping of int to geopandas.GeoDataFrame
        Yearly slumps with ``track_id`` and ``change`` (pipeline.tracks.link_years output).
    truth : mapping of int to geopandas.GeoDataFrame
        Yearly true slumps with the id column ``truth_id``, in the same CRS or reprojectable.
    truth_id : str
        Column of the true slump identity.
    iou_threshold : float
        Least IoU of a per-year match.

    Returns
    -------
    dict
        Plain JSON-able numbers (see above), with ``years`` and per-year ``new_by_year``.

    Raises
    ------
    ConfigError
        The inputs share no year, or a column is missing.
    """
    from rtsmap.pipeline.tracks import TrackRules

    years = sorted(set(int(y) for y in pred) & set(int(y) for y in truth))
    if not years:
        raise ConfigError(f"tracking evaluation: predictions (years {sorted(pred)}) and truth (years {sorted(truth)}) share no year")
    rules = TrackRules()
    rows = []  # (year, true id, track id, pred change, pred area, true area)
    for y in years:
        p, t = pred[y], truth[y]
        for name, frame, cols in (("predictions", p, ("track_id", "change")), ("truth", t, (truth_id,))):
            missing = [c for c in cols if c not in frame.columns]
            if missing and len(frame):
                raise ConfigError(f"tracking evaluation: {name} of {y} lack column(s) {missing}")
        if len(t) and len(p) and t.crs is not None and p.crs is not None and t.crs != p.crs:
            t = t.to_crs(p.crs)
        pi, ti, _ = matched_pairs(p.geometry.values, t.geometry.values, iou_threshold=iou_threshold)
        for a, b in zip(pi.tolist(), ti.tolist()):
            rows.append((y, str(t[truth_id].iloc[b]), str(p["track_id"].iloc[a]), str(p["change"].iloc[a]),
                         float(shapely.area(p.geometry.iloc[a])), float(shapely.area(t.geometry.iloc[b]))))
    m = pd.DataFrame(rows, columns=["year", "true_id", "track_id", "change", "pred_area", "true_area"])
    present = pd.DataFrame([(y, str(i)) for y in years for i in truth[y][truth_id]] if years else [],
                           columns=["year", "true_id"])
    first_year = present.groupby("true_id")["year"].min()
    n_years = present.groupby("true_id")["year"].nunique()

    multi = n_years[n_years >= 2].index
    whole = consistent = matched_multi = switches = 0
    by_id = {k: g.sort_values("year") for k, g in m.groupby("true_id")} if len(m) else {}
    for true_id in multi:
        g = by_id.get(true_id)
        if g is None:
            continue
        ids = g["track_id"].tolist()
        switches += sum(a != b for a, b in zip(ids, ids[1:]))
        if len(g) >= 2:
            matched_multi += 1
            consistent += len(set(ids)) == 1
        whole += len(g) == n_years[true_id] and len(set(ids)) == 1
    # Switches of slumps seen in one year are impossible; count all slumps with >= 2 matches.

    new_by_year = {}
    tp_new = fp_new = fn_new = 0
    for y in years[1:]:
        true_new = set(first_year[first_year == y].index)
        my = m[m["year"] == y]
        pred_new_total = int((pred[y]["change"] == "new").sum()) if len(pred[y]) else 0
        tp = int(((my["change"] == "new") & my["true_id"].isin(true_new)).sum())
        fp, fn = pred_new_total - tp, len(true_new) - tp
        new_by_year[str(y)] = {"true_new": len(true_new), "predicted_new": pred_new_total, "tp": tp,
                               "precision": _fraction(tp, tp + fp), "recall": _fraction(tp, tp + fn)}
        tp_new, fp_new, fn_new = tp_new + tp, fp_new + fp, fn_new + fn
    precision, recall = _fraction(tp_new, tp_new + fp_new), _fraction(tp_new, tp_new + fn_new)

    errors, true_change, agree = [], [], []
    for g in by_id.values():
        g = g.set_index("year")
        for a, b in zip(years, years[1:]):
            if a in g.index and b in g.index:
                dt, dp = g.at[b, "true_area"] - g.at[a, "true_area"], g.at[b, "pred_area"] - g.at[a, "pred_area"]
                errors.append(dp - dt)
                true_change.append(dt)
                grown_t = dt > max(rules.grown_relative * g.at[a, "true_area"], rules.grown_absolute_m2)
                grown_p = dp > max(rules.grown_relative * g.at[a, "pred_area"], rules.grown_absolute_m2)
                agree.append(grown_t == grown_p)
    err = np.asarray(errors, np.float64)
    mean_true = float(np.mean(np.abs(true_change))) if true_change else 0.0
    return {
        "years": years,
        "iou_threshold": iou_threshold,
        "true_slumps_multi_year": int(len(multi)),
        "tracked_whole": _fraction(whole, len(multi)),
        "consistent_when_matched": _fraction(consistent, matched_multi),
        "id_switches": int(switches),
        "new": {"tp": tp_new, "fp": fp_new, "fn": fn_new, "precision": precision, "recall": recall,
                "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0},
        "new_by_year": new_by_year,
        "area_change": {
            "pairs": int(len(err)),
            "mean_abs_error_m2": float(np.mean(np.abs(err))) if len(err) else 0.0,
            "median_abs_error_m2": float(np.median(np.abs(err))) if len(err) else 0.0,
            "bias_m2": float(np.mean(err)) if len(err) else 0.0,
            "mean_abs_true_change_m2": mean_true,
            "relative_error": float(np.mean(np.abs(err))) / mean_true if len(err) and mean_true else 0.0,
            "grown_call_agreement": float(np.mean(agree)) if agree else 1.0,
        },
    }


def evaluate_change(inventory: str | os.PathLike, truth: str | os.PathLike, *, truth_id: str = "slump_id",
                    iou_threshold: float = 0.5) -> dict[str, Any]:
    """:func:`evaluate_tracking` of an inventory file against a truth file.

    Parameters
    ----------
    inventory : path-like
        A GeoPackage from :func:`pipeline.inventory.write_inventory`. Layers without
        ``track_id`` are linked here (pipeline.tracks.link_years with the file's coverage).
    truth : path-like
        See :func:`read_truth`; its layers need the ``truth_id`` column.
    truth_id, iou_threshold
        As for :func:`evaluate_tracking`.

    Returns
    -------
    dict
        As :func:`evaluate_tracking`.

    Raises
    ------
    ConfigError
        A file is missing or unreadable, the two share no year, or the truth has no ``truth_id``.
    """
    from rtsmap.pipeline.inventory import read_coverage
    from rtsmap.pipeline.tracks import link_years

    pred = read_inventory(inventory)
    true = read_truth(truth)
    if any(truth_id not in t.columns for t in true.values() if len(t)):
        raise ConfigError(f"truth file {truth}: no {truth_id!r} column; change needs the identity of each true slump")
    if any("track_id" not in p.columns or "change" not in p.columns for p in pred.values()):
        pred, _ = link_years(pred, read_coverage(inventory))
    return evaluate_tracking(pred, true, truth_id=truth_id, iou_threshold=iou_threshold)
