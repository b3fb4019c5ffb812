#!/usr/bin/env bash
# The main job on CPU: build the default corpus (Python's standard library:
# sources as domain `code`, docstrings as domain `en`), prepare it, train
# configs/cpu_tiny.yaml (PanGu-Sigma with LocMoE), evaluate, and print the
# validation perplexity and the expert-load table.
# Usage: bash run_scripts/run_cpu_smoke.sh [extra --set overrides for training]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/run_scripts/venv.sh"
cd "$repo"
started=$(date +%s)
config=configs/cpu_tiny.yaml
out=output
if ! grep -q '"format": 2' "$out/data/default/meta.json" 2>/dev/null; then  # absent, or the unsharded format 1
    [ -d "$out/corpus/default" ] || "$PY" -m pangu_sigma.data.default_corpus --output "$out/corpus/default"
    "$PY" -m pangu_sigma.data.prepare --input "$out/corpus/default" --output "$out/data/default" \
        --vocab-size 2000 --seq-length 64 --valid-fraction 0.02 --overwrite
else
    echo "[smoke] reusing the prepared corpus in $out/data/default"
fi
overrides=()
for arg in "$@"; do overrides+=(--set "$arg"); done
# --overwrite: an earlier smoke run in output/cpu_tiny is moved aside whole (output/cpu_tiny.old-N), not mixed
"$PY" -m pangu_sigma.training.train --config "$config" "${overrides[@]}" --overwrite
"$PY" -m pangu_sigma.evaluation.eval --config "$config" "${overrides[@]}" --checkpoint "$out/cpu_tiny"
echo "[smoke] done in $(( $(date +%s) - started )) s"
