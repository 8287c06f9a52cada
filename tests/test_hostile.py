"""Hostile but realistic input to every command: one line, the right status, nothing lost or leaked.

Each case runs the real command line in a subprocess (``python -m rtsmap.workflows.cli``) and
checks what a user sees and keeps:

- the exit status (2 for bad input or environment; see ``workflows/cli.py``);
- stderr ends in exactly one line, starting ``error:``, holding the expected fragment, and no
  "Traceback" anywhere;
- the files the case names are byte-for-byte what they were before (nothing deleted, nothing
  replaced without --overwrite);
- no secret given on the command line appears in stdout, stderr or any file written.

The table is organised by command. ``{w}`` in an argument is the case's workspace folder (a
fresh copy per case, so one case can never spoil another's files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pytest
import shapely

from rtsmap.workflows.config import DEMO_MODEL

SECRETS = ("PASSWORD", "KEY123", "SIG456")
"""Credentials planted in arguments; none may appear in any output."""

AOI_POLYGON = shapely.box(-135.33, 67.39, -135.28, 67.41)


@dataclass(frozen=True)
class Case:
    """One hostile invocation and what must hold after it."""

    id: str
    """The test id: command and what is wrong."""
    argv: tuple[str, ...]
    """Arguments after ``rtsmap``; ``{w}`` is the workspace."""
    status: int = 2
    """The exit status expected."""
    fragment: str = ""
    """Text the one error line must contain (case-insensitive)."""
    untouched: tuple[str, ...] = field(default_factory=tuple)
    """Workspace files that must be byte-equal afterwards (besides the workspace's own files)."""
    timeout: float = 120.0
    """Seconds the command may take."""


def _workspace(root: Path) -> None:
    """The files the cases point at: a user's own files, broken models, odd AOIs."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("a user's notes\n")
    (root / "afile").write_text("a file where a folder is expected\n")
    region = root / "region"  # an earlier demo region (its marker and a file of it)
    region.mkdir()
    (region / "region.json").write_text('{"generator": "rtsmap demo_region"}')
    (region / "truth.gpkg").write_bytes(b"earlier region's truth")
    (root / "existing.onnx").write_bytes(b"the user's earlier model")
    (root / "text.safetensors").write_text("this is not a checkpoint\n")
    (root / "text.onnx").write_text("this is not a model\n")
    model = DEMO_MODEL.read_bytes()
    (root / "truncated.onnx").write_bytes(model[: len(model) // 3])
    (root / "truncated.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":")
    (root / "chips").mkdir()
    (root / "chips" / "annotations.json").write_text('{"images": [], "annotations": []}')  # an earlier chip set
    (root / "chips" / "dataset.json").write_text('{"format": "earlier"}')
    (root / "aoi.geojson").write_text(gpd.GeoSeries([AOI_POLYGON], crs="EPSG:4326").to_json())
    (root / "nan.geojson").write_text(
        '{"type": "Polygon", "coordinates": [[[-135.3, 67.3], [-135.2, NaN], [-135.2, 67.5], [-135.3, 67.3]]]}')
    (root / "huge.geojson").write_text(
        '{"type": "Polygon", "coordinates": [[[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]]}')
    (root / "point.geojson").write_text('{"type": "Point", "coordinates": [-135.3, 67.4]}')
    (root / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (root / "garbage.geojson").write_bytes(b"\x00\xff garbage {")
    two = root / "two_layers.gpkg"
    gpd.GeoDataFrame(geometry=[AOI_POLYGON], crs="EPSG:4326").to_file(two, layer="aoi")
    gpd.GeoDataFrame(geometry=[AOI_POLYGON.buffer(1)], crs="EPSG:4326").to_file(two, layer="other")
    (root / "out_2021.png").write_bytes(b"the user's own map")
    (root / "bad.yaml").write_text("data: [unclosed\n  out: x\n")
    (root / "cuda.yaml").write_text(f"data: {root / 'chips'}\nout: {root / 'train-out'}\ndevice: cuda\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "items.json").write_text('{"type": "FeatureCollection", "features": []}')


SHARED_FILES = ("notes.txt", "region/region.json", "region/truth.gpkg", "existing.onnx", "out_2021.png",
                "two_layers.gpkg", "aoi.geojson")
"""Files no case may change."""

LOCAL = ("--profile", "demo", "--catalog", "{w}/items.json")
"""An offline catalog (empty): the checks of AOI and outputs come before any search."""

BAD_CATALOG = "http://user:PASSWORD@127.0.0.1:9/stac?subscription-key=KEY123&sig=SIG456"

CASES = [
    # --- the group itself -----------------------------------------------------------------
    Case("cli-unknown-command", ("mapit",), 2, "no such command"),
    Case("cli-unknown-option", ("run", "--bogus"), 2, "no such option"),
    # --- demo-data ------------------------------------------------------------------------
    Case("demo-data-negative-seed-over-region", ("demo-data", "--out", "{w}/region", "--seed", "-1"), 2, "seed"),
    Case("demo-data-nan-size-over-region", ("demo-data", "--out", "{w}/region", "--size-km", "nan"), 2, "finite"),
    Case("demo-data-inf-size", ("demo-data", "--out", "{w}/new", "--size-km", "inf"), 2, "finite"),
    Case("demo-data-huge-size", ("demo-data", "--out", "{w}/new", "--size-km", "1e9"), 2, "1-50 km"),
    Case("demo-data-region-without-overwrite", ("demo-data", "--out", "{w}/region", "--size-km", "1.5"), 2, "--overwrite"),
    Case("demo-data-foreign-folder", ("demo-data", "--out", "{w}", "--size-km", "1.5"), 2, "not an rtsmap demo region"),
    Case("demo-data-out-is-file", ("demo-data", "--out", "{w}/notes.txt"), 2, "notes.txt"),
    Case("demo-data-out-under-file", ("demo-data", "--out", "{w}/afile/region"), 2, "is a file"),
    Case("demo-data-years-backwards", ("demo-data", "--out", "{w}/new", "--years", "2023-2021"), 2, "--years"),
    Case("demo-data-years-huge-range", ("demo-data", "--out", "{w}/new", "--years", "1-999999999"), 2, "--years"),
    Case("demo-data-years-text", ("demo-data", "--out", "{w}/new", "--years", "last year"), 2, "--years"),
    Case("demo-data-seed-text", ("demo-data", "--out", "{w}/new", "--seed", "abc"), 2, "seed"),
    Case("demo-data-missing-shapes", ("demo-data", "--out", "{w}/new", "--shapes", "{w}/missing.geojson"), 2, "missing.geojson"),
    Case("demo-data-years-backwards", ("demo-data", "--out", "{w}/new", "--years", "2021-2019"), 2, "backwards"),
    # --- export ---------------------------------------------------------------------------
    Case("export-existing-out", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/existing.onnx"),
         2, "already exists", timeout=300),
    Case("export-text-checkpoint", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/new.onnx"),
         2, "text.safetensors", timeout=300),
    Case("export-truncated-checkpoint", ("export", "--checkpoint", "{w}/truncated.safetensors", "--out", "{w}/new.onnx"),
         2, "truncated.safetensors", timeout=300),
    Case("export-missing-checkpoint", ("export", "--checkpoint", "{w}/nope.safetensors", "--out", "{w}/new.onnx"),
         2, "does not exist", timeout=300),
    Case("export-folder-without-checkpoint", ("export", "--checkpoint", "{w}/chips", "--out", "{w}/new.onnx"),
         2, "chips", timeout=300),
    Case("export-out-under-file", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/afile/m.onnx"),
         2, "afile", timeout=300),
    Case("export-out-wrong-suffix", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/notes.txt"),
         2, ".onnx", timeout=300),
    Case("export-opset-absurd", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/new.onnx",
                                 "--opset", "999"), 2, "opset", timeout=300),
    Case("export-threshold-nan", ("export", "--checkpoint", "{w}/text.safetensors", "--out", "{w}/new.onnx",
                                  "--score-threshold", "nan"), 2, "score-threshold", timeout=300),
    # --- evaluate -------------------------------------------------------------------------
    Case("evaluate-text-onnx", ("evaluate", "--model", "{w}/text.onnx", "--data", "{w}/chips"), 2, "text.onnx", timeout=300),
    Case("evaluate-truncated-onnx", ("evaluate", "--model", "{w}/truncated.onnx", "--data", "{w}/chips"),
         2, "truncated.onnx", timeout=300),
    Case("evaluate-text-checkpoint", ("evaluate", "--model", "{w}/text.safetensors", "--data", "{w}/chips"),
         2, "text.safetensors", timeout=300),
    Case("evaluate-missing-model", ("evaluate", "--model", "{w}/nope.onnx", "--data", "{w}/chips"), 2, "does not exist",
         timeout=300),
    Case("evaluate-data-is-file", ("evaluate", "--model", str(DEMO_MODEL), "--data", "{w}/notes.txt"), 2, "notes.txt",
         timeout=300),
    Case("evaluate-empty-chip-folder", ("evaluate", "--model", str(DEMO_MODEL), "--data", "{w}/chips"), 2, "chips",
         timeout=300),
    Case("evaluate-threshold-nan", ("evaluate", "--model", str(DEMO_MODEL), "--data", "{w}/chips",
                                    "--score-threshold", "nan"), 2, "score-threshold", timeout=300),
    Case("evaluate-threshold-out-of-range", ("evaluate", "--model", str(DEMO_MODEL), "--data", "{w}/chips",
                                             "--score-threshold", "2"), 2, "score-threshold", timeout=300),
    # --- train ----------------------------------------------------------------------------
    Case("train-cuda-without-gpu", ("train", "--config", "{w}/cuda.yaml"), 2, "cuda", timeout=300),
    Case("train-bad-yaml", ("train", "--config", "{w}/bad.yaml"), 2, "yaml", timeout=300),
    Case("train-yaml-list", ("train", "--config", "{w}/list.yaml"), 2, "mapping", timeout=300),
    Case("train-missing-config", ("train", "--config", "{w}/nope.yaml"), 2, "does not exist", timeout=300),
    # --- evaluate-inventory ---------------------------------------------------------------
    Case("evaluate-inventory-missing", ("evaluate-inventory", "--inventory", "{w}/nope.gpkg", "--truth", "{w}/aoi.geojson"),
         2, "nope.gpkg"),
    Case("evaluate-inventory-text", ("evaluate-inventory", "--inventory", "{w}/notes.txt", "--truth", "{w}/aoi.geojson"),
         2, "notes.txt"),
    Case("evaluate-inventory-iou-nan", ("evaluate-inventory", "--inventory", "{w}/two_layers.gpkg",
                                        "--truth", "{w}/two_layers.gpkg", "--iou", "nan"), 2, "--iou"),
    Case("evaluate-inventory-truth-garbage", ("evaluate-inventory", "--inventory", "{w}/two_layers.gpkg",
                                              "--truth", "{w}/garbage.geojson"), 2, ""),
    Case("evaluate-inventory-not-an-inventory", ("evaluate-inventory", "--inventory", "{w}/two_layers.gpkg",
                                                 "--truth", "{w}/two_layers.gpkg"), 2, ""),
    # --- run: AOI and outputs (checked before any work) -----------------------------------
    Case("run-aoi-nan-vertex", ("run", "--aoi", "{w}/nan.geojson", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"), 2, "finite"),
    Case("run-aoi-two-layers", ("run", "--aoi", "{w}/two_layers.gpkg", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"),
         2, "2 layers"),
    Case("run-aoi-missing-layer", ("run", "--aoi", "{w}/two_layers.gpkg:nope", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"),
         2, "no layer 'nope'"),
    Case("run-aoi-point", ("run", "--aoi", "{w}/point.geojson", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"), 2, "Point"),
    Case("run-aoi-empty", ("run", "--aoi", "{w}/empty.geojson", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"), 2, "no features"),
    Case("run-aoi-garbage", ("run", "--aoi", "{w}/garbage.geojson", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"), 2, "garbage"),
    Case("run-aoi-huge-coordinates", ("run", "--aoi", "{w}/huge.geojson", "--years", "2021", *LOCAL,
                                      "--out", "{w}/o.gpkg"), 2, "huge.geojson"),
    Case("run-aoi-folder", ("run", "--aoi", "{w}/chips", "--years", "2021", *LOCAL, "--out", "{w}/o.gpkg"), 2, "chips"),
    Case("run-quicklook-of-user-exists", ("run", "--aoi", "{w}/aoi.geojson", "--years", "2021", *LOCAL,
                                          "--out", "{w}/out.gpkg"), 2, "out_2021.png"),
    # The AOI is read before the catalog is opened: offline, a broken AOI is what the user hears about.
    Case("run-broken-aoi-offline-catalog", ("run", "--aoi", "{w}/garbage.geojson", "--years", "2021", "--profile",
                                            "planetary-computer", "--catalog", "http://127.0.0.1:9/stac", "--out",
                                            "{w}/o.gpkg"), 2, "garbage"),
    Case("plan-broken-aoi-offline-catalog", ("plan", "--aoi", "{w}/garbage.geojson", "--years", "2021", "--profile",
                                             "planetary-computer", "--catalog", "http://127.0.0.1:9/stac"), 2, "garbage"),
    Case("run-out-under-file", ("run", "--aoi", "{w}/aoi.geojson", "--years", "2021", *LOCAL, "--out", "{w}/afile/o.gpkg"), 2, "afile"),
    Case("run-model-text", ("run", "--aoi", "{w}/aoi.geojson", "--years", "2021", *LOCAL, "--model", "{w}/text.onnx",
                            "--out", "{w}/o.gpkg"), 2, "text.onnx"),
    Case("run-model-truncated", ("run", "--aoi", "{w}/aoi.geojson", "--years", "2021", *LOCAL, "--model", "{w}/truncated.onnx",
                                 "--out", "{w}/o.gpkg"), 2, "truncated.onnx"),
    Case("run-catalog-with-credentials", ("run", "--aoi", "{w}/aoi.geojson", "--years", "2021", "--profile", "demo",
                                          "--catalog", BAD_CATALOG, "--out", "{w}/o.gpkg"), 2, ""),
    Case("run-config-missing", ("run", "--config", "{w}/nope.yaml", "--aoi", "{w}/aoi.geojson"), 2, "nope.yaml"),
    # --- plan -----------------------------------------------------------------------------
    Case("plan-aoi-nan-vertex", ("plan", "--aoi", "{w}/nan.geojson", "--years", "2021", "--catalog", "{w}/notes.txt"),
         2, ""),
    Case("plan-catalog-with-credentials", ("plan", "--aoi", "{w}/aoi.geojson", "--years", "2021", "--profile", "demo",
                                           "--catalog", BAD_CATALOG), 2, ""),
    # --- training-data --------------------------------------------------------------------
    Case("training-data-region-missing", ("training-data", "--region", "{w}/nope", "--out", "{w}/c"), 2, "nope"),
    Case("training-data-tile-size-huge", ("training-data", "--region", "{w}/region", "--out", "{w}/c", "--tile-size", "100000"),
         2, "--tile-size"),
    Case("training-data-resolution-nan", ("training-data", "--region", "{w}/region", "--out", "{w}/c", "--resolution", "nan"),
         2, "--resolution"),
    Case("training-data-over-chip-set", ("training-data", "--aoi", "{w}/aoi.geojson", "--truth", "{w}/region/truth.gpkg",
                                         "--catalog", "{w}/notes.txt", "--out", "{w}/chips"),
         2, "already holds a chip set", ("chips/annotations.json", "chips/dataset.json")),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "template"
    _workspace(root)
    return root


def run_cli(argv, *, timeout: float = 120.0, env=None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "rtsmap.workflows.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def assert_one_error_line(proc: subprocess.CompletedProcess, status: int, fragment: str) -> str:
    """Exit status, one ``error:`` line ending stderr, no traceback, no secret; returns the line."""
    stderr = proc.stderr
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, stderr
    assert stderr.rstrip("\n").splitlines()[-1] == error_lines[0], stderr
    assert proc.returncode == status, (proc.returncode, stderr)
    assert fragment.lower() in error_lines[0].lower(), error_lines[0]
    for secret in SECRETS:
        assert secret not in stderr and secret not in proc.stdout, secret
    return error_lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, template: Path, tmp_path: Path):
    work = tmp_path / "w"
    shutil.copytree(template, work)
    before = _snapshot(work)
    argv = [a.replace("{w}", str(work)) for a in case.argv]
    proc = run_cli(argv, timeout=case.timeout)
    assert_one_error_line(proc, case.status, case.fragment)
    after = _snapshot(work)
    for name in (*SHARED_FILES, *case.untouched):
        assert after.get(name) == before[name], f"{name} was changed or removed"
    for name, data in after.items():
        if name not in before:
            for secret in SECRETS:
                assert secret.encode() not in data, f"{secret} written to {name}"


def test_verbose_shows_the_traceback_of_an_internal_error(tmp_path):
    """-v prints the traceback; without it, one line. (An unknown profile YAML that is a list
    reaches code that may raise a non-rtsmap error; any command error serves.)"""
    proc = run_cli(["-v", "run", "--aoi", str(tmp_path / "nope.geojson"), "--years", "2021"])
    assert proc.returncode == 2
    assert proc.stderr.rstrip("\n").splitlines()[-1].startswith("error:")
    assert "Traceback" in proc.stderr


def test_debug_logs_hold_no_credentials(tmp_path):
    """-vv prints the HTTP libraries' debug logs (URLs, headers): never a secret."""
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(gpd.GeoSeries([AOI_POLYGON], crs="EPSG:4326").to_json())
    proc = run_cli(["-vv", "plan", "--aoi", str(aoi), "--years", "2021", "--profile", "demo", "--catalog", BAD_CATALOG],
                   timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.rstrip("\n").splitlines()[-1].startswith("error:")
    for secret in SECRETS:
        assert secret not in proc.stderr and secret not in proc.stdout, secret


def test_internal_error_is_one_line_and_exit_1(tmp_path):
    """A bug (here: a command module whose function raises ZeroDivisionError, planted through a
    sitecustomize-free runpy call) ends in one line ``error: internal error: ...``, exit 1."""
    code = (
        "import sys, click\n"
        "from rtsmap.workflows import cli\n"
        "@click.command('boom')\n"
        "def boom():\n"
        "    1 / 0\n"
        "cli.cli.get_command = lambda ctx, name: boom\n"
        "cli.main(['boom'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: internal error: ZeroDivisionError: division by zero (rerun with -v for the traceback)"]


def test_multiline_errors_are_collapsed():
    from rtsmap.workflows.cli import one_line

    assert one_line("model/data mismatch:\n  bands differ\n\n  tile size differs ") == \
        "model/data mismatch: bands differ; tile size differs"
    assert one_line("") == "(no message)"


@pytest.mark.parametrize("command", ["demo", "demo-data", "plan", "run", "evaluate-inventory", "training-data",
                                     "export", "train", "evaluate"])
def test_every_help_states_the_exit_statuses(command):
    proc = run_cli([command, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "Exit status: 0 done; 2 bad input" in text and "3 partial run" in text
