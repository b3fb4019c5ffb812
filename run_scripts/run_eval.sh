#!/usr/bin/env bash
# Evaluate a checkpoint (validation perplexity) in the foreground.
#
#   run_eval.sh CONFIG CHECKPOINT [--device-target CPU|Ascend] [--dry-run] [-- eval args]
#
# The device target defaults to CPU; on Ascend the NPU is $DEVICE_ID (default 0).
# --dry-run prints the command only.
# Python: $PYTHON if set, else the repo's .venv/bin/python if present, else python3.
set -euo pipefail

prog=$(basename "$0")
usage="usage: $prog CONFIG CHECKPOINT [--device-target CPU|Ascend] [--dry-run] [-- eval args]"
help_lines=2,8
source "$(dirname "$0")/launch_common.sh"

dry_run=0
target=CPU
positional=()
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --device-target) [ $# -ge 2 ] || die "--device-target needs a value (CPU or Ascend)"; target=$2; shift ;;
        --device-target=*) target=${1#*=} ;;
        -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option '$1'; $usage" ;;
        *) positional+=("$1") ;;
    esac
    shift
done
[ ${#positional[@]} -eq 2 ] || die "expected 2 positional arguments, got ${#positional[@]}; $usage"

config=${positional[0]}
checkpoint=${positional[1]}
[ -f "$config" ] || die "CONFIG='$config' is not a file"
[ -e "$checkpoint" ] || die "CHECKPOINT='$checkpoint' does not exist"
case $target in
    CPU|Ascend) ;;
    *) die "--device-target='$target' is invalid: CPU or Ascend" ;;
esac
device_id=${DEVICE_ID:-0}
[[ $device_id =~ ^[0-7]$ ]] || die "DEVICE_ID='$device_id' is invalid: an integer in 0..7"

cmd=("$py" -m pangu_sigma.evaluation.eval --config "$(absolute "$config")" --checkpoint "$(absolute "$checkpoint")"
     --set "parallel.device_target=$target" "${extra[@]}")
if [ "$dry_run" = 1 ]; then
    [ "$target" = Ascend ] && printf 'DEVICE_ID=%s ' "$device_id"
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[ "$target" = Ascend ] && export DEVICE_ID=$device_id
exec "${cmd[@]}"
