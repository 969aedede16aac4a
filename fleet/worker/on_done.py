"""The on_done deliverer: a child process of `fleet worker` (one per host,
when hooks are configured) that tells each hook a task's end — a webhook
POST of the final record signed with HMAC-SHA256, or a command with the
same JSON on its stdin — retrying with exponential backoff until it is
delivered or the hook's `give_up_after_s` has passed. Every try is
recorded in the task's events (`on_done`: delivered, failed, abandoned).

What is delivered and when lives in Redis (`fleet.state.deliveries`): a
final transition schedules its deliveries itself, so hosts share the work
and none is lost with a host; delivery is at least once (a receiver dedups
on the X-Fleet-Delivery header). Tries run on a few threads, each under a
lease; the loop goes on taking due deliveries while slow ones are tried,
woken by a notice when an end schedules new ones."""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fleet.connection import connect_redis, redis_errors
from fleet.credentials.alerts import run_hook_command
from fleet.errors import FleetError, UsageError
from fleet.on_done_config import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, OnDoneHook, signature
from fleet.settings import FleetSettings
from fleet.state.deliveries import Deliveries, Delivery
from fleet.state.store import TaskStore
from fleet.worker.consumer import redis_timeouts

log = logging.getLogger("fleet.on_done")

PARALLEL = 8  # tries at once: a slow receiver holds up at most this many
IDLE_S = 1.0  # the longest the deliverer waits before it looks at due deliveries again
BUSY_S = 0.05  # how often it looks while every thread is trying one
MAX_DOUBLINGS = 30  # backoff_s * 2**30 is past any backoff_max_s
UNKNOWN_HOOK_RETRY_S = 60.0  # a hook another host has and this one not: left for a while


def hook_secrets(settings: FleetSettings) -> dict[str, bytes]:
    """Each url hook's HMAC key, read now: UsageError naming a missing one."""
    try:
        return {name: hook.secret() for name, hook in settings.on_done.items() if hook.url}
    except ValueError as error:
        raise UsageError(f"on_done: {error}") from None


def body_of(delivery: Delivery) -> bytes:
    """What a hook receives: the delivery's id, the hook's name and the
    task's record as it ended (without its payload)."""
    return json.dumps({"delivery": delivery.id, "hook": delivery.hook, "task": delivery.record}).encode()


def backoff(hook: OnDoneHook, tries: int, jitter: float) -> float:
    """The wait before try `tries + 1`: doubling from backoff_s, at most backoff_max_s."""
    doubled: float = hook.backoff_s * 2.0 ** min(tries - 1, MAX_DOUBLINGS)
    return min(doubled, hook.backoff_max_s) * jitter


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed try: the signed body goes only where configured."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Deliverer:
    def __init__(self, settings: FleetSettings, store: TaskStore) -> None:
        self.settings = settings
        self.store = store
        self.deliveries = Deliveries(store.redis, store.keys)
        self.secrets = hook_secrets(settings)
        self.lease_s = max((hook.timeout_s for hook in settings.on_done.values()), default=10.0) + 30.0
        self.opener = urllib.request.build_opener(NoRedirects())
        self.rng = random.Random()
        self.trying: set[Future[None]] = set()

    def run(self) -> None:
        """Deliver until the process is stopped; Redis being away is waited out."""
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="on-done") as pool:
            while True:
                try:
                    with redis_errors(), self.store.redis.pubsub(  # type: ignore[no-untyped-call]
                            ignore_subscribe_messages=True) as notices:
                        notices.subscribe(self.store.keys.on_done_notice)
                        while True:
                            self.step(pool)
                            self.wait(notices)
                except FleetError as error:
                    log.warning("on_done deliveries: %s; trying again", error)
                    time.sleep(1)

    def step(self, pool: ThreadPoolExecutor) -> None:
        """Start trying the due deliveries there are threads for."""
        self.trying = {future for future in self.trying if not future.done()}
        free = PARALLEL - len(self.trying)
        if free > 0:
            for delivery in self.deliveries.take_due(time.time(), self.lease_s, free):
                self.trying.add(pool.submit(self.deliver, delivery))

    def wait(self, notices: Any) -> None:
        """Until an end schedules deliveries, the soonest is due, or a
        thread is free again to try one."""
        if len(self.trying) >= PARALLEL:  # what is due waits for a thread: look again shortly
            wait_s = BUSY_S  # (not at once: that would spin while every thread tries a slow one)
        else:
            soonest = self.deliveries.next_due()
            wait_s = IDLE_S if soonest is None else min(IDLE_S, max(0.0, soonest - time.time()))
        with redis_errors():
            if wait_s > 0 and notices.get_message(timeout=wait_s) is not None:
                while notices.get_message(timeout=0) is not None:  # one look serves them all
                    pass

    def deliver(self, delivery: Delivery) -> None:
        """One try, recorded; nothing that goes wrong in it stops the deliverer."""
        try:
            self.try_once(delivery)
        except Exception:  # the delivery stays leased, and is tried again when the lease runs out
            log.exception("on_done %s of task %s: the try failed unexpectedly", delivery.hook, delivery.task)

    def try_once(self, delivery: Delivery) -> None:
        hook = self.settings.on_done.get(delivery.hook)
        tries = delivery.tries + 1
        problem: str | None
        if hook is None:
            problem = f"hook {delivery.hook!r} is not configured on host {self.settings.host}"
            give_up_after_s, delay = 86400.0, UNKNOWN_HOOK_RETRY_S
        else:
            body = body_of(delivery)
            problem = self.post(hook, delivery, body) if hook.url else run_hook_command(
                hook.command, body, hook.timeout_s)
            give_up_after_s, delay = hook.give_up_after_s, backoff(hook, tries, self.rng.uniform(0.8, 1.0))
        if problem is None:
            self.deliveries.done(delivery)
            self.note(delivery, "delivered", tries=str(tries))
        elif time.time() - delivery.since >= give_up_after_s:
            self.deliveries.done(delivery)
            log.error("on_done %s of task %s abandoned after %d tries: %s", delivery.hook, delivery.task,
                      tries, problem)
            self.note(delivery, "abandoned", tries=str(tries), error=problem)
        else:
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
        except (OSError, http.client.HTTPException) as error:  # a timeout, a reset, not HTTP at all
            return f"unreachable: {type(error).__name__}: {error}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def note(self, delivery: Delivery, outcome: str, **fields: str) -> None:
        """The try in the task's events, if its record is still kept."""
        try:
            if self.store.records.maybe_many([delivery.task])[0] is not None:
                self.store.events.add(delivery.task, "on_done", None, hook=delivery.hook, outcome=outcome,
                                      delivery=delivery.id, **fields)
        except FleetError as error:
            log.warning("on_done %s of task %s %s, not recorded: %s", delivery.hook, delivery.task, outcome,
                        error)


def deliver_forever(settings: FleetSettings) -> None:
    """The body of the deliverer child of `fleet worker`."""
    store = TaskStore(connect_redis(settings, **redis_timeouts(settings)), settings.namespace,
                      settings.retention_s)
    Deliverer(settings, store).run()
