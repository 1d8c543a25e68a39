#!/usr/bin/env bash
# score-proxy against nginx (limit_req + proxy_cache) on this machine; see BENCHMARKS.md.
#
#   scripts/bench.sh                    the full suite (about 20 minutes): rewrites
#                                       BENCHMARKS.md (keeping its hand-written part) and
#                                       bench/nginx-*.generated.conf
#   scripts/bench.sh --quick            the CI smoke test (under 3 minutes, no timing
#                                       thresholds): report under target/bench-report/
#   scripts/bench.sh --only hits,memory some scenarios: burst, identical, hits, overload,
#                                       telemetry, memory, replicas, network, redis-down
#                                       (report under target/bench-report/)
#   scripts/bench.sh --only network     scenario 8 alone (about 8 minutes): the strict
#                                       simulator behind a seeded network delay
#   scripts/bench.sh --only redis-down  scenario 9 alone (about 4 minutes): three replicas
#                                       while their Redis is stopped and restarted
#   scripts/bench.sh ... --out PATH     write the report elsewhere
#
# Installs nothing. nginx, wrk and redis-server (the replicas scenarios) must be installed
# (`apt-get install -y nginx wrk redis-server`, which scripts/install-deps.sh does); this
# script checks, builds the release binary the benchmark drives, and runs
# `score-bench` (crates/bench).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian puts nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for tool in nginx wrk redis-server; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: missing ${missing[*]}: install with \`apt-get install -y nginx wrk redis-server\` (as root)" >&2
    exit 1
fi

# The overload scenario holds 2000 client connections, and the proxy as many: raise the
# open-file limit as far as the hard limit allows.
want=16384
soft="$(ulimit -Sn)"
hard="$(ulimit -Hn)"
if [ "$soft" = unlimited ] || [ "$soft" -ge "$want" ]; then
    :
elif [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then
    ulimit -n "$want"
else
    ulimit -n "$hard"
    echo "bench: open-file limit is $hard (hard); the overload scenario may run short of descriptors" >&2
fi

cargo build --release --locked --workspace --bins
# Run the binary the workspace build made: `cargo run -p score-bench` alone would resolve the
# proxy library's features for that one package and build it a second time. A
# CARGO_TARGET_DIR elsewhere holds that build, the proxy's binary included.
release="${CARGO_TARGET_DIR:-target}/release"
export SCORE_PROXY_BIN="${SCORE_PROXY_BIN:-$release/score-proxy}"
exec "$release/score-bench" "$@"
