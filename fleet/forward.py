"""Forwarding a job into the agent's container.

The consumer talks to one small interface, `Forwarder`: `run` a job to its
end streaming its output, and `kill` a job's processes. `ExecForwarder`
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

# Run inside the container to end every process of one task. Each carries
# FLEET_TASK_ID in its environment and runs in the session `setsid` gave the
# task; a process that scrubbed its environment is still in that session.
# SIGTERM first, SIGKILL to whatever is left after the grace period; returns
# once none is left. Prints how many processes it found.
KILL_TASK_SCRIPT = r"""
import os, signal, sys, time
mark = ("FLEET_TASK_ID=" + sys.argv[1]).encode()
grace = float(sys.argv[2])

def task_pids():
    marked, sessions, everyone = set(), set(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        pid = int(pid)
        if pid in (1, os.getpid()):
            continue
        try:
            everyone[pid] = os.getsid(pid)
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    marked.add(pid)
                    sessions.add(os.getsid(pid))
        except OSError:
            pass
    return marked | {pid for pid, sid in everyone.items() if sid in sessions}

def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass

found = task_pids()
print(len(found), flush=True)
if found:
    signal_all(found, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while (left := task_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    while left := task_pids():
        signal_all(left, signal.SIGKILL)
        time.sleep(0.02)
"""


@dataclass(frozen=True)
class Job:
    task_id: str
    agent: str
    attempt: int
    payload: bytes
    command: list[str]
    user: str

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
        """Run the job to its end, streaming its output."""
        ...

    def kill(self, container: Container, job: Job, grace_s: float) -> int:
        """End every process of the job (SIGTERM, then SIGKILL after the
        grace period); returns how many there were."""
        ...


class ExecForwarder:
    """One `docker exec` per task. The task runs in its own session
    (`setsid`), with exactly the protocol's environment (`env -i`)."""

    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        assert container.client is not None
        api = container.client.api
        env_words = [f"{name}={value}" for name, value in job.environment.items()]
        with engine_errors(f"starting the task in {container.name}"):
            exec_id = api.exec_create(
                container.id, ["setsid", "--wait", "env", "-i", *env_words, *job.command],
                stdin=True, stdout=True, stderr=True, user=job.user, workdir=HOME,
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
        raw: socket.socket = sock._sock if hasattr(sock, "_sock") else sock  # type: ignore[assignment]
        threading.Thread(target=send_stdin, args=(raw, job.payload), daemon=True).start()
        try:
            for stream, data in frames_iter(sock, tty=False):  # type: ignore[no-untyped-call]
                on_output("stderr" if stream == STDERR else "stdout", data)
        finally:
            sock.close()
        with engine_errors(f"reading the exit status in {container.name}"):
            code = api.exec_inspect(exec_id)["ExitCode"]
        return ExitStatus(code=-1 if code is None else int(code))

    def kill(self, container: Container, job: Job, grace_s: float) -> int:
        with engine_errors(f"ending task {job.task_id} in {container.name}"):
            done = container.exec_run(["python3", "-c", KILL_TASK_SCRIPT, job.task_id, str(grace_s)],
                                      user=job.user)
        output = done.output.decode() if isinstance(done.output, bytes) else ""
        try:
            return int(output.split()[0])
        except (ValueError, IndexError):
            log.warning("ending task %s: %s", job.task_id, output[-200:])
            return 0


def send_stdin(raw: socket.socket, payload: bytes) -> None:
    """Write the payload then half-close, so the job sees end of input."""
    try:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
    except OSError as error:  # the job ended without reading its input
        log.debug("stdin not fully written: %s", error)
