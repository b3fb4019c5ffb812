# Sourced by the launch scripts after they set `prog`, `usage` and `help_lines`:
# die / absolute helpers, the Python to use, and the shared argument parser.
die() { echo "$prog: error: $*" >&2; exit 2; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/${1#./}" ;; esac; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3; fi
command -v "$py" > /dev/null || die "PYTHON='$py' is not an executable; set PYTHON to a python3 with this repo's requirements"

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
