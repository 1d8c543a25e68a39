#!/usr/bin/env bash
# Every check of the observability stack, in one command:
#   promtool check config / check rules / test rules, amtool check-config and routing,
#   static checks, end-to-end check.
#
#   bash scripts/stack/run.sh
#
# Needs: promtool and prometheus (Debian: apt-get install -y prometheus), amtool and
# prometheus-alertmanager (apt-get install -y prometheus-alertmanager), redis-server (for
# the replicas; apt-get install -y redis-server), python3 with pyyaml and jsonschema (pip
# install pyyaml jsonschema), and a built score-proxy binary ($SCORE_PROXY_BIN, default
# target/release/score-proxy). The end-to-end check runs as root (it gives Prometheus a
# resolver of its own to exercise the replicas' DNS discovery; see scripts/stack/e2e.py).
# It builds and installs nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SCORE_PROXY_BIN="${SCORE_PROXY_BIN:-target/release/score-proxy}"
export SCORE_PROXY_BIN

missing() {
    echo "scripts/stack/run.sh: $*" >&2
    exit 2
}

command -v promtool >/dev/null 2>&1 \
    || missing "promtool not found on PATH. Install Debian's prometheus package (apt-get install -y prometheus), which provides promtool and prometheus."
command -v prometheus >/dev/null 2>&1 \
    || missing "prometheus not found on PATH. Install Debian's prometheus package (apt-get install -y prometheus)."
command -v amtool >/dev/null 2>&1 \
    || missing "amtool not found on PATH. Install Debian's prometheus-alertmanager package (apt-get install -y prometheus-alertmanager), which provides amtool and prometheus-alertmanager."
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
    || missing "prometheus-alertmanager not found on PATH. Install Debian's prometheus-alertmanager package (apt-get install -y prometheus-alertmanager)."
command -v redis-server >/dev/null 2>&1 \
    || missing "redis-server not found on PATH (the end-to-end check runs the replicas against it). Install Debian's redis-server package (apt-get install -y redis-server)."
command -v python3 >/dev/null 2>&1 || missing "python3 not found on PATH."
python3 -c 'import yaml, jsonschema' 2>/dev/null \
    || missing "python3 lacks pyyaml or jsonschema: pip install pyyaml jsonschema"
[ -x "$SCORE_PROXY_BIN" ] \
    || missing "no score-proxy binary at $SCORE_PROXY_BIN: build it first (cargo build --release) or set SCORE_PROXY_BIN."

shopt -s nullglob
rules=(deploy/prometheus/rules/*.yml)
tests=(deploy/prometheus/tests/*.yml)
[ ${#rules[@]} -gt 0 ] || missing "no rule files in deploy/prometheus/rules/"
[ ${#tests[@]} -gt 0 ] || missing "no rule tests in deploy/prometheus/tests/"

timings=()
step() {
    local name="$1"
    shift
    echo
    echo "== $name"
    local started=$SECONDS
    if ! "$@"; then
        echo "scripts/stack/run.sh: FAILED: $name" >&2
        exit 1
    fi
    timings+=("$(printf '%4ss  %s' "$((SECONDS - started))" "$name")")
}

step "promtool check config" promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules" promtool check rules "${rules[@]}"
step "promtool test rules" promtool test rules "${tests[@]}"
step "amtool check-config" amtool check-config deploy/alertmanager/alertmanager.yml
# Severity is urgency: critical alerts reach the pager's receiver, warnings the team's.
alert_routes() {
    local config=deploy/alertmanager/alertmanager.yml
    amtool config routes test --config.file="$config" --verify.receivers=on-call-pager \
        severity=critical alertname=ScoreProxyDown job=score-proxy 2>/dev/null \
        && amtool config routes test --config.file="$config" --verify.receivers=team-chat \
        severity=warning alertname=ScoreProxyUpstreamPenalty job=score-proxy 2>/dev/null
}
step "amtool: critical alerts page, warnings do not" alert_routes
step "static checks (compose schema and safety, mounts, alerting, runbook, dashboards)" python3 scripts/stack/check_static.py
step "end-to-end (prometheus + proxy + replicas + redis + simulators on loopback)" python3 scripts/stack/e2e.py

echo
echo "== all observability-stack checks passed"
printf '%s\n' "${timings[@]}"
