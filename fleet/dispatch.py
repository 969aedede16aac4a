"""The Celery app: one kombu queue per configured agent, and publishing by
task name, so a publisher never imports consumer code."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis
from celery import Celery
from kombu import Exchange, Queue

from fleet.keys import Keys
from fleet.record import TaskRecord
from fleet.routing import queue_name
from fleet.settings import FleetSettings, is_sentinel_url

TASK_NAME = "fleet.run"

# Publish a task again: (its record, the attempt it runs as, delay in seconds).
Republish = Callable[[TaskRecord, int, float], None]
VISIBILITY_MARGIN_S = 600


def visibility_timeout(settings: FleetSettings) -> int:
    """How long the Redis transport waits before it re-delivers an
    unacknowledged message. It must exceed the longest task, or a second copy
    starts while the first still runs (celery#5935), and the longest retry
    delay, since retries wait in a worker as ETA messages."""
    longest = max(
        [max(spec.timeout_s, spec.transient_backoff_max_s, spec.credential_backoff_max_s)
         for spec in settings.agents.values()],
        default=3600,
    )
    return int(longest) + VISIBILITY_MARGIN_S


def agent_queue(settings: FleetSettings, agent: str, host: str | None = None) -> Queue:
    """The kombu queue of an agent's shared tasks, or of its tasks pinned to `host`."""
    name = queue_name(settings.namespace, agent, host)
    return Queue(name, Exchange(f"{settings.namespace}.agents", type="direct"), routing_key=name)


def make_celery(settings: FleetSettings, host: str | None = None) -> Celery:
    """The app; with `host`, it also knows that host's pinned queues (a
    consumer on it consumes them)."""
    app = Celery(settings.namespace, broker=settings.redis_url, set_as_current=False)
    queues = [agent_queue(settings, agent) for agent in settings.agents]
    if host is not None:
        queues += [agent_queue(settings, agent, host) for agent in settings.agents]
    app.conf.update(
        task_queues=queues,
        task_default_queue=f"{settings.namespace}.unrouted",
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            # Every broker key under the namespace, beside fleet's own keys.
            "global_keyprefix": Keys(settings.namespace).broker_prefix,
            # A sentinel:// URL: the primary the sentinels know by this name.
            **({"master_name": settings.redis_sentinel_master}
               if is_sentinel_url(settings.redis_url) else {}),
        },
        broker_connection_retry_on_startup=True,
        # A message is acknowledged only after its task has been run and its
        # state recorded: a consumer that dies mid-task leaves it unacked, and
        # the transport delivers it again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message reserved per slot: a busy consumer does not hoard tasks
        # another consumer of the same agent could run.
        worker_prefetch_multiplier=1,
        # Keep running tasks through a broker reconnect: killing an hour-long
        # agent run on a Redis blip is worse than a redelivered copy, which
        # fleet's lease and attempt check make harmless.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_max_retries=None,  # retry the broker forever
        task_ignore_result=True,  # state lives in fleet's records, not a result backend
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def publish(app: Celery, settings: FleetSettings, task_id: str, agent: str, attempt: int = 1,
            countdown: float | None = None, host: str | None = None) -> None:
    """Send task `task_id` to its agent's queue (the one pinned to `host` if
    given), to be run as `attempt`. The message carries only the id, the
    agent and the attempt: the payload stays in the task record. A message
    whose attempt has already started is stale and dropped, so a retry
    published twice runs once."""
    queue = agent_queue(settings, agent, host)
    # A Queue (not a name): Celery takes its exchange and routing key and
    # declares it, so a pinned queue exists before its host first consumes it.
    app.send_task(TASK_NAME, args=[task_id], kwargs={"agent": agent, "attempt": attempt},
                  task_id=task_id, queue=queue, countdown=countdown)  # type: ignore[arg-type]


def waiting_messages(client: redis.Redis, keys: Keys, queues: list[str]) -> int:
    """How many messages wait in these queues (kombu's Redis lists)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(keys.queue(queue))
        return sum(int(n) for n in pipe.execute())


def published_task_ids(client: redis.Redis, keys: Keys, queues: list[str]) -> set[str]:
    """The ids of the tasks whose messages wait in these queues or have been
    delivered and not yet acknowledged (kombu's Redis layout: a list per
    queue, one `unacked` hash for all)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.lrange(keys.queue(queue), 0, -1)
        pipe.hvals(keys.unacked)
        *waiting, delivered = pipe.execute()
    messages = [json.loads(raw) for batch in waiting for raw in batch]
    messages += [json.loads(raw)[0] for raw in delivered]  # [message, exchange, routing key]
    return {str(m.get("headers", {}).get("id")) for m in messages}


def republish(app: Celery, settings: FleetSettings, record: TaskRecord, attempt: int,
              countdown: float | None = None) -> None:
    """Publish a task again (a retry, a take-over) where it may run: its pinned host's queue if any."""
    publish(app, settings, record.id, record.agent, attempt=attempt, countdown=countdown,
            host=record.pinned_host)
