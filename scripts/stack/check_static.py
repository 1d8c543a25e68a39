#!/usr/bin/env python3
"""Static checks of the observability stack, with no Docker engine and no network.

- docker-compose.yml validates against the vendored Compose Specification schema
  (deploy/compose-spec.json), has the services and ports the stack promises, and every
  file or directory it mounts or builds from exists;
- the `replicas` profile holds Redis (with a redis-cli ping healthcheck) and replicas that
  share it and one redaction key, expect as many replicas as there are, keep a rate guard
  above Redis round trips and publish distinct ports; the load generator of the profile
  targets every replica; no service outside the profile depends on one inside it;
- Prometheus scrapes every replica (job score-proxy-replicas names each compose service),
  and every alert rule's job matcher selects both jobs;
- the container paths the services are told to read (Prometheus's --config.file,
  Grafana's home dashboard and dashboard provider path) land on mounted repository files;
- the Prometheus config's rule files exist, and so do the rule files of every unit test;
- every Grafana data source has a fixed uid, and points at a compose service;
- the stack is safe by default and its alerting holds together (scripts/stack/check_safety.py:
  ports on 127.0.0.1 only, Grafana's anonymous role Viewer and no default admin password,
  no Prometheus lifecycle API, a stop_grace_period longer than the proxy's drain and span
  flush, Jaeger v2, named volumes, rotated logs; every alert with a severity, summary,
  description and runbook section; rule tests at Prometheus's evaluation interval;
  Alertmanager wired, grouping by job and alertname, inhibiting only alerts that exist);
- every dashboard in dashboards/ is well-formed Grafana JSON: unique uid, unique panel ids,
  grid positions inside the 24-column grid and not overlapping, every template variable it
  uses defined, a description on every panel; every panel, query, annotation and variable
  on a data source variable ($datasource), never a hard-coded uid, and Jaeger reached
  through variables (${jaeger_url}, $traces); the job and instance variables from `up`
  with allValue `.*`; no increase(...[$__rate_interval]) (a count that changes with the
  zoom); up and process_* guarded by a literal job matcher; the configured rate limit never
  summed over instances (it is one budget: max); every recording rule used is recorded;
  every query, its variables substituted, parses (promtool check rules).

Exit status 0 when everything holds; 1, with one line per problem, otherwise.
Needs Python 3.11 with pyyaml and jsonschema.
"""

from __future__ import annotations

import glob
import json
import re
import sys
import urllib.parse
from pathlib import Path, PurePosixPath

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"check_static.py: missing Python module ({e}); run: pip install pyyaml jsonschema")

import check_safety

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy" / "compose-spec.json"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROM_TESTS = ROOT / "deploy" / "prometheus" / "tests"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"
DASHBOARDS = ROOT / "dashboards"

# What the issue promises: these services, and these ports published on the host.
REQUIRED_SERVICES = {"proxy", "upstream", "prometheus", "alertmanager", "grafana", "jaeger", "loadgen"}
REQUIRED_PORTS = {"proxy": 8000, "grafana": 3000, "prometheus": 9090, "alertmanager": 9093, "jaeger": 16686}
REQUIRED_DASHBOARDS = {"score-proxy-overview.json": "score-proxy", "upstream-budget.json": None}

# The `replicas` profile: these services, and the scrape jobs the rules and dashboards use.
PROFILE = "replicas"
REQUIRED_PROFILE_SERVICES = {"redis", "proxy-1", "proxy-2", "proxy-3", "upstream-replicas", "loadgen-replicas"}
JOBS = ("score-proxy", "score-proxy-replicas")
REPLICAS_JOB = "score-proxy-replicas"
# Shared mode places a booked slot to within half a Redis round trip: the guard covers it.
MIN_SHARED_RATE_GUARD_MS = 20

# Data source uids Grafana itself provides (built-in annotations, mixed queries).
BUILTIN_DATASOURCE_UIDS = {"-- Grafana --", "grafana", "-- Mixed --", "-- Dashboard --"}
# Variables Grafana defines itself.
BUILTIN_VARIABLES = {
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__rate_interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
    "__org",
    "__user",
    "__name",
    "__value",
    "__series",
    "__field",
    "__data",
    "__cell",
    "__all",
    "timeFilter",
    "__timeFilter",
}
# Grafana's variable syntax: $name, [[name]], [[name:fmt]], ${name}, ${name.path}, ${name:fmt}.
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")

problems: list[str] = []



# What each image built from the Dockerfile may hold: its entrypoint binary and nothing else
# of ours (the proxy's image has no simulator and no load generator in it).
IMAGE_BINARIES = {"proxy": "score-proxy", "simulator": "score-sim", "loadgen": "score-loadgen"}
OUR_BINARIES = set(IMAGE_BINARIES.values())


def dockerfile_stages(dockerfile: Path) -> dict[str, list[str]]:
    """The Dockerfile's stages by name, each with its instruction lines (continuations joined)."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(1) or f"<stage {len(stages)}>", [])
            continue
        if current is not None:
            current.append(line)
    return stages


def check_build_target(name: str, dockerfile: Path, target: str | None) -> None:
    """A service built from our Dockerfile names a stage that exists, and that stage copies
    in only the binary its service runs."""
    stages = dockerfile_stages(dockerfile)
    if target is None:
        problem(f"{rel(COMPOSE)}: service {name} builds {rel(dockerfile)} without a target: name one of {sorted(stages)}")
        return
    if target not in stages:
        problem(f"{rel(COMPOSE)}: service {name} builds target {target!r}, which {rel(dockerfile)} does not define")
        return
    want = IMAGE_BINARIES.get(target)
    copied = {
        binary
        for line in stages[target]
        if line.upper().startswith("COPY")
        for binary in OUR_BINARIES
        if re.search(rf"/{re.escape(binary)}(\s|$)", line)
    }
    if want is None or copied != {want}:
        problem(f"{rel(dockerfile)}: stage {target!r} (service {name}) copies {sorted(copied)}; it must copy only {want!r}")


def problem(msg: str) -> None:
    problems.append(msg)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# ------------------------------------------------------------------ compose


def load_yaml(path: Path):
    try:
        with path.open() as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problem(f"{rel(path)}: cannot be read as YAML: {e}")
        return None


def check_compose_schema(compose: dict) -> None:
    try:
        schema = json.loads(SCHEMA.read_text())
    except (OSError, json.JSONDecodeError) as e:
        problem(f"{rel(SCHEMA)}: cannot be read as JSON: {e}")
        return
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    for e in errors:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        problem(f"{rel(COMPOSE)}: does not validate against the Compose Specification at {where}: {e.message}")


def published_ports(service: dict) -> set[int]:
    out = set()
    for p in service.get("ports", []) or []:
        if isinstance(p, dict):
            if p.get("published") is not None:
                out.add(int(str(p["published"]).split("-")[0]))
        else:
            spec = str(p).split("/")[0]
            parts = spec.split(":")
            if len(parts) >= 2:
                out.add(int(parts[-2].split("-")[0]))
    return out


def mounts(service: dict) -> list[tuple[str, str]]:
    """(host source, container target) of every bind mount; named volumes are skipped."""
    out = []
    for v in service.get("volumes", []) or []:
        if isinstance(v, dict):
            if v.get("type") == "bind" and v.get("source"):
                out.append((v["source"], v.get("target", "")))
        else:
            parts = str(v).split(":")
            if len(parts) >= 2 and (parts[0].startswith(".") or parts[0].startswith("/") or parts[0].startswith("~")):
                out.append((parts[0], parts[1]))
    return out


def host_path_for(service: dict, container_path: str) -> Path | None:
    """The repository path a container path maps to through the service's bind mounts."""
    target = PurePosixPath(container_path)
    best = None
    for source, mount_target in mounts(service):
        mt = PurePosixPath(mount_target)
        if target == mt or mt in target.parents:
            if best is None or len(str(mt)) > len(str(best[1])):
                best = (source, mt)
    if best is None:
        return None
    source, mt = best
    return (ROOT / source / target.relative_to(mt)).resolve()


def check_compose(compose: dict) -> None:
    services = compose.get("services") or {}
    missing = REQUIRED_SERVICES - set(services)
    if missing:
        problem(f"{rel(COMPOSE)}: missing services: {', '.join(sorted(missing))}")
    for name, port in REQUIRED_PORTS.items():
        if name in services and port not in published_ports(services[name]):
            problem(f"{rel(COMPOSE)}: service {name} must publish port {port}")

    for name, service in services.items():
        # Images pulled from a registry are pinned: `docker compose up` must mean the same
        # stack next year. (A service that builds its image names it as it likes.)
        image = service.get("image")
        if image and "build" not in service:
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problem(f"{rel(COMPOSE)}: service {name} uses image {image!r}: pin a version tag")
        # Every bind-mounted file or directory exists.
        for source, target in mounts(service):
            path = (ROOT / source).resolve()
            if not path.exists():
                problem(f"{rel(COMPOSE)}: service {name} mounts {source} (at {target}), which does not exist")
        # Build context and Dockerfile exist.
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            ctx = (ROOT / context).resolve()
            if not ctx.is_dir():
                problem(f"{rel(COMPOSE)}: service {name} builds from {context}, which is not a directory")
            if isinstance(build, dict) and "dockerfile_inline" not in build:
                dockerfile = ctx / build.get("dockerfile", "Dockerfile")
                if not dockerfile.is_file():
                    problem(f"{rel(COMPOSE)}: service {name} builds with {rel(dockerfile)}, which does not exist")
                else:
                    check_build_target(name, dockerfile, build.get("target"))
        # env files exist.
        env_files = service.get("env_file") or []
        if isinstance(env_files, str):
            env_files = [env_files]
        for ef in env_files:
            path = ef if isinstance(ef, str) else ef.get("path")
            required = True if isinstance(ef, str) else ef.get("required", True)
            if required and not (ROOT / path).is_file():
                problem(f"{rel(COMPOSE)}: service {name} reads env file {path}, which does not exist")
        # depends_on names existing services.
        deps = service.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                problem(f"{rel(COMPOSE)}: service {name} depends on unknown service {dep}")

    if (ROOT / ".dockerignore").is_file() is False:
        problem(".dockerignore is missing: the build context would include target/")

    # The proxy: healthcheck on /health, traces to the jaeger service over OTLP.
    proxy = services.get("proxy", {})
    test = proxy.get("healthcheck", {}).get("test")
    if "/health" not in json.dumps(test):
        problem(f"{rel(COMPOSE)}: the proxy's healthcheck must probe /health")
    env = proxy.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env if "=" in e)
    endpoint = str(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    if urllib.parse.urlsplit(endpoint).hostname not in services:
        problem(f"{rel(COMPOSE)}: the proxy's OTEL_EXPORTER_OTLP_ENDPOINT ({endpoint!r}) must name a compose service")

    # Prometheus reads a config file that is mounted from the repository, and that file is
    # deploy/prometheus/prometheus.yml.
    prom = services.get("prometheus", {})
    command = prom.get("command") or []
    if isinstance(command, str):
        command = command.split()
    config_args = [c.split("=", 1)[1] for c in command if str(c).startswith("--config.file=")]
    if not config_args:
        problem(f"{rel(COMPOSE)}: prometheus must be given --config.file")
    for arg in config_args:
        host = host_path_for(prom, arg)
        if host is None or not host.is_file():
            problem(f"{rel(COMPOSE)}: prometheus reads {arg}, which no bind mount provides")
        elif host != PROM_CONFIG.resolve():
            problem(f"{rel(COMPOSE)}: prometheus reads {rel(host)}, expected {rel(PROM_CONFIG)}")

    # Grafana: provisioning mounted where Grafana reads it; the dashboard provider's path
    # and the home dashboard are mounted repository files.
    grafana = services.get("grafana", {})
    prov = host_path_for(grafana, "/etc/grafana/provisioning")
    if prov is None or prov != (ROOT / "deploy" / "grafana" / "provisioning").resolve():
        problem(f"{rel(COMPOSE)}: grafana must mount deploy/grafana/provisioning at /etc/grafana/provisioning")
    for provider_file in sorted(DASHBOARD_PROVIDERS.glob("*.y*ml")):
        doc = load_yaml(provider_file) or {}
        for provider in doc.get("providers", []) or []:
            path = (provider.get("options") or {}).get("path")
            host = host_path_for(grafana, path) if path else None
            if host is None or not host.is_dir():
                problem(f"{rel(provider_file)}: provider {provider.get('name')} reads {path}, which no grafana bind mount provides")
            elif host != DASHBOARDS.resolve():
                problem(f"{rel(provider_file)}: provider path {path} maps to {rel(host)}, expected dashboards/")
    genv = grafana.get("environment") or {}
    home = genv.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") if isinstance(genv, dict) else None
    if home:
        host = host_path_for(grafana, home)
        if host is None or not host.is_file():
            problem(f"{rel(COMPOSE)}: grafana's home dashboard {home} is not a mounted file")

    check_replicas_profile(services)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolated_default(value: str) -> str:
    """What `${VAR:-default}` comes to when VAR is unset (compose's interpolation)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def duration_ms(value: str) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", value)
    if not m:
        return None
    return float(m.group(1)) * (1 if m.group(2) == "ms" else 1000)


def depends_on(service: dict) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps if isinstance(deps, list) else deps.keys())


def check_replicas_profile(services: dict) -> None:
    where = rel(COMPOSE)
    in_profile = {n for n, s in services.items() if PROFILE in (s.get("profiles") or [])}
    missing = REQUIRED_PROFILE_SERVICES - in_profile
    if missing:
        problem(f"{where}: profile {PROFILE!r} lacks services: {', '.join(sorted(missing))}")
    # `docker compose up` without the profile must not need a service of the profile.
    for name, service in services.items():
        if service.get("profiles"):
            continue
        for dep in depends_on(service):
            if dep in in_profile:
                problem(f"{where}: service {name} (no profile) depends on {dep}, which only runs with --profile {PROFILE}")

    redis = services.get("redis", {})
    image = str(redis.get("image", ""))
    if not re.fullmatch(r"redis:7(\.\d+)*(-[\w.]+)?", image):
        problem(f"{where}: service redis must run a redis:7 image, runs {image!r}")
    if "redis-cli" not in json.dumps(redis.get("healthcheck", {}).get("test")) or "ping" not in json.dumps(
        redis.get("healthcheck", {}).get("test")
    ):
        problem(f"{where}: service redis needs a healthcheck with redis-cli ping")

    replicas = sorted(n for n in in_profile if environment(services[n]).get("SCORE_PROXY_REDIS_URL"))
    if not replicas:
        problem(f"{where}: no service of profile {PROFILE!r} sets SCORE_PROXY_REDIS_URL")
        return
    keys, urls, ports = set(), set(), {}
    for name in replicas:
        service, env = services[name], environment(services[name])
        url = urllib.parse.urlsplit(env["SCORE_PROXY_REDIS_URL"])
        if url.hostname != "redis":
            problem(f"{where}: {name}'s SCORE_PROXY_REDIS_URL must name the redis service, is {env['SCORE_PROXY_REDIS_URL']!r}")
        urls.add(env["SCORE_PROXY_REDIS_URL"])
        key = interpolated_default(env.get("SCORE_PROXY_REDACTION_KEY", ""))
        if not key:
            problem(f"{where}: {name} needs SCORE_PROXY_REDACTION_KEY (shared mode refuses to start without one)")
        keys.add(env.get("SCORE_PROXY_REDACTION_KEY", ""))
        expected = env.get("SCORE_PROXY_EXPECTED_REPLICAS", "")
        if expected != str(len(replicas)):
            problem(f"{where}: {name} sets SCORE_PROXY_EXPECTED_REPLICAS={expected!r}, but the profile runs {len(replicas)} replicas")
        guard = duration_ms(env.get("SCORE_PROXY_RATE_GUARD", ""))
        if guard is None or guard < MIN_SHARED_RATE_GUARD_MS:
            problem(
                f"{where}: {name} needs SCORE_PROXY_RATE_GUARD of at least {MIN_SHARED_RATE_GUARD_MS}ms in shared mode "
                f"(a slot is placed to within half a Redis round trip), has {env.get('SCORE_PROXY_RATE_GUARD')!r}"
            )
        if "/health" not in json.dumps(service.get("healthcheck", {}).get("test")):
            problem(f"{where}: {name}'s healthcheck must probe /health")
        if "redis" not in depends_on(service):
            problem(f"{where}: {name} must depend on redis")
        for port in published_ports(service):
            if port in ports:
                problem(f"{where}: {name} and {ports[port]} both publish host port {port}")
            ports[port] = name
    if len(urls) > 1:
        problem(f"{where}: the replicas use different Redis URLs: {sorted(urls)}")
    if len(keys) > 1:
        problem(f"{where}: the replicas must share one SCORE_PROXY_REDACTION_KEY, have {sorted(keys)}")

    loadgen = services.get("loadgen-replicas", {})
    targets = [t.strip() for t in environment(loadgen).get("LOADGEN_TARGET", "").split(",") if t.strip()]
    hosts = sorted(urllib.parse.urlsplit(t).hostname or "" for t in targets)
    if hosts != replicas:
        problem(f"{where}: loadgen-replicas's LOADGEN_TARGET must list every replica ({', '.join(replicas)}), lists {targets}")
    for t in targets:
        port = urllib.parse.urlsplit(t).port
        host = urllib.parse.urlsplit(t).hostname
        listen = environment(services.get(host, {})).get("SCORE_PROXY_LISTEN", "")
        if port is None or not listen.endswith(f":{port}"):
            problem(f"{where}: loadgen-replicas targets {t}, but {host} listens on {listen!r}")
    REPLICA_SERVICES.update({n: environment(services[n]).get("SCORE_PROXY_LISTEN", "") for n in replicas})


# Filled by check_replicas_profile: replica service -> its SCORE_PROXY_LISTEN.
REPLICA_SERVICES: dict[str, str] = {}


# ------------------------------------------------------------------ prometheus


def check_prometheus() -> None:
    config = load_yaml(PROM_CONFIG)
    if not isinstance(config, dict):
        problem(f"{rel(PROM_CONFIG)}: not a YAML mapping")
        return
    rule_files = config.get("rule_files") or []
    if not rule_files:
        problem(f"{rel(PROM_CONFIG)}: no rule_files")
    for pattern in rule_files:
        matches = glob.glob(str(PROM_CONFIG.parent / pattern))
        if not matches:
            problem(f"{rel(PROM_CONFIG)}: rule_files entry {pattern!r} matches no file")
    scrape = {sc.get("job_name"): sc for sc in config.get("scrape_configs") or []}
    for job in JOBS:
        if job not in scrape:
            problem(f"{rel(PROM_CONFIG)}: no scrape job named {job} (the rules and dashboards select on it)")
    # Every replica of the compose profile is scraped, on the port it listens on.
    named: dict[str, int | None] = {}
    for sd in (scrape.get(REPLICAS_JOB) or {}).get("dns_sd_configs") or []:
        for name in sd.get("names") or []:
            named[name] = sd.get("port")
    for sc in (scrape.get(REPLICAS_JOB) or {}).get("static_configs") or []:
        for t in sc.get("targets") or []:
            host, _, port = str(t).rpartition(":")
            named[host] = int(port) if port.isdigit() else None
    for service, listen in REPLICA_SERVICES.items():
        if service not in named:
            problem(f"{rel(PROM_CONFIG)}: job {REPLICAS_JOB} does not scrape replica {service}")
        elif not listen.endswith(f":{named[service]}"):
            problem(f"{rel(PROM_CONFIG)}: job {REPLICAS_JOB} scrapes {service} on port {named[service]}, it listens on {listen!r}")

    tests = sorted(PROM_TESTS.glob("*.yml"))
    if not tests:
        problem(f"{rel(PROM_TESTS)}: no rule unit tests")
    tested = set()
    for test in tests:
        doc = load_yaml(test) or {}
        for rf in doc.get("rule_files") or []:
            path = (test.parent / rf).resolve()
            if not path.is_file():
                problem(f"{rel(test)}: rule file {rf} does not exist")
            tested.add(path)
    # Every alert rule has unit tests that mention it.
    test_text = "\n".join(t.read_text() for t in tests)
    for pattern in rule_files:
        for path in map(Path, glob.glob(str(PROM_CONFIG.parent / pattern))):
            if path.resolve() not in tested:
                problem(f"{rel(path)}: no unit test file loads it")
            doc = load_yaml(path) or {}
            for group in doc.get("groups") or []:
                for rule in group.get("rules") or []:
                    alert = rule.get("alert")
                    if alert and not re.search(rf"alertname:\s*{re.escape(alert)}\b", test_text):
                        problem(f"{rel(path)}: alert {alert} has no promtool unit test")
                    # Every job matcher selects the single proxy and the replicas alike.
                    for op, value in re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', str(rule.get("expr", ""))):
                        matched = [j for j in JOBS if (re.fullmatch(value, j) if op == "=~" else j == value)]
                        if op not in ("=", "=~") or matched != list(JOBS):
                            problem(f"{rel(path)}: rule {alert or rule.get('record')} selects job{op}{value!r}, which misses one of {', '.join(JOBS)}")


# ------------------------------------------------------------------ grafana


def provisioned_datasources() -> dict[str, dict]:
    out = {}
    files = sorted(DATASOURCES.glob("*.y*ml"))
    if not files:
        problem(f"{rel(DATASOURCES)}: no data source provisioning file")
    for f in files:
        doc = load_yaml(f) or {}
        for ds in doc.get("datasources") or []:
            uid = ds.get("uid")
            if not uid:
                problem(f"{rel(f)}: data source {ds.get('name')} has no fixed uid")
                continue
            if uid in out:
                problem(f"{rel(f)}: data source uid {uid} provisioned twice")
            out[uid] = ds
    return out


def check_datasource_urls(datasources: dict[str, dict], compose: dict) -> None:
    services = compose.get("services") or {}
    for uid, ds in datasources.items():
        url = urllib.parse.urlsplit(str(ds.get("url", "")))
        if url.hostname not in services:
            problem(f"data source {uid}: url {ds.get('url')!r} does not name a compose service")


def walk_panels(panels: list) -> list[dict]:
    out = []
    for p in panels or []:
        out.append(p)
        out.extend(walk_panels(p.get("panels") or []))
    return out


def ds_uid(ds) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    if isinstance(ds, str):
        return ds  # legacy: a name or uid as a string
    return None


def check_layout(where: str, panels: list[dict]) -> None:
    rects = []
    for p in panels:
        g = p.get("gridPos")
        title = p.get("title", "?")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")):
            problem(f"{where}: panel {p.get('id')} ({title}) has no integer gridPos x/y/w/h")
            continue
        if g["w"] < 1 or g["h"] < 1 or g["x"] < 0 or g["y"] < 0 or g["x"] + g["w"] > 24:
            problem(f"{where}: panel {p.get('id')} ({title}) gridPos {g} is outside the 24-column grid")
        rects.append((p, g))
    for i, (a, ga) in enumerate(rects):
        for b, gb in rects[i + 1 :]:
            if (
                ga["x"] < gb["x"] + gb["w"]
                and gb["x"] < ga["x"] + ga["w"]
                and ga["y"] < gb["y"] + gb["h"]
                and gb["y"] < ga["y"] + ga["h"]
            ):
                problem(
                    f"{where}: panels {a.get('id')} ({a.get('title')}) and {b.get('id')} ({b.get('title')}) overlap: {ga} / {gb}"
                )


def variables_used(text: str) -> set[str]:
    out = set()
    for m in VARIABLE.finditer(text):
        name = m.group(1) or m.group(2) or m.group(4)
        out.add(name)
    return out


# A data source named through a dashboard variable: "$datasource" or "${datasource}".
DATASOURCE_VARIABLE_REF = re.compile(r"^\$(\w+)$|^\$\{(\w+)\}$")
# Variables that list the proxies must come from `up`, which holds every scrape target,
# answering or not: from a metric the proxy exports, a proxy that is down drops out of the
# list and its panels show "No data" instead of DOWN.
TARGET_VARIABLES = {"job", "instance"}
# Metrics that other jobs export too (Prometheus scrapes itself): with job=All (.*) a query
# of them needs a literal job matcher of its own that selects the proxy's jobs only.
SHARED_METRIC = re.compile(r"(?<![\w:])(up|process_\w+)\s*\{([^}]*)\}")
# A count over a window that follows the zoom: each event is counted in several windows.
ZOOM_COUNT = re.compile(r"\bincrease\s*\(")
ZOOM_WINDOW = re.compile(r"\[\s*\$\{?__(rate_)?interval\}?\s*\]")
RECORDED = re.compile(r"(?<![\w:$])([a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+)")
# What the promtool check puts in place of Grafana's own variables.
PROMTOOL_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}


def datasource_variable(ds, template_vars: dict[str, dict]) -> tuple[str | None, dict | None]:
    """(variable name, variable) when the data source is a reference to a dashboard variable."""
    uid = ds_uid(ds)
    m = DATASOURCE_VARIABLE_REF.match(uid or "")
    if not m:
        return None, None
    name = m.group(1) or m.group(2)
    return name, template_vars.get(name)


def datasource_type(where: str, ds, template_vars: dict[str, dict], allow_builtin: bool = True) -> str | None:
    """The plugin type a panel, query, annotation or variable uses, reported when it is a
    hard-coded uid (every dashboard follows its $datasource variable, so it works against
    any Prometheus) or a variable that is not a data source variable."""
    uid = ds_uid(ds)
    if uid in BUILTIN_DATASOURCE_UIDS and allow_builtin:
        return "grafana"
    name, var = datasource_variable(ds, template_vars)
    if name is None:
        problem(f"{where}: hard-coded data source uid {uid!r}: name it through a data source variable of the dashboard (${{datasource}}, ${{traces}})")
        return None
    if var is None or var.get("type") != "datasource":
        problem(f"{where}: data source ${{{name}}} is not a data source variable of the dashboard")
        return None
    return str(var.get("query") or "")


def check_datasource_variable(where: str, var: dict, datasources: dict[str, dict]) -> None:
    """A data source variable picks a provisioned data source of its type by default."""
    kind = var.get("query")
    types = {ds.get("type") for ds in datasources.values()}
    if kind not in types:
        problem(f"{where}: data source variable ${var.get('name')} is of type {kind!r}; provisioned types: {sorted(types)}")
        return
    current = (var.get("current") or {}).get("value")
    if datasources.get(current, {}).get("type") != kind:
        problem(f"{where}: data source variable ${var.get('name')} defaults to {current!r}, not a provisioned {kind} uid")


def variable_query(var: dict) -> str:
    q = var.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    return str(q or var.get("definition") or "")


def check_query_variable(where: str, var: dict) -> None:
    """Variables that list the proxies come from `up`, and their All is `.*`, so a target
    that stops answering (or one that appears) is still selected."""
    name, q = var.get("name"), variable_query(var)
    m = re.match(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$", q, re.S)
    from_up = bool(m and re.match(r"^up\s*(\{|$)", m.group(1)))
    if (name in TARGET_VARIABLES or (m and m.group(2) in TARGET_VARIABLES)) and not from_up:
        problem(f"{where}: variable ${name} ({q}) must come from up (label_values(up{{...}}, {name})), so a proxy that is down stays listed")
    if from_up and not (var.get("includeAll") and var.get("allValue") == ".*"):
        problem(f"{where}: variable ${name} comes from up: it needs includeAll and allValue \".*\" (got {var.get('allValue')!r})")


def check_expr(where: str, expr: str, ptype: str, recorded: set[str]) -> None:
    """Rules every panel query keeps."""
    # The configured rate is one budget for every instance of a job: max, never sum.
    if re.search(r"\bsum\b(\s*by\s*\([^)]*\))?\s*\(\s*score_proxy_pacing_rate_per_second\b", expr):
        problem(f"{where}: sums score_proxy_pacing_rate_per_second; the limit is one budget (use max)")
    # Counts of events: a rate, or a stat over the whole range, never a count per window.
    for m in ZOOM_COUNT.finditer(expr):
        depth, end = 0, len(expr)
        for i in range(m.end() - 1, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                end = i
                break
        inner = expr[m.end() : end]
        if ZOOM_WINDOW.search(inner):
            problem(
                f"{where}: increase(...[$__rate_interval]) in a {ptype} panel counts one event in several windows "
                "and changes with the zoom: draw a rate, or a stat of increase(...[$__range])"
            )
        elif ptype != "stat" and "$__range" in inner:
            problem(f"{where}: increase(...[$__range]) belongs in a stat panel (one number for the range), not in a {ptype} panel")
    for m in SHARED_METRIC.finditer(expr):
        guards = [v for op, v in re.findall(r'\bjob\s*(=~|=)\s*"([^"$]*)"', m.group(2))]
        if not any(all(re.fullmatch(g, j) for j in JOBS) and not re.fullmatch(g, "prometheus") for g in guards):
            problem(f'{where}: {m.group(1)}{{...}} needs a literal job matcher selecting only {", ".join(JOBS)} (job=~"score-proxy.*"): with job=All it would include other jobs')
    for name in RECORDED.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        if name not in recorded:
            problem(f"{where}: uses {name}, which no recording rule in {rel(PROM_CONFIG.parent)}/ records")


def recorded_series() -> set[str]:
    config = load_yaml(PROM_CONFIG) or {}
    out = set()
    for pattern in config.get("rule_files") or []:
        for path in glob.glob(str(PROM_CONFIG.parent / pattern)):
            for group in (load_yaml(Path(path)) or {}).get("groups") or []:
                out.update(r["record"] for r in group.get("rules") or [] if r.get("record"))
    return out


def substitute_for_promtool(expr: str, template_vars: dict[str, dict]) -> str:
    """The expression as Prometheus would receive it: All for variables that have it, any
    value for the others."""

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name in PROMTOOL_BUILTINS:
            return PROMTOOL_BUILTINS[name]
        var = template_vars.get(name) or {}
        if var.get("includeAll"):
            return var.get("allValue") or ".*"
        if var.get("type") in ("textbox", "constant"):
            return str(var.get("query") or "")
        return "x"

    return VARIABLE.sub(value, expr)


def check_syntax_with_promtool(queries: list[tuple[str, str]]) -> None:
    """Every query, its variables substituted, parses as PromQL: `promtool check rules` on a
    file with one recording rule per query (promtool has no offline query command)."""
    import shutil
    import subprocess
    import tempfile

    if not queries:
        return
    promtool = shutil.which("promtool")
    if promtool is None:
        problem("promtool not found on PATH: cannot check the dashboards' PromQL (apt-get install -y prometheus)")
        return
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    with tempfile.TemporaryDirectory(prefix="check-static-") as tmp:
        path = Path(tmp) / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
        run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if run.returncode == 0:
        return
    output = run.stdout + run.stderr
    reported = False
    for line in output.splitlines():
        m = re.search(r'"dashboard_query_(\d+)":\s*(.*)$', line)
        if m:
            where, expr = queries[int(m.group(1))]
            problem(f"{where}: promtool: {m.group(2)}\n      query: {expr}")
            reported = True
    if not reported:
        problem(f"promtool check rules failed on the dashboards' queries: {output.strip()[-800:]}")


def check_link(where: str, url: str, template_vars: dict[str, dict], datasources: dict[str, dict]) -> None:
    """Links use defined variables, reach Jaeger through the ${jaeger_url} variable rather
    than a host baked in, and Explore links name their data source through a variable."""
    for name in variables_used(url):
        if name not in template_vars and name not in BUILTIN_VARIABLES and not name.startswith("__"):
            problem(f"{where}: link uses undefined variable ${name}")
    if re.match(r"^https?://", url):
        problem(f"{where}: link to a fixed address {url.split('?')[0]!r}: put the base URL in a variable (e.g. ${{jaeger_url:raw}})")
    if "/explore" not in url:
        return
    decoded = urllib.parse.unquote(url)
    for uid in re.findall(r'"uid"\s*:\s*"([^"]+)"', decoded) + re.findall(r'"datasource"\s*:\s*"([^"]+)"', decoded):
        datasource_type(f"{where}: link to Explore", uid, template_vars, allow_builtin=False)


def check_dashboards(datasources: dict[str, dict]) -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    names = {f.name for f in files}
    for required in REQUIRED_DASHBOARDS:
        if required not in names:
            problem(f"dashboards/{required} is missing")
    recorded = recorded_series()
    queries: list[tuple[str, str]] = []
    seen_uids: dict[str, str] = {}
    for f in files:
        where = rel(f)
        try:
            dash = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            problem(f"{where}: not valid JSON: {e}")
            continue
        if not isinstance(dash, dict):
            problem(f"{where}: not a JSON object")
            continue
        for key, kind in (("uid", str), ("title", str), ("panels", list), ("schemaVersion", int)):
            if not isinstance(dash.get(key), kind):
                problem(f"{where}: missing or mistyped top-level {key!r}")
        uid = dash.get("uid")
        if isinstance(uid, str):
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
                problem(f"{where}: uid {uid!r} must be 1-40 letters, digits, - or _")
            if uid in seen_uids:
                problem(f"{where}: uid {uid!r} also used by {seen_uids[uid]}")
            seen_uids[uid] = where
        expected_uid = REQUIRED_DASHBOARDS.get(f.name)
        if expected_uid and uid != expected_uid:
            problem(f"{where}: uid must be {expected_uid!r}, is {uid!r}")
        if dash.get("id") not in (None,):
            problem(f"{where}: a provisioned dashboard must have \"id\": null or no id (found {dash.get('id')!r})")

        panels = dash.get("panels") or []
        all_panels = walk_panels(panels)
        ids = [p.get("id") for p in all_panels]
        for pid in {i for i in ids if ids.count(i) > 1}:
            problem(f"{where}: panel id {pid} is used more than once")
        for p in all_panels:
            if not isinstance(p.get("id"), int):
                problem(f"{where}: panel {p.get('title')!r} has no integer id")
        # Top-level panels share the grid; a collapsed row's panels share it among themselves.
        check_layout(where, panels)
        for p in panels:
            if p.get("type") == "row" and p.get("collapsed") and p.get("panels"):
                check_layout(f"{where} (row {p.get('title')!r})", p["panels"])

        template_vars = {var.get("name"): var for var in (dash.get("templating") or {}).get("list") or []}
        defined = set(template_vars) | BUILTIN_VARIABLES
        if not any(v.get("type") == "datasource" and v.get("query") == "prometheus" for v in template_vars.values()):
            problem(f"{where}: no Prometheus data source variable ($datasource) for the panels to follow")
        for name, var in template_vars.items():
            vwhere = f"{where}: variable ${name}"
            kind = var.get("type")
            if kind == "datasource":
                check_datasource_variable(where, var, datasources)
            elif kind == "query":
                datasource_type(vwhere, var.get("datasource"), template_vars, allow_builtin=False)
                check_query_variable(where, var)
                for used in variables_used(variable_query(var)) - defined:
                    problem(f"{vwhere} uses undefined variable ${used}")
            elif kind in ("textbox", "constant") and not str(var.get("query") or "").strip():
                problem(f"{vwhere} has no value")

        for ann in (dash.get("annotations") or {}).get("list") or []:
            awhere = f"{where}: annotation {ann.get('name')!r}"
            kind = datasource_type(awhere, ann.get("datasource"), template_vars)
            for name in variables_used(ann.get("expr", "")) - defined:
                problem(f"{awhere} uses undefined variable ${name}")
            if kind == "prometheus" and ann.get("expr"):
                check_expr(awhere, ann["expr"], "annotation", recorded)
                queries.append((awhere, substitute_for_promtool(ann["expr"], template_vars)))

        for p in all_panels:
            title = p.get("title", "?")
            pwhere = f"{where}: panel {p.get('id')} ({title})"
            if p.get("type") == "row":
                continue
            if not p.get("type"):
                problem(f"{pwhere}: no type")
            if not str(p.get("description") or "").strip():
                problem(f"{pwhere}: no description (the (i) next to the title says what a panel shows)")
            pkind = datasource_type(pwhere, p.get("datasource"), template_vars)
            targets = p.get("targets") or []
            if not targets:
                problem(f"{pwhere}: no queries")
            refids = [t.get("refId") for t in targets]
            if len(set(refids)) != len(refids) or None in refids:
                problem(f"{pwhere}: query refIds must be present and unique, got {refids}")
            for t in targets:
                qwhere = f"{pwhere} query {t.get('refId')}"
                kind = datasource_type(qwhere, t["datasource"], template_vars) if t.get("datasource") else pkind
                expr = str(t.get("expr", ""))
                if kind == "prometheus" and not expr.strip():
                    problem(f"{qwhere}: empty expr")
                for name in variables_used(expr) - defined:
                    problem(f"{qwhere}: undefined variable ${name}")
                if kind == "prometheus" and expr.strip():
                    check_expr(qwhere, expr, str(p.get("type")), recorded)
                    queries.append((qwhere, substitute_for_promtool(expr, template_vars)))
            defaults = (p.get("fieldConfig") or {}).get("defaults") or {}
            links = (defaults.get("links") or []) + (p.get("links") or [])
            for o in (p.get("fieldConfig") or {}).get("overrides") or []:
                for prop in o.get("properties") or []:
                    if prop.get("id") == "links":
                        links += prop.get("value") or []
            for link in links:
                check_link(pwhere, str(link.get("url", "")), template_vars, datasources)
                internal = link.get("internal") or {}
                if internal and internal.get("datasourceUid") not in datasources:
                    problem(f"{pwhere}: link to data source {internal.get('datasourceUid')!r}, which is not provisioned")
        for link in dash.get("links") or []:
            check_link(f"{where}: dashboard link {link.get('title')!r}", str(link.get("url", "")), template_vars, datasources)
    check_syntax_with_promtool(queries)


def main() -> int:
    compose = load_yaml(COMPOSE)
    if isinstance(compose, dict):
        check_compose_schema(compose)
        check_compose(compose)
        check_safety.check_compose_safety(ROOT, compose, problem)
    else:
        problem(f"{rel(COMPOSE)}: not a YAML mapping")
        compose = {}
    check_prometheus()
    check_safety.check_alerting(ROOT, compose, problem)
    datasources = provisioned_datasources()
    check_datasource_urls(datasources, compose)
    check_dashboards(datasources)

    if problems:
        print(f"check_static: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    dashboards = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    print(
        "check_static: OK (compose validates against the Compose Specification; mounts exist; ports on "
        "127.0.0.1 only, Grafana anonymous Viewer, stop grace over the drain; prometheus config, rule tests, "
        f"runbook and alertmanager consistent; dashboards OK: {', '.join(dashboards)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
