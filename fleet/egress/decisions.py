"""The proxy's decisions, heard on the host: each of an agent's consumers
listens on a datagram socket of its own in the agent's decisions directory
(mounted into the proxy); the proxy sends every decision to each of them.
A datagram socket keeps nothing on disk: a destination an agent chose (it
may hold a secret) reaches only the consumer, which masks it before it is
recorded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.credentials.identity import enforced

log = logging.getLogger(__name__)

MAX_DATAGRAM = 64 * 1024
Decision = dict[str, Any]


class DecisionListener:
    """Receives the proxy's decisions for one agent in a thread of its own
    and hands each to `handle`."""

    def __init__(self, directory: Path, gid: int, handle: Callable[[Decision], None]) -> None:
        self.directory = directory
        self.gid = gid
        self.handle = handle
        self.path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:6]}.sock"
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Bound through the directory's descriptor: a socket's path may not
        # exceed 107 bytes, and `egress_dir` may be anywhere.
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.bind(f"/proc/self/fd/{directory}/{self.path.name}")
        finally:
            os.close(directory)
        # Only the proxy's group may send (root's own processes aside).
        if enforced():
            os.chown(self.path, 0, self.gid)
        self.path.chmod(0o660 if enforced() else 0o600)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, name="egress-decisions", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        self.path.unlink(missing_ok=True)

    def remove_stale(self) -> None:
        """Sockets of consumers that are gone (nobody answers on them)."""
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path in self.directory.glob("*.sock"):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    probe.connect(f"/proc/self/fd/{directory}/{path.name}")
                except ConnectionRefusedError:
                    path.unlink(missing_ok=True)
                except OSError:
                    continue
                finally:
                    probe.close()
        finally:
            os.close(directory)

    def _serve(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except OSError:
                return  # closed by stop()
            if not data:
                return
            try:
                decision = json.loads(data)
            except ValueError:
                continue
            if isinstance(decision, dict):
                try:
                    self.handle(decision)
                except Exception:  # one bad record must not end the listener
                    log.exception("recording an egress decision failed")
