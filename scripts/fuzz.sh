#!/usr/bin/env bash
# Fuzzes the query path of /proxy/score (fuzz/fuzz_targets/query.rs) with libFuzzer through
# cargo-fuzz, on the stable toolchain. See docs/fuzzing.md for what is checked and for the
# results of long runs.
#
#   scripts/fuzz.sh                 2,000,000 runs (about a minute after the build): CI
#   scripts/fuzz.sh 50000000        a long run by hand
#   FUZZ_MAX_TIME=900 scripts/fuzz.sh 0      run for 15 minutes instead of a count
#   FUZZ_SANITIZER=address scripts/fuzz.sh   with AddressSanitizer (needs RUSTC_BOOTSTRAP=1,
#                                            set here: -Zsanitizer is a nightly flag)
#
# The default sanitizer is none: cargo-fuzz's default (address) passes `-Zsanitizer=address`,
# which stable rustc refuses, and the crate forbids unsafe code, so coverage-guided search
# for panics and wrong answers is what matters here. The corpus lives in fuzz/corpus/query
# (not in git) and grows from run to run; a crash is saved under fuzz/artifacts/query and
# fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${1:-2000000}"
[ "$RUNS" = 0 ] && RUNS=-1  # libFuzzer's "no limit on runs"
MAX_TIME="${FUZZ_MAX_TIME:-0}"
SANITIZER="${FUZZ_SANITIZER:-none}"
CARGO_FUZZ_VERSION="0.13.2"

fail() { echo "fuzz.sh: FAILED: $*" >&2; exit 1; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" || fail "cargo install cargo-fuzz"
fi

if [ "$SANITIZER" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

corpus=fuzz/corpus/query
mkdir -p "$corpus" fuzz/artifacts/query
# A few seeds so that a fresh corpus starts from real queries, not from nothing.
seed() { printf '%s' "$2" >"$corpus/seed-$1"; }
seed plain 'cpf=89336333089&client_id=000'
seed formatted 'cpf=893.363.330-89&client_id=a+b%21'
seed encoded 'c%70f=893%2E363%2E330%2D89&client%5Fid=%41'
seed repeated 'cpf=01658739060&cpf=89336333089&client_id=1'
seed invalid 'cpf=%FF&client_id=x&x=y&&=&cpf'

log="target/fuzz-query.log"
mkdir -p target
echo "fuzz.sh: building and running the query target ($RUNS runs, max time ${MAX_TIME}s, sanitizer $SANITIZER)"
started=$SECONDS
set +e
cargo fuzz run --sanitizer "$SANITIZER" query "$corpus" -- \
    -runs="$RUNS" -max_total_time="$MAX_TIME" \
    -dict=fuzz/query.dict -max_len=1024 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix=fuzz/artifacts/query/ 2>&1 | tee "$log" \
    | grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::|==|thread|Done|Error|error)'
rc=${PIPESTATUS[0]}
set -e

runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)"
echo "fuzz.sh: ${runs:-?} runs in $((SECONDS - started)) s (build included), ${speed:-?} exec/s, ${cov:-?}; log in $log"
if [ "$rc" != 0 ]; then
    grep -E 'panicked|assertion|Test unit written' "$log" | head -20 >&2 || true
    fail "the fuzzer stopped with exit code $rc; the crashing input is under fuzz/artifacts/query (replay: cargo fuzz run --sanitizer $SANITIZER query <file>)"
fi
echo "fuzz.sh: no crash"
