"""Classifying a finished attempt by the job protocol's exit codes, and
deciding whether and when it is retried. Pure: no I/O."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from fleet.forwarding.base import ExitStatus
from fleet.record import ErrorKind, State, TaskError
from fleet.settings import AgentSpec

EXIT_OK = 0
EXIT_TRANSIENT = 75  # EX_TEMPFAIL
EXIT_CREDENTIAL = 77  # EX_NOPERM
CREDENTIAL_LINE = re.compile(r"fleet: credential-failure token=([A-Za-z0-9_.-]+)\s*$")


@dataclass(frozen=True)
class Outcome:
    state: State
    error: TaskError | None = None
    result: dict[str, Any] | None = None
    retry_in: float | None = None
    token: str | None = None


def parse_result(last_stdout_line: str) -> dict[str, Any] | None:
    """The result is the last stdout line when it is a JSON object."""
    try:
        value = json.loads(last_stdout_line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def credential_token(last_stderr_line: str) -> str | None:
    match = CREDENTIAL_LINE.search(last_stderr_line)
    return match.group(1) if match else None


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base·2^(attempt-1), capped, times [0.5, 1)."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)) * (0.5 + rng.random() / 2))


def retry_or_fail(kind: ErrorKind, message: str, *, attempt: int, spec: AgentSpec,
                  rng: random.Random, token: str | None = None) -> Outcome:
    """Retry after the kind's backoff while its retries remain, else fail."""
    error = TaskError(kind=kind, message=message)
    if kind == ErrorKind.CREDENTIAL:
        retries, base, cap = (spec.credential_retries, spec.credential_backoff_s,
                              spec.credential_backoff_max_s)
    else:
        retries, base, cap = (spec.transient_retries, spec.transient_backoff_s,
                              spec.transient_backoff_max_s)
    if attempt <= retries:
        delay = backoff(attempt, base, cap, rng)
        return Outcome(State.RETRYING, error=error, retry_in=delay, token=token)
    return Outcome(State.FAILED, error=error, token=token)


def classify(status: ExitStatus, *, agent: str, attempt: int, spec: AgentSpec,
             last_stdout_line: str = "", last_stderr_line: str = "",
             rng: random.Random | None = None) -> Outcome:
    rng = rng or random.Random()

    if status.timed_out:
        message = f"ran longer than timeout_s={spec.timeout_s:g} and was killed"
        return Outcome(State.FAILED, error=TaskError(kind=ErrorKind.TIMEOUT, message=message))
    if status.code == EXIT_OK:
        return Outcome(State.SUCCEEDED, result=parse_result(last_stdout_line))
    if status.code == EXIT_TRANSIENT:
        return retry_or_fail(ErrorKind.TRANSIENT, f"transient failure (exit 75) on attempt "
                             f"{attempt}", attempt=attempt, spec=spec, rng=rng)
    if status.code == EXIT_CREDENTIAL:
        token = credential_token(last_stderr_line)
        if token not in spec.tokens:  # only a token the agent declares is named (never a value)
            token = None
        named = f"token {token!r}" if token else "a token"
        fix = f"fleet tokens set {agent} {token or 'NAME'}"
        message = (f"credential failure (exit 77): {named} of agent {agent!r} was rejected; "
                   f"rotate it with `{fix}`")
        return retry_or_fail(ErrorKind.CREDENTIAL, message, attempt=attempt, spec=spec, rng=rng,
                             token=token)
    return Outcome(State.FAILED, error=TaskError(kind=ErrorKind.FAILED,
                                                  message=f"exited with {status.code}"))
