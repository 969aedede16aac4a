"""The per-agent circuit breaker. After `breaker_threshold` consecutive
credential failures of one agent, the agent is paused: a flag in Redis that
every consumer of the agent, on every host, honours — also one that starts
or reconnects later, which a Celery broadcast alone would not reach. Tasks
stay queued meanwhile. Rotating the agent's token or `fleet agents resume`
clears the flag; a notice on the control channel tells consumers at once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.credentials.alerts import BREAKER_CLOSED, BREAKER_OPENED, Alerts
from fleet.state.control import Notice, announce
from fleet.state.keys import Keys


@dataclass(frozen=True)
class Pause:
    reason: str
    token: str
    since: float

    def describe(self) -> str:
        named = f" (token {self.token})" if self.token else ""
        return f"paused: {self.reason}{named}"


class Breaker:
    def __init__(self, client: redis.Redis, keys: Keys, alerts: Alerts) -> None:
        self.redis = client
        self.keys = keys
        self.alerts = alerts

    def paused(self, agent: str) -> Pause | None:
        with redis_errors():
            raw: Any = self.redis.hgetall(self.keys.paused(agent))
        if not raw:
            return None
        return Pause(raw.get("reason", ""), raw.get("token", ""), float(raw.get("since", 0)))

    def credential_failure(self, agent: str, token: str | None, threshold: int) -> bool:
        """Count one; returns True if this failure opened the breaker."""
        with redis_errors(), self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(self.keys.credential_failures(agent))
            pipe.hincrby(self.keys.stats_credential_failures, agent, 1)  # all time, for /metrics
            failures = int(pipe.execute()[0])
        if failures < threshold:
            return False
        return self.pause(agent, "credential failure", token or "", failures=failures)

    def succeeded(self, agent: str) -> None:
        with redis_errors():
            self.redis.delete(self.keys.credential_failures(agent))

    def pause(self, agent: str, reason: str, token: str = "", failures: int = 0) -> bool:
        """Open the breaker; False if it was open already."""
        fields: dict[Any, Any] = {"reason": reason, "token": token, "since": f"{time.time():.3f}"}
        with redis_errors(), self.redis.pipeline() as pipe:
            pipe.exists(self.keys.paused(agent))
            pipe.hset(self.keys.paused(agent), mapping=fields)
            existed, _ = pipe.execute()
        if existed:
            return False
        announce(self.redis, self.keys, Notice.PAUSED, agent)
        named = f" (token {token})" if token else ""
        self.alerts.emit(BREAKER_OPENED, agent,
                         f"agent {agent} paused after {failures} consecutive credential failures"
                         f"{named}; fix the token with `fleet tokens set {agent} {token or 'NAME'}`",
                         token=token)
        return True

    def resume(self, agent: str, why: str) -> bool:
        """Close the breaker; False if it was not open."""
        with redis_errors(), self.redis.pipeline() as pipe:
            pipe.delete(self.keys.paused(agent))
            pipe.delete(self.keys.credential_failures(agent))
            removed, _ = pipe.execute()
        if not removed:
            return False
        announce(self.redis, self.keys, Notice.RESUMED, agent)
        self.alerts.emit(BREAKER_CLOSED, agent, f"agent {agent} resumed: {why}")
        return True
