"""Commands that operate the fleet: agents (and resuming one), hosts
(draining), the token files, alerts, and `fleet web`."""

from __future__ import annotations

import json
import sys
import time

import click

from fleet.cli.context import Context, pass_context
from fleet.errors import FleetError


@click.group(invoke_without_command=True)
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


@click.group(invoke_without_command=True)
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


@click.group()
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


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new alerts.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def alerts(ctx: Context, follow: bool, as_json: bool) -> None:
    """Credential failures and circuit-breaker openings and closings."""
    store = ctx.client.store
    for batch in store.events.follow(store.keys.alerts, block_ms=5000 if follow else None):
        for event in batch:
            if as_json:
                click.echo(json.dumps(event.fields))
                continue
            from fleet.cli.display import alert_line  # needs the host install (rich)

            click.echo(alert_line(event.fields))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to bind; beyond loopback only with web_token_file set.")
@click.option("--port", type=click.IntRange(1, 65535), default=8055, show_default=True)
@click.option("--allowed-host", "names", multiple=True,
              help="A further Host name it answers to (behind a proxy); loopback's always.")
@pass_context
def web(ctx: Context, host: str, port: int, names: tuple[str, ...]) -> None:
    """The dashboard (tasks, agents, hosts, alerts; actions with the token),
    Prometheus metrics at /metrics and /healthz."""
    from fleet.web.app import serve  # needs the `web` extra

    serve(ctx.settings, host, port, list(names))
