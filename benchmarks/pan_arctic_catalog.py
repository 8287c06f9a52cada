"""A synthetic STAC catalog of pan-Arctic size, shaped like Planetary Computer's, for scale benchmarks.

    python -m benchmarks.pan_arctic_catalog --out runs/pan-arctic --years 2017-2024
    python -m benchmarks.pan_arctic_catalog --out runs/pan-arctic --years 2024 --south 60 --north 80 --ndjson

Writes ``catalog/<collection>/<year>.parquet`` (stac-geoparquet through rustac, one file per
collection and year as Planetary Computer partitions its snapshots; rows in latitude-row order so
that row-group statistics prune by place), optionally ``catalog.ndjson``, and ``aoi.geojson``
(the latitude band as 10-degree boxes in lon/lat, none crossing the antimeridian).

What it holds, per year (numbers for the 60-80 N band):

- ``sentinel-2-l2a``: one cell per ~100 km x 100 km (MGRS-like: rows of 0.9 deg latitude,
  columns of 0.9 / cos(lat) deg longitude, ~3,000 cells), ``--s2-per-cell`` scenes each
  (default 10) between July 1 and August 31, cloud cover uniform in 0-100, processing baseline
  "05.10" (or "03.01" before 2022), ``proj:epsg`` of the cell's UTM zone, assets B02, B03, B04,
  B08 and SCL, absolute links to the live API (as saved items carry them).
- ``sentinel-1-rtc``: frames of 2.5 deg latitude x 250 km, ``--s1-per-frame`` acquisitions each
  (default 20 with S1A and S1B; half from 2022 on, after Sentinel-1B failed), ``start_datetime``/``end_datetime``
  written as the service writes them ("2024-07-19 04:59:04.220006+00:00"), ``proj:code``,
  assets vv and vh.
- ``cop-dem-glo-30``: 1 x 1 deg tiles (once, not per year), asset ``data``.

Nothing is read over the network: every href points at the real hosts and is never opened.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

PC_API = "https://planetarycomputer.microsoft.com/api/stac/v1"
S2_ROW_DEG = 0.9
S1_ROW_DEG = 2.5
S1_FRAME_KM = 250.0


def _links(collection: str, item_id: str) -> list[dict]:
    return [
        {"rel": "collection", "href": f"{PC_API}/collections/{collection}", "type": "application/json"},
        {"rel": "parent", "href": f"{PC_API}/collections/{collection}", "type": "application/json"},
        {"rel": "root", "href": f"{PC_API}/", "type": "application/json"},
        {"rel": "self", "href": f"{PC_API}/collections/{collection}/items/{item_id}", "type": "application/geo+json"},
    ]


def _box(west: float, south: float, east: float, north: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]]}


def _cells(south: float, north: float, row_deg: float, width_km: float) -> Iterator[tuple[float, float, float, float]]:
    """Cells (west, south, east, north) of about ``width_km`` east-west, in rows of ``row_deg``."""
    lat = south
    while lat < north - 1e-9:
        top = min(lat + row_deg, north)
        mid = math.radians((lat + top) / 2)
        step = min(360.0, width_km / (111.32 * max(math.cos(mid), 1e-3)))
        count = max(1, int(round(360.0 / step)))
        step = 360.0 / count
        for k in range(count):
            yield (-180.0 + k * step, lat, -180.0 + (k + 1) * step, top)
        lat = top


def _utm_epsg(lon: float, lat: float) -> int:
    zone = min(60, int((lon + 180) // 6) + 1)
    return (32600 if lat >= 0 else 32700) + zone


def s2_items(year: int, south: float, north: float, per_cell: int, rng: np.random.Generator) -> Iterator[dict]:
    """Sentinel-2 L2A items of one summer, cell by cell (see the module docstring)."""
    season = dt.datetime(year, 7, 1, tzinfo=dt.timezone.utc)
    baseline = "05.10" if year >= 2022 else "03.01"
    for west, s, east, n in _cells(south, north, S2_ROW_DEG, 100.0):
        epsg = _utm_epsg((west + east) / 2, (s + n) / 2)
        tile = f"{epsg % 100:02d}W{int((west + 180) * 10):04d}{int(s * 10):03d}"
        for k in range(per_cell):
            when = season + dt.timedelta(days=float(rng.uniform(0, 62)))
            stamp = when.strftime("%Y%m%dT%H%M%S")
            item_id = f"S2A_MSIL2A_{stamp}_R{k:03d}_T{tile}_{stamp}"
            base = f"https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/{tile}/{item_id}"
            yield {
                "type": "Feature",
                "stac_version": "1.1.0",
                "stac_extensions": [],
                "id": item_id,
                "collection": "sentinel-2-l2a",
                "geometry": _box(west, s, east, n),
                "bbox": [west, s, east, n],
                "properties": {
                    "datetime": when.isoformat().replace("+00:00", "Z"),
                    "platform": "Sentinel-2A",
                    "eo:cloud_cover": float(round(rng.uniform(0, 100), 3)),
                    "s2:processing_baseline": baseline,
                    "s2:mgrs_tile": tile,
                    "proj:epsg": epsg,
                },
                "links": _links("sentinel-2-l2a", item_id),
                "assets": {
                    **{
                        band: {"href": f"{base}/{band}_10m.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                               "roles": ["data"], "proj:shape": [10980, 10980]}
                        for band in ("B02", "B03", "B04", "B08")
                    },
                    "SCL": {"href": f"{base}/SCL_20m.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                            "roles": ["data"], "proj:shape": [5490, 5490]},
                },
            }


def s1_items(year: int, south: float, north: float, per_frame: int, rng: np.random.Generator) -> Iterator[dict]:
    """Sentinel-1 RTC items of one summer, frame by frame (see the module docstring)."""
    season = dt.datetime(year, 7, 1, tzinfo=dt.timezone.utc)
    for west, s, east, n in _cells(south, north, S1_ROW_DEG, S1_FRAME_KM):
        epsg = _utm_epsg((west + east) / 2, (s + n) / 2)
        for k in range(per_frame):
            start = season + dt.timedelta(days=float(rng.uniform(0, 62)))
            end = start + dt.timedelta(seconds=25)
            stamp = start.strftime("%Y%m%dT%H%M%S")
            item_id = f"S1A_IW_GRDH_1SDV_{stamp}_{int((west + 180) * 100):05d}_{int(s * 10):03d}_rtc"
            base = f"https://sentinel1euwestrtc.blob.core.windows.net/sentinel1-grd-rtc/{item_id}"
            yield {
                "type": "Feature",
                "stac_version": "1.1.0",
                "stac_extensions": [],
                "id": item_id,
                "collection": "sentinel-1-rtc",
                "geometry": _box(west, s, east, n),
                "bbox": [west, s, east, n],
                "properties": {
                    # The service writes these with a space and an explicit offset.
                    "datetime": None,
                    "start_datetime": start.isoformat(sep=" "),
                    "end_datetime": end.isoformat(sep=" "),
                    "platform": "SENTINEL-1A",
                    "sar:polarizations": ["VV", "VH"],
                    "proj:code": f"EPSG:{epsg}",
                },
                "links": _links("sentinel-1-rtc", item_id),
                "assets": {
                    pol: {"href": f"{base}/measurement/iw-{pol}.rtc.tiff", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                          "roles": ["data"]}
                    for pol in ("vv", "vh")
                },
            }


def dem_items(south: float, north: float) -> Iterator[dict]:
    """Copernicus DEM GLO-30 tiles of 1 x 1 deg."""
    for lat in range(int(math.floor(south)), int(math.ceil(north))):
        for lon in range(-180, 180):
            ns, ew = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
            item_id = f"Copernicus_DSM_COG_10_{ns}{abs(lat):02d}_00_{ew}{abs(lon):03d}_00_DEM"
            yield {
                "type": "Feature",
                "stac_version": "1.1.0",
                "stac_extensions": [],
                "id": item_id,
                "collection": "cop-dem-glo-30",
                "geometry": _box(lon, lat, lon + 1, lat + 1),
                "bbox": [lon, lat, lon + 1, lat + 1],
                "properties": {"datetime": "2021-04-22T00:00:00Z", "platform": "TanDEM-X", "proj:epsg": 4326, "gsd": 30},
                "links": _links("cop-dem-glo-30", item_id),
                "assets": {"data": {"href": f"https://elevationeuwest.blob.core.windows.net/copernicus-dem/COP30_hh/{item_id}.tif",
                                    "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"]}},
            }


def band_aoi(south: float, north: float) -> dict:
    """The latitude band as a GeoJSON FeatureCollection of 36 lon/lat boxes of 10 deg (no antimeridian crossing)."""
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": _box(w, south, w + 10, north)} for w in range(-180, 180, 10)
        ],
    }


def write_catalog(out: Path, years: list[int], *, south: float, north: float, s2_per_cell: int, s1_per_frame: int,
                  ndjson: bool, seed: int = 0) -> dict[str, int]:
    """Write the catalog (see the module docstring); return item counts per collection.

    One stac-geoparquet file per collection and year, ``<out>/catalog/<collection>/<year>.parquet``
    (as Planetary Computer partitions its snapshots), each written by rustac.
    """
    rng = np.random.default_rng(seed)
    parts: list[tuple[str, str, Iterator[dict]]] = [("cop-dem-glo-30", "static", dem_items(south, north))]
    for year in years:
        parts.append(("sentinel-2-l2a", str(year), s2_items(year, south, north, s2_per_cell, rng)))
        parts.append(("sentinel-1-rtc", str(year), s1_items(year, south, north, s1_per_frame if year < 2022 else max(1, s1_per_frame // 2), rng)))
    counts: dict[str, int] = {}
    (out / "catalog").mkdir(parents=True, exist_ok=True)
    text = (out / "catalog.ndjson").open("w") if ndjson else None
    try:
        for collection, name, items in parts:
            batch = list(items)
            counts[collection] = counts.get(collection, 0) + len(batch)
            (out / "catalog" / collection).mkdir(exist_ok=True)
            _write_geoparquet(out / "catalog" / collection / f"{name}.parquet", batch)
            if text is not None:
                text.writelines(json.dumps(item) + "\n" for item in batch)
    finally:
        if text is not None:
            text.close()
    (out / "aoi.geojson").write_text(json.dumps(band_aoi(south, north)))
    return counts


def _write_geoparquet(path: Path, items: list[dict], row_group_size: int = 2048) -> None:
    """stac-geoparquet through rustac's arrow conversion, in row groups of ``row_group_size``.

    rustac writes one row group per call; small row groups (in the generator's latitude-row
    order) let a reader skip most of the file by its bbox statistics, as a sorted snapshot allows.
    """
    import pyarrow.parquet as pq
    import rustac

    rustac.write_sync(str(path), items)
    keep = {k: v for k, v in pq.ParquetFile(path).metadata.metadata.items() if k != b"ARROW:schema"}  # geo, stac-geoparquet
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(keep), path, row_group_size=row_group_size, compression="zstd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--years", default="2024", help="e.g. 2024 or 2017-2024")
    parser.add_argument("--south", type=float, default=60.0)
    parser.add_argument("--north", type=float, default=80.0)
    parser.add_argument("--s2-per-cell", type=int, default=10)
    parser.add_argument("--s1-per-frame", type=int, default=20)
    parser.add_argument("--ndjson", action="store_true", help="also write catalog.ndjson")
    args = parser.parse_args(argv)
    lo, _, hi = args.years.partition("-")
    years = list(range(int(lo), int(hi or lo) + 1))
    started = time.perf_counter()
    counts = write_catalog(args.out, years, south=args.south, north=args.north, s2_per_cell=args.s2_per_cell,
                           s1_per_frame=args.s1_per_frame, ndjson=args.ndjson)
    size = sum(p.stat().st_size for p in (args.out / "catalog").rglob("*.parquet"))
    print(json.dumps({"items": counts, "total": sum(counts.values()), "parquet_bytes": size,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
