"""Missing modalities in the pipeline: a chunk-year runs with the modalities it has when the model
was trained with modality dropout, and is no_data when it was not; the next year's load overlaps
this year's inference without changing the fragments.

Real components throughout: the demo region's COGs and STAC items, ``make_plan``, ``load_chunk``,
onnxruntime on the shipped v1 demo model and on a freshly exported (untrained, random-weight)
format 2 model whose metadata lists every modality subset, and the fragment store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from rtsmap.workflows.config import DEMO_MODEL
from rtsmap.workflows.fragments import FragmentStore
from rtsmap.workflows.tasks import process_chunk

YEARS = (2021, 2022, 2023)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    """The demo architecture, random weights, exported as format 2 with all seven subsets."""
    torch = pytest.importorskip("torch")
    from rtsmap import contract
    from rtsmap.models.config import build_config
    from rtsmap.models.detector import RTSDetector
    from rtsmap.models.export import export_onnx

    torch.manual_seed(0)
    subsets = contract.modality_subsets(("optical", "sar", "dem"), {"optical": 0.1, "sar": 0.1, "dem": 0.1})
    cfg = build_config("demo", tile_size=128, fusion="residual_attention", modality_subsets=subsets)
    path = tmp_path_factory.mktemp("dropout_model") / "dropout.onnx"
    export_onnx(RTSDetector(cfg).eval(), cfg, path, trained_on="random init (test)")
    return path


@pytest.fixture(scope="module")
def base_task(demo_plan):
    """The first chunk task of the demo region, all three years, planned with the demo model."""
    task = demo_plan(YEARS).tasks[0]
    assert task.years == YEARS and all(task.items[y].get(m) for y in YEARS for m in ("optical", "sar", "dem"))
    return task


def _task(base, store_dir: Path, model: Path, drop: dict[int, str] | None = None, items=None):
    """``base`` with its own fragment store, another model, and a modality's items removed per year."""
    items = {y: dict(v) for y, v in (items or base.items).items()}
    for year, modality in (drop or {}).items():
        items[year].pop(modality)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    return dataclasses.replace(base, items=items, model_path=str(model), model_sha256=sha,
                               store=FragmentStore(store_dir))


def _fragments(task) -> list[tuple[dict, object]]:
    """Each year's record (less worker and timings) and detections, as written."""
    out = []
    for year in task.years:
        record = {k: v for k, v in task.store.read_record(year, task.chunk.id).items() if k not in ("worker", "seconds")}
        out.append((record, task.store.read_detections(year, task.chunk.id)))
    return out


def test_a_dropout_model_maps_the_years_that_lack_a_modality(base_task, dropout_model, tmp_path):
    task = _task(base_task, tmp_path / "work", dropout_model, drop={2022: "sar", 2023: "optical"})
    records = process_chunk(task)
    assert [r["status"] for r in records] == ["processed"] * 3, records
    assert [r["modalities"] for r in records] == ["optical+sar+dem", "optical+dem", "sar+dem"]
    by_year = {r["year"]: r for r in records}
    assert "sar" not in by_year[2022]["items"] and "optical" not in by_year[2023]["items"]
    core = shapely.from_wkb(task.core_wkb)
    for year, modalities in ((2021, "optical+sar+dem"), (2022, "optical+dem"), (2023, "sar+dem")):
        coverage = task.store.read_record(year, task.chunk.id)["coverage"]
        processed = [row for row in coverage if row["status"] == "processed"]
        # Every pixel of the demo region has data in some modality: the processed rows cover the
        # whole core, the year's set first, then (under cloud) parts mapped without optical.
        labels = [row["modalities"] for row in processed]
        assert labels[0] == modalities, coverage
        kinds = {shapely.from_wkb(bytes.fromhex(row["wkb"])).geom_type for row in coverage}
        assert kinds <= {"Polygon", "MultiPolygon"}, kinds  # the coverage layer is MULTIPOLYGON
        assert all(set(label.split("+")) == set(modalities.split("+")) - {"optical"} for label in labels[1:]), labels
        area = sum(shapely.from_wkb(bytes.fromhex(row["wkb"])).area for row in processed)
        assert area == pytest.approx(core.area, rel=1e-6)


def test_the_shipped_demo_model_maps_a_year_without_sar_and_one_without_optical(base_task, demo_region, tmp_path):
    """The demo model was fine-tuned with modality dropout: a year without SAR items runs on
    optical + DEM and finds most of the chunk's slumps; a year without optical runs on SAR + DEM
    and still finds some (the DEM shows them: held-out F1 0.45 without optical, as a DEM-only
    detector; docs/fusion-study.md)."""
    import geopandas as gpd

    from rtsmap.pipeline.evaluation import match_polygons

    task = _task(base_task, tmp_path / "work", Path(DEMO_MODEL), drop={2022: "sar", 2023: "optical"})
    records = process_chunk(task)
    assert [r["status"] for r in records] == ["processed"] * 3, records
    assert [r["modalities"] for r in records] == ["optical+sar+dem", "optical+dem", "sar+dem"]
    core = shapely.from_wkb(task.core_wkb)
    for year, share in ((2022, 0.5), (2023, 0.2)):
        found = task.store.read_detections(year, task.chunk.id)
        truth = gpd.read_file(demo_region.truth, layer=f"rts_{year}")
        truth = truth[truth.centroid.within(core)]
        matched = match_polygons(found.geometry, truth.geometry, iou_threshold=0.5)
        assert len(truth) > 0 and matched.tp >= share * len(truth), (year, len(found), len(truth), matched)


def test_a_format_1_model_records_no_data_naming_what_it_needs(base_task, v1_model, tmp_path):
    task = _task(base_task, tmp_path / "work", v1_model, drop={2022: "sar", 2023: "optical"})
    records = process_chunk(task)
    assert [r["status"] for r in records] == ["processed", "no_data", "no_data"], records
    assert records[0]["modalities"] == "optical+sar+dem"
    no_sar, no_optical = records[1]["reason"], records[2]["reason"]
    assert no_sar.startswith("no sar items for 2022") and "needs sar" in no_sar and "all of" in no_sar
    assert no_optical.startswith("no optical items for 2023") and "needs optical" in no_optical
    coverage = task.store.read_record(2022, task.chunk.id)["coverage"]
    assert [(c["status"], c["reason"]) for c in coverage] == [("no_data", no_sar)]
    assert len(task.store.read_detections(2022, task.chunk.id)) == 0


def test_prefetched_loads_give_the_same_fragments_as_sequential_ones(base_task, dropout_model, tmp_path):
    for model, drop in ((Path(DEMO_MODEL), None), (dropout_model, {2022: "sar"})):
        name = model.stem
        overlapped = _task(base_task, tmp_path / name / "overlapped", model, drop)
        sequential = _task(base_task, tmp_path / name / "sequential", model, drop)
        got = process_chunk(overlapped, prefetch=True)
        want = process_chunk(sequential, prefetch=False)
        assert [r["status"] for r in got] == [r["status"] for r in want] == ["processed"] * 3
        for (rec_a, det_a), (rec_b, det_b) in zip(_fragments(overlapped), _fragments(sequential)):
            assert rec_a == rec_b
            assert det_a.drop(columns="geometry").equals(det_b.drop(columns="geometry"))
            assert list(det_a.geometry.to_wkb()) == list(det_b.geometry.to_wkb())
        if model == Path(DEMO_MODEL):
            # the trained model finds slumps here, so the comparison covers real detections
            assert sum(r["n_detections"] for r in got) > 0


def test_a_failed_background_load_is_that_chunk_years_failure(base_task, tmp_path):
    """2022's optical items point at missing files: its load (on the prefetch thread, while
    2021 is inferred) fails that chunk-year alone, recorded as a foreground failure is."""
    items = {y: dict(v) for y, v in base_task.items.items()}
    broken = []
    for data in items[2022]["optical"]:
        item = json.loads(data)
        for asset in item["assets"].values():
            asset["href"] = str(tmp_path / "gone" / Path(asset["href"]).name)
        broken.append(json.dumps(item).encode())
    items[2022]["optical"] = tuple(broken)
    task = _task(base_task, tmp_path / "work", Path(DEMO_MODEL), items=items)
    records = process_chunk(task, prefetch=True)
    assert [r["status"] for r in records] == ["processed", "failed", "processed"], records
    assert "gone" in records[1]["reason"] or "optical" in records[1]["reason"]
    assert task.store.read_failure(2022, task.chunk.id)["status"] == "failed"
    assert not task.store.is_done(2022, task.chunk.id) and task.store.is_done(2023, task.chunk.id)
    assert np.isfinite(records[2]["seconds"]["load"])


def test_coverage_rows_split_by_the_modalities_each_tile_ran_with(base_task, dropout_model):
    """A dropout model drops, per tile, a modality with no valid pixel there: the processed
    area is then split into one row per set. The per-tile results are built directly (the demo
    region has no SAR gap inside a chunk); tiles, stack and core are the real ones."""
    from rtsmap.pipeline.infer import TileDetections
    from rtsmap.workflows.tasks import _coverage, _Loader

    task = base_task
    tiles = task.chunk.tiles
    assert len(tiles) >= 2
    static = {m: p for m, p in task.profiles.items() if not p.per_year}
    per_year = {m: p for m, p in task.profiles.items() if p.per_year}
    stack, _ = _Loader(task, static, per_year).load(2021, ["optical", "sar", "dem"])
    for valid in stack.valid.values():  # no cloud: the split by tile alone (gaps: the test below)
        valid[:] = True
    core = shapely.from_wkb(task.core_wkb)
    ran = [("optical", "dem") if i == 0 else ("optical", "sar", "dem") for i in range(len(tiles))]
    detections = [TileDetections(tile_id=t.id, chunk_id=task.chunk.id, boxes=np.zeros((0, 4), np.float32),
                                 scores=np.zeros(0, np.float32), masks=(), offsets=(),
                                 invalid_fractions=np.zeros(0, np.float32), modalities=m)
                  for t, m in zip(tiles, ran)]
    rows = _coverage(stack, core, task.chunk, detections, ("optical", "sar", "dem"))
    assert [r["modalities"] for r in rows] == ["optical+sar+dem", "optical+dem"]
    parts = [shapely.from_wkb(bytes.fromhex(r["wkb"])) for r in rows]
    assert sum(p.area for p in parts) == pytest.approx(core.area, rel=1e-6)  # a partition of the core
    assert shapely.intersection(parts[0], parts[1]).area == pytest.approx(0.0, abs=1e-6)


def test_coverage_splits_off_a_gap_of_one_modality_as_mapped_without_it(base_task):
    """Inside a tile, a cloud (optical without data) of a few hectares becomes a part mapped with
    SAR + DEM; a speck of a few pixels does not. Stack, tiles and core are the demo region's."""
    from rtsmap.workflows.tasks import GAP_STEP, _coverage, _Loader

    task = base_task
    static = {m: p for m, p in task.profiles.items() if not p.per_year}
    per_year = {m: p for m, p in task.profiles.items() if p.per_year}
    stack, _ = _Loader(task, static, per_year).load(2022, ["optical", "sar", "dem"])
    for valid in stack.valid.values():
        valid[:] = True
    core = shapely.from_wkb(task.core_wkb)
    minx, miny, maxx, maxy = core.bounds
    # A 40 x 40 px cloud (16 ha at 10 m) in the middle of the core, and a 2 x 2 px speck.
    row, col = ~stack.transform * ((minx + maxx) / 2, (miny + maxy) / 2)
    row, col = int(col), int(row)
    stack.valid["optical"][row : row + 40, col : col + 40] = False
    stack.valid["optical"][row + 60 : row + 62, col + 60 : col + 62] = False
    rows = _coverage(stack, core, None, (), ("optical", "sar", "dem"))
    assert [r["modalities"] for r in rows] == ["optical+sar+dem", "sar+dem"]
    parts = [shapely.from_wkb(bytes.fromhex(r["wkb"])) for r in rows]
    assert {p.geom_type for p in parts} <= {"Polygon", "MultiPolygon"}  # no line left by the cuts
    res = abs(stack.transform.a)
    assert parts[1].area == pytest.approx((40 * res) ** 2, rel=0.25)  # traced every GAP_STEP pixels
    assert sum(p.area for p in parts) == pytest.approx(core.area, rel=1e-6)
    assert shapely.intersection(parts[0], parts[1]).area == pytest.approx(0.0, abs=1e-6)
    assert GAP_STEP * 2 < 40
