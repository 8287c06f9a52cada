"""The work directory: one fragment per finished chunk-year, written atomically.

Layout::

    <workdir>/<run key>/<year>/<shard>/<chunk_id>.parquet   detections (GeoParquet)
    <workdir>/<run key>/<year>/<shard>/<chunk_id>.json      the done marker: coverage and timings
    <workdir>/<run key>/<year>/<shard>/<chunk_id>.failed.json   last failure (retried on the next run)
    <workdir>/<run key>/hillshade/<shard>/<chunk_id>.npz     quick-look thumbnail (once per chunk)

``<shard>`` is the first two hex digits of the SHA-1 of the chunk id (:func:`shard_of`): a
pan-Arctic year has ~100,000 chunks, and 256 folders of a few hundred files each keep
listings and file creation fast on every file system (Lustre and NFS included). Work
directories written before sharding (``<year>/<chunk_id>.*``) are still read: a fragment is
looked for in its shard first, then in the year folder; new fragments always go to the shard.

The run key joins the model's hash and the hash of the configuration that changes results, so a
new model or new settings never reuse old fragments. The parquet file is renamed into place
first and the marker last: a marker means the fragment beside it is complete; a crash between
the two leaves a parquet without marker, which the next run simply rewrites. A writer killed
mid-write leaves a hidden ``.<name>.<random>.tmp`` file; a run whose every chunk-year is done
removes such leftovers (no writer of its own can still be running then).

Writing never ends in a bare OSError: a full disk, a denied permission, a read-only work
directory or a path under a file become one :class:`~rtsmap.pipeline.errors.OutputError`
that names the work directory; fragments already written stay. Records pass through
:func:`rtsmap.pipeline.inventory.redact_metadata` (no URL credential or token is written).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
from affine import Affine

from rtsmap.pipeline.errors import OutputError
from rtsmap.pipeline.inventory import redact_metadata
from rtsmap.pipeline.vectorize import empty_polygons


def shard_of(chunk_id: str) -> str:
    """The shard folder of a chunk: the first two hex digits of the SHA-1 of its id."""
    return hashlib.sha1(chunk_id.encode()).hexdigest()[:2]


#: Bumped when what a task writes changes for the same model and settings (2: masks of a tile no
#: longer overlap, pipeline.vectorize.suppress_overlaps; 3: coverage parts per modality gap, not
#: per tile), so a rerun never mixes old fragments in.
FRAGMENT_RULES = 3


def run_key(model_sha256: str, settings: dict[str, Any]) -> str:
    """A short key for (model, result-changing settings, :data:`FRAGMENT_RULES`)."""
    blob = json.dumps({**settings, "fragment_rules": FRAGMENT_RULES}, sort_keys=True, default=str).encode()
    return f"{model_sha256[:12]}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(root: Path, exc: OSError) -> OutputError:
    """One clear line for an OS error in the work directory (disk full, permission, read-only)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return OutputError(f"cannot write to the work directory {root}: {what}{where}; free disk space or "
                       "choose a writable --workdir; finished chunk-years are kept")


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, **arrays)


@functools.lru_cache(maxsize=4)
def _empty_fragment(crs: str) -> bytes:
    """The GeoParquet bytes of a chunk-year without detections: building and writing an empty
    GeoDataFrame costs ~25 ms, most of a no_data chunk-year's time."""
    buffer = io.BytesIO()
    empty_polygons(crs).to_parquet(buffer, index=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=16)
def _parsed_crs(projjson: str) -> pyproj.CRS:
    """A fragment's CRS, parsed once per process: PROJ takes ~20 ms to parse the PROJJSON that
    geopandas writes (its datum ensemble is looked up member by member), which was nine tenths of
    reading a fragment (``gpd.read_parquet``), i.e. ~30 CPU-minutes per pan-Arctic year in finish."""
    return pyproj.CRS.from_json(projjson)


def _drop_ensemble_member_ids(projjson: dict) -> None:
    """Remove the ids of datum ensemble members, as geopandas does before parsing (older PROJ
    databases do not know the newer members' ids)."""
    for key, value in projjson.items():
        if isinstance(value, dict):
            _drop_ensemble_member_ids(value)
        elif key == "members" and isinstance(value, list):
            for member in value:
                if isinstance(member, dict):
                    member.pop("id", None)


def read_fragment(path: str | Path) -> gpd.GeoDataFrame:
    """Read a fragment's GeoParquet file as ``gpd.read_parquet`` does, its CRS parsed once per process.

    Parameters
    ----------
    path : str or Path
        A ``.parquet`` fragment (one WKB geometry column, as :meth:`FragmentStore.write` writes).

    Returns
    -------
    geopandas.GeoDataFrame
        Equal to ``gpd.read_parquet(path)`` (tests/test_fragments_read.py); a file of another
        layout is read by it.
    """
    import pyarrow.parquet as pq
    from geopandas.array import from_wkb

    table = pq.read_table(path)
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
    name = geo.get("primary_column")
    column = (geo.get("columns") or {}).get(name) or {}
    if len(geo.get("columns") or {}) != 1 or column.get("encoding") != "WKB" or name not in table.column_names:
        return gpd.read_parquet(path)
    crs = column.get("crs", "OGC:CRS84")  # the GeoParquet default when absent
    if isinstance(crs, dict):
        _drop_ensemble_member_ids(crs)
        crs = _parsed_crs(json.dumps(crs, sort_keys=True))
    geometry = from_wkb(np.array(table[name]), crs=crs)
    frame = table.drop([name]).to_pandas()
    frame.insert(table.column_names.index(name), name, geometry)
    return gpd.GeoDataFrame(frame, geometry=name)


@dataclass(frozen=True)
class FragmentStore:
    """Fragments of one run key under a work directory."""

    root: Path
    """``<workdir>/<run key>``."""

    def prepare(self) -> None:
        """Create the work directory and check that a file can be written there, before work starts.

        Raises
        ------
        OutputError
            The directory cannot be created (a path component is a file, no permission, a
            read-only file system) or a file cannot be written in it (disk full).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(self.root / ".write-check", lambda tmp: Path(tmp).write_bytes(b"ok"))
            (self.root / ".write-check").unlink(missing_ok=True)
        except OSError as exc:
            raise _write_error(self.root, exc) from None

    def _base(self, year: int, chunk_id: str) -> Path:
        """Where a new fragment of the chunk-year goes (its shard)."""
        return self.root / str(year) / shard_of(chunk_id) / chunk_id

    def path(self, year: int, chunk_id: str, suffix: str) -> Path:
        """The file of a chunk-year with ``suffix`` (``.json``, ``.parquet``, ``.failed.json``).

        The sharded path, unless only an unsharded one (a work directory written before
        sharding) exists.
        """
        sharded = self._base(year, chunk_id).with_name(chunk_id + suffix)
        if sharded.exists():
            return sharded
        legacy = self.root / str(year) / (chunk_id + suffix)
        return legacy if legacy.exists() else sharded

    def is_done(self, year: int, chunk_id: str) -> bool:
        """True when the chunk-year finished (its marker exists)."""
        return self.path(year, chunk_id, ".json").is_file()

    def write(self, year: int, chunk_id: str, detections: gpd.GeoDataFrame | None, record: dict[str, Any],
              crs: Any = None) -> None:
        """Write the detections, then the marker, each atomically; clear an old failure record.

        ``detections`` None: none (a no_data chunk-year), written as the empty table in ``crs``
        (the same bytes each time, made once per process).
        """
        base = self._base(year, chunk_id)
        text = json.dumps(redact_metadata(record), sort_keys=True)
        if detections is None:
            empty = _empty_fragment(str(crs))
            write_detections = lambda tmp: Path(tmp).write_bytes(empty)  # noqa: E731
        else:
            write_detections = lambda tmp: detections.to_parquet(tmp, index=False)  # noqa: E731
        try:
            _atomic_write_bytes(base.with_name(chunk_id + ".parquet"), write_detections)
            _atomic_write_bytes(base.with_name(chunk_id + ".json"), lambda tmp: Path(tmp).write_text(text))
            self.path(year, chunk_id, ".failed.json").unlink(missing_ok=True)
        except OSError as exc:
            raise _write_error(self.root, exc) from None

    def write_failure(self, year: int, chunk_id: str, record: dict[str, Any]) -> None:
        """Record a failure; it is not a done marker, so the next run tries the chunk again."""
        path = self._base(year, chunk_id).with_name(chunk_id + ".failed.json")
        text = json.dumps(redact_metadata(record), sort_keys=True)
        try:
            _atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            raise _write_error(self.root, exc) from None

    def read_record(self, year: int, chunk_id: str) -> dict[str, Any]:
        """The done marker's record."""
        return json.loads(self.path(year, chunk_id, ".json").read_text())

    def read_detections(self, year: int, chunk_id: str) -> gpd.GeoDataFrame:
        """The detections of a finished chunk-year."""
        return read_fragment(self.path(year, chunk_id, ".parquet"))

    def _thumbnail(self, chunk_id: str) -> Path:
        sharded = self.root / "hillshade" / shard_of(chunk_id) / f"{chunk_id}.npz"
        legacy = self.root / "hillshade" / f"{chunk_id}.npz"
        return legacy if not sharded.exists() and legacy.exists() else sharded

    def has_thumbnail(self, chunk_id: str) -> bool:
        """True when the chunk's hillshade thumbnail is kept."""
        return self._thumbnail(chunk_id).is_file()

    def write_thumbnail(self, chunk_id: str, image: np.ndarray, transform: Affine) -> None:
        """Keep a small image of a chunk (for the quick-look maps), atomically."""
        path = self.root / "hillshade" / shard_of(chunk_id) / f"{chunk_id}.npz"
        try:
            _atomic_write_bytes(path, lambda tmp: _save_npz(tmp, image=image, transform=np.array(transform)[:6]))
        except OSError as exc:
            raise _write_error(self.root, exc) from None

    def read_thumbnails(self, chunk_ids) -> list[tuple[np.ndarray, Affine]]:
        """The kept thumbnails of these chunks, with their transforms."""
        out = []
        for chunk_id in chunk_ids:
            path = self._thumbnail(chunk_id)
            if path.is_file():
                with np.load(path) as npz:
                    out.append((npz["image"].astype(np.float32), Affine(*npz["transform"])))
        return out

    def remove_temporaries(self) -> int:
        """Remove the temporary files of writers that died mid-write; returns how many.

        Call only when no writer of this run key can still be running (every chunk-year done).
        """
        leftovers = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def read_failure(self, year: int, chunk_id: str) -> dict[str, Any] | None:
        """The failure record of a chunk-year, or None."""
        path = self.path(year, chunk_id, ".failed.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def failures(self, year: int) -> dict[str, dict[str, Any]]:
        """Failure records of a year by chunk id (sharded and unsharded)."""
        folder = self.root / str(year)
        if not folder.is_dir():
            return {}
        found = {}
        for pattern in ("*.failed.json", "*/*.failed.json"):  # unsharded first: a shard's record wins
            for p in sorted(folder.glob(pattern)):
                found[p.name[: -len(".failed.json")]] = json.loads(p.read_text())
        return found
