"""Search stac-geoparquet files without reading them whole.

A pan-Arctic snapshot holds hundreds of thousands of items; a run needs the few that meet one
block of the AOI, one collection and one season at a time. pyarrow's dataset scanner skips row
groups whose statistics rule them out (the ``bbox`` struct columns, ``datetime``,
``start_datetime``/``end_datetime``, ``collection``) and filters the rest column-wise, so only the
matching rows are turned into item dictionaries (by rustac, which writes and reads the format).

DuckDB's spatial extension, which rustac's own search uses, is downloaded at run time and so is
not available on an offline cluster; pyarrow needs nothing beyond the file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

from rtsmap.pipeline.errors import CatalogError

PARQUET_SUFFIXES = (".parquet", ".geoparquet")


def geoparquet_files(path: str | Path) -> list[Path]:
    """The stac-geoparquet files of ``path``: the file itself, or every ``*.parquet`` below a folder.

    Raises
    ------
    CatalogError
        If the path is neither a parquet file nor a folder holding some.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PARQUET_SUFFIXES:
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES)
        if files:
            return files
    raise CatalogError(f"catalog {path} is not a stac-geoparquet file or a folder of them")


def _filter(schema, collections, bbox, start, end):
    """The pyarrow expression for collections, bbox overlap and time overlap (STAC API semantics)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = set(schema.names)
    expr = pc.scalar(True)
    if collections is not None:
        if "collection" not in names:
            return pc.scalar(False)
        expr = expr & pc.field("collection").isin(pa.array(list(collections), pa.string()))
    if bbox is not None and "bbox" in names:
        minx, miny, maxx, maxy = (float(v) for v in bbox)
        expr = expr & (pc.field("bbox", "xmin") <= maxx) & (pc.field("bbox", "xmax") >= minx)
        expr = expr & (pc.field("bbox", "ymin") <= maxy) & (pc.field("bbox", "ymax") >= miny)
    if start is not None or end is not None:
        has_range = {"start_datetime", "end_datetime"} <= names
        lo = pc.field("start_datetime") if has_range else pc.field("datetime")
        hi = pc.field("end_datetime") if has_range else pc.field("datetime")
        window = pc.scalar(True)
        if start is not None:
            window = window & (hi >= pa.scalar(start, pa.timestamp("ms", tz="UTC")))
        if end is not None:
            window = window & (lo <= pa.scalar(end, pa.timestamp("ms", tz="UTC")))
        if has_range and "datetime" in names:
            # Items with a range use it; others their datetime (null ranges compare as null).
            single = pc.scalar(True)
            if start is not None:
                single = single & (pc.field("datetime") >= pa.scalar(start, pa.timestamp("ms", tz="UTC")))
            if end is not None:
                single = single & (pc.field("datetime") <= pa.scalar(end, pa.timestamp("ms", tz="UTC")))
            window = pc.if_else(pc.field("start_datetime").is_valid(), window, single)
        expr = expr & window
    return expr


def search_geoparquet(
    path: str | Path,
    *,
    collections: Sequence[str] | None = None,
    bbox: Sequence[float] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    batch_rows: int = 4096,
) -> Iterator[dict]:
    """Yield the items of stac-geoparquet file(s) that match, as STAC item dictionaries.

    Parameters
    ----------
    path
        A stac-geoparquet file or a folder of them (e.g. one file per collection and year).
    collections
        Collection ids to keep; ``None`` keeps all.
    bbox
        ``(minx, miny, maxx, maxy)`` in lon/lat; items whose bbox overlaps it are kept (a coarse
        filter: the caller intersects footprints).
    start, end
        Time window (timezone-aware); items whose datetime, or whose start/end range, overlaps it.
    batch_rows
        Rows turned into dictionaries at a time (memory bound of the conversion).

    Yields
    ------
    dict
        STAC items (``links`` as stored; nothing is resolved).

    Raises
    ------
    CatalogError
        If a file cannot be read as stac-geoparquet.
    """
    import pyarrow
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import rustac

    for file in geoparquet_files(path):
        try:
            meta = pq.ParquetFile(file).metadata.metadata or {}
            dataset = ds.dataset(file, format="parquet")
            expr = _filter(dataset.schema, collections, bbox, start, end)
            keep = {k: v for k, v in meta.items() if k != b"ARROW:schema"}
            for batch in dataset.to_batches(filter=expr, batch_size=batch_rows):
                if batch.num_rows == 0:
                    continue
                table = pyarrow.Table.from_batches([batch]).replace_schema_metadata(keep)
                yield from rustac.from_arrow(table)["features"]
        except (OSError, pyarrow.ArrowException, rustac.RustacError, ValueError, KeyError) as exc:
            raise CatalogError(f"catalog {file} is not readable stac-geoparquet: {str(exc)[:200]}") from None
