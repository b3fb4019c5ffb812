#!/usr/bin/env bash
# Start one training process per local NPU of this server (Ascend, HCCL).
#
#   run_distribute_train.sh RANK_TABLE_FILE CONFIG [RANK_START] [LOCAL_DEVICE_NUM] [--dry-run] [-- trainer args]
#
# Run it on every server. RANK_START (the first rank of this server in the rank
# table: 0, 8, 16, ...) is derived from the table and this host's addresses
# (`hostname -I`, or SERVER_IP = this server's server_id); given, it is checked
# against them. LOCAL_DEVICE_NUM is 1, 2, 4 or 8 (HCCL on 910A). The config must
# be for this cluster (parallel.world_size, train.global_batch_size, devices per
# server = parallel.devices_per_node), checked before anything starts.
# Rank RANK_START+i gets the rank table's physical device id, exported as
# DEVICE_ID = its logical index among $ASCEND_VISIBLE_DEVICES (e.g. 4-7 in a
# container: device 6 -> 2; unset: all devices, logical = physical). Each process
# runs in ${OUTPUT_DIR:-./output}/<server_id>/device<physical id> with its own `log`
# file (servers never share a folder on shared storage); relative paths (arguments
# and the config's data/output/checkpoint paths) are resolved from the folder this
# script was started from. Trainer flags (--resume, --overwrite, --allow-config-change F,
# --allow-batch-change, --set a.b=c) go after `--`. HCCL_CONNECT_TIMEOUT defaults to
# 600 s. DEVICE_TARGET=CPU runs the same path on CPU (one server, MindSpore's dynamic
# cluster instead of HCCL). --dry-run prints each command.
# Python: $PYTHON if set, else the repo's .venv/bin/python if present, else python3.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog RANK_TABLE_FILE CONFIG [RANK_START] [LOCAL_DEVICE_NUM] [--dry-run] [-- trainer args]"
help_lines=2,23
source "$(dirname "$0")/launch_common.sh"
parse_launch_args "$@"
[ ${#positional[@]} -ge 2 ] && [ ${#positional[@]} -le 4 ] || die "expected 2 to 4 positional arguments, got ${#positional[@]}; $usage"

table=${positional[0]}
config=${positional[1]}
rank_start=${positional[2]:-auto}
local_device_num=${positional[3]:-8}
[ -f "$table" ] || die "RANK_TABLE_FILE='$table' is not a file"
[ -f "$config" ] || die "CONFIG='$config' is not a file"
[ "$rank_start" = auto ] || [[ $rank_start =~ ^[0-9]+$ ]] || die "RANK_START='$rank_start' is invalid: a non-negative integer"
[[ $local_device_num =~ ^[1-8]$ ]] || die "LOCAL_DEVICE_NUM='$local_device_num' is invalid: an integer in 1..8"
check_devices_per_server LOCAL_DEVICE_NUM "$local_device_num"

table=$(absolute "$table")
config=$(absolute "$config")
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# This server in the rank table: its addresses (SERVER_IP, else hostname -I) name it; on CPU (one server) rank 0.
host_check=()
if [ "$device_target" = Ascend ]; then
    host_ips=${SERVER_IP:-$(hostname -I 2>/dev/null || true)}
    host_check=(--rank-start-for "$host_ips")
    [ "$rank_start" != auto ] || rank_start=$("$py" -m pangu_sigma.cluster.ranktable "$table" "${host_check[@]}") || exit 2
fi
[ "$rank_start" != auto ] || rank_start=0
rank_start=$((10#$rank_start))
# Prints "RANK_SIZE LOGICAL_ID... PHYSICAL_ID..." for our ranks, or a one-line error (exit 2).
visible=${ASCEND_VISIBLE_DEVICES:-0-7}
plan=$("$py" -m pangu_sigma.cluster.ranktable "$table" --local-ranks "$rank_start" "$local_device_num" \
       --visible-devices "$visible" "${host_check[@]}") || exit 2
read -r -a fields <<< "$plan"
rank_size=${fields[0]}
logical_ids=("${fields[@]:1:$local_device_num}")
physical_ids=("${fields[@]:$((1 + local_device_num))}")

# "SERVER_ID RANK_START=N devices=K" of the server holding our ranks: its log folder and device count.
read -r server_id _ server_devices <<< "$("$py" -m pangu_sigma.cluster.ranktable "$table" --servers \
    | awk -v r="$rank_start" '{ split($2, s, "="); split($3, n, "="); if (r >= s[2] && r < s[2] + n[2]) print }')"
server_devices=${server_devices#devices=}
# The config against the cluster (world size, global batch, devices per server), also in --dry-run.
config_sets=(--set "parallel.device_target=$device_target")
for ((i = 0; i < ${#extra[@]}; i++)); do
    [ "${extra[$i]}" != --set ] || config_sets+=(--set "${extra[$((i + 1))]:-}")
done
check=$("$py" -m pangu_sigma.cluster.launch_check --config "$config" --workers "$server_devices" \
        --world-size "$rank_size" --source "rank table $table" "${config_sets[@]}" 2>&1) \
    || { echo "$prog: $check" >&2; exit 2; }

output_dir=$(absolute "${OUTPUT_DIR:-./output}")
cluster_env=()
if [ "$device_target" = CPU ]; then
    # No HCCL on CPU: MindSpore's dynamic cluster (a scheduler process + MS_* variables, what msrun does).
    [ "$rank_start" = 0 ] && [ "$local_device_num" = "$rank_size" ] \
        || die "DEVICE_TARGET=CPU runs one server: RANK_START 0 and LOCAL_DEVICE_NUM = RANK_SIZE ($rank_size)"
    sched_port=${MS_SCHED_PORT:-8119}
    [[ $sched_port =~ ^[0-9]+$ ]] && [ "$sched_port" -ge 1024 ] && [ "$sched_port" -le 65535 ] \
        || die "MS_SCHED_PORT='$sched_port' is invalid: 1024..65535"
    cluster_env=(MS_SCHED_HOST=127.0.0.1 MS_SCHED_PORT="$sched_port" MS_WORKER_NUM="$rank_size")
fi

pids=()
if [ "$device_target" = CPU ] && [ "$dry_run" = 0 ]; then
    mkdir -p "$output_dir" || die "cannot create the output folder $output_dir"
    env "${cluster_env[@]}" MS_ROLE=MS_SCHED "$py" -c \
        "import mindspore as ms; ms.set_device('CPU'); from mindspore.communication import init; init()" \
        < /dev/null > "$output_dir/scheduler.log" 2>&1 &
    echo "scheduler: pid $!, log $output_dir/scheduler.log"
fi

for ((i = 0; i < local_device_num; i++)); do
    rank_id=$((rank_start + i))
    device_id=${logical_ids[$i]}
    physical_id=${physical_ids[$i]}
    work_dir=$output_dir/$server_id/device$physical_id
    cmd=("$py" -m pangu_sigma.training.train --paths-from "$launch_dir" --config "$config"
         --set "parallel.device_target=$device_target" "${extra[@]}")
    worker_env=()
    [ "$device_target" = CPU ] && worker_env=("${cluster_env[@]}" MS_ROLE=MS_WORKER MS_NODE_ID="$rank_id")
    if [ "$dry_run" = 1 ]; then
        printf 'RANK_ID=%s DEVICE_ID=%s RANK_SIZE=%s RANK_TABLE_FILE=%q PHYSICAL_DEVICE_ID=%s HCCL_CONNECT_TIMEOUT=%s' \
            "$rank_id" "$device_id" "$rank_size" "$table" "$physical_id" "$HCCL_CONNECT_TIMEOUT"
        [ ${#worker_env[@]} -eq 0 ] || printf ' %s' "${worker_env[@]}"
        printf ' cd %q &&' "$work_dir"
        printf ' %q' "${cmd[@]}"
        printf ' > log 2>&1\n'
        continue
    fi
    mkdir -p "$work_dir" || die "cannot create the working folder $work_dir"
    (
        cd "$work_dir"
        trap '' HUP  # keep training when the launching shell's terminal closes
        export RANK_TABLE_FILE=$table RANK_SIZE=$rank_size RANK_ID=$rank_id DEVICE_ID=$device_id
        export PHYSICAL_DEVICE_ID=$physical_id
        [ ${#worker_env[@]} -eq 0 ] || export "${worker_env[@]}"
        exec "${cmd[@]}" < /dev/null > log 2>&1
    ) &
    pids+=($!)
    echo "rank $rank_id on device $physical_id (DEVICE_ID $device_id): pid $!, log $work_dir/log"
done

if [ "$dry_run" = 0 ]; then
    echo "started $local_device_num processes (ranks $rank_start..$((rank_start + local_device_num - 1)) of $rank_size)"
    echo "follow with: tail -f $output_dir/$server_id/device${physical_ids[0]}/log"
    if [ "${WAIT:-0}" = 1 ]; then  # WAIT=1: stay in the foreground and return the first failure
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        echo "all processes ended (exit status $status)"
        exit "$status"
    fi
fi
