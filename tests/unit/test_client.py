"""FleetClient (fleet/client.py) over fakeredis: what submit refuses and
writes, idempotency, a failed publish, cancel and its control notice, and
wait. Publishing itself is replaced by a recorder (see test_broker_queues.py
for kombu's layout)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import kombu.exceptions
import pytest

import fleet.broker.publish
from fleet.client import FleetClient
from fleet.errors import StateStoreError, UnknownAgent, UsageError, WaitTimeout
from fleet.record import ErrorKind, State, TaskRecord
from fleet.settings import AgentSpec, FleetSettings

WAIT_S = 5.0  # a bound for what happens at once; only a broken behaviour waits it out


@dataclass
class Published:
    task_id: str
    agent: str
    host: str | None


class Publisher:
    """Stands in for fleet.broker.publish.publish: records, or fails with `error`."""

    def __init__(self) -> None:
        self.calls: list[Published] = []
        self.error: Exception | None = None

    def __call__(self, app: Any, settings: FleetSettings, task_id: str, agent: str,
                 attempt: int = 1, countdown: float | None = None, host: str | None = None,
                 priority: int = 3) -> None:
        if self.error is not None:
            raise self.error
        self.calls.append(Published(task_id, agent, host))


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Publisher:
    recorder = Publisher()
    # submit imports it when it first publishes: replace the module's attribute.
    monkeypatch.setattr(fleet.broker.publish, "publish", recorder)
    return recorder


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis: fakeredis.FakeRedis,
           published: Publisher) -> FleetClient:
    for name in list(__import__("os").environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "absent.toml"))
    settings = FleetSettings(agents={"dev": AgentSpec()}, namespace="ns", payload_limit=100)
    return FleetClient(settings, redis_client=redis)


@pytest.mark.parametrize(("agent", "payload", "error", "message"), [
    ("nope", {}, UnknownAgent, "unknown agent 'nope'"),
    ("dev", ["not", "a", "dict"], UsageError, "payload must be a JSON object, not list"),
    ("dev", {"big": "x" * 100}, UsageError, "over payload_limit=100"),
])
def test_submit_refuses_bad_input_and_writes_nothing(
        client: FleetClient, redis: fakeredis.FakeRedis, published: Publisher,
        agent: str, payload: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        client.submit(agent, payload)
    assert redis.keys("*") == []
    assert published.calls == []


def test_submit_writes_a_queued_record_and_publishes_it(client: FleetClient,
                                                        published: Publisher) -> None:
    task_id = client.submit("dev", {"echo": "hi"})
    record = client.status(task_id)
    assert (record.state, record.agent) == (State.QUEUED, "dev")
    assert client.store.records.get_with_payload(task_id)[1] == {"echo": "hi"}
    assert published.calls == [Published(task_id, "dev", None)]


def test_an_idempotency_key_returns_the_same_task_and_publishes_once(
        client: FleetClient, published: Publisher) -> None:
    first = client.submit("dev", {"n": 1}, key="k1")
    again = client.submit("dev", {"n": 2}, key="k1")
    other = client.submit("dev", {"n": 3}, key="k2")
    assert again == first != other
    assert [p.task_id for p in published.calls] == [first, other]
    assert client.store.records.get_with_payload(first)[1] == {"n": 1}


@pytest.mark.parametrize("failure", [OSError("connection refused"),
                                     kombu.exceptions.OperationalError("broker away")])
def test_a_failed_publish_fails_the_task_as_lost(client: FleetClient, published: Publisher,
                                                 failure: Exception) -> None:
    published.error = failure
    with pytest.raises(StateStoreError, match="could not publish task"):
        client.submit("dev", {})
    [record] = client.tasks(agent="dev")
    assert record.state == State.FAILED
    assert record.error is not None and record.error.kind == ErrorKind.LOST
    assert str(failure) in record.error.message
    assert record.finished_at is not None


def test_cancel_of_a_queued_task_cancels_it_and_sends_a_notice(
        client: FleetClient, redis: fakeredis.FakeRedis) -> None:
    task_id = client.submit("dev", {})
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(client.store.keys.control)
    cancelled = client.cancel(task_id)
    assert cancelled.state == State.CANCELLED
    assert cancelled.error is not None and cancelled.error.kind == ErrorKind.CANCELLED
    assert client.status(task_id).state == State.CANCELLED
    deadline = time.monotonic() + WAIT_S
    message = None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
    assert message is not None and message["data"] == f"cancel {task_id}"
    pubsub.close()


def test_cancel_of_a_finished_task_changes_nothing(client: FleetClient) -> None:
    task_id = client.submit("dev", {})
    client.store.records.transition(task_id, State.RUNNING)
    client.store.records.transition(task_id, State.SUCCEEDED, result={"ok": True})
    assert client.cancel(task_id).state == State.SUCCEEDED


def test_wait_returns_once_another_thread_finishes_the_task(
        client: FleetClient, monkeypatch: pytest.MonkeyPatch) -> None:
    task_id = client.submit("dev", {})
    records = client.store.records
    looked = threading.Event()
    many = records.many

    def many_and_tell(task_ids: list[str]) -> list[TaskRecord]:
        found = many(task_ids)
        looked.set()
        return found

    monkeypatch.setattr(records, "many", many_and_tell)

    def finish() -> None:
        looked.wait(WAIT_S)  # wait() has read the record (still queued): it now follows the stream
        records.transition(task_id, State.RUNNING)
        records.transition(task_id, State.SUCCEEDED, result={"answer": 42})

    threading.Thread(target=finish, daemon=True).start()
    record = client.wait(task_id, timeout=WAIT_S)
    assert (record.state, record.result) == (State.SUCCEEDED, {"answer": 42})


def test_wait_times_out_on_a_task_that_does_not_finish(client: FleetClient) -> None:
    task_id = client.submit("dev", {})
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=f"task {task_id} is not final after 0.2 s"):
        client.wait(task_id, timeout=0.2)
    assert time.monotonic() - started < WAIT_S


def test_wait_on_a_final_task_returns_at_once(client: FleetClient) -> None:
    task_id = client.submit("dev", {})
    client.cancel(task_id)
    assert client.wait(task_id, timeout=0.01).state == State.CANCELLED


def finish(client: FleetClient, task_id: str, state: State = State.SUCCEEDED) -> None:
    client.store.records.transition(task_id, State.RUNNING)
    client.store.records.transition(task_id, state, result={"id": task_id})


def test_as_completed_yields_each_task_as_it_ends_and_wait_many_keeps_the_order(client: FleetClient) -> None:
    ids = [client.submit("dev", {"n": n}) for n in range(4)]
    finish(client, ids[3])  # final before anyone waits: yielded first
    order = [ids[1], ids[0], ids[2]]
    started = threading.Event()

    def finish_in_order() -> None:
        started.wait(WAIT_S)
        for task_id in order:
            finish(client, task_id, State.FAILED if task_id == ids[0] else State.SUCCEEDED)

    threading.Thread(target=finish_in_order, daemon=True).start()
    seen = []
    for record in client.as_completed(ids, timeout=WAIT_S):
        seen.append(record.id)
        started.set()
    assert seen == [ids[3], *order]
    assert [r.id for r in client.wait_many(reversed(ids), timeout=WAIT_S)] == list(reversed(ids))


def test_as_completed_times_out_naming_what_is_not_final(client: FleetClient) -> None:
    done, *waiting = [client.submit("dev", {}) for _ in range(5)]
    finish(client, done)
    records = client.as_completed([done, *waiting], timeout=0.3)
    assert next(records).id == done
    with pytest.raises(WaitTimeout, match=f"{waiting[0]}.* and 1 more is not final after 0.3 s"):
        next(records)


def test_a_task_with_an_eta_or_a_countdown_is_scheduled_and_not_published(
        client: FleetClient, published: Publisher) -> None:
    from datetime import UTC, datetime, timedelta

    later = client.submit("dev", {}, countdown=600)
    record = client.status(later)
    assert record.state == State.SCHEDULED and record.run_at is not None
    assert 590 < datetime.fromisoformat(record.run_at).timestamp() - time.time() <= 600
    at = client.submit("dev", {}, eta=datetime.now(UTC) + timedelta(hours=1))
    assert client.status(at).state == State.SCHEDULED
    assert client.store.redis.zcard(client.store.keys.schedule("dev")) == 2
    assert published.calls == []
    now = client.submit("dev", {}, eta=datetime.now(UTC) - timedelta(seconds=1))  # its time has come
    assert client.status(now).state == State.QUEUED and [p.task_id for p in published.calls] == [now]
    for bad, why in (({"eta": datetime.now()}, "no time zone"), ({"countdown": -1}, "not be negative"),
                     ({"eta": datetime.now(UTC), "countdown": 1}, "not both")):
        with pytest.raises(UsageError, match=why):
            client.submit("dev", {}, **bad)  # type: ignore[arg-type]
    assert client.cancel(later).state == State.CANCELLED


def test_a_priority_is_a_name_or_0_to_9_and_kept_in_the_record(client: FleetClient) -> None:
    assert client.status(client.submit("dev", {})).priority == 3  # normal
    assert client.status(client.submit("dev", {}, priority="high")).priority == 0
    assert client.status(client.submit("dev", {}, priority="7")).priority == 7
    for bad in ("urgent", 10, "-1"):
        with pytest.raises(UsageError, match="is not high, normal, low or 0-9"):
            client.submit("dev", {}, priority=bad)


def test_found_in_review_a_forged_state_event_ends_no_wait_and_schedules_are_bounded(
        client: FleetClient) -> None:
    task_id = client.submit("dev", {})
    client.store.redis.xadd(client.store.keys.events(task_id), {"type": "state", "state": "bogus"})
    with pytest.raises(WaitTimeout):  # not ValueError: it looked at the record, still queued
        client.wait(task_id, timeout=0.5)
    with pytest.raises(UsageError, match="at most 366 days ahead"):
        client.submit("dev", {}, countdown=400 * 86400)


def test_found_in_review_a_long_running_task_is_found_by_agent_and_state(client: FleetClient) -> None:
    records = client.store.records
    task_id = client.submit("dev", {})
    records.transition(task_id, State.RUNNING)
    client.store.redis.zrem(client.store.keys.by_agent("dev"), task_id)  # trimmed by age meanwhile
    assert [r.id for r in client.tasks(agent="dev", state="running")] == [task_id]
