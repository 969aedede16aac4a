"""The host registry's states, and its records in Redis (fakeredis here; the
simulated-host tests use a real server over a virtual network)."""

from __future__ import annotations

import fakeredis
import pytest

from fleet.errors import UsageError
from fleet.state.hosts import ConsumerReport, HostRegistry, HostState, Registration, host_state
from fleet.state.keys import Keys

NOW = 1_000_000.0


def registration(**changes: object) -> Registration:
    base = Registration(host_id="h1", agents=["dev", "boss"], slots={"dev": 2, "boss": 1}, pid=1,
                        started_at=NOW - 100, heartbeat_at=NOW - 1)
    return base.model_copy(update=changes)


def report(agent: str, at: float, running: int = 0, consuming: bool = False) -> ConsumerReport:
    return ConsumerReport(agent=agent, running=running, consuming=consuming, at=at)


def test_a_host_is_up_while_it_beats_and_lost_after_three_missed_beats() -> None:
    assert host_state(registration(), {}, None, heartbeat_s=5, now=NOW) == HostState.UP
    assert host_state(registration(heartbeat_at=NOW - 14), {}, None, 5, NOW) == HostState.UP
    assert host_state(registration(heartbeat_at=NOW - 16), {}, None, 5, NOW) == HostState.LOST
    assert host_state(registration(stopped_at=NOW - 2), {}, None, 5, NOW) == HostState.STOPPED


def test_drained_only_once_every_consumer_said_so_after_the_drain() -> None:
    since = NOW - 10
    idle = {"dev": report("dev", NOW - 1), "boss": report("boss", NOW - 1)}
    assert host_state(registration(), idle, since, 5, NOW) == HostState.DRAINED
    busy = {**idle, "dev": report("dev", NOW - 1, running=1)}
    assert host_state(registration(), busy, since, 5, NOW) == HostState.DRAINING
    consuming = {**idle, "boss": report("boss", NOW - 1, consuming=True)}
    assert host_state(registration(), consuming, since, 5, NOW) == HostState.DRAINING
    before_drain = {**idle, "boss": report("boss", since - 1)}
    assert host_state(registration(), before_drain, since, 5, NOW) == HostState.DRAINING
    assert host_state(registration(), {"dev": idle["dev"]}, since, 5, NOW) == HostState.DRAINING


@pytest.fixture
def registry() -> HostRegistry:
    return HostRegistry(fakeredis.FakeRedis(decode_responses=True), Keys("ns"), heartbeat_s=5)


def test_registry_round_trip_drain_and_serving(registry: HostRegistry) -> None:
    registry.beat(registration())
    registry.beat(registration(host_id="h2", agents=["dev"], slots={"dev": 3}))
    assert [h.registration.host_id for h in registry.all()] == ["h1", "h2"]
    assert registry.serving("dev") == (2, 5) and registry.serving("boss") == (1, 1)
    assert registry.drain("h1") and not registry.drain("h1")
    assert registry.is_drained("h1") and not registry.is_drained("h2")
    assert registry.get("h1").state == HostState.DRAINING
    registry.report("h1", "dev", running=0, consuming=False)
    registry.report("h1", "boss", running=0, consuming=False)
    assert registry.get("h1").state == HostState.DRAINED
    assert registry.undrain("h1") and not registry.undrain("h1")
    assert registry.get("h1").state == HostState.UP
    registry.stopped(registration(host_id="h2", agents=["dev"], slots={"dev": 3}))
    assert registry.get("h2").state == HostState.STOPPED and registry.serving("dev") == (1, 2)
    with pytest.raises(UsageError, match="no host 'h9' has registered"):
        registry.drain("h9")
