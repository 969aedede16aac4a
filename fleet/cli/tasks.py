"""Commands on tasks: submit, status, wait, tasks, logs, cancel, retry, and what a
plain Celery publisher needs to submit them (publisher-config)."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from fleet.cli.context import Context, pass_context, print_record
from fleet.errors import UsageError
from fleet.states import State


def read_payload(payload: str | None, payload_file: Path | None) -> dict[str, Any]:
    if payload is not None and payload_file is not None:
        raise UsageError("give --payload or --payload-file, not both")
    if payload_file is not None:
        try:
            payload = payload_file.read_text()
        except OSError as error:
            raise UsageError(f"--payload-file: cannot read {str(payload_file)!r}: "
                             f"{error.strerror}") from None
    if payload is None:
        return {}
    try:
        value = json.loads(payload)
    except ValueError as error:
        raise UsageError(f"payload is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"payload must be a JSON object, not {type(value).__name__}")
    return value


DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d)")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def zoned_time(option: str, value: str) -> datetime:
    """An option's ISO 8601 time, which must name its zone."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} {value!r} is not an ISO 8601 time (2026-12-01T09:00:00+00:00)") from None
    if moment.tzinfo is None:
        raise UsageError(f"{option} {value!r} has no time zone (add +00:00 or Z)")
    return moment


def duration_s(option: str, value: str) -> float:
    """An option's duration (90s, 10m, 2h, 1d) in seconds."""
    match = DURATION.fullmatch(value.strip())
    if match is None:
        raise UsageError(f"{option} {value!r} is not a duration like 90s, 10m, 2h or 1d")
    return float(match.group(1)) * UNIT_S[match.group(2)]


def when(at: str | None, in_: str | None) -> tuple[datetime | None, float | None]:
    """--at and --in as the client's eta and countdown."""
    if at is not None and in_ is not None:
        raise UsageError("give --at or --in, not both")
    if at is not None:
        return zoned_time("--at", at), None
    if in_ is not None:
        return None, duration_s("--in", in_)
    return None, None


def since_time(since: str | None) -> float | None:
    """--since: a zoned ISO 8601 time, or a duration ago."""
    if since is None:
        return None
    if DURATION.fullmatch(since.strip()):
        return time.time() - duration_s("--since", since)
    return zoned_time("--since", since).timestamp()


@click.command()
@click.argument("agent")
@click.option("--payload", help="The task's payload, a JSON object.")
@click.option("--payload-file", type=click.Path(path_type=Path), help="Read the payload from a file.")
@click.option("--key", help="Idempotency key: the same key gives the same task, published once.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the task; exit 0 only if it succeeded.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds to wait.")
@click.option("--host", help="Run it only on this host (e.g. for its state volume there).")
@click.option("--at", "at", help="Run it at this time (ISO 8601 with a zone): scheduled until then.")
@click.option("--in", "in_", help="Run it after this long (90s, 10m, 2h, 1d): scheduled until then.")
@click.option("--priority", help="high, normal (default), low, or 0-9 (0 first) in the agent's queue.")
@click.option("--on-done", "on_done", multiple=True, metavar="HOOK",
              help="Tell this hook (of the settings' on_done) when the task ends; repeatable.")
@pass_context
def submit(ctx: Context, agent: str, payload: str | None, payload_file: Path | None,
           key: str | None, wait_: bool, timeout: float | None, host: str | None,
           at: str | None, in_: str | None, priority: str | None, on_done: tuple[str, ...]) -> None:
    """Publish a task for AGENT and print its id."""
    body = read_payload(payload, payload_file)
    eta, countdown = when(at, in_)
    task_id = ctx.client.submit(agent, body, key=key, host=host, eta=eta, countdown=countdown,
                                priority=priority, on_done=list(on_done))
    if not wait_:
        click.echo(task_id)
        return
    record = ctx.client.wait(task_id, timeout)
    print_record(record, as_json=True)
    sys.exit(0 if record.state == State.SUCCEEDED else 1)


@click.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@pass_context
def status(ctx: Context, task_id: str, as_json: bool) -> None:
    """Show one task's record."""
    print_record(ctx.client.status(task_id), as_json)


@click.command()
@click.argument("task_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True))
@pass_context
def wait(ctx: Context, task_id: str, timeout: float | None) -> None:
    """Block until the task is final; exit 0 only if it succeeded."""
    record = ctx.client.wait(task_id, timeout)
    print_record(record, as_json=True)
    sys.exit(0 if record.state == State.SUCCEEDED else 1)


@click.command()
@click.option("--agent")
@click.option("--state", type=click.Choice([s.value for s in State]))
@click.option("--host", help="Only tasks that ran (or run) on this host, or are pinned to it.")
@click.option("--key", help="Only the task this idempotency key names.")
@click.option("--since", help="Only tasks created since: an ISO 8601 time, or a duration ago (10m, 2h).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many (a page).")
@click.option("--cursor", help="The page after the one that printed this cursor.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Follow changes as they happen: a live table on a terminal, "
              "a line per change when piped.")
@pass_context
def tasks(ctx: Context, agent: str | None, state: str | None, host: str | None, key: str | None,
          since: str | None, limit: int, cursor: str | None, as_json: bool, watch: bool) -> None:
    """List tasks, newest first (by creation; with --state, by when they
    entered it). A page that is not the last ends with its cursor, on stderr."""
    if watch:
        if as_json or cursor or key:
            raise UsageError("--watch takes --agent, --state, --host, --since and --limit only")
        from fleet.cli.watch import watch as follow
        from fleet.state.listing import Filters

        if agent is not None:
            ctx.settings.agent(agent)
        follow(ctx.client, Filters(agent=agent, state=State(state) if state else None, host=host,
                                   since=since_time(since)), min(limit, 50))
        return
    page = ctx.client.tasks_page(agent=agent, state=state, host=host, key=key, since=since_time(since),
                                 limit=limit, cursor=cursor)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json", exclude={"key"}) for r in page.records]))
    else:
        from fleet.cli.display import task_table

        task_table(page.records).print()
    if page.cursor is not None:
        click.echo(f"more: --cursor {page.cursor}", err=True)


@click.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task is final.")
@pass_context
def logs(ctx: Context, task_id: str, follow: bool) -> None:
    """Print the task's output."""
    store = ctx.client.store
    store.records.get(task_id)
    for batch in store.events.follow(store.keys.events(task_id), block_ms=2000 if follow else None):
        for event in batch:
            if event.type == "output":
                stream = sys.stderr if event.fields.get("stream") == "stderr" else sys.stdout
                stream.write(event.fields.get("data", ""))
                stream.flush()
        if not batch and store.records.get(task_id).state.final:
            return


@click.command()
@click.argument("task_id", required=False)
@click.option("--agent", help="Cancel every unfinished task of this agent (with --yes).")
@click.option("--state", type=click.Choice([s.value for s in State if not s.final]),
              help="Only those in this state (with --yes).")
@click.option("--yes", is_flag=True, help="Do cancel the tasks --agent/--state match.")
@pass_context
def cancel(ctx: Context, task_id: str | None, agent: str | None, state: str | None, yes: bool) -> None:
    """Cancel a queued, retrying or running task; or, with --agent and/or
    --state and --yes, every task they match."""
    if task_id is None:
        cancel_many(ctx, agent, state, yes)
        return
    if agent or state:
        raise UsageError("give a task id, or --agent/--state, not both")
    before = ctx.client.status(task_id)
    if before.state.final:
        click.echo(f"task {task_id} is already {before.state}; nothing changed")
        return
    ctx.client.cancel(task_id)
    click.echo(f"task {task_id} cancelled (was {before.state})")


def cancel_many(ctx: Context, agent: str | None, state: str | None, yes: bool) -> None:
    if agent is None and state is None:
        raise UsageError("give a task id, or --agent and/or --state to cancel in bulk")
    if not yes:
        from fleet.client import BULK_LIMIT

        matching = [r for r in ctx.client.tasks(agent, state, limit=BULK_LIMIT) if not r.state.final]
        raise UsageError(f"this would cancel {len(matching)} task(s); add --yes to do it")
    cancelled = ctx.client.cancel_many(agent, state)
    click.echo(f"cancelled {len(cancelled)} task(s)")


@click.command()
@click.argument("task_id")
@pass_context
def retry(ctx: Context, task_id: str) -> None:
    """Run a finished task again, as a new attempt under the same id."""
    record = ctx.client.retry(task_id)
    click.echo(f"task {task_id} queued again as attempt {record.attempts + 1}")


@click.command("publisher-config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/celery.md).")
@pass_context
def publisher_config(ctx: Context, as_json: bool) -> None:
    """What a plain Celery app needs to publish fleet tasks: apply it with
    app.conf.update(...) and send_task(task, kwargs={"agent", "payload"},
    queue=queues[agent]). It includes redis_url as configured (its password too)."""
    from fleet.broker.celery_app import TASK_NAME, publisher_settings
    from fleet.broker.routing import queue_name

    settings = ctx.settings
    config = {**publisher_settings(settings), "task": TASK_NAME,
              "queues": {agent: queue_name(settings.namespace, agent) for agent in settings.agents}}
    if as_json:
        click.echo(json.dumps(config))
        return
    for name, value in config.items():
        click.echo(f"{name:<34} {json.dumps(value)}")
    if settings.redis_tls:
        click.echo("# rediss://: also set broker_use_ssl and redis_backend_use_ssl (docs/celery.md)")
