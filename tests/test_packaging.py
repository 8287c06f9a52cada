"""The installed package: one namespace (`rtsmap`), nothing else in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_installs_only_the_rtsmap_namespace(tmp_path):
    """A wheel built from the checkout holds `rtsmap/` and its `.dist-info`, nothing else: the
    folders `pipeline/`, `models/` and `workflows/` land as `rtsmap.pipeline` and so on, and the
    profiles, training configurations and demo model travel with `rtsmap.workflows`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("rtsmap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"rtsmap"}
    for expected in ("rtsmap/__init__.py", "rtsmap/contract.py", "rtsmap/pipeline/grid.py", "rtsmap/models/detector.py",
                     "rtsmap/workflows/cli.py", "rtsmap/workflows/profiles/demo.yaml",
                     "rtsmap/workflows/train_configs/demo.yaml", "rtsmap/workflows/assets/demo_model.onnx"):
        assert expected in names
    assert not any(n.startswith(("benchmarks/", "rtsmap/benchmarks", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rtsmap = rtsmap.workflows.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
