"""`fleet bench`: what fleet costs, measured in one run on one private Redis.

  roundtrip   round trip (p50, p95) and throughput of a trivial task:
                (a) bare Celery, no-op task → result (the floor)
                (b) bare Celery running `cat` as a host subprocess (fleet's job, no isolation)
                (c) fleet, `cat` in the agent's container, one `docker exec` per task
                (d) fleet, the same through the persistent channel (the default)
                (e) `docker run --rm` per task (a container per task)
  cold        the first task for an agent with no container; an idle agent container's memory
  throughput  3 agents x 2 slots under one `fleet worker` against bare Celery with 6 thread slots
  hundred     100 agents (concurrency 1) on this host: the time until all containers run and
              each has answered one task, and the memory of the containers and of the worker
  cli         the start-up of `fleet --help` and `fleet status ID`, against `python -c pass`
  egress      an HTTPS request through fleet's egress proxy against the same request made
              directly (bench/egress.py)
  metrics     a scrape of /metrics with 200 x N tasks in Redis (10,000 at the default N)
              against an empty fleet's (bench/metrics.py)
  real-agent  Claude Code cloning, committing and pushing to a stand-in forge through the
              proxy, against the same job in plain git commands (bench/real_agent.py; builds
              the claude-code recipe; N/10 tasks each, at least 3)

The job is trivial on purpose (`cat` echoes the payload, which becomes the
result), so the figures are fleet's own overhead. Everything the benchmark
makes in Docker belongs to a namespace starting with `bench-` and is removed
afterwards, with its state volumes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from rich.console import Console

from fleet.cli.bench.fleet_under_test import BenchFleet
from fleet.cli.bench.measure import (
    MIB,
    Figures,
    container_memory,
    log_tail,
    measure,
    median_rate,
    process_tree,
    processes_memory,
    shim_pids,
    stop_process,
)
from fleet.cli.bench.report import goals, print_report, roundtrip_figures
from fleet.container.spec import LABEL_NAMESPACE
from fleet.errors import FleetError
from fleet.settings import AGENT_IMAGE

PARTS = ("roundtrip", "cold", "throughput", "hundred", "cli", "egress", "metrics", "real-agent")
HUNDRED = 100

RUN_NAMESPACE = "bench-run"  # the label on (e)'s throwaway containers
CLI_RUNS = 15


class Bench:
    """One run: its scratch directory, private Redis and Docker engine."""

    def __init__(self, scratch: Path, redis_url: str, engine: docker.DockerClient,
                 console: Console) -> None:
        self.scratch = scratch
        self.redis_url = redis_url
        self.engine = engine
        self.console = console
        # The benchmark is its own world: its configs, not the caller's FLEET_* overrides.
        for name in [n for n in os.environ if n.startswith("FLEET_")]:
            del os.environ[name]
        self.env = dict(os.environ)

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/]")

    @contextmanager
    def bare_worker(self, slots: int) -> Iterator[None]:
        """A bare Celery worker (fleet.cli.bench.celery_baseline) with `slots` threads."""
        from fleet.cli.bench import celery_baseline as bench_celery

        bench_celery.configure(self.redis_url)
        with (self.scratch / f"bare-{slots}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "fleet.cli.bench.celery_baseline", "worker",
                 "-P", "threads", "-c", str(slots), "-n", f"bench-{slots}@%h", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                env={**self.env, bench_celery.REDIS_URL_ENV: self.redis_url}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield
        finally:
            stop_process(process)

    def bare_task(self, name: str, timeout: float = 60) -> None:
        from fleet.cli.bench import celery_baseline as bench_celery

        bench_celery.app.send_task(name).get(timeout=timeout)

    def bare_batch(self, name: str, k: int) -> None:
        """k tasks submitted at once; returns when all are done."""
        from fleet.cli.bench import celery_baseline as bench_celery

        for result in [bench_celery.app.send_task(name) for _ in range(k)]:
            result.get(timeout=600)

    def roundtrip(self, n: int) -> list[Figures]:
        rows = []
        with self.bare_worker(2):
            rows.append(self.bare_roundtrip("a", "bench.noop", "bare Celery, no-op task", n))
            rows.append(self.bare_roundtrip("b", "bench.cat", "bare Celery, `cat` as a host subprocess", n))
        rows.append(self.fleet_roundtrip("c", "exec", "fleet, one `docker exec` per task", n))
        rows.append(self.fleet_roundtrip("d", "channel", "fleet, the channel (default)", n))
        runs = max(5, n // 5)
        self.say(f"(e) docker run --rm per task ({runs} runs)")
        try:
            latencies, tps = measure(self.docker_run, self.docker_runs, runs)
        finally:
            self.remove_namespace(RUN_NAMESPACE)
        rows.append(Figures("e", "`docker run --rm` per task", 1, latencies, tps))
        return rows

    def bare_roundtrip(self, key: str, task: str, name: str, n: int) -> Figures:
        self.say(f"({key}) {name}")
        latencies, tps = measure(partial(self.bare_task, task), partial(self.bare_batch, task), n)
        return Figures(key, name, 2, latencies, tps)

    def fleet_roundtrip(self, key: str, forwarding: str, name: str, n: int) -> Figures:
        self.say(f"({key}) {name}")
        with BenchFleet(self, f"bench-{forwarding}", {"rt": 2}, forwarding) as fleet:
            fleet.start()
            latencies, tps = measure(lambda: fleet.run(["rt"]), lambda k: fleet.run(["rt"] * k), n)
        return Figures(key, name, 2, latencies, tps)

    def docker_runs(self, k: int) -> None:
        for _ in range(k):
            self.docker_run()

    def docker_run(self) -> None:
        self.engine.containers.run(AGENT_IMAGE, ["true"], remove=True, network_mode="none",
                                   labels={LABEL_NAMESPACE: RUN_NAMESPACE})

    def cold(self) -> dict[str, Any]:
        """Round trips of the first task after the agent's container was
        removed (container, supervisor and channel made on demand), and the
        memory of the idle agent container (init + sleep + supervisor)."""
        self.say("cold start and idle memory")
        with BenchFleet(self, "bench-cold", {"cold": 1}) as fleet:
            fleet.start()
            fleet.run(["cold"])
            name = fleet.container_name("cold")
            idle = container_memory(self.engine.containers.get(name)) / MIB
            cold = []
            for _ in range(3):
                self.engine.containers.get(name).remove(force=True)
                start = time.perf_counter()
                fleet.run(["cold"])
                cold.append((time.perf_counter() - start) * 1000)
        return {"cold_start_ms": cold, "idle_container_mib": idle}

    def throughput(self, n: int) -> dict[str, Any]:
        """n trivial tasks submitted at once (the median of three batches):
        3 agents x 2 slots against bare Celery with 6 thread slots."""
        self.say(f"throughput: bare Celery, 6 slots ({n} tasks)")
        bare: dict[str, float] = {}
        with self.bare_worker(6):
            for job in ("noop", "cat"):
                self.bare_task(f"bench.{job}")
                bare[job] = median_rate(n, partial(self.bare_batch, f"bench.{job}", n))
        self.say(f"throughput: fleet, 3 agents x 2 slots ({n} tasks)")
        agents = ["t1", "t2", "t3"]
        with BenchFleet(self, "bench-3x2", dict.fromkeys(agents, 2)) as fleet:
            fleet.start()
            fleet.run(agents)  # warm up: every container and channel up
            fleet_tps = median_rate(n, lambda: fleet.run([agents[i % 3] for i in range(n)], timeout=600))
        return {"tasks": n, "fleet_3x2_tasks_per_s": fleet_tps, "bare6_cat_tasks_per_s": bare["cat"],
                "bare6_noop_tasks_per_s": bare["noop"], "ratio_vs_cat": fleet_tps / bare["cat"],
                "ratio_vs_noop": fleet_tps / bare["noop"]}

    def hundred(self, count: int = HUNDRED) -> dict[str, Any]:
        """`count` agents of concurrency 1 under one `fleet worker`: one task
        per agent is queued first, then the worker starts; the time until
        every container runs and until every task is done, then the memory."""
        self.say(f"{count} agents: bringing up their containers and consumers")
        agents = [f"h{i:03d}" for i in range(count)]
        namespace = "bench-hundred"
        with BenchFleet(self, namespace, dict.fromkeys(agents, 1)) as fleet:
            ids = [fleet.client.submit(agent, {}) for agent in agents]
            start = time.perf_counter()
            worker = fleet.start()
            running_s = done_s = None
            pending = set(ids)
            running: list[Container] = []
            running_filter: dict[str, str | list[str] | bool] = {
                "label": f"{LABEL_NAMESPACE}={namespace}", "status": "running"}
            while running_s is None or done_s is None:
                now = time.perf_counter() - start
                if now > 900 or worker.poll() is not None:
                    raise FleetError(f"{count} agents: {len(running)} containers running and "
                                     f"{count - len(pending)} tasks final after {now:.0f} s; "
                                     f"the worker's log:\n{log_tail(fleet.log_path)}")
                if running_s is None:
                    running = self.engine.containers.list(filters=running_filter)
                    if len(running) >= count:
                        running_s = now
                pending = {i for i in pending if not fleet.client.status(i).state.final}
                if not pending and done_s is None:
                    done_s = now
                time.sleep(0.5)
            for task_id in ids:
                fleet.check(fleet.client.status(task_id))
            self.say(f"{count} agents: measuring memory")
            with ThreadPoolExecutor(8) as pool:
                containers = sum(pool.map(container_memory, running)) / MIB
            consumers = processes_memory(process_tree(worker.pid))
            shims = processes_memory(shim_pids({str(c.id) for c in running}))
        return {"agents": count, "containers_running_s": running_s, "first_tasks_done_s": done_s,
                "containers_mib": containers, "container_mean_mib": containers / count,
                "worker_processes": consumers["processes"], "worker_rss_mib": consumers["rss_mib"],
                "worker_pss_mib": consumers["pss_mib"], "shim_processes": shims["processes"],
                "shims_rss_mib": shims["rss_mib"], "shims_pss_mib": shims["pss_mib"]}

    def cli_start(self, runs: int = CLI_RUNS) -> dict[str, Any]:
        """Wall time of `fleet --help` and of `fleet status ID` (a record
        read from the benchmark's Redis), each a fresh process as a user
        runs it, against the interpreter's own start (`python -c pass`); the
        median of `runs` of each."""
        self.say(f"command line start-up ({runs} runs each)")
        executable = Path(sys.executable).with_name("fleet")
        fleet = [str(executable)] if executable.exists() else [sys.executable, "-m", "fleet.cli"]
        with BenchFleet(self, "bench-cli", {"c": 1}) as bench_fleet:
            task_id, _ = bench_fleet.client.store.records.create("c", {})
            commands = {"python": [sys.executable, "-c", "pass"], "help": [*fleet, "--help"],
                        "status": [*fleet, "status", task_id]}
            medians = {}
            for name, argv in commands.items():
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    subprocess.run(argv, env=bench_fleet.env, stdout=subprocess.DEVNULL, check=True)
                    times.append(time.perf_counter() - start)
                medians[name] = statistics.median(times) * 1000
        return {"runs": runs, "python_ms": medians["python"], "help_ms": medians["help"],
                "status_ms": medians["status"]}

    def remove_namespace(self, namespace: str) -> None:
        """Remove the containers and state volumes of one of the benchmark's namespaces."""
        label: dict[str, str | list[str] | bool] = {"label": f"{LABEL_NAMESPACE}={namespace}"}

        def remove(thing: Any) -> None:
            with suppress(docker.errors.NotFound):
                thing.remove(force=True)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(remove, self.engine.containers.list(all=True, filters=label,
                                                              ignore_removed=True)))
            list(pool.map(remove, self.engine.volumes.list(filters=label)))


def run_bench(tasks: int, parts: Sequence[str], as_json: bool) -> int:
    """Run the benchmark's `parts` (of PARTS) with `tasks` tasks per
    measurement; print a report (or one JSON object)."""
    from fleet.cli.private_redis import start_private_redis
    from fleet.container.engine import connect
    from fleet.container.image import has_image

    # Wide enough for the tables when the output is a file or a pipe.
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 120)
    engine = connect(timeout=300)
    if not has_image(engine, AGENT_IMAGE):
        raise FleetError(f"image {AGENT_IMAGE} is missing: run `fleet image build`")
    report: dict[str, Any] = {"tasks": tasks, "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch:
        redis_process, redis_url = start_private_redis(Path(scratch) / "redis", persist=False)
        bench = Bench(Path(scratch), redis_url, engine, console)
        try:
            if "roundtrip" in parts:
                report.update(roundtrip_figures(bench.roundtrip(tasks)))
            if "cold" in parts:
                report["cold"] = bench.cold()
            if "throughput" in parts:
                report["throughput"] = bench.throughput(max(tasks * 4, 12))
            if "hundred" in parts:
                report["hundred"] = bench.hundred()
            if "cli" in parts:
                report["cli"] = bench.cli_start()
            if "egress" in parts:
                from fleet.cli.bench.egress import egress_overhead

                bench.say(f"egress: {tasks} HTTPS requests each way, directly and through the proxy")
                report["egress"] = egress_overhead(engine, Path(scratch), tasks)
            if "metrics" in parts:
                from fleet.cli.bench.metrics import metrics_scrape

                report["metrics"] = metrics_scrape(redis_url, tasks, bench.say)
            if "real-agent" in parts:
                from fleet.cli.bench.real_agent import real_agent_costs

                report["real-agent"] = real_agent_costs(engine, bench, max(3, tasks // 10), bench.say)
        finally:
            redis_process.terminate()
            redis_process.wait(timeout=30)
    report["goals"] = goals(report)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report, console)
    return 0
