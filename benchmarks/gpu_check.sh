#!/usr/bin/env bash
# The GPU path, proven on a machine with an NVIDIA GPU (run from the checkout's root):
#
#   bash benchmarks/gpu_check.sh                 # installs .[gpu] into .venv-gpu from PyPI
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # offline: install from a wheel folder
#
# 1. installs rtsmap with onnxruntime-gpu (never together with onnxruntime) and nvidia-ml-py;
# 2. exports the `tiny` variant at 512 px (random weights: the compute is the real network's)
#    when torch is importable (TINY_ONNX=path skips the export);
# 3. runs benchmarks.gpu_throughput: checks that the CUDA (and TensorRT, where present) provider
#    is really in use, tiles/s of the demo model and of tiny at batch 8/16/32, GPU utilisation,
#    and an end-to-end run (loading vs inference share) with LOAD_WORKERS loading processes.
# Prints the JSON report and writes it to gpu-check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"   # a machine's own torch stays visible for the export
fi
if [ -n "${WHEELS:-}" ]; then
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -e '.[gpu]' nvidia-ml-py
else
    "$VENV/bin/pip" install -q -e '.[gpu]' nvidia-ml-py
fi
if "$VENV/bin/python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    echo "onnxruntime-gpu offers: $("$VENV/bin/python" -c 'import onnxruntime as o; print(o.get_available_providers())')"
else
    echo "error: onnxruntime offers no CUDA provider (is the CPU wheel installed too, or CUDA 12/cuDNN 9 missing?)" >&2
    exit 2
fi

TINY_ONNX=${TINY_ONNX:-runs/gpu-check/tiny_512.onnx}
if [ ! -f "$TINY_ONNX" ]; then
    mkdir -p "$(dirname "$TINY_ONNX")"
    "$VENV/bin/python" - "$TINY_ONNX" <<'PYEOF'
import sys
import torch
from rtsmap.models.config import build_config
from rtsmap.models.detector import RTSDetector
from rtsmap.models.export import export_onnx
torch.manual_seed(0)
config = build_config("tiny", tile_size=512)
export_onnx(RTSDetector(config), config, sys.argv[1], trained_on="untrained (GPU check)")
PYEOF
fi

PYTHONUNBUFFERED=1 "$VENV/bin/python" -m benchmarks.gpu_throughput \
    --model workflows/assets/demo_model.onnx --model "$TINY_ONNX" \
    --batches "${BATCHES:-8,16,32}" --region-size-m "${REGION_M:-8000}" --workers "${LOAD_WORKERS:-8}" \
    --json gpu-check.json
