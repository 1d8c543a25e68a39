"""Static checks that the compose stack is safe to start and that its alerting holds
together; `scripts/stack/check_static.py` runs them with the rest.

Safe by default (docker-compose.yml):
- no published port binds every interface: each names 127.0.0.1 (or ::1) as its host IP
  (Docker's published ports bypass the host's firewall);
- Grafana's anonymous visitors are Viewers at most, and its admin password has no default:
  it comes from a variable compose requires (`${VAR:?...}`);
- Prometheus runs without the lifecycle or admin APIs;
- every service that runs the proxy stops within a `stop_grace_period` longer than the
  proxy's drain (--shutdown-grace, then the close timeout) plus its span flush, read from
  the proxy's source so that the check follows the code;
- Jaeger is v2 (`jaegertracing/jaeger:2.x`) with its config file mounted from deploy/jaeger/;
- state lives in declared named volumes, and every service's logs are rotated.

Alerting (deploy/prometheus, deploy/alertmanager, docs/runbook.md):
- every alert has a severity (`critical` pages, `warning` does not), a summary, a
  description and a runbook_url whose section exists in docs/runbook.md (and every alert
  section of the runbook names an alert that exists);
- every rule test file evaluates at prometheus.yml's evaluation_interval;
- Prometheus sends alerts to the compose Alertmanager, whose config groups by job and
  alertname, routes critical alerts to a receiver of their own, and inhibits only alerts
  that exist.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Callable

import yaml

Report = Callable[[str], None]

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "[::1]"}
# The proxy's drain, from its source: --shutdown-grace's default, the close timeout after
# it, and the span exporter's flush timeout.
DRAIN_SOURCES = (
    ("src/config/mod.rs", r'SHUTDOWN_GRACE:\s*&str\s*=\s*"([^"]+)"', "the default --shutdown-grace"),
    ("src/http/server.rs", r"CLOSE_TIMEOUT:\s*Duration\s*=\s*Duration::from_secs\((\d+)\)", "the close timeout"),
    ("src/telemetry/mod.rs", r"shutdown_with_timeout\(Duration::from_secs\((\d+)\)\)", "the span flush timeout"),
)
SEVERITIES = {"critical", "warning"}
RUNBOOK = "docs/runbook.md"


def duration_s(value: str) -> float | None:
    """A Go/compose duration ("30s", "1m30s", "500ms", "10") in seconds; None if unreadable."""
    value = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_args(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def port_host_ip(entry) -> str:
    """The host IP a `ports:` entry publishes on ("" when none is given: every interface)."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip") or "")
    spec = str(entry).split("/")[0]
    # host_ip:published:target, with an IPv6 host in brackets.
    m = re.match(r"^(\[[^\]]+\]|[^:]+):[^:]*:[^:]+$", spec)
    return m.group(1) if m else ""


def runs_proxy(service: dict) -> bool:
    build = service.get("build")
    target = build.get("target") if isinstance(build, dict) else None
    return target == "proxy" or str(service.get("image", "")).startswith("score-proxy:")


# ------------------------------------------------------------------ compose


def check_compose_safety(root: Path, compose: dict, report: Report) -> None:
    where = "docker-compose.yml"
    services = compose.get("services") or {}

    for name, service in services.items():
        for entry in service.get("ports") or []:
            host = port_host_ip(entry)
            if host not in LOOPBACK_HOSTS:
                shown = host or "every interface (no host IP)"
                report(
                    f"{where}: service {name} publishes {entry!r} on {shown}: publish on 127.0.0.1 "
                    "(README: exposing a service deliberately)"
                )
        logging = service.get("logging") or {}
        options = logging.get("options") or {}
        if logging.get("driver") not in ("json-file", "local") or not options.get("max-size"):
            report(f"{where}: service {name} has no rotated logs (logging: driver json-file or local with options.max-size)")

    # Grafana: anonymous visitors may look, never edit; the admin password has no default.
    grafana = services.get("grafana", {})
    genv = environment(grafana)
    if genv.get("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "true":
        role = genv.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer")
        if role != "Viewer":
            report(f"{where}: grafana's anonymous role is {role!r}: Viewer at most")
    password = genv.get("GF_SECURITY_ADMIN_PASSWORD")
    if password is None or not re.fullmatch(r"\$\{\w+:\?[^}]*\}", password):
        report(
            f"{where}: grafana's GF_SECURITY_ADMIN_PASSWORD must come from a required variable "
            f"(${{VAR:?message}}), not a default: is {password!r}"
        )
    if genv.get("GF_USERS_VIEWERS_CAN_EDIT", "false").lower() == "true":
        report(f"{where}: grafana lets viewers edit (GF_USERS_VIEWERS_CAN_EDIT)")

    # Prometheus: no API that stops it, reloads it or deletes data over HTTP.
    for flag in ("--web.enable-lifecycle", "--web.enable-admin-api"):
        if any(a.startswith(flag) for a in command_args(services.get("prometheus", {}))):
            report(f"{where}: prometheus runs with {flag}")

    # Stop grace: longer than the proxy's drain plus its span flush.
    drain = []
    for path, pattern, what in DRAIN_SOURCES:
        try:
            m = re.search(pattern, (root / path).read_text())
        except OSError:
            m = None
        value = duration_s(m.group(1)) if m else None
        if value is None:
            report(f"{path}: cannot find {what} (pattern {pattern!r}): the stop_grace_period check needs it")
            return
        drain.append(value)
    for name, service in services.items():
        if not runs_proxy(service):
            continue
        grace = duration_s(environment(service).get("SCORE_PROXY_SHUTDOWN_GRACE", "") or "") or drain[0]
        needed = grace + drain[1] + drain[2]
        stop = duration_s(service.get("stop_grace_period", "") or "")
        if stop is None or stop <= needed:
            report(
                f"{where}: service {name} needs a stop_grace_period over {needed:.0f}s (drain {grace:.0f}s + close "
                f"{drain[1]:.0f}s + span flush {drain[2]:.0f}s), has {service.get('stop_grace_period')!r}"
            )

    # Jaeger v2, configured by its own mounted file.
    jaeger = services.get("jaeger", {})
    if not re.fullmatch(r"jaegertracing/jaeger:2\.\d+(\.\d+)?", str(jaeger.get("image", ""))):
        report(f"{where}: jaeger must run jaegertracing/jaeger:2.x, runs {jaeger.get('image')!r}")
    args = command_args(jaeger)
    config = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    host = host_path(root, jaeger, config) if config else None
    if host is None or not host.is_file() or "deploy/jaeger/" not in host.as_posix():
        report(f"{where}: jaeger must read its config (--config) from a file mounted from deploy/jaeger/")

    # State on declared named volumes.
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in services.items():
        for v in service.get("volumes") or []:
            source = v.get("source") if isinstance(v, dict) else str(v).split(":")[0]
            kind = v.get("type", "volume") if isinstance(v, dict) else None
            named = source and not source.startswith((".", "/", "~")) and kind in (None, "volume")
            if named and source not in declared:
                report(f"{where}: service {name} uses volume {source!r}, which the top-level volumes: does not declare")
    for name, flag in (("prometheus", "--storage.tsdb.path="), ("alertmanager", "--storage.path=")):
        service = services.get(name, {})
        paths = [a.split("=", 1)[1] for a in command_args(service) if a.startswith(flag)]
        for path in paths:
            if not any(
                isinstance(v, str) and v.split(":")[0] in declared and len(v.split(":")) > 1 and v.split(":")[1] == path
                for v in service.get("volumes") or []
            ):
                report(f"{where}: {name} keeps its data in {path}, which is not a named volume")


def host_path(root: Path, service: dict, container_path: str) -> Path | None:
    """The repository path a container path maps to through the service's bind mounts."""
    target = PurePosixPath(container_path)
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            source, mt = v.get("source", ""), v.get("target", "")
        else:
            parts = str(v).split(":")
            if len(parts) < 2:
                continue
            source, mt = parts[0], parts[1]
        if not source.startswith((".", "/")):
            continue
        mt = PurePosixPath(mt)
        if target == mt or mt in target.parents:
            return (root / source / target.relative_to(mt)).resolve()
    return None


# ------------------------------------------------------------------ alerting


def runbook_anchors(text: str) -> set[str]:
    """GitHub's anchors of the Markdown headings."""
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        title = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def check_alerting(root: Path, compose: dict, report: Report) -> None:
    prom_dir = root / "deploy" / "prometheus"
    prom_config = yaml.safe_load((prom_dir / "prometheus.yml").read_text()) or {}
    evaluation = duration_s(((prom_config.get("global") or {}).get("evaluation_interval")) or "1m")

    # Every rule test evaluates at the interval Prometheus does.
    for test in sorted((prom_dir / "tests").glob("*.yml")):
        doc = yaml.safe_load(test.read_text()) or {}
        interval = duration_s(doc.get("evaluation_interval") or "1m")
        if interval != evaluation:
            report(
                f"deploy/prometheus/tests/{test.name}: evaluation_interval is {doc.get('evaluation_interval') or '1m (default)'}, "
                f"prometheus.yml evaluates every {(prom_config.get('global') or {}).get('evaluation_interval')}"
            )

    # Every alert: a severity, a summary, a description and a runbook section.
    runbook_path = root / RUNBOOK
    anchors = runbook_anchors(runbook_path.read_text()) if runbook_path.is_file() else set()
    if not runbook_path.is_file():
        report(f"{RUNBOOK} is missing")
    alerts: set[str] = set()
    for rule_file in sorted((prom_dir / "rules").glob("*.yml")):
        doc = yaml.safe_load(rule_file.read_text()) or {}
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                name = rule.get("alert")
                if not name:
                    continue
                alerts.add(name)
                where = f"deploy/prometheus/rules/{rule_file.name}: {name}"
                severity = (rule.get("labels") or {}).get("severity")
                if severity not in SEVERITIES:
                    report(f"{where}: severity {severity!r}, expected one of {sorted(SEVERITIES)}")
                annotations = rule.get("annotations") or {}
                for key in ("summary", "description", "runbook_url"):
                    if not str(annotations.get(key) or "").strip():
                        report(f"{where}: no {key} annotation")
                url = str(annotations.get("runbook_url") or "")
                if url and url != f"{RUNBOOK}#{name.lower()}":
                    report(f"{where}: runbook_url is {url!r}, expected {RUNBOOK}#{name.lower()}")
                elif url and name.lower() not in anchors:
                    report(f"{where}: {RUNBOOK} has no section '## {name}'")
    for anchor in anchors:
        if anchor.startswith("scoreproxy") and anchor not in {a.lower() for a in alerts}:
            report(f"{RUNBOOK}: section {anchor!r} names no alert of deploy/prometheus/rules/")

    # Prometheus sends its alerts to the compose Alertmanager.
    services = compose.get("services") or {}
    am_service = services.get("alertmanager")
    targets = [
        t
        for am in (prom_config.get("alerting") or {}).get("alertmanagers") or []
        for sc in am.get("static_configs") or []
        for t in sc.get("targets") or []
    ]
    if am_service is None:
        report("docker-compose.yml: no alertmanager service")
    if targets != ["alertmanager:9093"]:
        report(f"deploy/prometheus/prometheus.yml: alerting must target alertmanager:9093 (the compose service), targets {targets}")
    am_args = command_args(am_service or {})
    am_config_args = [a.split("=", 1)[1] for a in am_args if a.startswith("--config.file=")]
    am_path = root / "deploy" / "alertmanager" / "alertmanager.yml"
    if am_service is not None and [host_path(root, am_service, a) for a in am_config_args] != [am_path.resolve()]:
        report("docker-compose.yml: alertmanager must read --config.file from deploy/alertmanager/alertmanager.yml")
    if am_service is not None and "--cluster.listen-address=" not in am_args:
        report("docker-compose.yml: alertmanager runs alone: --cluster.listen-address= (empty) turns gossip off")

    am = yaml.safe_load(am_path.read_text()) if am_path.is_file() else None
    if not isinstance(am, dict):
        report(f"{am_path.relative_to(root)}: missing or not a mapping")
        return
    route = am.get("route") or {}
    if not {"job", "alertname"} <= set(route.get("group_by") or []):
        report("deploy/alertmanager/alertmanager.yml: the route must group by job and alertname")
    critical = [r for r in route.get("routes") or [] if 'severity="critical"' in (r.get("matchers") or [])]
    if not critical or critical[0].get("receiver") == route.get("receiver"):
        report("deploy/alertmanager/alertmanager.yml: critical alerts need a route to a receiver of their own (they page)")
    matchers = [
        m
        for rule in am.get("inhibit_rules") or []
        for m in (rule.get("source_matchers") or []) + (rule.get("target_matchers") or [])
    ]
    for m in matchers:
        found = re.fullmatch(r'alertname\s*(=~|=|!=)\s*"([^"]*)"', m)
        if found:
            for name in found.group(2).split("|"):
                if name not in alerts:
                    report(f"deploy/alertmanager/alertmanager.yml: inhibit rule names alert {name!r}, which no rule defines")
        found = re.fullmatch(r'severity\s*=\s*"([^"]*)"', m)
        if found and found.group(1) not in SEVERITIES:
            report(f"deploy/alertmanager/alertmanager.yml: inhibit rule names severity {found.group(1)!r}, which no rule uses")
