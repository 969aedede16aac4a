"""What Celery reports of a fleet task's message, so that Flower, `celery
events` and the result's state say what fleet's record says: the task
function returns the result of a succeeded task, raises `TaskFailed` for a
failed one and `Retry` for one that will run again, and announces a
cancelled one as revoked. (The result backend's keys are written by the
record itself: fleet.state.celery_result.)"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry

from fleet.errors import TaskFailed
from fleet.record import State, TaskRecord
from fleet.state.celery_result import failure_message


def failure(record: TaskRecord) -> TaskFailed:
    """The exception the Celery task raises: the same message its result key holds."""
    return TaskFailed(failure_message(record))


def report_outcome(task: Task[Any, Any], record: TaskRecord) -> Any:
    """End the Celery task as fleet's record stands after this message."""
    if record.id != task.request.id and isinstance(task.request.id, str):
        # Its own id was unfit (fleet.record.TASK_ID): the rejection is
        # recorded under a new one; say where, under the id its publisher
        # holds. (Not for an id that is no string: 12345 would name task "12345".)
        task.backend.mark_as_failure(str(task.request.id), TaskFailed(
            f"rejected: recorded as fleet task {record.id}: {record.error.message if record.error else ''}"),
            call_errbacks=False)
    match record.state:
        case State.SUCCEEDED:
            return record.result
        case State.FAILED:
            raise failure(record)
        case State.RETRYING:
            when = datetime.fromisoformat(record.retry_at) if record.retry_at else None
            raise Retry(f"attempt {record.attempts} of task {record.id} failed; it runs again",
                        exc=failure(record), when=when)
        case State.CANCELLED:
            # What Celery's worker sends when it revokes a task (celery.worker.request).
            task.send_event("task-revoked", terminated=True, signum=None, expired=False)
            raise Ignore()
    # Still queued or running: another consumer has it (a duplicate message), or it was held back.
    raise Ignore()
