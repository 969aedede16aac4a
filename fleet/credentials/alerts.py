"""Alerts: credential failures and circuit-breaker openings and closings,
appended to a capped stream in Redis, logged, and handed to an optional hook
command (`alert_command`) as JSON on its stdin so an operator can wire a
notification. The hook runs in the background and never holds up a task."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from typing import Any

import redis

from fleet.connection import redis_errors
from fleet.state.keys import Keys

log = logging.getLogger(__name__)

ALERTS_MAXLEN = 10_000
HOOK_TIMEOUT_S = 30

CREDENTIAL_FAILURE = "credential_failure"
BREAKER_OPENED = "breaker_opened"
BREAKER_CLOSED = "breaker_closed"
CONTAINER_CONDEMNED = "container_condemned"  # its supervisor was lost or a task outlived its deadline
TASK_REJECTED = "task_rejected"  # a worker refused to run a task (unsigned, another agent's, ...)


class Alerts:
    def __init__(self, client: redis.Redis, keys: Keys, hook: list[str] | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.hook = hook or []

    def emit(self, kind: str, agent: str, message: str, **fields: str) -> dict[str, str]:
        alert = {"kind": kind, "agent": agent, "message": message,
                 "time": f"{time.time():.3f}", **fields}
        entry: dict[Any, Any] = alert
        with redis_errors():
            self.redis.xadd(self.keys.alerts, entry, maxlen=ALERTS_MAXLEN, approximate=True)
        log.warning("alert %s: %s", kind, message)
        if self.hook:
            threading.Thread(target=self._run_hook, args=(alert,), daemon=True).start()
        return alert

    def _run_hook(self, alert: dict[str, str]) -> None:
        if (problem := run_hook_command(self.hook, json.dumps(alert).encode(), HOOK_TIMEOUT_S)) is not None:
            log.error("alert hook %s: %s", self.hook[0], problem)


def run_hook_command(command: list[str], data: bytes, timeout_s: float) -> str | None:
    """Run an operator's hook with `data` on its stdin: None if it exited 0,
    else what went wrong (with the start of its stderr)."""
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"still running after {timeout_s:g} s"
    except OSError as error:
        return f"could not run it: {error.strerror or error}"
    if done.returncode != 0:
        return f"exited {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}"
    return None
