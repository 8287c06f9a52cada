"""Items found for a run, kept on disk by block of chunks, so planning memory stays flat.

A pan-Arctic run finds ~50,000 items a year. Each is turned into a compact
:class:`~rtsmap.pipeline.stac.ItemRecord` as it is read and written, once per block of chunks its
footprint meets, into a SQLite file; the plan and the run then read one block's items at a time.
Memory does not grow with the AOI or the number of years; the file does (~1-2 KB per item and
block).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import shapely

from rtsmap.pipeline.grid import Block, GridSpec
from rtsmap.pipeline.stac import ItemRecord

Key = tuple[str, "int | None"]


def key_text(key: Key) -> str:
    """``"modality:year"`` (``"modality:None"`` for static modalities)."""
    return f"{key[0]}:{key[1]}"


class ItemStore:
    """Item records by (modality, year) and block, in a temporary SQLite file.

    Parameters
    ----------
    spec
        The grid (blocks are located from footprint bounds).
    blocks
        The planned blocks; records are kept only for these.
    folder
        Where the file goes (default: the system's temporary folder, ``TMPDIR``).
    """

    def __init__(self, spec: GridSpec, blocks: list[Block], folder: str | Path | None = None) -> None:
        self.spec = spec
        self.blocks = {(b.col, b.row): b for b in blocks}
        self._block_list = list(blocks)
        self._tree = shapely.STRtree(shapely.box(*np.array([b.bounds for b in blocks]).T) if blocks else [])
        handle, name = tempfile.mkstemp(prefix="rtsmap-items-", suffix=".sqlite", dir=folder)
        os.close(handle)
        self.path = Path(name)
        self.db = sqlite3.connect(name, check_same_thread=False)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;"
            "CREATE TABLE items (key TEXT, bcol INT, brow INT, id TEXT, cloud REAL, dt TEXT, collection TEXT,"
            " footprint BLOB, data BLOB, PRIMARY KEY (bcol, brow, key, id)) WITHOUT ROWID;"
            "CREATE TABLE found (key TEXT, id TEXT, dt TEXT, PRIMARY KEY (key, id)) WITHOUT ROWID;"
        )
        self._finalizer = weakref.finalize(self, _remove, self.db, self.path)

    def close(self) -> None:
        """Remove the file."""
        self._finalizer()

    def add(self, key: Key, records: Iterable[ItemRecord], batch: int = 2000) -> int:
        """Keep records (a record met again, e.g. by the search of a neighbouring block, is kept once).

        Records are placed in blocks a batch at a time: one STRtree query of the batch's
        footprints against the blocks' bounds (no per-record loop over blocks).

        Returns
        -------
        int
            Records read.
        """
        text = key_text(key)
        n = 0
        pending: list[ItemRecord] = []
        for rec in records:
            n += 1
            pending.append(rec)
            if len(pending) >= batch:
                self._place(text, pending)
                pending = []
        self._place(text, pending)
        return n

    def _place(self, text: str, records: list[ItemRecord]) -> None:
        if not records:
            return
        rows = []
        if len(self._block_list):
            geoms = shapely.from_wkb(np.array([r.footprint_wkb for r in records], dtype=object))
            hit_item, hit_block = self._tree.query(geoms, predicate="intersects")
            for i, b in zip(hit_item.tolist(), hit_block.tolist()):
                rec, block = records[i], self._block_list[b]
                rows.append((text, block.col, block.row, rec.id, rec.cloud_cover, rec.datetime, rec.collection,
                             rec.footprint_wkb, rec.data))
        self._flush(rows, [(text, rec.id, rec.datetime) for rec in records])

    def _flush(self, rows, found) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO items VALUES (?,?,?,?,?,?,?,?,?)", rows)
            self.db.executemany("INSERT OR IGNORE INTO found VALUES (?,?,?)", found)

    def counts(self) -> dict[str, int]:
        """``"modality:year"`` -> distinct items found."""
        return dict(self.db.execute("SELECT key, COUNT(*) FROM found GROUP BY key"))

    def ids(self) -> dict[str, list[str]]:
        """``"modality:year"`` -> ids found, sorted."""
        out: dict[str, list[str]] = {}
        for key, item_id in self.db.execute("SELECT key, id FROM found ORDER BY key, id"):
            out.setdefault(key, []).append(item_id)
        return out

    def dates(self, ids: Iterable[str]) -> dict[str, str]:
        """Item id -> acquisition date (``YYYY-MM-DD``) of per-year items among ``ids``."""
        wanted = set(ids)
        out = {}
        for item_id, when, key in self.db.execute("SELECT id, dt, key FROM found"):
            if item_id in wanted and when and not key.endswith(":None"):
                out[item_id] = when[:10]
        return out

    def block_records(self, block: Block) -> dict[str, list[ItemRecord]]:
        """``"modality:year"`` -> the records of one block, sorted by id."""
        out: dict[str, list[ItemRecord]] = {}
        cursor = self.db.execute(
            "SELECT key, id, collection, dt, cloud, footprint, data FROM items WHERE bcol=? AND brow=? ORDER BY key, id",
            (block.col, block.row),
        )
        for key, item_id, collection, when, cloud, footprint, data in cursor:
            out.setdefault(key, []).append(ItemRecord(item_id, collection, when, cloud, footprint, data))
        return out


def _remove(db: sqlite3.Connection, path: Path) -> None:
    try:
        db.close()
    finally:
        path.unlink(missing_ok=True)
