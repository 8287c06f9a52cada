"""The README's main command: `rtsmap demo` with the committed demo model, end to end, and
`rtsmap demo --remote`, which runs it again reading every COG over HTTP from nginx."""

import os
import re
import subprocess
import sys

import geopandas as gpd
import pyogrio
import pytest
from shapely.geometry import box

from rtsmap.workflows.config import DEMO_MODEL
from rtsmap.workflows.demo import compare_inventories
from rtsmap.workflows.http_serve import nginx_executable


def rtsmap_demo(out, *extra):
    """`rtsmap demo` on a small region (2.5 km, two years) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "rtsmap.workflows.cli", "demo", "--out", str(out), "--size-km", "2.5", "--years", "2021-2022", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `rtsmap demo` run (its folder and process), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, rtsmap_demo(out)


def test_demo_command_end_to_end(demo_run):
    assert DEMO_MODEL.is_file(), "the demo model is part of the repository"
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    gpkg = out / "demo_inventory.gpkg"
    assert f"inventory: {gpkg}" in proc.stdout
    layers = {name for name, _ in pyogrio.list_layers(gpkg)}
    assert {"rts_2021", "rts_2022", "coverage_2021", "coverage_2022", "run_metadata"} <= layers
    # Coverage parts split by modality gaps (cloud) stay polygons: the layers are MULTIPOLYGON
    # and GDAL warns (a non-conformant GeoPackage) on a GEOMETRYCOLLECTION.
    assert "GEOMETRYCOLLECTION" not in proc.stderr, proc.stderr[-2000:]
    for year in (2021, 2022):
        coverage = gpd.read_file(gpkg, layer=f"coverage_{year}")
        assert set(coverage.geom_type) <= {"Polygon", "MultiPolygon"}, coverage.geom_type.value_counts()
    # Precision/recall/F1 against the region's truth, per year.
    scores = re.findall(r"(\d{4}) vs truth: precision ([\d.]+), recall ([\d.]+), F1 ([\d.]+)", proc.stdout)
    assert [s[0] for s in scores] == ["2021", "2022"]
    # A trained model finds slumps on a region it never saw (the demo model was trained on
    # another seed); a broken pipeline (misregistered bands, wrong normalisation) finds none.
    assert max(float(s[2]) for s in scores) > 0.3, proc.stdout
    # Running it again reuses the region and every finished chunk-year.
    again = rtsmap_demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    # (the run's progress line: "0 to do, N already done", or "nothing to do" in the block planner)
    assert re.search(r"0 to do, \d+ already done|; nothing to do", again.stderr), again.stderr[-2000:]


@pytest.mark.skipif(nginx_executable() is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")
def test_demo_remote_reads_over_http_and_gets_the_same_inventory(demo_run):
    out, first = demo_run
    assert first.returncode == 0, first.stderr[-3000:]
    proc = rtsmap_demo(out, "--remote")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The remote run starts from an empty work directory: every chunk-year is read from nginx.
    match = re.search(r"remote: the inventory read over HTTP \((\d+) requests, ([\d.]+) MB\) equals the local one", proc.stdout)
    assert match, proc.stdout
    # Every COG of the region (two years, all used) was opened over HTTP at least once.
    assert int(match.group(1)) >= len(list((out / "region").rglob("*.tif"))), proc.stdout
    served = (out / "remote" / "items.json").read_text()
    assert "http://127.0.0.1:" in served and str(out / "region") not in served
    local = out / "demo_inventory.gpkg"
    remote = out / "remote" / "demo_inventory.gpkg"
    assert compare_inventories(local, remote, (2021, 2022)) == []
    assert len(gpd.read_file(remote, layer="rts_2022")) > 0  # the comparison compares slumps, not nothing


def test_demo_remote_without_nginx_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from rtsmap.workflows import cli, http_serve

    monkeypatch.setattr(http_serve, "nginx_executable", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--remote", "--out", str(tmp_path / "demo")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nginx package" in err[0], err
    assert not (tmp_path / "demo").exists()  # checked before any work


def test_compare_inventories_finds_a_missing_or_moved_slump(tmp_path):
    crs = "EPSG:3413"

    def write(path, boxes_by_year):
        for year, boxes in boxes_by_year.items():
            gpd.GeoDataFrame({"rts_id": list(range(len(boxes)))}, geometry=boxes, crs=crs).to_file(path, layer=f"rts_{year}")
        return path

    slumps = [box(0, 0, 50, 40), box(200, 0, 260, 30)]
    a = write(tmp_path / "a.gpkg", {2021: slumps, 2022: []})
    assert compare_inventories(a, write(tmp_path / "same.gpkg", {2021: slumps[::-1], 2022: []}), (2021, 2022)) == []
    missing = write(tmp_path / "missing.gpkg", {2021: slumps[:1], 2022: []})
    assert compare_inventories(a, missing, (2021, 2022)) == ["2021: 2 slumps locally, 1 over HTTP"]
    moved = write(tmp_path / "moved.gpkg", {2021: [slumps[0], box(201, 0, 261, 30)], 2022: []})
    assert re.match(r"2021: the polygons differ over [\d.]+% of their area", compare_inventories(a, moved, (2021, 2022))[0])
