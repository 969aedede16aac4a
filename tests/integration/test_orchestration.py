"""What an orchestrator needs from fleet, on a real Redis and engine:
hearing when many tasks end without a thread or a poll each."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pty
import re
import select
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support import FLEET, MakeFleet, RedisServer, start_redis

from fleet.errors import TaskNotFound
from fleet.record import State

AOF = ("--appendonly", "yes", "--appendfsync", "always")


def test_as_completed_follows_200_tasks_on_one_connection_without_a_thread_each(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"concurrency": 2}})
    fleet.start_worker().wait_for_line(" ready.")
    client = fleet.client()
    ids = [client.submit("dev", {"echo": str(n)}) for n in range(200)]
    pool = client.store.redis.connection_pool
    threads = threading.active_count()
    yielded_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    most_threads, most_connections = threads, 0
    for record in client.as_completed(ids, timeout=300):
        yielded_at[record.id] = time.time()
        assert record.state == State.SUCCEEDED and record.finished_at is not None
        finished_at[record.id] = datetime.fromisoformat(record.finished_at).timestamp()
        most_threads = max(most_threads, threading.active_count())
        connections = len(pool._available_connections) + len(pool._in_use_connections)
        most_connections = max(most_connections, connections)
    assert sorted(yielded_at) == sorted(ids)
    assert most_threads == threads  # no thread per task, nor any at all
    assert most_connections == 1  # every read of all 200 streams on the one connection
    latency = sorted((yielded_at[i] - finished_at[i]) * 1000 for i in ids)
    assert latency[0] > -5  # none before it ended (finished_at: milliseconds, this host's clock)
    print(f"end of task → as_completed: p50 {statistics.median(latency):.1f} ms, "
          f"p95 {latency[int(0.95 * len(latency))]:.1f} ms")


def test_the_agent_and_state_filters_together_miss_no_task_among_3000(make_fleet: MakeFleet) -> None:
    """Found in the issue: `--agent` with `--state` filtered the newest 1,000
    of that state across all agents, so it missed tasks."""
    fleet = make_fleet({"dev": {}, "boss": {}})
    records = fleet.client().store.records
    made: dict[str, list[str]] = {"dev": [], "boss": []}
    for n in range(3000):  # the newest 2,000 queued are boss's: dev's queued ones are older
        agent = "dev" if n < 1000 else "boss"
        made[agent].append(records.create(agent, {})[0])
    failed = made["dev"][::10]
    for task_id in failed:
        records.transition(task_id, State.FAILED, finished_at="2026-11-30T00:00:00+00:00")
    queued_dev = [t for t in made["dev"] if t not in set(failed)]

    listed = fleet.cli("tasks", "--agent", "dev", "--state", "queued", "--limit", "5000", "--json")
    assert listed.returncode == 0, listed.stderr
    found = [task["id"] for task in json.loads(listed.stdout)]
    assert found == list(reversed(queued_dev))  # every one, newest first
    newest = fleet.client().tasks(agent="dev", state="failed", limit=5)
    assert [r.id for r in newest] == list(reversed(failed))[:5]
    assert len(fleet.client().tasks(state="queued", limit=5000)) == 2900


def test_a_finished_task_is_retried_under_its_id_and_a_batch_is_cancelled(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}, "boss": {}}, lease_ttl_s=3, kill_grace_s=1)
    fleet.start_worker().wait_for_line(" ready.", count=2)
    client = fleet.client()
    task_id = client.submit("dev", {"exit": 1, "fail_until_attempt": 2})
    failed = client.wait(task_id, 60)
    assert failed.state == State.FAILED and failed.finished_at is not None
    running = client.submit("dev", {"sleep": 30})
    refused = fleet.cli("retry", running)
    assert refused.returncode == 2 and "only a finished task can be retried" in refused.stderr
    client.cancel(running)
    # Found in review: a retry right after a run ended could overlap a run still stopping.
    too_soon = fleet.cli("retry", running)
    assert too_soon.returncode == 2 and "may still be stopping: retry it after 4 s" in too_soon.stderr
    settled = datetime.fromisoformat(failed.finished_at).timestamp() + 4  # lease_ttl_s + kill_grace_s
    time.sleep(max(0.0, settled - time.time()))  # the rule is a time: nothing to wait on
    done = fleet.cli("retry", task_id)
    assert done.returncode == 0 and "queued again as attempt 2" in done.stdout, done.stderr
    record = client.wait(task_id, 60)
    assert (record.state, record.attempts, record.error) == (State.SUCCEEDED, 2, None)
    kinds = [e.type for e in client.store.events.of_task(task_id)]
    assert "retry_requested" in kinds and kinds.count("state") >= 6  # both attempts' history kept

    assert fleet.cli("hosts", "drain", "testhost", "--wait", "--timeout", "60").returncode == 0
    batch = [client.submit("dev", {"echo": str(n)}) for n in range(5)]
    other = client.submit("boss", {"echo": "not in the batch"})
    asked = fleet.cli("cancel", "--agent", "dev", "--state", "queued")
    assert asked.returncode == 2 and "would cancel 5 task(s); add --yes" in asked.stderr
    done = fleet.cli("cancel", "--agent", "dev", "--state", "queued", "--yes")
    assert done.returncode == 0 and "cancelled 5 task(s)" in done.stdout, done.stderr
    assert fleet.cli("hosts", "undrain", "testhost").returncode == 0
    assert client.wait(other, 60).state == State.SUCCEEDED
    assert [r.state for r in client.wait_many(batch, 10)] == [State.CANCELLED] * 5
    assert all(client.status(t).attempts == 0 for t in batch)


def read_terminal(fd: int, done: Callable[[str], bool], timeout: float = 30) -> str:
    """What a program wrote to its terminal (escape sequences removed), once `done` says so."""
    text, deadline = "", time.monotonic() + timeout
    while not done(plain := re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"the terminal never showed it:\n{plain[-2000:]}"
        text += os.read(fd, 65536).decode(errors="replace")
    return plain


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A Redis server of this test's own that writes everything to its
    append-only file; a test that restarts it appends the new process."""
    servers = [start_redis(tmp_path / "redis", *AOF)]
    yield servers
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=30)


def test_a_scheduled_task_waits_for_its_time_through_worker_and_redis_restarts_and_can_be_cancelled(
        make_fleet: MakeFleet, own_redis: list[RedisServer], tmp_path: Path) -> None:
    server = own_redis[0]
    fleet = make_fleet({"dev": {}}, lease_ttl_s=3, redis_url=server.url)  # its housekeeper looks every second
    worker = fleet.start_worker()
    worker.wait_for_line(" ready.")
    client = fleet.client()
    task_id = fleet.cli("submit", "dev", "--in", "6s", "--payload", '{"echo": "later"}').stdout.strip()
    dropped = fleet.cli("submit", "dev", "--in", "6s", "--payload", '{"echo": "never"}').stdout.strip()
    assert fleet.cli("cancel", dropped).returncode == 0
    record = client.status(task_id)
    assert record.state == State.SCHEDULED and record.run_at is not None
    worker.stop()
    server.process.terminate()  # Redis goes away and comes back with what it had written
    server.process.wait(timeout=30)
    own_redis.append(start_redis(tmp_path / "redis", *AOF, port=server.port))
    fleet.start_worker().wait_for_line(" ready.")
    client = fleet.client()
    done = client.wait(task_id, 60)
    assert done.state == State.SUCCEEDED and done.started_at is not None
    assert datetime.fromisoformat(done.started_at) >= datetime.fromisoformat(record.run_at)
    assert client.status(dropped).state == State.CANCELLED and client.status(dropped).attempts == 0
    for bad, why in ((["--in", "10x"], "is not a duration"),
                     (["--at", "2026-12-01T09:00:00"], "no time zone"),
                     (["--at", "tomorrow"], "is not an ISO 8601 time")):
        refused = fleet.cli("submit", "dev", *bad)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr


def test_priorities_are_honoured_within_an_agents_queue(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    fleet.start_worker().wait_for_line(" ready.")
    assert fleet.cli("hosts", "drain", "testhost", "--wait", "--timeout", "60").returncode == 0
    order = [("low", "low"), ("normal", None), ("high", "high"), ("normal 2", "normal"), ("5", "5")]
    client = fleet.client()
    ids = {name: client.submit("dev", {"echo": name}, priority=priority) for name, priority in order}
    assert fleet.cli("hosts", "undrain", "testhost").returncode == 0
    records = client.wait_many(list(ids.values()), 60)
    started = sorted(records, key=lambda r: r.started_at or "")
    assert [r.result["echo"] for r in started if r.result] == ["high", "normal", "normal 2", "5", "low"]


def test_the_asyncio_client_waits_without_blocking_its_loop_on_one_connection(make_fleet: MakeFleet) -> None:
    from fleet.async_client import AsyncFleetClient

    fleet = make_fleet({"dev": {"concurrency": 2}})
    fleet.start_worker().wait_for_line(" ready.")

    async def orchestrate() -> tuple[list[str], list[Any], float, int]:
        async with AsyncFleetClient(fleet.settings) as client:
            ids = [await client.submit("dev", {"echo": str(n)}) for n in range(30)]
            slow = await client.submit("dev", {"sleep": 2})
            ticks: list[float] = []

            async def tick() -> None:  # what a blocked loop would stop
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(tick())
            ended = [record async for record in client.as_completed([*ids, slow], timeout=120)]
            ticker.cancel()
            gap = max(b - a for a, b in itertools.pairwise(ticks))
            pool = client.redis.connection_pool
            connections = len(pool._available_connections) + len(pool._in_use_connections)  # type: ignore[attr-defined]
            failing = await client.submit("dev", {"exit": 2})
            assert (await client.wait(failing, 60)).state == State.FAILED
            assert [r.state for r in await client.wait_many(ids[:3], 10)] == [State.SUCCEEDED] * 3
            with pytest.raises(TaskNotFound):
                await client.status("no-such-task")
            return [*ids, slow], ended, gap, connections

    ids, ended, gap, connections = asyncio.run(orchestrate())
    assert sorted(r.id for r in ended) == sorted(ids) and ended[-1].id == ids[-1]  # the slow one last
    assert {r.state for r in ended} == {State.SUCCEEDED}
    assert gap < 0.5, f"the event loop stood still for {gap:.2f} s"  # a blocking read would stop it 2 s
    assert connections == 1


def test_tasks_filters_combine_and_pages_follow_their_cursor_and_watch_follows_changes(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}, "boss": {}})
    watch = [FLEET, "tasks", "--watch", "--agent", "dev"]
    watcher = subprocess.Popen(watch, env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    terminal, its_side = pty.openpty()  # and one on a terminal: the live table
    table = subprocess.Popen(watch, env={**fleet.env, "TERM": "xterm", "COLUMNS": "200"}, stdin=its_side,
                             stdout=its_side, stderr=its_side)
    os.close(its_side)
    try:
        fleet.start_worker().wait_for_line(" ready.", count=2)
        assert watcher.stderr is not None and watcher.stdout is not None
        read_terminal(watcher.stderr.fileno(), lambda text: "watching" in text)  # following from here on
        read_terminal(terminal, lambda text: "watching" in text)
        client = fleet.client()
        keyed = client.submit("dev", {"echo": "keyed"}, key="build-7")
        ran = [keyed, *(client.submit("dev", {"echo": str(n)}) for n in range(4))]
        other = client.submit("boss", {"echo": "boss"})
        client.wait_many([*ran, other], 60)
        piped = read_terminal(watcher.stdout.fileno(), lambda text: all(
            any(task_id in line and " succeeded " in line for line in text.splitlines()) for task_id in ran))
        lines = piped.splitlines()
        shown = read_terminal(terminal, lambda text: all(
            any(task_id in line and "succeeded" in line for line in text.splitlines()) for task_id in ran))
    finally:
        for process in (watcher, table):
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 0
        os.close(terminal)
    assert all(any(task_id in line and " succeeded " in line for line in lines) for task_id in ran)
    assert "watching" in shown and other not in shown
    assert all(any(task_id in line and " running " in line for line in lines) for task_id in ran)
    assert not any(other in line for line in lines)  # boss's, filtered out

    def listed(*args: str) -> tuple[list[str], str]:
        done = fleet.cli("tasks", "--json", *args)
        assert done.returncode == 0, done.stderr
        return [task["id"] for task in json.loads(done.stdout)], done.stderr

    assert listed("--key", "build-7")[0] == [keyed]
    assert listed("--key", "build-7", "--agent", "boss")[0] == []
    assert listed("--host", "testhost", "--agent", "boss")[0] == [other]
    assert listed("--host", "elsewhere")[0] == []
    assert listed("--since", "1h", "--agent", "dev", "--state", "succeeded")[0] == list(reversed(ran))
    assert listed("--since", "2099-01-01T00:00:00Z")[0] == []
    pages, cursor = [], []
    while True:
        ids, more = listed("--agent", "dev", "--limit", "2", *cursor)
        pages.append(ids)
        if not more:
            break
        cursor = ["--cursor", more.split("--cursor ")[1].strip()]
    assert pages == [list(reversed(ran))[i:i + 2] for i in (0, 2, 4)]
    for args, why in ((["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601 time"),
                      (["--cursor", "nonsense"], "cursor: 'nonsense' is not a cursor fleet gave"),
                      (["--watch", "--json"], "--watch takes")):
        refused = fleet.cli("tasks", *args)
        assert refused.returncode == 2 and why in refused.stderr and len(refused.stderr.splitlines()) == 1
