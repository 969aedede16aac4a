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

The job is trivial on purpose (`cat` echoes the payload, which becomes the
result), so the figures are fleet's own overhead. Everything the benchmark
makes in Docker belongs to a namespace starting with `bench-` and is removed
afterwards, with its state volumes."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from rich.console import Console
from rich.table import Table

from fleet.container.spec import LABEL_NAMESPACE
from fleet.errors import FleetError
from fleet.record import State, TaskRecord

PARTS = ("roundtrip", "cold", "throughput", "hundred")
IMAGE = "fleet-agent:latest"
HUNDRED = 100
MIB = 1024 * 1024
RUN_NAMESPACE = "bench-run"  # the label on (e)'s throwaway containers


@dataclass
class Figures:
    """One row of the round-trip table."""

    key: str
    name: str
    slots: int
    latencies: list[float]  # seconds, one task at a time
    throughput: float  # tasks/s, a batch submitted at once

    def p(self, q: float) -> float:
        """The q-quantile of the round trips, in ms."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "slots": self.slots, "p50_ms": self.p(0.5),
                "p95_ms": self.p(0.95), "tasks_per_s": self.throughput}


def measure(one: Callable[[], object], batch: Callable[[int], object],
            n: int) -> tuple[list[float], float]:
    """n round trips one at a time (after one to warm up), then the rate of
    a batch of n submitted at once."""
    one()  # warm up: connections, containers, channels
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - start)
    return latencies, rate(n, lambda: batch(n))


def rate(n: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return n / (time.perf_counter() - start)


def median_rate(n: int, work: Callable[[], object], runs: int = 3) -> float:
    """The median rate of `runs` batches of n: one batch lasts a second or
    two, and one disturbance on a small machine moves it a lot."""
    return statistics.median(rate(n, work) for _ in range(runs))


# -- processes and memory ------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def proc_kib(path: str, field: str) -> int:
    """A `Field:  N kB` line of a /proc file; 0 if the process is gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes_memory(pids: Sequence[int]) -> dict[str, float]:
    """The summed RSS (shared pages counted in each process) and PSS (shared
    pages split among their users) of these processes, in MiB."""
    rss = sum(proc_kib(f"/proc/{pid}/status", "VmRSS") for pid in pids)
    pss = sum(proc_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids)
    return {"processes": len(pids), "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def shim_pids(container_ids: set[str]) -> list[int]:
    """The containerd shims of these containers (the engine's per-container host process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"containerd-shim" not in argv[0]:
            continue
        if any(arg.decode(errors="replace") in container_ids for arg in argv):
            found.append(int(entry.name))
    return found


def container_memory(container: Container) -> float:
    """What `docker stats` shows for the container: its cgroup's usage less
    the inactive page cache, in bytes."""
    stats: dict[str, Any] = container.stats(stream=False, one_shot=True)  # type: ignore[assignment]
    memory = stats["memory_stats"]
    detail = memory.get("stats", {})
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return float(memory["usage"] - inactive)


def stop_process(process: subprocess.Popen[Any], timeout: float = 120) -> None:
    """SIGTERM, then after `timeout` SIGKILL to it and what it started (a
    `fleet worker` runs its consumers in sessions of their own)."""
    if process.poll() is not None:
        return
    family = process_tree(process.pid)
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in family:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the benchmark ------------------------------------------------------------


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
        from fleet import bench_celery

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
        from fleet import bench_celery

        bench_celery.app.send_task(name).get(timeout=timeout)

    def bare_batch(self, name: str, k: int) -> None:
        """k tasks submitted at once; returns when all are done."""
        from fleet import bench_celery

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
        self.engine.containers.run(IMAGE, ["true"], remove=True, network_mode="none",
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


class BenchFleet:
    """A fleet of the benchmark's own: a namespace, a config whose agents run
    `cat`, one `fleet worker`; on leaving, the worker is stopped and the
    namespace's containers and volumes are removed."""

    def __init__(self, bench: Bench, namespace: str, agents: dict[str, int],
                 forwarding: str = "channel") -> None:
        from fleet.client import FleetClient
        from fleet.settings import load_settings

        self.bench = bench
        self.namespace = namespace
        config = bench.scratch / f"{namespace}.toml"
        lines = [f"redis_url = {json.dumps(bench.redis_url)}", f"namespace = {json.dumps(namespace)}",
                 'host_id = "bench"', f"forwarding = {json.dumps(forwarding)}",
                 f"secrets_dir = {json.dumps(str(bench.scratch / 'secrets'))}"]
        for agent, slots in agents.items():
            lines += [f"[agents.{agent}]", 'command = ["cat"]', f"concurrency = {slots}"]
        config.write_text("\n".join(lines) + "\n")
        os.environ["FLEET_CONFIG"] = str(config)
        self.settings = load_settings()
        self.client = FleetClient(self.settings)
        self.env = {**bench.env, "FLEET_CONFIG": str(config)}
        self.log_path = bench.scratch / f"{namespace}-worker.log"
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchFleet:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.worker is not None:
            stop_process(self.worker, timeout=180)
        self.bench.remove_namespace(self.namespace)

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker"], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.worker

    def container_name(self, agent: str) -> str:
        from fleet.container.spec import build_spec

        return build_spec(self.settings, agent).name

    def run(self, agents: list[str], timeout: float = 120) -> None:
        """One task per entry of `agents`, all submitted at once; returns
        when all have succeeded."""
        try:
            for task_id in [self.client.submit(agent, {}) for agent in agents]:
                self.check(self.client.wait(task_id, timeout))
        except FleetError as error:
            raise FleetError(f"{error}; the worker's log:\n{log_tail(self.log_path)}") from None

    def check(self, record: TaskRecord) -> None:
        if record.state != State.SUCCEEDED:
            raise FleetError(f"benchmark task {record.id} of {record.agent} ended {record.state}: "
                             f"{record.error}")


# -- figures, goals and their display -----------------------------------------


def roundtrip_figures(rows: list[Figures]) -> dict[str, Any]:
    by = {r.key: r for r in rows}
    a, b, c, d, e = (by[k].p(0.5) for k in "abcde")
    return {"roundtrip": {r.key: r.as_dict() for r in rows},
            "ratios": {"d_p50_over_a": d / a, "d_p50_over_b": d / b, "c_p50_over_d": c / d,
                       "e_p50_over_d": e / d}}


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance issue's goals, for the parts that ran."""
    rows = []

    def goal(what: str, now: str, met: bool) -> None:
        rows.append({"goal": what, "now": now, "met": met})

    if "ratios" in report:
        r = report["ratios"]
        goal("channel p50 ≤ 1.5 x (a) and ≤ 1.25 x (b)",
             f"{r['d_p50_over_a']:.2f} x (a), {r['d_p50_over_b']:.2f} x (b)",
             r["d_p50_over_a"] <= 1.5 and r["d_p50_over_b"] <= 1.25)
        goal("channel ≥ 10 x faster than exec per task", f"{r['c_p50_over_d']:.1f} x",
             r["c_p50_over_d"] >= 10)
    if "throughput" in report:
        t = report["throughput"]
        goal("3 agents x 2 slots ≥ 50 % of bare Celery with 6 slots",
             f"{t['ratio_vs_cat']:.0%} of bare Celery running cat ({t['ratio_vs_noop']:.0%} of the no-op)",
             t["ratio_vs_cat"] >= 0.5)
    if "cold" in report:
        worst = max(report["cold"]["cold_start_ms"]) / 1000
        goal("cold start ≤ 1 s", f"{worst:.2f} s (worst of 3)", worst <= 1)
        idle = report["cold"]["idle_container_mib"]
        goal("idle agent container ≤ 16 MiB", f"{idle:.1f} MiB", idle <= 16)
    if "hundred" in report:
        h = report["hundred"]
        goal(f"{h['agents']} agent containers up in ≤ 60 s",
             f"{h['containers_running_s']:.0f} s to all running, "
             f"{h['first_tasks_done_s']:.0f} s until each answered a task", h["first_tasks_done_s"] <= 60)
    return rows


def print_report(report: dict[str, Any], console: Console) -> None:
    if "roundtrip" in report:
        rows = report["roundtrip"]
        base = rows["a"]
        table = Table(title=f"round trip of a trivial task ({report['tasks']} tasks, one Redis)")
        for column in ("path", "slots", "p50 ms", "p95 ms", "tasks/s", "p50 x (a)", "tasks/s vs (a)"):
            table.add_column(column, justify="left" if column == "path" else "right")
        for key, row in rows.items():
            table.add_row(f"({key}) {row['name']}", str(row["slots"]), f"{row['p50_ms']:.1f}",
                          f"{row['p95_ms']:.1f}", f"{row['tasks_per_s']:.1f}",
                          f"{row['p50_ms'] / base['p50_ms']:.2f}",
                          f"{row['tasks_per_s'] / base['tasks_per_s']:.2f}")
        console.print(table)
        r = report["ratios"]
        console.print(f"channel p50 = {r['d_p50_over_a']:.2f} x (a) = {r['d_p50_over_b']:.2f} x (b); "
                      f"exec per task = {r['c_p50_over_d']:.1f} x the channel; "
                      f"docker run = {r['e_p50_over_d']:.1f} x the channel")
    if "cold" in report:
        cold = report["cold"]
        console.print(f"cold start (no container → result): "
                      f"{', '.join(f'{t:.0f} ms' for t in cold['cold_start_ms'])}")
        console.print(f"idle agent container (init + sleep + supervisor): "
                      f"{cold['idle_container_mib']:.1f} MiB")
    if "throughput" in report:
        t = report["throughput"]
        table = Table(title=f"throughput, {t['tasks']} tasks submitted at once (median of 3)")
        for column in ("", "tasks/s", "fleet 3x2 / this"):
            table.add_column(column, justify="right" if column else "left")
        table.add_row("fleet, 3 agents x 2 slots, cat in the containers",
                      f"{t['fleet_3x2_tasks_per_s']:.1f}", "")
        table.add_row("bare Celery, 6 slots, cat as a host subprocess",
                      f"{t['bare6_cat_tasks_per_s']:.1f}", f"{t['ratio_vs_cat']:.0%}")
        table.add_row("bare Celery, 6 slots, no-op", f"{t['bare6_noop_tasks_per_s']:.1f}",
                      f"{t['ratio_vs_noop']:.0%}")
        console.print(table)
    if "hundred" in report:
        h = report["hundred"]
        table = Table(title=f"{h['agents']} agents (concurrency 1) on this host, one `fleet worker`")
        table.add_column("")
        table.add_column("", justify="right")
        table.add_row("all containers running", f"{h['containers_running_s']:.1f} s")
        table.add_row("every agent answered its first task", f"{h['first_tasks_done_s']:.1f} s")
        table.add_row("containers' memory (sum / mean)",
                      f"{h['containers_mib']:.0f} / {h['container_mean_mib']:.1f} MiB")
        table.add_row(f"worker processes ({h['worker_processes']}): RSS / PSS",
                      f"{h['worker_rss_mib']:.0f} / {h['worker_pss_mib']:.0f} MiB")
        table.add_row(f"containerd shims ({h['shim_processes']}): RSS / PSS",
                      f"{h['shims_rss_mib']:.0f} / {h['shims_pss_mib']:.0f} MiB")
        console.print(table)
    table = Table(title="goals")
    for column in ("goal", "now", "met"):
        table.add_column(column)
    for row in report["goals"]:
        table.add_row(row["goal"], row["now"], "[green]met[/]" if row["met"] else "[red]not met[/]")
    console.print(table)


def run_bench(tasks: int, parts: Sequence[str], as_json: bool) -> int:
    """Run the benchmark's `parts` (of PARTS) with `tasks` tasks per
    measurement; print a report (or one JSON object)."""
    from fleet.cli.private_redis import start_private_redis
    from fleet.container.engine import connect
    from fleet.container.image import has_image

    # Wide enough for the tables when the output is a file or a pipe.
    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 120)
    engine = connect(timeout=300)
    if not has_image(engine, IMAGE):
        raise FleetError(f"image {IMAGE} is missing: run `fleet image build`")
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
        finally:
            redis_process.terminate()
            redis_process.wait(timeout=30)
    report["goals"] = goals(report)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report, console)
    return 0
