#!/usr/bin/env bash
# Contract test of the public API: schemathesis generates requests from the OpenAPI
# description the proxy serves (/openapi.json) and checks every answer against it.
#
#   scripts/schemathesis.sh                      ~2 minutes, fixed seed (CI)
#   SCHEMATHESIS_MAX_EXAMPLES=1000 SCHEMATHESIS_SEED=$RANDOM scripts/schemathesis.sh
#
# It starts `score-sim` and the proxy on free loopback ports at a fast
# pace (simulator: 1 call per 50 ms, 100 ms penalty; proxy: 15 calls/s with a 15 ms guard,
# 2 s queue and upstream timeouts, a 2 s cache so that repeated values reach the upstream
# again, a default client id so that lookups without one reach it too) and runs schemathesis twice, then stops everything:
#   1. healthy upstream: checks not_a_server_error, response_schema_conformance,
#      status_code_conformance, content_type_conformance, response_headers_conformance;
#      any 5xx is the proxy's own failure;
#   2. failing upstream (500s, HTML bodies, hangs, cut connections, slowness in turn): the
#      same checks but not_a_server_error; every 5xx must name an upstream failure.
# It fails on any check failure, on a 5xx that is the proxy's own, on a rate violation at
# the simulator, and on a panic in the proxy's log.
#
# schemathesis is installed with pip into a virtualenv under target/ (pinned version).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-1000}"
SEED="${SCHEMATHESIS_SEED:-20261128}"
CHECKS="not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance"
WORK="target/schemathesis"
VENV="target/schemathesis-venv"
BIN="target/release/score-proxy"
SIM_BIN="target/release/score-sim"

fail() { echo "schemathesis.sh: FAILED: $*" >&2; exit 1; }
note() { echo "schemathesis.sh: $*"; }

mkdir -p "$WORK"

# --- schemathesis, pinned, in a virtualenv of its own ------------------------------------
ST="$VENV/bin/schemathesis"
if ! "$ST" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
    note "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
        || fail "pip install schemathesis==$SCHEMATHESIS_VERSION failed"
fi
"$ST" --version

# --- the binary ----------------------------------------------------------------------------
cargo build --release --locked --quiet
[ -x "$BIN" ] || fail "$BIN was not built"
[ -x "$SIM_BIN" ] || fail "$SIM_BIN was not built"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SIM_PORT="$(free_port)"
PORT="$(free_port)"
SIM="http://127.0.0.1:$SIM_PORT"
PROXY="http://127.0.0.1:$PORT"

"$SIM_BIN" --listen "127.0.0.1:$SIM_PORT" --min-interval 50ms --penalty 100ms \
    >"$WORK/simulator.log" 2>&1 &
PIDS+=("$!")
SCORE_PROXY_LOG_FORMAT=json RUST_LOG=info OTEL_SDK_DISABLED=true \
    "$BIN" serve --listen "127.0.0.1:$PORT" --upstream-url "$SIM/api/score" \
    --rate 15 --rate-guard 15ms --queue-timeout 2s --upstream-timeout 2s --cache-ttl 2s \
    --client-id schemathesis \
    >"$WORK/proxy.log" 2>&1 &
PIDS+=("$!")
PROXY_PID="$!"

for _ in $(seq 1 100); do
    if "$BIN" healthcheck --url "$PROXY/health" --timeout 1s >/dev/null 2>&1 \
        && "$BIN" healthcheck --url "$SIM/health" --timeout 1s >/dev/null 2>&1; then
        break
    fi
    kill -0 "$PROXY_PID" 2>/dev/null || { cat "$WORK/proxy.log" >&2; fail "the proxy exited at start-up"; }
    sleep 0.2
done
"$BIN" healthcheck --url "$PROXY/health" --timeout 1s >/dev/null || fail "the proxy never became healthy"

status="$(python3 -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except Exception as e:
    print(getattr(e, "code", "unreachable"))' "$PROXY/openapi.json")"
[ "$status" = 200 ] || fail "GET /openapi.json answered $status: the proxy does not serve its OpenAPI description"

# A hook that gives about half of the generated 11-digit CPFs valid check digits, so that
# lookups reach the upstream (random digits almost never pass mod 11).
cat >"$WORK/hooks.py" <<'PY'
import schemathesis


def _check_digit(digits):
    total = sum(d * w for d, w in zip(digits, range(len(digits) + 1, 1, -1)))
    return 0 if total % 11 < 2 else 11 - total % 11


@schemathesis.hook
def map_query(context, query):
    if context.operation is None or context.operation.path != "/proxy/score":
        return query
    cpf = query.get("cpf") if isinstance(query, dict) else None
    if not isinstance(cpf, str) or not cpf.isascii():
        return query
    digits = cpf.replace(".", "").replace("-", "") if len(cpf) == 14 else cpf
    if len(digits) != 11 or not digits.isdigit() or int(digits[0]) % 2 == 1:
        return query
    d = [int(c) for c in digits[:9]]
    d.append(_check_digit(d))
    d.append(_check_digit(d))
    if len(set(d)) > 1:
        fixed = "".join(map(str, d))
        query["cpf"] = fixed if len(cpf) == 11 else f"{fixed[:3]}.{fixed[3:6]}.{fixed[6:9]}-{fixed[9:]}"
    return query
PY

sim_config() {
    python3 -c 'import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/__sim/config", data=sys.argv[2].encode(), method="PUT",
                             headers={"content-type": "application/json"})
urllib.request.urlopen(req, timeout=5).read()' "$SIM" "$1"
}

# The access log's outcomes of 5xx answers since line $1 of the proxy's log.
server_error_outcomes() {
    tail -n +"$1" "$WORK/proxy.log" | python3 -c 'import json, sys, collections
seen = collections.Counter()
for line in sys.stdin:
    try:
        f = json.loads(line)
    except ValueError:
        continue
    f = f.get("fields", f)
    if isinstance(f.get("status"), int) and f["status"] >= 500:
        seen[f.get("outcome", "?")] += 1
print(" ".join(f"{k}={v}" for k, v in sorted(seen.items())))'
}

run_pass() {
    local name="$1" checks="$2" rc
    note "pass '$name': seed $SEED, up to $MAX_EXAMPLES examples per operation, checks $checks"
    local started=$SECONDS
    set +e
    # Run from $WORK so that schemathesis's files stay out of the work tree.
    (
        cd "$WORK"
        SCHEMATHESIS_HOOKS="$PWD/hooks.py" "../../$ST" run "$PROXY/openapi.json" \
            --checks "$checks" \
            --max-examples "$MAX_EXAMPLES" \
            --seed "$SEED" \
            --workers 1 \
            --request-timeout 10 \
            --generation-database none \
            --report junit --report-dir "report-$name" \
            --no-color
    )
    rc=$?
    set -e
    note "pass '$name' finished in $((SECONDS - started)) s with exit code $rc"
    return "$rc"
}

problems=()
note "proxy $PROXY, simulator $SIM"

# Pass 1: a healthy upstream. Any 5xx would be the proxy's own failure.
log_mark=$(($(wc -l <"$WORK/proxy.log") + 1))
run_pass healthy "$CHECKS" || problems+=("schemathesis found failures with a healthy upstream (see above and $WORK/report-healthy)")
outcomes="$(server_error_outcomes "$log_mark")"
[ -z "$outcomes" ] || problems+=("the proxy answered 5xx with a healthy upstream: $outcomes")

# Pass 2: the upstream misbehaves in turn (errors, HTML bodies, hangs, cut connections,
# slowness). 5xx are then expected and not_a_server_error is left out; every answer must
# still match the document, and every 5xx must name an upstream failure.
log_mark=$(($(wc -l <"$WORK/proxy.log") + 1))
(
    faults=('{"fault":"error","fail_every":2}' '{"fault":"garbage","fail_every":2}'
            '{"fault":"hang","fail_every":3}' '{"fault":"reset","fail_every":2}'
            '{"fault":"unavailable","fail_every":2}' '{"fault":"none","latency_ms":300}')
    i=0
    while true; do
        sim_config "{\"fault\":\"none\",\"latency_ms\":0,\"fail_every\":null}" >/dev/null 2>&1 || exit 0
        sim_config "${faults[$((i % ${#faults[@]}))]}" >/dev/null 2>&1 || exit 0
        i=$((i + 1))
        sleep 3
    done
) &
FAULTS_PID=$!
PIDS+=("$FAULTS_PID")
run_pass faults "${CHECKS#not_a_server_error,}" || problems+=("schemathesis found failures with a failing upstream (see above and $WORK/report-faults)")
kill "$FAULTS_PID" 2>/dev/null || true
wait "$FAULTS_PID" 2>/dev/null || true
sim_config '{"fault":"none","latency_ms":0,"fail_every":null}' >/dev/null
outcomes="$(server_error_outcomes "$log_mark")"
note "5xx outcomes with a failing upstream: ${outcomes:-none}"
for pair in $outcomes; do
    case "${pair%%=*}" in
        upstream_error|upstream_bad_body|upstream_timeout|circuit_open|deadline_unreachable) ;;
        *) problems+=("a 5xx that names no upstream failure with a failing upstream: $pair") ;;
    esac
done

# --- what schemathesis cannot see -----------------------------------------------------------
stats="$(python3 -c 'import json, sys, urllib.request
s = json.load(urllib.request.urlopen(sys.argv[1] + "/__sim/stats?arrivals=false", timeout=5))
print(s["calls"], s["violations"])' "$SIM")"
read -r calls violations <<<"$stats"
note "upstream calls $calls, rate violations $violations"

[ "$violations" = 0 ] || problems+=("$violations upstream rate violations")
kill -0 "$PROXY_PID" 2>/dev/null || problems+=("the proxy died during the run")
if grep -q "panicked" "$WORK/proxy.log"; then
    problems+=("the proxy's log has a panic: $(grep -m1 panicked "$WORK/proxy.log")")
fi

if [ "${#problems[@]}" -gt 0 ]; then
    for p in "${problems[@]}"; do echo "schemathesis.sh: FAILED: $p" >&2; done
    exit 1
fi
note "passed: every response matched the OpenAPI description; no 5xx from the proxy itself; no rate violation"
