"""Outputs under hostile conditions: the inventory GeoPackage and the work directory's fragments.

Nothing lost (a failed write leaves the previous file and every finished fragment), nothing
replaced without overwrite (also when a second run finishes first), nothing leaked (credentials
stripped from what is written), and files every reader opens (GeoPackage 1.2, checked with the
system's ``ogrinfo``).

Disk full is simulated with a file-size limit (``RLIMIT_FSIZE``) in a child process: writing past
it fails with EFBIG, which reaches the code as the same kind of OSError as ENOSPC. Tests run as
root here, so a read-only folder is simulated by a path under a regular file (ENOTDIR), which
stops root too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import geopandas as gpd
import pyogrio
import pytest
import shapely

from rtsmap.pipeline.errors import OutputError
from rtsmap.pipeline.inventory import (
    GPKG_VERSION, read_inventory, read_run_metadata, redact_metadata, remove_stale_temporaries, write_inventory,
)
from rtsmap.workflows.fragments import FragmentStore
from rtsmap.workflows.quicklook import check_quicklooks, write_quicklooks

CRS = "EPSG:3413"
X0, Y0 = -2_300_000.0, 200_000.0
SECRET_URL = "https://user:PASSWORD@stac.example.org/api?subscription-key=KEY123&sig=SIG456"


def slumps(n, year):
    geoms = [shapely.box(X0 + 500 * k, Y0, X0 + 500 * k + 200, Y0 + 150) for k in range(n)]
    return gpd.GeoDataFrame({"rts_id": [f"3413_{year}_x{k}" for k in range(n)], "score": [0.9] * n},
                            geometry=geoms, crs=CRS)


def coverage():
    return gpd.GeoDataFrame({"status": ["processed"], "reason": [""]},
                            geometry=[shapely.box(X0, Y0 - 1000, X0 + 3000, Y0 + 1000)], crs=CRS)


def meta(**extra):
    return {"configuration": {"catalog": SECRET_URL, "headers": {"Ocp-Apim-Subscription-Key": "KEY123"}},
            "failures": [{"reason": f"HTTP 403 for {SECRET_URL}"}], "software_version": "test", **extra}


def write(path, years=(2021,), n=2, **kwargs):
    return write_inventory(path, {y: slumps(n, y) for y in years}, {y: coverage() for y in years}, meta(), **kwargs)


# --- credentials --------------------------------------------------------------------------------


def test_credentials_never_reach_the_geopackage(tmp_path):
    path = write(tmp_path / "inv.gpkg")
    data = path.read_bytes()
    for secret in (b"PASSWORD", b"KEY123", b"SIG456", b"user:"):
        assert secret not in data, secret
    stored = read_run_metadata(path)
    assert stored["configuration"]["catalog"] == "https://stac.example.org/api?..."
    assert "stac.example.org" in stored["failures"][0]["reason"]


def test_redact_metadata_keeps_structure_and_numbers():
    out = redact_metadata({"a": [1, 2.5, None, True], "b": {"url": SECRET_URL}, 3: ("x",)})
    assert out == {"a": [1, 2.5, None, True], "b": {"url": "https://stac.example.org/api?..."}, "3": ["x"]}


def test_header_values_are_stripped_by_their_key(tmp_path):
    path = write(tmp_path / "inv.gpkg")
    assert read_run_metadata(path)["configuration"]["headers"] == {"Ocp-Apim-Subscription-Key": "<redacted>"}
    # sha256 fields are not secrets: a key such as "weights_sha256" keeps its value
    assert redact_metadata({"model_sha256": "ab12", "run_key": "ab-cd", "api_key": "k"}) == \
        {"model_sha256": "ab12", "run_key": "ab-cd", "api_key": "<redacted>"}


# --- GeoPackage version and readers -------------------------------------------------------------


def test_geopackage_is_version_1_2_and_ogrinfo_reads_every_layer_without_warning(tmp_path):
    path = write(tmp_path / "inv.gpkg", years=(2021, 2022))
    import sqlite3

    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200  # 1.2.0
    assert GPKG_VERSION == "1.2"
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo (apt package gdal-bin, installed by .ci/run) is not installed")
    proc = subprocess.run([ogrinfo, "-ro", "-al", "-so", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "Warning" not in text and "partially supported" not in text, text
    for layer in ("rts_2021", "rts_2022", "coverage_2021", "coverage_2022", "rts_tracks", "run_metadata"):
        assert f"Layer name: {layer}" in proc.stdout


# --- no replacement without overwrite, also at rename time --------------------------------------


def test_second_run_that_finished_first_wins(tmp_path, monkeypatch):
    """Both runs checked at start that the output was free; the other one finished first."""
    import rtsmap.pipeline.inventory as inventory

    target = tmp_path / "inv.gpkg"
    real_rename = inventory._rename

    def other_run_finishes_first(tmp, path, **kwargs):
        # The other run's inventory lands between our check and our rename.
        monkeypatch.setattr(inventory, "_rename", real_rename)
        write(path, n=5)
        return real_rename(tmp, path, **kwargs)

    monkeypatch.setattr(inventory, "_rename", other_run_finishes_first)
    with pytest.raises(OutputError, match="appeared while this run was writing.*kept as"):
        write(target, n=2, keep_dir=tmp_path / "inv.gpkg.work")
    monkeypatch.setattr(inventory, "_rename", real_rename)
    assert len(read_inventory(target)[2021]) == 5  # the first finisher's file, not replaced
    kept = tmp_path / "inv.gpkg.work" / "inv.gpkg"
    assert len(read_inventory(kept)[2021]) == 2  # ours, kept in the work directory
    assert not list(tmp_path.glob(".inv.gpkg.*"))


def test_existing_inventory_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    target = write(tmp_path / "inv.gpkg", years=(2021, 2022, 2023))
    before = target.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write(target, years=(2021,))
    assert target.read_bytes() == before
    write(target, years=(2021,), overwrite=True)
    # Overwriting drops the layers of years no longer there.
    assert sorted(name for name, _ in pyogrio.list_layers(target)) == ["coverage_2021", "rts_2021", "rts_tracks", "run_metadata"]


# --- a write that fails partway -----------------------------------------------------------------

_LIMITED_WRITE = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {tests!r})
    from test_outputs_hostile import write
    from rtsmap.pipeline.errors import OutputError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    try:
        write({path!r}, years=(2021, 2022, 2023), n={n}, overwrite=True)
    except OutputError as exc:
        print("OutputError:", exc)
        sys.exit(2)
""")


def _limited_write(path, limit, n):
    code = _LIMITED_WRITE.format(tests=os.path.dirname(__file__), limit=limit, path=str(path), n=n)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_write_failing_partway_keeps_the_previous_file(tmp_path):
    """Disk full (simulated by RLIMIT_FSIZE) while writing the later layers."""
    target = write(tmp_path / "inv.gpkg", years=(2021,), n=1)
    before = target.read_bytes()
    # The first layer fits in the limit, the later, larger ones do not.
    proc = _limited_write(target, limit=len(before) + 64 * 1024, n=3000)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "OutputError" in proc.stdout and "cannot write" in proc.stdout and "Traceback" not in proc.stderr
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.gpkg"]  # no partial file left


# --- leftovers of killed writers ----------------------------------------------------------------


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    from rtsmap.pipeline.inventory import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = [tmp_path / f".inv.gpkg.{_host()}.{dead_pid}.abcd1234.tmp.gpkg",
             tmp_path / f".inv.gpkg.{_host()}.{dead_pid}.abcd1234.tmp.gpkg-journal",
             tmp_path / f".inv.gpkg.{dead_pid}.old00000.tmp.gpkg"]  # an older version's name, old
    live = tmp_path / f".inv.gpkg.{_host()}.{os.getppid()}.live0000.tmp.gpkg"  # a live writer's
    other_host_new = tmp_path / f".inv.gpkg.otherhost.{dead_pid}.new00000.tmp.gpkg"
    for path in (*stale, live, other_host_new):
        path.write_bytes(b"partial")
    os.utime(stale[2], (1, 1))  # written long ago
    mine = tmp_path / "notes.tmp.gpkg"
    mine.write_bytes(b"not a temporary of ours")
    write(tmp_path / "inv.gpkg")
    for path in stale:
        assert not path.exists(), path
    assert live.exists() and other_host_new.exists() and mine.exists()
    assert remove_stale_temporaries(tmp_path / "inv.gpkg") == []


# --- fragments: disk full, a work directory under a file, secrets -------------------------------


def _gdf():
    return gpd.GeoDataFrame({"score": [0.5]}, geometry=[shapely.box(0, 0, 1, 1)], crs=CRS)


def test_work_directory_under_a_file_is_one_output_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    store = FragmentStore(tmp_path / "afile" / "key")
    with pytest.raises(OutputError, match="cannot write to the work directory"):
        store.prepare()
    with pytest.raises(OutputError, match="cannot write to the work directory"):
        store.write(2021, "c1", _gdf(), {"coverage": []})
    with pytest.raises(OutputError, match="cannot write to the work directory"):
        store.write_failure(2021, "c1", {"reason": "x"})


_FULL_DISK_FRAGMENTS = textwrap.dedent("""
    import resource, signal, sys
    import geopandas as gpd, shapely
    from pathlib import Path
    from rtsmap.workflows.fragments import FragmentStore
    from rtsmap.pipeline.errors import OutputError
    store = FragmentStore(Path({root!r}))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        store.write_failure(2021, "c2", {{"reason": "x" * 100000}})
    except OutputError as exc:
        print("OutputError:", exc)
        sys.exit(2)
""")


def test_disk_full_while_recording_a_failure_is_one_error_and_keeps_fragments(tmp_path):
    """Disk full (RLIMIT_FSIZE) inside write_failure: was a traceback (OSError Errno 28)."""
    store = FragmentStore(tmp_path / "key")
    store.prepare()
    store.write(2021, "c1", _gdf(), {"coverage": [], "status": "processed"})
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_FRAGMENTS.format(root=str(store.root))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot write to the work directory" in proc.stdout and "Traceback" not in proc.stderr
    assert store.is_done(2021, "c1") and len(store.read_detections(2021, "c1")) == 1
    assert not [p for p in store.root.rglob("*") if p.name.endswith(".tmp")]


def test_fragment_records_hold_no_credentials(tmp_path):
    store = FragmentStore(tmp_path / "key")
    store.write(2021, "c1", _gdf(), {"coverage": [], "items": [SECRET_URL]})
    store.write_failure(2021, "c2", {"reason": f"AssetError: 403 for {SECRET_URL}"})
    for path in store.root.rglob("*.json"):
        text = path.read_text()
        assert "PASSWORD" not in text and "KEY123" not in text and "SIG456" not in text
    assert store.read_failure(2021, "c2")["reason"].startswith("AssetError: 403 for https://")


# --- quick-looks --------------------------------------------------------------------------------


def test_quicklooks_never_replace_a_png_without_overwrite(tmp_path):
    out = tmp_path / "out.gpkg"
    own = tmp_path / "out_2022.png"
    own.write_bytes(b"the user's own map")
    layers = {2021: slumps(1, 2021), 2022: slumps(1, 2022)}
    cov = {2021: coverage(), 2022: coverage()}
    with pytest.raises(OutputError, match="out_2022.png already exists"):
        check_quicklooks(out, layers, overwrite=False)
    with pytest.raises(OutputError, match="out_2022.png already exists"):
        write_quicklooks(out, layers, cov)
    assert own.read_bytes() == b"the user's own map"
    assert not (tmp_path / "out_2021.png").exists()  # checked for every year before any is written
    paths = write_quicklooks(out, layers, cov, overwrite=True)
    assert [p.name for p in paths] == ["out_2021.png", "out_2022.png"]
    assert own.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_2021.png", "out_2022.png"]


def test_quicklooks_are_readable_as_the_umask_allows_not_private_temporary_files(tmp_path):
    # Written under a temporary name and renamed: the temporary file's mode must not be 0600.
    old = os.umask(0o022)
    try:
        paths = write_quicklooks(tmp_path / "out.gpkg", {2021: slumps(1, 2021)}, {2021: coverage()})
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o644)]
