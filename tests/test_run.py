"""`rtsmap run` end to end: a real LocalCluster, real worker kills, resume, partial runs.

Every run here goes through the real stages (STAC items of the synthetic demo region, rasterio
reads of its COGs, onnxruntime, vectorize, seam merge, GeoPackage). The model is a constant ONNX
detector (the same box in every tile) with some real convolution work added whose result is
multiplied by zero: its detections do not depend on the pixels, but each tile costs real compute,
so a task is still running when a test kills a worker or the whole run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import pyogrio
import pytest
from onnx import helper, numpy_helper

from onnx_models import ConstantDetection, make_constant_detector, model_metadata
from rtsmap.workflows.config import ClusterConfig, GridConfig, InferenceConfig, RunConfig
from rtsmap.workflows.fragments import shard_of

RTSMAP = [sys.executable, "-m", "rtsmap.workflows.cli"]
YEARS = (2021, 2022)
TILE = 256
# 3x3 convolutions of 64 channels over each 256x256 tile: about 0.4 s per tile on one core, so a
# one-tile chunk-year is still running when a test kills its worker.
WORK_LAYERS = 6
WORK_CHANNELS = 64
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_working_detector(path: Path, *, layers: int = WORK_LAYERS, seed: int = 0) -> Path:
    """A constant detector whose scores also pass through ``layers`` convolutions times zero.

    onnxruntime does not simplify ``x * 0`` for a non-constant ``x`` (it would change NaN
    semantics), so the convolutions run on every call and the outputs stay exactly constant.
    """
    meta = model_metadata(tile_size=TILE, max_detections=4)
    make_constant_detector(path, [ConstantDetection(box=(40, 40, 80, 90), score=0.9)], meta)
    model = onnx.load(path)
    graph = model.graph
    for node in graph.node:
        if list(node.output) == ["scores"]:
            node.output[0] = "scores_const"
    rng = np.random.default_rng(seed)
    nodes, inits, x, channels = [], [], "optical", 4
    for i in range(layers):
        w = (rng.standard_normal((WORK_CHANNELS, channels, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"work_w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"work_w{i}"], [f"work_c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"work_c{i}"], [f"work_r{i}"]))
        x, channels = f"work_r{i}", WORK_CHANNELS
    inits.append(numpy_helper.from_array(np.zeros([1], np.float32), "work_zero"))
    nodes += [
        helper.make_node("ReduceMean", [x], ["work_mean"], axes=[1, 2, 3], keepdims=1),  # [B,1,1,1]
        helper.make_node("Flatten", ["work_mean"], ["work_flat"], axis=1),  # [B, 1]
        helper.make_node("Mul", ["work_flat", "work_zero"], ["work_nothing"]),
        helper.make_node("Add", ["scores_const", "work_nothing"], ["scores"]),
    ]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return make_working_detector(tmp_path_factory.mktemp("model") / "working.onnx")


def run_config(region, model: Path, out: Path, **changes) -> RunConfig:
    """The test runs' configuration: one tile per chunk, so the small region has 4 chunks x 2 years."""
    values = dict(
        aoi=str(region.aoi),
        years=YEARS,
        catalog=str(region.items),
        profile="demo",
        model=str(model),
        out=str(out),
        grid=GridConfig(tiles_per_chunk=1),
        inference=InferenceConfig(batch_size=4, threads=1),
        cluster=ClusterConfig(n_workers=2, timeout_s=60),
    )
    values.update(changes)
    return RunConfig(**values)


def cli_args(region, model: Path, out: Path) -> list[str]:
    """The same run as :func:`run_config`, as a command line."""
    config = Path(str(out) + ".yaml")
    config.write_text("grid: {tiles_per_chunk: 1}\ninference: {threads: 1, batch_size: 4}\ncluster: {timeout_s: 60}\n")
    return RTSMAP + [
        "run",
        "--aoi", str(region.aoi),
        "--years", ",".join(map(str, YEARS)),
        "--profile", "demo",
        "--catalog", str(region.items),
        "--model", str(model),
        "--config", str(config),
        "--workers", "2",
        "--out", str(out),
    ]  # fmt: skip


def read_layers(path: Path) -> dict[str, object]:
    """Every rts_/coverage_ layer, sorted, with the columns that must not change between runs."""
    layers = {}
    for name, _ in pyogrio.list_layers(path):
        if not name.startswith(("rts_2", "coverage_")):  # run_metadata, rts_tracks: not per-run geometry
            continue
        df = pyogrio.read_dataframe(path, layer=name)
        # The contribution date is the day the file was written, not a result.
        df = df.drop(columns=[c for c in ("ContributionDate",) if c in df.columns])
        df["wkb"] = df.geometry.normalize().to_wkb(hex=True)
        keys = ["rts_id"] if name.startswith("rts_") else ["chunk_id", "status"]
        layers[name] = df.drop(columns="geometry").sort_values(keys + ["wkb"]).reset_index(drop=True)
    return layers


def assert_same_inventory(path: Path, reference: Path) -> None:
    got, want = read_layers(path), read_layers(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].equals(want[name]), f"layer {name} differs:\n{got[name]}\n{want[name]}"


def fragments(workdir: Path) -> dict[str, list[str]]:
    """File names under each year (in its shard folders) of the (single) run key in a work directory."""
    (key,) = [p for p in workdir.iterdir() if p.is_dir()]
    return {year.name: sorted(p.name for p in year.rglob("*") if p.is_file())
            for year in sorted(key.iterdir()) if year.name.isdigit()}


def markers(workdir: Path) -> list[Path]:
    """The done markers: <workdir>/<run key>/<year>/<shard>/<chunk>.json."""
    return sorted(p for p in workdir.glob("*/*/*/*.json") if not p.name.endswith(".failed.json"))


def assert_one_fragment_each(workdir: Path, n_chunks: int) -> None:
    """Every chunk-year has exactly one parquet and one marker, and nothing else."""
    found = fragments(workdir)
    assert sorted(found) == [str(y) for y in YEARS]
    for year, names in found.items():
        parquet = [n for n in names if n.endswith(".parquet")]
        json_ = [n for n in names if n.endswith(".json")]
        assert len(parquet) == len(json_) == n_chunks and len(names) == 2 * n_chunks, (year, names)
        assert [n[: -len(".parquet")] for n in parquet] == [n[: -len(".json")] for n in json_]


@pytest.fixture(scope="module")
def reference(demo_region, model_path, tmp_path_factory):
    """An undisturbed run through the command line (LocalCluster, 2 worker processes)."""
    out = tmp_path_factory.mktemp("reference") / "inv.gpkg"
    started = time.monotonic()
    proc = subprocess.run(cli_args(demo_region, model_path, out), capture_output=True, text=True, env=ENV, timeout=300)
    proc.seconds = time.monotonic() - started
    return out, proc


def test_end_to_end_cli(reference):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "INFO" not in proc.stderr  # Dask's INFO logs only with -v
    # The plan line and the summary.
    assert "8 chunk-years run, 0 already done" in proc.stderr
    assert "[rtsmap] 8/8 chunk-years done, 0 failed" in proc.stderr  # progress (log lines off a terminal)
    assert f"inventory: {out}" in proc.stdout
    for year in YEARS:
        # One box per tile, 4 tiles, none on a seam: 4 slumps of 40 x 50 px = 20 ha each, but the
        # tiles reach past the AOI and only the one box that touches it is kept.
        # Coverage: per chunk, the part with every modality, and optical's gap (sar+dem) where
        # that year's scene has one; the summary counts the layer's rows.
        line = re.search(rf"{year}: 1 slumps, 20.00 ha; coverage: (\d+) processed, 0 no-data, 0 failed", proc.stdout)
        assert line, proc.stdout
        assert int(line.group(1)) == len(pyogrio.read_dataframe(out, layer=f"coverage_{year}")) >= 4
        png = out.with_name(f"{out.stem}_{year}.png")
        assert f"quick-look: {png}" in proc.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PARTIAL" not in proc.stdout
    # One hillshade thumbnail per chunk (the DEM is static) for the quick-look maps.
    thumbnails = sorted(Path(str(out) + ".work").rglob("hillshade/*/*.npz"))  # in shard folders
    assert len(thumbnails) == 4
    finite = []
    for path in thumbnails:  # shard order is not chunk order: check them all
        with np.load(path) as npz:
            finite.append(np.isfinite(npz["image"]).mean())
            assert npz["transform"][0] == 40.0
    assert max(finite) > 0.5 and min(finite) > 0.0

    names = {name for name, _ in pyogrio.list_layers(out)}
    assert names == {"rts_2021", "rts_2022", "coverage_2021", "coverage_2022", "run_metadata", "rts_tracks"}
    for year in YEARS:
        rts = pyogrio.read_dataframe(out, layer=f"rts_{year}")
        assert len(rts) == 1 and rts.crs.to_epsg() == 3413
        assert (rts["year"] == year).all() and np.allclose(rts["score"], 0.9)
        assert np.allclose(rts.geometry.area, 40 * 50 * 100.0)
        assert all(f"rtsmap-demo-s1-{year}" in s for s in rts["source_items"])
        cov = pyogrio.read_dataframe(out, layer=f"coverage_{year}")
        assert set(cov["status"]) == {"processed"} and len(cov) >= 4 and cov["chunk_id"].nunique() == 4
    meta = pyogrio.read_dataframe(out, layer="run_metadata", read_geometry=False)
    values = dict(zip(meta["key"], meta["value"]))
    assert values["chunks"] == "4" and '"tiles_per_chunk": 1' in values["configuration"]
    # The keys pipeline.inventory reads for the ARTS columns: the Notes name the model.
    import json

    model = json.loads(values["model"])
    assert model["name"] == "test-detector" and model["version"] == "0.0-test"
    assert json.loads(values["region_name"]) == "aoi"  # the AOI file's stem
    dates = json.loads(values["base_map_dates"])
    assert sorted(dates) == [str(y) for y in YEARS] and all(d.startswith(k) for k, d in dates.items())
    for year in YEARS:
        rts = pyogrio.read_dataframe(out, layer=f"rts_{year}")
        assert all("model test-detector 0.0-test" in note for note in rts["Notes"]), list(rts["Notes"])
        assert list(rts["RegionName"]) == ["aoi"] and list(rts["BaseMapDate"]) == [dates[str(year)]]

    # GDAL's own command-line reader agrees (CI installs gdal-bin).
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo not installed (apt-get install gdal-bin)")
    info = subprocess.run([ogrinfo, "-so", "-al", str(out)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    for year in YEARS:
        assert f"Layer name: rts_{year}" in info.stdout and f"Layer name: coverage_{year}" in info.stdout
    counts = [line.split(":")[1].strip() for line in info.stdout.splitlines() if line.startswith("Feature Count:")]
    assert counts.count("1") >= 2  # the two rts_ layers (and the one track of rts_tracks)
    coverage_rows = [str(len(pyogrio.read_dataframe(out, layer=f"coverage_{year}"))) for year in YEARS]
    assert all(n in counts for n in coverage_rows)  # the two coverage_ layers


@pytest.mark.slow
def test_worker_killed_mid_run(demo_region, model_path, reference, tmp_path):
    """SIGKILL a worker process while it runs a task: the task runs again, nothing is lost or doubled."""
    import psutil

    from rtsmap.workflows.cluster import open_cluster
    from rtsmap.workflows.run import execute, finish, make_plan

    config = run_config(demo_region, model_path, tmp_path / "inv.gpkg")
    plan = make_plan(config)
    tasks = plan.tasks
    assert len(tasks) == 4 and all(len(t.years) == 2 for t in tasks)  # one task per chunk, all its years
    killed: dict[str, object] = {}

    with open_cluster(config.cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)  # worker address -> pid

        def kill_a_busy_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "pid" not in killed:
                # After the first chunk-year is finished, kill a worker that is running a task.
                if markers(config.work_dir):
                    for address, keys in client.processing().items():
                        if keys and address in pids:
                            killed.update(pid=pids[address], address=address, keys=list(keys))
                            os.kill(pids[address], signal.SIGKILL)
                            return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        summary = execute(plan, client, stream=StringIO())
        killer.join()
        assert "pid" in killed, "no worker was killed: the tasks ran too fast"
        assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == "zombie"
        assert killed["pid"] not in client.run(os.getpid).values()
    # The worker may have died mid-write (leaving its temporary file) or not; plant one so the
    # clean-up is always checked: a run whose chunk-years are all done removes such leftovers.
    (plan.store.root / str(YEARS[0]) / ".dead-writer.parquet.x1y2z3.tmp").write_bytes(b"half a parquet")
    result = finish(plan, started=time.monotonic(), started_iso="")

    # Every chunk-year came back once (execute keeps counts), processed, and its fragment exists exactly once.
    assert summary.chunk_years == sum(len(t.years) for t in tasks) and not summary.failures
    # "skipped": the killed worker had written the fragment but not yet reported it; the rerun
    # found the fragment and did not compute it twice.
    assert set(summary.statuses) <= {"processed", "skipped"}
    assert not result.partial
    assert_one_fragment_each(config.work_dir, n_chunks=4)
    assert_same_inventory(Path(config.out), reference[0])


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_interrupt_kill_and_resume(demo_region, model_path, reference, tmp_path):
    """Ctrl-C, then SIGKILL of the whole run, then the same command again: it finishes the rest."""
    out = tmp_path / "inv.gpkg"
    workdir = Path(str(out) + ".work")
    args = cli_args(demo_region, model_path, out)

    # 1. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) after some work.
    proc = start_group(args)
    try:
        assert _wait_for(lambda: len(markers(workdir)) >= 1, proc), proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, stderr
    message = "interrupted: finished work is kept; run the same command again to resume"
    assert stderr.rstrip().splitlines()[-1] == message
    # Worker processes leave Ctrl-C to the main process (no KeyboardInterrupt traceback from each).
    assert "KeyboardInterrupt" not in stderr and "Process Dask Worker process" not in stderr, stderr
    assert not out.exists()
    after_interrupt = len(markers(workdir))
    assert 1 <= after_interrupt < 8

    # 2. The same command, SIGKILLed (process group: the CLI and its worker processes) mid-way.
    proc = start_group(args)
    try:
        assert _wait_for(lambda: len(markers(workdir)) > after_interrupt, proc), proc.communicate()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done = markers(workdir)
    assert after_interrupt < len(done) <= 8 and not out.exists()

    # A crash between the two renames leaves a parquet without marker, or a temporary file: those
    # chunk-years are not finished. Fake both for a chunk-year that is not done (or undo one).
    if len(done) == 8:
        done[-1].unlink()
        done = done[:-1]
    key_dir = done[0].parent.parent.parent  # <run key>/<year>/<shard>/<chunk>.json
    chunk_ids = sorted(pyogrio.read_dataframe(reference[0], layer=f"coverage_{YEARS[0]}")["chunk_id"])
    pending = [key_dir / str(y) / shard_of(c) / c for y in YEARS for c in chunk_ids
               if not (key_dir / str(y) / shard_of(c) / f"{c}.json").exists()]
    half = pending[0]
    half.parent.mkdir(parents=True, exist_ok=True)
    half.with_suffix(".parquet").write_bytes(b"PAR1 half-written")
    (half.parent / f".{half.name}.json.abc123.tmp").write_text('{"status": "proc')

    # 3. The same command once more: skips what is done, redoes the rest, same inventory.
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "8 chunk-years run, 0 already done" not in proc.stderr
    assert f"{8 - len(done)} chunk-years run, {len(done)} already done" in proc.stderr
    assert_same_inventory(out, reference[0])
    # The half-written fragment was recomputed (a real GeoParquet now, with its marker).
    assert half.with_suffix(".json").is_file()
    parquet = half.with_suffix(".parquet")
    assert parquet.read_bytes()[:4] == b"PAR1" and parquet.stat().st_size > 100


def start_group(args: list[str]) -> subprocess.Popen:
    """Start the command in its own process group (it and its worker processes can be signalled together)."""
    pipe = subprocess.PIPE
    return subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, env=ENV, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Leave no process of a test run behind (the group was started by this test)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def copy_region(region, dest: Path):
    """A private copy of the demo region (the items' absolute asset hrefs point into the copy)."""
    from dataclasses import replace

    shutil.copytree(region.root, dest)
    for name in ("items.json", "items.ndjson"):
        path = dest / "stac" / name
        path.write_text(path.read_text().replace(str(region.root), str(dest)))
    return replace(region, root=dest, aoi=dest / region.aoi.name, items=dest / "stac" / "items.json")


@pytest.mark.slow
def test_corrupt_asset_is_partial_then_resumed(demo_region, model_path, reference, tmp_path):
    """A corrupt SAR scene: its chunk-years fail with the reason, the rest is mapped, exit 3.

    With the file repaired, the same command (plus --overwrite) computes only the failed ones.
    """
    region = copy_region(demo_region, tmp_path / "region")
    (vv,) = (region.root / "cogs" / "rtsmap-demo-s1-rtc").glob("*2022*/vv.tif")
    good = vv.read_bytes()
    vv.write_bytes(b"this is not a GeoTIFF" + good[:100])
    out = tmp_path / "inv.gpkg"
    args = cli_args(region, model_path, out)

    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "2021: 1 slumps" in proc.stdout and "2022: 0 slumps" in proc.stdout
    assert "PARTIAL: 4 chunk-years failed" in proc.stdout
    cov = pyogrio.read_dataframe(out, layer="coverage_2022")
    assert sorted(cov["status"]) == ["failed"] * 4
    assert all("vv.tif" in reason for reason in cov["reason"]), list(cov["reason"])
    done = pyogrio.read_dataframe(out, layer="coverage_2021")
    assert sorted(done["status"]) == ["processed"] * 8
    # Each chunk: the part with every modality, and optical's gap mapped with SAR + DEM.
    assert sorted(done["modalities"]) == ["optical+sar+dem"] * 4 + ["sar+dem"] * 4
    meta = pyogrio.read_dataframe(out, layer="run_metadata", read_geometry=False)
    assert "vv.tif" in dict(zip(meta["key"], meta["value"]))["failures"]

    vv.write_bytes(good)
    proc = subprocess.run(args + ["--overwrite"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 chunk-years run, 4 already done" in proc.stderr
    assert "PARTIAL" not in proc.stdout
    assert_one_fragment_each(Path(str(out) + ".work"), n_chunks=4)
    got, want = read_layers(out), read_layers(reference[0])
    for name in want:
        # Same results; only the asset hrefs' folder differs, and hrefs are not in the layers.
        assert got[name].equals(want[name]), name


def test_cli_unreachable_scheduler_is_one_line(demo_region, model_path, tmp_path):
    """A scheduler address nothing listens on, through the command line: one line, exit 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = cli_args(demo_region, model_path, tmp_path / "inv.gpkg") + ["--cluster", f"tcp://127.0.0.1:{port}"]
    Path(str(tmp_path / "inv.gpkg") + ".yaml").write_text("grid: {tiles_per_chunk: 1}\ncluster: {timeout_s: 2}\n")
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[rtsmap]")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "inv.gpkg").exists()
