"""How `fleet worker` logs: lines of text for a terminal, or with
`--log-format json` one JSON object per line for a log shipper, carrying
the host, the agent a consumer process serves, and the task and attempt a
message is about where one is being handled (set by the runner around a
task's work, per thread: Celery runs each message on a thread of its own).

Configured once in `fleet worker`'s parent; its consumer processes are
forked from it and keep the handler (Celery leaves the root logger alone:
worker_hijack_root_logger is off)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CURRENT_TASK: ContextVar[tuple[str, int | None] | None] = ContextVar("fleet_task", default=None)
SERVING: dict[str, str] = {}  # "agent": what this process serves (a consumer's, set after the fork)


def entry_of(level: str, logger: str, message: str, created: float, host: str) -> dict[str, object]:
    entry: dict[str, object] = {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level, "logger": logger, "message": message, "host": host, **SERVING}
    if (task := CURRENT_TASK.get()) is not None:
        entry["task"] = task[0]
        if task[1] is not None:
            entry["attempt"] = task[1]
    return entry


class JsonLines(logging.Formatter):
    """One JSON object a record: time, level, logger, message, host, and
    agent, task and attempt where they apply (an exception as `error`)."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        entry = entry_of(record.levelname, record.name, record.getMessage(), record.created, self.host)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str = "text", host: str = "") -> None:
    """The root logger's one handler, on stderr. In JSON, what Celery's
    worker prints itself (its shutdown notices, from a signal handler) is
    a JSON line too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(host) if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    if log_format == "json":
        import celery.apps.worker

        def say(message: str, f: object = None) -> None:  # in a signal handler: no lock, one write
            line = json.dumps(entry_of("INFO", "celery.apps.worker", message, time.time(), host)) + "\n"
            os.write(2, line.encode())

        setattr(celery.apps.worker, "safe_say", say)  # noqa: B010 (celery-types does not declare it)


def serving(agent: str) -> None:
    """This (consumer) process serves `agent`: its log lines say so."""
    SERVING["agent"] = agent


@contextmanager
def about_task(task_id: str, attempt: int | None) -> Iterator[None]:
    """Log lines of this thread name the task (and attempt) meanwhile."""
    token = CURRENT_TASK.set((task_id, attempt))
    try:
        yield
    finally:
        CURRENT_TASK.reset(token)


def attempt_known(attempt: int) -> None:
    """The attempt the current task's claim started."""
    if (task := CURRENT_TASK.get()) is not None:
        CURRENT_TASK.set((task[0], attempt))
