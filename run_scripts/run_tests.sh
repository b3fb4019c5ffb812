#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment, install the package with
# its test extra, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/run_scripts/venv.sh"
cd "$repo"
# Two pytest workers, a whole test file each at a time (its module fixtures, e.g. the msrun launches, run
# once), in collection order (tests/conftest.py puts the msrun files first): most tests compile a small graph
# on one core. PYTEST_WORKERS=0 runs in this process.
exec "$PY" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
