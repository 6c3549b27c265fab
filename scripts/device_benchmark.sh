#!/usr/bin/env bash
# The GPU benchmark as one command on a GPU machine without internet (PyTorch, Lightning, timm, torchmetrics and
# numba installed there). Prepare here with `make device-wheels`, then run on the device from the
# repository root, carrying .whl:
#
#     bash scripts/device_benchmark.sh            # reports under $OUT/gpu and $OUT/eval (or results/benchmark-gpu)
#
# First the GPU targets (ResNet-50 @224 bf16 training images/s with the PIL and the fast path; the whole SOP-size
# test evaluation), then the evaluation comparison, which also runs our CUDA path. Extra arguments go to both
# runs of scripts/benchmark.py (e.g. --quick for a rehearsal on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python3}"
out="${OUT:-results/benchmark-gpu}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
"$PYTHON" scripts/benchmark.py --sections train,gpu_eval --out "$out/gpu" --data-dir /tmp/metricsearch-benchmark "$@"
"$PYTHON" scripts/benchmark.py --sections eval --out "$out/eval" "$@"
