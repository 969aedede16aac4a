"""The host registry: which hosts serve which agents, seen through Redis.

Each `fleet worker` registers its host and renews it every `heartbeat_s`
(agents, slots, containers with their spec hashes, version); each of its
consumer processes reports, on every housekeeping tick, how many tasks it
runs and whether it consumes. A host whose heartbeat is three beats old is
`lost`. Draining is a flag in Redis, so it outlives a worker restart: the
consumers of a drained host stop taking tasks, finish what they run, and
the host shows `drained` once every consumer has said so."""

from __future__ import annotations

import time
from enum import StrEnum

import redis
from pydantic import BaseModel, Field

from fleet.connection import redis_errors
from fleet.errors import UsageError
from fleet.state.control import Notice, announce
from fleet.state.keys import Keys
from fleet.version import __version__

LOST_AFTER_BEATS = 3
FORGET_AFTER_S = 24 * 3600  # a host's registration outlives its last heartbeat this long
REGISTRATION = "registration"
CONSUMER = "consumer:"


class HostState(StrEnum):
    UP = "up"
    DRAINING = "draining"  # told to drain; some consumer still runs or takes tasks
    DRAINED = "drained"  # every consumer stopped taking tasks and runs none
    STOPPED = "stopped"  # its worker ended cleanly
    LOST = "lost"  # heartbeat stopped


class Registration(BaseModel):
    """What a worker says of its host on every heartbeat."""

    host_id: str
    agents: list[str]
    slots: dict[str, int]  # agent → concurrency
    containers: dict[str, str] = Field(default_factory=dict)  # container name → spec hash
    specs: dict[str, str] = Field(default_factory=dict)  # agent → the hash its container should have
    version: str = Field(default=__version__)
    pid: int
    started_at: float
    heartbeat_at: float = 0.0
    stopped_at: float | None = None


class ConsumerReport(BaseModel):
    """What one consumer process of the host says on each housekeeping tick."""

    agent: str
    running: int
    consuming: bool
    at: float


class HostStatus(BaseModel):
    registration: Registration
    consumers: dict[str, ConsumerReport]
    drain_since: float | None
    state: HostState

    def view(self) -> dict[str, object]:
        """The `fleet hosts --json` shape."""
        return {**self.registration.model_dump(), "state": self.state,
                "drain_since": self.drain_since,
                "running": {a: c.running for a, c in self.consumers.items()}}


def host_state(registration: Registration, consumers: dict[str, ConsumerReport],
               drain_since: float | None, heartbeat_s: float, now: float) -> HostState:
    if registration.stopped_at is not None:
        return HostState.STOPPED
    if now - registration.heartbeat_at > LOST_AFTER_BEATS * heartbeat_s:
        return HostState.LOST
    if drain_since is None:
        return HostState.UP
    settled = all(
        (report := consumers.get(agent)) is not None and report.at >= drain_since
        and not report.consuming and report.running == 0
        for agent in registration.agents
    )
    return HostState.DRAINED if settled else HostState.DRAINING


class HostRegistry:
    def __init__(self, client: redis.Redis, keys: Keys, heartbeat_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.heartbeat_s = heartbeat_s

    # -- written by workers ------------------------------------------------------

    def beat(self, registration: Registration) -> None:
        now = time.time()
        data = registration.model_copy(update={"heartbeat_at": now}).model_dump_json()
        key = self.keys.host(registration.host_id)
        with redis_errors(), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, REGISTRATION, data)
            pipe.expire(key, FORGET_AFTER_S)
            pipe.zadd(self.keys.hosts, {registration.host_id: now})
            pipe.execute()

    def stopped(self, registration: Registration) -> None:
        self.beat(registration.model_copy(update={"stopped_at": time.time()}))

    def report(self, host: str, agent: str, running: int, consuming: bool) -> None:
        report = ConsumerReport(agent=agent, running=running, consuming=consuming, at=time.time())
        with redis_errors():
            self.redis.hset(self.keys.host(host), CONSUMER + agent, report.model_dump_json())

    def is_drained(self, host: str) -> bool:
        with redis_errors():
            return bool(self.redis.exists(self.keys.drain(host)))

    # -- operator's side ---------------------------------------------------------

    def drain(self, host: str) -> bool:
        """Tell `host` to drain; False if it already was."""
        self.get(host)
        with redis_errors():
            fresh = bool(self.redis.set(self.keys.drain(host), repr(time.time()), nx=True))
        announce(self.redis, self.keys, Notice.DRAIN, host)
        return fresh

    def undrain(self, host: str) -> bool:
        """Let `host` take tasks again; False if it was not drained."""
        self.get(host)
        with redis_errors():
            removed = bool(self.redis.delete(self.keys.drain(host)))
        announce(self.redis, self.keys, Notice.UNDRAIN, host)
        return removed

    def get(self, host: str) -> HostStatus:
        found = self._load([host])
        if not found:
            raise UsageError(f"no host {host!r} has registered (fleet hosts lists them)")
        return found[0]

    def all(self) -> list[HostStatus]:
        with redis_errors():
            found: list[str] = self.redis.zrange(self.keys.hosts, 0, -1)  # type: ignore[assignment]
        ids = [str(h) for h in found]
        return self._load(ids)

    def _load(self, ids: list[str]) -> list[HostStatus]:
        with redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            for host in ids:
                pipe.hgetall(self.keys.host(host))
                pipe.get(self.keys.drain(host))
            rows = pipe.execute()
        now, found = time.time(), []
        for host, raw, drain in zip(ids, rows[::2], rows[1::2], strict=True):
            if not raw or REGISTRATION not in raw:
                with redis_errors():
                    self.redis.zrem(self.keys.hosts, host)  # forgotten: its hash expired
                continue
            registration = Registration.model_validate_json(raw[REGISTRATION])
            consumers = {name.removeprefix(CONSUMER): ConsumerReport.model_validate_json(value)
                         for name, value in raw.items() if name.startswith(CONSUMER)}
            drain_since = None if drain is None else float(drain)
            state = host_state(registration, consumers, drain_since, self.heartbeat_s, now)
            found.append(HostStatus(registration=registration, consumers=consumers,
                                    drain_since=drain_since, state=state))
        return found

    def serving(self, agent: str) -> tuple[int, int]:
        """How many live hosts serve `agent`, with how many slots in all."""
        live = [h for h in self.all() if h.state in (HostState.UP, HostState.DRAINING)
                and agent in h.registration.agents]
        return len(live), sum(h.registration.slots.get(agent, 0) for h in live)
