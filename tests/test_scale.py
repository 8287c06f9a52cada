"""Planning at scale: the lazy plan (blocks, compact records on disk) equals the eager one.

The eager reference is what ``rtsmap plan`` did before blocks: the whole grid (``plan_grid``),
one search per modality-year over the whole AOI (``search_modalities``), items per chunk by
footprint. Real components throughout (the demo region's catalog, rustac's stac-geoparquet).
"""

from __future__ import annotations

import json

import pyproj
import pytest
import shapely

from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.grid import GridSpec, iter_chunks, plan_grid
from rtsmap.pipeline.stac import open_catalog, search_modalities
from rtsmap.workflows.config import GridConfig, RunConfig
from rtsmap.workflows.planning import check_plan_memory, footprint_in_grid, plan_chunks


def _config(demo_region, catalog, **changes) -> RunConfig:
    values = dict(aoi=str(demo_region.aoi), years=(2021, 2022), catalog=str(catalog), profile="demo",
                  grid=GridConfig(overlap_px=8, tiles_per_chunk=1))
    values.update(changes)
    return RunConfig(**values)


def _lazy_items(planned) -> dict[tuple[str, str], list[str]]:
    """(chunk id, "modality:year") -> item ids, block by block."""
    out = {}
    years = sorted(planned.config.years)
    for block in planned.iter_blocks():
        for chunk in block.chunks:
            for year in years:
                for modality, records in block.chunk_items(chunk, planned.keys_for(year)).items():
                    out[(chunk.id, planned.keys_for(year)[modality])] = [r.id for r in records]
    return out


def _eager_items(planned) -> dict[tuple[str, str], list[str]]:
    """The same, from one whole-AOI search per modality-year and the whole grid."""
    catalog = open_catalog(planned.config.catalog)
    found = search_modalities(catalog, planned.aoi, planned.config.years, planned.profile,
                              modalities=list(planned.modalities))
    to_grid = pyproj.Transformer.from_crs("EPSG:4326", planned.spec.crs, always_xy=True)
    out = {}
    for (modality, year), items in found.items():
        tree = shapely.STRtree([footprint_in_grid(it.geometry, to_grid) for it in items])
        for chunk in plan_grid(planned.aoi.geometry, planned.spec):
            hits = sorted(int(i) for i in tree.query(shapely.box(*chunk.bounds), predicate="intersects"))
            out[(chunk.id, f"{modality}:{year}")] = [items[i].id for i in hits]
    return out


@pytest.mark.parametrize("block_chunks", [1, 2, 16])
def test_lazy_plan_equals_eager_plan_on_the_demo_region(demo_region, block_chunks):
    planned = plan_chunks(_config(demo_region, demo_region.items), block_chunks=block_chunks)
    eager_chunks = plan_grid(planned.aoi.geometry, planned.spec)
    lazy_chunks = sorted((c for _, cs in iter_chunks(planned.aoi.geometry, planned.spec, block_chunks) for c in cs),
                         key=lambda c: c.id)
    assert lazy_chunks == eager_chunks and len(eager_chunks) > 1  # tiles included
    assert planned.chunk_ids() == [c.id for c in eager_chunks]
    lazy, eager = _lazy_items(planned), _eager_items(planned)
    assert lazy == eager and any(lazy.values())


def test_stac_geoparquet_and_ndjson_plan_like_the_item_collection(demo_region, tmp_path):
    import rustac

    features = json.loads(open(demo_region.items).read())["features"]
    ndjson = tmp_path / "items.ndjson"
    ndjson.write_text("".join(json.dumps(f) + "\n" for f in features))
    parquet = tmp_path / "items.parquet"
    rustac.write_sync(str(parquet), features)
    reference = _lazy_items(plan_chunks(_config(demo_region, demo_region.items)))
    for catalog in (ndjson, parquet):
        planned = plan_chunks(_config(demo_region, catalog, profile=None))  # the profile rule reads the file lazily
        assert planned.profile.name == "demo"
        assert _lazy_items(planned) == reference, catalog.suffix


def test_partly_done_chunk_runs_only_its_missing_years(demo_region, tmp_path):
    from rtsmap.pipeline.vectorize import empty_polygons
    from rtsmap.workflows.run import make_plan

    plan = make_plan(_config(demo_region, demo_region.items, out=str(tmp_path / "inv.gpkg")))
    tasks = plan.tasks
    assert all(t.years == (2021, 2022) for t in tasks)
    done = tasks[0].chunk.id
    plan.store.write(2021, done, empty_polygons(plan.spec.crs), {"chunk_id": done, "year": 2021, "status": "processed"})
    again = {t.chunk.id: t for t in make_plan(_config(demo_region, demo_region.items, out=str(tmp_path / "inv.gpkg"))).tasks}
    assert again[done].years == (2022,) and set(again[done].items) == {2022}
    assert all(t.years == (2021, 2022) for cid, t in again.items() if cid != done)
    # the DEM's items are one object shared by the years of a task (pickled once)
    task = tasks[1]
    assert task.items[2021]["dem"] is task.items[2022]["dem"] and task.items[2021]["dem"]


def test_an_aoi_over_the_memory_budget_is_refused_with_numbers(demo_region):
    from rtsmap.pipeline.aoi import read_aoi

    aoi = read_aoi(demo_region.aoi, crs="EPSG:3413")
    spec = GridSpec(resolution=0.001, tile_px=256, overlap_px=32, tiles_per_chunk=1)  # 22 cm chunks
    with pytest.raises(ConfigError, match=r"would plan ~[\d,]+ chunks .* GB of plan in memory.*budget of 1.5 GB"):
        check_plan_memory(aoi, spec, budget_gb=1.5)
    assert check_plan_memory(aoi, GridSpec(), budget_gb=1.5) >= 1


def test_plan_over_the_budget_ends_before_the_search(demo_region, monkeypatch):
    monkeypatch.setenv("RTSMAP_PLAN_MEMORY_GB", "0.000001")
    with pytest.raises(ConfigError, match="RTSMAP_PLAN_MEMORY_GB"):
        plan_chunks(_config(demo_region, demo_region.items))


def test_execute_summary_keeps_counts_and_bounded_failures():
    """``execute`` keeps counts and the first failures, not every chunk-year's record."""
    from rtsmap.workflows.run import MAX_FAILURES_KEPT, ExecuteSummary

    summary = ExecuteSummary()
    for i in range(MAX_FAILURES_KEPT + 5):
        summary.add({"chunk_id": f"c{i}", "year": 2021, "status": "failed", "reason": "boom"})
    summary.add({"chunk_id": "x", "year": 2021, "status": "done", "seconds": {"load": 1.5, "infer": 0.5}})
    summary.add({"chunk_id": "y", "year": 2021, "status": "done", "seconds": {"load": 0.5, "infer": 0.25}})
    assert summary.chunk_years == MAX_FAILURES_KEPT + 7
    assert summary.failed == MAX_FAILURES_KEPT + 5 and len(summary.failures) == MAX_FAILURES_KEPT
    assert summary.failures[0]["chunk_id"] == "c0"
    assert summary.statuses["done"] == 2 and summary.seconds == {"load": 2.0, "infer": 0.75}
