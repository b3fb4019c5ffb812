#!/usr/bin/env bash
# Train on one Ascend NPU (no rank table).
#
#   run_standalone_train.sh CONFIG DEVICE_ID [--dry-run] [-- trainer args]
#
# DEVICE_ID is the logical NPU index (0..visible NPUs - 1). Runs in
# ${OUTPUT_DIR:-./output}/standalone_device$DEVICE_ID with its own `log` file,
# in the background; relative paths (arguments and the config's data/output/
# checkpoint paths) are resolved from the folder this script was started from.
# DEVICE_TARGET=CPU runs the same path on CPU; WAIT=1 stays in the foreground.
# --dry-run prints the env and command only.
# Python: $PYTHON if set, else the repo's .venv/bin/python if present, else python3.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog CONFIG DEVICE_ID [--dry-run] [-- trainer args]"
help_lines=2,12
source "$(dirname "$0")/launch_common.sh"
parse_launch_args "$@"
[ ${#positional[@]} -eq 2 ] || die "expected 2 positional arguments, got ${#positional[@]}; $usage"

config=${positional[0]}
device_id=${positional[1]}
[ -f "$config" ] || die "CONFIG='$config' is not a file"
[[ $device_id =~ ^[0-7]$ ]] || die "DEVICE_ID='$device_id' is invalid: an integer in 0..7"

config=$(absolute "$config")
work_dir=$(absolute "${OUTPUT_DIR:-./output}")/standalone_device$device_id
cmd=("$py" -m pangu_sigma.training.train --paths-from "$launch_dir" --config "$config"
     --set "parallel.device_target=$device_target" "${extra[@]}")
if [ "$dry_run" = 1 ]; then
    printf 'RANK_ID=0 DEVICE_ID=%s RANK_SIZE=1 cd %q &&' "$device_id" "$work_dir"
    printf ' %q' "${cmd[@]}"
    printf ' > log 2>&1\n'
    exit 0
fi

mkdir -p "$work_dir" || die "cannot create the working folder $work_dir"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
(
    cd "$work_dir"
    trap '' HUP  # keep training when the launching shell's terminal closes
    unset RANK_TABLE_FILE
    export RANK_ID=0 RANK_SIZE=1 DEVICE_ID=$device_id
    exec "${cmd[@]}" < /dev/null > log 2>&1
) &
pid=$!
echo "training on device $device_id: pid $pid, log $work_dir/log"
echo "follow with: tail -f $work_dir/log"
if [ "${WAIT:-0}" = 1 ]; then
    status=0
    wait "$pid" || status=$?
    echo "training ended (exit status $status)"
    exit "$status"
fi
