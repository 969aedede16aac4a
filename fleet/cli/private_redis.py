"""A private redis-server on a free loopback port, for `fleet demo` (when no
Redis answers) and `fleet bench` (always: one Redis of its own for every
measurement)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

from fleet.errors import FleetError


def start_private_redis(directory: Path, *, persist: bool = True) -> tuple[subprocess.Popen[str], str]:
    """Start redis-server with its data under `directory` (an append-only
    file if `persist`, else nothing on disk); returns once it accepts
    connections, with the process and its URL."""
    if shutil.which("redis-server") is None:
        raise FleetError("redis-server is not installed: "
                         "run scripts/bootstrap.sh (or apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory.mkdir(parents=True, exist_ok=True)
    persistence = ["--appendonly", "yes"] if persist else ["--appendonly", "no", "--save", ""]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory.resolve()),
         *persistence, "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "Ready to accept connections" in line:
            break
    else:
        raise FleetError(f"a private redis-server did not start (port {port})")
    # Keep reading its log, so that a full pipe never stalls it.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, f"redis://127.0.0.1:{port}/0"
