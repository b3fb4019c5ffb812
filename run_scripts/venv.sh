# Sourced by the run scripts: create (or reuse) the repo's virtual environment
# and install the package with the given extras. Sets $PY to its python.
repo=${repo:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
venv="$repo/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
extras=${VENV_EXTRAS:-test}
stamp="$venv/.installed-$extras-$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing the package with extras [$extras] (first run only)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install --quiet -e "$repo[$extras]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
PY="$venv/bin/python"
export PATH="$venv/bin:$PATH"
export GLOG_v=${GLOG_v:-3}
