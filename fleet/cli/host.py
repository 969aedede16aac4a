"""Commands for the host itself: the worker, the agent image, the isolation
audit, the doctor, the demo and the benchmark."""

from __future__ import annotations

import json
import sys
import time

import click

from fleet.cli.context import Context, pass_context
from fleet.errors import UsageError
from fleet.settings import AGENT_IMAGE, PROXY_IMAGE


@click.command()
@click.option("--agent", "agent_names", multiple=True, help="Serve only these agents.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object per line, with host, agent, task and attempt where they apply.")
@click.option("--health-port", type=click.IntRange(1, 65535),
              help="Serve GET /healthz on this port (200 while this host and its consumers are live).")
@click.option("--health-host", default="127.0.0.1", show_default=True, help="The address of --health-port.")
@pass_context
def worker(ctx: Context, agent_names: tuple[str, ...], log_format: str, health_port: int | None,
           health_host: str) -> None:
    """Run the consumers for these agents (default: all) in the foreground."""
    from fleet.worker.logs import configure_logging
    from fleet.worker.main import run_workers

    if not ctx.settings.agents:
        raise UsageError("no agents configured: add an [agents.NAME] table to fleet.toml")
    configure_logging(log_format, ctx.settings.host)
    health = (health_host, health_port) if health_port is not None else None
    sys.exit(run_workers(ctx.settings, list(agent_names), health))


@click.group()
def image() -> None:
    """fleet's images: the agent's and the egress proxy's."""


@image.command("build")
@click.option("--tag", default=AGENT_IMAGE, show_default=True)
@click.option("--proxy-tag", default=PROXY_IMAGE, show_default=True)
@click.option("--recipe", "recipes", multiple=True, metavar="NAME",
              help="Also build a real agent CLI's image, fleet-NAME:latest (see `fleet image recipes`).")
@click.option("--force", is_flag=True, help="Rebuild even if the image is current.")
@click.option("--base", default=None, help="Base image (default: registry base, else debootstrap).")
def image_build(tag: str, proxy_tag: str, recipes: tuple[str, ...], force: bool, base: str | None) -> None:
    """Build the agent image and the egress proxy's (and recipes') if missing or out of date."""
    from fleet.container.engine import connect
    from fleet.container.image import CONTEXT_DIR, PROXY_CONTEXT_DIR, build_image
    from fleet.container.recipes import build_recipe, recipe_names

    unknown = sorted(set(recipes) - set(recipe_names()))
    if unknown:
        raise UsageError(f"--recipe {unknown[0]!r}: no such recipe (there are: {', '.join(recipe_names())})")
    client = connect(timeout=1800)

    def report(line: str) -> None:
        click.echo(f"[image] {line}")

    for name, context in ((tag, CONTEXT_DIR), (proxy_tag, PROXY_CONTEXT_DIR)):
        build_image(client, name, force=force, base=base, context=context, report=report)
    for recipe in recipes:
        build_recipe(client, recipe, report=report, force=force, agent_image=tag)


@image.command("recipes")
def image_recipes() -> None:
    """The real agent CLIs fleet can build images for."""
    from fleet.container.recipes import recipe_names, recipe_tag

    for name in recipe_names():
        click.echo(f"{name}\t{recipe_tag(name)}")


@click.command()
@click.option("--role", "role_names", multiple=True, type=click.Choice(["worker", "submitter", "viewer"]),
              help="Only this role (default: all three).")
@click.option("--user", default=None, help="The user's name (default: <namespace>-<role>); with --apply.")
@click.option("--apply", is_flag=True,
              help="Create the user in redis_url's Redis, its password read from stdin.")
@pass_context
def acl(ctx: Context, role_names: tuple[str, ...], user: str | None, apply: bool) -> None:
    """Redis ACL users for fleet's roles: printed as ACL SETUSER lines, or applied."""
    from fleet.cli.acl import ROLES, apply_role, redis_db, roles, setuser_line

    namespace = ctx.settings.namespace
    chosen = [roles(namespace, redis_db(ctx.settings.redis_url))[name] for name in (role_names or ROLES)]
    if not apply:
        for role in chosen:
            click.echo(f"# {role.name}: {role.description}")
            click.echo(setuser_line(role, user if user and len(chosen) == 1 else f"{namespace}-{role.name}"))
        return
    if len(chosen) != 1:
        raise UsageError("--apply makes one user: give one --role")
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise UsageError("--apply reads the user's password from stdin, and it was empty")
    name = user or f"{namespace}-{chosen[0].name}"
    apply_role(ctx.client.store.redis, chosen[0], name, password)
    click.echo(f"user {name} set: {chosen[0].name}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
@click.option("--image", "image_tag", is_flag=False, flag_value=AGENT_IMAGE, default=None,
              help="Also audit an image's filesystem and config (default fleet-agent:latest).")
@pass_context
def audit(ctx: Context, as_json: bool, image_tag: str | None) -> None:
    """Check this host's fleet containers, token directories (and an image)
    against the isolation policy; exit 1 on any failure."""
    from fleet.cli.audit import audit_host
    from fleet.cli.audit_image import audit_image
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


@click.command()
@pass_context
def doctor(ctx: Context) -> None:
    """Check the Docker engine, Redis, the image and the secrets directory."""
    from fleet.cli.doctor import print_checks, run_checks

    checks = run_checks(ctx.settings)
    print_checks(checks, click.echo)
    if not all(check.ok for check in checks):
        sys.exit(1)


@click.command()
@click.option("--keep", is_flag=True, help="Leave the demo's Redis, workers and containers up.")
@click.option("--real-agent", is_flag=True,
              help="Run Claude Code as dev (builds the claude-code recipe; a stand-in model API and forge).")
def demo(keep: bool, real_agent: bool) -> None:
    """A tour: brings up what is missing, runs boss/dev/reviewer, shows tasks flowing."""
    started = time.monotonic()
    if real_agent:
        from fleet.cli.demo_real_agent import run_real_agent_demo

        sys.exit(run_real_agent_demo(keep=keep, started=started))
    from fleet.cli.demo import run_demo

    sys.exit(run_demo(keep=keep, started=started))


# fleet.cli.bench.run.PARTS, without importing it
BENCH_PARTS = ("roundtrip", "cold", "throughput", "hundred", "cli", "egress", "metrics", "real-agent")


@click.command()
@click.option("--tasks", type=click.IntRange(min=1), default=50, show_default=True,
              help="Tasks per measurement (throughput: 4 x as many).")
@click.option("--only", multiple=True, type=click.Choice(BENCH_PARTS), help="Run only this part.")
@click.option("--skip", multiple=True, type=click.Choice(BENCH_PARTS), help="Skip this part.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(tasks: int, only: tuple[str, ...], skip: tuple[str, ...], as_json: bool) -> None:
    """Measure fleet against bare Celery and docker run, on a private Redis:
    round trips (a)-(e), cold start, 3 agents x 2 slots, 100 agents on this host,
    command line start-up, and the egress proxy against direct requests."""
    from fleet.cli.bench.run import run_bench

    if only and skip:
        raise UsageError("give --only or --skip, not both")
    parts = [part for part in BENCH_PARTS if (part in only if only else part not in skip)]
    sys.exit(run_bench(tasks, parts, as_json))
