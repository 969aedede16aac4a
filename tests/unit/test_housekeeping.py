"""The housekeeper (fleet/worker/housekeeping.py) over fakeredis, one pass at
a time (its threads are not started): reaping lost and overdue tasks,
control notices, keeping leases and fencing. Kills go to a fake forwarder,
republishing to a recorder, consumption control to a stand-in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import fakeredis
import pytest
from docker.models.containers import Container
from fakes import GRACE_S, FakeForwarder

from fleet.forwarding.base import Job
from fleet.record import ErrorKind, State, TaskRecord
from fleet.state.hosts import CONSUMER, HostRegistry
from fleet.state.store import TaskStore
from fleet.worker.holdback import ConsumptionControl
from fleet.worker.housekeeping import OVERDUE_RETRY_S, Housekeeper
from fleet.worker.running import CANCELLED, LEASE_LOST, RunningTask, RunningTasks

WAIT_S = 5.0  # a bound for what happens at once; only a broken behaviour waits it out
TTL_S = 30.0
OWNER = "h1:4242"
CONTAINER = cast(Container, object())


@dataclass
class FakeControl:
    """ConsumptionControl's face to the housekeeper: never held back."""

    host: str = "h1"
    consuming: bool = True
    queues: tuple[str, ...] = ("ns.agent.dev", "ns.agent.dev.host.h1")
    max_running: int | None = None

    def held_back(self) -> str | None:
        return None


@dataclass
class Republished:
    task_id: str
    attempt: int
    delay: float


@dataclass
class Republisher:
    calls: list[Republished] = field(default_factory=list)

    def __call__(self, record: TaskRecord, attempt: int, delay: float) -> None:
        self.calls.append(Republished(record.id, attempt, delay))


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def store(redis: fakeredis.FakeRedis) -> TaskStore:
    return TaskStore(redis, "ns", retention_s=1000)


@pytest.fixture
def republished() -> Republisher:
    return Republisher()


@pytest.fixture
def keeper(store: TaskStore, running: RunningTasks, republished: Republisher) -> Housekeeper:
    return Housekeeper(store, HostRegistry(store.redis, store.keys, heartbeat_s=5.0), "dev", OWNER,
                       lease_ttl_s=TTL_S, running=running,
                       control=cast(ConsumptionControl, FakeControl()), republish=republished,
                       queue_depth=lambda: 0, lost_message_after_s=300.0)


def claimed(store: TaskStore, owner: str = OWNER, ttl_s: float = TTL_S) -> TaskRecord:
    """A new task of agent dev, running its first attempt under `owner`'s lease."""
    task_id, _ = store.records.create("dev", {})
    return store.leases.claim(store.records.get(task_id), 1, owner, int(ttl_s * 1000), host="h2")


def runs_here(running: RunningTasks, record: TaskRecord, renewed_at: float = 0.0) -> RunningTask:
    job = Job(task_id=record.id, agent="dev", attempt=record.attempts, payload=b"{}",
              command=["agent"], user="10001")
    return running.add(job, CONTAINER, timeout_s=3600, renewed_at=renewed_at)


def retrying(store: TaskStore, due_ago_s: float) -> TaskRecord:
    """A task of agent dev whose first attempt failed, due again `due_ago_s` ago."""
    task_id, _ = store.records.create("dev", {})
    store.records.transition(task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1})
    due = datetime.fromtimestamp(time.time() - due_ago_s, UTC).isoformat()
    return store.records.transition(task_id, State.RETRYING, retry_at=due)


def test_reap_records_a_task_whose_lease_is_gone_lost_and_publishes_it_again(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    record = claimed(store, owner="h2:1")
    store.redis.delete(store.keys.lease(record.id))  # as if it expired: its consumer died
    keeper.reap()
    assert republished.calls == [Republished(record.id, 2, 0.0)]
    after = store.records.get(record.id)
    assert after.state == State.RETRYING
    assert after.error is not None and after.error.kind == ErrorKind.LOST
    keeper.reap()  # no longer running: not reaped twice
    assert len(republished.calls) == 1


def test_tasks_whose_messages_were_purged_are_cancelled_not_published_again(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    queued, _ = store.records.create("dev", {})
    running = claimed(store)
    boss, _ = store.records.create("boss", {})  # named in dev's purged list: not dev's to cancel
    pinned_elsewhere, _ = store.records.create("dev", {}, pinned_host="h2")
    for task_id in (queued, running.id, boss, pinned_elsewhere, "no-such-task", "bad:id"):
        store.redis.rpush(store.keys.purged("ns.agent.dev"), json.dumps({"headers": {"id": task_id}}))
    store.redis.rpush(store.keys.purged("ns.agent.dev.host.h1"), "not json")
    store.redis.rpush(store.keys.purged("ns.agent.dev.host.h1"), "[" * 100_000 + "]" * 100_000)
    keeper.reap()
    record = store.records.get(queued)
    assert record.state == State.CANCELLED and record.error is not None
    assert "purged from queue ns.agent.dev" in record.error.message
    assert store.records.get(running.id).state == State.RUNNING  # a duplicate's purge ends no run
    assert store.records.get(boss).state == store.records.get(pinned_elsewhere).state == State.QUEUED
    assert not store.redis.exists(*(store.keys.purged(q) for q in FakeControl.queues))
    assert republished.calls == []


def test_scheduled_tasks_are_queued_once_when_due_and_cancelled_ones_dropped(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    due, _ = store.records.create("dev", {}, run_at=time.time() - 1)
    later, _ = store.records.create("dev", {}, run_at=time.time() + 3600)
    cancelled, _ = store.records.create("dev", {}, run_at=time.time() - 1)
    store.records.transition(cancelled, State.CANCELLED)
    keeper.reap()
    keeper.reap()
    assert [(call.task_id, call.attempt) for call in republished.calls] == [(due, 1)]
    assert store.records.get(due).state == State.QUEUED
    assert store.records.get(later).state == State.SCHEDULED
    assert store.redis.zrange(store.keys.schedule("dev"), 0, -1) == [later]


def test_whatever_a_submitter_puts_in_the_schedule_stops_no_reaping_and_starts_nothing_early(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    """Found in review: one bad entry stopped every tick of the housekeeper."""
    schedule = store.keys.schedule("dev")
    boss, _ = store.records.create("boss", {}, run_at=time.time() + 3600)
    early, _ = store.records.create("dev", {}, run_at=time.time() + 3600)
    store.redis.set(store.keys.task("a-string"), "not a record")
    store.redis.hset(store.keys.task("bad-json"), mapping={"state": "{not json", "agent": '"dev"'})
    store.redis.zadd(schedule, {"x:events": 0, "a-string": 0, "bad-json": 0, boss: 0, early: 0})
    lost = claimed(store, owner="gone", ttl_s=0.001)
    keeper.reap()
    assert [call.task_id for call in republished.calls] == [lost.id]  # the reaping went on
    assert store.records.get(early).state == State.SCHEDULED  # its record's time holds
    assert store.redis.zrange(schedule, 0, -1) == [early]
    assert store.redis.zscore(schedule, early) > time.time() + 3000


def test_garbage_where_purged_messages_go_stops_no_reaping(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    store.redis.set(store.keys.purged("ns.agent.dev"), "not a list")
    lost = claimed(store, owner="gone", ttl_s=0.001)
    keeper.reap()
    assert [call.task_id for call in republished.calls] == [lost.id]
    assert not store.redis.exists(store.keys.purged("ns.agent.dev"))


def test_reap_leaves_a_task_with_a_live_lease_alone(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    record = claimed(store, owner="h2:1")
    keeper.reap()
    assert republished.calls == []
    after = store.records.get(record.id)
    assert (after.state, after.attempts, after.error) == (State.RUNNING, 1, None)
    assert store.leases.owner(record.id) == "h2:1|1"


def test_reap_publishes_a_long_overdue_retry_again(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    overdue = retrying(store, due_ago_s=OVERDUE_RETRY_S + 30)
    retrying(store, due_ago_s=OVERDUE_RETRY_S - 30)  # late, but its message may still come
    retrying(store, due_ago_s=-600)  # not due yet
    keeper.reap()
    assert republished.calls == [Republished(overdue.id, 2, 0.0)]
    after = store.records.get(overdue.id)
    assert after.state == State.RETRYING and after.retry_at is not None
    assert time.time() - datetime.fromisoformat(after.retry_at).timestamp() < OVERDUE_RETRY_S
    keeper.reap()  # due again from now: not published again at once
    assert len(republished.calls) == 1


def test_an_overdue_retry_whose_message_waits_in_its_queue_is_not_published_again(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    """Found in review: a retry put back in the queue while its agent was at
    max_running was published again every minute."""
    waiting = retrying(store, due_ago_s=OVERDUE_RETRY_S + 30)
    store.redis.lpush(store.keys.queue("ns.agent.dev"), json.dumps({"headers": {"id": waiting.id}}))
    keeper.reap()
    assert republished.calls == []


def test_a_queued_task_whose_message_a_cut_off_consumer_holds_is_published_again(
        keeper: Housekeeper, store: TaskStore, republished: Republisher) -> None:
    """Its message sits in kombu's unacked hash until the visibility timeout
    (an hour or more): delivered longer ago than lost_message_after_s while
    the task is still queued, no live consumer has it."""
    stranded, _ = store.records.create("dev", {})
    held, _ = store.records.create("dev", {})
    long_ago = time.time() - 400
    for task_id in (stranded, held):
        store.redis.zadd(store.keys.by_state(State.QUEUED), {task_id: long_ago})
    for tag, task_id, when in (("t1", stranded, long_ago), ("t2", held, time.time())):
        store.redis.hset(store.keys.unacked, tag, json.dumps([{"headers": {"id": task_id}}, "", "q"]))
        store.redis.zadd(store.keys.unacked_index, {tag: when})
    keeper.republish_lost_messages(time.time())
    assert republished.calls == [Republished(stranded, 1, 0.0)]


def test_a_cancel_notice_ends_that_running_task_if_its_record_is_cancelled(
        keeper: Housekeeper, store: TaskStore, running: RunningTasks, forwarder: FakeForwarder) -> None:
    cancelled = runs_here(running, claimed(store))
    other = runs_here(running, claimed(store))
    keeper.notice("cancel nope")  # not running here: nothing to do
    keeper.notice(f"cancel {other.job.task_id}")  # a forged notice: the record is not cancelled
    store.records.transition(cancelled.job.task_id, State.CANCELLED)  # as the client does, then announces
    keeper.notice(f"cancel {cancelled.job.task_id}")
    assert cancelled.reason == CANCELLED
    assert forwarder.killed(cancelled.job.task_id).wait(WAIT_S)
    assert [k.grace_s for k in forwarder.kills_of(cancelled.job.task_id)] == [GRACE_S]
    assert other.reason is None and not forwarder.kills_of(other.job.task_id)


def test_a_notice_about_its_host_reports_to_the_registry(keeper: Housekeeper, store: TaskStore) -> None:
    key = store.keys.host("h1")
    keeper.notice("drain h2")  # another host's
    assert store.redis.hget(key, CONSUMER + "dev") is None
    keeper.notice("drain h1")
    assert store.redis.hget(key, CONSUMER + "dev") is not None


def test_keep_leases_ends_a_run_whose_lease_was_lost_and_renews_the_others(
        keeper: Housekeeper, store: TaskStore, running: RunningTasks, forwarder: FakeForwarder) -> None:
    lost = runs_here(running, claimed(store))
    kept = runs_here(running, claimed(store, ttl_s=5))
    store.redis.set(store.keys.lease(lost.job.task_id), "h2:1|2")  # taken over elsewhere
    before = time.monotonic()
    keeper.keep_leases()
    assert lost.reason == LEASE_LOST
    assert forwarder.killed(lost.job.task_id).wait(WAIT_S)
    # At once: another consumer runs it now.
    assert [k.grace_s for k in forwarder.kills_of(lost.job.task_id)] == [0]
    assert kept.reason is None and kept.renewed_at >= before
    assert store.redis.pttl(store.keys.lease(kept.job.task_id)) > 5000  # renewed to the full TTL


def test_fence_ends_a_run_whose_lease_was_not_renewed_in_time(
        keeper: Housekeeper, store: TaskStore, running: RunningTasks, forwarder: FakeForwarder) -> None:
    now = time.monotonic()
    stale = runs_here(running, claimed(store), renewed_at=now - keeper.fence_after - 1)
    fresh = runs_here(running, claimed(store), renewed_at=now - keeper.fence_after + 5)
    keeper.fence()
    assert stale.reason == LEASE_LOST
    assert forwarder.killed(stale.job.task_id).wait(WAIT_S)
    assert [k.grace_s for k in forwarder.kills_of(stale.job.task_id)] == [keeper.fence_grace]
    assert keeper.fence_grace < GRACE_S  # it must be over before the lease can expire
    assert fresh.reason is None and not forwarder.kills_of(fresh.job.task_id)
