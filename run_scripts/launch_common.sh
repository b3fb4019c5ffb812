# Sourced by the launch scripts after they set `prog`, `usage` and `help_lines`:
# die / absolute helpers, the Python to use, the shared argument parser, the
# HCCL start-up timeout and the launch directory that config paths resolve against.
die() { echo "$prog: error: $*" >&2; exit 2; }

# Relative paths (arguments, and the data/output/checkpoint paths inside the
# config, see pangu_sigma/training/run_paths.py) are relative to the folder the
# script was started from, even though each process runs in its own folder.
launch_dir=$PWD
absolute() { case $1 in /*) echo "$1" ;; *) echo "$launch_dir/${1#./}" ;; esac; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3; fi
command -v "$py" > /dev/null || die "PYTHON='$py' is not an executable; set PYTHON to a python3 with this repo's requirements"

# HCCL waits HCCL_CONNECT_TIMEOUT seconds for every device to reach the first
# collective (CANN environment variable reference, HCCL_CONNECT_TIMEOUT: an
# integer in [120, 7200], default 120). Compiling a large graph and loading data
# take longer than 120 s, so the launchers default to 600; set it to override.
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-600}
[[ $HCCL_CONNECT_TIMEOUT =~ ^[0-9]+$ ]] && [ "$HCCL_CONNECT_TIMEOUT" -ge 120 ] && [ "$HCCL_CONNECT_TIMEOUT" -le 7200 ] \
    || die "HCCL_CONNECT_TIMEOUT='$HCCL_CONNECT_TIMEOUT' is invalid: whole seconds in 120..7200"

# Device target of the trainer: Ascend unless DEVICE_TARGET=CPU (CPU runs of the same launch path).
device_target=${DEVICE_TARGET:-Ascend}
case $device_target in
    CPU|Ascend) ;;
    *) die "DEVICE_TARGET='$device_target' is invalid: Ascend or CPU" ;;
esac

# HCCL on Ascend 910A (CANN create_group reference, Atlas training series): 1, 2, 4 or 8 devices per server.
check_devices_per_server() {  # NAME VALUE
    case $2 in
        1|2|4|8) ;;
        *) die "$1='$2' is invalid: 1, 2, 4 or 8 devices per server (HCCL on Ascend 910A; 3, 5, 6 and 7 are not allowed)" ;;
    esac
}

# parse_launch_args "$@": sets dry_run, positional (array) and extra (args after --).
parse_launch_args() {
    dry_run=0
    positional=()
    extra=()
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) dry_run=1 ;;
            -h|--help) sed -n "${help_lines}s/^# \{0,1\}//p" "$0"; exit 0 ;;
            --) shift; extra=("$@"); break ;;
            -*) die "unknown option '$1'; $usage" ;;
            *) positional+=("$1") ;;
        esac
        shift
    done
}
