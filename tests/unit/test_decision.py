"""What an attempt comes to (decision.decide, pure) and how its steps are
carried out (effects.Effects): in order, each once, a refused one stopping
the rest."""

from __future__ import annotations

import random
from typing import Any

import fakeredis
import pytest

from fleet.credentials.alerts import CREDENTIAL_FAILURE, Alerts
from fleet.credentials.breaker import Breaker
from fleet.errors import StateStoreError
from fleet.record import ErrorKind, State, TaskRecord
from fleet.settings import AgentSpec
from fleet.state.store import TaskStore
from fleet.worker.decision import (
    AttemptFacts,
    CountCredentialFailure,
    PublishRetry,
    RaiseAlert,
    RecordEvent,
    RecordOutcome,
    ResetCredentialFailures,
    decide,
    engine_failure,
)
from fleet.worker.effects import Credentials, Effects
from fleet.worker.running import CANCELLED, HANDBACK, TIMEOUT

SPEC = AgentSpec(tokens=["forge"], credential_retries=2, transient_retries=1, breaker_threshold=3)


def facts(code: int = 0, attempt: int = 1, **overrides: Any) -> AttemptFacts:
    return AttemptFacts(**{"task_id": "t1", "agent": "dev", "host": "h1", "attempt": attempt,
                           "exit_code": code, "reason": None, "container_lost": None, **overrides})


def kinds(decision: Any) -> list[str]:
    return [type(step).__name__ for step in decision.steps]


def test_success_resets_the_credential_count_then_records() -> None:
    decision = decide(facts(0, last_stdout_line='{"ok": 1}'), SPEC, random.Random(1))
    assert decision.outcome is not None and decision.outcome.result == {"ok": 1}
    assert kinds(decision) == ["ResetCredentialFailures", "RecordOutcome"]


def test_credential_failure_records_alerts_counts_then_retries() -> None:
    decision = decide(facts(77, last_stderr_line="fleet: credential-failure token=forge"), SPEC,
                      random.Random(1))
    assert kinds(decision) == ["RecordEvent", "RaiseAlert", "CountCredentialFailure", "RecordOutcome",
                               "RecordEvent", "PublishRetry"]
    event, alert, count = decision.steps[:3]
    assert isinstance(event, RecordEvent) and dict(event.fields)["token"] == "forge"
    assert isinstance(alert, RaiseAlert) and alert.kind == CREDENTIAL_FAILURE
    assert dict(alert.fields) == {"task": "t1", "token": "forge", "host": "h1"}
    assert count == CountCredentialFailure("forge", 3)
    retry = decision.steps[-1]
    assert isinstance(retry, PublishRetry) and retry.attempt == 2 and retry.delay > 0


def test_a_token_rotated_during_the_attempt_retries_at_once() -> None:
    decision = decide(facts(77, token_rotated=True), SPEC, random.Random(1))
    assert decision.outcome is not None and decision.outcome.retry_in == 0.0
    assert PublishRetry(2, 0.0) in decision.steps


def test_credential_retries_exhausted_fail_without_a_retry() -> None:
    decision = decide(facts(77, attempt=3), SPEC, random.Random(1))
    assert decision.outcome is not None and decision.outcome.state == State.FAILED
    assert kinds(decision)[-1] == "RecordOutcome"


def test_a_cancelled_attempt_records_only_that_it_ended() -> None:
    decision = decide(facts(-9, reason=CANCELLED), SPEC, random.Random(1))
    assert decision.outcome is None
    assert decision.steps == (RecordEvent("attempt_ended", (("reason", CANCELLED), ("attempt", "1"))),)


def test_handback_and_timeout_and_a_dead_container() -> None:
    handed = decide(facts(-15, reason=HANDBACK), SPEC, random.Random(1))
    assert handed.outcome is not None and handed.outcome.retry_in == 0.0
    assert handed.outcome.error is not None and handed.outcome.error.kind == ErrorKind.LOST
    timed = decide(facts(0, reason=TIMEOUT), SPEC, random.Random(1))
    assert timed.outcome is not None and timed.outcome.error is not None
    assert timed.outcome.error.kind == ErrorKind.TIMEOUT
    died = decide(facts(137, container_lost="it died (exit status 137)"), SPEC, random.Random(1))
    assert died.outcome is not None and died.outcome.error is not None
    assert died.outcome.error.kind == ErrorKind.CRASH and died.outcome.state == State.RETRYING
    # A container killed because its task ran past its deadline: the timeout is what counts.
    forced = decide(facts(-1, reason=TIMEOUT, container_lost="killed at the deadline"), SPEC,
                    random.Random(1))
    assert forced.outcome is not None and forced.outcome.error is not None
    assert forced.outcome.error.kind == ErrorKind.TIMEOUT and forced.outcome.state == State.FAILED


def test_an_engine_failure_is_a_crash_fenced_by_the_records_attempt() -> None:
    decision = engine_failure("t1", attempt=1, epoch=0, message="no engine", spec=SPEC,
                              rng=random.Random(1))
    write = decision.steps[0]
    assert isinstance(write, RecordOutcome)
    assert (write.attempts, write.epoch, write.while_running) == (1, 0, False)
    assert kinds(decision) == ["RecordOutcome", "RecordEvent", "PublishRetry"]


# -- effects -----------------------------------------------------------------


class FlakyBreaker(Breaker):
    """Fails its first `failures` counts as Redis would while away."""

    failures = 1
    counted = 0

    def credential_failure(self, agent: str, token: str | None, threshold: int) -> bool:
        if self.failures:
            self.failures -= 1
            raise StateStoreError("Redis: connection refused")
        self.counted += 1
        return super().credential_failure(agent, token, threshold)


@pytest.fixture
def running_task() -> tuple[TaskStore, TaskRecord]:
    store = TaskStore(fakeredis.FakeRedis(decode_responses=True), "ns", 3600)
    task_id, _ = store.records.create("dev", {})
    record = store.leases.claim(store.records.get(task_id), 1, "me", 10_000)
    return store, record


def effects_for(store: TaskStore, breaker: Breaker | None = None) -> tuple[Effects, list[Any]]:
    alerts = Alerts(store.redis, store.keys)
    published: list[Any] = []
    credentials = Credentials(tokens=None, breaker=breaker or Breaker(store.redis, store.keys, alerts),  # type: ignore[arg-type]
                              alerts=alerts)
    effects = Effects(store, credentials, lambda r, attempt, delay: published.append((attempt, delay)),
                      patience_s=30)
    return effects, published


def test_a_step_retried_while_redis_is_away_does_not_repeat_the_steps_before(
        running_task: tuple[TaskStore, TaskRecord]) -> None:
    store, record = running_task
    breaker = FlakyBreaker(store.redis, store.keys, Alerts(store.redis, store.keys))
    effects, published = effects_for(store, breaker)
    decision = decide(facts(77, attempt=1, task_id=record.id), SPEC, random.Random(1))
    assert effects.apply(record, decision)
    alerts = store.redis.xrange(store.keys.alerts)
    assert [fields["kind"] for _, fields in alerts] == [CREDENTIAL_FAILURE]  # once, not twice
    events = [e.type for e in store.events.of_task(record.id)]
    assert events.count("credential_failure") == 1
    assert breaker.counted == 1
    assert store.records.get(record.id).state == State.RETRYING
    assert [attempt for attempt, _ in published] == [2]


def test_a_refused_outcome_stops_the_steps_after_it(running_task: tuple[TaskStore, TaskRecord]) -> None:
    store, record = running_task
    store.records.transition(record.id, State.CANCELLED)  # cancelled while it ran
    effects, published = effects_for(store)
    decision = decide(facts(75, attempt=1, task_id=record.id), SPEC, random.Random(1))
    assert not effects.apply(record, decision)
    assert store.records.get(record.id).state == State.CANCELLED
    assert published == []
    assert "retry" not in [e.type for e in store.events.of_task(record.id)]


def test_success_resets_the_breakers_count(running_task: tuple[TaskStore, TaskRecord]) -> None:
    store, record = running_task
    store.redis.set(store.keys.credential_failures("dev"), 2)
    effects, _ = effects_for(store)
    assert effects.apply(record, decide(facts(0, task_id=record.id), SPEC, random.Random(1)))
    assert store.redis.get(store.keys.credential_failures("dev")) is None
    assert ResetCredentialFailures() in decide(facts(0), SPEC, random.Random(1)).steps
    assert store.records.get(record.id).state == State.SUCCEEDED
