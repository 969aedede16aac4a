"""Runs INSIDE an agent's container, as the agent's user, with nothing but
Python's standard library (its source is read as package data and passed to `python3 -c`).

    python3 -c SOURCE supervise GRACE KEEPALIVE  the supervisor: JSON lines on stdin/stdout
    python3 -c SOURCE kill ORDER     end one task's processes (docker exec fallback)

The supervisor starts each task in its own session with exactly the
environment and stdin it is given, streams its output back tagged with the
task id, reports its exit status, and then ends whatever the task left
behind. It is a child subreaper, so a daemon a task double-forks is re-parented
to it and counted as a stray. When its stdin closes — the consumer died or
let go — it ends every task it started and exits: a dead consumer never
leaves a run going.

Messages in:  {"op": "run", "id", "argv", "env", "cwd", "stdin": b64}
              {"op": "kill", "id", "grace", "ref", "spare": [ids] | null}
It says it is alive every KEEPALIVE seconds, so an idle channel carries
data (a proxy in front of the engine closes a silent connection) and a
consumer can tell a hung or unreachable supervisor from a quiet one.

Messages out: {"t": "ready", "pid"}
              {"t": "alive"}
              {"t": "out", "id", "s": "stdout"|"stderr", "d": b64}
              {"t": "exit", "id", "code", "left"}
              {"t": "killed", "ref", "n"}
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO, ClassVar

PR_SET_CHILD_SUBREAPER = 36
CHUNK = 65536


def processes() -> dict[int, tuple[int, int, int, set[bytes]]]:
    """pid → (parent, start time, session, environment entries)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (1, os.getpid()):
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            found[pid] = (int(fields[1]), int(fields[19]), os.getsid(pid), env)
        except OSError:
            continue
    return found


def mark(task_id: str) -> bytes:
    return ("FLEET_TASK_ID=" + task_id).encode()


def task_pids(task_id: str, spare: list[str] | None, parents: set[int],
              live: frozenset[int] = frozenset()) -> set[int]:
    """The task's processes (its mark or its session); with `spare` (the
    tasks still running, by id and by the pids `live` of their own
    processes), also the strays: children of PID 1 or of the supervisor that
    belong to no running task, and their sessions."""
    info = processes()
    ours = {sid for _, _, sid, env in info.values() if mark(task_id) in env}
    found = {pid for pid, (_, _, sid, env) in info.items() if sid in ours or mark(task_id) in env}
    if spare is None:
        return found
    kept = {sid for _, _, sid, env in info.values() if any(mark(t) in env for t in spare)}
    kept |= {info[pid][2] for pid in live if pid in info}
    children = sorted((start, pid) for pid, (parent, start, _, _) in info.items() if parent in parents)
    command = [pid for _, pid in children if info[pid][0] == 1][:1]  # the container's own command
    strays = {pid for _, pid in children if pid not in command and info[pid][2] not in kept}
    stray_sessions = {info[pid][2] for pid in strays} - kept - {info[p][2] for p in command}
    found |= strays | {pid for pid, (_, _, sid, _) in info.items() if sid in stray_sessions}
    return found - set(command)


def end(task_id: str, grace: float, spare: list[str] | None, parents: set[int],
        live: frozenset[int] = frozenset()) -> int:
    """SIGTERM, then SIGKILL after `grace`; returns once none is left."""
    found = task_pids(task_id, spare, parents, live)
    if not found:
        return 0
    signal_all(found, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while (left := task_pids(task_id, spare, parents, live)) and time.monotonic() < deadline:
        time.sleep(0.05)
    while left := task_pids(task_id, spare, parents, live):
        signal_all(left, signal.SIGKILL)
        reap_strays()
        time.sleep(0.01)
    reap_strays()
    return len(found)


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def reap_strays() -> None:
    """Collect the exit status of re-parented strays that died (zombies
    under the subreaper), without touching the tasks' own children."""
    for pid, (parent, _, _, _) in processes().items():
        if parent == os.getpid() and pid not in Supervisor.mains:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


class Supervisor:
    mains: ClassVar[set[int]] = set()  # the pids of the tasks' own processes

    def __init__(self, grace: float, keepalive: float) -> None:
        self.grace = grace
        self.keepalive = keepalive
        self.lock = threading.Lock()
        # Held while a task is being started and while strays are swept: a
        # child between fork and exec carries no mark yet and must not look
        # like a stray.
        self.spawning = threading.Lock()
        self.tasks: dict[str, subprocess.Popen[bytes]] = {}
        self.out = sys.stdout.buffer

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message) + "\n").encode()
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def serve(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.send({"t": "ready", "pid": os.getpid()})
        threading.Thread(target=self.keep_alive, daemon=True).start()
        for line in sys.stdin.buffer:
            message = json.loads(line)
            target = self.run if message["op"] == "run" else self.kill
            threading.Thread(target=target, args=(message,), daemon=True).start()
        # The consumer is gone: end everything this supervisor started (its
        # children, the tasks' sessions and the strays re-parented to it),
        # SIGTERM first so a task can stop cleanly.
        end("", self.grace, [], {os.getpid()})

    def keep_alive(self) -> None:
        while True:
            time.sleep(self.keepalive)
            self.send({"t": "alive"})

    def run(self, message: dict[str, Any]) -> None:
        task_id = message["id"]
        try:
            with self.spawning:
                child = subprocess.Popen(message["argv"], env=message["env"], cwd=message["cwd"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
                Supervisor.mains.add(child.pid)
        except OSError as error:
            self.send({"t": "out", "id": task_id, "s": "stderr",
                       "d": base64.b64encode(f"fleet: cannot start {message['argv'][0]}: "
                                             f"{error.strerror}\n".encode()).decode()})
            self.send({"t": "exit", "id": task_id, "code": 127, "left": 0})
            return
        self.tasks[task_id] = child
        assert child.stdin and child.stdout and child.stderr
        feeder = threading.Thread(target=self.feed, args=(child.stdin, message["stdin"]), daemon=True)
        readers = [threading.Thread(target=self.pump, args=(task_id, name, stream), daemon=True)
                   for name, stream in (("stdout", child.stdout), ("stderr", child.stderr))]
        for thread in (feeder, *readers):
            thread.start()
        code = child.wait()
        with self.spawning:  # what it left behind, and strays of no running task
            Supervisor.mains.discard(child.pid)
            running = [t for t in self.tasks if t != task_id]
            left = end(task_id, 0, running, {os.getpid()}, frozenset(Supervisor.mains))
        for reader in readers:
            reader.join()
        self.tasks.pop(task_id, None)
        self.send({"t": "exit", "id": task_id, "code": code, "left": left})

    @staticmethod
    def feed(stdin: BinaryIO, payload: str) -> None:
        try:
            stdin.write(base64.b64decode(payload))
            stdin.close()
        except OSError:
            pass  # it ended without reading its input

    def pump(self, task_id: str, name: str, stream: BinaryIO) -> None:
        while chunk := stream.read1(CHUNK):  # type: ignore[attr-defined]
            self.send({"t": "out", "id": task_id, "s": name, "d": base64.b64encode(chunk).decode()})

    def kill(self, message: dict[str, Any]) -> None:
        spare = message.get("spare")
        if spare is None:
            n = end(message["id"], float(message["grace"]), None, {os.getpid()})
        else:
            with self.spawning:
                n = end(message["id"], float(message["grace"]), spare, {os.getpid()},
                        frozenset(Supervisor.mains))
        self.send({"t": "killed", "ref": message["ref"], "n": n})


def main() -> None:
    if sys.argv[1] == "supervise":
        Supervisor(float(sys.argv[2]), float(sys.argv[3])).serve()
    else:
        order = json.loads(sys.argv[2])
        spare = order["spare"] if order["sweep"] else None
        print(end(order["task"], float(order["grace"]), spare, {1}), flush=True)


if __name__ == "__main__":
    main()
