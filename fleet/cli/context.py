"""What every command shares: the settings and the client, made on first
use (so `fleet --help` works with a broken configuration and a command that
does not publish never imports Celery), and the printing of a record."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from fleet.client import FleetClient
    from fleet.record import TaskRecord
    from fleet.settings import FleetSettings


class Context:
    """Settings and the client of one command, made on first use."""

    def __init__(self) -> None:
        self._settings: FleetSettings | None = None
        self._client: FleetClient | None = None

    @property
    def settings(self) -> FleetSettings:
        if self._settings is None:
            from fleet.settings import load_settings

            self._settings = load_settings()
        return self._settings

    @property
    def client(self) -> FleetClient:
        if self._client is None:
            from fleet.client import FleetClient

            self._client = FleetClient(self.settings)
        return self._client


pass_context = click.make_pass_decorator(Context, ensure=True)


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
