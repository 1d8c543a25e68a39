# Shared helpers for the scripts in this directory (sourced, not run).
#
# start_bg NAME CMD...   starts CMD in the background, logging to $WORK/NAME.log, and waits
#                        for its "listening address=HOST:PORT" line; sets ADDR.
# Everything started is stopped on exit.

set -euo pipefail

WORK="$(mktemp -d "${TMPDIR:-/tmp}/score-proxy.XXXXXX")"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

die() {
    echo "error: $*" >&2
    exit 1
}

start_bg() {
    local name="$1"
    shift
    local log="$WORK/$name.log"
    "$@" >"$log" 2>&1 &
    PIDS+=("$!")
    local pid=$!
    for _ in $(seq 1 300); do
        if ADDR="$(grep -o -m1 'address=[0-9.:]*' "$log" 2>/dev/null)"; then
            ADDR="${ADDR#address=}"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "$name exited before listening"; }
        sleep 0.1
    done
    cat "$log" >&2
    die "$name did not report its address within 30 s"
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is not installed (run scripts/install-deps.sh, or: apt-get install -y $2)"
}
