#!/usr/bin/env bash
# promtool (Debian's prometheus package) lints a live scrape of /metrics: it must report
# nothing. Traffic first, so that histograms and labelled series have samples.
#
# Usage: scripts/check-metrics.sh   (SCORE_PROXY_BIN defaults to target/release/score-proxy)
source "$(dirname "$0")/lib.sh"
need promtool prometheus
need curl curl
BIN="${SCORE_PROXY_BIN:-target/release/score-proxy}"
[ -x "$BIN" ] || die "$BIN not found: run cargo build --release first"
SIM_BIN="${SCORE_SIM_BIN:-$(dirname "$BIN")/score-sim}"
[ -x "$SIM_BIN" ] || die "$SIM_BIN not found: run cargo build --release --workspace first"

start_bg simulator "$SIM_BIN" --listen 127.0.0.1:0 --min-interval 100ms
SIM="$ADDR"
start_bg proxy env RUST_LOG=info "$BIN" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --upstream-url "http://$SIM/api/score" --rate 8 --rate-guard 20ms
PROXY="$ADDR"

for q in "cpf=89336333089&client_id=000" "cpf=89336333089&client_id=000" \
    "cpf=01658739060&client_id=000" "cpf=12345678900&client_id=000" "client_id=000"; do
    curl -s -o /dev/null "http://$PROXY/proxy/score?$q"
done

for source in "http://$PROXY/metrics" "http://$PROXY/metrics?format=prometheus"; do
    curl -sf -H 'Accept: text/plain;version=0.0.4' "$source" >"$WORK/scrape.txt"
    grep -q '^score_proxy_cache_lookups_total{result="hit"} 1$' "$WORK/scrape.txt" \
        || die "the scrape of $source lacks the expected hit"
    # The names alerts and dashboards rely on: the standard process metrics, unprefixed;
    # states one series each; the budget spent; no stale result among lookups.
    for series in '^process_cpu_seconds_total ' '^process_resident_memory_bytes ' \
        '^process_start_time_seconds ' '^score_proxy_breaker_state{state="closed"} 1$' \
        '^score_proxy_pacing_mode{mode="local"} 1$' '^score_proxy_upstream_call_starts_total 2$' \
        '^score_proxy_cache_stale_answers_total 0$' '^score_proxy_queue_timeout_seconds ' \
        '^score_proxy_expected_replicas 1$'; do
        grep -q "$series" "$WORK/scrape.txt" || die "the scrape of $source lacks $series"
    done
    if grep -q '^score_proxy_process_\|result="stale"' "$WORK/scrape.txt"; then
        die "the scrape of $source still has a score_proxy_process_* metric or a stale lookup result"
    fi
    if ! out="$(promtool check metrics <"$WORK/scrape.txt" 2>&1)" || [ -n "$out" ]; then
        echo "$out" >&2
        die "promtool check metrics found problems in $source"
    fi
done
echo "promtool check metrics: clean ($(grep -c '^score_proxy_\|^process_' "$WORK/scrape.txt") samples)"
