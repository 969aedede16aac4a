"""The Celery app fleet publishes and consumes with: one kombu queue per
agent (and per agent and host for pinned tasks), every broker key under the
namespace, and the delivery settings fleet's guarantees rest on. Importing
this module imports Celery: only processes that publish or consume do."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from fleet.broker.routing import queue_name
from fleet.redis_url import is_sentinel_url
from fleet.settings import FleetSettings
from fleet.state.keys import Keys

TASK_NAME = "fleet.run"
VISIBILITY_MARGIN_S = 600
TRANSPORT = "fleet.broker.transport:Transport"
SENTINEL_TRANSPORT = "fleet.broker.transport:SentinelTransport"


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
    app = Celery(settings.namespace, set_as_current=False)
    queues = [agent_queue(settings, agent) for agent in settings.agents]
    if host is not None:
        queues += [agent_queue(settings, agent, host) for agent in settings.agents]
    app.conf.update(
        task_queues=queues,
        task_default_queue=f"{settings.namespace}.unrouted",
        task_create_missing_queues=False,
        broker_transport=SENTINEL_TRANSPORT if is_sentinel_url(settings.redis_url) else TRANSPORT,
        **publisher_settings(settings),
        # rediss://: the same certificates as fleet's own connection (kombu takes ssl's constants).
        **({"broker_use_ssl": celery_tls(settings), "redis_backend_use_ssl": celery_tls(settings)}
           if settings.redis_tls else {}),
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
        # Fleet's records write the result backend's keys themselves, with
        # every change of state (fleet.state.celery_result): Celery's own
        # write would say SUCCESS for every run, whatever fleet decided.
        task_ignore_result=True,
        # Events for Flower and `celery events`: received, started, the
        # outcome (the task function mirrors fleet's); publishers send `sent`.
        worker_send_task_events=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def publisher_settings(settings: FleetSettings) -> dict[str, Any]:
    """The Celery settings a publisher needs to reach fleet's queues and read
    results, and nothing of fleet's: `fleet publisher-config` prints them,
    and fleet's own app is made with them."""
    keys = Keys(settings.namespace)
    sentinel = ({"master_name": settings.redis_sentinel_master, "sentinel_kwargs": settings.sentinel_kwargs}
                if is_sentinel_url(settings.redis_url) else {})
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout(settings),
            # Every broker key under the namespace, beside fleet's own keys.
            "global_keyprefix": keys.broker_prefix,
            # A sentinel:// URL: the primary the sentinels know by this name.
            **sentinel,
        },
        "result_backend": settings.redis_url,
        "result_backend_transport_options": {"global_keyprefix": keys.result_prefix, **sentinel},
        "result_expires": settings.retention_s,
        "task_send_sent_event": True,
        # fleet's "normal" (fleet.record.PRIORITIES): a message without one would go first.
        "task_default_priority": 3,
    }


def celery_tls(settings: FleetSettings) -> dict[str, Any]:
    """`broker_use_ssl` for a rediss:// broker: settings.redis_tls, with the
    verification mode as the `ssl` constant kombu expects."""
    import ssl

    return {**settings.redis_tls, "ssl_cert_reqs": ssl.CERT_REQUIRED}
