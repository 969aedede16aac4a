"""Following many tasks until each is final, without I/O of its own: the
sync and the asyncio client (`FleetClient.as_completed`,
`AsyncFleetClient.as_completed`) drive it with their own Redis calls.

The tasks' event streams are read all at once (one blocking XREAD); a
record is read again only when its stream says it may have become final,
or after a quiet spell (a state fleet never writes counts as maybe final)."""

from __future__ import annotations

import time

from fleet.errors import WaitTimeout
from fleet.record import State, TaskRecord
from fleet.state.events import BLOCK_MS, Event

UNFINISHED = frozenset(str(state) for state in State if not state.final)


class Completion:
    def __init__(self, task_ids: list[str], cursors: dict[str, str], timeout: float | None) -> None:
        """`cursors`: each task's newest event id, read before its record
        first is, so that no change is missed between the two."""
        self.pending = list(dict.fromkeys(task_ids))
        self.cursors = cursors
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.to_read = list(self.pending)  # records to read next: at first, all

    @property
    def done(self) -> bool:
        return not self.pending

    def ended(self, records: list[TaskRecord]) -> list[TaskRecord]:
        """Of the records read, the final ones, first to finish first; they
        are no longer followed."""
        final = sorted((r for r in records if r.state.final), key=lambda r: r.finished_at or "")
        for record in final:
            self.pending.remove(record.id)
            del self.cursors[record.id]
        return final

    def block_ms(self) -> int:
        """How long the next read of the streams may wait; WaitTimeout once
        the deadline has passed."""
        if self.deadline is None:
            return BLOCK_MS
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            more = f" and {len(self.pending) - 3} more" if len(self.pending) > 3 else ""
            raise WaitTimeout(", ".join(self.pending[:3]) + more, self.timeout or 0)
        return max(1, min(BLOCK_MS, int(remaining * 1000)))

    def arrived(self, events: dict[str, list[Event]]) -> None:
        """What one read of the streams brought (the cursors are advanced by
        the reader): the records to read next."""
        if not events:  # a quiet spell: look at the records themselves
            self.to_read = list(self.pending)
            return
        self.to_read = [task_id for task_id, batch in events.items()
                        if any(e.type == "state" and e.fields.get("state") not in UNFINISHED for e in batch)]
