"""The states of a task and the kinds of error, standard library only, so
that the command line can name them without loading pydantic."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    SCHEDULED = "scheduled"  # waits for its time (`submit --at/--in`); no message yet
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})


class ErrorKind(StrEnum):
    CREDENTIAL = "credential"
    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    CRASH = "crash"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    REJECTED = "rejected"  # the worker refused to run it (unsigned, for another agent or host, too big)
