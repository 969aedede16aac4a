"""A fleet of the benchmark's own: a namespace, a config whose agents run
`cat`, one `fleet worker`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fleet.cli.bench.measure import log_tail, stop_process
from fleet.config_writer import config_text
from fleet.errors import FleetError
from fleet.record import State, TaskRecord


class Workspace(Protocol):
    """What a bench fleet needs of the run it belongs to (`run.Bench`)."""

    scratch: Path
    redis_url: str
    env: dict[str, str]

    def remove_namespace(self, namespace: str) -> None: ...


class BenchFleet:
    """A fleet of the benchmark's own: a namespace, a config whose agents run
    `cat`, one `fleet worker`; on leaving, the worker is stopped and the
    namespace's containers and volumes are removed."""

    def __init__(self, bench: Workspace, namespace: str, agents: dict[str, int | dict[str, Any]],
                 forwarding: str = "channel", top: dict[str, Any] | None = None) -> None:
        """`agents`: name → slots of a `cat` agent, or the agent's whole table."""
        from fleet.client import FleetClient
        from fleet.settings import load_settings

        self.bench = bench
        self.namespace = namespace
        config = bench.scratch / f"{namespace}.toml"
        settings = {"redis_url": bench.redis_url, "namespace": namespace, "host_id": "bench",
                    "forwarding": forwarding, "secrets_dir": bench.scratch / "secrets", **(top or {})}
        config.write_text(config_text(settings, {
            agent: spec if isinstance(spec, dict) else {"command": ["cat"], "concurrency": spec}
            for agent, spec in agents.items()}))
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
        from fleet.container.spec import container_name

        return container_name(self.settings, agent)

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
