"""`ExecForwarder`: one `docker exec` per task, through the Engine API, with
the payload on the exec's stdin. The fallback for images without python3 in
which the channel's supervisor cannot run (`forwarding = "exec"`)."""

from __future__ import annotations

import json
import logging
import socket
import threading

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.engine import ENGINE_FAILURES, engine_errors
from fleet.container.spec import HOME
from fleet.forwarding.base import (
    SUPERVISOR_CWD,
    SUPERVISOR_PYTHON,
    ExitStatus,
    Job,
    OutputCallback,
    supervisor_source,
)

log = logging.getLogger(__name__)

EXEC_POLL_S = 0.5


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
            done = container.exec_run([*SUPERVISOR_PYTHON, supervisor_source(), "kill", json.dumps(order)],
                                      user=job.user, workdir=SUPERVISOR_CWD)
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
