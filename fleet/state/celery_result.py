"""A task record in the format of Celery's Redis result backend, so a plain
Celery client's `AsyncResult(id)` reads the truth: fleet writes it with
every change of the record (in the same atomic step) and publishes it on the
key's channel, which is what `AsyncResult.get()` waits on. Pure: no I/O."""

from __future__ import annotations

import json

from fleet.record import State, TaskRecord

# Celery's states (celery.states) for fleet's; a queued task has no result yet (PENDING).
CELERY_STATE = {
    State.RUNNING: "STARTED",
    State.RETRYING: "RETRY",
    State.SUCCEEDED: "SUCCESS",
    State.FAILED: "FAILURE",
    State.CANCELLED: "REVOKED",
}
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def failure_message(record: TaskRecord) -> str:
    """What a Celery client is told of a failed, retrying or cancelled task: "<kind>: <message>"."""
    error = record.error
    return f"{error.kind}: {error.message}" if error is not None else str(record.state)


def exception(record: TaskRecord) -> dict[str, object]:
    """The exception Celery's client raises for a failed, retrying or
    cancelled task, in the backend's JSON form (celery.backends.base.prepare_exception)."""
    message = failure_message(record)
    if record.state == State.CANCELLED:
        return {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
                "exc_message": [message]}
    return {"exc_type": "TaskFailed", "exc_module": "fleet.errors", "exc_message": [message]}


def celery_meta(record: TaskRecord) -> str | None:
    """The JSON Celery's Redis backend keeps for this task; None while it is queued."""
    status = CELERY_STATE.get(record.state)
    if status is None:
        return None
    meta: dict[str, object] = {
        "status": status,
        "result": record.result if status == "SUCCESS" else (
            {"hostname": record.host} if status == "STARTED" else exception(record)),
        "traceback": None,
        "children": [],
        "date_done": record.finished_at if status in READY else None,
        "task_id": record.id,
        "retries": max(0, record.attempts - 1),
    }
    return json.dumps(meta)
