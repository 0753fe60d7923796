#!/usr/bin/env bash
# Refresh requirements.lock (the constraints scripts/setup.sh installs from) from the .venv the suite passed in:
#   bash scripts/setup.sh && bash scripts/test.sh && bash scripts/lock.sh && git diff requirements.lock
# torch (and the CUDA libraries it brings) stays out: setup.sh installs it first, CPU or CUDA, your choice.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# pip constraints: every dependency at the version the test suite passed with (bash scripts/lock.sh)"
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+|lungrt)(==| @)' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
