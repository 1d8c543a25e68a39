#!/usr/bin/env python3
"""End-to-end check of the observability stack, without Docker.

On loopback, with temporary storage and free ports, it starts:
  - the upstream simulator (`score-sim`), fast: 1 call per 200 ms,
    answering after 100 ms;
  - the proxy, fast: 5 calls/s, a queue of 8 that times out after 3 s, a 1 s upstream
    timeout, a 10 s cache TTL (so entries expire during the run) and a 2 s breaker
    cool-down;
  - the fleet of the compose file's `replicas` profile: a `redis-server`, a second
    simulator (the fleet's own budget), and three replicas with the proxy's fast settings
    in shared mode (--redis-url, one --redaction-key, a 25 ms guard), a circuit breaker that
    opens after 2 failures, and one special each: proxy-1 allows 64 connections and cuts
    idle ones after 2 s, proxy-3 serves stale answers (--stale-if-error 5m, --cache-ttl 2s);
  - the real `prometheus`, with the repository's deploy/prometheus/prometheus.yml (scrape
    jobs, params, relabelling, rules, alerting) pointed at them and scraping every second:
    job score-proxy the proxy (its static target's host and port swapped), job
    score-proxy-replicas the replicas found by the compose file's own DNS discovery block,
    unchanged but for the port: the replicas listen on three loopback addresses with one
    port, a small DNS server on loopback (scripts/stack/loopback_dns.py) answers `proxy-1`,
    `proxy-2`, `proxy-3` with them, and Prometheus runs in a mount namespace whose
    /etc/resolv.conf names that server (so the check runs as root). Rules are the
    repository's, with every `for:` divided by FOR_SCALE so that alerts fire within the run
    in the order they would in production;
  - the real Alertmanager (Debian's `prometheus-alertmanager`) with the repository's
    deploy/alertmanager/alertmanager.yml (grouping, routes, inhibitions), its receivers
    pointed at a webhook receiver in this script and its timers shortened, receiving from
    that Prometheus.
Then it drives traffic that exercises every outcome: on the proxy, `score-proxy loadgen
--mode once`, a short `continuous` run with the simulator failing on purpose, `once`
again; on the fleet, step by step while it is quiet: the fleet's simulator failing until
every breaker opens (a stale answer and a circuit-open refusal on the way) and healing
until they close, Redis stopped until every replica is in fallback and restarted until they
are all back in shared mode, more connections than proxy-1 allows (refused at the limit,
then cut by its header timeout) and one that does not speak HTTP; then a `continuous` run
spread over the three replicas (loadgen with three targets: shared cache hits and
cross-replica followers). It waits for each step through Prometheus's API, not by
sleeping. Then it checks through that API:
  1. every template variable of every dashboard resolves to values, as Grafana would ask
     (the job variable to All and to each job in turn);
  2. every PromQL expression of every dashboard panel (and annotation), with the variables
     substituted as Grafana would, evaluates without error over the run for every job, and
     for at least one job returns a series with a finite value, and a non-zero one (the
     traffic provoked it);
  3. every alert rule evaluates without error in Prometheus; its expression evaluates
     without error, and the same expression without its threshold comparisons (each side
     of every `and`/`or`/`unless`) returns series;
  4. the alerts the run provokes are seen: ScoreProxyCircuitOpen, ScoreProxyConnectionLimit
     and ScoreProxyUpstreamPenalty firing, ScoreProxyRedisFallback while Redis is down,
     and, after the proxy and a replica are stopped, ScoreProxyDown's condition true for
     both (and the alert pending or firing); every recording rule records series;
  5. Alertmanager groups and inhibits, judged by what reaches the webhook: while the
     fleet's breakers are open, ScoreProxyCircuitOpen reaches the pager's receiver as one
     notification listing the three replicas, and the symptoms it explains
     (ScoreProxyHigh5xx, ScoreProxyUpstreamFailing, ScoreProxyRefusingLookups) fire in
     Prometheus, reach Alertmanager, are held as inhibited by it, and never reach the
     webhook; with a replica stopped, ScoreProxyDown reaches the pager and the fleet's
     ScoreProxyFleetTooSmall is inhibited by it; the stopped replica then leaves DNS and
     Prometheus drops its target (the discovery path is live).
Exceptions are listed in ALLOWLIST below, each with its reason.

Environment: SCORE_PROXY_BIN (default target/release/score-proxy), SCORE_PROXY_LOADGEN
(default "$SCORE_PROXY_BIN loadgen"), PROMETHEUS (default: prometheus on PATH), ALERTMANAGER
(default: prometheus-alertmanager, else alertmanager, on PATH), REDIS_SERVER (default:
redis-server on PATH), E2E_KEEP=1 keeps the temporary directory (logs, TSDB) for
inspection. Exit status 0 when every check passes; 1 otherwise, with one line per failure.
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

import random

from alerting_e2e import GROUP_WAIT_S, AlertmanagerApi, WebhookReceiver, alertmanager_config, fast_rules
from loopback_dns import LoopbackDns, with_resolver

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
# Every rule's `for:` is divided by this in the run (5m -> 10s, 2m -> 4s, 1m -> 2s).
FOR_SCALE = 30
# The alerts an open breaker explains, which Alertmanager must hold back while it fires.
BREAKER_SYMPTOMS = {"ScoreProxyHigh5xx", "ScoreProxyUpstreamFailing", "ScoreProxyRefusingLookups"}

JOB = "score-proxy"
REPLICAS_JOB = "score-proxy-replicas"
REPLICAS = ["proxy-1", "proxy-2", "proxy-3"]
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

# The bulk job submitted to the proxy: its CPFs, far from the lookups' own.
JOB_CPFS_FROM = 5000
JOB_SIZE = 20

# The fleet: the proxy's settings (later flags win), in shared mode.
STALE_CPF = 1  # cpf(1): the answer proxy-3 serves stale
REDACTION_KEY = "e2e-fleet-secret"
FLEET_ARGS = [
    *PROXY_ARGS,
    "--expected-replicas", str(len(REPLICAS)),
    # Far above a loopback round trip to Redis, as shared mode needs.
    "--rate-guard", "25ms",
    # Two failures in a row open a breaker: the fault step stays short.
    "--breaker-failures", "2",
]
REPLICA_ARGS = {
    # Connection limit and slow-client cut-off, small enough to reach on purpose.
    "proxy-1": ["--max-connections", "64", "--header-read-timeout", "2s"],
    "proxy-2": [],
    # Stale-if-error: an answer older than its 2 s TTL is served when the upstream fails
    # (fetched at the start, served stale a minute or so later).
    "proxy-3": ["--stale-if-error", "5m", "--cache-ttl", "2s"],
}
MAX_CONNECTIONS = 64

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


def fleet_addresses(n: int) -> tuple[list[str], int]:
    """n loopback addresses, 127.x.y.1 to n (x and y random, so that runs side by side do
    not collide), and one port free on all of them: the replicas listen as compose's do,
    one port, an address each."""
    for _ in range(50):
        base = f"127.{random.randint(1, 52)}.{random.randint(0, 255)}."
        ips = [f"{base}{i + 1}" for i in range(n)]
        port = free_port()
        try:
            for ip in ips:
                with socket.socket() as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return ips, port
    die("no loopback addresses with a common free port for the replicas")


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
    """Resolves the dashboard's variables in order, as Grafana would: a data source variable
    to the uid it picks by default, a text box or constant to its text, a query variable
    through the label values API. An includeAll variable takes its All (its allValue, `.*`
    for the proxies' variables), and, when it is single-value (the job: one proxy, or a
    fleet of replicas), every value in turn as well, since each is a view a user picks.
    Returns (description, values) for every combination."""
    branches: list[tuple[str, dict[str, str]]] = [("", dict(builtins))]
    for var in (dash.get("templating") or {}).get("list") or []:
        name = var.get("name")
        kind = var.get("type")
        if kind == "datasource":
            value = str((var.get("current") or {}).get("value") or "")
            if not value:
                fail(f"{dash['uid']}: data source variable ${name} has no default")
                continue
            branches = [(where, {**values, name: value}) for where, values in branches]
            continue
        if kind in ("textbox", "constant"):
            branches = [(where, {**values, name: str(var.get("query") or "")}) for where, values in branches]
            continue
        if kind != "query":
            fail(f"{dash['uid']}: variable ${name} is of type {kind!r}, which this check cannot resolve")
            continue
        q = variable_query(var)
        m = LABEL_VALUES.match(q)
        if not m:
            fail(f"{dash['uid']}: variable ${name}: query {q!r} is not label_values(...)")
            continue
        selector, label = m.group(1), m.group(2)
        resolved = []
        for where, values in branches:
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
                fail(f"{dash['uid']}:{where} variable ${name} ({q}) resolves to no values")
                continue
            choices = []
            if var.get("includeAll"):
                value = var.get("allValue") or format_variable(var, found)
                choices.append((f"{where} ${name}=All", value))
            if not var.get("includeAll") or not var.get("multi"):
                choices += [(f"{where} ${name}={v}", format_variable(var, [v])) for v in found]
            for branch, value in choices:
                resolved.append((branch, {**values, name: value}))
                ok(f"{dash['uid']}:{branch}  ({len(found)} value(s) from {q}: {value})")
        branches = resolved
    return branches


def dashboard_queries(dash: dict):
    """(where, title, refId, expr) of every Prometheus query: panels (rows' children too),
    then annotations. A query's data source is Prometheus when it names the provisioned
    uid or a data source variable of type prometheus ($datasource)."""
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}

    def is_prometheus(ds) -> bool:
        uid = str((ds or {}).get("uid") or "")
        m = re.fullmatch(r"\$(\w+)|\$\{(\w+)\}", uid)
        if m:
            var = variables.get(m.group(1) or m.group(2)) or {}
            return var.get("type") == "datasource" and var.get("query") == "prometheus"
        return uid == "prometheus"

    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))

    for p in walk(dash.get("panels")):
        for t in p.get("targets") or []:
            if is_prometheus(t.get("datasource") or p.get("datasource")) and t.get("expr"):
                yield ("panel", p.get("title", "?"), t.get("refId", "?"), t["expr"])
    for a in (dash.get("annotations") or {}).get("list") or []:
        if a.get("expr") and is_prometheus(a.get("datasource")):
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
# What may follow a binary operator: its matching and grouping modifiers.
MODIFIERS = re.compile(r"^\s*(?:(?:on|ignoring|group_left|group_right)\s*\([^)]*\)\s*)+")
# absent(...) returns a series only when nothing matches: empty is its normal state.
ABSENT = re.compile(r"^\s*absent\s*\(")
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
        parts = [MODIFIERS.sub("", part) for part in parts]
        out = []
        for part in parts:
            out.extend(without_thresholds(part))
        return out
    comps = split_top(e, COMPARISONS)
    if comps:
        s, t = comps[-1]
        left, right = e[:s], MODIFIERS.sub("", e[t:])
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


# ------------------------------------------------------------------ direct requests


def cpf(n: int) -> str:
    """A valid CPF of its own for each n, far from the ranges the load generator uses."""
    base = [int(c) for c in f"{700_000_000 + n * 7:09d}"]
    for length in (9, 10):
        total = sum(d * (length + 1 - i) for i, d in enumerate(base[:length]))
        digit = total * 10 % 11
        base.append(0 if digit == 10 else digit)
    return "".join(map(str, base))


def lookup(base: str, n: int, client: str = "000") -> tuple[int, str]:
    """One lookup; returns the status and the outcome (X-Cache, or the error kind)."""
    status, headers, body = http_request(f"{base}/proxy/score?cpf={cpf(n)}&client_id={client}", timeout=10)
    if status == 200:
        return status, headers.get("x-cache", "").lower()
    try:
        return status, str(json.loads(body).get("error"))
    except (json.JSONDecodeError, AttributeError):
        return status, f"http_{status}"


def http_request(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 5):
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def submit_job(base: str, cpfs: list[str]) -> str | None:
    """Submits a bulk job for client 000; its id (None, and a failure, if refused)."""
    body = json.dumps({"client_id": "000", "cpfs": cpfs}).encode()
    status, headers, answer = http_request(f"{base}/jobs", "POST", body)
    if status != 202 or "location" not in headers:
        fail(f"POST /jobs answered {status}: {answer[:300]!r}")
        return None
    ok(f"a bulk job of {len(cpfs)} CPFs accepted at {headers['location']}")
    return json.loads(answer)["id"]


def status_of(base: str) -> dict:
    return json.loads(http_request(f"{base}/status")[2])


def sim_fault(sim_url: str, fault: str) -> None:
    status, _, body = http_request(f"{sim_url}/__sim/config", "PUT", json.dumps({"fault": fault}).encode())
    if status != 200:
        die(f"the simulator refused fault {fault!r}: {status} {body[:200]!r}")


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


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
    redis_bin = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not redis_bin:
        die("redis-server not found on PATH: install Debian's package (apt-get install -y redis-server) or set REDIS_SERVER")
    alertmanager_bin = (
        os.environ.get("ALERTMANAGER") or shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    )
    if not alertmanager_bin:
        die(
            "prometheus-alertmanager not found on PATH: install Debian's package "
            "(apt-get install -y prometheus-alertmanager) or set ALERTMANAGER"
        )
    # The replicas' DNS discovery runs for real: a DNS server on port 53 of a loopback
    # address, and a mount namespace for Prometheus's /etc/resolv.conf. Both need root.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        die(
            "the end-to-end check runs as root (with util-linux's unshare): it gives Prometheus a "
            "resolver of its own to drive the replicas' DNS discovery (see scripts/stack/loopback_dns.py)"
        )
    loadgen = shlex.split(os.environ.get("SCORE_PROXY_LOADGEN", "")) or [str(bin_path.with_name("score-loadgen"))]
    probe = subprocess.run(loadgen + ["--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        die(
            f"`{' '.join(loadgen)} --help` failed (status {probe.returncode}): build the workspace "
            f"(cargo build --release --workspace), or SCORE_PROXY_LOADGEN is wrong.\n{probe.stderr.strip()[:500]}"
        )

    tmp = Path(tempfile.mkdtemp(prefix="score-proxy-e2e-"))
    procs = Processes(tmp)
    keep = os.environ.get("E2E_KEEP") == "1"
    try:
        return run(tmp, procs, bin_path, prometheus_bin, alertmanager_bin, redis_bin, loadgen, t0)
    finally:
        procs.stop_all()
        if keep or failures:
            print(f"e2e: logs and TSDB kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_loadgen(tmp: Path, procs: Processes, name: str, argv: list[str], timeout: float) -> dict | None:
    """Runs one loadgen phase; reports it; returns its report when it is complete."""
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
        return report
    procs.check_alive()
    return None


def alert_state(prom: Prometheus, name: str, states: str) -> list:
    return prom.instant(f'ALERTS{{alertname="{name}", alertstate=~"{states}"}}')


def expect_alert(prom: Prometheus, name: str, states: str, why: str, timeout: float = 15) -> None:
    try:
        wait_until(f"{name} to be {states}", lambda: alert_state(prom, name, states), timeout)
        ok(f"{name} is {states} ({why})")
    except SystemExit:
        fail(f"{name} did not become {states} although {why}")


def run(
    tmp: Path,
    procs: Processes,
    bin_path: Path,
    prometheus_bin: str,
    alertmanager_bin: str,
    redis_bin: str,
    loadgen: list[str],
    t0: float,
) -> int:
    sim_port, proxy_port, prom_port, am_port = free_port(), free_port(), free_port(), free_port()
    fleet_sim_port, redis_port = free_port(), free_port()
    # The replicas as compose runs them: one port, one address each, found by name.
    replica_ips, replica_port = fleet_addresses(len(REPLICAS))
    replica_addresses = dict(zip(REPLICAS, replica_ips))
    sim_url = f"http://127.0.0.1:{sim_port}"
    fleet_sim_url = f"http://127.0.0.1:{fleet_sim_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    replica_urls = {name: f"http://{ip}:{replica_port}" for name, ip in replica_addresses.items()}
    prom_url = f"http://127.0.0.1:{prom_port}"
    am_url = f"http://127.0.0.1:{am_port}"
    quiet = {"OTEL_SDK_DISABLED": "true", "RUST_LOG": "warn"}

    print(f"== starting simulator ({sim_url}), proxy ({proxy_url}), prometheus ({prom_url})")
    procs.start("simulator", [str(bin_path.with_name("score-sim")), "--listen", f"127.0.0.1:{sim_port}", *SIM_ARGS], quiet)
    proxy = procs.start(
        "proxy",
        [str(bin_path), "--listen", f"127.0.0.1:{proxy_port}", "--upstream-url", f"{sim_url}/api/score", *PROXY_ARGS],
        quiet,
    )
    print(f"== starting the fleet: redis (:{redis_port}), simulator ({fleet_sim_url}), "
          + ", ".join(f"{n} ({u})" for n, u in replica_urls.items()))
    redis_argv = [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = procs.start("redis", redis_argv)
    procs.start(
        "fleet-simulator",
        [str(bin_path.with_name("score-sim")), "--listen", f"127.0.0.1:{fleet_sim_port}", *SIM_ARGS],
        quiet,
    )
    wait_until("redis to answer PING", lambda: redis_ping(redis_port), 20, procs=procs)
    replicas = {}
    for name, ip in replica_addresses.items():
        replicas[name] = procs.start(
            name,
            [
                str(bin_path), "--listen", f"{ip}:{replica_port}", "--upstream-url", f"{fleet_sim_url}/api/score",
                "--redis-url", f"redis://127.0.0.1:{redis_port}", "--redaction-key", REDACTION_KEY,
                *FLEET_ARGS, *REPLICA_ARGS[name],
            ],
            quiet,
        )

    # Compose's DNS, on loopback: the replicas' names resolve to their addresses.
    dns = LoopbackDns()
    for name, ip in replica_addresses.items():
        dns.set(name, ip)
    resolv_conf = tmp / "resolv.conf"
    resolv_conf.write_text(dns.resolv_conf())

    # The real Alertmanager with the repository's config: its receivers point at this
    # script's webhook receiver, its timers are shorter.
    hook = WebhookReceiver()
    am_config = tmp / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump(alertmanager_config(AM_CONFIG, hook), sort_keys=False))
    print(f"== starting alertmanager ({am_url}), webhook receiver (:{hook.port}), DNS ({dns.address}:53)")
    procs.start(
        "alertmanager",
        [
            alertmanager_bin,
            f"--config.file={am_config}",
            f"--storage.path={tmp / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            # Alone: no gossip port.
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
    )

    # The repository's Prometheus config, pointed at these processes: same job names,
    # metrics path, params, discovery, relabelling and rule files; faster intervals. The
    # single proxy's static target and the Alertmanager's get this run's host and port; the
    # replicas' DNS discovery block is the compose one with this run's port, and Prometheus
    # resolves the names through the loopback DNS server.
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"] = {
        **config.get("global", {}),
        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
        "scrape_timeout": "900ms",
        "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
    }
    rule_files = [Path(p) for rf in config.get("rule_files") or [] for p in sorted(glob.glob(str(PROM_CONFIG.parent / rf)))]
    if not rule_files:
        die("the Prometheus config's rule_files match no file")
    # Same expressions, every `for:` divided by FOR_SCALE; the checks below read the
    # repository's files.
    config["rule_files"] = [str(p) for p in fast_rules(rule_files, tmp / "rules", FOR_SCALE)]
    jobs = {sc["job_name"]: sc for sc in config["scrape_configs"]}
    for job in (JOB, REPLICAS_JOB):
        if job not in jobs:
            die(f"{PROM_CONFIG} has no scrape job {job!r}")
    jobs[JOB]["static_configs"] = [{"targets": [f"127.0.0.1:{proxy_port}"]}]
    dns_sd = jobs[REPLICAS_JOB].get("dns_sd_configs") or []
    if len(dns_sd) != 1 or dns_sd[0].get("type") != "A" or sorted(dns_sd[0].get("names") or []) != REPLICAS:
        die(f"{PROM_CONFIG}: job {REPLICAS_JOB} must find {REPLICAS} through one dns_sd_configs block of type A")
    dns_sd[0]["port"] = replica_port
    for name, sc in jobs.items():
        if name not in (JOB, REPLICAS_JOB):
            sc["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    managers = (config.get("alerting") or {}).get("alertmanagers") or []
    if len(managers) != 1:
        die(f"{PROM_CONFIG}: expected one alertmanagers entry, found {len(managers)}")
    managers[0]["static_configs"] = [{"targets": [f"127.0.0.1:{am_port}"]}]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    procs.start(
        "prometheus",
        with_resolver(
            str(resolv_conf),
            [
                prometheus_bin,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
        ),
    )
    prom = Prometheus(prom_url)

    wait_until("the simulators' /health", lambda: all(
        http_get(f"{u}/health")[0] == 200 for u in (sim_url, fleet_sim_url)), 20, procs=procs)
    wait_until("the proxy's and replicas' /health", lambda: all(
        http_get(f"{u}/health")[0] == 200 for u in (proxy_url, *replica_urls.values())), 20, procs=procs)
    wait_until("every replica in shared mode", lambda: all(
        status_of(u).get("pacing_mode") == "shared" for u in replica_urls.values()), 20, procs=procs)
    wait_until("prometheus to be ready", lambda: http_get(f"{prom_url}/-/ready")[0] == 200, 60, procs=procs)
    wait_until("alertmanager to be ready", lambda: http_get(f"{am_url}/-/ready")[0] == 200, 30, procs=procs)
    wait_until(
        "prometheus to find the alertmanager",
        lambda: prom.get("alertmanagers")["data"]["activeAlertmanagers"],
        30,
        procs=procs,
    )
    am = AlertmanagerApi(am_url)
    everyone = f'up{{job=~"{JOB}|{REPLICAS_JOB}"}}'
    wait_until(
        f"prometheus to scrape the proxy and the {len(REPLICAS)} replicas",
        lambda: len(prom.instant(f"{everyone} == 1")) == 1 + len(REPLICAS),
        30,
        procs=procs,
    )
    instances = sorted(s["metric"]["instance"] for s in prom.instant(f'up{{job="{REPLICAS_JOB}"}}'))
    if [i.split(":")[0] for i in instances] != REPLICAS:
        fail(f"the replicas' instance labels are {instances}, expected {REPLICAS} (relabelling)")
    ok(
        f"prometheus scrapes the proxy and the replicas {', '.join(instances)}, found through DNS "
        f"({time.monotonic() - t0:.1f}s after start)"
    )
    # An answer proxy-3 will serve stale: fetched now, long expired (2 s TTL) by then.
    status, outcome = lookup(replica_urls["proxy-3"], STALE_CPF)
    if (status, outcome) != (200, "miss"):
        fail(f"proxy-3: the first lookup of the stale candidate answered {status} {outcome}, expected 200 miss")

    # ---------------------------------------------------------------- traffic: the proxy
    start = time.time()
    print("== driving traffic through the proxy")
    target = ["--target", proxy_url, "--sim-url", sim_url, *LOADGEN_COMMON]
    run_loadgen(tmp, procs, "once", [*loadgen, "--mode", "once", "--step-timeout", "30s", *target], 240)
    # A bulk job, looked up with the budget the load leaves free (its item waits in the
    # background lane meanwhile) and finished while the fleet's incidents run.
    job_id = submit_job(proxy_url, [cpf(JOB_CPFS_FROM + i) for i in range(JOB_SIZE)])
    run_loadgen(
        tmp, procs, "continuous",
        [*loadgen, "--mode", "continuous", "--duration", "20s", "--rate", "10",
         "--burst-every", "5s", "--chaos-every", "7s", *target],
        90,
    )
    run_loadgen(tmp, procs, "once again", [*loadgen, "--mode", "once", "--step-timeout", "30s", *target], 240)

    # ---------------------------------------------------------------- traffic: the fleet
    # The incidents first, one at a time on a quiet fleet; then the load generator.
    fleet_incidents(procs, prom, am, hook, replica_urls, fleet_sim_url, redis, redis_argv, redis_port)
    fleet_traffic(tmp, procs, prom, loadgen, replica_urls)
    if job_id:
        job = json.loads(http_request(f"{proxy_url}/jobs/{job_id}?client_id=000")[2])
        if (job.get("state"), job.get("done")) == ("done", JOB_SIZE):
            ok(f"the bulk job finished: {job.get('done')} lines, {job.get('failed')} failed")
        else:
            fail(f"the bulk job did not finish during the run: {job}")
    end = time.time()

    # One more scrape of every target, so the last of the traffic is in the TSDB, and
    # rules evaluated on it.
    wait_until(
        "a scrape of every target after the traffic",
        lambda: any(float(s["value"][1]) >= end + 2 for s in prom.instant(f"min(timestamp({everyone}))")),
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
        branches = resolve_variables(prom, dash, builtins, q_start, q_end)
        for kind, title, ref, expr in dashboard_queries(dash):
            n_queries += 1
            where = f"{uid} / {kind} {title!r} {ref}"
            series, best, errors = 0, None, []
            for branch, values in branches:
                try:
                    query = substitute(expr, values)
                except KeyError as e:
                    errors.append(f"undefined variable ${e.args[0]}")
                    continue
                try:
                    result = prom.range(query, q_start, q_end, STEP_S)
                except PromError as e:
                    errors.append(f"{branch.strip()}: {e}\n       query: {query}")
                    continue
                series = max(series, len(result))
                nonzero = [v for v in finite_values(result) if v != 0]
                if nonzero and (best is None or max(nonzero) > best[1]):
                    best = (branch.strip(), max(nonzero), len(result))
                elif finite_values(result) and best is None:
                    best = (branch.strip(), 0.0, len(result))
            allowed = ALLOWLIST.get((uid, title, ref))
            if errors:
                for e in errors:
                    fail(f"{where}: error: {e}")
            elif series == 0:
                if allowed and allowed[0] == "no_series":
                    used_allowlist.add((uid, title, ref))
                    ok(f"{where}: no series (allowlisted: {allowed[1]})")
                else:
                    fail(f"{where}: no series for any job\n       query: {expr}")
            elif best is None:
                fail(f"{where}: series, but no finite value for any job\n       query: {expr}")
            elif best[1] == 0:
                if allowed and allowed[0] == "all_zero":
                    used_allowlist.add((uid, title, ref))
                    ok(f"{where}: all zero (allowlisted: {allowed[1]})")
                else:
                    fail(f"{where}: every value is 0 for every job: the traffic did not move it\n       query: {expr}")
            else:
                ok(f"{where}: {best[2]} series, max {best[1]:.4g} ({best[0]})")
    for key in set(ALLOWLIST) - used_allowlist:
        print(f"  note allowlist entry not needed this run: {key}")

    # ---------------------------------------------------------------- alert rules
    print("== alert and recording rules")
    rules, records = [], []
    for rf in rule_files:
        doc = yaml.safe_load(rf.read_text()) or {}
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                if rule.get("alert"):
                    rules.append(rule)
                elif rule.get("record"):
                    records.append(rule)
    body = prom.get("rules")
    loaded: dict[str, list[dict]] = {}
    for g in body["data"]["groups"]:
        for r in g["rules"]:
            loaded.setdefault(r["name"], []).append(r)
    for rule in records:
        name = rule["record"]
        unhealthy = [r for r in loaded.get(name, []) if r.get("health") != "ok"]
        if not loaded.get(name):
            fail(f"{name}: not loaded by prometheus")
        elif unhealthy:
            fail(f"{name}: prometheus evaluates it with health {unhealthy[0].get('health')!r}: {unhealthy[0].get('lastError')}")
        try:
            recorded = finite_values(prom.range(name, q_start, q_end, STEP_S))
        except PromError as e:
            fail(f"{name}: error: {e}")
            continue
        if recorded:
            ok(f"{name}: recorded, max {max(recorded):.4g}")
        else:
            fail(f"{name}: recorded no series with a finite value over the run")
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        unhealthy = [r for r in loaded.get(name, []) if r.get("health") != "ok"]
        if not loaded.get(name):
            fail(f"{name}: not loaded by prometheus")
        elif unhealthy:
            fail(f"{name}: prometheus evaluates it with health {unhealthy[0].get('health')!r}: {unhealthy[0].get('lastError')}")
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
            if not finite_values(result) and ABSENT.match(part):
                ok(f"{name}: {short}: no series, as expected while targets exist (it evaluates without error)")
            elif not finite_values(result):
                fail(f"{name}: without threshold, no series with a finite value\n       query: {short}")
            else:
                ok(f"{name}: without threshold: {len(result)} series  [{short[:90]}{'...' if len(short) > 90 else ''}]")

    # The run provoked a penalty and refused connections at a limit: those alerts have no
    # `for` and must be firing.
    expect_alert(prom, "ScoreProxyUpstreamPenalty", "firing", "the run provoked a penalty", 10)
    expect_alert(prom, "ScoreProxyConnectionLimit", "firing", "the run filled proxy-1's connection limit", 10)

    # Stop the proxy and a replica: ScoreProxyDown's condition must become true for both
    # jobs, and the alert pending.
    print("== stopping the proxy and proxy-2")
    for p in (proxy, replicas["proxy-2"]):
        p.expected_exit = True
        procs.stop(p)
    down_expr = next((r["expr"] for r in rules if r["alert"] == "ScoreProxyDown"), None)
    if down_expr is None:
        fail("no ScoreProxyDown rule")
    else:
        try:
            wait_until(
                "ScoreProxyDown's condition for both",
                lambda: {s["metric"].get("job") for s in prom.instant(down_expr)} == {JOB, REPLICAS_JOB},
                15,
            )
            ok("ScoreProxyDown's expression returns the stopped proxy and the stopped replica")
            expect_alert(prom, "ScoreProxyDown", "pending|firing", "the proxy was stopped (it fires after its `for`)", 10)
        except SystemExit:
            fail("ScoreProxyDown did not react to the proxy and a replica being stopped")
    prove_down_inhibition(prom, am, hook, "proxy-2")

    # The stopped replica leaves DNS, as a stopped container leaves compose's: Prometheus's
    # discovery drops its target (no `up` series: ScoreProxyDown resolves for it).
    print("== proxy-2 leaves DNS")
    dns.remove("proxy-2")
    try:
        wait_until(
            "prometheus to drop proxy-2's target",
            lambda: not [
                t for t in prom.get("targets", {"state": "active"})["data"]["activeTargets"]
                if t["labels"].get("job") == REPLICAS_JOB and t["labels"].get("instance", "").startswith("proxy-2:")
            ],
            30,
        )
        left = sorted(
            t["labels"]["instance"] for t in prom.get("targets", {"state": "active"})["data"]["activeTargets"]
            if t["labels"].get("job") == REPLICAS_JOB
        )
        ok(f"DNS discovery dropped proxy-2; the replicas' targets are now {left}")
    except SystemExit:
        fail("prometheus kept scraping proxy-2 after its name left DNS: the discovery path is not live")
    dns.stop()
    hook.stop()

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


def fleet_incidents(
    procs: Processes,
    prom: Prometheus,
    am: AlertmanagerApi,
    hook: WebhookReceiver,
    replica_urls: dict[str, str],
    sim_url: str,
    redis: subprocess.Popen,
    redis_argv: list[str],
    redis_port: int,
) -> None:
    """The fleet's incidents, one step at a time, each awaited through Prometheus (what the
    dashboards and alerts will be judged on): the upstream failing until every breaker
    opens (and Alertmanager holding back the symptoms), then healing; Redis stopped, then
    restarted; more connections than proxy-1 allows."""
    sel = f'job="{REPLICAS_JOB}"'
    n = len(replica_urls)
    urls = list(replica_urls.values())
    k = 100  # cpf(k): a new CPF for every lookup below

    print("== the fleet's upstream fails: every breaker opens; a stale answer; it heals")
    sim_fault(sim_url, "error")
    for name, url in replica_urls.items():
        for _ in range(6):
            if status_of(url).get("breaker") == "open":
                break
            k += 1
            lookup(url, k)
        else:
            fail(f"{name}: the breaker did not open after 6 failed lookups")
    # proxy-3's breaker opened last, well within its 2 s cool-down: a lookup it has an old
    # answer for is answered stale, a new one refused.
    status, outcome = lookup(replica_urls["proxy-3"], STALE_CPF)
    if (status, outcome) == (200, "stale"):
        ok("proxy-3 answered an expired entry with its breaker open (X-Cache: STALE)")
    else:
        fail(f"proxy-3 answered {status} {outcome} for an expired entry with its breaker open, expected 200 stale")
    k += 1
    status, outcome = lookup(replica_urls["proxy-3"], k)
    if (status, outcome) != (503, "circuit_open"):
        fail(f"proxy-3 answered {status} {outcome} with its breaker open, expected 503 circuit_open")
    try:
        wait_until(
            "prometheus to see every breaker open",
            lambda: len(prom.instant(f'max_over_time(score_proxy_breaker_state{{{sel}, state="open"}}[1m]) == 1')) == n,
            10,
        )
        ok("every replica's breaker opened")
    except SystemExit:
        fail("prometheus did not see every replica's breaker open")
    expect_alert(prom, "ScoreProxyCircuitOpen", "firing", "every breaker opened", 15)
    if alert_state(prom, "ScoreProxyCircuitOpen", "firing"):
        prove_breaker_inhibition(prom, am, hook, n)
    else:
        fail("Alertmanager's grouping and inhibition not judged: ScoreProxyCircuitOpen did not fire")
    sim_fault(sim_url, "none")
    # After the 2 s cool-down the next lookup is the probe that closes the breaker.
    for name, url in replica_urls.items():
        def closed(url=url):
            nonlocal k
            if status_of(url).get("breaker") == "closed":
                return True
            k += 1
            lookup(url, k)
            return False
        try:
            wait_until(f"{name}'s breaker to close", closed, 15, interval=0.5)
        except SystemExit:
            fail(f"{name}: the breaker did not close once the upstream healed")
    try:
        wait_until(
            "prometheus to see every breaker closed again",
            lambda: len(prom.instant(
                f'increase(score_proxy_breaker_transitions_total{{{sel}, to="closed"}}[1m]) > 0')) == n
            and len(prom.instant(f'score_proxy_breaker_state{{{sel}, state="closed"}} == 1')) == n,
            10,
        )
        ok("every breaker went half-open and closed again")
    except SystemExit:
        fail("prometheus did not see every breaker close again")

    print("== Redis stops: every replica falls back; Redis restarts: back to shared mode")
    redis.expected_exit = True
    procs.stop(redis)
    try:
        wait_until(
            "every replica in fallback",
            lambda: len(prom.instant(f'score_proxy_pacing_mode{{{sel}, mode="fallback"}} == 1')) == n,
            15,
        )
        ok("every replica fell back to pacing alone")
    except SystemExit:
        fail("prometheus did not see every replica fall back when Redis stopped")
    # Lookups still get answers. (One replica only: with no shared clock, replicas calling
    # at the same moment may be penalised, as documented.)
    k += 1
    status, outcome = lookup(replica_urls["proxy-2"], k)
    if status == 200:
        ok(f"proxy-2 answered a lookup in fallback ({outcome})")
    else:
        fail(f"proxy-2 answered {status} {outcome} in fallback, expected 200")
    expect_alert(prom, "ScoreProxyRedisFallback", "pending|firing", "every replica is in fallback")
    procs.start("redis-restarted", redis_argv)
    wait_until("redis to answer PING again", lambda: redis_ping(redis_port), 20, procs=procs)
    try:
        wait_until(
            "every replica back in shared mode",
            lambda: len(prom.instant(f'score_proxy_pacing_mode{{{sel}, mode="shared"}} == 1')) == n,
            15,
        )
        ok("every replica returned to shared mode")
    except SystemExit:
        fail("prometheus did not see every replica return to shared mode when Redis came back")
    answers = []
    for url in urls:
        k += 1
        answers.append(lookup(url, k))
    if all(status == 200 for status, _ in answers):
        ok("every replica answered a lookup back in shared mode")
    else:
        fail(f"lookups back in shared mode answered {answers}, expected 200 each")

    print(f"== more connections than proxy-1 allows ({MAX_CONNECTIONS}), idle until it cuts them")
    host, port = urllib.parse.urlsplit(replica_urls["proxy-1"]).netloc.split(":")
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        # The last ones came over the limit: answered 503 and closed, before any request.
        answer = idle[-1].recv(200)
        if not answer.startswith(b"HTTP/1.1 503"):
            fail(f"a connection over proxy-1's limit got {answer[:60]!r}, expected a 503")
        wait_until(
            "proxy-1's connections refused at the limit, and cut by its header timeout",
            lambda: prom.instant(f'sum(score_proxy_http_connections_refused_total{{{sel}, reason="limit"}}) > 0')
            and prom.instant(
                f'sum(score_proxy_http_connection_errors_total{{{sel}, kind="header_timeout"}}) >= {MAX_CONNECTIONS // 2}'),
            15,
        )
        ok("proxy-1 refused the connections over its limit and cut the idle ones")
    except SystemExit:
        fail("prometheus did not see proxy-1 refuse connections at its limit and cut idle ones")
    finally:
        for s in idle:
            s.close()
    # Not HTTP at all: a parse error.
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        s.recv(200)
    try:
        wait_until(
            "a parse error on proxy-1",
            lambda: prom.instant(f'sum(score_proxy_http_connection_errors_total{{{sel}, kind="parse"}}) > 0'),
            10,
        )
        ok("proxy-1 counted a connection that did not speak HTTP")
    except SystemExit:
        fail("prometheus did not see proxy-1 count a parse error")


def delivered(hook: WebhookReceiver, job: str, names: set[str]) -> list[str]:
    """The alert names of `names` that reached the webhook for the job."""
    return sorted({p.get("groupLabels", {}).get("alertname") for _, _, p in hook.received(job=job)} & names)


def prove_breaker_inhibition(prom: Prometheus, am: AlertmanagerApi, hook: WebhookReceiver, n: int) -> None:
    """With every replica's breaker open: the cause reaches the pager's receiver as one
    notification for the fleet (grouping), and the symptoms it explains fire in Prometheus,
    reach Alertmanager and stay there, inhibited (inhibition)."""
    print("== alertmanager: the breakers are the cause; the fleet's 5xx and failures are held back")
    try:
        note = wait_until(
            "one notification of ScoreProxyCircuitOpen listing every replica",
            lambda: next(
                (
                    (path, payload)
                    for _, path, payload in hook.received(REPLICAS_JOB, "ScoreProxyCircuitOpen")
                    if len({a["labels"].get("instance") for a in payload["alerts"] if a["status"] == "firing"}) == n
                ),
                None,
            ),
            30,
        )
        path, payload = note
        ok(
            f"ScoreProxyCircuitOpen reached {path} once for the {n} replicas (grouped by "
            f"{sorted(payload['groupLabels'])}: {len(payload['alerts'])} alerts in one notification)"
        )
        if path != "/on-call-pager":
            fail(f"ScoreProxyCircuitOpen (critical) reached {path}, expected the pager's receiver /on-call-pager")
    except SystemExit:
        fail("ScoreProxyCircuitOpen never reached the webhook as one notification for every replica")
    try:
        held = wait_until(
            "a symptom of the open breakers to fire and be inhibited by Alertmanager",
            lambda: am.find(REPLICAS_JOB, BREAKER_SYMPTOMS, "suppressed"),
            40,
        )
    except SystemExit:
        fail(f"none of {sorted(BREAKER_SYMPTOMS)} was held as inhibited by Alertmanager while the breakers were open")
        return
    firing = sorted({s["metric"]["alertname"] for s in prom.instant(
        f'ALERTS{{job="{REPLICAS_JOB}", alertstate="firing", alertname=~"{"|".join(sorted(BREAKER_SYMPTOMS))}"}}')})
    causes = {c for a in held for c in a["status"]["inhibitedBy"]}
    cause_fps = {a["fingerprint"] for a in am.find(REPLICAS_JOB, {"ScoreProxyCircuitOpen"})}
    if not causes or not causes <= cause_fps:
        fail(f"the symptoms are inhibited by {sorted(causes)}, not by the ScoreProxyCircuitOpen alerts {sorted(cause_fps)}")
    names = sorted({a["labels"]["alertname"] for a in held})
    # Give Alertmanager the time it would take to notify them (its group wait, and more),
    # then check that nothing of theirs reached the webhook while the cause fires.
    deadline = time.monotonic() + GROUP_WAIT_S + 3
    while time.monotonic() < deadline and not delivered(hook, REPLICAS_JOB, BREAKER_SYMPTOMS):
        time.sleep(0.5)
    leaked = delivered(hook, REPLICAS_JOB, BREAKER_SYMPTOMS)
    still = am.find(REPLICAS_JOB, {"ScoreProxyCircuitOpen"}, "active")
    if leaked:
        fail(f"symptoms of the open breakers reached the webhook although ScoreProxyCircuitOpen fired: {leaked}")
    elif not still:
        fail("ScoreProxyCircuitOpen stopped firing before the inhibition could be judged")
    else:
        ok(
            f"firing in Prometheus: {firing}; in Alertmanager, inhibited by ScoreProxyCircuitOpen: {names}; "
            f"reached the webhook: none of them, only the cause"
        )


def prove_down_inhibition(prom: Prometheus, am: AlertmanagerApi, hook: WebhookReceiver, replica: str) -> None:
    """With a replica stopped but still in DNS: ScoreProxyDown reaches the pager, and the
    fleet's ScoreProxyFleetTooSmall (the same fact seen from the job) is inhibited."""
    print(f"== alertmanager: {replica} is down; the fleet being too small is held back")
    try:
        path = wait_until(
            f"ScoreProxyDown for {replica} at the webhook",
            lambda: next(
                (
                    path
                    for _, path, payload in hook.received(REPLICAS_JOB, "ScoreProxyDown")
                    if any(a["labels"].get("instance", "").startswith(f"{replica}:") for a in payload["alerts"])
                ),
                None,
            ),
            30,
        )
        ok(f"ScoreProxyDown for {replica} reached {path}")
        if path != "/on-call-pager":
            fail(f"ScoreProxyDown (critical) reached {path}, expected the pager's receiver /on-call-pager")
    except SystemExit:
        fail(f"ScoreProxyDown for {replica} never reached the webhook")
    try:
        held = wait_until(
            "ScoreProxyFleetTooSmall to fire and be inhibited by ScoreProxyDown",
            lambda: am.find(REPLICAS_JOB, {"ScoreProxyFleetTooSmall"}, "suppressed"),
            40,
        )
    except SystemExit:
        fail("ScoreProxyFleetTooSmall was not held as inhibited by Alertmanager while a replica was down")
        return
    down = {a["fingerprint"] for a in am.find(REPLICAS_JOB, {"ScoreProxyDown"})}
    if not {c for a in held for c in a["status"]["inhibitedBy"]} <= down:
        fail("ScoreProxyFleetTooSmall is inhibited by something other than ScoreProxyDown")
    deadline = time.monotonic() + GROUP_WAIT_S + 3
    while time.monotonic() < deadline and not delivered(hook, REPLICAS_JOB, {"ScoreProxyFleetTooSmall"}):
        time.sleep(0.5)
    if delivered(hook, REPLICAS_JOB, {"ScoreProxyFleetTooSmall"}):
        fail("ScoreProxyFleetTooSmall reached the webhook although ScoreProxyDown fired for the missing replica")
    else:
        ok("ScoreProxyFleetTooSmall: firing, inhibited by ScoreProxyDown, not at the webhook")


def fleet_traffic(tmp: Path, procs: Processes, prom: Prometheus, loadgen: list[str], replica_urls: dict[str, str]) -> None:
    """A realistic mix spread over the replicas: shared cache hits and cross-replica
    followers."""
    sel = f'job="{REPLICAS_JOB}"'
    urls = list(replica_urls.values())
    print("== driving traffic through the fleet")
    report = run_loadgen(
        tmp, procs, "fleet continuous",
        [*loadgen, "--mode", "continuous", "--duration", "15s", "--rate", "10", "--burst-every", "5s",
         "--seed", "2", "--target", ",".join(urls), *LOADGEN_COMMON],
        60,
    )
    if report is not None:
        spread = {t.rstrip("/"): c for t, c in (report.get("by_target") or {}).items()}
        if sorted(spread) != sorted(urls) or min(spread.values()) * len(urls) * 2 < report["requests"]:
            fail(f"loadgen fleet continuous: requests not spread over the replicas: {spread}")
        else:
            ok(f"loadgen spread its requests over the replicas: {sorted(spread.values())}")
    try:
        wait_until(
            "shared cache hits and cross-replica followers",
            lambda: prom.instant(f'sum(score_proxy_shared_cache_lookups_total{{{sel}, result="hit"}}) > 0')
            and prom.instant(f'sum(score_proxy_shared_flights_total{{{sel}, role="follower"}}) > 0'),
            10,
        )
        ok("the fleet shared cached answers and upstream calls across replicas")
    except SystemExit:
        fail("no shared cache hit or no cross-replica follower in the fleet's traffic")


if __name__ == "__main__":
    sys.exit(main())
