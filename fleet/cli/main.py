"""The `fleet` command line. Each command is a thin shell over the library;
FleetError becomes one line on stderr and its exit code (2 for bad input)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from fleet.errors import FleetError, UsageError
from fleet.record import State, TaskRecord
from fleet.settings import FleetSettings, load_settings
from fleet.version import __version__


class Context:
    """Settings and the client are made on first use, so `fleet --help`
    works with a broken configuration."""

    def __init__(self) -> None:
        self._settings: FleetSettings | None = None
        self._client: Any = None

    @property
    def settings(self) -> FleetSettings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def client(self) -> Any:
        if self._client is None:
            from fleet.client import FleetClient

            self._client = FleetClient(self.settings)
        return self._client


pass_context = click.make_pass_decorator(Context, ensure=True)


@click.group()
@click.version_option(version=__version__, prog_name="fleet")
def cli() -> None:
    """Run autonomous coding agents, each in its own isolated container."""


def print_record(record: TaskRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(exclude={"key"}))
        return
    rows = record.model_dump(mode="json", exclude={"key"})
    for name, value in rows.items():
        if value is None:
            continue
        shown = json.dumps(value) if isinstance(value, dict) else value
        click.echo(f"{name:<12} {shown}")


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


@cli.command()
@click.argument("agent")
@click.option("--payload", help="The task's payload, a JSON object.")
@click.option("--payload-file", type=click.Path(path_type=Path), help="Read the payload from a file.")
@click.option("--key", help="Idempotency key: the same key gives the same task, published once.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the task; exit 0 only if it succeeded.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds to wait.")
@click.option("--host", help="Run it only on this host (e.g. for its state volume there).")
@pass_context
def submit(ctx: Context, agent: str, payload: str | None, payload_file: Path | None,
           key: str | None, wait_: bool, timeout: float | None, host: str | None) -> None:
    """Publish a task for AGENT and print its id."""
    body = read_payload(payload, payload_file)
    task_id = ctx.client.submit(agent, body, key=key, host=host)
    if not wait_:
        click.echo(task_id)
        return
    record = ctx.client.wait(task_id, timeout)
    print_record(record, as_json=True)
    sys.exit(0 if record.state == State.SUCCEEDED else 1)


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@pass_context
def status(ctx: Context, task_id: str, as_json: bool) -> None:
    """Show one task's record."""
    print_record(ctx.client.status(task_id), as_json)


@cli.command()
@click.argument("task_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True))
@pass_context
def wait(ctx: Context, task_id: str, timeout: float | None) -> None:
    """Block until the task is final; exit 0 only if it succeeded."""
    record = ctx.client.wait(task_id, timeout)
    print_record(record, as_json=True)
    sys.exit(0 if record.state == State.SUCCEEDED else 1)


@cli.command()
@click.option("--agent")
@click.option("--state", type=click.Choice([s.value for s in State]))
@click.option("--json", "as_json", is_flag=True)
@pass_context
def tasks(ctx: Context, agent: str | None, state: str | None, as_json: bool) -> None:
    """List tasks, newest first."""
    records = ctx.client.tasks(agent=agent, state=state)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json", exclude={"key"}) for r in records]))
        return
    from fleet.cli.display import task_table

    task_table(records).print()


@cli.command()
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


@cli.command()
@click.argument("task_id")
@pass_context
def cancel(ctx: Context, task_id: str) -> None:
    """Cancel a queued or running task."""
    before = ctx.client.status(task_id)
    if before.state.final:
        click.echo(f"task {task_id} is already {before.state}; nothing changed")
        return
    ctx.client.cancel(task_id)
    click.echo(f"task {task_id} cancelled (was {before.state})")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def agents(click_ctx: click.Context, as_json: bool) -> None:
    """Agents: queue depth, container on this host, paused or not."""
    if click_ctx.invoked_subcommand is not None:
        return
    from fleet.cli.display import agent_rows, agent_table

    ctx = click_ctx.ensure_object(Context)
    rows = agent_rows(ctx.settings, ctx.client)
    if as_json:
        click.echo(json.dumps(rows))
        return
    agent_table(rows).print()


@agents.command("resume")
@click.argument("agent")
@pass_context
def agents_resume(ctx: Context, agent: str) -> None:
    """Close AGENT's circuit breaker: its consumers on every host take tasks again."""
    if ctx.client.resume(agent, "resumed by operator"):
        click.echo(f"agent {agent} resumed")
    else:
        click.echo(f"agent {agent} was not paused")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per host.")
@click.pass_context
def hosts(click_ctx: click.Context, as_json: bool) -> None:
    """Hosts running `fleet worker`: agents, slots, containers, heartbeat, state."""
    if click_ctx.invoked_subcommand is not None:
        return
    from fleet.cli.display import host_table

    statuses = click_ctx.ensure_object(Context).client.hosts.all()
    if as_json:
        for status in statuses:
            click.echo(json.dumps(status.view()))
        return
    host_table(statuses).print()


@hosts.command("drain")
@click.argument("host")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the host reports drained.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0,
              show_default=True, help="Seconds to wait.")
@pass_context
def hosts_drain(ctx: Context, host: str, wait_: bool, timeout: float) -> None:
    """HOST stops taking tasks (also after a restart) and finishes what it runs."""
    from fleet.state.hosts import HostState

    fresh = ctx.client.hosts.drain(host)
    click.echo(f"host {host} {'draining' if fresh else 'was already draining'}")
    if not wait_:
        return
    deadline = time.monotonic() + timeout
    while (state := ctx.client.hosts.get(host).state) == HostState.DRAINING:
        if time.monotonic() > deadline:
            raise FleetError(f"host {host} is not drained after {timeout:g} s")
        time.sleep(0.5)
    click.echo(f"host {host} {state}")
    if state != HostState.DRAINED:
        sys.exit(1)


@hosts.command("undrain")
@click.argument("host")
@pass_context
def hosts_undrain(ctx: Context, host: str) -> None:
    """HOST takes tasks again."""
    fresh = ctx.client.hosts.undrain(host)
    click.echo(f"host {host} {'takes tasks again' if fresh else 'was not drained'}")


@cli.group()
def tokens() -> None:
    """The agents' token files on this host (values are never printed)."""


@tokens.command("set")
@click.argument("agent")
@click.argument("name")
@pass_context
def tokens_set(ctx: Context, agent: str, name: str) -> None:
    """Read NAME's value for AGENT from stdin and write it atomically (0600).

    The value is never taken from the command line, where other users and
    shell history could see it. From a terminal it is read without echo."""
    from fleet.credentials.tokens import TokenStore
    from fleet.errors import StateStoreError

    store = TokenStore(ctx.settings)
    store.declared(agent, name)
    if sys.stdin.isatty():
        import getpass

        value = getpass.getpass(f"value of {agent}/{name} (not echoed): ")
    else:
        value = sys.stdin.read()
    value = value.removesuffix("\n")
    info = store.set(agent, name, value.encode())
    click.echo(f"token {agent}/{name} written ({info.fingerprint})")
    try:
        retried = ctx.client.token_rotated(agent, name)
    except StateStoreError as error:
        raise StateStoreError(f"token written, but the agent could not be resumed: {error}") from None
    if retried:
        click.echo(f"retrying now: {', '.join(retried)}")


@tokens.command("list")
@click.argument("agent", required=False)
@pass_context
def tokens_list(ctx: Context, agent: str | None) -> None:
    """Names, age and a short fingerprint of the token files; never values."""
    from fleet.cli.display import token_table
    from fleet.credentials.tokens import TokenStore

    token_table(TokenStore(ctx.settings).list(agent)).print()


@tokens.command("rm")
@click.argument("agent")
@click.argument("name")
@pass_context
def tokens_rm(ctx: Context, agent: str, name: str) -> None:
    """Remove AGENT's token NAME from this host."""
    from fleet.credentials.tokens import TokenStore

    TokenStore(ctx.settings).remove(agent, name)
    click.echo(f"token {agent}/{name} removed")


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new alerts.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def alerts(ctx: Context, follow: bool, as_json: bool) -> None:
    """Credential failures and circuit-breaker openings and closings."""
    from fleet.cli.display import alert_line

    store = ctx.client.store
    for batch in store.events.follow(store.keys.alerts, block_ms=5000 if follow else None):
        for event in batch:
            click.echo(json.dumps(event.fields) if as_json else alert_line(event.fields))


@cli.command()
@click.option("--agent", "agent_names", multiple=True, help="Serve only these agents.")
@pass_context
def worker(ctx: Context, agent_names: tuple[str, ...]) -> None:
    """Run the consumers for these agents (default: all) in the foreground."""
    from fleet.worker.main import configure_logging, run_workers

    if not ctx.settings.agents:
        raise UsageError("no agents configured: add an [agents.NAME] table to fleet.toml")
    configure_logging()
    sys.exit(run_workers(ctx.settings, list(agent_names)))


@cli.group()
def image() -> None:
    """The agent image."""


@image.command("build")
@click.option("--tag", default="fleet-agent:latest", show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if the image is current.")
@click.option("--base", default=None, help="Base image (default: registry base, else debootstrap).")
def image_build(tag: str, force: bool, base: str | None) -> None:
    """Build the agent image if it is missing or out of date."""
    from fleet.container.engine import connect
    from fleet.container.image import build_image

    build_image(connect(timeout=1800), tag, force=force, base=base,
                report=lambda line: click.echo(f"[image] {line}"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
@click.option("--image", "image_tag", is_flag=False, flag_value="fleet-agent:latest", default=None,
              help="Also audit an image's filesystem and config (default fleet-agent:latest).")
@pass_context
def audit(ctx: Context, as_json: bool, image_tag: str | None) -> None:
    """Check this host's fleet containers, token directories (and an image)
    against the isolation policy; exit 1 on any failure."""
    from fleet.cli.audit import audit_host, audit_image
    from fleet.container.engine import connect

    client = connect()
    findings = audit_host(ctx.settings, client)
    if image_tag:
        findings += audit_image(client, image_tag)
    for finding in findings:
        click.echo(json.dumps(finding.as_dict()) if as_json else finding.line())
    if not findings:
        click.echo("no fleet containers on this host yet: start `fleet worker`")
    if not all(f.ok for f in findings):
        sys.exit(1)


@cli.command()
@pass_context
def doctor(ctx: Context) -> None:
    """Check the Docker engine, Redis, the image and the secrets directory."""
    from fleet.cli.doctor import print_checks, run_checks

    checks = run_checks(ctx.settings)
    print_checks(checks, click.echo)
    if not all(check.ok for check in checks):
        sys.exit(1)


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the demo's Redis, workers and containers up.")
def demo(keep: bool) -> None:
    """A tour: brings up what is missing, runs boss/dev/reviewer, shows tasks flowing."""
    from fleet.cli.demo import run_demo

    started = time.monotonic()
    sys.exit(run_demo(keep=keep, started=started))


# fleet.cli.bench.run.PARTS, without importing it
BENCH_PARTS = ("roundtrip", "cold", "throughput", "hundred")


@cli.command()
@click.option("--tasks", type=click.IntRange(min=1), default=50, show_default=True,
              help="Tasks per measurement (throughput: 4 x as many).")
@click.option("--only", multiple=True, type=click.Choice(BENCH_PARTS), help="Run only this part.")
@click.option("--skip", multiple=True, type=click.Choice(BENCH_PARTS), help="Skip this part.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(tasks: int, only: tuple[str, ...], skip: tuple[str, ...], as_json: bool) -> None:
    """Measure fleet against bare Celery and docker run, on a private Redis:
    round trips (a)-(e), cold start, 3 agents x 2 slots, 100 agents on this host."""
    from fleet.cli.bench.run import run_bench

    if only and skip:
        raise UsageError("give --only or --skip, not both")
    parts = [part for part in BENCH_PARTS if (part in only if only else part not in skip)]
    sys.exit(run_bench(tasks, parts, as_json))


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="fleet", standalone_mode=True)
    except FleetError as error:
        click.echo(f"fleet: {error}", err=True)
        sys.exit(error.exit_code)
if __name__ == "__main__":
    main()
