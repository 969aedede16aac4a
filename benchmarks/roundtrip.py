"""Round trip of a trivial task, in one run on one Redis:

  bare celery     publish → no-op task → result (the floor)
  fleet (exec)    fleet submit → `cat` (echoes the payload: the result) in the agent's
                  container via docker exec → final record seen by the client
  docker run      `docker run --rm fleet-agent:latest true` per task (a container per task)

The job is trivial on purpose (`cat`, not the Python demo agent, whose own
start-up would hide fleet's overhead).

Prints p50/p95 latency, tasks/s with N tasks in flight, and ratios to bare
Celery. Usage: .venv/bin/python benchmarks/roundtrip.py [--tasks N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import start_redis  # noqa: E402  (the tests' redis-server helper)


@dataclass
class Figures:
    name: str
    latencies: list[float]
    throughput: float

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def measure(name: str, one: Callable[[], None], batch: Callable[[int], None], n: int) -> Figures:
    one()  # warm up: connections, containers
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    batch(n)
    return Figures(name, latencies, n / (time.perf_counter() - start))


def bare_celery(redis_url: str, n: int, slots: int) -> Figures:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT / "benchmarks")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_celery", "worker", "-P", "threads", "-c",
         str(slots), "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["BENCH_REDIS_URL"] = redis_url
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bare_celery import noop

    try:
        return measure(
            f"bare celery ({slots} slots)",
            lambda: noop.delay().get(timeout=60),
            lambda k: [r.get(timeout=120) for r in [noop.delay() for _ in range(k)]],
            n,
        )
    finally:
        worker.terminate()
        worker.wait()


def fleet_exec(redis_url: str, n: int, slots: int, scratch: Path) -> Figures:
    config = scratch / "fleet.toml"
    config.write_text(f'redis_url = "{redis_url}"\nnamespace = "bench"\n'
                      f'secrets_dir = "{scratch / "secrets"}"\n'
                      f'[agents.bench]\nconcurrency = {slots}\ncommand = ["cat"]\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
           "FLEET_CONFIG": str(config)}
    os.environ["FLEET_CONFIG"] = str(config)
    from fleet.client import FleetClient

    client = FleetClient.from_settings()
    worker = subprocess.Popen([str(Path(sys.executable).with_name("fleet")), "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)

    def one() -> None:
        client.wait(client.submit("bench", {}), 60)

    def batch(k: int) -> None:
        for task_id in [client.submit("bench", {}) for _ in range(k)]:
            client.wait(task_id, 300)

    try:
        return measure(f"fleet, docker exec per task ({slots} slots)", one, batch, n)
    finally:
        worker.terminate()
        worker.wait()
        engine = docker.from_env()
        for container in engine.containers.list(all=True, filters={"label": "fleet.namespace=bench"}):
            container.remove(force=True)


def docker_run(n: int) -> Figures:
    engine = docker.from_env()

    def one() -> None:
        engine.containers.run("fleet-agent:latest", ["true"], remove=True, network_mode="none")

    def batch(k: int) -> None:
        for _ in range(k):
            one()

    return measure("docker run --rm per task (sequential)", one, batch, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=50, help="tasks per measurement")
    parser.add_argument("--slots", type=int, default=2, help="worker slots")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch:
        server = start_redis(Path(scratch) / "redis")
        try:
            results = [
                bare_celery(server.url, args.tasks, args.slots),
                fleet_exec(server.url, args.tasks, args.slots, Path(scratch)),
                docker_run(max(5, args.tasks // 5)),
            ]
        finally:
            server.process.terminate()
            server.process.wait()
    base = results[0]
    table = Table(title=f"round trip of a trivial task ({args.tasks} tasks, one Redis, this machine)")
    for column in ("path", "p50 ms", "p95 ms", "tasks/s", "p50 x bare", "tasks/s vs bare"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for r in results:
        table.add_row(r.name, f"{r.p(0.5):.1f}", f"{r.p(0.95):.1f}", f"{r.throughput:.1f}",
                      f"{r.p(0.5) / base.p(0.5):.1f}", f"{r.throughput / base.throughput:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
