"""Core dispatch end to end on a real Redis and a real engine: per-agent
queues, one long-lived hardened container per agent, task state, the CLI."""

from __future__ import annotations

import json
import os
import subprocess

import docker
import pytest
from support import FLEET, Fleet, MakeFleet

from fleet.record import State

AGENTS = {"boss": {}, "dev": {"concurrency": 2}, "reviewer": {}}


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Fleet:
    fleet = make_fleet(AGENTS)
    fleet.start_worker()
    return fleet


def container_of(fleet: Fleet, docker_client: docker.DockerClient, agent: str):
    from fleet.container.spec import container_name

    return docker_client.containers.get(container_name(fleet.settings, agent))


def run(fleet: Fleet, agent: str, payload: dict[str, object], timeout: float = 60):
    client = fleet.client()
    return client.wait(client.submit(agent, payload), timeout)


def test_tasks_land_only_in_their_agents_container(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    client = fleet.client()
    ids = {agent: [client.submit(agent, {"record": "runs"}) for _ in range(3)] for agent in AGENTS}
    records = {agent: [client.wait(task_id, 60) for task_id in task_ids]
               for agent, task_ids in ids.items()}
    for agent, task_ids in ids.items():
        container = container_of(fleet, docker_client, agent)
        for record in records[agent]:
            assert record.state == State.SUCCEEDED
            assert record.container == container.short_id
        seen = container.exec_run(["cat", "/state/runs"]).output.decode().split()
        assert sorted(set(seen[1::4])) == sorted(task_ids)  # "start|end <task> <attempt> <time>"


def test_one_container_serves_many_tasks_and_is_recreated_when_gone(
        fleet: Fleet, docker_client: docker.DockerClient) -> None:
    containers = {run(fleet, "boss", {"echo": str(n)}).container for n in range(10)}
    assert len(containers) == 1
    first = containers.pop()
    docker_client.containers.get(first).remove(force=True)
    record = run(fleet, "boss", {"echo": "again"})
    assert record.state == State.SUCCEEDED
    assert record.container != first
    assert container_of(fleet, docker_client, "boss").short_id == record.container


def test_a_changed_memory_limit_gives_a_new_container(make_fleet: MakeFleet,
                                                     docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {"memory": "256m"}})
    fleet.start_worker()
    before = run(fleet, "dev", {})
    fleet.workers[0].stop()
    changed = fleet.config.read_text().replace('memory = "256m"', 'memory = "300m"')
    fleet.config.write_text(changed)
    fleet.start_worker()
    after = run(fleet, "dev", {})
    assert after.container != before.container
    container = docker_client.containers.get(after.container)
    assert container.attrs["HostConfig"]["Memory"] == 300 * 1024**2


def test_the_container_is_hardened(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    for agent in AGENTS:
        run(fleet, agent, {})
    users = {agent: container_of(fleet, docker_client, agent).attrs["Config"]["User"] for agent in AGENTS}
    uids = {user.split(":")[0] for user in users.values()}
    assert len(uids) == len(AGENTS), users  # an identity of its own for each agent
    assert all(f"{uid}:{uid}" in users.values() and 10001 <= int(uid) < 11000 for uid in uids)
    attrs = container_of(fleet, docker_client, "dev").attrs
    host, config = attrs["HostConfig"], attrs["Config"]
    assert {(u["Name"], u["Hard"]) for u in host["Ulimits"]} == {("nofile", 4096), ("core", 0)}
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["Init"] is True
    assert host["Memory"] == 1024**3 and host["MemorySwap"] == 1024**3
    assert host["NanoCpus"] == 10**9
    assert host["PidsLimit"] == 256
    assert host["NetworkMode"] == "none"
    assert host["RestartPolicy"]["Name"] == "no"
    assert set(host["Tmpfs"]) == {"/home/agent", "/tmp"}
    assert not host.get("Binds")
    assert not host.get("Devices")
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert set(mounts) == {"/state", "/run/fleet/tokens"}
    assert mounts["/state"]["Type"] == "volume"
    assert mounts["/run/fleet/tokens"]["Type"] == "bind"
    assert mounts["/run/fleet/tokens"]["RW"] is False
    assert mounts["/run/fleet/tokens"]["Source"] == str(fleet.settings.secrets_dir.resolve() / "dev")
    assert not any("docker.sock" in m["Source"] for m in attrs["Mounts"])
    # No host variable: only HOME and the engine's default PATH.
    assert {e.split("=")[0] for e in config["Env"]} == {"HOME", "PATH"}
    labels = config["Labels"]
    assert labels["fleet.agent"] == "dev" and labels["fleet.host"] == "testhost"
    assert len(labels["fleet.spec-hash"]) == 16


def test_a_task_sees_only_the_contract_environment(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"envy": {"command": ["/usr/bin/env"]}})
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("envy", {})
    assert client.wait(task_id, 60).state == State.SUCCEEDED
    out = fleet.cli("logs", task_id).stdout
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert names == {"HOME", "PATH", "FLEET_TASK_ID", "FLEET_ATTEMPT", "FLEET_AGENT", "FLEET_TOKEN_DIR"}
    assert f"FLEET_TASK_ID={task_id}" in out


def test_a_task_sees_only_its_own_agents_tokens(fleet: Fleet) -> None:
    for agent, token in (("dev", "forge"), ("reviewer", "review-forge"), ("boss", "plan")):
        directory = fleet.settings.secrets_dir / agent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / token).write_text(f"secret-of-{agent}")
        os.chown(directory, 10001, 10001)
        os.chown(directory / token, 10001, 10001)
        (directory / token).chmod(0o600)
    record = run(fleet, "dev", {"shell": "ls -A /run/fleet/tokens; ls -A / | tr '\\n' ' '"})
    out = fleet.cli("logs", record.id).stdout
    assert out.splitlines()[0] == "forge"
    assert "review-forge" not in out and "plan" not in out


def test_output_is_readable_while_the_task_runs(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    client = fleet.client()
    task_id = client.submit("reviewer", {
        "shell": "echo started; while [ ! -e /state/go ]; do sleep 0.05; done; echo finished"})
    follow = subprocess.Popen([FLEET, "logs", "--follow", task_id], env=fleet.env,
                              stdout=subprocess.PIPE, text=True)
    assert follow.stdout is not None
    assert follow.stdout.readline() == "started\n"
    assert client.status(task_id).state == State.RUNNING
    container_of(fleet, docker_client, "reviewer").exec_run(["touch", "/state/go"])
    assert follow.stdout.readline() == "finished\n"
    assert follow.wait(timeout=30) == 0
    assert client.wait(task_id, 30).state == State.SUCCEEDED


def test_submit_wait_exit_codes_and_idempotency(fleet: Fleet) -> None:
    ok = fleet.cli("submit", "dev", "--payload", '{"echo": "x"}', "--wait", "--timeout", "60")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "succeeded"
    failed = fleet.cli("submit", "dev", "--payload", '{"exit": 3}', "--wait", "--timeout", "60")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["kind"] == "failed"
    first = fleet.cli("submit", "boss", "--key", "plan-42")
    again = fleet.cli("submit", "boss", "--key", "plan-42", "--payload", '{"echo": 1}')
    assert first.returncode == again.returncode == 0
    assert first.stdout == again.stdout
    assert len(fleet.client().tasks(agent="boss")) == 1


def test_transient_failure_is_retried(fleet: Fleet) -> None:
    record = run(fleet, "dev", {"exit": 75, "fail_until_attempt": 2})
    assert (record.state, record.attempts) == (State.SUCCEEDED, 2)


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "nope"], "unknown agent 'nope'"),
    (["submit", "dev", "--payload", "[1, 2]"], "payload must be a JSON object"),
    (["submit", "dev", "--payload", "{not json"], "payload is not valid JSON"),
    (["submit", "dev", "--payload", json.dumps({"x": "y" * 2000})], "over payload_limit=1024"),
    (["submit", "dev", "--payload-file", "/nonexistent"], "--payload-file: cannot read"),
    (["status", "nope"], "no task 'nope'"),
    (["tasks", "--state", "bogus"], "Invalid value for '--state'"),
])
def test_bad_input_exits_2_with_one_line(make_fleet: MakeFleet, args: list[str], message: str) -> None:
    fleet = make_fleet({"dev": {}}, payload_limit=1024)
    done = fleet.cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    if not message.startswith("Invalid"):
        assert len(done.stderr.strip().splitlines()) == 1
    assert fleet.client().tasks() == []


def test_a_cancelled_queued_task_never_runs(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    client = fleet.client()
    doomed = client.submit("dev", {"record": "runs"})
    cancel = fleet.cli("cancel", doomed)
    assert cancel.returncode == 0 and "cancelled (was queued)" in cancel.stdout
    fleet.start_worker()
    after = client.submit("dev", {"record": "runs"})  # one queue, in order: runs after the doomed one
    assert client.wait(after, 60).state == State.SUCCEEDED
    record = client.status(doomed)
    assert (record.state, record.attempts, record.started_at) == (State.CANCELLED, 0, None)
    again = fleet.cli("cancel", doomed)
    assert again.returncode == 0 and "already cancelled; nothing changed" in again.stdout


def test_worker_start_removes_orphans_of_its_host(make_fleet: MakeFleet,
                                                  docker_client: docker.DockerClient) -> None:
    from fleet.container.manager import ContainerManager

    fleet = make_fleet({"dev": {}, "gone": {}})
    manager = ContainerManager(docker_client, fleet.settings)
    orphan = manager.ensure("gone")
    dead = manager.ensure("dev")
    dead.stop(timeout=1)
    fleet.config.write_text(fleet.config.read_text().replace("[agents.gone]\n", ""))
    worker = fleet.start_worker()
    worker.wait_for_line("removed orphaned container", count=2)
    names = {c.name for c in manager.containers()}
    assert orphan.name not in names
    assert dead.id not in {c.id for c in manager.containers()}
    assert run(fleet, "dev", {}).state == State.SUCCEEDED
