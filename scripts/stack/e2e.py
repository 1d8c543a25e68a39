#!/usr/bin/env python3
"""End-to-end check of the observability stack, without Docker.

On loopback, with temporary storage and free ports, it starts:
  - the upstream simulator (`score-proxy simulate-upstream`), fast: 1 call per 200 ms,
    answering after 100 ms;
  - the proxy, fast: 5 calls/s, a queue of 8 that times out after 3 s, a 1 s upstream
    timeout, a 10 s cache TTL (so entries expire during the run) and a 2 s breaker
    cool-down;
  - the real `prometheus`, with the repository's deploy/prometheus/prometheus.yml (scrape
    job, params, alert rules) pointed at that proxy and scraping every second.
Then it drives traffic that exercises every outcome (`score-proxy loadgen --mode once`,
a short `continuous` run with the simulator failing on purpose, `once` again), and checks
through Prometheus's HTTP API:
  1. every template variable of every dashboard resolves to values, as Grafana would ask;
  2. every PromQL expression of every dashboard panel (and annotation), with the variables
     substituted as Grafana would, evaluates without error over the run and returns at
     least one series with a finite value, and a non-zero one (the traffic provoked it);
  3. every alert rule evaluates without error in Prometheus; its expression evaluates
     without error, and the same expression without its threshold comparisons (each side
     of every `and`/`or`/`unless`) returns series;
  4. the alerts the run provokes are seen: ScoreProxyUpstreamPenalty firing, and, after
     the proxy is stopped, ScoreProxyDown's condition true (and the alert pending).
Exceptions are listed in ALLOWLIST below, each with its reason.

Environment: SCORE_PROXY_BIN (default target/release/score-proxy), SCORE_PROXY_LOADGEN
(default "$SCORE_PROXY_BIN loadgen"), PROMETHEUS (default: prometheus on PATH),
E2E_KEEP=1 keeps the temporary directory (logs, TSDB) for inspection.
Exit status 0 when every check passes; 1 otherwise, with one line per failure.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - environment problem
    sys.exit("e2e.py: missing Python module yaml; run: pip install pyyaml")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

JOB = "score-proxy"
SCRAPE_INTERVAL_S = 1
# What Grafana would put in place of its built-in interval variables for this run.
RATE_INTERVAL = "15s"  # at least 4 scrape intervals
INTERVAL = "5s"
STEP_S = SCRAPE_INTERVAL_S  # range queries see every scrape

# Queries allowed to break the rule, each with the reason. Keyed by
# (dashboard uid, panel title, refId); kind is "no_series" or "all_zero".
ALLOWLIST: dict[tuple[str, str, str], tuple[str, str]] = {
    ("score-proxy", "CPU", "A"): (
        "all_zero",
        "the prometheus crate's process collector counts CPU in whole seconds (an integer "
        "counter), and the proxy uses less than one CPU second in this run",
    ),
}

# Proxy and simulator settings: fast, so a run takes about a minute.
SIM_ARGS = [
    "--min-interval", "200ms",
    "--penalty", "400ms",
    # Calls take a while, as real ones do: in-flight gauges and coalescing have time to show.
    "--latency", "100ms",
    "--client-ids", "000,001,002,003",
]
PROXY_ARGS = [
    "--rate", "5",
    "--rate-guard", "20ms",
    "--queue-capacity", "8",
    "--queue-timeout", "3s",
    "--upstream-timeout", "1s",
    "--cache-ttl", "10s",
    "--shutdown-grace", "1s",
    # The simulator fails on purpose for seconds at a time; a short cool-down lets the
    # breaker close again within the run.
    "--breaker-cooldown", "2s",
]
LOADGEN_COMMON = ["--client-ids", "000,001,002,003", "--bad-client-id", "unknown-client"]

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"  FAIL {msg}", flush=True)


def ok(msg: str) -> None:
    print(f"  ok   {msg}", flush=True)


def die(msg: str) -> None:
    print(f"e2e: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Children started in their own process groups, stopped in reverse order."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.logdir / f"{name}.log"
        f = log.open("wb")
        try:
            p = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        except OSError as e:
            die(f"cannot start {name} ({argv[0]}): {e}")
        self.procs.append((name, p, log))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
        except ProcessLookupError:
            pass

    def check_alive(self) -> None:
        for name, p, log in self.procs:
            if p.poll() is not None and not getattr(p, "expected_exit", False):
                tail = log.read_text(errors="replace")[-2000:]
                die(f"{name} exited early with status {p.returncode}; last output:\n{tail}")

    def stop_all(self) -> None:
        for _, p, _ in reversed(self.procs):
            self.stop(p)


def wait_until(what: str, fn, timeout: float, interval: float = 0.2, procs: Processes | None = None):
    """Polls fn() until it returns something truthy; dies with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported if the wait times out
            last_error = e
        if procs:
            procs.check_alive()
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            die(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ------------------------------------------------------------------ prometheus API


class Prometheus:
    def __init__(self, base: str):
        self.base = base

    def api(self, path: str, params: dict | list) -> dict:
        url = f"{self.base}/api/v1/{path}"
        data = urllib.parse.urlencode(params, doseq=True).encode()
        req = urllib.request.Request(url, data=data, method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except json.JSONDecodeError:
                return {"status": "error", "error": f"HTTP {e.code}"}
        return body

    def get(self, path: str, params: dict | None = None) -> dict:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)

    def instant(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = self.api("query", params)
        if body.get("status") != "success":
            raise PromError(body.get("error", "unknown error"))
        return body["data"]["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list:
        body = self.api(
            "query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"},
        )
        if body.get("status") != "success":
            raise PromError(body.get("error", "unknown error"))
        return body["data"]["result"]


class PromError(Exception):
    pass


def finite_values(result: list) -> list[float]:
    out = []
    for series in result:
        samples = series.get("values") or ([series["value"]] if "value" in series else [])
        for _, v in samples:
            x = float(v)
            if math.isfinite(x):
                out.append(x)
    return out


# ------------------------------------------------------------------ Grafana's templating

VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


def regular_escape(value: str) -> str:
    """Grafana's prometheusRegularEscape (single-value variables)."""
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape (multi-value / All variables)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def format_variable(var: dict, values: list[str]) -> str:
    """What Grafana's Prometheus data source puts in a query for this variable."""
    if not var.get("multi") and not var.get("includeAll"):
        return regular_escape(values[0])
    escaped = [regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name not in values:
            raise KeyError(name)
        return values[name]

    return VARIABLE.sub(repl, expr)


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*)\s*,\s*)?(\w+)\s*\)\s*$", re.S)


def variable_query(var: dict) -> str:
    q = var.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    return str(q or var.get("definition") or "")


def resolve_variables(prom: Prometheus, dash: dict, builtins: dict[str, str], start: float, end: float):
    """Resolves the dashboard's query variables in order, through the label values API, and
    picks what Grafana shows by default: All for includeAll variables, else the first value."""
    values = dict(builtins)
    for var in (dash.get("templating") or {}).get("list") or []:
        name = var.get("name")
        if var.get("type") != "query":
            fail(f"{dash['uid']}: variable ${name} is of type {var.get('type')!r}, which this check cannot resolve")
            continue
        q = variable_query(var)
        m = LABEL_VALUES.match(q)
        if not m:
            fail(f"{dash['uid']}: variable ${name}: query {q!r} is not label_values(...)")
            continue
        selector, label = m.group(1), m.group(2)
        params: dict = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        try:
            if selector:
                params["match[]"] = substitute(selector.strip(), values)
        except KeyError as e:
            fail(f"{dash['uid']}: variable ${name} uses undefined variable ${e.args[0]}")
            continue
        body = prom.get(f"label/{label}/values", params)
        found = sorted(body.get("data") or [])
        if var.get("regex"):
            found = [v for v in found if re.search(var["regex"], v)]
        if not found:
            fail(f"{dash['uid']}: variable ${name} ({q}) resolves to no values")
            continue
        chosen = found if var.get("includeAll") else found[:1]
        if var.get("includeAll") and var.get("allValue"):
            values[name] = var["allValue"]
        else:
            values[name] = format_variable(var, chosen)
        ok(f"{dash['uid']}: ${name} = {values[name]}  ({len(found)} value(s) from {q})")
    return values


def dashboard_queries(dash: dict):
    """(where, title, refId, expr) of every Prometheus query: panels (rows' children too),
    then annotations."""

    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))

    for p in walk(dash.get("panels")):
        for t in p.get("targets") or []:
            uid = (t.get("datasource") or p.get("datasource") or {}).get("uid")
            if uid == "prometheus" and t.get("expr"):
                yield ("panel", p.get("title", "?"), t.get("refId", "?"), t["expr"])
    for a in (dash.get("annotations") or {}).get("list") or []:
        if a.get("expr") and (a.get("datasource") or {}).get("uid") == "prometheus":
            yield ("annotation", a.get("name", "?"), "-", a["expr"])


# ------------------------------------------------------------------ PromQL thresholds


def top_level_spans(expr: str):
    """Yields (index, depth) for every character outside string literals."""
    depth = 0
    i = 0
    quote = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\" and quote != "`":
                i += 2
                continue
            if c == quote:
                quote = None
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        else:
            yield i, depth
        i += 1


def unwrap(expr: str) -> str:
    e = expr.strip()
    while e.startswith("(") and e.endswith(")"):
        depth = 0
        closes_at_end = True
        for i, c in enumerate(e):
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0 and i != len(e) - 1:
                    closes_at_end = False
                    break
        if not closes_at_end:
            break
        e = e[1:-1].strip()
    return e


SET_OPS = re.compile(r"\b(and|or|unless)\b")
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
NUMBER = re.compile(r"^\s*(bool\s+)?[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def split_top(expr: str, pattern_or_ops) -> list[tuple[int, int]]:
    """Positions (start, end) of top-level operators."""
    top = {i for i, d in top_level_spans(expr) if d == 0}
    out = []
    if isinstance(pattern_or_ops, re.Pattern):
        for m in pattern_or_ops.finditer(expr):
            if m.start() in top:
                out.append((m.start(), m.end()))
        return out
    i = 0
    while i < len(expr):
        if i in top:
            for op in pattern_or_ops:
                if expr.startswith(op, i):
                    # `=~`, `!~` only appear inside braces; `==`, `!=` must not be split in two.
                    out.append((i, i + len(op)))
                    i += len(op) - 1
                    break
        i += 1
    return out


def without_thresholds(expr: str) -> list[str]:
    """The expression's operands with every top-level comparison removed: each side of
    every and/or/unless, and each side of a comparison unless it is a plain number."""
    e = unwrap(expr)
    ops = split_top(e, SET_OPS)
    if ops:
        parts, last = [], 0
        for s, t in ops:
            parts.append(e[last:s])
            last = t
        parts.append(e[last:])
        out = []
        for part in parts:
            out.extend(without_thresholds(part))
        return out
    comps = split_top(e, COMPARISONS)
    if comps:
        s, t = comps[-1]
        left, right = e[:s], e[t:]
        out = without_thresholds(left)
        if not NUMBER.match(right):
            right = re.sub(r"^\s*bool\s+", "", right)
            out.extend(without_thresholds(right))
        return out
    return [e]


def loadgen_report(stdout: str) -> dict | None:
    """The JSON report `score-proxy loadgen` prints: the whole output, or its last line."""
    for text in (stdout, (stdout.strip().splitlines() or [""])[-1]):
        try:
            report = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and "by_outcome" in report:
            return report
    return None


# ------------------------------------------------------------------ the run


def main() -> int:
    t0 = time.monotonic()
    bin_path = Path(os.environ.get("SCORE_PROXY_BIN", "target/release/score-proxy"))
    if not bin_path.is_absolute():
        bin_path = ROOT / bin_path
    if not os.access(bin_path, os.X_OK):
        die(f"score-proxy binary not found at {bin_path}: build it (cargo build --release) or set SCORE_PROXY_BIN")
    prometheus_bin = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if not prometheus_bin:
        die("prometheus not found on PATH: install Debian's package (apt-get install -y prometheus) or set PROMETHEUS")
    loadgen = shlex.split(os.environ.get("SCORE_PROXY_LOADGEN", "")) or [str(bin_path), "loadgen"]
    probe = subprocess.run(loadgen + ["--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        die(
            f"`{' '.join(loadgen)} --help` failed (status {probe.returncode}): the binary has no "
            f"`loadgen` subcommand, or SCORE_PROXY_LOADGEN is wrong.\n{probe.stderr.strip()[:500]}"
        )

    tmp = Path(tempfile.mkdtemp(prefix="score-proxy-e2e-"))
    procs = Processes(tmp)
    keep = os.environ.get("E2E_KEEP") == "1"
    try:
        return run(tmp, procs, bin_path, prometheus_bin, loadgen, t0)
    finally:
        procs.stop_all()
        if keep or failures:
            print(f"e2e: logs and TSDB kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, procs: Processes, bin_path: Path, prometheus_bin: str, loadgen: list[str], t0: float) -> int:
    sim_port, proxy_port, prom_port = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    prom_url = f"http://127.0.0.1:{prom_port}"
    quiet = {"OTEL_SDK_DISABLED": "true", "RUST_LOG": "warn"}

    print(f"== starting simulator ({sim_url}), proxy ({proxy_url}), prometheus ({prom_url})")
    procs.start("simulator", [str(bin_path), "simulate-upstream", "--listen", f"127.0.0.1:{sim_port}", *SIM_ARGS], quiet)
    proxy = procs.start(
        "proxy",
        [str(bin_path), "--listen", f"127.0.0.1:{proxy_port}", "--upstream-url", f"{sim_url}/api/score", *PROXY_ARGS],
        quiet,
    )

    # The repository's Prometheus config, pointed at this proxy: same job name, metrics
    # path, params and rule files; faster intervals.
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"] = {
        **config.get("global", {}),
        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
        "scrape_timeout": "900ms",
        "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
    }
    config["rule_files"] = [str((PROM_CONFIG.parent / rf).resolve()) for rf in config.get("rule_files") or []]
    jobs = {sc["job_name"]: sc for sc in config["scrape_configs"]}
    if JOB not in jobs:
        die(f"{PROM_CONFIG} has no scrape job {JOB!r}")
    jobs[JOB]["static_configs"] = [{"targets": [f"127.0.0.1:{proxy_port}"]}]
    for name, sc in jobs.items():
        if name != JOB:
            sc["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rule_files = [Path(p) for rf in config["rule_files"] for p in sorted(glob.glob(rf))]
    if not rule_files:
        die("the Prometheus config's rule_files match no file")

    procs.start(
        "prometheus",
        [
            prometheus_bin,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
    )
    prom = Prometheus(prom_url)

    wait_until("the simulator's /health", lambda: http_get(f"{sim_url}/health")[0] == 200, 20, procs=procs)
    wait_until("the proxy's /health", lambda: http_get(f"{proxy_url}/health")[0] == 200, 20, procs=procs)
    wait_until("prometheus to be ready", lambda: http_get(f"{prom_url}/-/ready")[0] == 200, 60, procs=procs)
    wait_until(
        f"prometheus to scrape the proxy (up{{job={JOB!r}}} == 1)",
        lambda: prom.instant(f'up{{job="{JOB}"}} == 1'),
        30,
        procs=procs,
    )
    ok(f"prometheus scrapes the proxy ({time.monotonic() - t0:.1f}s after start)")

    # ---------------------------------------------------------------- traffic
    start = time.time()
    print("== driving traffic")
    target = ["--target", proxy_url, "--sim-url", sim_url, *LOADGEN_COMMON]
    phases = [
        ("once", [*loadgen, "--mode", "once", "--step-timeout", "30s", *target], 240),
        (
            "continuous",
            [*loadgen, "--mode", "continuous", "--duration", "20s", "--rate", "10",
             "--burst-every", "5s", "--chaos-every", "7s", *target],
            90,
        ),
        ("once again", [*loadgen, "--mode", "once", "--step-timeout", "30s", *target], 240),
    ]
    for name, argv, timeout in phases:
        t = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, "RUST_LOG": "warn"})
        except subprocess.TimeoutExpired:
            die(f"loadgen ({name}) did not finish within {timeout}s")
        (tmp / f"loadgen-{name.replace(' ', '-')}.log").write_text(r.stdout + r.stderr)
        report = loadgen_report(r.stdout)
        if r.returncode != 0:
            fail(f"loadgen {name} exited with status {r.returncode}: {r.stderr.strip()[-800:]}")
        elif report is None:
            fail(f"loadgen {name}: no JSON report on its output: {r.stdout.strip()[-400:]}")
        elif report.get("missing"):
            fail(f"loadgen {name}: could not provoke {', '.join(report['missing'])}")
        elif report.get("skipped"):
            fail(f"loadgen {name}: skipped {', '.join(report['skipped'])}")
        else:
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(report.get("by_outcome", {}).items()))
            ok(f"loadgen {name} ({time.monotonic() - t:.1f}s, {report.get('requests')} requests): {outcomes}")
        procs.check_alive()
    end = time.time()

    # Two more scrapes, so the last of the traffic is in the TSDB, and rules evaluated on it.
    wait_until(
        "a scrape after the traffic",
        lambda: any(float(s["value"][1]) >= end + 2 for s in prom.instant(f'timestamp(up{{job="{JOB}"}})')),
        15,
        procs=procs,
    )
    q_start, q_end = start, time.time()
    range_s = max(1, math.ceil(q_end - q_start))
    builtins = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": INTERVAL,
        "__interval_ms": str(int(INTERVAL.rstrip("s")) * 1000),
        "__range": f"{range_s}s",
        "__range_s": str(range_s),
        "__range_ms": str(range_s * 1000),
    }

    # ---------------------------------------------------------------- dashboards
    print(f"== dashboards (range {range_s}s, step {STEP_S}s, $__rate_interval={RATE_INTERVAL})")
    used_allowlist = set()
    n_queries = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        uid = dash.get("uid", path.stem)
        values = resolve_variables(prom, dash, builtins, q_start, q_end)
        for kind, title, ref, expr in dashboard_queries(dash):
            n_queries += 1
            where = f"{uid} / {kind} {title!r} {ref}"
            try:
                query = substitute(expr, values)
            except KeyError as e:
                fail(f"{where}: undefined variable ${e.args[0]}")
                continue
            try:
                result = prom.range(query, q_start, q_end, STEP_S)
            except PromError as e:
                fail(f"{where}: error: {e}\n       query: {query}")
                continue
            allowed = ALLOWLIST.get((uid, title, ref))
            finite = finite_values(result)
            nonzero = [v for v in finite if v != 0]
            if not result:
                if allowed and allowed[0] == "no_series":
                    used_allowlist.add((uid, title, ref))
                    ok(f"{where}: no series (allowlisted: {allowed[1]})")
                else:
                    fail(f"{where}: no series\n       query: {query}")
            elif not finite:
                fail(f"{where}: {len(result)} series, but no finite value\n       query: {query}")
            elif not nonzero:
                if allowed and allowed[0] == "all_zero":
                    used_allowlist.add((uid, title, ref))
                    ok(f"{where}: {len(result)} series, all zero (allowlisted: {allowed[1]})")
                else:
                    fail(f"{where}: {len(result)} series, but every value is 0: the traffic did not move it\n       query: {query}")
            else:
                ok(f"{where}: {len(result)} series, max {max(nonzero):.4g}")
    for key in set(ALLOWLIST) - used_allowlist:
        print(f"  note allowlist entry not needed this run: {key}")

    # ---------------------------------------------------------------- alert rules
    print("== alert rules")
    rules = []
    for rf in rule_files:
        doc = yaml.safe_load(rf.read_text()) or {}
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                if rule.get("alert"):
                    rules.append(rule)
    body = prom.get("rules")
    loaded = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        live = loaded.get(name)
        if not live:
            fail(f"{name}: not loaded by prometheus")
        elif live.get("health") != "ok":
            fail(f"{name}: prometheus evaluates it with health {live.get('health')!r}: {live.get('lastError')}")
        try:
            result = prom.range(expr, q_start, q_end, STEP_S)
            ok(f"{name}: expression evaluates ({len(result)} series over the run)")
        except PromError as e:
            fail(f"{name}: expression error: {e}")
            continue
        for part in without_thresholds(expr):
            short = " ".join(part.split())
            try:
                result = prom.range(part, q_start, q_end, STEP_S)
            except PromError as e:
                fail(f"{name}: without threshold, error: {e}\n       query: {short}")
                continue
            if not finite_values(result):
                fail(f"{name}: without threshold, no series with a finite value\n       query: {short}")
            else:
                ok(f"{name}: without threshold: {len(result)} series  [{short[:90]}{'...' if len(short) > 90 else ''}]")

    # The run provoked a penalty: the alert (no `for`) must be firing.
    def penalty_firing():
        alerts = prom.get("alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"].get("alertname") == "ScoreProxyUpstreamPenalty" and a["state"] == "firing"]

    try:
        wait_until("ScoreProxyUpstreamPenalty to fire", penalty_firing, 10)
        ok("ScoreProxyUpstreamPenalty is firing (the run provoked a penalty)")
    except SystemExit:
        fail("ScoreProxyUpstreamPenalty did not fire although the run provoked a penalty")

    # Stop the proxy: ScoreProxyDown's condition must become true, and the alert pending.
    print("== stopping the proxy")
    proxy.expected_exit = True
    procs.stop(proxy)
    down_expr = next((r["expr"] for r in rules if r["alert"] == "ScoreProxyDown"), None)
    if down_expr is None:
        fail("no ScoreProxyDown rule")
    else:
        try:
            wait_until("ScoreProxyDown's condition", lambda: prom.instant(down_expr), 15)
            ok("ScoreProxyDown's expression returns the stopped proxy")
            wait_until(
                "ScoreProxyDown to be pending",
                lambda: prom.instant('ALERTS{alertname="ScoreProxyDown", alertstate=~"pending|firing"}'),
                10,
            )
            ok("ScoreProxyDown is pending (it fires after its `for`)")
        except SystemExit:
            fail("ScoreProxyDown did not react to the proxy being stopped")

    print(
        f"== {n_queries} dashboard queries and {len(rules)} alert rules checked in "
        f"{time.monotonic() - t0:.1f}s; {len(failures)} failure(s)"
    )
    if failures:
        print("e2e: FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f.splitlines()[0]}", file=sys.stderr)
        return 1
    print("e2e: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
