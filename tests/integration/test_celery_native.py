"""fleet as Celery's own tools see it, on a real Redis and engine: `celery -A
fleet.app` (inspect, status, purge, revoke), Flower itself reading the
events, a publisher that imports nothing of fleet (tests/plain), a raw
message from the shell, and malformed messages recorded, not dropped."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from support import Fleet, MakeFleet, free_port, wait_for_state

from fleet.record import ErrorKind, State

CELERY = str(Path(sys.executable).with_name("celery"))
REPO = Path(__file__).resolve().parents[2]
ORCHESTRATOR = REPO / "tests" / "plain" / "orchestrator.py"
RAW_PUBLISHER = REPO / "docs" / "examples" / "publish-with-redis-cli.sh"
FLOWER_AUTH = ("ops", "flower-test-password")
AGENTS = ("boss", "dev", "reviewer")


def celery(fleet: Fleet, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CELERY, "-A", "fleet.app", *args], env=fleet.env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def serving(make_fleet: MakeFleet, agents: dict[str, dict[str, Any]], **top: Any) -> Fleet:
    """A fleet whose worker's consumers are all ready."""
    fleet = make_fleet(agents, **top)
    fleet.start_worker().wait_for_line(" ready.", count=len(agents))
    return fleet


def plain_app(fleet: Fleet) -> tuple[Celery, dict[str, Any]]:
    """A Celery app configured only from `fleet publisher-config --json`."""
    done = fleet.cli("publisher-config", "--json")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    app = Celery("plain", set_as_current=False)
    app.conf.update({key: value for key, value in config.items() if key not in ("task", "queues")})
    return app, config


def raw_push(client: Any, config: dict[str, Any], agent: str, body: Any, task_id: str,
             task: str = "fleet.run", **headers: Any) -> None:
    """A message put on the agent's queue as any publisher could, kombu's envelope built by hand."""
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0,
                    "timelimit": [None, None], **headers},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": config["queues"][agent]},
                       "body_encoding": "base64", "delivery_tag": uuid.uuid4().hex}}
    prefix = config["broker_transport_options"]["global_keyprefix"]
    client.lpush(f"{prefix}{config['queues'][agent]}", json.dumps(envelope))


class Flower:
    """Flower, started by the test against the fleet's Redis, read through its HTTP API."""

    def __init__(self, fleet: Fleet) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [CELERY, "-A", "fleet.app", "flower", "--address=127.0.0.1", f"--port={self.port}",
             f"--basic-auth={':'.join(FLOWER_AUTH)}"],
            env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        seen = []
        for line in self.process.stdout:  # it says when it listens
            seen.append(line)
            if "Visit me at" in line:
                break
        else:
            raise AssertionError("flower did not start:\n" + "".join(seen))

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={
            "Authorization": "Basic " + base64.b64encode(":".join(FLOWER_AUTH).encode()).decode()})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def until(self, path: str, check: Any, timeout: float = 30) -> Any:
        """Flower's answer once `check` holds of it (Flower learns from events, as they come)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.api(path)
            if check(answer) or time.monotonic() > deadline:
                return answer
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def flower_of() -> Iterator[Any]:
    started: list[Flower] = []

    def start(fleet: Fleet) -> Flower:
        started.append(Flower(fleet))
        return started[-1]

    yield start
    for flower in started:
        flower.stop()


def test_celery_tools_flower_and_a_plain_orchestrator_see_what_fleet_recorded(
        make_fleet: MakeFleet, flower_of: Any) -> None:
    fleet = serving(make_fleet, {
        "boss": {"transient_retries": 2, "transient_backoff_s": 0.1},
        "dev": {"transient_retries": 1, "transient_backoff_s": 300, "transient_backoff_max_s": 300},
        "reviewer": {}})
    ping = celery(fleet, "inspect", "ping", "--timeout", "10")
    assert ping.returncode == 0, ping.stderr
    for agent in AGENTS:
        assert f"{agent}@testhost: OK" in ping.stdout
    assert "3 nodes online" in celery(fleet, "status").stdout
    flower = flower_of(fleet)
    # Online by their heartbeats; seen, Flower is receiving the events.
    workers = flower.until("/api/workers?status=true", lambda seen: len(seen) == 3 and all(seen.values()))
    assert workers == {f"{agent}@testhost": True for agent in AGENTS}

    client = fleet.client()
    tasks = {"succeeded": client.submit("boss", {"echo": "hi"}),
             "failed": client.submit("boss", {"exit": 1}),
             "retried then succeeded": client.submit("boss", {"exit": 75, "fail_until_attempt": 2}),
             "waiting to retry": client.submit("dev", {"exit": 75}),
             "cancelled while running": client.submit("reviewer", {"sleep": 60})}
    wait_for_state(client, tasks["cancelled while running"], "running")
    client.cancel(tasks["cancelled while running"])
    for name in ("succeeded", "failed", "retried then succeeded"):
        client.wait(tasks[name], 60)
    wait_for_state(client, tasks["waiting to retry"], "retrying")

    # A task waiting to retry is RETRY, then RECEIVED with its `eta` once a
    # consumer holds its next attempt's message: as with Celery's own retries.
    expected = {"succeeded": "SUCCESS", "failed": "FAILURE", "retried then succeeded": "SUCCESS",
                "waiting to retry": "RECEIVED", "cancelled while running": "REVOKED"}
    shown = flower.until("/api/tasks", lambda seen: all(
        seen.get(tasks[name], {}).get("state") == state for name, state in expected.items()))
    assert {name: shown.get(tasks[name], {}).get("state") for name in expected} == expected, (
        shown, {name: client.status(task_id) for name, task_id in tasks.items()})
    assert shown[tasks["failed"]]["exception"] == "TaskFailed('failed: exited with 1')"
    retry = shown[tasks["waiting to retry"]]
    assert retry["retried"] and retry["eta"] and retry["retries"] == 1
    assert "transient: transient failure (exit 75) on attempt 1" in retry["exception"]
    again = shown[tasks["retried then succeeded"]]  # each attempt is a message of its own
    assert again["retries"] == 1 and again["kwargs"] == str({"agent": "boss", "attempt": 2})
    assert ast.literal_eval(shown[tasks["succeeded"]]["result"])["echo"] == "hi"
    plain_orchestrator(fleet, flower)


def plain_orchestrator(fleet: Fleet, flower: Flower) -> None:
    """tests/plain/orchestrator.py, which imports nothing of fleet, against this fleet."""
    config = fleet.cli("publisher-config", "--json").stdout
    done = subprocess.run([sys.executable, str(ORCHESTRATOR), *AGENTS], input=config, env=fleet.env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["imported_fleet"] is False
    assert [result["echo"] for result in seen["results"]] == [f"hello {agent}" for agent in AGENTS]
    assert seen["named"]["task"] == "orchestrator-chose-this-id"
    assert seen["failing"] == {"type": "TaskFailed", "message": "failed: exited with 1"}
    assert seen["slow_state_before_revoke"] == "STARTED"
    assert seen["slow"]["type"] == "TaskRevokedError"
    ids = seen["ids"]
    # The Celery task id is the fleet task id.
    client = fleet.client()
    for task_id in [*ids["ok"], ids["named"]]:
        assert client.status(task_id).state == State.SUCCEEDED
    assert client.status(ids["failing"]).error.kind == ErrorKind.FAILED
    revoked = client.status(ids["slow"])
    assert revoked.state == State.CANCELLED and "revoked through Celery" in revoked.error.message
    status = fleet.cli("status", ids["named"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["agent"] == "reviewer"
    shown = flower.until("/api/tasks", lambda seen: seen.get(ids["slow"], {}).get("state") == "REVOKED")
    assert shown[ids["failing"]]["state"] == "FAILURE" and shown[ids["named"]]["state"] == "SUCCESS"


def test_purge_and_revoke_cancel_queued_tasks_which_never_run(make_fleet: MakeFleet) -> None:
    # The sweep would publish a queued task whose message vanished again after 1 s.
    fleet = serving(make_fleet, {"boss": {}}, lost_message_after_s=1, lease_ttl_s=3)
    assert fleet.cli("hosts", "drain", "testhost", "--wait", "--timeout", "60").returncode == 0
    client = fleet.client()
    purged = [client.submit("boss", {"echo": f"purged {n}"}) for n in range(2)]
    queue = f"{fleet.settings.namespace}.agent.boss"
    done = celery(fleet, "purge", "-f", "-Q", queue)
    assert done.returncode == 0 and "Purged 2 messages" in done.stdout, done.stdout + done.stderr
    revoked = client.submit("boss", {"echo": "revoked"})
    assert celery(fleet, "control", "revoke", revoked).returncode == 0
    for task_id in [*purged, revoked]:
        record = wait_for_state(client, task_id, "cancelled")
        assert record.attempts == 0
    assert "purged from queue" in client.status(purged[0]).error.message
    assert "revoked through Celery" in client.status(revoked).error.message

    # Without fleet's transport (a plain app's purge destroys the messages),
    # the sweep takes the task for lost and runs it: what the transport prevents.
    destroyed = client.submit("boss", {"echo": "destroyed"})
    app, _ = plain_app(fleet)
    with app.connection_for_write() as connection:
        assert connection.default_channel.queue_purge(queue) == 2  # and the revoked task's message
    assert fleet.cli("hosts", "undrain", "testhost").returncode == 0
    assert client.wait(destroyed, 60).state == State.SUCCEEDED
    assert any(e.type == "message_republished" for e in client.store.events.of_task(destroyed))
    for task_id in [*purged, revoked]:
        assert client.status(task_id).state == State.CANCELLED
        assert not [e for e in client.store.events.of_task(task_id) if e.fields.get("state") == "running"]


def test_malformed_messages_are_recorded_rejected_and_a_raw_one_from_the_shell_runs(
        make_fleet: MakeFleet) -> None:
    fleet = serving(make_fleet, {"dev": {}, "boss": {}}, payload_limit=1024)
    app, config = plain_app(fleet)
    queue = config["queues"]["dev"]
    messages = {
        "no agent": {"kwargs": {"payload": {}}},
        "unknown agent": {"kwargs": {"agent": "nobody", "payload": {}}},
        "another agent's queue": {"kwargs": {"agent": "boss", "payload": {}}},
        "payload a list": {"kwargs": {"agent": "dev", "payload": [1]}},
        "payload too big": {"kwargs": {"agent": "dev", "payload": {"x": "y" * 2000}}},
        "positional garbage": {"args": [1, 2]},
        "unfit id": {"kwargs": {"agent": "dev", "payload": {}}, "task_id": "not:a:fleet:id"},
    }
    sent = {name: app.send_task(config["task"], queue=queue, **how) for name, how in messages.items()}
    reasons = {"no agent": "no agent", "unknown agent": "unknown agent 'nobody'",
               "another agent's queue": "this consumer serves 'dev'",
               "payload a list": "payload must be a JSON object",
               "payload too big": "over payload_limit=1024",
               "positional garbage": "are not [its task id]", "unfit id": "recorded as fleet task"}
    client = fleet.client()
    for name, result in sent.items():
        with pytest.raises(Exception) as raised:
            result.get(timeout=60)
        assert type(raised.value).__name__ == "TaskFailed" and reasons[name] in str(raised.value), name
        if name != "unfit id":
            record = client.status(result.id)
            assert record.state == State.FAILED and record.error.kind == ErrorKind.REJECTED, name
    recorded_as = str(sent["unfit id"].result).split("recorded as fleet task ")[1].split(":")[0]
    assert "task id 'not:a:fleet:id'" in client.status(recorded_as).error.message
    assert client.store.records.get_with_payload(sent["payload too big"].id)[1] == {}  # never stored

    # Found in review: what Celery's own parser raises on stopped every
    # consumer of the agent in turn; now recorded rejected, and consuming goes on.
    redis_client = client.store.redis
    for task_id, body in (("body-not-a-list", "hello"), ("body-too-short", [[]])):
        raw_push(redis_client, config, "dev", body, task_id)
        with pytest.raises(Exception, match="Celery cannot read it"):
            app.AsyncResult(task_id).get(timeout=60)
        assert client.status(task_id).error.kind == ErrorKind.REJECTED
    raw_push(redis_client, config, "dev", [[], {"agent": "dev"}, {}], "unknown-name", task="tasks.add")
    with pytest.raises(Exception):  # noqa: B017 (Celery's NotRegistered or fleet's TaskFailed: both say so)
        app.AsyncResult("unknown-name").get(timeout=60)
    unknown = wait_for_state(client, "unknown-name", "failed")
    assert "task name 'tasks.add' is not fleet's" in unknown.error.message
    # An expired message no longer puts its id in Celery's revoked set, where
    # every later message of that task would have been discarded.
    raw_push(redis_client, config, "dev", [["victim-1"], {"agent": "dev"}, {}], "victim-1",
             expires="2000-01-01T00:00:00+00:00")
    victim = app.send_task(config["task"], kwargs={"agent": "dev", "payload": {"echo": "victim"}},
                           queue=queue, task_id="victim-1")
    assert victim.get(timeout=60)["echo"] == "victim"
    # A finished task's id is never run again, even once its record is gone.
    client.store.redis.delete(client.store.keys.task("victim-1"))
    again = app.send_task(config["task"], kwargs={"agent": "dev", "payload": {"echo": "forged"}},
                          queue=queue, task_id="victim-1")
    assert wait_for_state(client, client.submit("dev", {}), "succeeded")  # it was dealt with before
    assert app.AsyncResult("victim-1").get(timeout=60)["echo"] == "victim"
    assert not client.store.redis.exists(client.store.keys.task("victim-1"))
    assert again.id == "victim-1"

    # Another language: the message built with printf and base64, pushed with redis-cli.
    done = subprocess.run(
        [str(RAW_PUBLISHER), config["broker_url"], config["broker_transport_options"]["global_keyprefix"],
         config["queues"]["dev"], "dev", '{"echo": "from sh"}', "from-the-shell-1"],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "from-the-shell-1", done.stderr
    assert app.AsyncResult("from-the-shell-1").get(timeout=60)["echo"] == "from sh"
    record = client.status("from-the-shell-1")  # written by the consumer that took the message
    assert record.state == State.SUCCEEDED and record.result is not None
    assert record.result["echo"] == "from sh"
