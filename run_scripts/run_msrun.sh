#!/usr/bin/env bash
# Multi-process training with msrun, on CPU here or on Ascend servers.
# Usage: run_scripts/run_msrun.sh --workers N --config FILE [--set a.b=c ...] [--log-dir DIR]
#        [--nodes M --node-rank R --master-addr IP] [--master-port P] [--device-target CPU|Ascend]
#        [--resume] [--overwrite] [--allow-config-change F[,F]] [--allow-batch-change] [--dry-run] [--help]
# --workers is the number of processes on this node; with --nodes M, run the same
# command on every node with its --node-rank (0..M-1) and node 0's --master-addr.
# One log per worker in the log dir (default output/msrun_logs/node<R>, so the nodes'
# logs never share a folder on shared storage); if a worker fails, its last lines are
# printed. --resume, --overwrite, --allow-config-change, --allow-batch-change and --set
# go to the trainer (python -m pangu_sigma.training.train, run as a module from the
# repository root with PYTHONPATH set, so no editable install is needed); relative
# paths (--config, --log-dir and the config's data/output/checkpoint paths) are
# resolved from the folder this script was started from. Checked before anything
# starts, also in --dry-run: --workers against parallel.devices_per_node (on Ascend
# equal, and 1, 2, 4 or 8; on CPU a multiple: emulated nodes), and --workers x --nodes
# against the config's parallel.world_size and train.global_batch_size.
# HCCL_CONNECT_TIMEOUT defaults to 600 s. --dry-run prints the msrun command and starts nothing.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
launch_dir=$PWD
workers="" config="" log_dir="" port=8118 dry=0 nodes=1 node_rank=0 master_addr=127.0.0.1
target=""
train_args=()
set_args=()
die() { echo "run_msrun.sh: error: $*" >&2; exit 2; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) need_value "$@"; workers=$2; shift 2 ;;
        --config) need_value "$@"; config=$2; shift 2 ;;
        --set) need_value "$@"; train_args+=(--set "$2"); set_args+=(--set "$2"); shift 2 ;;
        --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
        --master-port) need_value "$@"; port=$2; shift 2 ;;
        --master-addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --nodes) need_value "$@"; nodes=$2; shift 2 ;;
        --node-rank) need_value "$@"; node_rank=$2; shift 2 ;;
        --device-target) need_value "$@"; target=$2; shift 2 ;;
        --resume|--overwrite|--allow-batch-change) train_args+=("$1"); shift ;;
        --allow-config-change) need_value "$@"; train_args+=(--allow-config-change "$2"); shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,19s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (valid: --workers --config --set --log-dir --nodes --node-rank --master-addr --master-port --device-target --resume --overwrite --allow-config-change --allow-batch-change --dry-run --help)" ;;
    esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers='$workers' is invalid: a whole number >= 1"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes='$nodes' is invalid: a whole number >= 1"
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nodes" ] || die "--node-rank='$node_rank' is invalid: 0..$((nodes - 1))"
[ -n "$config" ] && [ -f "$config" ] || die "--config='$config' is invalid: an existing YAML file"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65535 ] || die "--master-port='$port' is invalid: 1024..65535"
[[ "$master_addr" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] || die "--master-addr='$master_addr' is invalid: an IPv4 address"
case "$target" in
    "") ;;
    CPU|Ascend) train_args+=(--set "parallel.device_target=$target"); set_args+=(--set "parallel.device_target=$target") ;;
    *) die "--device-target='$target' is invalid: CPU or Ascend" ;;
esac
[ -n "$log_dir" ] || log_dir=output/msrun_logs/node$node_rank
absolute() { case $1 in /*) echo "$1" ;; *) echo "$launch_dir/${1#./}" ;; esac; }
config=$(absolute "$config")
log_dir=$(absolute "$log_dir")
if [ -x "$repo/.venv/bin/python" ]; then export PATH="$repo/.venv/bin:$PATH"; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v=${GLOG_v:-3}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-600}  # CANN: whole seconds in [120, 7200], default 120
[[ $HCCL_CONNECT_TIMEOUT =~ ^[0-9]+$ ]] && [ "$HCCL_CONNECT_TIMEOUT" -ge 120 ] && [ "$HCCL_CONNECT_TIMEOUT" -le 7200 ] \
    || die "HCCL_CONNECT_TIMEOUT='$HCCL_CONNECT_TIMEOUT' is invalid: whole seconds in 120..7200"
# --workers against parallel.devices_per_node, --workers x --nodes against the config's world size and
# global batch (one line, exit 2 on a mismatch), also in --dry-run.
check=$(cd "$repo" && python -m pangu_sigma.cluster.launch_check --config "$config" --workers "$workers" \
        --nodes "$nodes" "${set_args[@]}" 2>&1) || { echo "run_msrun.sh: $check" >&2; exit 2; }
# msrun runs `python ARGS...` as given when the task is "python" (mindspore/parallel/cluster/
# process_entity/_utils.py, _generate_cmd_args_list): the trainer runs as a module.
cmd=("${MSRUN:-msrun}" --worker_num="$((workers * nodes))" --local_worker_num="$workers" --master_addr="$master_addr"
     --master_port="$port" --node_rank="$node_rank" --log_dir="$log_dir" --join=True
     python -m pangu_sigma.training.train --paths-from "$launch_dir" --config "$config" "${train_args[@]}")
if [ "$dry" = 1 ]; then printf 'cd %q && ' "$repo"; printf '%q ' "${cmd[@]}"; echo; exit 0; fi
cd "$repo"
mkdir -p "$log_dir"
echo "[msrun] node $node_rank/$nodes: $workers workers, logs in $log_dir/worker_*.log (tail -f $log_dir/worker_0.log)"
status=0
"${cmd[@]}" || status=$?
for log in "$log_dir"/worker_*.log; do
    [ -f "$log" ] || continue
    if grep -qE "Traceback|^error:" "$log"; then
        echo "[msrun] $(basename "$log") reports a failure; its last lines:" >&2
        grep -vE "^\[(WARNING|INFO)\]" "$log" | tail -n 15 >&2
        [ "$status" != 0 ] || status=1
    fi
done
exit "$status"
