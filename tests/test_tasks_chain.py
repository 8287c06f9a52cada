"""Several chunks in one Dask task (``process_chunks``): one prefetch chain through all their
years gives the fragments that one task per chunk, loading in turn, gives; a chunk-year whose
load fails (on the prefetch thread, across a chunk boundary) is that chunk-year's failure alone;
``chain_length`` shares the tail of a run out between the workers.

Real components: the demo region's COGs and STAC items, ``make_plan``, ``load_chunk``, onnxruntime
on the shipped demo model, and the fragment store.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rtsmap.workflows.fragments import FragmentStore
from rtsmap.workflows.tasks import CHAIN_CHUNKS, chain_length, process_chunk, process_chunks

YEARS = (2021, 2022)


@pytest.fixture(scope="module")
def tasks(demo_plan):
    """The first three chunk tasks of the demo region (2021-2022), planned with the demo model."""
    found = demo_plan(YEARS).tasks
    assert len(found) >= 3
    return found[:3]


def _in(store_dir: Path, tasks, items=None):
    """The tasks with their own fragment store (and the second task's items replaced)."""
    store = FragmentStore(store_dir)
    out = [dataclasses.replace(t, store=store) for t in tasks]
    if items is not None:
        out[1] = dataclasses.replace(out[1], items=items)
    return out


def _fragments(tasks) -> list[tuple[dict, list[bytes], object]]:
    """Each chunk-year's record (less worker and timings) and detections, as written."""
    out = []
    for task in tasks:
        for year in task.years:
            record = {k: v for k, v in task.store.read_record(year, task.chunk.id).items()
                      if k not in ("worker", "seconds")}
            found = task.store.read_detections(year, task.chunk.id)
            out.append((record, list(found.geometry.to_wkb()), found.drop(columns="geometry")))
    return out


def test_a_chain_of_chunks_writes_what_one_task_per_chunk_writes(tasks, tmp_path):
    chained = _in(tmp_path / "chained", tasks)
    alone = _in(tmp_path / "alone", tasks)
    got = process_chunks(chained, prefetch=True)
    want = [process_chunk(t, prefetch=False) for t in alone]
    assert [[r["status"] for r in rs] for rs in got] == [["processed"] * 2] * 3
    assert [[(r["chunk_id"], r["year"]) for r in rs] for rs in got] == \
        [[(r["chunk_id"], r["year"]) for r in rs] for rs in want]
    for (rec_a, wkb_a, att_a), (rec_b, wkb_b, att_b) in zip(_fragments(chained), _fragments(alone), strict=True):
        assert rec_a == rec_b
        assert wkb_a == wkb_b
        assert att_a.equals(att_b)
    assert sum(r["n_detections"] for rs in got for r in rs) > 0  # real detections are compared
    # Every chunk-year after the first, a chunk's first year too, was loaded while the one before
    # it was inferred: it waited less than its load took (a load in turn waits longer than that).
    waits = [r["seconds"]["load_wait"] for rs in got for r in rs]
    loads = [r["seconds"]["load"] for rs in got for r in rs]
    assert all(w < load for w, load in zip(waits[1:], loads[1:])), (waits, loads)
    assert waits[0] >= loads[0]


def test_a_load_failing_across_a_chunk_boundary_fails_that_chunk_year_alone(tasks, tmp_path):
    """The second chunk's 2021 optical items point at missing files: its load runs on the
    prefetch thread while the first chunk's 2022 is inferred, and fails that chunk-year only."""
    items = {y: dict(v) for y, v in tasks[1].items.items()}
    broken = []
    for data in items[2021]["optical"]:
        item = json.loads(data)
        for asset in item["assets"].values():
            asset["href"] = str(tmp_path / "gone" / Path(asset["href"]).name)
        broken.append(json.dumps(item).encode())
    items[2021]["optical"] = tuple(broken)
    chained = _in(tmp_path / "work", tasks, items)
    got = process_chunks(chained, prefetch=True)
    assert [[r["status"] for r in rs] for rs in got] == [["processed"] * 2, ["failed", "processed"],
                                                         ["processed"] * 2]
    assert "optical" in got[1][0]["reason"] or "gone" in got[1][0]["reason"]
    second = chained[1]
    assert not second.store.is_done(2021, second.chunk.id) and second.store.is_done(2022, second.chunk.id)
    # A rerun of the chain runs only the failed chunk-year.
    again = process_chunks(chained, prefetch=True)
    assert [r["status"] for rs in again for r in rs].count("skipped") == 5


@pytest.mark.parametrize(("waiting", "workers", "expected"), [
    (0, 1, 0), (1, 1, 1), (3, 1, 3), (40, 1, CHAIN_CHUNKS), (40, 4, CHAIN_CHUNKS),
    (4, 2, 2), (5, 2, 3), (2, 4, 1), (16, 4, 4), (9, 4, 3),
])
def test_the_chain_is_shorter_at_the_tail_so_every_worker_gets_work(waiting, workers, expected):
    assert chain_length(waiting, workers) == expected
