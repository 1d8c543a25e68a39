#!/usr/bin/env python3
"""Soak test driver for score-proxy (Python standard library only; run it via scripts/soak.sh).

Starts `score-sim` and the proxy on free loopback ports, then for
--minutes keeps 2 x queue-capacity clients busy with a mix of lookups while the simulator's
faults switch every --phase-seconds, and samples the proxy's resident memory and open file
descriptors. At the end it checks, and exits 1 if any check fails:

- memory and fds are flat: after warm-up, resident memory ends within a tolerance of its
  value at the end of warm-up, and fds return to their starting level once the load stops;
- 0 rate violations caused by the proxy (see "Attributing violations" below);
- 0 wasted calls: no upstream arrival for a lookup whose only client had already hung up.

Attributing violations. The simulator counts every arrival that breaks its rate rule. To
see that the proxy copes with 429s without ever being the cause of one, the driver itself
provokes penalties: in the `provoke` phase it sends pairs of requests straight to the
simulator (client id `soak-provoker`), the second of which is always too soon (in
`provoke-retry-after` the 429s carry a Retry-After in seconds). The proxy's
next call then lands in a penalty it could not have known about and gets a 429 by design.
So, replaying the simulator's record:
  - a penalty episode is *provoked* when its first violation is a provoker arrival, or a
    proxy arrival that came too soon after a provoker arrival;
  - in a provoked episode, the proxy's first penalised arrival (and any that arrived within
    --learn-slack of it, i.e. before its 429 could have come back) is *excused*;
  - every other penalised proxy arrival is the proxy's violation: an unprovoked one means
    its pacing broke the rule, a later one in a provoked episode means it ignored a 429.
Proxy-to-proxy spacing is also checked directly: consecutive proxy arrivals must be at
least the simulator's min interval apart, whatever the provoker did.

Wasted calls. Impatient clients ask for CPFs that nobody else ever asks for and hang up after
a short random timeout. The driver reads the simulator's clock once at start (a direct
calibration call) so that arrival times can be compared with the moments clients hung up
(both are CLOCK_MONOTONIC). An arrival for such a CPF later than its client's hang-up plus
--wasted-slack is a wasted call; arrivals in between are reported as "raced" (the call
started while the proxy was still learning of the hang-up).
"""

from pathlib import Path
import argparse
import http.client
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

PROVOKER_ID = "soak-provoker"
CALIBRATION_ID = "soak-calibration"
CLIENT_IDS = ["soak-a", "soak-b", "soak-c", "soak-d", "soak-e"]

# Two paces. `fast` (the default) runs the same rules four times faster than the real API
# so that ten minutes hold ~2400 upstream calls instead of ~600; `real` is the contract.
PACES = {
    "fast": {
        "sim": ["--min-interval", "250ms", "--penalty", "500ms"],
        "proxy": ["--rate", "4", "--rate-guard", "15ms", "--upstream-penalty", "500ms",
                  "--upstream-timeout", "1s", "--cache-ttl", "20s"],
        "min_interval": 0.250,
        "penalty": 0.500,
        "slow_latency_ms": 600,
        "provoke_every": 6.0,
    },
    "real": {
        "sim": ["--min-interval", "1s", "--penalty", "2s"],
        "proxy": ["--rate", "1", "--rate-guard", "10ms", "--upstream-penalty", "2s",
                  "--upstream-timeout", "3s", "--cache-ttl", "60s"],
        "min_interval": 1.0,
        "penalty": 2.0,
        "slow_latency_ms": 1500,
        "provoke_every": 10.0,
    },
}

# The fault schedule, one entry per phase, cycled. Each phase first resets every knob
# (no fault, no latency, no Retry-After), then applies its own.
PHASES = [
    ("none", {}),
    ("error", {"fault": "error", "fail_every": 2}),
    ("none", {}),
    ("garbage", {"fault": "garbage", "fail_every": 3}),
    ("slow", {"latency_ms": "SLOW"}),
    ("hang", {"fault": "hang", "fail_every": 3}),
    ("provoke", {}),
    ("reset", {"fault": "reset", "fail_every": 3}),
    ("unavailable", {"fault": "unavailable", "fail_every": 2}),
    ("provoke-retry-after", {"retry_after": "seconds"}),
]
BASE_CONFIG = {"fault": "none", "latency_ms": 0, "fail_every": None, "retry_after": "none"}


def log(msg):
    print(f"soak: {msg}", flush=True)


def check_digit(digits):
    n = len(digits)
    total = sum(d * w for d, w in zip(digits, range(n + 1, 1, -1)))
    r = total % 11
    return 0 if r < 2 else 11 - r


def cpf_from_base(base):
    d = [int(c) for c in f"{base:09d}"]
    d.append(check_digit(d))
    d.append(check_digit(d))
    if len(set(d)) == 1:
        return None
    return "".join(map(str, d))


class CpfSource:
    """Distinct valid CPFs from a range of bases, thread-safe."""

    def __init__(self, start):
        self._it = itertools.count(start)
        self._lock = threading.Lock()

    def next(self):
        with self._lock:
            while True:
                cpf = cpf_from_base(next(self._it))
                if cpf:
                    return cpf


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def http_text(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def direct_score(sim, cpf, client_id):
    """A call straight to the simulator (the provoker and the clock calibration)."""
    req = urllib.request.Request(f"{sim}/api/score?cpf={cpf}", headers={"client-id": client_id})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def proc_sample(pid):
    rss_kb = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": rss_kb / 1024.0, "fds": fds, "threads": threads}


def metric(text, series):
    """The value of one series; for a family name without labels, the sum over its labels."""
    total = None
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
        if "{" not in series and line.startswith(series + "{"):
            total = (total or 0.0) + float(line.split()[-1])
    return total


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_status = Counter()
        self.by_outcome = Counter()
        self.errors = Counter()
        self.impatient = []  # dicts: cpf, sent, gave_up (None if answered), status
        self.requests = 0

    def add(self, status, outcome):
        with self.lock:
            self.requests += 1
            self.by_status[status] += 1
            self.by_outcome[outcome] += 1


class Driver:
    def __init__(self, args, proxy, sim, capacity):
        self.args = args
        self.proxy_host, self.proxy_port = proxy
        self.sim = sim
        self.capacity = capacity
        self.stats = Stats()
        self.stop = threading.Event()
        self.hot = [cpf_from_base(500_000_000 + i * 7919) for i in range(30)]
        self.fresh = CpfSource(100_000_000)
        self.unique = CpfSource(700_000_000)
        self.provocations = []  # driver times of provoker pairs
        self.phase_log = []

    # --- clients -----------------------------------------------------------------------
    def client(self, seed):
        rng = random.Random(seed)
        conn = None
        while not self.stop.is_set():
            roll = rng.random()
            client_id = rng.choice(CLIENT_IDS)
            if roll < 0.15:
                self.impatient_lookup(rng, client_id)
                time.sleep(rng.uniform(0, 0.05))
                continue
            if roll < 0.60:
                cpf = rng.choice(self.hot)
            elif roll < 0.90:
                cpf = self.fresh.next()
            else:
                cpf = rng.choice(["12345678900", "abc", "893.363.330.89", "11111111111", ""])
            if rng.random() < 0.2 and len(cpf) == 11:
                cpf = f"{cpf[0:3]}.{cpf[3:6]}.{cpf[6:9]}-{cpf[9:]}"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.proxy_host, self.proxy_port, timeout=45)
                conn.request("GET", f"/proxy/score?cpf={cpf}&client_id={client_id}")
                r = conn.getresponse()
                body = r.read()
                status = r.status
                retry_after = r.getheader("retry-after")
                if status == 200:
                    outcome = (r.getheader("x-cache") or "?").lower()
                else:
                    try:
                        outcome = json.loads(body).get("error", "?")
                    except ValueError:
                        outcome = "unparsable"
                self.stats.add(status, outcome)
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with self.stats.lock:
                    self.stats.errors[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
                continue
            if status in (429, 503) and retry_after:
                # A polite client: waits part of Retry-After, never long.
                time.sleep(min(float(retry_after), 2.0) * rng.uniform(0.3, 1.0))
            else:
                time.sleep(rng.uniform(0, 0.05))
        if conn is not None:
            conn.close()

    def impatient_lookup(self, rng, client_id):
        """A lookup nobody else makes, abandoned after a short random timeout."""
        cpf = self.unique.next()
        patience = rng.uniform(0.1, 2.5)
        conn = http.client.HTTPConnection(self.proxy_host, self.proxy_port, timeout=patience)
        sent = time.monotonic()
        entry = {"cpf": cpf, "sent": sent, "gave_up": None, "status": None}
        try:
            conn.request("GET", f"/proxy/score?cpf={cpf}&client_id={client_id}")
            r = conn.getresponse()
            r.read()
            entry["status"] = r.status
            entry["answered"] = time.monotonic()
            self.stats.add(r.status, "impatient-answered")
        except (socket.timeout, TimeoutError):
            conn.close()
            entry["gave_up"] = time.monotonic()
            self.stats.add(499, "impatient-hung-up")
        except (OSError, http.client.HTTPException) as e:
            with self.stats.lock:
                self.stats.errors[type(e).__name__] += 1
        finally:
            conn.close()
        with self.stats.lock:
            self.stats.impatient.append(entry)

    # --- faults -----------------------------------------------------------------------------
    def faults(self, pace, deadline):
        n = 0
        phases = PHASES
        if self.args.phases:
            known = dict(PHASES)
            phases = [(name, known[name]) for name in self.args.phases.split(",")]
        while not self.stop.is_set() and time.monotonic() < deadline:
            name, change = phases[n % len(phases)]
            config = dict(BASE_CONFIG)
            for k, v in change.items():
                config[k] = pace["slow_latency_ms"] if v == "SLOW" else v
            http_json("PUT", f"{self.sim}/__sim/config", config)
            started = time.monotonic()
            self.phase_log.append((started, name))
            phase_end = min(started + self.args.phase_seconds, deadline)
            next_provoke = started + 2.0
            while not self.stop.is_set() and time.monotonic() < phase_end:
                now = time.monotonic()
                if name.startswith("provoke") and now >= next_provoke:
                    # Two calls back to back: the second is always too soon.
                    t = time.monotonic()
                    cpf = "89336333089"
                    direct_score(self.sim, cpf, PROVOKER_ID)
                    direct_score(self.sim, cpf, PROVOKER_ID)
                    self.provocations.append(t)
                    next_provoke = now + pace["provoke_every"]
                self.stop.wait(0.05)
            n += 1
        http_json("PUT", f"{self.sim}/__sim/config", BASE_CONFIG)


def calibrate(sim):
    """Offset between the simulator's arrival clock and ours (both CLOCK_MONOTONIC)."""
    best = None
    for _ in range(5):
        t0 = time.monotonic()
        direct_score(sim, "01658739060", CALIBRATION_ID)
        t1 = time.monotonic()
        arrivals = http_json("GET", f"{sim}/__sim/stats")["arrivals"]
        at = secs(arrivals[-1]["at"])
        offset = (t0 + t1) / 2 - at
        if best is None or t1 - t0 < best[1]:
            best = (offset, t1 - t0)
        time.sleep(1.1)  # stay within the real rule too
    return best


def secs(d):
    return d["secs"] + d["nanos"] / 1e9


def attribute(arrivals, min_interval, penalty, learn_slack):
    """Splits the simulator's violations into provoked/excused and the proxy's own."""
    arrivals = sorted(arrivals, key=lambda a: a["seq"])
    out = Counter()
    penalty_until = None
    episode = None  # {"provoked": bool, "first_proxy": at or None}
    last = None
    last_proxy_at = None
    min_proxy_gap = None
    proxy_violations = []
    for a in arrivals:
        at = secs(a["at"])
        who = a["client_id"]
        mine = who not in (PROVOKER_ID, CALIBRATION_ID)
        in_penalty = penalty_until is not None and at < penalty_until
        if mine:
            out["proxy_calls"] += 1
            if last_proxy_at is not None:
                gap = at - last_proxy_at
                min_proxy_gap = gap if min_proxy_gap is None else min(min_proxy_gap, gap)
                if gap < min_interval:
                    out["proxy_spacing_violations"] += 1
            last_proxy_at = max(at, last_proxy_at or at)
        else:
            out["driver_calls"] += 1
        if a["violation"]:
            if not in_penalty:
                # A new episode: provoked if a provoker arrival started it or came just before.
                provoked = (not mine) or (last is not None and last[1] and at - last[0] < min_interval)
                episode = {"provoked": provoked, "first_proxy": None}
            if not mine:
                out["provoker_violations"] += 1
            elif episode["provoked"]:
                if episode["first_proxy"] is None:
                    episode["first_proxy"] = at
                if at - episode["first_proxy"] <= learn_slack:
                    out["proxy_violations_excused"] += 1
                else:
                    out["proxy_ignored_penalty"] += 1
                    proxy_violations.append(a)
            else:
                out["proxy_unprovoked_violations"] += 1
                proxy_violations.append(a)
            until = at + penalty
            penalty_until = until if penalty_until is None else max(penalty_until, until)
        last = (at, not mine)
    out["proxy_violations"] = (out["proxy_unprovoked_violations"] + out["proxy_ignored_penalty"]
                               + out["proxy_spacing_violations"])
    return out, min_proxy_gap, proxy_violations


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/score-proxy")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--pace", choices=sorted(PACES), default="fast")
    p.add_argument("--queue-capacity", type=int, default=20, help="the proxy's (its default is 20)")
    p.add_argument("--clients", type=int, default=0, help="default: 2 x queue capacity")
    p.add_argument("--phase-seconds", type=float, default=30.0)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--warmup-seconds", type=float, default=0.0,
                   help="default: 60 s, or 20%% of a run shorter than 5 minutes")
    p.add_argument("--settle-seconds", type=float, default=10.0)
    p.add_argument("--rss-tolerance-mib", type=float, default=16.0)
    p.add_argument("--rss-tolerance-ratio", type=float, default=0.25)
    p.add_argument("--fd-tolerance", type=int, default=20)
    p.add_argument("--learn-slack", type=float, default=0.1)
    p.add_argument("--wasted-slack", type=float, default=0.025)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--phases", default="",
                   help="comma-separated fault schedule to cycle instead of the default one "
                        "(names: none, error, garbage, slow, hang, provoke, reset, unavailable, "
                        "provoke-retry-after)")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                   help="scheduling priority of the proxy and the simulator: each runs in a session "
                        "of its own whose autogroup gets this nice value (default -10 as root, else "
                        "0), so that neighbours on a shared machine do not stand in for jitter")
    p.add_argument("--out", default="target/soak")
    args = p.parse_args()

    unknown = [n for n in args.phases.split(",") if args.phases and n not in dict(PHASES)]
    if unknown:
        p.error(f"unknown phases {unknown}; known: {', '.join(dict(PHASES))}")
    pace = PACES[args.pace]
    duration = args.minutes * 60
    warmup = args.warmup_seconds or (60.0 if duration >= 300 else duration * 0.2)
    clients = args.clients or 2 * args.queue_capacity
    os.makedirs(args.out, exist_ok=True)

    sim_port, proxy_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    children = []

    def stop_children(*_):
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(timeout=15)
            except subprocess.TimeoutExpired:
                c.kill()

    def renice(pid):
        # With autogroup scheduling (the default on Linux desktops and here), nice values only
        # weigh against processes of the same session: the session's autogroup nice is what
        # weighs against the neighbours' sessions.
        if not args.nice:
            return
        try:
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(args.nice))
            os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        except OSError as e:
            log(f"could not set nice {args.nice} for pid {pid}: {e}; running at normal priority")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        env = dict(os.environ, RUST_LOG="info,score_proxy::access=off", OTEL_SDK_DISABLED="true")
        children.append(subprocess.Popen(
            [str(Path(args.bin).with_name("score-sim")), "--listen", f"127.0.0.1:{sim_port}", *pace["sim"]],
            stdout=open(f"{args.out}/simulator.log", "w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True))
        renice(children[-1].pid)
        proxy_proc = subprocess.Popen(
            [args.bin, "serve", "--listen", f"127.0.0.1:{proxy_port}",
             "--upstream-url", f"{sim}/api/score", "--queue-capacity", str(args.queue_capacity),
             *pace["proxy"]],
            stdout=open(f"{args.out}/proxy.log", "w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        children.append(proxy_proc)
        renice(proxy_proc.pid)
        for _ in range(150):
            try:
                http_json("GET", f"{proxy}/health", timeout=1)
                http_json("GET", f"{sim}/health", timeout=1)
                break
            except OSError:
                if proxy_proc.poll() is not None:
                    sys.exit(f"soak: FAILED: the proxy exited at start-up; see {args.out}/proxy.log")
                time.sleep(0.2)
        status = http_json("GET", f"{proxy}/status")
        log(f"proxy {proxy} (pid {proxy_proc.pid}), simulator {sim}; pace {args.pace}, "
            f"queue capacity {status['queue_capacity']}, {clients} clients, "
            f"{args.minutes:g} min, warm-up {warmup:.0f} s, faults switch every {args.phase_seconds:g} s")

        offset, err = calibrate(sim)
        http_json("POST", f"{sim}/__sim/reset")
        log(f"simulator clock calibrated (uncertainty {err * 1000:.2f} ms)")

        start_load = open("/proc/loadavg").read().split()[:3]
        samples = []
        start_sample = dict(proc_sample(proxy_proc.pid), t=0.0)
        samples.append(start_sample)
        t_start = time.monotonic()
        deadline = t_start + duration
        driver = Driver(args, ("127.0.0.1", proxy_port), sim, args.queue_capacity)
        threads = [threading.Thread(target=driver.client, args=(args.seed * 1000 + i,), daemon=True)
                   for i in range(clients)]
        fault_thread = threading.Thread(target=driver.faults, args=(pace, deadline), daemon=True)
        for t in threads:
            t.start()
        fault_thread.start()

        next_report = t_start + 60
        while time.monotonic() < deadline:
            time.sleep(min(args.sample_seconds, max(0.0, deadline - time.monotonic())))
            if proxy_proc.poll() is not None:
                driver.stop.set()
                sys.exit(f"soak: FAILED: the proxy died (exit {proxy_proc.returncode}); see {args.out}/proxy.log")
            s = dict(proc_sample(proxy_proc.pid), t=time.monotonic() - t_start)
            samples.append(s)
            if time.monotonic() >= next_report:
                next_report += 60
                with driver.stats.lock:
                    n = driver.stats.requests
                log(f"{s['t']:.0f} s: rss {s['rss_mib']:.1f} MiB, fds {s['fds']}, threads {s['threads']}, "
                    f"{n} requests, phase {driver.phase_log[-1][1] if driver.phase_log else '-'}")

        driver.stop.set()
        for t in threads:
            t.join(timeout=60)
        fault_thread.join(timeout=10)
        stuck = sum(t.is_alive() for t in threads)
        time.sleep(args.settle_seconds)
        end_sample = dict(proc_sample(proxy_proc.pid), t=time.monotonic() - t_start)
        samples.append(end_sample)
        sim_stats = http_json("GET", f"{sim}/__sim/stats", timeout=30)
        prom = http_text(f"{proxy}/metrics?format=prometheus")
        with open(f"{args.out}/arrivals.json", "w") as f:
            json.dump({"offset": offset, "phases": [(t - offset, n) for t, n in driver.phase_log],
                       "provocations": [t - offset for t in driver.provocations],
                       "arrivals": sim_stats["arrivals"]}, f)

        # --- analysis ---------------------------------------------------------------
        attribution, min_proxy_gap, proxy_violation_list = attribute(
            sim_stats["arrivals"], pace["min_interval"], pace["penalty"], args.learn_slack)

        by_cpf = {}
        for a in sim_stats["arrivals"]:
            if a["client_id"] not in (PROVOKER_ID, CALIBRATION_ID):
                by_cpf.setdefault(a["cpf"], []).append(secs(a["at"]) + offset)
        wasted, raced, called_before, never_called = [], [], 0, 0
        hung_up = [e for e in driver.stats.impatient if e["gave_up"] is not None]
        for e in hung_up:
            times = by_cpf.get(e["cpf"], [])
            if not times:
                never_called += 1
            for t in times:
                late = t - e["gave_up"]
                if late > args.wasted_slack:
                    wasted.append({"late_ms": round(late * 1000, 1), "waited_ms": round((e["gave_up"] - e["sent"]) * 1000)})
                elif late > 0:
                    raced.append(round(late * 1000, 2))
                else:
                    called_before += 1

        # The clock calibration, checked: an impatient lookup that was answered must have
        # reached the upstream (if at all) between its sending and its answer.
        clock_inconsistent = 0
        for e in driver.stats.impatient:
            if e.get("answered") is None:
                continue
            for t in by_cpf.get(e["cpf"], []):
                if not (e["sent"] - 0.002 <= t <= e["answered"] + 0.002):
                    clock_inconsistent += 1

        post = [s for s in samples if s["t"] >= warmup]
        warm = min(post, key=lambda s: abs(s["t"] - warmup)) if post else start_sample
        peak_rss = max(s["rss_mib"] for s in samples)
        peak_fds = max(s["fds"] for s in samples)
        rss_limit = warm["rss_mib"] + max(args.rss_tolerance_mib, args.rss_tolerance_ratio * warm["rss_mib"])
        post_peak_rss = max((s["rss_mib"] for s in post), default=warm["rss_mib"])
        slope = None
        if len(post) >= 3:
            ts = [s["t"] for s in post[:-1]]  # the settle sample is not under load
            rs = [s["rss_mib"] for s in post[:-1]]
            if len(ts) >= 2 and statistics.pvariance(ts) > 0:
                mt, mr = statistics.mean(ts), statistics.mean(rs)
                slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / sum((t - mt) ** 2 for t in ts) * 60

        failures = []
        if end_sample["rss_mib"] > rss_limit:
            failures.append(f"resident memory grew: {warm['rss_mib']:.1f} MiB after warm-up, "
                            f"{end_sample['rss_mib']:.1f} MiB at the end (limit {rss_limit:.1f})")
        if post_peak_rss > rss_limit + args.rss_tolerance_mib:
            failures.append(f"resident memory peaked at {post_peak_rss:.1f} MiB after warm-up "
                            f"(limit {rss_limit + args.rss_tolerance_mib:.1f})")
        if end_sample["fds"] > start_sample["fds"] + args.fd_tolerance:
            failures.append(f"open fds did not come back: {start_sample['fds']} at start, "
                            f"{end_sample['fds']} after the load stopped (tolerance {args.fd_tolerance})")
        if attribution["proxy_violations"]:
            failures.append(f"{attribution['proxy_violations']} rate violations caused by the proxy: "
                            f"{json.dumps(proxy_violation_list[:5])}")
        if wasted:
            failures.append(f"{len(wasted)} wasted upstream calls for clients that had hung up: {wasted[:5]}")
        if clock_inconsistent:
            failures.append(f"{clock_inconsistent} answered lookups reached the upstream outside their "
                            "request's lifetime by the calibrated clock: the wasted-call check is unreliable")
        if stuck:
            failures.append(f"{stuck} client threads still waiting for an answer 60 s after the end")
        if proxy_proc.poll() is not None:
            failures.append("the proxy died")
        if driver.stats.requests == 0:
            failures.append("no request was answered")

        def m(series):
            return metric(prom, series)

        summary = {
            "pace": args.pace,
            "minutes": args.minutes,
            "clients": clients,
            "queue_capacity": args.queue_capacity,
            "warmup_seconds": warmup,
            "rss_mib": {"start": round(start_sample["rss_mib"], 1), "after_warmup": round(warm["rss_mib"], 1),
                        "peak": round(peak_rss, 1), "end": round(end_sample["rss_mib"], 1),
                        "slope_after_warmup_mib_per_min": None if slope is None else round(slope, 3)},
            "fds": {"start": start_sample["fds"], "after_warmup": warm["fds"], "peak": peak_fds,
                    "end": end_sample["fds"]},
            "threads": {"start": start_sample["threads"], "peak": max(s["threads"] for s in samples),
                        "end": end_sample["threads"]},
            "requests": driver.stats.requests,
            "by_status": dict(sorted(driver.stats.by_status.items())),
            "by_outcome": dict(sorted(driver.stats.by_outcome.items())),
            "client_errors": dict(driver.stats.errors),
            "upstream": {"calls": sim_stats["calls"], "violations_total": sim_stats["violations"],
                         "by_status": sim_stats["by_status"], "arrivals_dropped": sim_stats["arrivals_dropped"],
                         "min_proxy_gap_seconds": None if min_proxy_gap is None else round(min_proxy_gap, 4),
                         "rule_min_interval_seconds": pace["min_interval"], **attribution},
            "provocations": len(driver.provocations),
            "impatient": {"lookups": len(driver.stats.impatient), "hung_up": len(hung_up),
                          "never_called": never_called, "called_before_hang_up": called_before,
                          "raced_within_slack": len(raced), "raced_max_ms": max(raced, default=None),
                          "wasted": len(wasted), "wasted_slack_ms": args.wasted_slack * 1000,
                          "clock_check_failures": clock_inconsistent},
            "nice": args.nice,
            "load_average": {"start": start_load, "end": open("/proc/loadavg").read().split()[:3]},
            "proxy_metrics": {
                "queue_abandoned_total": m("score_proxy_queue_abandoned_total"),
                "pacing_penalties_total": m("score_proxy_pacing_penalties_total"),
                "pacing_unused_slots_total": m("score_proxy_pacing_unused_slots_total"),
                "upstream_retries_total": m("score_proxy_upstream_retries_total"),
            },
            "phases": [name for _, name in driver.phase_log],
            "samples": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()} for s in samples],
            "failures": failures,
        }
        with open(f"{args.out}/summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        printable = {k: v for k, v in summary.items() if k != "samples"}
        print(json.dumps(printable, indent=2))
        log(f"rss MiB start/peak/end {summary['rss_mib']['start']}/{summary['rss_mib']['peak']}/"
            f"{summary['rss_mib']['end']}; fds start/peak/end {summary['fds']['start']}/{summary['fds']['peak']}/"
            f"{summary['fds']['end']}; proxy violations {attribution['proxy_violations']} "
            f"(provoked and excused {attribution['proxy_violations_excused']}); wasted calls {len(wasted)}; "
            f"summary in {args.out}/summary.json")
        if failures:
            for f in failures:
                print(f"soak: FAILED: {f}", file=sys.stderr)
            return 1
        log("passed")
        return 0
    finally:
        stop_children()


if __name__ == "__main__":
    sys.exit(main())
