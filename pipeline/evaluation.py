"""Compare an inventory with true polygons: one-to-one matches by IoU, precision, recall, F1.

Matching is ``rtsmap.contract.match_one_to_one`` (greedy by IoU, highest first; each true slump
is claimed by at most one prediction and vice versa), the same matcher as the F1 of
``rtsmap evaluate`` (models/evaluate.py), over candidate pairs from a ``shapely.STRtree``.

Truth may be an inventory-like GeoPackage (``rts_<year>`` layers) or any file in the ARTS schema
(one layer; the year from a ``year``/``Year`` column, else from ``BaseMapDate``, whose last date
gives the year: ARTS writes a date or a "start,end" range there).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
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
    if len(p) == 0 or len(t) == 0:
        return MatchResult(tp=0, fp=len(p), fn=len(t), mean_iou=0.0)
    tree = shapely.STRtree(t)
    pi, ti = tree.query(p, predicate="intersects")
    inter = shapely.area(shapely.intersection(p[pi], t[ti]))
    union = shapely.area(shapely.union(p[pi], t[ti]))
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    _, _, matched = match_one_to_one(pi, ti, iou, iou_threshold)
    tp = len(matched)
    return MatchResult(tp=tp, fp=len(p) - tp, fn=len(t) - tp, mean_iou=float(np.mean(matched)) if tp else 0.0)


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
