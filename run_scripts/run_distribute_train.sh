#!/usr/bin/env bash
# Start one training process per local NPU of this server (Ascend, HCCL).
#
#   run_distribute_train.sh RANK_TABLE_FILE CONFIG [RANK_START] [LOCAL_DEVICE_NUM] [--dry-run] [-- trainer args]
#
# Run it on every server with RANK_START = the first rank of that server in
# the rank table (0, 8, 16, ...). Device i gets RANK_ID=RANK_START+i and the
# DEVICE_ID the rank table gives that rank; it runs in
# ${OUTPUT_DIR:-./output}/device$DEVICE_ID with its own `log` file (relative
# paths in trainer args are resolved from that folder). --dry-run prints the
# env and command of every device and starts nothing.
# Python: $PYTHON if set, else the repo's .venv/bin/python if present, else python3.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog RANK_TABLE_FILE CONFIG [RANK_START] [LOCAL_DEVICE_NUM] [--dry-run] [-- trainer args]"
help_lines=2,12
source "$(dirname "$0")/launch_common.sh"
parse_launch_args "$@"
[ ${#positional[@]} -ge 2 ] && [ ${#positional[@]} -le 4 ] || die "expected 2 to 4 positional arguments, got ${#positional[@]}; $usage"

table=${positional[0]}
config=${positional[1]}
rank_start=${positional[2]:-0}
local_device_num=${positional[3]:-8}
[ -f "$table" ] || die "RANK_TABLE_FILE='$table' is not a file"
[ -f "$config" ] || die "CONFIG='$config' is not a file"
[[ $rank_start =~ ^[0-9]+$ ]] || die "RANK_START='$rank_start' is invalid: a non-negative integer"
[[ $local_device_num =~ ^[1-8]$ ]] || die "LOCAL_DEVICE_NUM='$local_device_num' is invalid: an integer in 1..8"
rank_start=$((10#$rank_start))

table=$(absolute "$table")
config=$(absolute "$config")
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Prints "RANK_SIZE DEVICE_ID..." for our ranks, or a one-line error (exit 2).
plan=$("$py" -m pangu_sigma.cluster.ranktable "$table" --local-ranks "$rank_start" "$local_device_num") || exit 2
read -r rank_size device_ids <<< "$plan"
read -r -a device_ids <<< "$device_ids"

output_dir=$(absolute "${OUTPUT_DIR:-./output}")

for ((i = 0; i < local_device_num; i++)); do
    rank_id=$((rank_start + i))
    device_id=${device_ids[$i]}
    work_dir=$output_dir/device$device_id
    cmd=("$py" -m pangu_sigma.training.train --config "$config" --set parallel.device_target=Ascend "${extra[@]}")
    if [ "$dry_run" = 1 ]; then
        printf 'RANK_ID=%s DEVICE_ID=%s RANK_SIZE=%s RANK_TABLE_FILE=%q cd %q &&' \
            "$rank_id" "$device_id" "$rank_size" "$table" "$work_dir"
        printf ' %q' "${cmd[@]}"
        printf ' > log 2>&1\n'
        continue
    fi
    mkdir -p "$work_dir" || die "cannot create the working folder $work_dir"
    (
        cd "$work_dir"
        trap '' HUP  # keep training when the launching shell's terminal closes
        export RANK_TABLE_FILE=$table RANK_SIZE=$rank_size RANK_ID=$rank_id DEVICE_ID=$device_id
        exec "${cmd[@]}" < /dev/null > log 2>&1
    ) &
    echo "rank $rank_id on device $device_id: pid $!, log $work_dir/log"
done

if [ "$dry_run" = 0 ]; then
    echo "started $local_device_num processes (ranks $rank_start..$((rank_start + local_device_num - 1)) of $rank_size)"
    echo "follow with: tail -f $output_dir/device${device_ids[0]}/log"
fi
