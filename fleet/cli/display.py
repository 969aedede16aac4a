"""Tables for the CLI (rich)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import docker.errors
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleet.container.engine import connect
from fleet.container.spec import container_name
from fleet.credentials.tokens import TokenInfo
from fleet.errors import EngineError
from fleet.record import TaskRecord
from fleet.settings import FleetSettings
from fleet.state.hosts import HostStatus

if TYPE_CHECKING:
    from fleet.client import FleetClient

STATE_STYLES = {"scheduled": "blue", "queued": "cyan", "running": "yellow", "retrying": "magenta",
                "succeeded": "green", "failed": "red", "cancelled": "dim"}


class Printable:
    def __init__(self, table: Table) -> None:
        self.table = table

    def print(self, console: Console | None = None) -> None:
        (console or Console()).print(self.table)


def task_table(records: list[TaskRecord], title: str | None = None) -> Printable:
    table = Table(title=title)
    for column in ("id", "agent", "state", "attempts", "exit", "error", "host", "created"):
        table.add_column(column)
    for r in records:  # what a record says is text, never rich markup (whoever writes records chooses it)
        style = STATE_STYLES.get(r.state, "")
        table.add_row(escape(r.id), escape(r.agent), f"[{style}]{escape(str(r.state))}[/]", str(r.attempts),
                      "" if r.exit_code is None else str(r.exit_code),
                      "" if r.error is None else escape(str(r.error.kind)), escape(r.host or ""),
                      escape(r.created_at))
    return Printable(table)


def agent_rows(settings: FleetSettings, client: FleetClient) -> list[dict[str, Any]]:
    try:
        engine = connect(timeout=10)
    except EngineError:
        engine = None
    rows = []
    for agent, spec in settings.agents.items():
        name = container_name(settings, agent)
        state = "engine down"
        if engine is not None:
            try:
                state = str(engine.containers.get(name).status)
            except docker.errors.NotFound:
                state = "none"
        pause = client.breaker.paused(agent)
        hosts, slots = client.hosts.serving(agent)
        rows.append({"agent": agent, "queued": client.queue_depth(agent),
                     "container": name, "container_state": state,
                     "concurrency": spec.concurrency, "hosts": hosts, "slots": slots,
                     "paused": pause is not None,
                     "status": pause.describe() if pause else "active"})
    return rows


def agent_table(rows: list[dict[str, Any]]) -> Printable:
    table = Table()
    for column in ("agent", "queued", "container here", "state", "hosts", "slots", "status"):
        table.add_column(column)
    for row in rows:
        status = f"[red]{row['status']}[/]" if row["paused"] else row["status"]
        table.add_row(row["agent"], str(row["queued"]), row["container"],
                      row["container_state"], str(row["hosts"]), str(row["slots"]), status)
    return Printable(table)


HOST_STYLES = {"up": "green", "draining": "yellow", "drained": "cyan", "stopped": "dim", "lost": "red"}


def host_table(hosts: list[HostStatus]) -> Printable:
    table = Table()
    for column in ("host", "state", "agents (slots)", "running", "containers", "heartbeat", "version"):
        table.add_column(column)
    now = time.time()
    for host in hosts:
        r = host.registration
        running = sum(c.running for c in host.consumers.values())
        table.add_row(r.host_id, f"[{HOST_STYLES[host.state]}]{host.state}[/]",
                      ", ".join(f"{a} ({r.slots.get(a, 0)})" for a in r.agents), str(running),
                      str(len(r.containers)), f"{human_age(now - r.heartbeat_at)} ago", r.version)
    return Printable(table)


def token_table(tokens: list[TokenInfo]) -> Printable:
    table = Table()
    for column in ("agent", "name", "age", "fingerprint", "reaches the agent"):
        table.add_column(column)
    for token in tokens:
        table.add_row(token.agent, token.name, human_age(token.age_s), token.fingerprint,
                      "no: injected at the egress proxy" if token.injected else "yes: mounted")
    return Printable(table)


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def alert_line(alert: dict[str, str]) -> str:
    when = datetime.fromtimestamp(float(alert.get("time", 0)), UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when}  {alert.get('kind', ''):<18} {alert.get('agent', ''):<12} {alert.get('message', '')}"
