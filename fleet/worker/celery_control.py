"""Celery's remote control as fleet's consumers answer it. `celery revoke`
(and Flower's revoke) reaches every worker on the broadcast channel; in
fleet it cancels the task — its record says `cancelled`, whoever runs it
ends it — rather than only telling this worker to discard a message it may
never see (and which the housekeeper would publish again)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker import control

from fleet.errors import FleetError
from fleet.record import task_id_problem

log = logging.getLogger("fleet.worker")

# Cancel a task by id: (task id) → None; raises FleetError if it cannot.
Cancel = Callable[[str], None]


def install_revoke(cancel: Cancel) -> None:
    """Answer `revoke` in this process by cancelling each fleet task named,
    then flagging it revoked the way Celery does. `terminate` changes
    nothing: a cancelled fleet task is ended wherever it runs (fleet's
    consumers run tasks in threads, which Celery cannot terminate)."""
    builtin = control.revoke  # type: ignore[attr-defined]

    @control.control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: str | None = None,
               **kwargs: Any) -> Any:
        ids = [str(one) for one in maybe_list(task_id) or []]
        for one in ids:
            if task_id_problem(one) is not None:
                continue
            try:
                cancel(one)
            except FleetError as error:  # no such task, Redis away: Celery's flag all the same
                log.warning("revoke of task %.80s: not cancelled in fleet: %s", one, error)
        return builtin(state, ids, terminate=False, signal=signal, **kwargs)
