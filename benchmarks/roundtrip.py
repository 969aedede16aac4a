"""Round trip of a trivial task, in one run on one Redis:

  (a) bare celery           publish → no-op task → result (the floor)
  (b) bare celery + cat     the same job fleet runs (`cat`), as a host subprocess: no isolation
  (c) fleet, exec           fleet submit → `cat` in the agent's container via one docker exec per task
  (d) fleet, channel        the same through the persistent channel (the default)
  (e) docker run            `docker run --rm fleet-agent:latest true` per task (a container per task)

then the ratios, the cold start (first task for an agent with no container),
the idle memory of an agent container, and throughput with 3 agents x 2 slots
against bare Celery with 6 slots (not measured yet).

The job is trivial on purpose (`cat` echoes the payload, which becomes the
result), so the figures are fleet's own overhead.
Usage: .venv/bin/python benchmarks/roundtrip.py [--tasks N]
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


def bare_celery(redis_url: str, n: int, slots: int, job: str = "noop") -> Figures:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT / "benchmarks")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_celery", "worker", "-P", "threads", "-c",
         str(slots), "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["BENCH_REDIS_URL"] = redis_url
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bare_celery

    task = getattr(bare_celery, job)
    try:
        return measure(
            f"(a) bare celery, no-op ({slots} slots)" if job == "noop"
            else f"(b) bare celery, cat as a host subprocess ({slots} slots)",
            lambda: task.delay().get(timeout=60),
            lambda k: [r.get(timeout=120) for r in [task.delay() for _ in range(k)]],
            n,
        )
    finally:
        worker.terminate()
        worker.wait()


def fleet_run(redis_url: str, n: int, slots: int, scratch: Path, forwarding: str) -> Figures:
    config = scratch / f"fleet-{forwarding}.toml"
    config.write_text(f'redis_url = "{redis_url}"\nnamespace = "bench"\nforwarding = "{forwarding}"\n'
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
        label = "(c) fleet, docker exec per task" if forwarding == "exec" else "(d) fleet, channel"
        return measure(f"{label} ({slots} slots)", one, batch, n)
    finally:
        worker.terminate()
        worker.wait()
        engine = docker.from_env()
        for container in engine.containers.list(all=True, filters={"label": "fleet.namespace=bench"}):
            container.remove(force=True)


def cold_start_and_idle_memory(redis_url: str, scratch: Path) -> tuple[list[float], float]:
    """Round trips of the first task after the agent's container was removed
    (container, supervisor and channel made on demand), and the memory of an
    idle agent container (init + sleep + supervisor)."""
    config = scratch / "fleet-cold.toml"
    config.write_text(f'redis_url = "{redis_url}"\nnamespace = "benchcold"\n'
                      f'secrets_dir = "{scratch / "secrets"}"\n[agents.cold]\ncommand = ["cat"]\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
           "FLEET_CONFIG": str(config)}
    os.environ["FLEET_CONFIG"] = str(config)
    from fleet.client import FleetClient
    from fleet.container.spec import build_spec

    client = FleetClient.from_settings()
    name = build_spec(client.settings, "cold").name
    worker = subprocess.Popen([str(Path(sys.executable).with_name("fleet")), "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    engine = docker.from_env()
    try:
        client.wait(client.submit("cold", {}), 60)
        stats = engine.containers.get(name).stats(stream=False)["memory_stats"]
        idle = (stats["usage"] - stats.get("stats", {}).get("cache", 0)) / 1024**2
        cold = []
        for _ in range(3):
            engine.containers.get(name).remove(force=True)
            start = time.perf_counter()
            client.wait(client.submit("cold", {}), 60)
            cold.append(time.perf_counter() - start)
        return cold, idle
    finally:
        worker.terminate()
        worker.wait()
        for container in engine.containers.list(all=True, filters={"label": "fleet.namespace=benchcold"}):
            container.remove(force=True)


def docker_run(n: int) -> Figures:
    engine = docker.from_env()

    def one() -> None:
        engine.containers.run("fleet-agent:latest", ["true"], remove=True, network_mode="none")

    def batch(k: int) -> None:
        for _ in range(k):
            one()

    return measure("(e) docker run --rm per task (sequential)", one, batch, n)


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
                bare_celery(server.url, args.tasks, args.slots, job="cat"),
                fleet_run(server.url, args.tasks, args.slots, Path(scratch), "exec"),
                fleet_run(server.url, args.tasks, args.slots, Path(scratch), "channel"),
                docker_run(max(5, args.tasks // 5)),
            ]
            cold, idle = cold_start_and_idle_memory(server.url, Path(scratch))
        finally:
            server.process.terminate()
            server.process.wait()
    base = results[0]
    table = Table(title=f"round trip of a trivial task ({args.tasks} tasks, one Redis, this machine)")
    for column in ("path", "p50 ms", "p95 ms", "tasks/s", "p50 x (a)", "tasks/s vs (a)"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for r in results:
        table.add_row(r.name, f"{r.p(0.5):.1f}", f"{r.p(0.95):.1f}", f"{r.throughput:.1f}",
                      f"{r.p(0.5) / base.p(0.5):.2f}", f"{r.throughput / base.throughput:.2f}")
    console.print(table)
    a, b, c, d = results[:4]
    console.print(f"channel p50: {d.p(0.5) / a.p(0.5):.2f} x (a), {d.p(0.5) / b.p(0.5):.2f} x (b); "
                  f"exec p50 / channel p50 = {c.p(0.5) / d.p(0.5):.1f}")
    console.print(f"cold start (no container → result): {', '.join(f'{t * 1000:.0f} ms' for t in cold)}")
    console.print(f"idle agent container (init + sleep + supervisor): {idle:.1f} MiB")


if __name__ == "__main__":
    main()
