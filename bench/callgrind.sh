#!/usr/bin/env bash
# Instructions per cache-hit request, counted by callgrind: deterministic, so unlike
# throughput it does not move with other load on the machine. Used for BENCHMARKS.md's
# profiling notes.
#
#   bench/callgrind.sh off|metrics|tracing|sampled|default|nginx [BIN]
#
# Starts the simulator (rate rule off), the proxy under `valgrind --tool=callgrind` in the
# given telemetry mode (tracing exports every span, `always_on`, to a throwaway OTLP sink;
# sampled is the same with `parentbased_traceidratio` at 0.1), warms one key, zeroes the
# counters, runs `wrk -t1 -c4 -d10s` with bench/wrk.lua, dumps, and prints instructions per
# request and the callgrind file (read it with `callgrind_annotate --inclusive=yes FILE`).
# `nginx` does the same for the rival: bench/nginx.conf.template (rate 1000r/s, so the warm-up
# is not paced) in one process (`master_process off`), a proxy_cache hit per request.
# Needs valgrind, wrk, curl and python3 (and nginx for that mode).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?usage: bench/callgrind.sh off|metrics|tracing|sampled|default|nginx [BIN]}"
bin="${2:-target/release/score-proxy}"
out="${CALLGRIND_OUT:-target/callgrind}"
mkdir -p "$out"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port="$(free_port)"; proxy_port="$(free_port)"; sink_port="$(free_port)"

env -i RUST_LOG=off "$bin" simulate-upstream --listen "127.0.0.1:$sim_port" --min-interval 0s \
    >"$work/sim.log" 2>&1 &
pids+=($!)

case "$mode" in
    off) envs=(SCORE_PROXY_METRICS=false RUST_LOG=off) ;;
    metrics) envs=(SCORE_PROXY_METRICS=true RUST_LOG=off) ;;
    tracing|sampled)
        python3 - "$sink_port" >"$work/sink.log" 2>&1 <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
        pids+=($!)
        envs=(SCORE_PROXY_METRICS=true RUST_LOG=off
              "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port")
        if [ "$mode" = tracing ]; then
            envs+=(OTEL_TRACES_SAMPLER=always_on)
        else
            envs+=(OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1)
        fi ;;
    default) envs=(SCORE_PROXY_METRICS=true) ;;
    nginx) export PATH="$PATH:/usr/sbin:/sbin"; command -v nginx >/dev/null || { echo "nginx is not installed" >&2; exit 2; } ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
esac

file="$out/callgrind.$mode"
if [ "$mode" = nginx ]; then
    inner_port="$(free_port)"
    sed -e "s|{{PREFIX}}|$work|g" -e "s|{{OUTER_PORT}}|$proxy_port|g" -e "s|{{INNER_PORT}}|$inner_port|g" \
        -e "s|{{SIM_PORT}}|$sim_port|g" -e "s|{{RATE}}|1000r/s|g" -e "s|{{BURST}}|1000|g" \
        bench/nginx.conf.template >"$work/nginx.conf"
    valgrind --tool=callgrind --callgrind-out-file="$file.%p" \
        "$(command -v nginx)" -p "$work" -e "$work/error.log" -c "$work/nginx.conf" \
        -g 'daemon off; master_process off;' >"$work/proxy.log" 2>&1 &
else
    env -i "${envs[@]}" valgrind --tool=callgrind --callgrind-out-file="$file.%p" \
        "$bin" --listen "127.0.0.1:$proxy_port" --upstream-url "http://127.0.0.1:$sim_port/api/score" \
        >"$work/proxy.log" 2>&1 &
fi
vg=$!
pids+=($vg)

path="/proxy/score?cpf=01658739060&client_id=bench-client"
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$proxy_port$path" && break
    sleep 0.2
done
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$proxy_port$path"; done
echo "$path" >"$work/keys.txt"
callgrind_control --zero "$vg" >/dev/null
requests="$(BENCH_KEYS="$work/keys.txt" wrk -t1 -c4 -d10s -s bench/wrk.lua "http://127.0.0.1:$proxy_port" \
    | tail -1 | sed 's/.*"requests":\([0-9]*\).*/\1/')"
sleep 6 # let the batch span exporter run, so that its work is counted
callgrind_control --dump "$vg" >/dev/null
sleep 1
total="$(grep -h '^totals:' "$file.$vg".* | head -1 | awk '{print $2}')"
echo "$mode: $requests requests, $total instructions, $((total / requests)) per request ($(ls "$file.$vg".*))"
