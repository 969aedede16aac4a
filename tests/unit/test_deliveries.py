"""on_done deliveries over fakeredis (fleet/state/deliveries.py and the
deliverer's decisions in fleet/worker/on_done.py), the HMAC signature a
receiver checks, and the hooks' settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fakeredis
import pytest

from fleet.errors import UsageError
from fleet.on_done_config import OnDoneHook, signature, verify
from fleet.record import State
from fleet.settings import FleetSettings
from fleet.state.deliveries import Delivery
from fleet.state.store import TaskStore
from fleet.worker.on_done import Deliverer, hook_secrets, hooks_of


def make(tmp_path: Path, give_up_after_s: float = 60, **agent: object) -> tuple[TaskStore, Deliverer]:
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef-secret\n")
    settings = FleetSettings.model_validate({
        "namespace": "t", "host_id": "h1",
        "on_done": {"web": {"url": "http://127.0.0.1:9/x", "secret_file": str(secret),
                            "give_up_after_s": give_up_after_s, "timeout_s": 1},
                    "cmd": {"command": ["false"]}},
        "agents": {"dev": {"on_done": ["web"], **agent}}})
    store = TaskStore(fakeredis.FakeRedis(decode_responses=True), "t", 3600)
    deliverer = Deliverer(settings, store, "h1")
    deliverer.deliveries.join()
    return store, deliverer


def finish(store: TaskStore, agent: str = "dev", on_done: list[str] | None = None) -> str:
    task_id, _ = store.records.create(agent, {}, on_done=on_done)
    store.records.transition(task_id, State.FAILED, finished_at="2026-11-30T00:00:00+00:00")
    return task_id


def test_an_end_becomes_one_delivery_per_hook_and_is_acknowledged(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    task_id = finish(store, on_done=["cmd", "web"])
    changes = deliverer.deliveries.changes("h1", 1)
    assert [(c.task, c.state) for c in changes] == [(task_id, "queued"), (task_id, "failed")]
    for change in changes:
        deliverer.schedule(change)
    taken = deliverer.deliveries.take_due(time.time(), 30, 10)
    assert sorted((d.task, d.hook, d.tries) for d in taken) == [(task_id, "cmd", 0), (task_id, "web", 0)]
    assert deliverer.deliveries.take_due(time.time(), 30, 10) == []  # held while tried
    assert store.redis.xpending(store.keys.changes, "on-done")["pending"] == 0
    # Scheduling the same change again (a deliverer that died before its ack) adds nothing.
    deliverer.schedule(changes[1])
    assert store.redis.zcard(store.keys.on_done_due) == 2


def test_a_failed_try_is_recorded_and_due_again_later_then_given_up(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path, give_up_after_s=0.5)
    task_id = finish(store)
    for change in deliverer.deliveries.changes("h1", 1):
        deliverer.schedule(change)
    [delivery] = deliverer.deliveries.take_due(time.time(), 30, 10)
    deliverer.deliver(delivery)  # nothing listens on port 9
    [failed] = [e for e in store.events.of_task(task_id) if e.type == "on_done"]
    assert failed.fields["outcome"] == "failed" and failed.fields["error"].startswith("unreachable")
    due_at = deliverer.deliveries.next_due()
    assert due_at is not None and due_at > time.time() + 0.5  # backoff_s 1, jittered down to 0.8
    [again] = deliverer.deliveries.take_due(due_at, 30, 10)
    assert again.tries == 1 and again.id == delivery.id
    deliverer.deliver(Delivery(again.change, again.task, again.hook, again.tries, again.since - 1))
    outcomes = [e.fields["outcome"] for e in store.events.of_task(task_id) if e.type == "on_done"]
    assert outcomes == ["failed", "abandoned"]
    assert deliverer.deliveries.next_due() is None


def test_a_change_its_record_does_not_show_is_not_delivered(tmp_path: Path) -> None:
    """Whoever may write the changes stream (a submitter) cannot make a
    hook hear of an end that did not happen."""
    store, deliverer = make(tmp_path)
    task_id, _ = store.records.create("dev", {})
    store.redis.xadd(store.keys.changes, {"task": task_id, "agent": "dev", "state": "succeeded"})
    for change in deliverer.deliveries.changes("h1", 1):
        deliverer.schedule(change)
    assert deliverer.deliveries.next_due() is None


def test_the_hooks_of_a_task_are_its_agents_then_its_own_known_ones(tmp_path: Path) -> None:
    store, deliverer = make(tmp_path)
    task_id = finish(store, on_done=["cmd", "web", "gone"])
    assert hooks_of(deliverer.settings, store.records.get(task_id)) == ["web", "cmd"]


def test_a_delivery_id_that_is_not_fleets_is_left_out() -> None:
    assert Delivery.parse("1-0|task|web", "2 10.5") == Delivery("1-0", "task", "web", 2, 10.5)
    assert Delivery.parse("no-bars", "0 0") is None
    assert Delivery.parse("1-0|t|web", "x y") is None


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


def test_the_body_is_the_final_record_without_its_payload(tmp_path: Path) -> None:
    from fleet.worker.on_done import body_of

    store, _ = make(tmp_path)
    task_id = finish(store)
    body = json.loads(body_of(Delivery("1-0", task_id, "web", 0, 0), store.records.get(task_id)))
    assert body["delivery"] == f"1-0|{task_id}|web" and body["task"]["state"] == "failed"
    assert "payload" not in body["task"]
