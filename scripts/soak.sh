#!/usr/bin/env bash
# Soak test: 10 minutes (by default) of 2 x queue-capacity clients with mixed keys and
# impatient callers, while the upstream simulator's faults switch every 30 s; checks that
# the proxy's resident memory and open fds stay flat, that it causes no rate violation and
# that it wastes no upstream call on a client that hung up. Not run by CI (too long);
# results are recorded in docs/soak.md.
#
#   scripts/soak.sh                     10 minutes at the fast pace (4 calls/s, same rules)
#   scripts/soak.sh --minutes 2         a shorter run
#   scripts/soak.sh --pace real         the real contract: 1 call/s, 2 s penalty
#   scripts/soak.sh --help              every option (tolerances, slack, seeds)
#
# The driver is scripts/soak.py (Python standard library only); it starts and stops the
# simulator and the proxy itself, writes logs and target/soak/summary.json, and exits 1 with
# a "soak: FAILED: ..." line per failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
    case "$arg" in
        -h|--help) exec python3 scripts/soak.py --help ;;
    esac
done

cargo build --release --locked --quiet --workspace --bins
exec python3 scripts/soak.py --bin target/release/score-proxy "$@"
