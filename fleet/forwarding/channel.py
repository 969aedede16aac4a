"""The consumer's end of the channel: one long-lived exec session per
container running the supervisor (`fleet/inside/supervisor.py supervise`), carrying line-
delimited JSON over the Docker API's attach stream (no socket on a bind
mount, so it works the same on Docker Desktop). Many tasks share it.

A channel that breaks — the supervisor was killed, the container died —
fails the tasks it carried with EngineError (the consumer records a crash and
retries them) and is reopened for the next task."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
from typing import Any

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.engine import engine_errors
from fleet.container.spec import HOME
from fleet.errors import EngineError
from fleet.forwarding.base import ExitStatus, Job, OutputCallback, supervisor_source

log = logging.getLogger(__name__)

KILL_REPLY_MARGIN_S = 30.0
KEEPALIVE_S = 60.0  # the supervisor says it is alive this often
SILENT_BEATS = 3  # a channel silent this many keepalives is dead (hung, or a half-open connection)
CLOSED = object()


class Channel:
    def __init__(self, container: Container, user: str, grace_s: float,
                 keepalive_s: float = KEEPALIVE_S) -> None:
        assert container.client is not None
        api = container.client.api
        with engine_errors(f"starting the supervisor in {container.name}"):
            exec_id = api.exec_create(container.id,
                                      ["python3", "-c", supervisor_source(), "supervise", str(grace_s),
                                       str(keepalive_s)],
                                      stdin=True, stdout=True, stderr=True, user=user, workdir=HOME)
            sock = api.exec_start(exec_id["Id"], socket=True)
        self.container_id = container.id
        self._attach(sock, container.name, keepalive_s)

    @classmethod
    def over(cls, sock: Any, name: str, keepalive_s: float = KEEPALIVE_S) -> Channel:
        """A channel over a socket already connected to a supervisor, which
        writes in Docker's stream framing (what `__init__` does once it has
        opened the exec session): the protocol alone, as the unit tests
        drive it over a socket pair."""
        channel = cls.__new__(cls)
        channel.container_id = None
        channel._attach(sock, name, keepalive_s)
        return channel

    def _attach(self, sock: Any, name: str | None, keepalive_s: float) -> None:
        """Start reading the supervisor's messages; return once it is ready."""
        self.name = name
        self.sock = sock
        self.raw: socket.socket = self.sock._sock if hasattr(self.sock, "_sock") else self.sock
        self.write_lock = threading.Lock()
        self.lock = threading.Lock()
        self.outputs: dict[str, OutputCallback] = {}
        self.waiters: dict[str, queue.Queue[Any]] = {}
        self.refs = itertools.count()
        self.alive = True
        self.keepalive_s = keepalive_s
        self.heard_at = time.monotonic()  # when the supervisor last said anything
        self.ready: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, name=f"channel-{self.name}", daemon=True).start()
        ready = self.ready.get(timeout=30)
        if ready is CLOSED:
            raise EngineError(f"the supervisor in {self.name} did not start")
        self.supervisor_pid = int(ready["pid"])  # in the container's pid namespace

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            with self.write_lock:
                self.raw.sendall(data)
        except OSError as error:
            self.alive = False
            raise EngineError(f"the channel into {self.name} is closed: {error}") from None

    def run(self, job: Job, on_output: OutputCallback) -> ExitStatus:
        done: queue.Queue[Any] = queue.Queue()
        with self.lock:
            if not self.alive:
                raise EngineError(f"the channel into {self.name} is closed")
            self.outputs[job.task_id] = on_output
            self.waiters[job.task_id] = done
        try:
            self.send({"op": "run", "id": job.task_id, "argv": job.command, "env": job.environment,
                       "cwd": HOME, "stdin": base64.b64encode(job.payload).decode()})
            reply = done.get()
        finally:
            with self.lock:
                self.outputs.pop(job.task_id, None)
                self.waiters.pop(job.task_id, None)
        if reply is CLOSED:
            raise EngineError(f"the supervisor in {self.name} went away during task {job.task_id}")
        return ExitStatus(code=int(reply["code"]), leftovers=int(reply.get("left", 0)))

    def kill(self, job: Job, grace_s: float, sweep: list[str] | None) -> int:
        ref = f"k{next(self.refs)}"
        done: queue.Queue[Any] = queue.Queue()
        with self.lock:
            self.waiters[ref] = done
        try:
            self.send({"op": "kill", "id": job.task_id, "grace": grace_s, "ref": ref, "spare": sweep})
            reply = done.get(timeout=grace_s + KILL_REPLY_MARGIN_S)
        except queue.Empty:
            raise EngineError(f"the supervisor in {self.name} did not answer a kill") from None
        finally:
            with self.lock:
                self.waiters.pop(ref, None)
        if reply is CLOSED:
            raise EngineError(f"the supervisor in {self.name} went away")
        return int(reply["n"])

    @property
    def usable(self) -> bool:
        """Open, and heard from lately: a supervisor silent for several
        keepalives is hung or cut off, and the channel is given up."""
        return self.alive and time.monotonic() - self.heard_at < SILENT_BEATS * self.keepalive_s

    def close(self) -> None:
        """Let go: the supervisor sees the end of its input and ends its tasks."""
        self.alive = False
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _read(self) -> None:
        pending = b""
        try:
            for stream, data in frames_iter(self.sock, tty=False):  # type: ignore[no-untyped-call]
                if stream == STDERR:
                    log.warning("supervisor in %s: %s", self.name, data.decode(errors="replace").strip())
                    continue
                self.heard_at = time.monotonic()
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._dispatch(json.loads(line))
        except (OSError, ValueError) as error:
            log.warning("channel into %s: %s", self.name, error)
        finally:
            self.alive = False
            self.ready.put(CLOSED)
            with self.lock:
                waiters = list(self.waiters.values())
            for waiter in waiters:
                waiter.put(CLOSED)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "out":
            with self.lock:
                callback = self.outputs.get(message["id"])
            if callback is not None:
                callback(message["s"], base64.b64decode(message["d"]))
        elif kind in ("exit", "killed"):
            with self.lock:
                waiter = self.waiters.get(message["id"] if kind == "exit" else message["ref"])
            if waiter is not None:
                waiter.put(message)
        elif kind == "ready":
            self.ready.put(message)


class ChannelForwarder:
    """The default forwarder: a channel per container, opened on first use
    and reopened when it breaks."""

    def __init__(self, user: str, grace_s: float, keepalive_s: float = KEEPALIVE_S) -> None:
        self.user = user
        self.grace_s = grace_s  # how long the supervisor lets tasks stop when the channel closes
        self.keepalive_s = keepalive_s
        self.channels: dict[str, Channel] = {}
        self.lock = threading.Lock()

    def channel(self, container: Container) -> Channel:
        with self.lock:
            key = str(container.id)
            current = self.channels.get(key)
            if current is not None and current.usable:
                return current
            if current is not None:
                if current.alive:
                    log.warning("channel into %s silent for %.0f s: opening a new one", current.name,
                                time.monotonic() - current.heard_at)
                current.close()
            log.info("opening the channel into %s", container.name)
            opened = Channel(container, self.user, self.grace_s, self.keepalive_s)
            self.channels[key] = opened
            return opened

    def connected(self, container: Container) -> bool:
        with self.lock:
            current = self.channels.get(str(container.id))
        return current is not None and current.usable

    def run(self, container: Container, job: Job, on_output: OutputCallback) -> ExitStatus:
        return self.channel(container).run(job, on_output)

    def kill(self, container: Container, job: Job, grace_s: float,
             sweep: list[str] | None = None) -> int:
        if sweep is not None and grace_s == 0:
            return 0  # the supervisor already ended what the task left behind
        return self.channel(container).kill(job, grace_s, sweep)
