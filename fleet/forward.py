"""Forwarding a job into the agent's container.

The consumer talks to one small interface, `Forwarder`: `run` a job to its
end streaming its output, and `kill` a job's processes. `ExecForwarder`
implements it with one `docker exec` per task (through the Engine API, with
the payload on the exec's stdin). A faster mechanism replaces it behind the
same interface without touching the consumer."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.spec import HOME, TOKEN_DIR
from fleet.engine import ENGINE_FAILURES, engine_errors

log = logging.getLogger(__name__)

PATH = "/usr/local/bin:/usr/bin:/bin"
EXEC_POLL_S = 0.5
OutputCallback = Callable[[str, bytes], None]

# Runs inside the container (with `kill`) to end a task's processes; the
# same code is the channel's supervisor.
AGENT_SIDE = (Path(__file__).parent / "channel" / "agent_side.py").read_text()


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
        ended = threading.Event()
        stragglers: list[int] = []
        watcher = threading.Thread(target=self._end_stragglers,
                                   args=(container, job, exec_id, ended, stragglers), daemon=True)
        watcher.start()
        try:
            for stream, data in frames_iter(sock, tty=False):  # type: ignore[no-untyped-call]
                on_output("stderr" if stream == STDERR else "stdout", data)
        finally:
            ended.set()
            sock.close()
        watcher.join()  # it may be counting the stragglers it just ended
        with engine_errors(f"reading the exit status in {container.name}"):
            code = api.exec_inspect(exec_id)["ExitCode"]
        return ExitStatus(code=-1 if code is None else int(code), leftovers=sum(stragglers))

    def connected(self, container: Container) -> bool:
        return False

    def _end_stragglers(self, container: Container, job: Job, exec_id: str,
                        ended: threading.Event, killed: list[int]) -> None:
        """The output stream stays open while any process holds the task's
        stdout — a daemon it left behind, say. Once the task's own process
        has exited, end the rest of its session so the stream closes."""
        assert container.client is not None
        while not ended.wait(EXEC_POLL_S):
            try:
                running = container.client.api.exec_inspect(exec_id)["Running"]
            except ENGINE_FAILURES:
                return
            if not running:
                if not ended.wait(EXEC_POLL_S):  # still open: someone else holds it
                    log.info("task %s exited but its output is held open; ending its leftovers",
                             job.task_id)
                    killed.append(self.kill(container, job, 0, sweep=[]))
                return

    def kill(self, container: Container, job: Job, grace_s: float,
             sweep: list[str] | None = None) -> int:
        order = {"task": job.task_id, "grace": grace_s, "sweep": sweep is not None,
                 "spare": sweep or []}
        with engine_errors(f"ending task {job.task_id} in {container.name}"):
            done = container.exec_run(["python3", "-c", AGENT_SIDE, "kill", json.dumps(order)],
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
