"""The GeoPackage inventory: one slump layer and one coverage layer per year, and run metadata.

Layout (docs/contracts.md, "Detections, polygons, fragments, inventory"):

- ``rts_<year>``: one MultiPolygon per slump in the grid CRS, with the rtsmap fields
  (``rts_id, year, score, area_m2, perimeter_m, n_detections, tile_ids, source_items``), the
  change fields (``track_id, change, area_change_m2, prev_year``: pipeline/tracks.py) and the
  ARTS schema fields (Metadata_Format_Summary.csv of the ARTS dataset: ``CentroidLat,
  CentroidLon, RegionName, CreatorLab, BaseMapDate, BaseMapSource, BaseMapResolution,
  TrainClass, LabelType`` required; ``MergedRTS, SplitRTS, NewRTS, StabilizedRTS,
  UnknownRelationship, ContributionDate, UID`` generated; ``BaseMapID, Area, Notes``
  optional), so the layer can go back into ARTS. A processed year with no slump still gets its
  (empty) layer: "no slump here" must never look like "not processed". The ARTS relation
  fields (``MergedRTS``, ...) hold ``UID`` values of earlier years' slumps.
- ``rts_tracks``: a table without geometry, one row per slump track through the years
  (:func:`rtsmap.pipeline.tracks.link_years`: first and last year seen, status, area per year,
  growth rate, retreat). Layers not linked by the caller are linked here, with the coverage, so
  every inventory carries its tracks.
- ``coverage_<year>``: polygons with ``status`` in processed / no_data / failed and a
  ``reason``, so "no slump here" and "no data here" never look alike; where the caller gives
  them, ``chunk_id`` and ``modalities`` (what a processed part was mapped with, ``sar+dem``).
- ``run_metadata``: a table without geometry, one row per key, the value as JSON
  (configuration, model hash and metadata, software version, STAC item ids, times).

The file is written under a temporary name in the target directory (GeoPackage version 1.2,
which every GDAL >= 2.0 and QGIS release opens without a warning) and then renamed: with
``overwrite`` over the target (``os.replace``), without it by a rename that fails if the target
appeared meanwhile (``os.link`` then ``unlink``), so of two runs with one output the first to
finish wins and the other keeps its file elsewhere. :class:`InventoryWriter` writes it a year at
a time (each year linked to the years before, each layer appended in slices of
:data:`WRITE_ROWS` rows), so a run never passes every year's layers at once;
:func:`write_inventory` is that writer over given layers. A crash leaves the old file or the new one,
never a broken one; the temporary files of a killed writer are removed by the next write
(:func:`remove_stale_temporaries`). Strings in ``run_metadata`` pass through
:func:`rtsmap.pipeline.stac.redact_text`, so no URL credential or token is written.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pyproj
import shapely

from rtsmap.pipeline.errors import OutputError
from rtsmap.pipeline.outputs import check_output_file
from rtsmap.pipeline.stac import redact_text

#: GeoPackage version written: 1.2 is read cleanly by every GDAL >= 2.0 (GDAL 3.6 and the QGIS of
#: its generation warn "may only be partially supported" on the 1.4 that newer GDAL writes).
GPKG_VERSION = "1.2"

#: A temporary file of a writer on another host (whose life cannot be checked) is stale after this.
STALE_AFTER_S = 24 * 3600.0

_TMP_SUFFIX = ".tmp.gpkg"
_SQLITE_SIDECARS = ("", "-journal", "-wal", "-shm")

#: Namespace of the inventory UIDs: uuid5(RTSMAP_NAMESPACE, rts_id) is the same on every run.
RTSMAP_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/rtsmap/rtsmap/rts_id")

#: Values of the coverage ``status`` field.
COVERAGE_STATUS = ("processed", "no_data", "failed")

#: Change fields of an ``rts_<year>`` layer (pipeline/tracks.py; empty/NULL where not linked).
TRACK_FIELDS = ("track_id", "change", "area_change_m2", "prev_year")

#: ARTS relation fields (UIDs of earlier slumps, comma-separated; '' where none).
RELATION_FIELDS = ("MergedRTS", "SplitRTS", "NewRTS", "StabilizedRTS", "UnknownRelationship")

#: Fields of an ``rts_<year>`` layer, in order (geometry last).
RTS_FIELDS = (
    "rts_id", "year", "score", "area_m2", "perimeter_m", "n_detections",
    # change through the years
    *TRACK_FIELDS,
    # ARTS, required
    "CentroidLat", "CentroidLon", "RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource",
    "BaseMapResolution", "TrainClass", "LabelType",
    # ARTS, generated
    "MergedRTS", "SplitRTS", "NewRTS", "StabilizedRTS", "UnknownRelationship", "ContributionDate", "UID",
    # ARTS, optional
    "BaseMapID", "Area", "Notes",
    # provenance
    "tile_ids", "source_items",
)

_RTS_LAYER = re.compile(r"^rts_(\d{4})$")
_STRING_FIELDS = {
    "rts_id", "track_id", "change", "RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource", "TrainClass", "LabelType",
    "MergedRTS", "SplitRTS", "NewRTS", "StabilizedRTS", "UnknownRelationship", "ContributionDate",
    "UID", "BaseMapID", "Notes", "tile_ids", "source_items",
}


def rts_uid(rts_id: str) -> str:
    """ARTS ``UID`` of a slump: uuid5 of its stable ``rts_id`` (same id, same UID, every run)."""
    return str(uuid.uuid5(RTSMAP_NAMESPACE, rts_id))


def _arts_defaults(year: int, run_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer ARTS values from the run metadata (a layer's own columns win)."""
    dates = run_metadata.get("base_map_dates") or {}
    date = dates.get(str(year), dates.get(year)) if isinstance(dates, Mapping) else None
    model = run_metadata.get("model") or {}
    notes = f"rtsmap {run_metadata.get('software_version', '')}".strip()
    if isinstance(model, Mapping) and model.get("name"):
        notes += f"; model {model.get('name')} {model.get('version', '')} sha256:{str(model.get('weights_sha256', ''))[:12]}"
    finished = str(run_metadata.get("finished") or dt.date.today().isoformat())[:10]
    return {
        "RegionName": run_metadata.get("region_name", ""),
        "CreatorLab": run_metadata.get("creator_lab", "rtsmap (automated mapping)"),
        # ARTS: a single date, or a range as "start,end".
        "BaseMapDate": date or f"{year}-01-01,{year}-12-31",
        "BaseMapSource": run_metadata.get("base_map_source", "Sentinel-2 L2A; Sentinel-1 RTC; DEM"),
        "BaseMapResolution": float(run_metadata.get("base_map_resolution", 10.0)),
        "TrainClass": "Positive",
        "LabelType": "Polygon",
        "ContributionDate": finished,
        "Notes": notes,
    }


def _text(values: Any, n: int) -> pd.Series:
    """Per-row strings as a column ('' for missing): pandas' ``str`` dtype where it is the
    default (pandas 3: one Arrow buffer, ~10 bytes a row more than the text), else object.

    Object columns of distinct Python strings cost ~60 bytes a row more, a copy each.
    """
    if isinstance(values, pd.Series):
        values = values.array  # by position, whatever the index
    return pd.Series(values, index=pd.RangeIndex(n)).fillna("").astype(str)


def _same(value: str, n: int) -> pd.Series:
    """A column holding ``value`` on every row: one shared string (8 bytes a row), object dtype."""
    column = np.empty(n, dtype=object)
    column[:] = value  # np.full would make a copy of the string for each row
    return pd.Series(column, index=pd.RangeIndex(n), dtype=object)


def _centroids_lonlat(geoms: np.ndarray, crs: Any, rows: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Centroids in the CRS, then in WGS84 (lat, lon), ``rows`` at a time (no whole-layer points)."""
    lat, lon = np.zeros(len(geoms)), np.zeros(len(geoms))
    for start in range(0, len(geoms), rows):
        cen = gpd.GeoSeries(shapely.centroid(geoms[start:start + rows]), crs=crs).to_crs("EPSG:4326")
        lat[start:start + rows], lon[start:start + rows] = cen.y.to_numpy(), cen.x.to_numpy()
    return lat, lon


def _stable_uids(given: pd.Series, rts_id: pd.Series, rows: int = 50_000) -> pd.Series:
    """``given`` where set, else :func:`rts_uid` of ``rts_id``, ``rows`` at a time (few Python strings at once)."""
    parts = []
    for start in range(0, len(rts_id), rows):
        part = zip(given.iloc[start:start + rows].tolist(), rts_id.iloc[start:start + rows].tolist())
        parts.append(pd.Series([u or rts_uid(r) for u, r in part], dtype=object))
    return _text(pd.concat(parts, ignore_index=True) if parts else [], len(rts_id))


def _rts_layer(gdf: gpd.GeoDataFrame, year: int, run_metadata: Mapping[str, Any], crs: Any) -> gpd.GeoDataFrame:
    """An ``rts_<year>`` layer in the inventory schema.

    Memory: geometries are shared with ``gdf`` (promoted to MultiPolygon only as each slice is
    written), per-row strings are single buffers (:func:`_text`), columns holding one value
    for every row share it (:func:`_same`).
    """
    if gdf is None:
        gdf = gpd.GeoDataFrame({"rts_id": []}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise OutputError(f"inventory layer rts_{year}: expected a GeoDataFrame, got {type(gdf).__name__}")
    if "rts_id" not in gdf.columns:
        raise OutputError(f"inventory layer rts_{year}: no rts_id column; merge detections with pipeline.merge first")
    if gdf.crs is None and len(gdf):
        raise OutputError(f"inventory layer rts_{year}: the GeoDataFrame has no CRS")
    if gdf.crs is not None and len(gdf) and gdf.crs != pyproj.CRS.from_user_input(crs):
        g = gdf.to_crs(crs)
    else:  # already in the CRS: no copy of the geometries
        g = gdf.set_crs(crs, allow_override=True)
    rts_id = _text(g["rts_id"], len(g))
    if not rts_id.is_monotonic_increasing:  # merge output is sorted already: no reordered copy
        g = g.iloc[np.argsort(rts_id.to_numpy(dtype=object), kind="stable")]
    g = g.reset_index(drop=True)
    n = len(g)
    cols: dict[str, Any] = {}
    defaults = _arts_defaults(year, run_metadata)
    geoms = g.geometry.values
    area = shapely.area(geoms) if n else np.zeros(0)
    cols["rts_id"] = _text(g["rts_id"], n)
    cols["year"] = np.full(n, int(year), dtype=np.int64)
    cols["score"] = g["score"].astype(np.float64).to_numpy() if "score" in g else np.full(n, np.nan)
    cols["area_m2"] = area
    cols["perimeter_m"] = shapely.length(geoms) if n else np.zeros(0)
    cols["n_detections"] = g["n_detections"].astype(np.int64).to_numpy() if "n_detections" in g else np.ones(n, np.int64)
    tracks = pd.DataFrame(index=range(n))
    _track_columns(tracks, g, year)
    for field in TRACK_FIELDS:
        cols[field] = tracks[field]
    del tracks
    # Centroid in the (equal-area-ish) grid CRS, then to WGS84, as ARTS asks (5 decimals).
    lat, lon = _centroids_lonlat(np.asarray(geoms, dtype=object), crs) if n else (np.zeros(0), np.zeros(0))
    cols["CentroidLat"], cols["CentroidLon"] = np.round(lat, 5), np.round(lon, 5)
    for field in ("RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource", "BaseMapResolution",
                  "TrainClass", "LabelType", "ContributionDate", "Notes"):
        if field in g:
            cols[field] = g[field].to_numpy()
        elif field == "BaseMapResolution":
            cols[field] = np.full(n, defaults[field], dtype=np.float64)
        else:
            cols[field] = _same(defaults[field], n)
    for field in RELATION_FIELDS:
        cols[field] = _text(g[field], n) if field in g else _same("", n)
    # A frame's own UID wins (its relation fields name UIDs); else the stable one of its rts_id.
    given = _text(g["UID"], n) if "UID" in g else _same("", n)
    cols["UID"] = _stable_uids(given, cols["rts_id"])
    del given
    items = _text(g["source_items"], n) if "source_items" in g else _same("", n)
    # ARTS: BaseMapID only for a single image.
    cols["BaseMapID"] = items.where(~items.str.contains(",", regex=False), "") if n else _same("", 0)
    cols["Area"] = area
    cols["tile_ids"] = _text(g["tile_ids"], n) if "tile_ids" in g else _same("", n)
    cols["source_items"] = items
    for field in _STRING_FIELDS:
        if isinstance(cols[field], np.ndarray):  # given by the frame: kept as the frame typed it, as text
            cols[field] = _text(cols[field], n)
    cols["BaseMapResolution"] = np.asarray(cols["BaseMapResolution"], dtype=np.float64)
    out = pd.DataFrame({f: cols.pop(f) for f in RTS_FIELDS}, index=pd.RangeIndex(n))
    # Polygons stay Polygons here (no second copy of every geometry): the writer promotes them
    # to MultiPolygon as it writes each slice (promote_to_multi).
    return gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


def _track_columns(out: pd.DataFrame, g: gpd.GeoDataFrame, year: int) -> None:
    """Fill the :data:`TRACK_FIELDS` of ``out`` from ``g`` (link_years output), '' / NULL where absent."""
    from rtsmap.pipeline.tracks import CHANGES

    n = len(g)
    out["track_id"] = _text(g["track_id"], n).array if "track_id" in g else _same("", n).array
    change = _text(g["change"], n).array if "change" in g else _same("", n).array
    bad = sorted(set(pd.unique(change)) - set(CHANGES) - {""})
    if bad:
        raise OutputError(f"inventory layer rts_{year}: unknown change value(s) {bad}; use one of {list(CHANGES)}")
    out["change"] = change
    out["area_change_m2"] = (pd.to_numeric(g["area_change_m2"], errors="coerce").astype(np.float64).to_numpy()
                             if "area_change_m2" in g else np.full(n, np.nan))
    # link_years writes -1 for "no predecessor"; the file says NULL, which no reader takes for a year.
    prev = pd.to_numeric(g["prev_year"], errors="coerce").to_numpy(np.float64) if "prev_year" in g else np.full(n, np.nan)
    out["prev_year"] = pd.array(np.where(prev > 0, prev, np.nan), dtype="Int64")


def _coverage_layer(gdf: gpd.GeoDataFrame, year: int, crs: Any) -> gpd.GeoDataFrame:
    if not isinstance(gdf, gpd.GeoDataFrame) or "status" not in gdf.columns:
        raise OutputError(f"inventory layer coverage_{year}: expected a GeoDataFrame with a 'status' column")
    bad = sorted(set(gdf["status"].astype(str)) - set(COVERAGE_STATUS))
    if bad:
        raise OutputError(f"inventory layer coverage_{year}: unknown status {bad}; use one of {list(COVERAGE_STATUS)}")
    g = gdf.to_crs(crs) if (gdf.crs is not None and len(gdf)) else gdf.set_crs(crs, allow_override=True)
    out = pd.DataFrame({
        "status": g["status"].astype(str).to_numpy(dtype=object),
        "reason": (g["reason"].fillna("").astype(str) if "reason" in g else pd.Series([""] * len(g))).to_numpy(dtype=object),
    })
    # Optional columns: the chunk, and the modalities a processed part was mapped with
    # ("optical+sar+dem", "sar+dem"; empty on rows without one).
    for extra in ("chunk_id", "modalities"):
        if extra in g:
            out[extra] = g[extra].fillna("").astype(str).to_numpy(dtype=object)
    multi = [shapely.MultiPolygon([p]) if p.geom_type == "Polygon" else p for p in g.geometry.values]
    return gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(multi, crs=crs), crs=crs)


def _with_link(frame: gpd.GeoDataFrame, linked: gpd.GeoDataFrame, year: int) -> gpd.GeoDataFrame:
    """An ``rts_<year>`` layer with the change and relation fields of its linked frame (same rows)."""
    fields = pd.DataFrame(index=frame.index)
    _track_columns(fields, linked, year)
    frame = frame.copy()
    for field in TRACK_FIELDS:
        frame[field] = fields[field].to_numpy()
    for field in RELATION_FIELDS:
        frame[field] = linked[field].fillna("").astype(str).to_numpy(dtype=object)
    return frame


def _with_tracks(
    rts: dict[int, gpd.GeoDataFrame],
    coverage: Mapping[int, gpd.GeoDataFrame],
    tracks: pd.DataFrame | None,
) -> tuple[dict[int, gpd.GeoDataFrame], pd.DataFrame]:
    """The layers with their change fields and the ``rts_tracks`` table (linked here when not given)."""
    if tracks is None:
        from rtsmap.pipeline.tracks import link_years

        linked, table = link_years(rts, coverage)
        return {year: _with_link(frame, linked[year], year) for year, frame in rts.items()}, table
    if not isinstance(tracks, pd.DataFrame) or "track_id" not in tracks.columns:
        raise OutputError("inventory table rts_tracks: expected a DataFrame with a track_id column "
                          "(the second value link_years returns)")
    table = pd.DataFrame(tracks.drop(columns=[c for c in tracks.columns if c == "geometry"]))
    known = set(table["track_id"].astype(str))
    if len(known) != len(table):
        raise OutputError("inventory table rts_tracks: track_id values repeat; give link_years' table unchanged")
    for year, frame in rts.items():
        ids = set(frame["track_id"].astype(str))
        if "" in ids:
            raise OutputError(f"inventory layer rts_{year}: slumps without track_id, but a tracks table was "
                              "given; pass the layers that link_years returned with it, or no tracks to link here")
        unknown = sorted(ids - known)
        if unknown:
            raise OutputError(f"inventory layer rts_{year}: track_id {unknown[0]} is not in the tracks table "
                              f"({len(unknown)} such); the layers and the table come from different linkings")
    return rts, table.reset_index(drop=True)


#: Keys whose string values are secrets whatever they look like (HTTP headers, tokens, passwords).
_SECRET_KEY = re.compile(r"(api|access|secret|private|subscription|auth|sas)[-_]?key|^key$|token|secret|passw"
                         r"|authori[sz]ation|signature|credential|cookie|^sig$", re.IGNORECASE)


def redact_metadata(value: Any) -> Any:
    """A copy of JSON-able metadata with credentials removed from every string (keys too).

    The string value of a key that names a secret (``api_key``, ``*token*``, ``*secret*``,
    ``*password*``, ``authorization``, ``signature``, ``*credential*``, ``cookie``) is replaced by
    ``<redacted>`` whole: header values carry no recognisable shape.

    Parameters
    ----------
    value
        Nested mappings, lists and scalars (anything else is turned into its string first).

    Returns
    -------
    Any
        The same structure; URLs lose user:password, query strings and fragments, and stray
        SAS token fields are replaced (:func:`rtsmap.pipeline.stac.redact_text`).
    """
    if isinstance(value, Mapping):
        return {redact_text(str(k)): "<redacted>" if (_SECRET_KEY.search(str(k)) and isinstance(v, str) and v)
                else redact_metadata(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact_metadata(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return redact_text(str(value))


def _metadata_table(run_metadata: Mapping[str, Any]) -> pd.DataFrame:
    clean = redact_metadata(run_metadata)
    keys = sorted(clean)
    values = [json.dumps(clean[k], sort_keys=True, default=str) for k in keys]
    return pd.DataFrame({"key": pd.Series(keys, dtype=object), "value": pd.Series(values, dtype=object)})


def write_inventory(
    path: str | os.PathLike,
    layers: Mapping[int, gpd.GeoDataFrame],
    coverage: Mapping[int, gpd.GeoDataFrame],
    run_metadata: Mapping[str, Any],
    *,
    crs: Any = "EPSG:3413",
    overwrite: bool = False,
    keep_dir: str | os.PathLike | None = None,
    tracks: pd.DataFrame | None = None,
) -> Path:
    """Write the inventory GeoPackage atomically, slumps linked into tracks across the years.

    Parameters
    ----------
    path : path-like
        Target ``.gpkg``.
    layers : mapping of int to geopandas.GeoDataFrame
        Slumps per year: pipeline.merge output (``rts_id``, ``score``, geometry, ...), or that
        after :func:`rtsmap.pipeline.tracks.link_years` (with ``track_id``, ``change``,
        ``area_change_m2``, ``prev_year`` and the ARTS relation fields, written as given). A
        year present in ``coverage`` but not here (or with no rows) gets an empty layer.
    coverage : mapping of int to geopandas.GeoDataFrame
        Per year, polygons with ``status`` (processed / no_data / failed) and ``reason``.
    run_metadata : mapping
        JSON-able run facts: ``config``, ``model`` (name, version, weights_sha256, ...),
        ``software_version``, ``stac_items``, ``started``, ``finished``; optional ARTS values
        ``region_name``, ``creator_lab``, ``base_map_source``, ``base_map_resolution``,
        ``base_map_dates`` ({year: "YYYY-MM-DD,YYYY-MM-DD"}). Credentials in its strings are
        removed before writing (:func:`redact_metadata`).
    crs : str or pyproj.CRS
        CRS of the layers (inputs are reprojected to it).
    overwrite : bool
        Replace an existing file. Without it the target is checked twice: before writing, and
        again by the rename itself (a file that appeared meanwhile, e.g. from a second run with
        the same output, is never replaced).
    keep_dir : path-like, optional
        Where the finished file goes when the target appeared while it was written (e.g. the
        run's work directory); without it the finished file is deleted.
    tracks : pandas.DataFrame, optional
        The tracks table ``link_years`` returned with ``layers``, written as ``rts_tracks``.
        Without it the layers are linked here (``link_years`` with ``coverage``; the change
        fields the layers carry are replaced), so every inventory has its tracks.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputError
        The file exists and ``overwrite`` is False (before or at the final rename; the message
        says where the finished file was kept), the directory is missing or not writable, a
        layer does not follow the schema, or GDAL fails to write (disk full, ...). The previous
        file, if any, is left as it was; or ``tracks`` does not belong to ``layers`` (a slump
        without ``track_id``, or a ``track_id`` missing from the table).
    """
    path = Path(path)
    check_output_file(path, suffix=".gpkg", overwrite=overwrite, what="inventory")
    coverage = {int(k): v for k, v in coverage.items()}
    years = sorted({int(y) for y in layers} | set(coverage))
    with InventoryWriter(path, run_metadata, crs=crs, overwrite=overwrite, keep_dir=keep_dir) as writer:
        if tracks is None:
            # Linked here, a year at a time, as the writer does for a run.
            for y in years:
                writer.add_year(y, layers.get(y, layers.get(str(y))), coverage.get(y))
            return writer.close()
        rts = {y: _rts_layer(layers.get(y, layers.get(str(y))), y, run_metadata, crs) for y in years}
        cov = {y: _coverage_layer(v, y, crs) for y, v in sorted(coverage.items())}
        rts, table = _with_tracks(rts, cov, tracks)
        for y in years:
            writer.append(f"rts_{y}", rts[y][list(RTS_FIELDS) + ["geometry"]])
            if y in cov:
                writer.append(f"coverage_{y}", cov[y])
        return writer.close(tracks=table)


#: Rows a single write call takes: a layer is appended in slices of this many rows, so the
#: copies GDAL's writer makes (WKB, column arrays) stay this size whatever the year holds.
WRITE_ROWS = 20_000


class InventoryWriter:
    """The inventory GeoPackage written a year at a time, each layer appended in slices.

    Opens a temporary GeoPackage beside ``path`` (named as :func:`remove_stale_temporaries`
    expects); :meth:`add_year` puts a year's slumps into the inventory schema, links them to the
    tracks of the years added before (:class:`rtsmap.pipeline.tracks.YearLinker`), appends
    ``rts_<year>`` and ``coverage_<year>`` in slices of ``rows_per_write`` rows, and returns the
    linked layer (what :func:`read_inventory` would read back); :meth:`close` writes
    ``rts_tracks`` and ``run_metadata`` and moves the file into place by the rules of
    :func:`write_inventory` (``overwrite``, ``keep_dir``). Used as a context manager, an
    exception (or leaving without :meth:`close`) removes the temporary file.

    What it holds between years: the linker's state (one entry per track: first and last
    polygon as WKB, area per year) and the coverage of the years added, never an earlier year's layer.

    Parameters
    ----------
    path : path-like
        Target ``.gpkg``; checked here (an existing one needs ``overwrite``).
    run_metadata : mapping
        The run facts the ARTS fields are filled from (``region_name``, ``model``,
        ``software_version``, ``finished``, ``base_map_dates``, ...; see :func:`write_inventory`),
        and the ``run_metadata`` table unless :meth:`close` is given a newer one.
    crs : str or pyproj.CRS
        CRS of the layers (inputs are reprojected to it).
    overwrite : bool
        Replace an existing file (at the final rename too).
    keep_dir : path-like, optional
        Where the finished file goes when the target appeared while it was written.
    rows_per_write : int
        Rows per write call (:data:`WRITE_ROWS`).

    Raises
    ------
    OutputError
        The target exists (without ``overwrite``), or its folder is missing or not writable.
    """

    def __init__(self, path: str | os.PathLike, run_metadata: Mapping[str, Any], *, crs: Any = "EPSG:3413",
                 overwrite: bool = False, keep_dir: str | os.PathLike | None = None,
                 rows_per_write: int = WRITE_ROWS) -> None:
        from rtsmap.pipeline.tracks import YearLinker

        self.path = Path(path)
        check_output_file(self.path, suffix=".gpkg", overwrite=overwrite, what="inventory")
        if rows_per_write < 1:
            raise ValueError(f"rows_per_write must be at least 1, got {rows_per_write}")
        self.run_metadata = dict(run_metadata)
        self.crs, self.overwrite, self.keep_dir, self.rows = crs, overwrite, keep_dir, int(rows_per_write)
        self.linker = YearLinker()
        self.layers: list[str] = []
        remove_stale_temporaries(self.path)
        self.tmp = self.path.parent / f".{self.path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        self._done = False

    def __enter__(self) -> "InventoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    def add_year(self, year: int, layer: gpd.GeoDataFrame | None, coverage: gpd.GeoDataFrame | None = None, *,
                 base_map_date: str | None = None) -> gpd.GeoDataFrame:
        """Link one year to the years added before and append its layers.

        Parameters
        ----------
        year : int
            The year; later than every year added before.
        layer : geopandas.GeoDataFrame or None
            Its merged slumps (``pipeline.merge`` output); None or no rows: an empty layer.
        coverage : geopandas.GeoDataFrame, optional
            Its coverage (``status``, ``reason``, ...); None: no ``coverage_<year>`` layer, and
            the year counts as processed everywhere for the tracks.
        base_map_date : str, optional
            ARTS ``BaseMapDate`` of the year (else ``run_metadata['base_map_dates']``, else the
            whole year).

        Returns
        -------
        geopandas.GeoDataFrame
            The ``rts_<year>`` layer as written (inventory schema, linked).

        Raises
        ------
        OutputError
            A layer does not follow the schema, or GDAL fails to write.
        RtsmapError
            The year is not later than those added.
        """
        year = int(year)
        meta = self.run_metadata
        if base_map_date:
            meta = {**meta, "base_map_dates": {str(year): base_map_date}}
        rts = _rts_layer(layer, year, meta, self.crs)
        cov = None if coverage is None else _coverage_layer(coverage, year, self.crs)
        # The linker gets only what it reads (UID, geometry): no copy of the ~30 other columns.
        linked = self.linker.add(year, rts[["UID", "geometry"]], cov)
        fields = pd.DataFrame(index=rts.index)
        _track_columns(fields, linked, year)
        for field in TRACK_FIELDS:
            # Text stays one buffer; numbers as before (prev_year: REAL in the file, NULL where none).
            rts[field] = fields[field].array if field in _STRING_FIELDS else fields[field].to_numpy()
        for field in RELATION_FIELDS:
            rts[field] = _text(linked[field], len(rts)).array
        del linked, fields
        self.append(f"rts_{year}", rts)
        if cov is not None:
            self.append(f"coverage_{year}", cov)
        return rts

    def append(self, name: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` as layer ``name`` (new, or appended to), ``rows_per_write`` rows a call.

        A GeoDataFrame becomes a MultiPolygon layer, a DataFrame a table without geometry
        (``gpkg_contents`` data type ``attributes``). The caller gives frames in the layer's
        schema; an empty frame creates the layer.

        Raises
        ------
        OutputError
            GDAL fails to write (disk full, permissions, ...).
        """
        spatial = isinstance(frame, gpd.GeoDataFrame)
        options = {"geometry_type": "MultiPolygon", "promote_to_multi": True} if spatial else {}
        try:
            for start in range(0, max(len(frame), 1), self.rows):
                new_file = not self.layers
                pyogrio.write_dataframe(frame.iloc[start:start + self.rows], self.tmp, layer=name, driver="GPKG",
                                        append=name in self.layers,
                                        dataset_options={"VERSION": GPKG_VERSION} if new_file else None, **options)
                if name not in self.layers:
                    self.layers.append(name)
        except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError,
                pyogrio.errors.FieldError, pyogrio.errors.GeometryError, pyogrio.errors.FeatureError) as exc:
            raise OutputError(f"inventory {self.path}: cannot write ({_first_line(exc)}); "
                              "check the free disk space and permissions") from None

    def close(self, run_metadata: Mapping[str, Any] | None = None, *, tracks: pd.DataFrame | None = None) -> Path:
        """Write ``rts_tracks`` and ``run_metadata`` and move the file into place.

        Parameters
        ----------
        run_metadata : mapping, optional
            The ``run_metadata`` table (credentials removed); default: the constructor's.
        tracks : pandas.DataFrame, optional
            The tracks table to write; default: the linker's (the years added).

        Returns
        -------
        pathlib.Path
            The written path.

        Raises
        ------
        OutputError
            GDAL fails to write, or the target appeared meanwhile (without ``overwrite``; the
            file is then kept in ``keep_dir``).
        """
        try:
            self.append("rts_tracks", self.linker.table() if tracks is None else tracks)
            self.append("run_metadata", _metadata_table(self.run_metadata if run_metadata is None else run_metadata))
            _rename(self.tmp, self.path, overwrite=self.overwrite, keep_dir=self.keep_dir)
            return self.path
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary file (what :meth:`close` moved into place is not touched)."""
        self._done = True
        for suffix in _SQLITE_SIDECARS:
            Path(f"{self.tmp}{suffix}").unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _host() -> str:
    # In the temporary name, so that a later run on the same host can tell a dead writer's file.
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _rename(tmp: Path, path: Path, *, overwrite: bool, keep_dir: str | os.PathLike | None) -> None:
    """Move the finished file to ``path``; without overwrite, never over a file that exists."""
    try:
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            # A hard link fails with FileExistsError if the target exists: a rename that never replaces.
            os.link(tmp, path)
        except FileExistsError:
            raise _conflict(tmp, path, keep_dir) from None
        except OSError:
            # A file system without hard links (some network and FAT mounts): check, then rename;
            # the gap between the two is small but not zero.
            if path.exists():
                raise _conflict(tmp, path, keep_dir) from None
            os.replace(tmp, path)
            return
        tmp.unlink()
    except OSError as exc:
        raise OutputError(f"inventory {path}: cannot move the finished file into place "
                          f"({exc.strerror or exc}); check the disk and permissions") from None


def _conflict(tmp: Path, path: Path, keep_dir: str | os.PathLike | None) -> OutputError:
    """The error for a target that appeared while writing; keeps the finished file in keep_dir."""
    message = (f"inventory {path} appeared while this run was writing (another run with the same "
               "output?); it was not replaced")
    if keep_dir is None:
        return OutputError(message + "; rerun with --overwrite or another --out")
    kept = Path(keep_dir) / path.name
    try:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(kept))
    except OSError as exc:
        return OutputError(message + f"; this run's file could not be kept in {keep_dir} ({exc.strerror or exc})")
    return OutputError(message + f"; this run's inventory is kept as {kept}")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it.

    A writer names its temporary file ``.<name>.<host>.<pid>.<random>.tmp.gpkg`` (SQLite adds
    ``-journal``, ``-wal``, ``-shm``). One is stale when its writer is a process of this host
    that no longer runs, or, for another host (a shared file system), when it has not changed for
    :data:`STALE_AFTER_S`. A live writer's files are left alone.

    Parameters
    ----------
    path : path-like
        The inventory path (the file itself need not exist).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        return []
    host = _host()
    prefix = f".{path.name}."
    removed = []
    for candidate in directory.iterdir():
        name = candidate.name
        if not name.startswith(prefix):
            continue
        stem = next((name[: -len(s)] if s else name for s in _SQLITE_SIDECARS[::-1]
                     if name.endswith(_TMP_SUFFIX + s)), None)
        if stem is None:
            continue
        fields = stem[len(prefix): -len(_TMP_SUFFIX)].split(".")
        if not _writer_dead(fields, host, candidate):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
        except OSError:
            continue  # not ours to remove (permissions): leave it
    return removed


def _writer_dead(fields: list[str], host: str, candidate: Path) -> bool:
    """Whether the writer of a temporary file is gone: by its pid on this host, else by age."""
    if len(fields) == 3:
        writer_host, pid = fields[0], fields[1]
    elif len(fields) == 2:  # files of older versions: <pid>.<random>, host unknown
        writer_host, pid = None, fields[0]
    else:
        return False
    if writer_host == host and pid.isdigit():
        return not _pid_alive(int(pid))
    try:
        return time.time() - candidate.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _open_layers(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"inventory {path} does not exist")
    try:
        return [str(name) for name, _ in pyogrio.list_layers(path)]
    except pyogrio.errors.DataSourceError as exc:
        raise OutputError(f"inventory {path} is not a readable GeoPackage ({exc})") from exc


def read_inventory(path: str | os.PathLike) -> dict[int, gpd.GeoDataFrame]:
    """The slump layers of an inventory.

    Parameters
    ----------
    path : path-like
        An inventory written by :func:`write_inventory`.

    Returns
    -------
    dict of int to geopandas.GeoDataFrame
        ``{year: rts_<year> layer}``, years ascending (empty layers included).

    Raises
    ------
    OutputError
        The file is missing or not a GeoPackage.
    """
    out = {}
    for name in sorted(_open_layers(path)):
        match = _RTS_LAYER.match(name)
        if match:
            out[int(match.group(1))] = pyogrio.read_dataframe(path, layer=name)
    return out


def read_coverage(path: str | os.PathLike) -> dict[int, gpd.GeoDataFrame]:
    """The ``coverage_<year>`` layers of an inventory, ``{year: layer}``."""
    return {int(n.split("_")[1]): pyogrio.read_dataframe(path, layer=n)
            for n in sorted(_open_layers(path)) if re.match(r"^coverage_\d{4}$", n)}


def read_tracks(path: str | os.PathLike) -> pd.DataFrame:
    """The ``rts_tracks`` table of an inventory (one row per track; see :func:`write_inventory`).

    Raises
    ------
    OutputError
        The file is missing, not a GeoPackage, or has no ``rts_tracks`` table (written before
        tracks existed: link it with :func:`rtsmap.pipeline.tracks.link_years`).
    """
    if "rts_tracks" not in _open_layers(path):
        raise OutputError(f"inventory {path} has no rts_tracks table (written before tracks existed)")
    return pyogrio.read_dataframe(path, layer="rts_tracks", read_geometry=False)


def read_run_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``run_metadata`` table of an inventory as a dict (values decoded from JSON)."""
    if "run_metadata" not in _open_layers(path):
        raise OutputError(f"inventory {path} has no run_metadata table")
    table = pyogrio.read_dataframe(path, layer="run_metadata", read_geometry=False)
    return {k: json.loads(v) for k, v in zip(table["key"], table["value"])}


def check_geopackage(path: str | os.PathLike) -> list[str]:
    """Problems found in a GeoPackage's core tables (an empty list means none).

    A light stand-in for GDAL's validate_gpkg.py (not shipped with the pyogrio wheels): the
    application id is 'GPKG', the three required tables exist, every table in gpkg_contents
    exists, every feature table has a geometry column entry whose SRS is defined.
    """
    problems = []
    with sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True) as con:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        if app_id != 0x47504B47:
            problems.append(f"application_id is {app_id:#x}, not 'GPKG'")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        for required in ("gpkg_contents", "gpkg_geometry_columns", "gpkg_spatial_ref_sys"):
            if required not in tables:
                problems.append(f"missing table {required}")
        if problems:
            return problems
        srs = {r[0] for r in con.execute("SELECT srs_id FROM gpkg_spatial_ref_sys")}
        geometry_tables = {r[0]: r[1] for r in con.execute("SELECT table_name, srs_id FROM gpkg_geometry_columns")}
        for name, kind, srs_id in con.execute("SELECT table_name, data_type, srs_id FROM gpkg_contents"):
            if name not in tables:
                problems.append(f"gpkg_contents lists {name}, which does not exist")
            if kind == "features":
                if name not in geometry_tables:
                    problems.append(f"feature table {name} has no gpkg_geometry_columns entry")
                elif geometry_tables[name] not in srs:
                    problems.append(f"feature table {name} uses undefined srs_id {geometry_tables[name]}")
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"sqlite integrity_check: {integrity}")
    return problems


# --- change between consecutive years (the run summary and the change quick-looks) -------------

#: Classes a slump falls in between two consecutive years, as the change quick-look draws them.
CHANGE_CLASSES = ("new", "first_seen", "grown", "unchanged", "no_longer_seen")


def change_classes(frame: gpd.GeoDataFrame) -> np.ndarray:
    """Each slump of a linked year as :data:`CHANGE_CLASSES` shows it (no ``no_longer_seen`` here).

    ``new``, ``first_seen`` and ``grown`` as ``change`` says; ``stable`` is ``unchanged``; a
    merged or split slump is ``grown`` when its ``area_change_m2`` passes the grown rule of
    :class:`rtsmap.pipeline.tracks.TrackRules` (the merge or split itself is in ``change``),
    else ``unchanged``. A slump without ``change`` (not linked) gives ''.

    Parameters
    ----------
    frame : geopandas.GeoDataFrame
        An ``rts_<year>`` layer, or a frame from ``link_years``.

    Returns
    -------
    numpy.ndarray
        One string per row.
    """
    from rtsmap.pipeline.tracks import TrackRules

    n = len(frame)
    if "change" not in frame.columns:
        return np.full(n, "", dtype=object)
    change = frame["change"].fillna("").astype(str).to_numpy(dtype=object)
    out = np.full(n, "", dtype=object)
    for value in ("new", "first_seen", "grown"):
        out[change == value] = value
    out[change == "stable"] = "unchanged"
    other = np.isin(change, ["merged", "split"])
    if other.any():
        rules = TrackRules()
        delta = pd.to_numeric(frame["area_change_m2"], errors="coerce").to_numpy(np.float64) if "area_change_m2" in frame else np.full(n, np.nan)
        before = shapely.area(np.asarray(frame.geometry.values, dtype=object)) - delta
        grown = delta > np.maximum(rules.grown_relative * before, rules.grown_absolute_m2)
        out[other] = np.where(grown[other], "grown", "unchanged")
    return out


def not_continued(previous: pd.DataFrame, current: pd.DataFrame) -> np.ndarray:
    """Which slumps of a year no slump of the next year continues (by track) or names as merged.

    The part of :func:`no_longer_seen` that needs no geometry: only these rows can be no
    longer seen, so a caller can keep the year before without its polygons and read back
    those of these rows alone.

    Parameters
    ----------
    previous, current : pandas.DataFrame
        Linked layers (or their ``UID``, ``track_id`` and ``MergedRTS`` columns) of two
        consecutive years.

    Returns
    -------
    numpy.ndarray
        bool, one per row of ``previous`` (all False without a ``track_id`` column).
    """
    if len(previous) == 0 or "track_id" not in previous.columns:
        return np.zeros(len(previous), bool)
    kept = set(current["track_id"].astype(str)) if "track_id" in current.columns else set()
    merged = set()
    if "MergedRTS" in current.columns:
        for value in current["MergedRTS"].fillna("").astype(str):
            merged.update(v for v in value.split(",") if v)
    uid = previous["UID"].astype(str) if "UID" in previous.columns else pd.Series([""] * len(previous))
    return ~previous["track_id"].astype(str).isin(kept).to_numpy() & ~uid.isin(merged).to_numpy()


def no_longer_seen(previous: gpd.GeoDataFrame, current: gpd.GeoDataFrame,
                   current_coverage: gpd.GeoDataFrame | None = None) -> np.ndarray:
    """Which slumps of a year are gone the next year: ground processed, track not continued.

    A slump of ``previous`` is no longer seen when no slump of ``current`` carries its
    ``track_id``, none lists its ``UID`` in ``MergedRTS`` (merged into a neighbour is not gone),
    and at least half of it lies in ground ``current_coverage`` marks processed (no data is not
    "not there").

    Parameters
    ----------
    previous, current : geopandas.GeoDataFrame
        Linked layers of two consecutive years (``track_id``, ``UID``, ``MergedRTS``).
    current_coverage : geopandas.GeoDataFrame, optional
        The later year's coverage; None: processed everywhere.

    Returns
    -------
    numpy.ndarray
        bool, one per row of ``previous``.
    """
    from rtsmap.pipeline.tracks import TrackRules, processed_fraction

    gone = not_continued(previous, current)
    if gone.any():
        geoms = np.asarray(previous.geometry.values, dtype=object)[gone]
        seen = processed_fraction(geoms, current_coverage) >= TrackRules().seen_fraction
        gone[np.flatnonzero(gone)[~seen]] = False
    return gone


def change_summary(
    layers: Mapping[int, gpd.GeoDataFrame],
    coverage: Mapping[int, gpd.GeoDataFrame] | None = None,
) -> dict[int, dict[str, Any]]:
    """Per year after the first: how many slumps are new, grown, stable, ... and the area change.

    Parameters
    ----------
    layers : mapping of int to geopandas.GeoDataFrame
        Linked layers (``link_years`` output, or an inventory's ``rts_<year>`` layers).
    coverage : mapping of int to geopandas.GeoDataFrame, optional
        Coverage per year, for ``no_longer_seen`` (without it: processed everywhere).

    Returns
    -------
    dict of int to dict
        For each year but the first, ascending: ``slumps``, the count of each ``change`` value
        (``new, first_seen, grown, stable, merged, split``), ``no_longer_seen`` (slumps of the
        year before that are gone, :func:`no_longer_seen`) and ``area_change_m2`` (sum of
        ``area_change_m2`` of the slumps that continue a track: net growth of known slumps,
        new ones not counted).
    """
    from rtsmap.pipeline.tracks import CHANGES

    coverage = coverage or {}
    years = sorted(int(y) for y in layers)
    out: dict[int, dict[str, Any]] = {}
    for before, year in zip(years, years[1:]):
        frame = layers[year]
        change = frame["change"].fillna("").astype(str) if "change" in frame.columns else pd.Series([], dtype=object)
        row: dict[str, Any] = {"slumps": int(len(frame))}
        row.update({c: int((change == c).sum()) for c in CHANGES})
        row["no_longer_seen"] = int(no_longer_seen(layers[before], frame, coverage.get(year)).sum())
        delta = pd.to_numeric(frame["area_change_m2"], errors="coerce") if "area_change_m2" in frame.columns else pd.Series([], dtype=float)
        row["area_change_m2"] = float(np.nansum(delta.to_numpy(np.float64))) if len(delta) else 0.0
        out[year] = row
    return out


def format_change(year: int, row: Mapping[str, Any]) -> str:
    """One summary line of :func:`change_summary` for ``year``, e.g. ``2022 change: 3 new, 5 grown, ...``."""
    parts = [f"{row['new']} new", f"{row['grown']} grown", f"{row['stable']} stable"]
    parts += [f"{row[k]} {k.replace('_', ' ')}" for k in ("merged", "split", "first_seen") if row.get(k)]
    parts.append(f"{row['no_longer_seen']} no longer seen")
    return f"{year} change: {', '.join(parts)}; area change of continuing slumps {row['area_change_m2'] / 1e4:+.2f} ha"
