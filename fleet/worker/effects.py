"""Carrying out a `Decision` (decision.py): each step on its own, in order,
waiting for Redis while it is away. A step that got through is never run
again, so a retry of the breaker's count does not raise the alert a second
time; a step refused as stale (the task was taken over or cancelled) stops
the steps after it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from fleet.broker.publish import Republish
from fleet.credentials.alerts import Alerts
from fleet.credentials.breaker import Breaker
from fleet.credentials.tokens import TokenStore
from fleet.errors import StaleTransition, StateStoreError
from fleet.record import State, TaskRecord, now_iso
from fleet.state.store import TaskStore
from fleet.worker.decision import (
    CountCredentialFailure,
    Decision,
    PublishRetry,
    RaiseAlert,
    RecordEvent,
    RecordOutcome,
    ResetCredentialFailures,
    Step,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTCOME_PATIENCE_S = 600.0  # how long a finished attempt's outcome waits for Redis


@dataclass
class Credentials:
    """What the consumer needs to handle tokens: the host's token store, the
    breaker and the alerts."""

    tokens: TokenStore
    breaker: Breaker
    alerts: Alerts


def until_stored(record: TaskRecord, write: Callable[[], T],
                 patience_s: float = OUTCOME_PATIENCE_S) -> T | None:
    """Write part of an attempt's outcome, waiting for Redis while it is
    away; what `write` returned, or None if it never got through. A write
    refused as stale (the task was taken over) is logged, not retried."""
    deadline, delay = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return write()
        except StaleTransition as refused:
            log.warning("task %s: late write of attempt %d refused: %s", record.id,
                        record.attempts, refused)
            return None
        except StateStoreError as error:
            if time.monotonic() > deadline:
                log.error("task %s: outcome of attempt %d not recorded, Redis away for %.0f s "
                          "(%s); its lease has expired and it will run again", record.id,
                          record.attempts, patience_s, error)
                return None
            log.warning("task %s: outcome of attempt %d waits for Redis: %s", record.id,
                        record.attempts, error)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


class Effects:
    def __init__(self, store: TaskStore, credentials: Credentials, republish: Republish,
                 patience_s: float = OUTCOME_PATIENCE_S) -> None:
        self.store = store
        self.credentials = credentials
        self.republish = republish
        self.patience_s = patience_s

    def apply(self, record: TaskRecord, decision: Decision) -> TaskRecord | None:
        """Run the steps in order. The record as the outcome step wrote it
        (`record` itself if the decision records none); None if a step was
        refused or never got through (the steps after it were not run)."""
        written = record
        for step in decision.steps:
            done = until_stored(record, partial(self.run, record, step), self.patience_s)
            if done is None:
                return None
            if isinstance(done, TaskRecord):
                written = done
        if decision.outcome is not None:
            log.info("task %s attempt %d: %s", record.id, record.attempts, decision.outcome.state)
        return written

    def run(self, record: TaskRecord, step: Step) -> TaskRecord | bool:
        """One step; raises StateStoreError while Redis is away, StaleTransition if refused."""
        agent = record.agent
        match step:
            case RecordEvent(kind, fields, fenced):
                self.store.events.add(record.id, kind, epoch=record.attempts if fenced else None,
                                      **dict(fields))
            case RaiseAlert(kind, message, fields):
                self.credentials.alerts.emit(kind, agent, message, **dict(fields))
            case CountCredentialFailure(token, threshold):
                self.credentials.breaker.credential_failure(agent, token or None, threshold)
            case ResetCredentialFailures():
                self.credentials.breaker.succeeded(agent)
            case RecordOutcome():
                return self.record_outcome(record, step)
            case PublishRetry(attempt, delay):
                self.republish(record, attempt, delay)
        return True

    def record_outcome(self, record: TaskRecord, step: RecordOutcome) -> TaskRecord:
        outcome = step.outcome
        fields: dict[str, Any] = {"exit_code": step.exit_code, "error": outcome.error,
                                  "attempts": step.attempts}
        if outcome.state.final:
            fields.update(result=outcome.result, finished_at=now_iso())
        elif outcome.retry_in is not None:
            fields.update(retry_at=now_iso(later_s=outcome.retry_in))
        # An attempt's own outcome applies only while it runs: not once it
        # was declared lost (`retrying`) or cancelled.
        return self.store.records.transition(
            record.id, outcome.state, epoch=step.epoch,
            current=record if step.while_running else None,
            require=State.RUNNING if step.while_running else step.require, **fields)
