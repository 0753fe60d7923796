#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the test suite.
# pytest's exit code 5 ("no tests collected") is reported as a failure of its own kind, never as a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit 5); treating as failure" >&2
  exit 1
fi
exit "$rc"
