#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment, install the package with
# its test extra, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/run_scripts/venv.sh"
cd "$repo"
exec "$PY" -m pytest "$@"
