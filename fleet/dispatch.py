"""The Celery app: one kombu queue per configured agent, and publishing by
task name, so a publisher never imports consumer code."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from fleet.keys import Keys
from fleet.routing import queue_name
from fleet.settings import FleetSettings

TASK_NAME = "fleet.run"
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


def make_celery(settings: FleetSettings) -> Celery:
    app = Celery(settings.namespace, broker=settings.redis_url, set_as_current=False)
    exchange = Exchange(f"{settings.namespace}.agents", type="direct")
    queues = [
        Queue(queue_name(settings.namespace, agent), exchange,
              routing_key=queue_name(settings.namespace, agent))
        for agent in settings.agents
    ]
    app.conf.update(
        task_queues=queues,
        task_default_queue=f"{settings.namespace}.unrouted",
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            # Every broker key under the namespace, beside fleet's own keys.
            "global_keyprefix": Keys(settings.namespace).broker_prefix,
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
            countdown: float | None = None) -> None:
    """Send task `task_id` to its agent's queue, to be run as `attempt`. The
    message carries only the id, the agent and the attempt: the payload stays
    in the task record. A message whose attempt has already started is stale
    and dropped, so a retry published twice runs once."""
    queue = queue_name(settings.namespace, agent)
    app.send_task(TASK_NAME, args=[task_id], kwargs={"agent": agent, "attempt": attempt},
                  task_id=task_id,
                  queue=queue, routing_key=queue, exchange=f"{settings.namespace}.agents",
                  countdown=countdown)
