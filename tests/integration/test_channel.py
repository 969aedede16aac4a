"""The persistent channel and its supervisor, on a real container."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import docker
import pytest
from support import Fleet, MakeFleet, task_processes, wait_for_state

from fleet.container.manager import ContainerManager
from fleet.container.spec import container_name
from fleet.forwarding.base import ChannelBroken, Job
from fleet.forwarding.channel import ChannelForwarder
from fleet.record import ErrorKind, State

# Runs in the container: returns once no process carries the task's mark (at most 20 s).
WAIT_UNTIL_GONE = r"""
import os, sys, time
mark = ("FLEET_TASK_ID=" + sys.argv[1]).encode()
def alive():
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += mark in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            pass
    return n
deadline = time.monotonic() + 20
while alive() and time.monotonic() < deadline:
    time.sleep(0.05)
print(alive())
"""


def job(task_id: str, command: list[str], payload: dict[str, object] | None = None) -> Job:
    return Job(task_id=task_id, agent="dev", attempt=1, payload=json.dumps(payload or {}).encode(),
               command=command, user="10001")


def test_concurrent_tasks_output_never_interleaves(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"concurrency": 3, "command": ["/bin/sh", "-c",
                        'for i in $(seq 1 300); do echo "$FLEET_TASK_ID line $i"; done']}})
    fleet.start_worker()
    client = fleet.client()
    ids = [client.submit("dev", {}) for _ in range(6)]
    assert [client.wait(t, 60).state for t in ids] == [State.SUCCEEDED] * 6
    for task_id in ids:
        lines = fleet.cli("logs", task_id).stdout.splitlines()
        assert lines == [f"{task_id} line {i}" for i in range(1, 301)]


def test_closing_the_channel_ends_the_tasks_it_carried(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    container = ContainerManager(docker_client, fleet.settings).ensure("dev")
    forwarder = ChannelForwarder("10001", grace_s=1)
    started = threading.Event()

    def on_output(stream: str, data: bytes) -> None:
        started.set()

    results: list[object] = []
    runner = threading.Thread(target=lambda: results.append(
        _run_catching(forwarder, container, job("t-close", ["/bin/sh", "-c", "echo up; sleep 300"]),
                      on_output)))
    runner.start()
    assert started.wait(30)
    assert task_processes(container, "t-close") >= 1
    forwarder.channel(container).close()  # as if the consumer died
    left = container.exec_run(["python3", "-c", WAIT_UNTIL_GONE, "t-close"], user="10001")
    assert left.output.decode().strip() == "0"
    runner.join(30)
    assert results and isinstance(results[0], Exception)


def _run_catching(forwarder: ChannelForwarder, container: object, j: Job, on_output: object) -> object:
    try:
        return forwarder.run(container, j, on_output)  # type: ignore[arg-type]
    except Exception as error:
        return error


def test_a_supervisor_killed_from_outside_is_detected_and_the_task_retried(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {"transient_backoff_s": 0.2}})
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {"echo": "started", "sleep": 3})
    wait_for_state(client, task_id, State.RUNNING)
    for batch in client.store.events.follow(client.store.keys.events(task_id), block_ms=1000):
        if any(event.type == "output" for event in batch):  # its first output: it runs, through the channel
            break
    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    killer = ("import os, signal\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
              "    if b'supervise' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
              "        os.kill(int(p), signal.SIGKILL)\n")
    container.exec_run(["python3", "-c", killer], user="10001")
    record = client.wait(task_id, 60)
    assert (record.state, record.attempts) == (State.SUCCEEDED, 2)
    crashes = [e.fields for e in client.store.events.of_task(task_id)
               if e.fields.get("error") == ErrorKind.CRASH]
    assert crashes, "the broken channel was not recorded as a crash"
    # The container whose supervisor was lost is no longer trusted: it was replaced, and said so.
    assert record.container != container.short_id
    condemned = [a for a in fleet_alerts(fleet) if a["kind"] == "container_condemned"]
    assert len(condemned) == 1 and condemned[0]["agent"] == "dev"
    assert "stream ended" in condemned[0]["message"]


def test_an_idle_channel_answers_pings_and_a_silent_one_is_broken(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}})
    container = ContainerManager(docker_client, fleet.settings).ensure("dev")
    forwarder = ChannelForwarder("10001", grace_s=1, keepalive_s=0.2)
    first = forwarder.channel(container)
    opened_at = first.heard_at
    # Idle, it answers fleet's pings (traffic a proxy in front of the engine needs, too).
    assert until(lambda: first.heard_at > opened_at), "an idle supervisor answered no ping"
    assert forwarder.connected(container)
    # A hung supervisor (or a half-open connection) answers no more: the channel is broken,
    # and no second supervisor is started in that container (the consumer replaces it).
    stop = f"import os, signal; os.kill({first.supervisor_pid}, signal.SIGSTOP)"
    assert container.exec_run(["python3", "-c", stop], user="10001").exit_code == 0
    assert until(lambda: not forwarder.connected(container)), "a silent channel still counted as up"
    with pytest.raises(ChannelBroken, match="answered none"):
        forwarder.run(container, job("t-after", ["cat"], {"n": 1}), lambda stream, data: None)


def fleet_alerts(fleet: Fleet) -> list[dict[str, str]]:
    return [json.loads(line) for line in fleet.cli("alerts", "--json").stdout.splitlines()]


def until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition no event announces (the passing of keepalives)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
