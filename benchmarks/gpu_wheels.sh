#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the GPU machine: what lungrt imports that its image lacks
# (it has torch, numpy, opencv, pillow, safetensors, onnx, onnxruntime, typer, rich), at the versions this
# venv has, for its Python 3.12. Into .whl/ (ignored; about 30 MiB of the 64 MiB a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
pins=$("$py" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydicom", "imagecodecs")))
PY
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls -la .whl
