"""What `fleet worker` offers whoever runs it: `--log-format json` (every
line one JSON object; those about a task carry its id, the agent, the host
and the attempt) and `--health-port` (a probe that says whether this host
and its consumers are live)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Any

from support import FLEET, MakeFleet, Worker, child_pids, eventually, free_port

from fleet.record import State


def test_json_logs_name_the_task_agent_host_and_attempt(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"transient_backoff_s": 0.2}})
    worker = Worker(subprocess.Popen([FLEET, "worker", "--log-format", "json"], env=fleet.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True))
    fleet.workers.append(worker)
    worker.wait_for_line('"message": "dev@testhost ready."')
    client = fleet.client()
    task_id = client.submit("dev", {"exit": 75, "fail_until_attempt": 2})  # a transient failure, then fine
    assert client.wait(task_id, 60).state == State.SUCCEEDED
    worker.wait_for_line(f'"task": "{task_id}", "attempt": 2')
    assert worker.stop() == 0
    entries = [json.loads(line) for line in worker.lines if line.strip()]  # every line: one object
    about = [e for e in entries if e.get("task") == task_id]
    assert {(e["agent"], e["host"]) for e in about} == {("dev", "testhost")}
    assert {e.get("attempt") for e in about} >= {1, 2}
    assert any(e["message"].endswith("attempt 1: retrying") and e["attempt"] == 1 for e in about), about
    assert all({"time", "level", "logger", "message", "host"} <= set(e) for e in entries)


def probe(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def listening(port: int, pids: list[int]) -> int:
    """Which of these processes listens on the TCP port (its socket's inode in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    inodes = {row[9] for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "0A"}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.islink(f"/proc/{pid}/fd/{fd}") else ""
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    raise AssertionError(f"nothing of {pids} listens on {port}")


def test_the_health_probe_says_whether_this_host_and_its_consumers_are_live(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}, "boss": {}}, lease_ttl_s=3, heartbeat_s=1)
    port = free_port()
    worker = Worker(subprocess.Popen([FLEET, "worker", "--health-port", str(port)], env=fleet.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True))
    fleet.workers.append(worker)
    worker.wait_for_line(" ready.", count=2)
    _, body = eventually(lambda: p if (p := probe(port))[0] == 200 else None, "a healthy probe")
    assert body["status"] == "ok" and body["host"] == "testhost" and body["problems"] == []
    children = child_pids(worker.process.pid)
    health = listening(port, children)
    stopped = [pid for pid in children if pid != health]  # the consumers and the heartbeat: hung
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        _, body = eventually(lambda: p if (p := probe(port))[0] == 503 and len(p[1]["problems"]) == 3
                             else None, "an unhealthy probe naming the host and both consumers")
        assert "host testhost is lost" in body["problems"], body
        assert {problem.split(" last reported")[0] for problem in body["problems"][1:]} == {
            "the consumer of dev", "the consumer of boss"}
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    eventually(lambda: p if (p := probe(port))[0] == 200 else None, "healthy again")
