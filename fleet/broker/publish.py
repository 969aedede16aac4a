"""Publishing a task's message by task name, so a publisher never imports
consumer code. The message carries only the id, the agent and the attempt:
the payload stays in the task record."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from fleet.broker.celery_app import TASK_NAME, agent_queue
from fleet.record import PRIORITIES, TaskRecord
from fleet.settings import FleetSettings

# Publish a task again: (its record, the attempt it runs as, delay in seconds).
Republish = Callable[[TaskRecord, int, float], None]


def publish(app: Celery, settings: FleetSettings, task_id: str, agent: str, attempt: int = 1,
            countdown: float | None = None, host: str | None = None,
            priority: int = PRIORITIES["normal"]) -> None:
    """Send task `task_id` to its agent's queue (the one pinned to `host` if
    given), to be run as `attempt`. The message carries only the id, the
    agent and the attempt: the payload stays in the task record. A message
    whose attempt has already started is stale and dropped, so a retry
    published twice runs once. `priority` (0 first … 9) orders it within the queue."""
    queue = agent_queue(settings, agent, host)
    # A Queue (not a name): Celery takes its exchange and routing key and
    # declares it, so a pinned queue exists before its host first consumes it.
    # ignore_result: fleet follows its own records; Celery would otherwise
    # subscribe to the result's channel for every message published.
    # retries: Flower shows the attempt a message runs as.
    app.send_task(TASK_NAME, args=[task_id], kwargs={"agent": agent, "attempt": attempt},
                  task_id=task_id, queue=queue, countdown=countdown,  # type: ignore[arg-type]
                  ignore_result=True, retries=attempt - 1, priority=priority)


def republish(app: Celery, settings: FleetSettings, record: TaskRecord, attempt: int,
              countdown: float | None = None) -> None:
    """Publish a task again (a retry, a take-over) where it may run: its pinned host's queue if any."""
    publish(app, settings, record.id, record.agent, attempt=attempt, countdown=countdown,
            host=record.pinned_host, priority=record.priority)
