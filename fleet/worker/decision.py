"""What a finished attempt comes to, as data: a pure function of what the
attempt left (`AttemptFacts`) returning a `Decision` — the state to record
and the ordered steps that record it (events, alerts, the breaker's count,
the state write, the retry). No I/O here: `effects.py` runs the steps, each
on its own, so a step retried while Redis is away never repeats the one
before it (an alert is raised once, a failure counted once)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fleet.credentials.alerts import CREDENTIAL_FAILURE, TASK_REJECTED
from fleet.forwarding.base import ExitStatus
from fleet.record import ErrorKind, State, TaskError
from fleet.settings import AgentSpec
from fleet.worker.outcome import Outcome, classify, retry_or_fail
from fleet.worker.running import HANDBACK, TIMEOUT


@dataclass(frozen=True)
class AttemptFacts:
    """What one run of a task left, read before anything is decided."""

    task_id: str
    agent: str
    host: str
    attempt: int
    exit_code: int
    reason: str | None  # why fleet ended it (timeout, cancel, hand-back, lost lease), if it did
    container_lost: str | None  # why the container (or the way into it) was lost under it, if it was
    last_stdout_line: str = ""
    last_stderr_line: str = ""
    token_rotated: bool = False  # a token's value changed while the attempt ran


# -- the steps -----------------------------------------------------------------


@dataclass(frozen=True)
class RecordEvent:
    """An event in the task's stream; `fenced`: only while the task is on the attempt."""

    kind: str
    fields: tuple[tuple[str, str], ...] = ()
    fenced: bool = True


@dataclass(frozen=True)
class RaiseAlert:
    kind: str
    message: str
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CountCredentialFailure:
    """One more consecutive credential failure; the breaker opens at `threshold`."""

    token: str
    threshold: int


@dataclass(frozen=True)
class ResetCredentialFailures:
    """A success ends a run of credential failures."""


@dataclass(frozen=True)
class RecordOutcome:
    """The state write. `epoch`: the attempt the write is fenced by;
    `while_running`: only while that attempt still runs (not once it was
    declared lost or cancelled). If refused, the steps after it are skipped."""

    outcome: Outcome
    exit_code: int | None
    attempts: int
    epoch: int
    while_running: bool = True
    require: State | None = None  # when not while_running: only from this state (None: any)


@dataclass(frozen=True)
class PublishRetry:
    """Publish the task again as `attempt`, after `delay` seconds."""

    attempt: int
    delay: float


Step = (RecordEvent | RaiseAlert | CountCredentialFailure | ResetCredentialFailures | RecordOutcome
        | PublishRetry)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome | None  # None: nothing to record (cancelled, or taken over)
    steps: tuple[Step, ...]


# -- deciding --------------------------------------------------------------------


def decide(facts: AttemptFacts, spec: AgentSpec, rng: random.Random) -> Decision:
    """What the attempt comes to, and the steps that record it, in order."""
    reason = facts.reason
    if reason == HANDBACK:
        error = TaskError(kind=ErrorKind.LOST, message="handed back at worker shutdown")
        return recorded(facts, Outcome(State.RETRYING, error=error, retry_in=0.0))
    if reason is not None and reason != TIMEOUT:
        # Cancelled (already recorded) or taken over (our writes are fenced off).
        ended = RecordEvent("attempt_ended", (("reason", reason), ("attempt", str(facts.attempt))))
        return Decision(None, (ended,))
    if facts.container_lost is not None and reason != TIMEOUT:
        outcome = retry_or_fail(ErrorKind.CRASH, f"attempt {facts.attempt} was lost with its "
                                f"container: {facts.container_lost}", attempt=facts.attempt, spec=spec,
                                rng=rng)
        return recorded(facts, outcome)
    outcome = classify(ExitStatus(facts.exit_code, timed_out=reason == TIMEOUT), agent=facts.agent,
                       attempt=facts.attempt, spec=spec, last_stdout_line=facts.last_stdout_line,
                       last_stderr_line=facts.last_stderr_line, rng=rng)
    if outcome.error is not None and outcome.error.kind == ErrorKind.CREDENTIAL:
        return credential_failed(facts, outcome, spec)
    if outcome.state == State.SUCCEEDED:
        return recorded(facts, outcome, before=(ResetCredentialFailures(),))
    return recorded(facts, outcome)


def credential_failed(facts: AttemptFacts, outcome: Outcome, spec: AgentSpec) -> Decision:
    """Record and alert; count it for the breaker; retry at once if the
    operator rotated the token while the attempt ran."""
    token = outcome.token or ""
    message = outcome.error.message if outcome.error else "credential failure"
    before: tuple[Step, ...] = (
        RecordEvent("credential_failure", (("token", token), ("attempt", str(facts.attempt)))),
        RaiseAlert(CREDENTIAL_FAILURE, f"task {facts.task_id} attempt {facts.attempt}: {message}",
                   (("task", facts.task_id), ("token", token), ("host", facts.host))),
        CountCredentialFailure(token, spec.breaker_threshold),
    )
    if outcome.state == State.RETRYING and facts.token_rotated:
        outcome = Outcome(outcome.state, outcome.error, retry_in=0.0, token=outcome.token)
    return recorded(facts, outcome, before=before)


def recorded(facts: AttemptFacts, outcome: Outcome, before: tuple[Step, ...] = ()) -> Decision:
    """`before`, then the state write, then (for a retry) its publication."""
    write = RecordOutcome(outcome, facts.exit_code, attempts=facts.attempt, epoch=facts.attempt)
    return Decision(outcome, (*before, write, *retry_steps(outcome, facts.attempt)))


def engine_failure(task_id: str, attempt: int, epoch: int, message: str, spec: AgentSpec,
                   rng: random.Random) -> Decision:
    """The container could not be made or the job not forwarded: attempt
    `attempt` crashed (the record is on `epoch`: the claim may not have
    happened), retried like a transient failure."""
    outcome = retry_or_fail(ErrorKind.CRASH, message, attempt=attempt, spec=spec, rng=rng)
    write = RecordOutcome(outcome, None, attempts=attempt, epoch=epoch, while_running=False)
    return Decision(outcome, (write, *retry_steps(outcome, attempt)))


def rejection(task_id: str, agent: str, host: str, attempts: int, why: str, state: State) -> Decision:
    """The worker refuses to run the task at all: failed (`rejected`), an
    event and an alert; no attempt is counted, no command runs. Only from
    the `state` it was read in: a misrouted message ends no other run."""
    message = f"rejected by {host}: {why}"
    outcome = Outcome(State.FAILED, TaskError(kind=ErrorKind.REJECTED, message=message))
    return Decision(outcome, (
        RecordEvent("rejected", (("reason", why), ("host", host)), fenced=False),
        RaiseAlert(TASK_REJECTED, f"task {task_id} for agent {agent} was {message}", (("task", task_id),)),
        RecordOutcome(outcome, None, attempts=attempts, epoch=attempts, while_running=False, require=state)))


def retry_steps(outcome: Outcome, attempt: int) -> tuple[Step, ...]:
    if outcome.state != State.RETRYING or outcome.retry_in is None:
        return ()
    return (RecordEvent("retry", (("delay", f"{outcome.retry_in:.3f}"),), fenced=False),
            PublishRetry(attempt + 1, outcome.retry_in))
