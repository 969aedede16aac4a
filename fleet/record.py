"""The task record: the contract's shape of one task, as `fleet status --json` prints it."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from fleet.states import FINAL_STATES, ErrorKind, State

__all__ = ["FINAL_STATES", "ErrorKind", "State", "TaskError", "TaskRecord", "now_iso"]

# What a task id may be: fleet's own (32 hex digits), Celery's (a UUID) or a
# publisher's, as long as it cannot reach another key (no ':') nor another
# field of what it is written into (no space, no '|').
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TaskError(BaseModel):
    kind: ErrorKind
    message: str


class TaskRecord(BaseModel):
    id: str
    agent: str
    state: State
    attempts: int = 0
    result: dict[str, Any] | None = None
    exit_code: int | None = None
    error: TaskError | None = None
    host: str | None = None  # where the current (or last) attempt runs
    pinned_host: str | None = None  # set when submitted with a host: it runs only there
    container: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    retry_at: str | None = None  # when a `retrying` task is due to run again
    run_at: str | None = None  # when a `scheduled` task is due to be queued
    priority: int = 3  # 0 (high) … 9 (low) within its agent's queue: fleet.record.PRIORITIES
    key: str | None = None
    on_done: list[str] = Field(default_factory=list, max_length=16)  # hooks told when it ends (by name)
    signed_by: str | None = None  # the id of the key that signed it (signing_key_file)
    signature: str | None = None
    # Bumped by every state change: a write computed from an older read is refused.
    revision: int = Field(default=0, exclude=True)


def now_iso(later_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=later_s)).isoformat(timespec="milliseconds")


def payload_problem(payload: Any, limit: int) -> str | None:
    """What is wrong with a task's payload (None: nothing): the one rule the
    client applies before publishing and a worker again before running."""
    if not isinstance(payload, dict):
        return f"payload must be a JSON object, not {type(payload).__name__}"
    size = len(json.dumps(payload).encode())
    if size > limit:
        return f"payload is {size} bytes, over payload_limit={limit}"
    return None


# Named priorities: kombu's Redis transport serves lower numbers first, in
# steps of 0-2, 3-5, 6-8 and 9 (one list each).
PRIORITIES = {"high": 0, "normal": 3, "low": 9}


def priority_value(priority: int | str | None) -> int:
    """A priority given as a name or 0-9 as the number kept in the record."""
    if priority is None:
        return PRIORITIES["normal"]
    if isinstance(priority, str) and priority in PRIORITIES:
        return PRIORITIES[priority]
    if isinstance(priority, int | str) and str(priority).isdigit() and 0 <= int(priority) <= 9:
        return int(priority)
    raise ValueError(f"priority {priority!r} is not high, normal, low or 0-9 (0 is served first)")


def task_id_problem(task_id: Any) -> str | None:
    """What is wrong with a task id (None: nothing)."""
    if isinstance(task_id, str) and TASK_ID.fullmatch(task_id):
        return None
    return (f"task id {str(task_id)[:80]!r} is not 1-64 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)")
