"""Counters of what tasks came to, kept in Redis for `/metrics`: written in
the same Lua call as the change of state they count (so a scrape reads a
few hashes, never the records), by the workers that end tasks.

    {ns}:stats:finished            hash  "<agent>|<state>" → tasks that ended so
    {ns}:stats:retries             hash  "<agent>|<error kind>" → attempts that ended retrying
    {ns}:stats:duration:{agent}    hash  a histogram of finished runs' durations: the count of
                                         each bucket (not cumulative), "sum" and "count"
    {ns}:stats:credential-failures hash  agent → credential failures, all time

Counters only grow (Prometheus computes rates from them); a Redis that
loses them (a flush, a restart without persistence) starts them again,
which Prometheus reads as a counter reset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from redis.client import Pipeline

from fleet.connection import redis_errors
from fleet.record import FINAL_STATES, State, TaskRecord
from fleet.state.keys import Keys

# Upper bounds (seconds) of the duration buckets: an agent's run takes seconds to hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, math.inf)


def bucket_of(seconds: float) -> str:
    """The field of the smallest bucket a duration fits in ("+Inf" for the last)."""
    bound = next(b for b in DURATION_BUCKETS if seconds <= b)
    return "+Inf" if bound == math.inf else f"{bound:g}"


def count_change(pipe: Pipeline, keys: Keys, before: State | None, record: TaskRecord) -> None:
    """Add a change of state's counts to the writes of that change."""
    if record.state in FINAL_STATES:
        pipe.hincrby(keys.stats_finished, f"{record.agent}|{record.state}", 1)
        if before == State.RUNNING and record.started_at and record.finished_at:  # a run that ended
            took = max(0.0, (datetime.fromisoformat(record.finished_at)
                             - datetime.fromisoformat(record.started_at)).total_seconds())
            histogram = keys.stats_duration(record.agent)
            pipe.hincrby(histogram, bucket_of(took), 1)
            pipe.hincrbyfloat(histogram, "sum", took)
            pipe.hincrby(histogram, "count", 1)
    elif record.state == State.RETRYING and before != State.RETRYING:
        kind = record.error.kind if record.error is not None else "unknown"
        pipe.hincrby(keys.stats_retries, f"{record.agent}|{kind}", 1)


@dataclass
class Histogram:
    buckets: list[tuple[str, float]] = field(default_factory=list)  # cumulative, "+Inf" last
    total: float = 0.0
    count: int = 0


@dataclass
class Counts:
    """What the counters say, by label."""

    finished: dict[tuple[str, str], int]  # (agent, state)
    retries: dict[tuple[str, str], int]  # (agent, error kind)
    credential_failures: dict[str, int]
    durations: dict[str, Histogram]


def read_counts(client: redis.Redis, keys: Keys, agents: list[str]) -> Counts:
    """Every counter, in one round trip."""
    with redis_errors(), client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stats_finished)
        pipe.hgetall(keys.stats_retries)
        pipe.hgetall(keys.stats_credential_failures)
        for agent in agents:
            pipe.hgetall(keys.stats_duration(agent))
        finished, retries, credential, *durations = pipe.execute()
    return Counts(pairs(finished), pairs(retries), {k: int(v) for k, v in credential.items()},
                  {agent: histogram(raw) for agent, raw in zip(agents, durations, strict=True) if raw})


def pairs(raw: dict[str, Any]) -> dict[tuple[str, str], int]:
    out = {}
    for name, value in raw.items():
        first, sep, second = name.partition("|")
        if sep:
            out[(first, second)] = int(value)
    return out


def histogram(raw: dict[str, str]) -> Histogram:
    made, running = Histogram(total=float(raw.get("sum", 0)), count=int(raw.get("count", 0))), 0
    for bound in DURATION_BUCKETS:
        name = "+Inf" if bound == math.inf else f"{bound:g}"
        running += int(raw.get(name, 0))
        made.buckets.append((name, float(running)))
    return made
