"""`fleet bench --only metrics`: what a Prometheus scrape of `fleet web`'s
/metrics costs with 10,000 tasks in Redis (200 per --tasks: at the default
of 50), against the same scrape of an
empty fleet (the baseline: what the number of tasks adds). The tasks are
written straight through the state store — 4 agents, every state, finished
ones with durations — and the collector is the one `/metrics` serves."""

from __future__ import annotations

import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from fleet.client import FleetClient
from fleet.connection import connect_redis
from fleet.record import State
from fleet.settings import FleetSettings
from fleet.web.metrics import FleetCollector

TASKS_PER_UNIT = 200  # tasks in Redis per --tasks
SCRAPES = 30
AGENTS = ("dev", "boss", "review", "docs")
ENDS = (State.SUCCEEDED, State.SUCCEEDED, State.SUCCEEDED, State.FAILED, State.CANCELLED)


def scrape_ms(settings: FleetSettings) -> tuple[list[float], int]:
    """Each scrape's time (ms) and the size of the last one."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(FleetClient(settings)))
    took, body = [], b""
    for _ in range(SCRAPES):
        started = time.perf_counter()
        body = generate_latest(registry)
        took.append((time.perf_counter() - started) * 1000)
    return took, len(body)


def fill(settings: FleetSettings, count: int) -> None:
    """`count` tasks: most finished (a run of a few seconds), some queued, running or retrying."""
    client = FleetClient(settings, connect_redis(settings))
    records = client.store.records
    for n in range(count):
        task_id, _ = records.create(AGENTS[n % len(AGENTS)], {"n": n})
        if n % 10 == 9:
            continue  # stays queued
        records.transition(task_id, State.RUNNING, update=lambda r: {"attempts": r.attempts + 1},
                           started_at="2026-11-30T00:00:00+00:00")
        if n % 10 == 8:
            continue  # stays running
        if n % 10 == 7:
            records.transition(task_id, State.RETRYING)
            continue
        records.transition(task_id, ENDS[n % len(ENDS)], finished_at=f"2026-11-30T00:00:{n % 60:02d}+00:00")


def metrics_scrape(redis_url: str, units: int, say: Any) -> dict[str, Any]:
    agents: dict[str, dict[str, Any]] = {name: {} for name in AGENTS}
    empty = FleetSettings.model_validate({"redis_url": redis_url, "namespace": "bench-metrics-empty",
                                          "agents": agents})
    full = empty.model_copy(update={"namespace": "bench-metrics"})
    tasks = units * TASKS_PER_UNIT
    say(f"metrics: {tasks} tasks in Redis, {SCRAPES} scrapes of /metrics, and as many of an empty fleet")
    fill(full, tasks)
    baseline, _ = scrape_ms(empty)
    loaded, size = scrape_ms(full)
    p50, base_p50 = statistics.median(loaded), statistics.median(baseline)
    return {"tasks": tasks, "scrapes": SCRAPES, "p50_ms": p50,
            "p95_ms": sorted(loaded)[int(0.95 * len(loaded))], "empty_p50_ms": base_p50,
            "ratio": p50 / base_p50, "bytes": size}
