"""Runs INSIDE an agent's container, as the agent's user, with nothing but
Python's standard library. Its source is read as package data on the host
and passed to `python3 -I -S -c` with `/` as its working directory: no
environment variable, user site, `sitecustomize` or module the agent planted
in $HOME, /tmp or /state is ever imported. Before it reads anything it
makes itself non-dumpable, so a task (same uid) can neither read its memory
nor open its stdin or stdout through /proc to forge or read messages.

    python3 -I -S -c SOURCE supervise GRACE   the supervisor: JSON lines on stdin/stdout
    python3 -I -S -c SOURCE kill ORDER        end one task's processes (docker exec fallback)

The supervisor starts each task in its own session with exactly the
environment and stdin it is given, streams its output back tagged with the
task id, reports its exit status, and then ends whatever the task left
behind. It is a child subreaper, so a daemon a task double-forks is
re-parented to it. When it starts, and after each task, it ends every
process of the container it cannot attribute to a running task — by its
descent from the task's process, its session, or the task's mark in its
environment — including processes whose environment it cannot read and
processes re-parented to PID 1; only PID 1, the container's own command and
the supervisor itself are kept. When its stdin closes — the consumer died or
let go — it ends every task and exits.

Messages in:  {"op": "run", "id", "argv", "env", "cwd", "stdin": b64}
              {"op": "kill", "id", "grace", "ref", "spare": [ids] | null}
              {"op": "ping", "nonce"}
Messages out: {"t": "ready", "pid"}
              {"t": "pong", "nonce"}     (answered from the loop that reads
                                          requests: a hung supervisor does not answer)
              {"t": "out", "id", "s": "stdout"|"stderr", "d": b64}
              {"t": "exit", "id", "code", "left"}
              {"t": "killed", "ref", "n"}
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # first of all: before any input is read

import base64  # noqa: E402  (after the prctl on purpose)
import contextlib  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, BinaryIO, ClassVar  # noqa: E402

CHUNK = 65536
REAP_S = 1.0
EXHAUSTED = {errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM}
EXIT_EXHAUSTED = 70


class Proc:
    """One process of the container, as /proc shows it to a process of the same uid."""

    __slots__ = ("env", "parent", "pid", "session", "start", "stopped")

    def __init__(self, pid: int, parent: int, start: int, session: int, env: set[bytes] | None,
                 stopped: bool = False) -> None:
        self.pid, self.parent, self.start, self.session, self.env = pid, parent, start, session, env
        self.stopped = stopped


def processes() -> dict[int, Proc]:
    """Every process but PID 1 and this one. The environment is None where
    it cannot be read (a non-dumpable process): such a process is still listed."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (1, os.getpid()):
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        env: set[bytes] | None
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            env = None
        found[pid] = Proc(pid, int(fields[1]), int(fields[19]), int(fields[3]), env, fields[0] in "Tt")
    return found


def mark(task_id: str) -> bytes:
    return ("FLEET_TASK_ID=" + task_id).encode()


def container_command(info: dict[int, Proc]) -> set[int]:
    """The container's own command: the first child of PID 1."""
    children = sorted((p.start, p.pid) for p in info.values() if p.parent == 1)
    return {children[0][1]} if children else set()


def descendants(info: dict[int, Proc], roots: set[int]) -> set[int]:
    found, todo = set(), list(roots)
    children: dict[int, list[int]] = {}
    for p in info.values():
        children.setdefault(p.parent, []).append(p.pid)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo += children.get(pid, [])
    return found


def attributed(info: dict[int, Proc], task_id: str, mains: set[int], by_mark: bool) -> set[int]:
    """A task's processes: those below its own process (`mains`) — and,
    `by_mark`, below those carrying its mark — with everything in their sessions."""
    roots = set(mains)
    if by_mark:
        roots |= {p.pid for p in info.values() if p.env is not None and mark(task_id) in p.env}
    below = descendants(info, roots & set(info))
    sessions = {info[pid].session for pid in below}
    return {p.pid for p in info.values() if p.pid in below or p.session in sessions}


def task_pids(task_id: str, spare: dict[str, set[int]] | None,
              own: frozenset[int] | set[int] = frozenset(), everything: bool = False) -> set[int]:
    """The task's processes (below its own, or carrying its mark); with
    `spare` (the running tasks: id → their own processes), also every stray:
    any process no running task accounts for, readable or not, wherever it
    hangs in the tree (re-parented to PID 1 or to this subreaper, or below
    the container's command). A mark only ever adds to what is ended: a
    running task keeps what descends from its own process and its sessions;
    only where its own process is unknown (docker exec forwarding) does its
    mark keep a process. Kept besides: PID 1, the container's command, and
    what the host started with `docker exec` (parent 0: another consumer's
    supervisor, the exec forwarder's runs) with everything below it — though
    when a supervisor starts (`everything`), not a stopped one: that is an
    earlier supervisor a task stopped, with what it shelters."""
    info = processes()
    found = attributed(info, task_id, set(own), by_mark=True) if task_id else set()
    if spare is None:
        return found
    kept = set().union(*(attributed(info, t, mains, by_mark=not mains) for t, mains in spare.items()))
    kept |= container_command(info)
    hosts = {p.pid for p in info.values() if p.parent == 0 and not (everything and p.stopped)}
    return found | (set(info) - kept - descendants(info, hosts))


def end(task_id: str, grace: float, spare: dict[str, set[int]] | None,
        own: frozenset[int] | set[int] = frozenset(), everything: bool = False) -> int:
    """SIGTERM, then SIGKILL after `grace`; returns once none is left."""
    found = task_pids(task_id, spare, own, everything)
    if not found:
        return 0
    signal_all(found, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while (left := task_pids(task_id, spare, own, everything)) and time.monotonic() < deadline:
        time.sleep(0.05)
    while left := task_pids(task_id, spare, own, everything):
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
    mains = set(Supervisor.mains.values())
    for proc in processes().values():
        if proc.parent == os.getpid() and proc.pid not in mains:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)


class Supervisor:
    mains: ClassVar[dict[str, int]] = {}  # task id → the pid of the task's own process

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.lock = threading.Lock()
        # Held while a task is being started and while strays are swept: a
        # child between fork and exec is no task's yet and must not look
        # like a stray.
        self.spawning = threading.Lock()
        self.out = sys.stdout.buffer

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message) + "\n").encode()
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def running(self, but: str = "") -> dict[str, set[int]]:
        return {task: {pid} for task, pid in Supervisor.mains.items() if task != but}

    def serve(self) -> None:
        LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # Nothing of an earlier supervisor may outlive it: not its tasks, not
        # itself (stopped, say), not what was hidden under the container's command.
        end("", 0, {}, everything=True)
        threading.Thread(target=self.reap, daemon=True).start()
        self.send({"t": "ready", "pid": os.getpid()})
        for line in sys.stdin.buffer:
            message = json.loads(line)
            if message["op"] == "ping":
                self.send({"t": "pong", "nonce": message["nonce"]})
                continue
            target = self.run if message["op"] == "run" else self.kill
            threading.Thread(target=target, args=(message,), daemon=True).start()
        # The consumer is gone: end everything in the container but PID 1
        # and its command, SIGTERM first so a task can stop cleanly.
        end("", self.grace, {})

    def reap(self) -> None:
        """Collect re-parented processes as they die, so their zombies never
        fill the pids limit between sweeps. Under `spawning`: a task's own
        process is in `mains` by then, and its exit status stays its own."""
        while True:
            time.sleep(REAP_S)
            with self.spawning:
                reap_strays()

    def run(self, message: dict[str, Any]) -> None:
        task_id = message["id"]
        try:
            with self.spawning:
                child = subprocess.Popen(message["argv"], env=message["env"], cwd=message["cwd"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
                Supervisor.mains[task_id] = child.pid
        except OSError as error:
            if error.errno in EXHAUSTED:
                # Out of processes, files or memory (a task may have lowered
                # this supervisor's limits): no task can start here. Going
                # away breaks the channel, and the consumer replaces the container.
                os._exit(EXIT_EXHAUSTED)
            self.send({"t": "out", "id": task_id, "s": "stderr",
                       "d": base64.b64encode(f"fleet: cannot start {message['argv'][0]}: "
                                             f"{error.strerror}\n".encode()).decode()})
            self.send({"t": "exit", "id": task_id, "code": 127, "left": 0})
            return
        assert child.stdin and child.stdout and child.stderr
        feeder = threading.Thread(target=self.feed, args=(child.stdin, message["stdin"]), daemon=True)
        readers = [threading.Thread(target=self.pump, args=(task_id, name, stream), daemon=True)
                   for name, stream in (("stdout", child.stdout), ("stderr", child.stderr))]
        for thread in (feeder, *readers):
            thread.start()
        code = child.wait()
        with self.spawning:  # what it left behind, and strays of no running task
            Supervisor.mains.pop(task_id, None)
            left = end(task_id, 0, self.running(), {child.pid})
        for reader in readers:
            reader.join()
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
        task_id, grace = message["id"], float(message["grace"])
        own = {pid} if (pid := Supervisor.mains.get(task_id)) else set()
        if message.get("spare") is None:
            n = end(task_id, grace, None, own)
        else:
            with self.spawning:
                n = end(task_id, grace, self.running(but=task_id), own)
        self.send({"t": "killed", "ref": message["ref"], "n": n})


def main() -> None:
    os.chdir("/")
    if sys.argv[1] == "supervise":
        Supervisor(float(sys.argv[2])).serve()
    else:
        order = json.loads(sys.argv[2])
        spare: dict[str, set[int]] | None = (
            {task: set() for task in order["spare"]} if order["sweep"] else None)
        print(end(order["task"], float(order["grace"]), spare), flush=True)


if __name__ == "__main__":
    main()
