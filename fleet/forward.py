"""Forwarding a job into the agent's container.

The consumer talks to one small interface, `Forwarder.run`; `ExecForwarder`
implements it with one `docker exec` per task (through the Engine API, with
the payload on the exec's stdin). A faster mechanism replaces it behind the
same interface without touching the consumer."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.spec import HOME, TOKEN_DIR
from fleet.engine import engine_errors

log = logging.getLogger(__name__)

PATH = "/usr/local/bin:/usr/bin:/bin"
OutputCallback = Callable[[str, bytes], None]

# Run inside the container to end every process of one task: each carries
# FLEET_TASK_ID in its environment (the agent's own uid can read that).
KILL_TASK_SCRIPT = """
import os, signal, sys
mark = ("FLEET_TASK_ID=" + sys.argv[1]).encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if mark in f.read().split(b"\\0"):
                os.kill(int(pid), signal.SIGKILL)
    except OSError:
        pass
"""


@dataclass(frozen=True)
class Job:
    task_id: str
    agent: str
    attempt: int
    payload: bytes
    command: list[str]
    user: str
    timeout_s: float

    @property
    def environment(self) -> dict[str, str]:
        """The job protocol's environment, and nothing else."""
        return {
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


class Forwarder(Protocol):
    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        """Run the job to its end (or its timeout), streaming its output."""
        ...


class ExecForwarder:
    """One `docker exec` per task."""

    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        assert container.client is not None
        api = container.client.api
        env_words = [f"{name}={value}" for name, value in job.environment.items()]
        with engine_errors(f"starting the task in {container.name}"):
            exec_id = api.exec_create(
                container.id, ["env", "-i", *env_words, *job.command],
                stdin=True, stdout=True, stderr=True, user=job.user, workdir=HOME,
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
        raw: socket.socket = sock._sock if hasattr(sock, "_sock") else sock  # type: ignore[assignment]
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            kill_task(container, job)

        timer = threading.Timer(job.timeout_s, on_timeout)
        timer.daemon = True
        writer = threading.Thread(target=send_stdin, args=(raw, job.payload), daemon=True)
        timer.start()
        writer.start()
        try:
            for stream, data in frames_iter(sock, tty=False):  # type: ignore[no-untyped-call]
                on_output("stderr" if stream == STDERR else "stdout", data)
        finally:
            timer.cancel()
            sock.close()
        with engine_errors(f"reading the exit status in {container.name}"):
            code = api.exec_inspect(exec_id)["ExitCode"]
        return ExitStatus(code=-1 if code is None else int(code), timed_out=timed_out.is_set())


def send_stdin(raw: socket.socket, payload: bytes) -> None:
    """Write the payload then half-close, so the job sees end of input."""
    try:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
    except OSError as error:  # the job ended without reading its input
        log.debug("stdin not fully written: %s", error)


def kill_task(container: Container, job: Job) -> None:
    with engine_errors(f"killing task {job.task_id} in {container.name}"):
        container.exec_run(["python3", "-c", KILL_TASK_SCRIPT, job.task_id], user=job.user)
