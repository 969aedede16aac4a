"""Helpers for the tests: real redis-server processes, fleet configs and
`fleet worker` processes, and per-run names so repeated runs neither collide
nor leak."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import redis

from fleet.container.spec import LABEL_NAMESPACE
from fleet.settings import FleetSettings

RUN_PREFIX = f"t{uuid.uuid4().hex[:6]}"
_namespaces = itertools.count(1)
FLEET = str(Path(sys.executable).with_name("fleet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def start_redis(directory: Path, *extra: str, port: int | None = None,
                bind: str = "127.0.0.1") -> RedisServer:
    """A redis-server on a free port (or `port`) at `bind`; returns once it
    accepts connections (it says so on its stdout)."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", bind, "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--logfile", "", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "Ready to accept connections" in line:
            break
    else:
        raise RuntimeError(f"redis-server on port {port} did not start:\n{''.join(seen)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
    return RedisServer(f"redis://{bind}:{port}/0", port, process)




def remove_run_resources(client: docker.DockerClient) -> None:
    # Other tests remove their containers meanwhile: one gone between listing and reading is skipped.
    listed = client.containers.list(all=True, filters={"label": LABEL_NAMESPACE}, ignore_removed=True)
    for container in listed:
        if container.labels.get(LABEL_NAMESPACE, "").startswith(RUN_PREFIX):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
    for volume in client.volumes.list(filters={"label": LABEL_NAMESPACE}):
        if (volume.attrs.get("Labels") or {}).get(LABEL_NAMESPACE, "").startswith(RUN_PREFIX):
            volume.remove(force=True)
    for network in client.networks.list(filters={"label": LABEL_NAMESPACE}):
        if (network.attrs.get("Labels") or {}).get(LABEL_NAMESPACE, "").startswith(RUN_PREFIX):
            network.remove()


def new_namespace() -> str:
    return f"{RUN_PREFIX}-{next(_namespaces)}"


@dataclass
class Fleet:
    """One test's fleet: its settings, config file and the workers it started."""

    settings: FleetSettings
    config: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        return {**env, "FLEET_CONFIG": str(self.config)}

    def cli(self, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLEET, *args], env=self.env, input=input, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start_worker(self, *agents: str, env: dict[str, str] | None = None) -> Worker:
        args = [a for agent in agents for a in ("--agent", agent)]
        worker = Worker(subprocess.Popen([FLEET, "worker", *args], env={**self.env, **(env or {})},
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True))
        self.workers.append(worker)
        return worker

    def tear_down(self, docker_client: docker.DockerClient) -> None:
        for worker in self.workers:
            worker.stop()
        for container in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_NAMESPACE}={self.settings.namespace}"},
                ignore_removed=True):
            with contextlib.suppress(docker.errors.NotFound):  # being removed already
                container.remove(force=True)
        for network in docker_client.networks.list(  # the agents' egress networks
                filters={"label": f"{LABEL_NAMESPACE}={self.settings.namespace}"}):
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
        shutil.rmtree(self.settings.secrets_dir, ignore_errors=True)
        shutil.rmtree(self.settings.egress_dir, ignore_errors=True)

    def client(self) -> Any:
        from fleet.client import FleetClient

        return FleetClient(self.settings)


class Worker:
    """A `fleet worker` process; its output is drained into `lines`."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.ended = False  # its output closed: it exited
        self._changed = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for_line(self, text: str, count: int = 1, timeout: float = 60) -> None:
        with self._changed:
            self._changed.wait_for(
                lambda: self.ended or sum(text in line for line in self.lines) >= count, timeout)
            ok = sum(text in line for line in self.lines) >= count
        assert ok, f"worker never printed {text!r}:\n{''.join(self.lines[-40:])}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=timeout)


def write_config(path: Path, settings: dict[str, Any]) -> None:
    from fleet.config_writer import config_text

    top = {key: value for key, value in settings.items() if key != "agents"}
    path.write_text(config_text(top, settings.get("agents", {})))


MakeFleet = Callable[..., Fleet]


def build_fleet(default_redis_url: str, directory: Path, agents: dict[str, dict[str, Any]],
                **top: Any) -> Fleet:
    """A fleet with its own namespace, secrets dir and config file under
    `directory`; `top` sets (or overrides) top-level settings."""
    from fleet.settings import load_settings

    namespace = new_namespace()
    raw = {"redis_url": default_redis_url, "namespace": namespace,
           "secrets_dir": str(directory / f"secrets-{namespace}"), "host_id": "testhost",
           "egress_dir": str(directory / f"egress-{namespace}"), **top,
           "agents": agents}
    config = directory / f"fleet-{namespace}.toml"
    write_config(config, raw)
    os.environ["FLEET_CONFIG"] = str(config)
    try:
        settings = load_settings()
    finally:
        del os.environ["FLEET_CONFIG"]
    return Fleet(settings, config)



T = TypeVar("T")


def eventually(check: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """Poll a condition that no event announces (a heartbeat's age, a
    registry entry, a health probe: what its own callers poll too)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_state(client: Any, task_id: str, state: Any, timeout: float = 60) -> Any:
    """Block on the task's event stream until it enters `state`; its record then."""
    import time

    deadline = time.monotonic() + timeout
    for batch in client.store.events.follow(client.store.keys.events(task_id), block_ms=1000,
                                            deadline=deadline):
        if any(e.type == "state" and e.fields.get("state") == state for e in batch):
            return client.status(task_id)
    raise AssertionError(f"task {task_id} never became {state}: {client.status(task_id)}")


COUNT_TASK_PROCESSES = r"""
import os, sys
mark = ("FLEET_TASK_ID=" + sys.argv[1]).encode()
count = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            count += mark in f.read().split(b"\0")
    except OSError:
        pass
print(count)
"""


def task_processes(container: Any, task_id: str) -> int:
    """How many processes of a task are alive in the container."""
    done = container.exec_run(["python3", "-c", COUNT_TASK_PROCESSES, task_id], user="10001")
    return int(done.output.decode().strip())


@dataclass
class Run:
    task: str
    attempt: int
    start: float
    end: float | None = None
    how: str = ""


def read_runs(container: Any, name: str) -> list[Run]:
    """The start/end/killed lines fleet-agent's `record` step wrote in /state."""
    done = container.exec_run(["cat", f"/state/{name}"])
    if done.exit_code != 0:  # no run recorded there
        return []
    text = done.output.decode()
    runs: dict[tuple[str, int], Run] = {}
    for line in text.splitlines():
        what, task, attempt, when = line.split()
        key = (task, int(attempt))
        if what == "start":
            runs[key] = Run(task, int(attempt), float(when))
        else:
            runs[key].end, runs[key].how = float(when), what
    return list(runs.values())


def overlapping(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs of one task that overlap in time (a run never ended counts as still going)."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(run.task, []).append(run)
    pairs = []
    for task_runs in by_task.values():
        task_runs.sort(key=lambda r: r.start)
        for before, after in itertools.pairwise(task_runs):
            if before.end is None or before.end > after.start:
                pairs.append((before, after))
    return pairs


def child_pids(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def start_sentinel(directory: Path, primary_port: int, master: str = "mymaster",
                   password: str | None = None) -> RedisServer:
    """A Redis Sentinel on a free port that monitors the primary on
    `primary_port` as `master` (quorum 1, down after 1 s), asking its clients
    for `password` if given; its `url` is the sentinel:// form. It rewrites
    its config file, so that lives in `directory`."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"
    config.write_text(f"sentinel monitor {master} 127.0.0.1 {primary_port} 1\n"
                      f"sentinel down-after-milliseconds {master} 1000\n"
                      f"sentinel failover-timeout {master} 5000\n"
                      + (f"requirepass {password}\n" if password else ""))
    process = subprocess.Popen(
        ["redis-server", str(config), "--sentinel", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(directory), "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if f"+monitor master {master}" in line:
            break
    else:
        raise RuntimeError(f"redis sentinel on port {port} did not start:\n{''.join(seen)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
    return RedisServer(f"sentinel://127.0.0.1:{port}", port, process)


def all_redis_text(server: RedisServer) -> str:
    r = redis.Redis.from_url(server.url)
    dump = []
    for key in r.scan_iter(count=1000):
        read = {"string": (r.get,), "hash": (r.hgetall,), "list": (r.lrange, 0, -1),
                "set": (r.smembers,), "zset": (r.zrange, 0, -1), "stream": (r.xrange,)}
        method, *args = read[r.type(key).decode()]
        dump.append(f"{key!r} {method(key, *args)!r}")
    return "\n".join(dump)
