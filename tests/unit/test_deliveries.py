"""on_done deliveries over fakeredis (fleet/state/deliveries.py, scheduled by
the final transition in fleet/state/records.py, tried by the deliverer in
fleet/worker/on_done.py), the HMAC signature a receiver checks, and the
hooks' settings. Several cases come from a hostile review: what a writer of
records or of the changes stream can and cannot make a hook hear."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from fleet.errors import UsageError
from fleet.on_done_config import OnDoneHook, signature, verify
from fleet.record import State
from fleet.settings import FleetSettings
from fleet.state.deliveries import Delivery
from fleet.state.store import TaskStore
from fleet.worker.on_done import Deliverer, backoff, body_of, hook_secrets

DONE = "2026-11-30T00:00:00+00:00"


def make(tmp_path: Path, url: str = "http://127.0.0.1:9/x", give_up_after_s: float = 60,
         deliverer_hooks: list[str] | None = None) -> tuple[TaskStore, Deliverer]:
    """A store whose final transitions schedule deliveries, and a deliverer
    (with only `deliverer_hooks` of the hooks configured, if given)."""
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-secret\n")
    hooks = {"web": {"url": url, "secret_file": str(secret), "give_up_after_s": give_up_after_s,
                     "timeout_s": 2},
             "cmd": {"command": ["false"]}}
    settings = FleetSettings.model_validate({"namespace": "t", "host_id": "h1", "on_done": hooks,
                                             "agents": {"dev": {"on_done": ["web"]}, "boss": {}}})
    server = fakeredis.FakeServer()
    store = TaskStore(fakeredis.FakeRedis(server=server, decode_responses=True), "t", 3600,
                      settings.on_done_hooks)
    theirs = settings.model_copy(update={"on_done": {k: v for k, v in settings.on_done.items()
                                                     if k in (deliverer_hooks or hooks)}})
    deliverer = Deliverer(theirs, TaskStore(fakeredis.FakeRedis(server=server, decode_responses=True),
                                            "t", 3600))
    return store, deliverer


def finish(store: TaskStore, agent: str = "dev", on_done: list[str] | None = None,
           state: State = State.FAILED) -> str:
    task_id, _ = store.records.create(agent, {}, on_done=on_done)
    store.records.transition(task_id, state, finished_at=DONE)
    return task_id


def due(deliverer: Deliverer) -> list[Delivery]:
    return deliverer.deliveries.take_due(time.time(), 30, 100)


def on_done_events(store: TaskStore, task_id: str) -> list[dict[str, str]]:
    return [e.fields for e in store.events.of_task(task_id) if e.type == "on_done"]


def test_a_final_transition_schedules_one_delivery_per_hook_with_the_record_as_it_ended(
        tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    task_id = finish(store, on_done=["cmd", "web", "gone"])  # agent's, then its own; unknown left out
    store.redis.hset(store.keys.task(task_id), "result", json.dumps({"forged": True}))  # rewritten later
    taken = due(deliverer)
    revision = store.records.get(task_id).revision
    assert sorted((d.task, d.revision, d.hook) for d in taken) == [(task_id, revision, "cmd"),
                                                                    (task_id, revision, "web")]
    assert all(d.record["state"] == "failed" and d.record["result"] is None for d in taken)
    assert due(deliverer) == []  # held while tried
    body = json.loads(body_of(taken[0]))
    assert body["delivery"] == f"{task_id}|{revision}|{taken[0].hook}" and "payload" not in body["task"]
    # A task without hooks, and a transition that is not an end, schedule nothing.
    finish(store, agent="boss")
    store.records.create("dev", {})
    assert store.redis.zcard(store.keys.on_done_due) == 2


def test_what_a_writer_of_records_or_changes_says_is_not_delivered(tmp_path: Path) -> None:
    """Found in review: a submitter could have a forged record POSTed, signed,
    by announcing an end on the changes stream, as often as it liked."""
    store, deliverer = make(tmp_path)
    task_id, _ = store.records.create("dev", {})
    store.redis.hset(store.keys.task(task_id), "state", '"succeeded"')
    for _ in range(50):
        store.redis.xadd(store.keys.changes, {"task": task_id, "agent": "dev", "state": "succeeded"})
    assert due(deliverer) == []


def test_keys_a_submitter_may_forge_do_not_stop_an_end_half_way(tmp_path: Path) -> None:
    """Found in review: an events stream or the changes stream forged to
    another type made the final transition's Lua call stop after the
    record's write — no finished mark, no lease end, no delivery."""
    store, deliverer = make(tmp_path)
    task_id, _ = store.records.create("dev", {})
    store.redis.delete(store.keys.events(task_id))
    store.redis.set(store.keys.events(task_id), "forged")
    store.redis.delete(store.keys.changes)
    store.redis.set(store.keys.changes, "forged")
    store.records.transition(task_id, State.FAILED, finished_at=DONE)
    assert store.records.finished_before(task_id)
    assert [d.task for d in due(deliverer)] == [task_id]
    assert store.records.create("dev", {})[1]  # and new tasks are still written


def test_two_ends_of_one_task_are_two_deliveries(tmp_path: Path) -> None:
    """Found in review: a task retried and cancelled before it ran again
    ended twice under one attempt number, and one id."""
    store, deliverer = make(tmp_path)
    task_id = finish(store)
    store.records.reopen(task_id)
    store.records.transition(task_id, State.CANCELLED, finished_at=DONE)
    taken = due(deliverer)
    assert sorted(d.record["state"] for d in taken) == ["cancelled", "failed"]
    assert len({d.id for d in taken}) == 2


def test_a_snapshot_is_bounded_and_a_record_names_few_hooks(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    task_id, _ = store.records.create("dev", {})
    store.records.transition(task_id, State.FAILED, finished_at=DONE, result={"big": "x" * 400_000})
    [delivery] = due(deliverer)
    assert delivery.record["result"] is None and "over 262144 bytes" in delivery.record["result_omitted"]
    with pytest.raises(ValueError):
        store.records.create("dev", {}, on_done=[f"h{n}" for n in range(17)])


def test_a_delivery_fleet_did_not_write_is_dropped_not_retaken_forever(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    store.redis.zadd(store.keys.on_done_due, {"a|b|c|d": 0, "x|1|web": 0})
    store.redis.hset(store.keys.on_done_deliveries, "x|1|web", "not json")
    assert due(deliverer) == []
    assert store.redis.zcard(store.keys.on_done_due) == 0


def test_a_failed_try_is_recorded_and_due_again_later_then_given_up(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path, give_up_after_s=0.5)
    task_id = finish(store)
    [delivery] = due(deliverer)
    deliverer.deliver(delivery)  # nothing listens on port 9
    [failed] = on_done_events(store, task_id)
    assert failed["outcome"] == "failed" and failed["error"].startswith("unreachable")
    due_at = deliverer.deliveries.next_due()
    assert due_at is not None and due_at > time.time() + 0.5  # backoff_s 1, jittered down to 0.8
    [again] = deliverer.deliveries.take_due(due_at, 30, 10)
    assert again.tries == 1 and again.id == delivery.id
    time.sleep(0.5)  # give_up_after_s itself
    deliverer.deliver(again)
    assert [e["outcome"] for e in on_done_events(store, task_id)] == ["failed", "abandoned"]
    assert deliverer.deliveries.next_due() is None
    assert store.redis.hlen(store.keys.on_done_deliveries) == 0


def test_a_try_that_outlasted_its_lease_does_not_bring_back_a_finished_delivery(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    finish(store)
    [delivery] = due(deliverer)
    deliverer.deliveries.done(delivery)  # another deliverer took it after the lease and delivered it
    deliverer.deliveries.later(delivery, time.time())
    assert store.redis.zcard(store.keys.on_done_due) == 0
    assert store.redis.hlen(store.keys.on_done_deliveries) == 0


def test_a_hook_this_host_lacks_is_left_for_a_host_that_has_it(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path, deliverer_hooks=["cmd"])
    task_id = finish(store)
    [delivery] = due(deliverer)
    deliverer.deliver(delivery)
    [failed] = on_done_events(store, task_id)
    assert failed["error"] == "hook 'web' is not configured on host h1" and failed["retry_in_s"] == "60.0"
    assert store.redis.zcard(store.keys.on_done_due) == 1


@pytest.fixture
def not_http() -> Iterator[str]:
    """A server that answers a request with a line that is not HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-nonsense\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/x"
    listener.close()


def test_an_answer_that_is_not_http_is_a_failed_try(tmp_path: Path, not_http: str) -> None:
    store, deliverer = make(tmp_path, url=not_http)
    task_id = finish(store)
    [delivery] = due(deliverer)
    deliverer.deliver(delivery)
    [failed] = on_done_events(store, task_id)
    assert failed["outcome"] == "failed" and "BadStatusLine" in failed["error"]


def test_the_backoff_doubles_to_its_cap_and_never_overflows() -> None:
    hook = OnDoneHook.model_validate({"command": ["x"], "backoff_s": 1, "backoff_max_s": 60})
    assert [backoff(hook, tries, 1.0) for tries in (1, 2, 3, 7, 2000)] == [1, 2, 4, 60, 60]


def test_a_signature_verifies_only_for_its_key_body_and_time() -> None:
    key, body, now = b"k" * 16, b'{"a": 1}', time.time()
    signed = signature(key, str(int(now)), body)
    assert verify(key, str(int(now)), body, signed, now)
    assert not verify(b"x" * 16, str(int(now)), body, signed, now)
    assert not verify(key, str(int(now)), body + b" ", signed, now)
    assert not verify(key, str(int(now) - 600), body, signature(key, str(int(now) - 600), body), now)
    assert not verify(key, "soon", body, signed, now)


@pytest.mark.parametrize(("hook", "problem"), [
    ({"url": "http://h/x"}, "a url hook needs secret_file"),
    ({}, "give a hook either url or command"),
    ({"url": "http://h/x", "command": ["x"], "secret_file": "/s"}, "give a hook either url or command"),
    ({"command": ["x"], "secret_file": "/s"}, "secret_file is for url hooks"),
    ({"url": "ftp://h/x", "secret_file": "/s"}, "String should match pattern"),
    ({"url": "http://h:abc/x", "secret_file": "/s"}, "has a port that is not a number"),
    ({"url": "http://:80/x", "secret_file": "/s"}, "names no host"),
])
def test_a_bad_hook_is_refused(hook: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        OnDoneHook.model_validate(hook)


def test_an_agent_naming_an_unknown_hook_and_a_missing_secret_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"agents\.dev\.on_done: no hook 'web' in on_done"):
        FleetSettings.model_validate({"agents": {"dev": {"on_done": ["web"]}}})
    settings = FleetSettings.model_validate({"on_done": {"web": {
        "url": "http://h/x", "secret_file": str(tmp_path / "missing")}}})
    with pytest.raises(UsageError, match=r"on_done: secret_file .*missing.*: No such file"):
        hook_secrets(settings)
    (tmp_path / "short").write_text("short")
    settings = FleetSettings.model_validate({"on_done": {"web": {
        "url": "http://h/x", "secret_file": str(tmp_path / "short")}}})
    with pytest.raises(UsageError, match="holds under 16 bytes"):
        hook_secrets(settings)
