#!/usr/bin/env bash
# Multi-process training with msrun (CPU here, Ascend on a cluster).
# Usage: run_scripts/run_msrun.sh --workers N --config FILE [--set a.b=c ...] [--log-dir DIR]
#        [--master-port P] [--resume] [--dry-run]
# One log per worker in the log dir; if a worker fails, its last lines are printed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
workers="" config="" log_dir="output/msrun_logs" port=8118 dry=0
train_args=()
die() { echo "run_msrun.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers=${2:-}; shift 2 ;;
        --config) config=${2:-}; shift 2 ;;
        --set) train_args+=(--set "${2:-}"); shift 2 ;;
        --log-dir) log_dir=${2:-}; shift 2 ;;
        --master-port) port=${2:-}; shift 2 ;;
        --resume) train_args+=(--resume); shift ;;
        --dry-run) dry=1; shift ;;
        *) die "unknown argument '$1' (valid: --workers N --config FILE [--set a.b=c] [--log-dir DIR] [--master-port P] [--resume] [--dry-run])" ;;
    esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers='$workers' is invalid: a whole number >= 1"
[ -n "$config" ] && [ -f "$config" ] || die "--config='$config' is invalid: an existing YAML file"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] || die "--master-port='$port' is invalid: 1024..65535"
if [ -x "$repo/.venv/bin/python" ]; then export PATH="$repo/.venv/bin:$PATH"; fi
export GLOG_v=${GLOG_v:-3}
cmd=(msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="$port" --log_dir="$log_dir"
     --join=True "$repo/pangu_sigma/train.py" --config "$config" "${train_args[@]}")
if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$log_dir"
echo "[msrun] $workers workers, logs in $log_dir/worker_*.log (tail -f $log_dir/worker_0.log)"
status=0
"${cmd[@]}" || status=$?
for log in "$log_dir"/worker_*.log; do
    if grep -qE "Traceback|^error:|Error" "$log"; then
        echo "[msrun] $(basename "$log") reports a failure; its last lines:" >&2
        grep -vE "^\[WARNING\]" "$log" | tail -n 15 >&2
        status=${status/#0/1}
    fi
done
exit "$status"
