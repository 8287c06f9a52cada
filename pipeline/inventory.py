"""The GeoPackage inventory: one slump layer and one coverage layer per year, and run metadata.

Layout (docs/contracts.md, "Detections, polygons, fragments, inventory"):

- ``rts_<year>``: one MultiPolygon per slump in the grid CRS, with the rtsmap fields
  (``rts_id, year, score, area_m2, perimeter_m, n_detections, tile_ids, source_items``) and the
  ARTS schema fields (Metadata_Format_Summary.csv of the ARTS dataset: ``CentroidLat,
  CentroidLon, RegionName, CreatorLab, BaseMapDate, BaseMapSource, BaseMapResolution,
  TrainClass, LabelType`` required; ``MergedRTS, SplitRTS, NewRTS, StabilizedRTS,
  UnknownRelationship, ContributionDate, UID`` generated; ``BaseMapID, Area, Notes``
  optional), so the layer can go back into ARTS. A processed year with no slump still gets its
  (empty) layer: "no slump here" must never look like "not processed".
- ``coverage_<year>``: polygons with ``status`` in processed / no_data / failed and a
  ``reason``, so "no slump here" and "no data here" never look alike.
- ``run_metadata``: a table without geometry, one row per key, the value as JSON
  (configuration, model hash and metadata, software version, STAC item ids, times).

The file is written under a temporary name in the target directory and renamed over the
target with ``os.replace``: a crash leaves the old file or the new one, never a broken one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Mapping

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from rtsmap.pipeline.errors import OutputError

#: Namespace of the inventory UIDs: uuid5(RTSMAP_NAMESPACE, rts_id) is the same on every run.
RTSMAP_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/rtsmap/rtsmap/rts_id")

#: Values of the coverage ``status`` field.
COVERAGE_STATUS = ("processed", "no_data", "failed")

#: Fields of an ``rts_<year>`` layer, in order (geometry last).
RTS_FIELDS = (
    "rts_id", "year", "score", "area_m2", "perimeter_m", "n_detections",
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
    "rts_id", "RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource", "TrainClass", "LabelType",
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


def _rts_layer(gdf: gpd.GeoDataFrame, year: int, run_metadata: Mapping[str, Any], crs: Any) -> gpd.GeoDataFrame:
    """An ``rts_<year>`` layer in the inventory schema."""
    if gdf is None:
        gdf = gpd.GeoDataFrame({"rts_id": []}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise OutputError(f"inventory layer rts_{year}: expected a GeoDataFrame, got {type(gdf).__name__}")
    if "rts_id" not in gdf.columns:
        raise OutputError(f"inventory layer rts_{year}: no rts_id column; merge detections with pipeline.merge first")
    if gdf.crs is None and len(gdf):
        raise OutputError(f"inventory layer rts_{year}: the GeoDataFrame has no CRS")
    g = gdf.to_crs(crs) if (gdf.crs is not None and len(gdf)) else gdf.set_crs(crs, allow_override=True)
    g = g.sort_values("rts_id", kind="mergesort").reset_index(drop=True)
    n = len(g)
    out = pd.DataFrame(index=range(n))
    defaults = _arts_defaults(year, run_metadata)
    geoms = g.geometry.values
    area = shapely.area(geoms) if n else np.zeros(0)
    out["rts_id"] = g["rts_id"].astype(str).to_numpy()
    out["year"] = np.full(n, int(year), dtype=np.int64)
    out["score"] = g["score"].astype(np.float64).to_numpy() if "score" in g else np.full(n, np.nan)
    out["area_m2"] = area
    out["perimeter_m"] = shapely.length(geoms) if n else np.zeros(0)
    out["n_detections"] = g["n_detections"].astype(np.int64).to_numpy() if "n_detections" in g else np.ones(n, np.int64)
    if n:
        # Centroid in the (equal-area-ish) grid CRS, then to WGS84, as ARTS asks (5 decimals).
        cen = gpd.GeoSeries(shapely.centroid(geoms), crs=crs).to_crs("EPSG:4326")
        out["CentroidLat"] = np.round(cen.y.to_numpy(), 5)
        out["CentroidLon"] = np.round(cen.x.to_numpy(), 5)
    else:
        out["CentroidLat"] = np.zeros(0)
        out["CentroidLon"] = np.zeros(0)
    for field in ("RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource", "BaseMapResolution",
                  "TrainClass", "LabelType", "ContributionDate", "Notes"):
        out[field] = g[field].to_numpy() if field in g else [defaults[field]] * n
    for field in ("MergedRTS", "SplitRTS", "NewRTS", "StabilizedRTS", "UnknownRelationship"):
        out[field] = g[field].fillna("").astype(str).to_numpy() if field in g else [""] * n
    out["UID"] = [rts_uid(r) for r in out["rts_id"]]
    items = g["source_items"].fillna("").astype(str).to_numpy() if "source_items" in g else np.array([""] * n, dtype=object)
    out["BaseMapID"] = [s if (s and "," not in s) else "" for s in items]  # ARTS: only for a single image
    out["Area"] = area
    out["tile_ids"] = g["tile_ids"].fillna("").astype(str).to_numpy() if "tile_ids" in g else [""] * n
    out["source_items"] = items
    for field in _STRING_FIELDS:
        out[field] = out[field].astype(object)
    out["BaseMapResolution"] = out["BaseMapResolution"].astype(np.float64)
    multi = [shapely.MultiPolygon([p]) if p.geom_type == "Polygon" else p for p in geoms]
    return gpd.GeoDataFrame(out[list(RTS_FIELDS)], geometry=gpd.GeoSeries(multi, crs=crs), crs=crs)


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
    for extra in ("chunk_id",):
        if extra in g:
            out[extra] = g[extra].astype(str).to_numpy(dtype=object)
    multi = [shapely.MultiPolygon([p]) if p.geom_type == "Polygon" else p for p in g.geometry.values]
    return gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(multi, crs=crs), crs=crs)


def _metadata_table(run_metadata: Mapping[str, Any]) -> pd.DataFrame:
    keys = sorted(str(k) for k in run_metadata)
    values = [json.dumps(run_metadata[k] if k in run_metadata else run_metadata[int(k)], sort_keys=True, default=str)
              for k in keys]
    return pd.DataFrame({"key": pd.Series(keys, dtype=object), "value": pd.Series(values, dtype=object)})


def write_inventory(
    path: str | os.PathLike,
    layers: Mapping[int, gpd.GeoDataFrame],
    coverage: Mapping[int, gpd.GeoDataFrame],
    run_metadata: Mapping[str, Any],
    *,
    crs: Any = "EPSG:3413",
    overwrite: bool = False,
) -> Path:
    """Write the inventory GeoPackage atomically.

    Parameters
    ----------
    path : path-like
        Target ``.gpkg``.
    layers : mapping of int to geopandas.GeoDataFrame
        Merged slumps per year (pipeline.merge output: ``rts_id``, ``score``, geometry, ...).
        A year present in ``coverage`` but not here (or with no rows) gets an empty layer.
    coverage : mapping of int to geopandas.GeoDataFrame
        Per year, polygons with ``status`` (processed / no_data / failed) and ``reason``.
    run_metadata : mapping
        JSON-able run facts: ``config``, ``model`` (name, version, weights_sha256, ...),
        ``software_version``, ``stac_items``, ``started``, ``finished``; optional ARTS values
        ``region_name``, ``creator_lab``, ``base_map_source``, ``base_map_resolution``,
        ``base_map_dates`` ({year: "YYYY-MM-DD,YYYY-MM-DD"}).
    crs : str or pyproj.CRS
        CRS of the layers (inputs are reprojected to it).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputError
        The file exists and ``overwrite`` is False, the directory is missing or not writable, a
        layer does not follow the schema, or GDAL fails to write.
    """
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise OutputError(f"inventory {path}: the file name must end in .gpkg")
    if path.exists() and not overwrite:
        raise OutputError(f"inventory {path} already exists; pass overwrite (--overwrite) or choose another path")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"inventory {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"inventory {path}: directory {directory} is not writable")
    years = sorted({int(y) for y in layers} | {int(y) for y in coverage})
    frames = [(f"rts_{y}", _rts_layer(layers.get(y, layers.get(str(y))), y, run_metadata, crs)) for y in years]
    frames += [(f"coverage_{y}", _coverage_layer(coverage[y], y, crs)) for y in sorted(int(k) for k in coverage)]
    table = _metadata_table(run_metadata)

    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.gpkg"
    try:
        for name, frame in frames:
            pyogrio.write_dataframe(frame, tmp, layer=name, driver="GPKG", geometry_type="MultiPolygon",
                                    promote_to_multi=True)
        pyogrio.write_dataframe(table, tmp, layer="run_metadata", driver="GPKG")
        os.replace(tmp, path)
    except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise OutputError(f"inventory {path}: cannot write ({exc}); check the disk and permissions") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
