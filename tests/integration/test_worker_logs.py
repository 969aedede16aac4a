"""`fleet worker --log-format json`: every line it writes is one JSON object,
and those about a task carry its id, the agent, the host and the attempt."""

from __future__ import annotations

import json
import subprocess

from support import FLEET, MakeFleet, Worker

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
