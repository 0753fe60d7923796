#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the test suite.
# pytest's exit code 5 ("no tests collected") is reported as a failure of its own kind, never as a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# system tools the tests use: dciodvfy (dicom3tools) validates DICOM SEG, Orthanc is a real PACS, Chromium renders the report.
# Installed when missing and this is a root Debian/Ubuntu (CI); elsewhere those tests skip with the command.
need=()
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v chromium >/dev/null || need+=(chromium)  # the report's escaping, rendered by a real browser
command -v storescu >/dev/null || need+=(dcmtk)  # DCMTK: a second, independent DICOM sender for the node
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
    >/dev/null 2>&1 || echo "test.sh: could not install ${need[*]}; the tests that need them skip" >&2
fi
# style first: ruff's lint and format check (line length 120, pyproject's [tool.ruff]); a failure fails the run
.venv/bin/ruff check lungrt tests benchmarks scripts && .venv/bin/ruff format --check lungrt tests benchmarks scripts \
  || { echo "test.sh: ruff found style errors (fix: .venv/bin/ruff format . && .venv/bin/ruff check --fix .)" >&2; exit 1; }
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit 5); treating as failure" >&2
  exit 1
fi
exit "$rc"
