"""Task records in Redis (fakeredis here; the integration tests use a real server)."""

from __future__ import annotations

import json

import fakeredis
import pytest

from fleet.errors import StaleTransition, TaskNotFound
from fleet.record import ErrorKind, State, TaskError
from fleet.state.listing import Filters
from fleet.state.store import TaskStore
from fleet.worker.output import TRUNCATED, OutputRecorder


@pytest.fixture
def store() -> TaskStore:
    return TaskStore(fakeredis.FakeRedis(decode_responses=True), "ns", retention_s=100)


def test_create_is_queued_and_indexed(store: TaskStore) -> None:
    task_id, created = store.records.create("dev", {"echo": "hi"})
    assert created
    record = store.records.get(task_id)
    assert (record.state, record.agent, record.attempts) == (State.QUEUED, "dev", 0)
    assert store.records.get_with_payload(task_id)[1] == {"echo": "hi"}
    assert [r.id for r in store.listing.find(Filters(agent="dev"))] == [task_id]
    assert [r.id for r in store.listing.find(Filters(state=State.QUEUED))] == [task_id]
    assert store.listing.find(Filters(agent="boss")) == []


def test_idempotency_key_returns_the_same_task(store: TaskStore) -> None:
    first, created = store.records.create("dev", {}, key="k1")
    again, created_again = store.records.create("dev", {"other": 1}, key="k1")
    assert created and not created_again and again == first
    assert store.records.get_with_payload(first)[1] == {}
    assert len(store.listing.find(Filters(agent="dev"))) == 1


def test_transitions_move_indexes_and_record_events(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    running = store.records.transition(task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1},
                               host="h1")
    assert (running.state, running.attempts, running.host) == (State.RUNNING, 1, "h1")
    assert store.listing.find(Filters(state=State.QUEUED)) == []
    store.records.transition(task_id, State.SUCCEEDED, result={"ok": 1})
    assert store.records.get(task_id).result == {"ok": 1}
    states = [e.fields["state"] for e in store.events.of_task(task_id) if e.type == "state"]
    assert states == ["queued", "running", "succeeded"]


def test_a_final_task_never_goes_back(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    store.records.transition(task_id, State.CANCELLED)
    for state in (State.RUNNING, State.RETRYING, State.SUCCEEDED, State.QUEUED):
        with pytest.raises(StaleTransition):
            store.records.transition(task_id, state)
    assert store.records.get(task_id).state == State.CANCELLED


def test_finished_tasks_expire_after_retention(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {}, key="k")
    store.records.transition(task_id, State.FAILED, error=TaskError(kind=ErrorKind.FAILED, message="x"))
    r = store.redis
    for key in (store.keys.task(task_id), store.keys.events(task_id), store.keys.idempotency("k")):
        assert 0 < r.ttl(key) <= 100
    r.delete(store.keys.task(task_id))  # as if it expired
    assert store.listing.find(Filters(agent="dev")) == []
    assert r.zcard(store.keys.by_agent("dev")) == 0


def test_every_change_of_state_is_written_and_published_for_celery_clients(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    key = store.keys.celery_result(task_id)
    assert store.redis.get(key) is None  # queued: PENDING to Celery
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    store.records.transition(task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1})
    store.records.transition(task_id, State.SUCCEEDED, result={"n": 1}, finished_at="2026-11-30T00:00:00Z")
    messages = [pubsub.get_message(timeout=1) for _ in range(3)]  # the first: the subscription, ignored
    published = [json.loads(m["data"])["status"] for m in messages if m is not None]
    assert published == ["STARTED", "SUCCESS"]
    meta = json.loads(store.redis.get(key) or "")
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", {"n": 1}, task_id)
    assert 0 < store.redis.ttl(key) <= store.records.retention_s


def test_adopting_a_publishers_task_writes_it_once(store: TaskStore) -> None:
    record, created = store.records.adopt("job-1", "dev", {"x": 1}, created_at="2026-11-30T00:00:00Z")
    assert created and record.state == State.QUEUED
    again, created = store.records.adopt("job-1", "boss", {"y": 2})
    assert not created and again.agent == "dev"
    assert store.records.get_with_payload("job-1")[1] == {"x": 1}


def test_a_finished_or_revoked_id_is_never_adopted_again(store: TaskStore) -> None:
    record, _ = store.records.adopt("job-2", "dev", {})
    assert record is not None
    store.records.transition("job-2", State.CANCELLED, finished_at="2026-11-30T00:00:00Z")
    store.redis.delete(store.keys.task("job-2"))  # whoever may delete records
    assert store.records.adopt("job-2", "dev", {"forged": 1}) == (None, False)
    assert store.records.forbid("job-3")  # revoked before any consumer wrote its record
    assert store.records.adopt("job-3", "dev", {}) == (None, False)
    store.records.adopt("job-4", "dev", {})
    assert not store.records.forbid("job-4")  # it has a record: cancel it instead


def test_unknown_task(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound, match="no task 'nope'"):
        store.records.get("nope")


def test_output_is_recorded_in_order_and_capped(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    out = OutputRecorder(store.events, task_id, 0, limit=20)
    out.write("stdout", b"hello ")
    out.write("stdout", "w\u00f6rld\n".encode()[:3])  # a multi-byte char split across chunks
    out.write("stdout", "w\u00f6rld\n".encode()[3:])
    out.write("stderr", b"x" * 50)
    out.close()
    text = "".join(e.fields["data"] for e in store.events.output(task_id))
    assert text.startswith("hello w\u00f6rld\n")
    assert text.endswith(TRUNCATED)
    assert out.last_line("stdout") == "hello w\u00f6rld"


def test_last_line_spans_chunks(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    out = OutputRecorder(store.events, task_id, 0, limit=1000)
    for chunk in (b"progress\n{\"res", b"ult\": ", b"42}\n"):
        out.write("stdout", chunk)
    out.close()
    assert out.last_line("stdout") == '{"result": 42}'


def test_tokens_are_masked_before_they_are_stored(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    out = OutputRecorder(store.events, task_id, 0, limit=10_000, secrets=[b"hunter22"])
    out.write("stdout", b"my token is hun")
    out.write("stdout", b'ter22\n{"token": "hunter22"}')
    out.close()
    text = "".join(e.fields["data"] for e in store.events.output(task_id))
    assert "hunter22" not in text and text.count("[masked]") == 2
    assert out.last_line("stdout") == '{"token": "[masked]"}'


def test_output_waits_while_redis_is_away(store: TaskStore) -> None:
    from fleet.errors import StateStoreError

    task_id, _ = store.records.create("dev", {})
    out = OutputRecorder(store.events, task_id, 0, limit=1000)
    real = store.events.append_output
    calls = {"n": 0}

    def flaky(*args: str) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise StateStoreError("Redis: connection refused")
        real(*args)

    store.events.append_output = flaky  # type: ignore[method-assign]
    out.write("stdout", b"first\n")  # refused: kept
    out.write("stdout", b"second\n")  # refused again: both kept, in order
    out.write("stdout", b"third\n")  # Redis is back: all three stored
    out.close()
    assert "".join(e.fields["data"] for e in store.events.output(task_id)) == "first\nsecond\nthird\n"


def test_output_and_events_of_a_superseded_attempt_are_refused(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    first = store.leases.claim(store.records.get(task_id), 1, "a", 10_000)
    store.events.append_output(task_id, first.attempts, "stdout", "mine\n")
    store.redis.delete(store.keys.lease(task_id))  # the lease expired: the attempt was lost
    assert store.leases.reclaim(task_id) is not None
    with pytest.raises(StaleTransition, match="is retrying"):  # lost: nothing more from it
        store.events.append_output(task_id, 1, "stdout", "late\n")
    store.leases.claim(store.records.get(task_id), 2, "b", 10_000)
    with pytest.raises(StaleTransition, match="on attempt 2"):
        store.events.add(task_id, "attempt_ended", epoch=1, reason="lease-lost")
    store.events.append_output(task_id, 2, "stdout", "theirs\n")
    assert [e.fields["data"] for e in store.events.output(task_id)] == ["mine\n", "theirs\n"]
    assert not any(e.type == "attempt_ended" for e in store.events.of_task(task_id))


def test_recorder_drops_output_once_refused(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    store.leases.claim(store.records.get(task_id), 1, "a", 10_000)
    out = OutputRecorder(store.events, task_id, 1, limit=1000)
    out.write("stdout", b"one\n")
    store.records.transition(task_id, State.RETRYING, epoch=1)
    store.leases.claim(store.records.get(task_id), 2, "b", 10_000)
    out.write("stdout", b"two\n")
    out.close()
    out.flush()  # nothing waits: refused output is dropped, not kept for later
    assert out.refused
    assert [e.fields["data"] for e in store.events.output(task_id)] == ["one\n"]


def test_a_transition_from_a_stale_read_is_checked_again_not_applied(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    stale = store.records.get(task_id)
    assert stale.revision == 0
    store.records.transition(task_id, State.CANCELLED)  # someone else moves it meanwhile
    with pytest.raises(StaleTransition, match="is cancelled, cannot become running"):
        store.records.transition(task_id, State.RUNNING, current=stale)
    record = store.records.get(task_id)
    assert (record.state, record.revision) == (State.CANCELLED, 1)
    assert "revision" not in record.model_dump()  # not part of the contract's record


def test_a_transition_from_the_current_read_applies_at_once(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    current = store.records.get(task_id)
    moved = store.records.transition(task_id, State.RUNNING, current=current,
                                     update=lambda r: {"attempts": 1})
    assert (moved.state, moved.attempts, moved.revision) == (State.RUNNING, 1, 1)
    assert store.records.get(task_id) == moved


def test_an_attempts_outcome_is_refused_once_it_was_declared_lost(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {})
    running = store.leases.claim(store.records.get(task_id), 1, "a", 10_000)
    store.redis.delete(store.keys.lease(task_id))
    assert store.leases.reclaim(task_id) is not None  # lost: retrying, same attempt number
    with pytest.raises(StaleTransition, match="is retrying, no longer running"):
        store.records.transition(task_id, State.FAILED, epoch=1, current=running, require=State.RUNNING)
    assert store.records.get(task_id).state == State.RETRYING


def test_only_one_consumer_takes_the_turn_to_republish(store: TaskStore) -> None:
    assert store.records.take_republish_turn("t1", hold_s=60)
    assert not store.records.take_republish_turn("t1", hold_s=60)
    assert store.records.take_republish_turn("t2", hold_s=60)


def test_a_reopened_task_keeps_its_idempotency_key(store: TaskStore) -> None:
    task_id, _ = store.records.create("dev", {}, key="deploy-1")
    store.records.transition(task_id, State.CANCELLED, finished_at="2026-11-30T00:00:00Z")
    assert store.redis.ttl(store.keys.idempotency("deploy-1")) > 0
    store.records.reopen(task_id)
    assert store.redis.ttl(store.keys.idempotency("deploy-1")) == -1
    assert store.redis.ttl(store.keys.task(task_id)) == -1 and not store.records.finished_before(task_id)
