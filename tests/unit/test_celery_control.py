"""`celery control revoke` as a fleet consumer answers it (fleet/worker/celery_control.py):
each fleet task named is cancelled, then flagged revoked the way Celery does."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.worker import control, state

from fleet.errors import TaskNotFound
from fleet.worker.celery_control import install_revoke


@pytest.fixture
def cancelled() -> Iterator[list[str]]:
    builtin = control.Panel.data["revoke"]
    seen: list[str] = []

    def cancel(task_id: str) -> None:
        if task_id == "gone":
            raise TaskNotFound(task_id)
        seen.append(task_id)

    install_revoke(cancel)
    yield seen
    control.Panel.data["revoke"] = builtin


def test_revoke_cancels_each_task_then_flags_it_as_celery_does(cancelled: list[str]) -> None:
    handler = control.Panel.data["revoke"]
    worker = SimpleNamespace(app=Celery("worker", set_as_current=False))  # no result backend
    reply = handler(worker, ["job-1", "gone", "bad:id", "job-2"], terminate=True, signal="KILL")
    assert cancelled == ["job-1", "job-2"]  # an unfit id is not looked up; a missing task is logged
    assert "flagged as revoked" in reply["ok"]
    assert {"job-1", "gone", "bad:id", "job-2"} <= set(state.revoked)
