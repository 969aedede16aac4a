"""`fleet worker --health-port N`: a probe for systemd, Kubernetes or a load
balancer, served by a child process of `fleet worker` on 127.0.0.1 (or
`--health-host`). `GET /healthz` answers 200 while this host is registered
and beating and every consumer of it reported within `lease_ttl_s` (a
consumer reports on every housekeeping tick, a third of that); 503 with
what is wrong otherwise — Redis away, the host lost or stopped, a consumer
silent (dead, or hung). The answer is JSON either way. Standard library
only (http.server): one GET, no framework needed."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fleet.connection import connect_redis
from fleet.errors import FleetError
from fleet.settings import FleetSettings
from fleet.state.hosts import HostRegistry, HostState
from fleet.state.keys import Keys


def health(registry: HostRegistry, host: str, agents: list[str], silent_after_s: float) -> dict[str, Any]:
    """This host's health: {"status": "ok" | "unhealthy", "problems": [...], ...}."""
    try:
        status = registry.get(host)
    except FleetError as error:  # Redis away, or not (yet) registered
        return {"status": "unhealthy", "problems": [str(error)]}
    problems = []
    if status.state not in (HostState.UP, HostState.DRAINING, HostState.DRAINED):
        problems.append(f"host {host} is {status.state}")
    now = time.time()
    for agent in agents:
        report = status.consumers.get(agent)
        if report is None or now - report.at > silent_after_s:
            since = "never" if report is None else f"{now - report.at:.0f} s ago"
            problems.append(f"the consumer of {agent} last reported {since}")
    return {"status": "unhealthy" if problems else "ok", "problems": problems, "host": host,
            "state": str(status.state), "heartbeat_age_s": round(now - status.registration.heartbeat_at, 1)}


def serve_health(settings: FleetSettings, agents: list[str], address: str, port: int) -> None:
    """The body of the health child of `fleet worker`."""
    registry = HostRegistry(connect_redis(settings, socket_timeout=2, socket_connect_timeout=2),
                            Keys(settings.namespace), settings.heartbeat_s)

    class Probe(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            answer = health(registry, settings.host, agents, settings.lease_ttl_s)
            body = json.dumps(answer).encode()
            self.send_response(200 if answer["status"] == "ok" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not logged
            pass

    ThreadingHTTPServer((address, port), Probe).serve_forever()
