"""Finish at scale: fragments in sharded folders, read and merged a block at a time, equal to one
global merge; the run's fixes for a work directory that cannot be written.

Real components: the fragment store on disk, ``pipeline.merge`` (``merge_block``,
``merge_by_blocks``, ``merge_detections``), the grid's blocks, a thread pool and a Dask
LocalCluster as executors.
"""

from __future__ import annotations

import concurrent.futures
import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

import merge_scenes
from rtsmap.pipeline.grid import block_cells, plan_blocks
from rtsmap.pipeline.merge import merge_detections
from rtsmap.workflows.fragments import FragmentStore, shard_of
from rtsmap.workflows.run import gather_year

SPEC = merge_scenes.SPEC


def canonical(gdf):
    cols = ["rts_id", "year", "score", "area_m2", "perimeter_m", "n_detections", "tile_ids", "chunk_ids", "source_items"]
    df = gdf[cols].copy()
    df["wkb"] = [g.wkb_hex for g in gdf.geometry]
    return df.sort_values("rts_id").reset_index(drop=True)


def _write_fragments(store: FragmentStore, detections: gpd.GeoDataFrame, year: int) -> None:
    for chunk_id, part in detections.groupby("chunk_id"):
        record = {"chunk_id": chunk_id, "year": year, "status": "processed", "items": {"optical": ["S2_x"]},
                  "coverage": [{"status": "processed", "reason": "", "wkb": shapely.box(0, 0, 1, 1).wkb_hex}]}
        store.write(year, chunk_id, gpd.GeoDataFrame(part.reset_index(drop=True), crs=detections.crs), record)


@pytest.mark.parametrize("block_chunks", [1, 2])
@pytest.mark.parametrize("scene", ["clean", "noisy"])
def test_finish_by_blocks_equals_one_global_merge(tmp_path, scene, block_chunks):
    seed, n, tiles, noisy = merge_scenes.SCENES[scene]
    detections = merge_scenes.random_detections(seed, n, tiles, noisy=noisy)
    detections = detections[detections["year"] == 2021].reset_index(drop=True)
    store = FragmentStore(tmp_path / "key")
    _write_fragments(store, detections, 2021)
    side = tiles * merge_scenes.STRIDE
    aoi = shapely.box(0, -side, side, 0)
    blocks = plan_blocks(aoi, SPEC, block_chunks)
    assert len(blocks) > 4  # groups cross block borders
    cells = (block_cells(aoi, SPEC, b) for b in blocks)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        merged, rows, failures, used = gather_year(store, 2021, SPEC, aoi, cells, block_chunks=block_chunks,
                                                   executor=pool, limit=3)
    whole = merge_detections(detections, spec=SPEC)
    whole = whole[whole.intersects(aoi)].reset_index(drop=True)
    assert len(whole) > 100
    assert canonical(merged).equals(canonical(whole))
    done = {c for c in detections["chunk_id"]}
    assert {r["chunk_id"] for r in rows if r["status"] == "processed"} == done
    assert {f["chunk_id"] for f in failures} == {r["chunk_id"] for r in rows if r["status"] == "failed"}
    assert not done & {f["chunk_id"] for f in failures} and used == {"S2_x"}


def test_fragments_are_sharded_and_old_unsharded_work_dirs_still_read(tmp_path):
    store = FragmentStore(tmp_path / "key")
    gdf = gpd.GeoDataFrame({"score": [0.5]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:3413")
    store.write(2021, "3413_10m_c1_r2", gdf, {"status": "processed"})
    shard = shard_of("3413_10m_c1_r2")
    assert len(shard) == 2 and (tmp_path / "key" / "2021" / shard / "3413_10m_c1_r2.json").is_file()
    assert (tmp_path / "key" / "2021" / shard / "3413_10m_c1_r2.parquet").is_file()
    # A work directory written before sharding: <year>/<chunk>.{parquet,json,failed.json}
    legacy = tmp_path / "key" / "2021"
    gdf.to_parquet(legacy / "3413_10m_c5_r5.parquet", index=False)
    (legacy / "3413_10m_c5_r5.json").write_text(json.dumps({"status": "processed", "old": True}))
    (legacy / "3413_10m_c6_r6.failed.json").write_text(json.dumps({"reason": "old failure"}))
    assert store.is_done(2021, "3413_10m_c5_r5") and store.read_record(2021, "3413_10m_c5_r5")["old"]
    assert len(store.read_detections(2021, "3413_10m_c5_r5")) == 1
    assert store.read_failure(2021, "3413_10m_c6_r6") == {"reason": "old failure"}
    assert set(store.failures(2021)) == {"3413_10m_c6_r6"}
    # A new success of an old failure clears the old record.
    store.write(2021, "3413_10m_c6_r6", gdf, {"status": "processed"})
    assert store.read_failure(2021, "3413_10m_c6_r6") is None and not store.failures(2021)
    assert not store.is_done(2021, "3413_10m_c7_r7")


def test_bounded_map_keeps_order_and_at_most_limit_in_flight():
    import threading
    import time

    from rtsmap.workflows.run import bounded_map

    running, peak, lock = [0], [0], threading.Lock()

    def work(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return x * x

    submitted = []

    def jobs():
        for x in range(40):
            submitted.append(x)
            yield x

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        out = []
        for value in bounded_map(pool, work, jobs(), limit=3):
            out.append(value)
            assert len(submitted) - len(out) <= 3
    assert out == [x * x for x in range(40)] and peak[0] <= 3


# --- the run's fixes: work directory checked first, --out never replaced, disk full ends in 3 ------


def _config(demo_region, tmp_path, **changes):
    from rtsmap.workflows.config import GridConfig, RunConfig

    values = dict(aoi=str(demo_region.aoi), years=(2021,), catalog=str(demo_region.items), profile="demo",
                  out=str(tmp_path / "inv.gpkg"), grid=GridConfig(overlap_px=8, tiles_per_chunk=1))
    values.update(changes)
    return RunConfig(**values)


def test_a_work_directory_that_cannot_be_written_ends_the_plan(demo_region, tmp_path):
    from rtsmap.pipeline.errors import OutputError
    from rtsmap.workflows.run import make_plan

    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write to the work directory"):
        make_plan(_config(demo_region, tmp_path, workdir=str(tmp_path / "afile" / "work")))


def test_an_inventory_that_appeared_during_the_run_is_not_replaced(demo_region, tmp_path):
    import time

    from rtsmap.pipeline.errors import OutputError
    from rtsmap.workflows.run import finish, make_plan

    config = _config(demo_region, tmp_path)
    plan = make_plan(config)
    out = tmp_path / "inv.gpkg"
    out.write_bytes(b"another run's inventory")  # a second run with the same --out finished first
    with pytest.raises(OutputError, match="overwrite"):
        finish(plan, started=time.monotonic(), started_iso="")
    assert out.read_bytes() == b"another run's inventory"
    # With --overwrite the same finish replaces it.
    finish(make_plan(_config(demo_region, tmp_path, overwrite=True)), started=time.monotonic(), started_iso="")
    assert out.read_bytes().startswith(b"SQLite format 3")


def test_a_worker_that_cannot_write_fragments_ends_the_run_with_3_and_an_inventory(demo_region, tmp_path):
    """A fragment write that fails on a worker (here: its shard folder is a file, as a full disk
    fails a write) stops the submissions; what finished is written, exit status 3."""
    from click.testing import CliRunner
    from distributed import Client, LocalCluster

    from rtsmap.workflows.run import make_plan, run_command

    config = _config(demo_region, tmp_path)
    plan = make_plan(config)
    first = next(plan.iter_tasks())
    shard = plan.store.root / "2021" / shard_of(first.chunk.id)
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text("in the way")
    (tmp_path / "run.yaml").write_text("max_in_flight: 1\nretries: 0\ngrid: {tiles_per_chunk: 1, overlap_px: 8}\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        result = CliRunner().invoke(run_command, [
            "--config", str(tmp_path / "run.yaml"), "--aoi", str(demo_region.aoi), "--years", "2021",
            "--catalog", str(demo_region.items), "--profile", "demo", "--out", str(tmp_path / "inv.gpkg"),
            "--cluster", cluster.scheduler_address])
    assert result.exit_code == 3, result.output + repr(result.exception)
    assert "PARTIAL" in result.output and "cannot write to the work directory" in result.output
    coverage = gpd.read_file(tmp_path / "inv.gpkg", layer="coverage_2021")
    assert set(coverage["status"]) == {"failed"}
    assert sorted(coverage["chunk_id"]) == plan.planned.chunk_ids() and len(coverage) > 1
    assert not plan.store.is_done(2021, first.chunk.id)


def _fragments_for_plan(plan, years):
    """A slump in the first tile of every chunk, each year: grown in the second year, the first
    chunk's gone (its ground processed) and the second chunk's first seen then."""
    from rtsmap.workflows.run import chunk_core

    inside = 0
    for chunk in plan.iter_chunks():
        tile = chunk.tiles[0]
        minx, miny, maxx, maxy = tile.bounds
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        core = chunk_core(chunk, plan.aoi.geometry)
        # Slumps centred outside the AOI would be dropped: those chunks get none.
        k = inside if plan.aoi.geometry.contains(shapely.Point(cx, cy)) else -1
        inside += k >= 0
        for n, year in enumerate(years):
            radius = 150.0 + (60.0 * n if k % 2 else 0.0)
            keep = k >= 0 and not ((k == 0 and n > 0) or (k == 1 and n == 0))
            geoms = [shapely.Point(cx, cy).buffer(radius)] if keep else []
            frame = gpd.GeoDataFrame({
                "score": [0.9] * len(geoms), "area_m2": [g.area for g in geoms],
                "perimeter_m": [g.length for g in geoms], "year": [year] * len(geoms),
                "chunk_id": [chunk.id] * len(geoms), "tile_id": [tile.id] * len(geoms),
                "source_items": ["S2_x"] * len(geoms), "invalid_fraction": [0.0] * len(geoms)},
                geometry=geoms, crs=plan.spec.crs)
            record = {"chunk_id": chunk.id, "year": year, "status": "processed", "items": {"optical": ["S2_x"]},
                      "coverage": [{"status": "processed", "reason": "", "wkb": core.wkb_hex,
                                    "modalities": "optical"}]}
            plan.store.write(year, chunk.id, frame, record)


def test_finish_change_summary_and_quicklooks_equal_those_of_the_file(demo_region, tmp_path, validate_gpkg):
    """finish no longer reads its GeoPackage back: the change summary and the change quick-look
    it makes from the writer's linked layers equal those made from the layers read from the file."""
    import time

    import matplotlib.image

    from rtsmap.pipeline.inventory import change_summary, read_coverage, read_inventory, read_tracks
    from rtsmap.workflows.quicklook import write_change_quicklooks
    from rtsmap.workflows.run import finish, make_plan

    years = (2021, 2022)
    plan = make_plan(_config(demo_region, tmp_path, years=years))
    _fragments_for_plan(plan, years)
    result = finish(plan, started=time.monotonic(), started_iso="")
    out = tmp_path / "inv.gpkg"
    validate_gpkg(out)
    layers, coverage = read_inventory(out), read_coverage(out)
    assert result.change == change_summary(layers, coverage)
    row = result.change[2022]
    assert row["new"] + row["first_seen"] == 1 and row["no_longer_seen"] == 1 and row["grown"] > 0
    assert set(read_tracks(out)["status"]) >= {"not_seen", "active"}
    assert not list(plan.config.work_dir.glob(".quicklooks-*"))  # the staging folder is removed
    names = sorted(p.name for p in result.quicklooks)
    assert names == ["inv_2021.png", "inv_2022.png", "inv_change_2021-2022.png"]
    (tmp_path / "ref").mkdir()
    (ref,) = write_change_quicklooks(tmp_path / "ref" / "inv.gpkg", layers, coverage)
    got = matplotlib.image.imread(tmp_path / "inv_change_2021-2022.png")
    assert got.shape == matplotlib.image.imread(ref).shape
    assert np.array_equal(got, matplotlib.image.imread(ref))
