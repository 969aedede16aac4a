"""`fleet tasks --watch`: the fleet's changes of state as they happen,
followed on the fleet-wide changes stream (one blocking read at a time).
On a terminal, a live table (rich) of the newest tasks matching the
filters; piped, one line per change, for scripts and logs."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet.cli.display import task_table
from fleet.client import FleetClient
from fleet.record import TaskRecord
from fleet.state.events import Event
from fleet.state.listing import Filters

BLOCK_MS = 2000


def change_line(event: Event) -> str:
    """One change as a line: when, task, agent, state, attempt, error kind."""
    when = moment.strftime("%H:%M:%S.%f")[:-3] if (moment := event.at) else event.id
    fields = event.fields
    return "  ".join([when, fields.get("task", ""), f"{fields.get('agent', ''):<12}",
                      f"{fields.get('state', ''):<9}", f"attempt {fields.get('attempt', '0')}",
                      fields.get("error", "")]).rstrip()


class Watch:
    def __init__(self, client: FleetClient, filters: Filters, limit: int) -> None:
        self.client = client
        self.filters = filters
        self.limit = limit
        self.store = client.store
        stream = self.store.keys.changes  # from its newest entry, read before any record
        self._follow = self.store.events.follow(stream, self.store.events.newest_id(stream),
                                                block_ms=BLOCK_MS)

    def changes(self) -> list[Event]:
        """The next changes (empty after a quiet spell)."""
        return next(self._follow)

    def changed(self, batch: list[Event]) -> list[TaskRecord]:
        """The records of the tasks a batch of changes names (those still kept)."""
        ids = list(dict.fromkeys(e.fields.get("task", "") for e in batch if e.fields.get("task")))
        return [r for r in self.store.records.maybe_many(ids) if r is not None]

    def lines(self, console: Console) -> None:
        """Piped: a line per change of a task that matches the filters
        (and, first, one on stderr: from here on, nothing is missed)."""
        print(f"watching fleet {self.client.settings.namespace} (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
        while True:
            batch = self.changes()
            shown = {r.id for r in self.changed(batch) if self.filters.match(r)}
            for event in batch:
                if event.fields.get("task") in shown and self.fits(event):
                    console.print(change_line(event), highlight=False, soft_wrap=True, markup=False)

    def fits(self, event: Event) -> bool:
        """A change in the state asked for (the record may have moved on since)."""
        return self.filters.state is None or event.fields.get("state") == self.filters.state

    def table(self, console: Console) -> None:
        """On a terminal: the newest matching tasks, redrawn as they change."""
        shown = {r.id: r for r in self.store.listing.find(self.filters, self.limit)}
        with Live(self.render(shown), console=console, auto_refresh=False) as live:
            while True:
                batch = self.changes()
                if not batch:
                    continue
                for record in self.changed(batch):
                    if self.filters.match(record):
                        shown[record.id] = record
                    else:
                        shown.pop(record.id, None)
                live.update(self.render(shown), refresh=True)

    def render(self, shown: dict[str, TaskRecord]) -> Table:
        newest = sorted(shown.values(), key=lambda r: (r.created_at, r.id), reverse=True)[:self.limit]
        for stale in set(shown) - {r.id for r in newest}:
            del shown[stale]
        return task_table(newest, title=f"fleet {self.client.settings.namespace}: watching "
                                        "(Ctrl-C to stop)").table


def watch(client: FleetClient, filters: Filters, limit: int) -> None:
    console = Console()
    follow = Watch(client, filters, limit)
    try:
        if console.is_terminal:
            follow.table(console)
        else:
            follow.lines(console)
    except KeyboardInterrupt:
        return
