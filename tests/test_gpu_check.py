"""The GPU check refuses to report CPU figures as GPU ones (this machine has no GPU: the test
proves the refusal; the GPU figures themselves come from benchmarks/gpu_check.sh on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rtsmap.workflows.config import DEMO_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_gpu_throughput_fails_in_one_line_without_a_cuda_provider():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # pragma: no cover - GPU machines
        return
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput", "--model", str(DEMO_MODEL), "--batches", "1",
                           "--repeats", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: asked for ['CUDAExecutionProvider']")
    assert "Traceback" not in proc.stderr


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)
