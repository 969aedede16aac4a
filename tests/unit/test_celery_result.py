"""fleet's records in Celery's result-backend format (fleet/state/celery_result.py),
read back by Celery's own Redis backend code, as a plain client's AsyncResult would."""

from __future__ import annotations

import json

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError

from fleet.errors import TaskFailed
from fleet.record import ErrorKind, State, TaskError, TaskRecord
from fleet.state.celery_result import celery_meta


def record(state: State, **fields: object) -> TaskRecord:
    return TaskRecord(id="t1", agent="dev", state=state, created_at="2026-11-30T00:00:00+00:00",
                      attempts=2, **fields)  # type: ignore[arg-type]


@pytest.fixture
def backend():  # type: ignore[no-untyped-def]
    app = Celery("reader", set_as_current=False)
    app.conf.update(result_backend="redis://127.0.0.1:1/0")  # never connected: decoding only
    return app.backend


def decoded(backend, record: TaskRecord) -> dict[str, object]:  # type: ignore[no-untyped-def]
    meta = celery_meta(record)
    assert meta is not None
    return dict(backend.meta_from_decoded(backend.decode_result(meta)))


def test_a_queued_task_has_no_result_yet() -> None:
    assert celery_meta(record(State.QUEUED)) is None


def test_a_succeeded_task_reads_as_success_with_its_result(backend) -> None:  # type: ignore[no-untyped-def]
    done = record(State.SUCCEEDED, result={"ok": 1}, finished_at="2026-11-30T00:01:00+00:00")
    meta = decoded(backend, done)
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", {"ok": 1}, "t1")
    assert meta["retries"] == 1  # the second attempt succeeded


def test_a_failed_task_reads_as_fleets_error(backend) -> None:  # type: ignore[no-untyped-def]
    error = TaskError(kind=ErrorKind.TIMEOUT, message="ran longer than timeout_s=5")
    meta = decoded(backend, record(State.FAILED, error=error))
    assert meta["status"] == "FAILURE"
    assert isinstance(meta["result"], TaskFailed)
    assert str(meta["result"]) == "timeout: ran longer than timeout_s=5"


def test_a_cancelled_task_reads_as_revoked(backend) -> None:  # type: ignore[no-untyped-def]
    error = TaskError(kind=ErrorKind.CANCELLED, message="cancelled by request")
    meta = decoded(backend, record(State.CANCELLED, error=error))
    assert meta["status"] == "REVOKED"
    assert isinstance(meta["result"], TaskRevokedError)


def test_running_and_retrying_read_as_started_and_retry(backend) -> None:  # type: ignore[no-untyped-def]
    assert decoded(backend, record(State.RUNNING, host="h1"))["status"] == "STARTED"
    error = TaskError(kind=ErrorKind.TRANSIENT, message="exit 75")
    assert decoded(backend, record(State.RETRYING, error=error))["status"] == "RETRY"
    assert json.loads(celery_meta(record(State.RUNNING, host="h1")) or "")["result"] == {"hostname": "h1"}
