"""The consumer's end of the channel: one long-lived exec session per
container running the supervisor (`fleet/inside/supervisor.py supervise`),
carrying line-delimited JSON over the Docker API's attach stream (no socket
on a bind mount, so it works the same on Docker Desktop). Many tasks share it.

The container is treated as hostile. Every message is bounded and checked
(`protocol.py`); liveness is a nonce the supervisor must echo, not
something it may say unasked; its stderr reaches the host's log masked,
truncated and rate-limited. A channel that ends other than by fleet letting
go — a violation, a supervisor that died or stopped answering, a container
that died — raises `ChannelBroken` in every task it carried: the consumer
records them as crashes (retried) and recreates the container."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from docker.models.containers import Container
from docker.utils.socket import STDERR, frames_iter

from fleet.container.engine import engine_errors
from fleet.container.spec import HOME
from fleet.errors import EngineError
from fleet.forwarding import base
from fleet.forwarding.base import ChannelBroken, ExitStatus, Job, OutputCallback, supervisor_source
from fleet.forwarding.protocol import LineReader, ProtocolViolation, parse_message

log = logging.getLogger(__name__)

KILL_REPLY_MARGIN_S = 30.0
READY_S = 30.0
KEEPALIVE_S = 20.0  # fleet pings the supervisor this often
SILENT_PINGS = 3  # a supervisor that has answered none of this many pings is hung or cut off
STDERR_CHARS = 500  # of one line of the supervisor's stderr, in the host's log
STDERR_LINES_PER_MINUTE = 20
CLOSED = object()
Mask = Callable[[str], str]



def unmasked(text: str) -> str:
    return text


class Channel:
    def __init__(self, container: Container, user: str, grace_s: float,
                 keepalive_s: float = KEEPALIVE_S, mask: Mask = unmasked) -> None:
        assert container.client is not None
        api = container.client.api
        with engine_errors(f"starting the supervisor in {container.name}"):
            exec_id = api.exec_create(container.id,
                                      [*base.SUPERVISOR_PYTHON, supervisor_source(), "supervise",
                                       str(grace_s)],
                                      stdin=True, stdout=True, stderr=True, user=user,
                                      workdir=base.SUPERVISOR_CWD)
            sock = api.exec_start(exec_id["Id"], socket=True)
        self.container_id = container.id
        self._attach(sock, container.name, keepalive_s, mask)

    @classmethod
    def over(cls, sock: Any, name: str, keepalive_s: float = KEEPALIVE_S,
             mask: Mask = unmasked) -> Channel:
        """A channel over a socket already connected to a supervisor, which
        writes in Docker's stream framing (what `__init__` does once it has
        opened the exec session): the protocol alone, as the unit tests
        drive it over a socket pair."""
        channel = cls.__new__(cls)
        channel.container_id = None
        channel._attach(sock, name, keepalive_s, mask)
        return channel

    def _attach(self, sock: Any, name: str | None, keepalive_s: float, mask: Mask) -> None:
        """Start reading the supervisor's messages; return once it is ready."""
        self.name = name
        self.sock = sock
        self.raw: socket.socket = self.sock._sock if hasattr(self.sock, "_sock") else self.sock
        self.mask = mask
        self.write_lock = threading.Lock()
        self.lock = threading.Lock()
        self.outputs: dict[str, OutputCallback] = {}
        self.waiters: dict[str, queue.Queue[Any]] = {}
        self.refs = itertools.count()
        self.alive = True
        self.closing = False  # fleet let go: the end of the stream is no breakage
        self.broken: str | None = None  # why the channel can no longer be trusted
        self.keepalive_s = keepalive_s
        self.pings: dict[str, float] = {}  # nonce → when it was sent, until answered
        self.heard_at = time.monotonic()  # the last answer to a ping
        self.stderr_allowance = float(STDERR_LINES_PER_MINUTE)
        self.stderr_at = time.monotonic()
        self.ready: queue.Queue[Any] = queue.Queue()
        self.said_ready = False
        threading.Thread(target=self._read, name=f"channel-{self.name}", daemon=True).start()
        try:
            ready = self.ready.get(timeout=READY_S)
        except queue.Empty:  # stopped before it could say so (by a task's leftover, say)
            self.break_off(f"the supervisor did not say it was ready within {READY_S:g} s")
            ready = CLOSED
        if ready is CLOSED:
            raise ChannelBroken(f"the supervisor in {self.name} did not start: {self.broken}")
        self.supervisor_pid = int(ready["pid"])  # in the container's pid namespace
        threading.Thread(target=self._ping, name=f"ping-{self.name}", daemon=True).start()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            with self.write_lock:
                self.raw.sendall(data)
        except OSError as error:
            self.alive = False
            if not self.closing and self.broken is None:
                self.broken = f"the stream broke: {error}"
            raise self.ended(f"while sending {message.get('op')!r}") from None

    def run(self, job: Job, on_output: OutputCallback) -> ExitStatus:
        done: queue.Queue[Any] = queue.Queue()
        with self.lock:
            if not self.alive:
                raise self.ended(f"before task {job.task_id}")
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
            raise self.ended(f"during task {job.task_id}")
        return ExitStatus(code=reply["code"], leftovers=reply["left"])

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
            raise self.ended(f"while ending task {job.task_id}")
        return int(reply["n"])

    def ended(self, when: str) -> EngineError:
        """The error for a request the channel ended under."""
        if self.broken is not None:
            return ChannelBroken(f"the channel into {self.name} broke {when}: {self.broken}")
        return EngineError(f"the channel into {self.name} was closed {when}")

    @property
    def usable(self) -> bool:
        return self.alive and self.broken is None

    def close(self) -> None:
        """Let go: the supervisor sees the end of its input and ends its tasks."""
        self.closing = True
        self._shut()

    def break_off(self, why: str) -> None:
        """End the channel as no longer trusted."""
        if self.broken is None:
            self.broken = why
        log.error("channel into %s: %s", self.name, why)
        self._shut()

    def _shut(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _ping(self) -> None:
        """Ask for a fresh nonce back every keepalive; a supervisor that
        answers none of SILENT_PINGS in a row is hung (stopped, looping) or
        cut off. The traffic also keeps a proxy in front of the engine from
        closing an idle connection."""
        while self.alive:
            time.sleep(self.keepalive_s)
            if not self.alive:
                return
            if time.monotonic() - self.heard_at > SILENT_PINGS * self.keepalive_s:
                self.break_off(f"the supervisor answered none of {SILENT_PINGS} pings")
                return
            nonce = secrets.token_hex(8)
            with self.lock:
                self.pings[nonce] = time.monotonic()
            with contextlib.suppress(EngineError):
                self.send({"op": "ping", "nonce": nonce})

    def _read(self) -> None:
        lines = LineReader()
        try:
            for stream, data in frames_iter(self.sock, tty=False):  # type: ignore[no-untyped-call]
                if stream == STDERR:
                    self._stderr(data)
                    continue
                for line in lines.feed(data):
                    self._dispatch(parse_message(line))
            if not self.closing:
                self.broken = self.broken or "the supervisor's stream ended (it died or was killed)"
        except ProtocolViolation as violation:
            self.break_off(f"protocol violation: {violation}")
        except (OSError, ValueError) as error:  # ValueError: read from a socket closed meanwhile
            if not self.closing:
                self.broken = self.broken or f"the stream broke: {error}"
        finally:
            self.alive = False
            self.ready.put(CLOSED)
            with self.lock:
                waiters = list(self.waiters.values())
            for waiter in waiters:
                waiter.put(CLOSED)

    def _stderr(self, data: bytes) -> None:
        """The supervisor's stderr (its own errors): masked, each line cut
        short, at most STDERR_LINES_PER_MINUTE lines a minute in the log."""
        now = time.monotonic()
        self.stderr_allowance = min(float(STDERR_LINES_PER_MINUTE), self.stderr_allowance
                                    + (now - self.stderr_at) * STDERR_LINES_PER_MINUTE / 60)
        self.stderr_at = now
        for line in data.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            if self.stderr_allowance < 1:
                return
            self.stderr_allowance -= 1
            log.warning("supervisor in %s: %s", self.name, self.mask(line)[:STDERR_CHARS])

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "out":
            with self.lock:
                callback = self.outputs.get(message["id"])
            if callback is not None:
                callback(message["s"], message["d"])
        elif kind in ("exit", "killed"):
            with self.lock:
                waiter = self.waiters.get(message["id"] if kind == "exit" else message["ref"])
            if waiter is not None:
                waiter.put(message)
        elif kind == "pong":
            with self.lock:
                sent = self.pings.pop(message["nonce"], None)
            if sent is None:
                raise ProtocolViolation("an answer to a ping fleet did not send")
            self.heard_at = time.monotonic()
        elif self.said_ready:
            raise ProtocolViolation("a second 'ready'")
        else:
            self.said_ready = True
            self.ready.put(message)


class ChannelForwarder:
    """The default forwarder: a channel per container, opened on first use
    (never again into a container whose channel broke: that one is replaced).
    Opening one (up to READY_S) holds only that container's opening lock, so
    looking at the other channels never waits for it."""

    def __init__(self, user: str, grace_s: float, keepalive_s: float = KEEPALIVE_S,
                 mask: Mask = unmasked) -> None:
        self.user = user
        self.grace_s = grace_s  # how long the supervisor lets tasks stop when the channel closes
        self.keepalive_s = keepalive_s
        self.mask = mask
        self.channels: dict[str, Channel] = {}
        self.openings: dict[str, threading.Lock] = {}  # one opening at a time per container
        self.lock = threading.Lock()  # guards the two tables, never held while opening

    def channel(self, container: Container) -> Channel:
        key = str(container.id)
        with self.lock:
            opening = self.openings.setdefault(key, threading.Lock())
        with opening:
            with self.lock:
                current = self.channels.get(key)
            if current is not None and current.usable:
                return current
            if current is not None and current.broken is not None:
                # Never a second supervisor in a container whose first one was
                # lost: the consumer recreates the container.
                raise current.ended("earlier")
            log.info("opening the channel into %s", container.name)
            opened = Channel(container, self.user, self.grace_s, self.keepalive_s, self.mask)
            with self.lock:
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
