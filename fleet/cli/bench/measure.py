"""The benchmark's measuring tools: round trips and rates, processes and
their memory, a container's memory, stopping a process tree."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.models.containers import Container

MIB = 1024 * 1024


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
