"""Alerting in the end-to-end check (scripts/stack/e2e.py): the real Alertmanager, fed by
the real Prometheus, notifying a webhook receiver that records what reaches it.

- `WebhookReceiver`: an HTTP server on loopback standing in for the pager and the team's
  chat; every notification Alertmanager posts is kept with the path it came to (one path
  per receiver of deploy/alertmanager/alertmanager.yml).
- `alertmanager_config`: the repository's Alertmanager config with only the receivers'
  URLs pointed at that server and the timers shortened; routes, grouping and inhibitions
  are the repository's.
- `fast_rules`: the repository's rule files with every `for:` divided by the same factor,
  so that alerts fire within the run and in the same order as in production (a cause with
  a shorter `for:` than its symptoms still fires first). Expressions are untouched.
- `AlertmanagerApi`: what Alertmanager holds (active, suppressed, and by what).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

# Alertmanager's timers for the run: long enough for the alerts of one burst (the three
# replicas' breakers) to land in the first notification of their group.
GROUP_WAIT_S = 5
GROUP_INTERVAL_S = 5


class WebhookReceiver:
    """Records every notification posted to it: (arrival, path, payload)."""

    def __init__(self) -> None:
        self.notifications: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    payload = json.loads(body)
                except json.JSONDecodeError:
                    payload = {"unreadable": body[:200].decode("utf-8", "replace")}
                with receiver.lock:
                    receiver.notifications.append((time.monotonic(), self.path, payload))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    def url(self, receiver: str) -> str:
        return f"http://127.0.0.1:{self.port}/{receiver}"

    def received(self, job: str | None = None, alertname: str | None = None) -> list[tuple[float, str, dict]]:
        """Notifications of the group (job, alertname), or of every group."""
        with self.lock:
            out = list(self.notifications)
        return [
            n
            for n in out
            if (job is None or n[2].get("groupLabels", {}).get("job") == job)
            and (alertname is None or n[2].get("groupLabels", {}).get("alertname") == alertname)
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_config(path: Path, hook: WebhookReceiver) -> dict:
    """The repository's config, its receivers pointed at the hook (one path each) and its
    timers shortened for the run."""
    config = yaml.safe_load(path.read_text())
    for receiver in config.get("receivers") or []:
        for webhook in receiver.get("webhook_configs") or []:
            webhook["url"] = hook.url(receiver["name"])

    def shorten(route: dict) -> None:
        for key, value in (("group_wait", GROUP_WAIT_S), ("group_interval", GROUP_INTERVAL_S)):
            if key in route:
                route[key] = f"{value}s"
        for child in route.get("routes") or []:
            shorten(child)

    shorten(config["route"])
    return config


DURATION = re.compile(r"(\d+)(ms|s|m|h)")


def seconds(duration: str) -> float:
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * scale[u] for n, u in DURATION.findall(str(duration)))


def fast_rules(rule_files: list[Path], out_dir: Path, factor: int) -> list[Path]:
    """Copies of the rule files with every `for:` divided by `factor` (at least 1 s)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in rule_files:
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                if rule.get("for"):
                    rule["for"] = f"{max(1, round(seconds(rule['for']) / factor))}s"
        target = out_dir / path.name
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(target)
    return written


class AlertmanagerApi:
    def __init__(self, base: str) -> None:
        self.base = base

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.base}/api/v2/alerts", timeout=10) as r:
            return json.load(r)

    def find(self, job: str, alertnames: set[str], state: str | None = None) -> list[dict]:
        """Alerts of the job with one of the names (and in the state: active, suppressed)."""
        return [
            a
            for a in self.alerts()
            if a["labels"].get("job") == job
            and a["labels"].get("alertname") in alertnames
            and (state is None or a["status"]["state"] == state)
        ]
