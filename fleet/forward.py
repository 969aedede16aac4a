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
from typing import Protocol

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.spec import HOME, TOKEN_DIR
from fleet.engine import ENGINE_FAILURES, engine_errors

log = logging.getLogger(__name__)

PATH = "/usr/local/bin:/usr/bin:/bin"
EXEC_POLL_S = 0.5
OutputCallback = Callable[[str, bytes], None]

# Run inside the container to end every process of one task. Each carries
# FLEET_TASK_ID in its environment and runs in the session `setsid` gave the
# task; a process that scrubbed its environment is still in that session.
# With "sweep", orphans are ended too: processes re-parented to PID 1 (other
# than the container's own command) that belong to no task still running —
# a task's daemon that left both its session and its environment behind.
# SIGTERM first, SIGKILL to whatever is left after the grace period; returns
# once none is left. Prints how many processes it found.
KILL_TASK_SCRIPT = r"""
import json, os, signal, sys, time
order = json.loads(sys.argv[1])
grace = float(order["grace"])
spare = [("FLEET_TASK_ID=" + t).encode() for t in order["spare"]]
mark = ("FLEET_TASK_ID=" + order["task"]).encode()

def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])  # parent, start time

def task_pids():
    info, marks, ours, kept = {}, {}, set(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        pid = int(pid)
        if pid in (1, os.getpid()):
            continue
        try:
            parent, started = stat(pid)
            info[pid] = (parent, started, os.getsid(pid))
            with open(f"/proc/{pid}/environ", "rb") as f:
                marks[pid] = set(f.read().split(b"\0"))
        except OSError:
            continue
        if mark in marks[pid]:
            ours.add(info[pid][2])
        if any(s in marks[pid] for s in spare):
            kept.add(info[pid][2])
    found = {pid for pid, (_, _, sid) in info.items() if sid in ours or mark in marks.get(pid, ())}
    if order["sweep"]:
        orphans = [pid for _, pid in sorted((s, p) for p, (parent, s, _) in info.items() if parent == 1)]
        command = orphans[:1]  # the oldest child of PID 1 is the container's own command
        strays = {pid for pid in orphans[1:] if info[pid][2] not in kept}
        strays_sessions = {info[pid][2] for pid in strays} - kept - {info[p][2] for p in command}
        found |= strays | {pid for pid, (_, _, sid) in info.items() if sid in strays_sessions}
        found -= set(command)
    return found

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
    leftovers: int = 0  # processes the forwarder had to end after the task's own exited


class Forwarder(Protocol):
    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        """Run the job to its end, streaming its output."""
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
            done = container.exec_run(["python3", "-c", KILL_TASK_SCRIPT, json.dumps(order)],
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
