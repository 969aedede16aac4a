"""What a message on an agent's queue asks for, read from its Celery task
id, positional and keyword arguments. Pure: no Celery import, no I/O.

Two shapes reach a consumer:
  fleet's own     args [task id], kwargs {agent, attempt}: run (again) a task
                  whose record fleet wrote (`fleet submit`, a retry, a take-over)
  a publisher's   no args, kwargs {agent, payload[, signed_by, signature,
                  created_at]}: a new task, its id the Celery task id
                  (docs/celery.md); the consumer writes its record
Anything else is malformed: it is recorded `rejected` with the reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet.record import task_id_problem

FLEET_KWARGS = frozenset({"agent", "attempt"})
PUBLISHER_KWARGS = frozenset({"agent", "payload", "signed_by", "signature", "created_at"})
SIGNATURE_FIELDS = ("signed_by", "signature", "created_at")


@dataclass(frozen=True)
class RunTask:
    """Run a task whose record exists: attempt `attempt` (None: the next)."""

    task_id: str
    attempt: int | None


@dataclass(frozen=True)
class NewTask:
    """A publisher's task: its record is to be written from the message."""

    task_id: str
    agent: str
    payload: Any  # checked like `fleet submit` checks it, by the consumer
    signed_by: str | None = None
    signature: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class Malformed:
    """A message fleet cannot run; `task_id` is its id if one fit to record it under."""

    task_id: str | None
    reason: str


Message = RunTask | NewTask | Malformed


def read_message(message_id: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Message:
    if (problem := task_id_problem(message_id)) is not None:
        return Malformed(None, problem)
    if args:
        return fleet_message(message_id, args, kwargs)
    return publisher_message(message_id, kwargs)


def fleet_message(task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Message:
    if list(args) != [task_id]:
        return Malformed(task_id, f"its arguments {list(args)!r:.80} are not [its task id]: fleet's "
                                  "messages carry the task id, a publisher's only keyword arguments")
    if unknown := sorted(set(kwargs) - FLEET_KWARGS):
        return Malformed(task_id, f"unknown keyword argument(s) {', '.join(unknown)!s:.80}")
    attempt = kwargs.get("attempt")
    if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1):
        return Malformed(task_id, f"attempt {attempt!r:.40} is not a positive integer")
    return RunTask(task_id, attempt)


def publisher_message(task_id: str, kwargs: Mapping[str, Any]) -> Message:
    if unknown := sorted(set(kwargs) - PUBLISHER_KWARGS):
        return Malformed(task_id, f"unknown keyword argument(s) {', '.join(unknown)!s:.80} (a task "
                                  f"takes {', '.join(sorted(PUBLISHER_KWARGS))})")
    agent = kwargs.get("agent")
    if not isinstance(agent, str) or not agent:
        return Malformed(task_id, "no agent: send_task(..., kwargs={'agent': NAME, 'payload': {...}})")
    if "payload" not in kwargs:
        return Malformed(task_id, "no payload: send_task(..., kwargs={'agent': NAME, 'payload': {...}})")
    signed = [kwargs.get(name) for name in SIGNATURE_FIELDS]
    if any(value is not None and not isinstance(value, str) for value in signed):
        return Malformed(task_id, "signed_by, signature and created_at must be strings")
    created_at = kwargs.get("created_at")
    if created_at is not None and not zoned_iso_time(created_at):
        return Malformed(task_id, f"created_at {created_at!r:.60} is not an ISO 8601 time with a zone")
    return NewTask(task_id, agent, kwargs["payload"], *signed)


def zoned_iso_time(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False
