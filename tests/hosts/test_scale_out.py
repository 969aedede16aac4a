"""Scale-out on simulated hosts: three network namespaces on a bridge, each
running its own `fleet worker` with its own host id, reaching one Redis over
the virtual network and sharing the one Docker engine (containers named by
host). A host's link is cut with `ip link set … down`.

Figures (tasks per host, failover time) are printed; run with -s to see them."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from simhosts import SimulatedNetwork
from support import Fleet, MakeFleet, child_pids, eventually, overlapping, read_runs, wait_for_state

from fleet.container.spec import container_name
from fleet.errors import WaitTimeout
from fleet.record import ErrorKind, State

HOSTS = ["h1", "h2", "h3"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedNetwork]:
    made = SimulatedNetwork.create(tmp_path_factory.mktemp("simhosts"), HOSTS)
    yield made
    made.destroy()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def host_states(fleet: Fleet) -> dict[str, dict[str, Any]]:
    done = fleet.cli("hosts", "--json")
    assert done.returncode == 0, done.stderr
    return {h["host_id"]: h for h in map(json.loads, done.stdout.splitlines())}


def in_state(fleet: Fleet, host: str, state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        found = host_states(fleet).get(host)
        return found if found is not None and found["state"] == state else None
    return check


def start_hosts(fleet: Fleet, network: SimulatedNetwork, names: list[str]) -> dict[str, Any]:
    workers = {name: network.host(name).start_worker(fleet, network.redis_url) for name in names}
    for name, worker in workers.items():
        worker.wait_for_line(f"dev@{name} ready")
    return workers


def runs_on_every_host(fleet: Fleet, docker_client: docker.DockerClient, names: list[str],
                       record: str = "runs") -> list[Any]:
    """The runs recorded in the `record` file of each host's dev container."""
    runs = []
    for name in names:
        settings = fleet.settings.model_copy(update={"host_id": name})
        runs += read_runs(docker_client.containers.get(container_name(settings, "dev")), record)
    return runs


def test_tasks_spread_over_three_hosts_and_a_killed_host_shows_lost(
        make_fleet: MakeFleet, network: SimulatedNetwork) -> None:
    fleet = make_fleet({"dev": {"concurrency": 2}}, redis_url=network.redis_url, heartbeat_s=1)
    workers = start_hosts(fleet, network, HOSTS)
    # Three hosts, each beating with its container (made by its consumer after the first beat).
    hosts = eventually(lambda: h if len(h := host_states(fleet)) == 3
                       and all(s["containers"] for s in h.values()) else None, "3 hosts with containers")
    for name in HOSTS:
        assert hosts[name]["state"] == "up"
        assert hosts[name]["agents"] == ["dev"] and hosts[name]["slots"] == {"dev": 2}
        assert list(hosts[name]["containers"]) == [container_name(
            fleet.settings.model_copy(update={"host_id": name}), "dev")]
        assert time.time() - hosts[name]["heartbeat_at"] < 5
    agents = json.loads(fleet.cli("agents", "--json").stdout)
    assert (agents[0]["hosts"], agents[0]["slots"]) == (3, 6)

    client = fleet.client()
    ids = [client.submit("dev", {"sleep": 0.3}) for _ in range(30)]
    records = [client.wait(task_id, 120) for task_id in ids]
    assert {r.state for r in records} == {State.SUCCEEDED}
    per_host = Counter(r.host for r in records)
    print(f"\ntasks per host: {dict(sorted(per_host.items()))}")
    assert set(per_host) == set(HOSTS)
    assert min(per_host.values()) >= 3, per_host

    victim = workers["h3"]
    consumers = child_pids(victim.process.pid)
    assert consumers
    killed_at = time.monotonic()
    os.kill(victim.process.pid, signal.SIGKILL)  # `fleet worker` dies without a goodbye
    eventually(in_state(fleet, "h3", "lost"), "h3 shown lost", timeout=15)
    print(f"h3 shown lost {time.monotonic() - killed_at:.1f} s after its worker was killed")
    # Its consumers do not run on unseen: they get SIGTERM when it dies.
    assert victim.process.wait(timeout=10) == -signal.SIGKILL
    eventually(lambda: True if not any(map(alive, consumers)) else None, "h3's consumers to exit",
               timeout=30)
    hosts = host_states(fleet)
    assert (hosts["h1"]["state"], hosts["h2"]["state"]) == ("up", "up")
    agents = json.loads(fleet.cli("agents", "--json").stdout)
    assert (agents[0]["hosts"], agents[0]["slots"]) == (2, 4)
    text = fleet.cli("hosts").stdout
    assert "h3" in text and "lost" in text


def test_a_cut_link_moves_the_task_elsewhere_without_overlap_and_refuses_late_writes(
        make_fleet: MakeFleet, network: SimulatedNetwork, docker_client: docker.DockerClient) -> None:
    fleet = make_fleet({"dev": {}}, redis_url=network.redis_url, heartbeat_s=1, lease_ttl_s=3)
    workers = start_hosts(fleet, network, HOSTS)
    client = fleet.client()
    task_id = client.submit("dev", {"lines": 40, "interval": 0.25, "record": "runs"})
    first = wait_for_state(client, task_id, State.RUNNING)
    cut = network.host(first.host)
    cut.cut()
    cut_at = time.monotonic()
    try:
        second = eventually(lambda: r if (r := client.status(task_id)).attempts == 2
                            and r.state == State.RUNNING else None, "the take-over", timeout=30)
        failover_s = time.monotonic() - cut_at
        assert second.host != cut.name
        lost = [e.fields for e in client.store.events.of_task(task_id) if e.fields.get("error") == "lost"]
        assert lost, "the cut-off attempt was not recorded lost"
    finally:
        cut.restore()
    print(f"\nlink of {cut.name} cut: task running again on {second.host} after {failover_s:.1f} s")
    # Back on the network, the cut-off worker tries to store what its run
    # left (output, the attempt's end): refused, because attempt 2 took over.
    workers[cut.name].wait_for_line("of attempt 1 refused", timeout=60)
    record = client.wait(task_id, 120)
    assert (record.state, record.attempts, record.host) == (State.SUCCEEDED, 2, second.host)
    events = list(client.store.events.of_task(task_id))
    taken_over = next(n for n, e in enumerate(events) if e.fields.get("error") == "lost")
    later = "".join(e.fields["data"] for e in events[taken_over:] if e.type == "output").splitlines()
    # Only attempt 2's 40 lines and its result follow the take-over.
    assert later[:40] == [f"line {n}" for n in range(1, 41)] and len(later) == 41
    assert json.loads(later[40])["attempt"] == 2
    assert not any(e.type == "attempt_ended" for e in events), "attempt 1's late event was stored"
    runs = runs_on_every_host(fleet, docker_client, HOSTS)
    assert sorted(r.attempt for r in runs) == [1, 2]
    assert overlapping(runs) == [], runs
    assert [r.how for r in runs if r.attempt == 1] == ["killed"]  # fenced off: SIGTERM, not left running


def test_a_drained_host_takes_nothing_new_finishes_its_task_and_stays_drained_on_restart(
        make_fleet: MakeFleet, network: SimulatedNetwork) -> None:
    # Two slots: h1 has one free while its long task runs, so only the drain keeps tasks off it.
    fleet = make_fleet({"dev": {"concurrency": 2}}, redis_url=network.redis_url, heartbeat_s=1)
    workers = start_hosts(fleet, network, ["h1"])
    client = fleet.client()
    long_task = client.submit("dev", {"sleep": 4})
    assert wait_for_state(client, long_task, State.RUNNING).host == "h1"
    start_hosts(fleet, network, ["h2"])

    done = fleet.cli("hosts", "drain", "h1")
    assert done.returncode == 0 and "draining" in done.stdout, done.stderr
    eventually(in_state(fleet, "h1", "draining"), "h1 draining")  # its task still runs
    ids = [client.submit("dev", {"echo": n}) for n in range(8)]
    assert {client.wait(t, 60).host for t in ids} == {"h2"}
    done = fleet.cli("hosts", "drain", "h1", "--wait", "--timeout", "30")
    assert done.returncode == 0 and "h1 drained" in done.stdout, done.stdout + done.stderr
    assert (client.status(long_task).state, client.status(long_task).host) == (State.SUCCEEDED, "h1")

    # Honoured on restart: the flag lives in Redis, not in the worker.
    workers["h1"].stop()
    start_hosts(fleet, network, ["h1"])
    eventually(in_state(fleet, "h1", "drained"), "h1 drained after restart")
    ids = [client.submit("dev", {"echo": n}) for n in range(8)]
    assert {client.wait(t, 60).host for t in ids} == {"h2"}

    assert "takes tasks again" in fleet.cli("hosts", "undrain", "h1").stdout
    eventually(in_state(fleet, "h1", "up"), "h1 up")
    pinned = client.submit("dev", {"echo": "here"}, host="h1")
    assert (client.wait(pinned, 60).state, client.status(pinned).host) == (State.SUCCEEDED, "h1")


def test_a_pinned_task_runs_only_on_its_host_retries_included(
        make_fleet: MakeFleet, network: SimulatedNetwork, tmp_path: Path) -> None:
    fleet = make_fleet({"dev": {"transient_backoff_s": 0.2},
                        "solo": {"hosts": ["h1"]}}, redis_url=network.redis_url, heartbeat_s=1)
    start_hosts(fleet, network, HOSTS)
    client = fleet.client()
    eventually(lambda: True if len(host_states(fleet)) == 3 else None, "3 hosts")
    ids = []
    for n in range(6):
        done = fleet.cli("submit", "dev", "--host", "h2", "--payload", json.dumps({"echo": n}))
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())
    # Retries go back to h2's queue, not the shared one (which h1 and h3 would take 2 times in 3).
    flaky = [client.submit("dev", {"exit": 75, "fail_until_attempt": 2}, host="h2") for _ in range(4)]
    records = [client.wait(t, 60) for t in [*ids, *flaky]]
    assert {(r.state, r.host, r.pinned_host) for r in records} == {(State.SUCCEEDED, "h2", "h2")}
    for task_id in flaky:
        assert client.status(task_id).attempts == 2
        assert [e for e in client.store.events.of_task(task_id)
                if e.fields.get("error") == ErrorKind.TRANSIENT]

    # An agent restricted to h1 is served by h1 only.
    hosts = host_states(fleet)
    assert [h for h in HOSTS if "solo" in hosts[h]["agents"]] == ["h1"]
    solo = [client.submit("solo", {"echo": n}) for n in range(4)]
    assert {client.wait(t, 60).host for t in solo} == {"h1"}

    # Bad input: one line, exit 2, nothing queued.
    before = len(client.tasks())
    for args, message in [(["dev", "--host", "nosuch"], "no host 'nosuch' has registered"),
                          (["solo", "--host", "h2"], "agent 'solo' may not run on host 'h2'")]:
        done = fleet.cli("submit", *args, "--payload", "{}")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert len(client.tasks()) == before
    assert fleet.cli("hosts", "drain", "nosuch").returncode == 2


def most_at_once(runs: list[Any]) -> int:
    """The most runs going at one moment (a run with no recorded end counts as going on)."""
    edges = sorted([(r.start, 1) for r in runs] + [(r.end, -1) for r in runs if r.end is not None],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    going = most = 0
    for _, step in edges:
        going += step
        most = max(most, going)
    return most


def test_max_running_caps_an_agent_across_three_hosts_and_a_cut_off_hosts_slots_come_back(
        make_fleet: MakeFleet, network: SimulatedNetwork, docker_client: docker.DockerClient) -> None:
    """3 hosts of 2 slots with max_running 3: never more than 3 run at once,
    as the containers themselves recorded; tasks over the cap wait queued
    (one attempt each); a host cut off holds its slots only until its
    leases run out."""
    # lost_message_after_s: a message the cut-off host held stays with it for the visibility timeout
    fleet = make_fleet({"dev": {"concurrency": 2, "max_running": 3}}, redis_url=network.redis_url,
                       heartbeat_s=1, lease_ttl_s=3, lost_message_after_s=5)
    start_hosts(fleet, network, HOSTS)
    client = fleet.client()
    ids = [client.submit("dev", {"sleep": 1, "record": "capped"}) for _ in range(15)]
    records = client.wait_many(ids, 180)
    assert {(r.state, r.attempts) for r in records} == {(State.SUCCEEDED, 1)}  # waited queued, not retried
    runs = runs_on_every_host(fleet, docker_client, HOSTS, "capped")
    assert len(runs) == 15 and most_at_once(runs) == 3, runs
    print(f"\nmax_running 3 on 3 hosts of 2 slots: at most {most_at_once(runs)} at once, tasks per host "
          f"{dict(sorted(Counter(r.host for r in records).items()))}")

    # A host cut off while it runs: its slots are free again once its leases ran out.
    ids = [client.submit("dev", {"sleep": 2, "record": "after-cut"}) for _ in range(18)]
    first = eventually(lambda: next((r for r in client.store.records.many(ids) if r.state == State.RUNNING),
                                     None), "a running task")
    cut = network.host(first.host or "")
    cut.cut()
    cut_at = time.time()
    try:
        records = client.wait_many(ids, 120)
    except WaitTimeout:
        states = [(r.id, r.state, r.host) for r in client.store.records.many(ids)]
        raise AssertionError(f"not all ended: {states}") from None
    finally:
        cut.restore()
    assert {r.state for r in records} == {State.SUCCEEDED}
    after = runs_on_every_host(fleet, docker_client, HOSTS, "after-cut")
    assert most_at_once(after) <= 3, after
    elsewhere = [r for r in after if r.start > cut_at + 3 and r.task not in {first.id}]
    assert most_at_once(elsewhere) == 3, elsewhere  # the cut-off host's slots came back
