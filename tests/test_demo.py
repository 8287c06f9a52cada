"""The README's main command: `rtsmap demo` with the committed demo model, end to end."""

import os
import re
import subprocess
import sys

import pyogrio

from rtsmap.workflows.config import DEMO_MODEL


def rtsmap_demo(out):
    """`rtsmap demo` on a small region (2.5 km, two years) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "rtsmap.workflows.cli", "demo", "--out", str(out), "--size-km", "2.5", "--years", "2021-2022"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_demo_command_end_to_end(tmp_path):
    assert DEMO_MODEL.is_file(), "the demo model is part of the repository"
    out = tmp_path / "demo"
    proc = rtsmap_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gpkg = out / "demo_inventory.gpkg"
    assert f"inventory: {gpkg}" in proc.stdout
    layers = {name for name, _ in pyogrio.list_layers(gpkg)}
    assert {"rts_2021", "rts_2022", "coverage_2021", "coverage_2022", "run_metadata"} <= layers
    # Precision/recall/F1 against the region's truth, per year.
    scores = re.findall(r"(\d{4}) vs truth: precision ([\d.]+), recall ([\d.]+), F1 ([\d.]+)", proc.stdout)
    assert [s[0] for s in scores] == ["2021", "2022"]
    # A trained model finds slumps on a region it never saw (the demo model was trained on
    # another seed); a broken pipeline (misregistered bands, wrong normalisation) finds none.
    assert max(float(s[2]) for s in scores) > 0.3, proc.stdout
    # Running it again reuses the region and every finished chunk-year.
    again = rtsmap_demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"0 to do, \d+ already done", again.stderr), again.stderr[-2000:]
