"""Who may have an agent run a task: with `signing_key_file`, a worker runs
only tasks signed with one of its keys; and whatever the signing, a
consumer runs only records for its own agent and host, within the payload
limit. Every refused task ends `failed` with kind `rejected`, and the
marker its command would write never appears. On a real worker and Redis;
the forgeries are written by the test straight into Redis, as whoever
reaches Redis could."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
from support import Fleet, MakeFleet, wait_for_state

from fleet.broker.publish import publish
from fleet.client import FleetClient
from fleet.container.spec import container_name
from fleet.credentials.signing import SigningKeys
from fleet.record import ErrorKind, State, TaskRecord

ALICE = "alice alice-secret-0123456789abcdef"
BOB = "bob bob-secret-0123456789abcdef"


def key_file(path: Path, *lines: str) -> Path:
    temp = path.with_suffix(".new")
    temp.write_text("\n".join(lines) + "\n")
    temp.chmod(0o600)
    os.replace(temp, path)  # as an operator would: the worker sees the whole new file
    return path


def marking(name: str) -> dict[str, Any]:
    """A payload whose command leaves /state/<name> behind if it ever runs."""
    return {"shell": f"touch /state/{name}"}


def marked(fleet: Fleet, docker_client: docker.DockerClient, name: str) -> bool:
    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    return container.exec_run(["test", "-e", f"/state/{name}"]).exit_code == 0


def forge(client: FleetClient, agent: str, payload: dict[str, Any], *, queue_of: str = "dev",
          signer: SigningKeys | None = None, host: str | None = None) -> str:
    """A record and a message written without going through `submit`'s checks."""
    task_id, _ = client.store.records.create(agent, payload, pinned_host=host,
                                             signer=signer.sign if signer else None)
    publish(client.app, client.settings, task_id, queue_of)
    return task_id


def rejected(client: FleetClient, task_id: str, why: str) -> TaskRecord:
    record = wait_for_state(client, task_id, State.FAILED, timeout=60)
    assert record.error is not None and record.error.kind == ErrorKind.REJECTED, record
    assert why in record.error.message, record.error.message
    assert record.attempts == 0 and record.started_at is None
    return record


def test_only_tasks_signed_with_a_key_of_the_workers_run(
        make_fleet: MakeFleet, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    keys = key_file(tmp_path / "worker-keys", ALICE, BOB)
    fleet = make_fleet({"dev": {}}, signing_key_file=str(keys))
    fleet.start_worker("dev")
    alice = FleetClient(fleet.settings.model_copy(
        update={"signing_key_file": key_file(tmp_path / "alice-keys", ALICE)}))
    bob = FleetClient(fleet.settings.model_copy(
        update={"signing_key_file": key_file(tmp_path / "bob-keys", BOB)}))

    signed = wait_for_state(alice, alice.submit("dev", marking("by-alice")), State.SUCCEEDED)
    assert signed.signed_by == "alice" and signed.signature
    assert wait_for_state(bob, bob.submit("dev", marking("by-bob")), State.SUCCEEDED).signed_by == "bob"

    unsigned = forge(alice, "dev", marking("unsigned"))
    rejected(alice, unsigned, "it is not signed")
    wrong = SigningKeys((("alice", b"not-alices-secret-0123456789"),))
    rejected(alice, forge(alice, "dev", marking("wrong-key"), signer=wrong), "does not match the task")

    changed_id, _ = alice.store.records.create("dev", {"echo": "harmless"},
                                               signer=alice.signing_keys.sign if alice.signing_keys else None)
    alice.store.redis.hset(alice.store.keys.task(changed_id), "payload", json.dumps(marking("changed")))
    publish(alice.app, alice.settings, changed_id, "dev")
    rejected(alice, changed_id, "does not match the task")

    # A plain Celery publisher's message: signed in its kwargs, or refused.
    plain, queue = alice.app, f"{fleet.settings.namespace}.agent.dev"
    unsigned_plain = plain.send_task("fleet.run", queue=queue, ignore_result=True, kwargs={
        "agent": "dev", "payload": marking("plain-unsigned")}).id
    rejected(alice, unsigned_plain, "it is not signed")
    created_at = datetime.now(UTC).isoformat()
    assert alice.signing_keys is not None
    signed_by, signature = alice.signing_keys.sign("plain-signed-1", "dev", None, marking("plain-signed"),
                                                   created_at)
    plain.send_task("fleet.run", task_id="plain-signed-1", queue=queue,
                    ignore_result=True, kwargs={"agent": "dev", "payload": marking("plain-signed"),
                                                "signed_by": signed_by, "signature": signature,
                                                "created_at": created_at})
    assert wait_for_state(alice, "plain-signed-1", State.SUCCEEDED).signed_by == "alice"

    key_file(keys, ALICE)  # bob's key withdrawn from the workers: counts from the next task
    rejected(bob, bob.submit("dev", marking("bob-after")),
             "signed with key 'bob', which this worker does not accept")

    for name in ("unsigned", "wrong-key", "changed", "bob-after", "plain-unsigned"):
        assert not marked(fleet, docker_client, name), name
    for name in ("by-alice", "by-bob", "plain-signed"):
        assert marked(fleet, docker_client, name), name
    alerts = [json.loads(line) for line in fleet.cli("alerts", "--json").stdout.splitlines()]
    assert sum(a["kind"] == "task_rejected" for a in alerts) == 5


def test_a_consumer_runs_only_its_own_agents_tasks_for_its_host_within_the_limit(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}, "boss": {}}, payload_limit=1024)
    fleet.start_worker("dev")
    client = fleet.client()
    rejected(client, forge(client, "boss", marking("for-boss")),
             "it is for agent 'boss' and this consumer serves 'dev'")
    rejected(client, forge(client, "dev", marking("pinned") | {"pad": ""}, host="another-host"),
             "it is pinned to host 'another-host'")
    rejected(client, forge(client, "dev", marking("too-big") | {"pad": "x" * 2000}),
             "over payload_limit=1024")
    assert wait_for_state(client, client.submit("dev", marking("fine")), State.SUCCEEDED)
    # Without signing_key_file (this fleet), the same unsigned forgery the signed fleet rejects runs.
    assert wait_for_state(client, forge(client, "dev", marking("unsigned")), State.SUCCEEDED)
    for name in ("for-boss", "pinned", "too-big"):
        assert not marked(fleet, docker_client, name), name
    assert marked(fleet, docker_client, "fine") and marked(fleet, docker_client, "unsigned")


def test_a_finished_signed_task_put_back_in_the_queue_is_not_run_again(
        make_fleet: MakeFleet, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """Found in review: the record's state is not signed, and whoever writes
    records could reset a finished task and have it run again, as often as
    they liked. A worker marks a finished task where no submitter writes."""
    fleet = make_fleet({"dev": {}}, signing_key_file=str(key_file(tmp_path / "keys", ALICE)))
    worker = fleet.start_worker("dev")
    client = fleet.client()
    task_id = client.submit("dev", {"shell": "echo ran >> /state/replayed"})
    wait_for_state(client, task_id, State.SUCCEEDED)
    key = client.store.keys.task(task_id)
    client.store.redis.hset(key, mapping={"state": json.dumps("queued"), "attempts": "0"})
    publish(client.app, client.settings, task_id, "dev")
    rejected_record = wait_for_state(client, task_id, State.FAILED, timeout=60)
    assert rejected_record.error is not None and "ran to its end already" in rejected_record.error.message
    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    assert container.exec_run(["cat", "/state/replayed"]).output == b"ran\n"

    # A message whose id could reach another key is recorded rejected under a
    # new id, once, not put back forever.
    publish(client.app, client.settings, f"{task_id}:events", "dev")
    assert wait_for_state(client, client.submit("dev", {}), State.SUCCEEDED)
    assert sum(f"task id '{task_id}:events' is not" in line and "rejected:" in line
               for line in worker.lines if "fleet.worker.runner" in line) == 1


def test_an_idempotency_key_someone_else_filled_is_refused(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = make_fleet({"dev": {}}, signing_key_file=str(key_file(tmp_path / "keys", ALICE)))
    client = fleet.client()
    forged = forge(client, "dev", {"echo": "not yours"})  # unsigned, queued, under no key yet
    client.store.redis.set(client.store.keys.idempotency("deploy-42"), forged)
    done = fleet.cli("submit", "dev", "--key", "deploy-42", "--payload", "{}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fleet: idempotency key 'deploy-42' names task {forged}, which this submitter did not sign: "
        "it is not signed, and this worker runs only signed tasks"]
