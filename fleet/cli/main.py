"""The `fleet` command line. Each command is a thin shell over the library;
FleetError becomes one line on stderr and its exit code (2 for bad input).
The commands live in `tasks`, `operate` and `host`; what a command needs
beyond click is imported when it runs, so that `fleet --help` and `fleet
status` start fast."""

from __future__ import annotations

import sys
from typing import Any

import click

from fleet.cli import host, operate, tasks
from fleet.errors import FleetError
from fleet.version import __version__

# What an extra adds: a command that needs a module of one says which to install.
EXTRAS = {"docker": "host", "rich": "host", "starlette": "web", "uvicorn": "web", "jinja2": "web",
          "prometheus_client": "web"}


@click.group()
@click.version_option(version=__version__, prog_name="fleet")
def cli() -> None:
    """Run autonomous coding agents, each in its own isolated container."""


for command in (tasks.submit, tasks.status, tasks.wait, tasks.tasks, tasks.logs, tasks.cancel, tasks.retry,
                tasks.publisher_config,
                operate.agents, operate.hosts, operate.tokens, operate.alerts, operate.web,
                host.worker, host.image, host.audit, host.doctor, host.demo, host.bench, host.acl):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="fleet", standalone_mode=True)
    except FleetError as error:
        click.echo(f"fleet: {error}", err=True)
        sys.exit(error.exit_code)
    except ModuleNotFoundError as error:
        if error.name not in EXTRAS:
            raise
        extra = EXTRAS[error.name]
        click.echo(f"fleet: this command needs the {extra} install ({error.name} is missing): "
                   f"pip install 'agent-fleet[{extra}]'", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
