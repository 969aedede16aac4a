"""RunningTasks (fleet/worker/running.py): the tasks one consumer runs, their
timeouts, and ending them — through a fake forwarder that records kills."""

from __future__ import annotations

from typing import cast

import pytest
from docker.models.containers import Container
from fakes import GRACE_S, FakeForwarder, job

from fleet.worker.running import CANCELLED, LEASE_LOST, TIMEOUT, RunningTasks

WAIT_S = 5.0  # a bound for what happens at once; only a broken behaviour waits it out
CONTAINER = cast(Container, object())


def test_add_remove_and_all(running: RunningTasks) -> None:
    first = running.add(job("t1"), CONTAINER, timeout_s=3600, renewed_at=12.5)
    second = running.add(job("t2"), CONTAINER, timeout_s=3600, renewed_at=13.0)
    assert {t.job.task_id for t in running.all()} == {"t1", "t2"}
    assert (first.reason, first.renewed_at, first.container) == (None, 12.5, CONTAINER)
    assert first.serial != second.serial
    running.remove("t1")
    assert [t.job.task_id for t in running.all()] == ["t2"]
    running.remove("t1")  # removing one that is gone is harmless
    running.remove("t2")
    assert running.all() == []


def test_a_task_past_its_timeout_is_ended_with_reason_timeout(
        running: RunningTasks, forwarder: FakeForwarder) -> None:
    patient = running.add(job("patient"), CONTAINER, timeout_s=3600, renewed_at=0.0)
    late = running.add(job("late"), CONTAINER, timeout_s=0.01, renewed_at=0.0)
    assert forwarder.killed("late").wait(WAIT_S), "the timed-out task was never killed"
    assert late.reason == TIMEOUT
    [kill] = forwarder.kills_of("late")
    assert (kill.job, kill.container, kill.grace_s) == (late.job, CONTAINER, GRACE_S)
    # The watcher handles deadlines in order: one an hour away has not come.
    assert patient.reason is None and forwarder.kills_of("patient") == []


def test_end_kills_in_the_background_and_the_first_reason_wins(
        running: RunningTasks, forwarder: FakeForwarder) -> None:
    task = running.add(job("t1"), CONTAINER, timeout_s=3600, renewed_at=0.0)
    assert running.end("t1", CANCELLED) is True
    assert running.end("t1", LEASE_LOST, grace_s=0) is False
    assert task.reason == CANCELLED
    assert forwarder.killed("t1").wait(WAIT_S)
    assert [k.grace_s for k in forwarder.kills_of("t1")] == [GRACE_S]  # the default grace


def test_end_with_its_own_grace(running: RunningTasks, forwarder: FakeForwarder) -> None:
    running.add(job("t1"), CONTAINER, timeout_s=3600, renewed_at=0.0)
    assert running.end("t1", LEASE_LOST, grace_s=0)
    assert forwarder.killed("t1").wait(WAIT_S)
    assert [k.grace_s for k in forwarder.kills_of("t1")] == [0]


def test_end_of_an_unknown_task_returns_false(running: RunningTasks, forwarder: FakeForwarder) -> None:
    running.add(job("t1"), CONTAINER, timeout_s=3600, renewed_at=0.0)
    assert running.end("nope", CANCELLED) is False
    running.remove("t1")
    assert running.end("t1", CANCELLED) is False  # finished: no longer running here
    assert forwarder.kills == []  # nothing was started: a kill runs only after end() says True


def test_handling_counts_messages_in_hand(running: RunningTasks) -> None:
    assert running.in_flight == 0
    with running.handling():
        assert running.in_flight == 1
        with running.handling():
            assert running.in_flight == 2
        assert running.in_flight == 1
    assert running.in_flight == 0
    with pytest.raises(RuntimeError), running.handling():
        assert running.in_flight == 1
        raise RuntimeError("the handler failed")
    assert running.in_flight == 0  # counted down on an error too


def test_an_earlier_runs_deadline_does_not_end_a_later_run_of_the_same_task(
        running: RunningTasks, forwarder: FakeForwarder) -> None:
    # Holding the (reentrant) lock keeps the deadline watcher from looking
    # until the earlier run is replaced: the test does not depend on timing.
    with running._lock:
        running.add(job("t1", attempt=1), CONTAINER, timeout_s=0, renewed_at=0.0)
        running.remove("t1")
        later = running.add(job("t1", attempt=2), CONTAINER, timeout_s=3600, renewed_at=0.0)
        # Its deadline comes after the earlier run's (same time or later; a
        # higher serial on a tie): once it has fired, the earlier one was handled.
        marker = running.add(job("marker"), CONTAINER, timeout_s=0, renewed_at=0.0)
    assert forwarder.killed("marker").wait(WAIT_S)
    assert marker.reason == TIMEOUT
    assert later.reason is None
    assert forwarder.kills_of("t1") == []
    assert [t.job for t in running.all() if t.job.task_id == "t1"] == [later.job]
