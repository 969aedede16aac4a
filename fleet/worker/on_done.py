"""The on_done deliverer: a child process of `fleet worker` (one per host,
when hooks are configured) that tells each hook a task's end — a webhook
POST of the final record signed with HMAC-SHA256, or a command with the
same JSON on its stdin — retrying with exponential backoff until it is
delivered or the hook's `give_up_after_s` has passed. Every try is
recorded in the task's events (`on_done`: delivered, failed, abandoned).

What is delivered and when lives in Redis (`fleet.state.deliveries`), so
hosts share the work and none is lost with a host; delivery is at least
once: a receiver dedups by the X-Fleet-Delivery header."""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleet.connection import connect_redis
from fleet.credentials.alerts import run_hook_command
from fleet.errors import FleetError, TaskNotFound, UsageError
from fleet.on_done_config import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, OnDoneHook, signature
from fleet.record import FINAL_STATES, TaskRecord
from fleet.settings import FleetSettings
from fleet.state.deliveries import Change, Deliveries, Delivery
from fleet.state.store import TaskStore
from fleet.worker.consumer import redis_timeouts

log = logging.getLogger("fleet.on_done")

PARALLEL = 8  # deliveries tried at once: a slow receiver does not hold up the others
BATCH = 64  # due deliveries taken at a time
IDLE_MS = 1000  # the longest a deliverer waits before it looks at due deliveries again


def hook_secrets(settings: FleetSettings) -> dict[str, bytes]:
    """Each url hook's HMAC key, read now: UsageError naming a missing one."""
    try:
        return {name: hook.secret() for name, hook in settings.on_done.items() if hook.url}
    except ValueError as error:
        raise UsageError(f"on_done: {error}") from None


def hooks_of(settings: FleetSettings, record: TaskRecord) -> list[str]:
    """The hooks a task's end is delivered to: its agent's, then its own
    (those not configured here are left out, and logged)."""
    spec = settings.agents.get(record.agent)
    named = list(dict.fromkeys([*(spec.on_done if spec else []), *record.on_done]))
    unknown = [name for name in named if name not in settings.on_done]
    if unknown:
        log.warning("task %s names on_done hooks not configured here: %s", record.id, ", ".join(unknown))
    return [name for name in named if name in settings.on_done]


def body_of(delivery: Delivery, record: TaskRecord) -> bytes:
    """What a hook receives: the delivery's id, the hook's name and the
    task's record as it stands (final; without its payload)."""
    return json.dumps({"delivery": delivery.id, "hook": delivery.hook,
                       "task": record.model_dump(mode="json")}).encode()


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed try: the signed body goes only where configured."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Deliverer:
    def __init__(self, settings: FleetSettings, store: TaskStore, consumer: str) -> None:
        self.settings = settings
        self.store = store
        self.deliveries = Deliveries(store.redis, store.keys)
        self.consumer = consumer
        self.secrets = hook_secrets(settings)
        self.lease_s = max((hook.timeout_s for hook in settings.on_done.values()), default=10.0) + 30.0
        self.opener = urllib.request.build_opener(NoRedirects())
        self.rng = random.Random()

    def run(self) -> None:
        """Deliver until the process is stopped; Redis being away is waited out."""
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="on-done") as pool:
            while True:
                try:
                    self.deliveries.join()
                    while True:
                        self.step(pool)
                except FleetError as error:
                    log.warning("on_done deliveries: %s; trying again", error)
                    time.sleep(1)

    def step(self, pool: ThreadPoolExecutor) -> None:
        """Take the new ends of tasks, then try what is due."""
        soonest = self.deliveries.next_due()
        wait_ms = IDLE_MS if soonest is None else int((soonest - time.time()) * 1000)
        for change in self.deliveries.changes(self.consumer, max(1, min(IDLE_MS, wait_ms))):
            self.schedule(change)
        due = self.deliveries.take_due(time.time(), self.lease_s, BATCH)
        list(pool.map(self.deliver, due))

    def schedule(self, change: Change) -> None:
        hooks: list[str] = []
        if change.state in FINAL_STATES:
            try:
                record = self.store.records.get(change.task)
            except TaskNotFound:
                record = None
            # A change its record does not show (retried since; or not fleet's) is not delivered.
            if record is not None and record.state == change.state:
                hooks = hooks_of(self.settings, record)
        self.deliveries.schedule(change, hooks, time.time())

    def deliver(self, delivery: Delivery) -> None:
        """Try one delivery and record how it went."""
        hook = self.settings.on_done.get(delivery.hook)
        try:
            record = self.store.records.get(delivery.task)
        except TaskNotFound:
            record = None
        if hook is None or record is None:
            log.warning("on_done %s of task %s dropped: %s", delivery.hook, delivery.task,
                        "the hook is no longer configured" if hook is None else "the task has expired")
            self.deliveries.done(delivery)
            return
        body = body_of(delivery, record)
        problem = self.post(hook, delivery, body) if hook.url else run_hook_command(
            hook.command, body, hook.timeout_s)
        tries = delivery.tries + 1
        if problem is None:
            self.deliveries.done(delivery)
            self.note(delivery, "delivered", tries=str(tries))
        elif time.time() - delivery.since >= hook.give_up_after_s:
            self.deliveries.done(delivery)
            log.error("on_done %s of task %s abandoned after %d tries: %s", delivery.hook, delivery.task,
                      tries, problem)
            self.note(delivery, "abandoned", tries=str(tries), error=problem)
        else:
            delay = min(hook.backoff_s * 2 ** (tries - 1), hook.backoff_max_s) * self.rng.uniform(0.8, 1.0)
            self.deliveries.later(delivery, time.time() + delay)
            log.info("on_done %s of task %s failed (try %d, again in %.1f s): %s", delivery.hook,
                     delivery.task, tries, delay, problem)
            self.note(delivery, "failed", tries=str(tries), error=problem, retry_in_s=f"{delay:.1f}")

    def post(self, hook: OnDoneHook, delivery: Delivery, body: bytes) -> str | None:
        """POST the body, signed; None on a 2xx answer, else what went wrong."""
        assert hook.url is not None
        timestamp = str(int(time.time()))
        request = urllib.request.Request(hook.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "fleet-on-done",
            DELIVERY_HEADER: delivery.id, TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self.secrets[delivery.hook], timestamp, body)})
        try:
            with self.opener.open(request, timeout=hook.timeout_s) as answer:
                status = int(answer.status)
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"
        except urllib.error.URLError as error:
            return f"unreachable: {error.reason}"
        except OSError as error:  # a timeout, a reset
            return f"unreachable: {error}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def note(self, delivery: Delivery, outcome: str, **fields: str) -> None:
        try:
            self.store.events.add(delivery.task, "on_done", None, hook=delivery.hook, outcome=outcome,
                                  delivery=delivery.id, **fields)
        except FleetError as error:
            log.warning("on_done %s of task %s %s, not recorded: %s", delivery.hook, delivery.task, outcome,
                        error)


def deliver_forever(settings: FleetSettings) -> None:
    """The body of the deliverer child of `fleet worker`."""
    store = TaskStore(connect_redis(settings, **redis_timeouts(settings)), settings.namespace,
                      settings.retention_s)
    Deliverer(settings, store, settings.host).run()
