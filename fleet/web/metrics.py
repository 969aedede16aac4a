"""`/metrics`: the fleet in Prometheus' format, read from Redis at scrape
time by a prometheus_client collector — a few pipelined round trips,
whatever the number of tasks: per-agent-and-state counts are ZINTERCARDs of
two indexes (computed by Redis, no record is read), and what tasks came to
is kept in counters written with each change of state (fleet.state.stats)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fleet.client import FleetClient
from fleet.connection import redis_errors
from fleet.record import FINAL_STATES, State
from fleet.state.hosts import HostState
from fleet.state.stats import read_counts


class FleetCollector(Collector):
    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        client, keys = self.client, self.client.store.keys
        agents = sorted(client.settings.agents)
        redis = client.store.redis
        with redis_errors(), redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                for state in State:
                    pipe.zintercard(2, [keys.by_agent(agent), keys.by_state(state)])
                pipe.exists(keys.paused(agent))
            rows: list[Any] = pipe.execute()
        per_agent = len(State) + 1
        tasks = GaugeMetricFamily("fleet_tasks", "Tasks in each state (those Redis keeps).",
                                  labels=["agent", "state"])
        breaker = GaugeMetricFamily("fleet_breaker_open", "1 while the agent's circuit breaker is open.",
                                    labels=["agent"])
        for n, agent in enumerate(agents):
            row = rows[n * per_agent:(n + 1) * per_agent]
            for state, count in zip(State, row, strict=False):
                tasks.add_metric([agent, str(state)], int(count))
            breaker.add_metric([agent], int(bool(row[-1])))
        yield tasks
        yield breaker
        yield from self.counters(agents)
        yield from self.hosts_and_queues(agents)

    def counters(self, agents: list[str]) -> Iterator[Metric]:
        counts = read_counts(self.client.store.redis, self.client.store.keys, agents)
        finished = CounterMetricFamily("fleet_tasks_finished", "Tasks that ended, by outcome.",
                                       labels=["agent", "outcome"])
        for agent in agents:
            for state in sorted(FINAL_STATES):
                finished.add_metric([agent, str(state)], counts.finished.get((agent, str(state)), 0))
        yield finished
        retries = CounterMetricFamily("fleet_task_retries", "Attempts that ended to be retried, by why.",
                                      labels=["agent", "kind"])
        for (agent, kind), count in sorted(counts.retries.items()):
            retries.add_metric([agent, kind], count)
        yield retries
        credential = CounterMetricFamily("fleet_credential_failures", "Credential failures of an agent.",
                                         labels=["agent"])
        for agent in agents:
            credential.add_metric([agent], counts.credential_failures.get(agent, 0))
        yield credential
        duration = HistogramMetricFamily("fleet_task_duration_seconds",
                                         "How long finished runs took (start of the last attempt to end).",
                                         labels=["agent"])
        for agent, histogram in sorted(counts.durations.items()):
            buckets = [(floatToGoString(float(bound)), count)  # type: ignore[no-untyped-call]
                       for bound, count in histogram.buckets]
            duration.add_metric([agent], buckets, sum_value=histogram.total)
        yield duration

    def hosts_and_queues(self, agents: list[str]) -> Iterator[Metric]:
        client, now = self.client, time.time()
        hosts = client.hosts.all()
        up = GaugeMetricFamily("fleet_host_up", "1 while the host's heartbeat is fresh (up or draining).",
                               labels=["host"])
        age = GaugeMetricFamily("fleet_host_heartbeat_age_seconds", "Since the host's last heartbeat.",
                                labels=["host"])
        running = GaugeMetricFamily("fleet_running", "Tasks running, by agent and host.",
                                    labels=["agent", "host"])
        for host in hosts:
            name = host.registration.host_id
            up.add_metric([name], int(host.state in (HostState.UP, HostState.DRAINING)))
            age.add_metric([name], max(0.0, now - host.registration.heartbeat_at))
            for agent, report in sorted(host.consumers.items()):
                running.add_metric([agent, name], report.running)
        yield up
        yield age
        yield running
        depth = GaugeMetricFamily("fleet_queue_depth", "Messages waiting in the agent's queues.",
                                  labels=["agent"])
        for agent in agents:
            depth.add_metric([agent], client.queue_depth(agent, hosts))
        yield depth
