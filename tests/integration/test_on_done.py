"""on_done hooks on a real Redis and engine, told by a real `fleet worker`:
a webhook receiver (its own process, an HTTP server that checks the HMAC
signature with its own code) and a command. The receiver is taken down for
30 s: every end is delivered once it is back."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support import MakeFleet, free_port

from fleet.record import State

RECEIVER = Path(__file__).resolve().parents[1] / "webhook_receiver.py"
APPEND_STDIN = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')"
OUTAGE_S = 30.0


class Receiver:
    """tests/webhook_receiver.py as a process that can be stopped and started again."""

    def __init__(self, port: int, secret: Path, out: Path) -> None:
        self.args = [sys.executable, str(RECEIVER), str(port), str(secret), str(out)]
        self.out = out
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline() == "listening\n"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def seen(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines()] if self.out.exists() else []


def on_done_events(client: Any, task_ids: list[str], hook: str, outcome: str,
                   timeout: float = 60) -> dict[str, dict[str, str]]:
    """Block on the tasks' event streams until each has recorded `outcome`
    for `hook`; that event of each."""
    found: dict[str, dict[str, str]] = {}
    cursors = dict.fromkeys(task_ids, "0-0")
    deadline = time.monotonic() + timeout
    while len(found) < len(task_ids):
        assert time.monotonic() < deadline, f"{outcome} {hook} missing: {sorted(set(task_ids) - set(found))}"
        for task_id, batch in client.store.events.wait_any(cursors, 1000).items():
            for event in batch:
                if event.type == "on_done" and event.fields.get("hook") == hook \
                        and event.fields.get("outcome") == outcome:
                    found.setdefault(task_id, event.fields)
        cursors = {i: c for i, c in cursors.items() if i not in found}
    return found


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    secret = tmp_path / "hook-secret"
    secret.write_text("a-webhook-secret-of-32-characters\n")
    started = Receiver(free_port(), secret, tmp_path / "received.jsonl")
    started.start()
    yield started
    started.stop()


def test_webhooks_and_a_command_hear_every_end_through_a_30_s_outage(
        make_fleet: MakeFleet, receiver: Receiver, tmp_path: Path) -> None:
    secret, wrong = Path(receiver.args[3]), tmp_path / "not-the-receivers"
    wrong.write_text("a-secret-the-receiver-does-not-know\n")
    commanded = tmp_path / "commanded.jsonl"
    url = f"http://127.0.0.1:{receiver.args[2]}/fleet"
    fleet = make_fleet({"dev": {"concurrency": 2, "on_done": ["orchestrator"]}}, on_done={
        "orchestrator": {"url": url, "secret_file": str(secret), "backoff_s": 0.5, "backoff_max_s": 2},
        "forged": {"url": url, "secret_file": str(wrong), "backoff_s": 0.5, "give_up_after_s": 2},
        "script": {"command": [sys.executable, "-c", APPEND_STDIN, str(commanded)]}})
    fleet.start_worker().wait_for_line(" ready.")
    client = fleet.client()

    before = [client.submit("dev", {"echo": str(n)}) for n in range(20)]
    odd = client.submit("dev", {"exit": 3}, on_done=["script", "forged"])
    ended = {r.id: r for r in client.wait_many([*before, odd], 120)}
    on_done_events(client, [*before, odd], "orchestrator", "delivered")
    seen = {entry["body"]["task"]["id"]: entry for entry in receiver.seen() if entry["valid"]}
    assert set(seen) == {*before, odd}
    assert seen[odd]["body"]["task"]["state"] == "failed" and seen[odd]["body"]["hook"] == "orchestrator"
    latency = sorted((seen[i]["at"] - datetime.fromisoformat(ended[i].finished_at or "").timestamp()) * 1000
                     for i in before)
    print(f"end of task → webhook received: p50 {statistics.median(latency):.1f} ms, "
          f"p95 {latency[int(0.95 * len(latency))]:.1f} ms")

    # The command got the same record on its stdin.
    on_done_events(client, [odd], "script", "delivered")
    told = [json.loads(line) for line in commanded.read_text().splitlines()]
    assert [(t["hook"], t["task"]["id"], t["task"]["exit_code"]) for t in told] == [("script", odd, 3)]
    # A delivery signed with another key is refused by the receiver: tried, then given up.
    abandoned = on_done_events(client, [odd], "forged", "abandoned")[odd]
    assert abandoned["error"] == "HTTP 401"
    assert any(not entry["valid"] and entry["body"]["hook"] == "forged" for entry in receiver.seen())

    # The receiver goes away for 30 s; tasks end meanwhile.
    receiver.stop()
    down_at = time.monotonic()
    during = [client.submit("dev", {"echo": f"during {n}"}) for n in range(20)]
    assert all(r.state == State.SUCCEEDED for r in client.wait_many(during, 120))
    failed = on_done_events(client, during, "orchestrator", "failed")
    assert all(event["error"].startswith("unreachable") for event in failed.values())
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the outage itself
    receiver.start()
    delivered = on_done_events(client, during, "orchestrator", "delivered", timeout=30)
    valid = [entry for entry in receiver.seen() if entry["valid"]]
    by_delivery: dict[str, list[str]] = {}
    for entry in valid:
        by_delivery.setdefault(entry["delivery"], []).append(entry["body"]["task"]["id"])
    assert {tasks[0] for tasks in by_delivery.values()} == {*before, odd, *during}  # none lost
    duplicates = sum(len(tasks) - 1 for tasks in by_delivery.values())
    tries = sorted(int(event["tries"]) for event in delivered.values())
    print(f"after a {OUTAGE_S:.0f} s outage: {len(during)} delivered, {duplicates} duplicates, "
          f"tries per delivery {tries[0]}-{tries[-1]}")
    assert tries[0] > 1
