#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment, install the package with
# its test extra, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
python_bin=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    echo "[run_tests] creating virtual environment in $venv"
    "$python_bin" -m venv "$venv"
fi
stamp="$venv/.installed-$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "[run_tests] installing the package and its test dependencies"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install --quiet -e "$repo[test]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
cd "$repo"
export GLOG_v=${GLOG_v:-3}
exec "$venv/bin/python" -m pytest "$@"
