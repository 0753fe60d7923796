#!/usr/bin/env bash
# The GPU check on a lent NVIDIA H100/H200 (PyTorch with CUDA, no TensorRT, no internet), under 8 minutes:
#   benchmarks/gpu_wheels.sh                      # here, once: the wheels lungrt needs that the machine lacks
#   device run, carry [".whl"]: bash benchmarks/gpu_check.sh "$OUT"
# Writes OUT/gpu_check.json (benchmarks/gpu_check.py says what it measures). `--dry` runs it on this CPU.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry]}"
shift
here="$(cd "$(dirname "$0")/.." && pwd)"
if compgen -G "$here/.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$here"/.whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 470 python3 "$here/benchmarks/gpu_check.py" --out "$out" "$@"
