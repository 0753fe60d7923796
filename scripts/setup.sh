#!/usr/bin/env bash
# One-time (idempotent) set-up: a .venv with torch and lungrt[dev,ray,rtx,openvino,dicom] installed, every
# dependency at the version requirements.lock pins (the versions the suite passed with; bash scripts/lock.sh
# refreshes it), so a release of any of them cannot change masks or break the suite overnight.
# torch is installed first so that lungrt's `torch>=2.4` range installs nothing more:
#   - here (CPU machine): torch==2.13.0, the CPU build that pip finds on local disk, in seconds;
#   - elsewhere: set LUNGRT_TORCH_SPEC / LUNGRT_TORCH_INDEX, e.g. for a CPU-only box
#     LUNGRT_TORCH_INDEX=https://download.pytorch.org/whl/cpu, or install your CUDA torch into
#     .venv yourself before running this script (it then keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # numpy with it: torch imported without numpy warns "Failed to initialize NumPy" at every import
  "${pip[@]}" install -c requirements.lock "${LUNGRT_TORCH_SPEC:-torch==2.13.0}" numpy ${LUNGRT_TORCH_INDEX:+--index-url "$LUNGRT_TORCH_INDEX"} 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch" || { echo "setup: torch did not install" >&2; exit 1; }
fi
stamp=.venv/.lungrt-install-stamp
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import lungrt" 2>/dev/null; then
  "${pip[@]}" install -c requirements.lock -e ".[dev,ray,rtx,openvino,dicom]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import lungrt, onnxruntime, cv2, tensorrt_rtx, polygraphy, openvino, highdicom, pylibjpeg, gdcm, pynetdicom, mkdocs" || { echo "setup: lungrt did not install" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
