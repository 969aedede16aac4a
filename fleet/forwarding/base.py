"""Forwarding a job into the agent's container: the interface.

The consumer talks to one small interface, `Forwarder`: `run` a job to its
end streaming its output, and `kill` a job's processes. Two implement it:
`exec.ExecForwarder` (one `docker exec` per task) and
`channel.ChannelForwarder` (a persistent channel to a supervisor in the
container, the default)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Protocol

from docker.models.containers import Container

from fleet.container.spec import HOME, TOKEN_DIR
from fleet.errors import EngineError

PATH = "/usr/local/bin:/usr/bin:/bin"
# How fleet's code is started in a container (the supervisor, the exec
# forwarder's kill helper): isolated (-I: no PYTHON* variables, no user site,
# no script directory on the path; -S: no `site`, so no `sitecustomize`),
# from the root directory, never from the agent's $HOME.
SUPERVISOR_PYTHON = ("python3", "-I", "-S", "-c")
SUPERVISOR_CWD = "/"
OutputCallback = Callable[[str, bytes], None]


@cache
def supervisor_source() -> str:
    """The in-container supervisor (`fleet/inside/supervisor.py`), read as
    package data: it runs inside the container (as the channel's supervisor,
    and with `kill` to end a task's processes), never in this process."""
    return files("fleet.inside").joinpath("supervisor.py").read_text()


class ChannelBroken(EngineError):
    """The way into a container ended other than by fleet letting go: its
    supervisor died, broke the protocol or stopped answering. The container
    is no longer trusted and is recreated."""


@dataclass(frozen=True)
class Job:
    task_id: str
    agent: str
    attempt: int
    payload: bytes
    command: list[str]
    user: str
    # The egress variables of an agent that reaches out through fleet's proxy (egress.environment).
    network_environment: tuple[tuple[str, str], ...] = ()

    @property
    def environment(self) -> dict[str, str]:
        """The job protocol's environment, and nothing else."""
        return {
            **dict(self.network_environment),
            "HOME": HOME,
            "PATH": PATH,
            "FLEET_TASK_ID": self.task_id,
            "FLEET_ATTEMPT": str(self.attempt),
            "FLEET_AGENT": self.agent,
            "FLEET_TOKEN_DIR": TOKEN_DIR,
        }


@dataclass
class ExitStatus:
    code: int
    timed_out: bool = False
    leftovers: int = 0  # processes the forwarder had to end after the task's own exited


class Forwarder(Protocol):
    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        """Run the job to its end, streaming its output."""
        ...

    def connected(self, container: Container) -> bool:
        """Whether it holds a live connection into the container (then the
        container is known to be up without asking the engine)."""
        ...

    def kill(self, container: Container, job: Job, grace_s: float,
             sweep: list[str] | None = None) -> int:
        """End every process of the job (SIGTERM, then SIGKILL after the
        grace period); returns how many there were. With `sweep` (the ids of
        the tasks still running), also end orphaned processes of no live task."""
        ...
