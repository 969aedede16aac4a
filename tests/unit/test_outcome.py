"""Exit codes of the job protocol → state, error kind and retry decision."""

from __future__ import annotations

import random

from fleet.forwarding.base import ExitStatus
from fleet.record import ErrorKind, State
from fleet.settings import AgentSpec
from fleet.worker.outcome import backoff, classify, parse_result

SPEC = AgentSpec(tokens=["forge"], transient_retries=2, credential_retries=1, transient_backoff_s=1,
                 transient_backoff_max_s=10, credential_backoff_s=20, credential_backoff_max_s=30)


def outcome(code: int, attempt: int = 1, stdout: str = "", stderr: str = "", timed_out: bool = False):
    return classify(ExitStatus(code, timed_out), agent="dev", attempt=attempt, spec=SPEC,
                    last_stdout_line=stdout, last_stderr_line=stderr, rng=random.Random(1))


def test_success_with_a_json_result() -> None:
    result = outcome(0, stdout='{"ok": true}')
    assert result.state == State.SUCCEEDED
    assert result.result == {"ok": True}
    assert outcome(0, stdout="done").result is None
    assert parse_result("[1, 2]") is None


def test_transient_retries_then_fails() -> None:
    first = outcome(75, attempt=1)
    assert first.state == State.RETRYING and first.error is not None
    assert first.error.kind == ErrorKind.TRANSIENT
    assert first.retry_in is not None and 0.5 <= first.retry_in <= 1
    assert outcome(75, attempt=2).state == State.RETRYING
    last = outcome(75, attempt=3)
    assert last.state == State.FAILED and last.error is not None
    assert last.error.kind == ErrorKind.TRANSIENT


def test_credential_failure_names_the_token_and_the_fix() -> None:
    first = outcome(77, stderr="fleet: credential-failure token=forge")
    assert first.state == State.RETRYING and first.token == "forge"
    assert first.retry_in is not None and 10 <= first.retry_in <= 20  # its own backoff
    last = outcome(77, attempt=2, stderr="fleet: credential-failure token=forge")
    assert last.state == State.FAILED and last.error is not None
    assert last.error.kind == ErrorKind.CREDENTIAL
    assert "fleet tokens set dev forge" in last.error.message
    assert outcome(77, stderr="something else").token is None
    # A name the agent does not declare is not repeated (it may be a token's value).
    leaked = outcome(77, stderr="fleet: credential-failure token=ghp_s3cr3tvalue")
    assert leaked.token is None and leaked.error is not None and "ghp_" not in leaked.error.message


def test_other_codes_fail_without_retry() -> None:
    for code in (1, 2, 137, 255):
        result = outcome(code)
        assert result.state == State.FAILED and result.error is not None
        assert result.error.kind == ErrorKind.FAILED and str(code) in result.error.message


def test_timeout_wins_over_the_exit_code() -> None:
    result = outcome(137, timed_out=True)
    assert result.state == State.FAILED and result.error is not None
    assert result.error.kind == ErrorKind.TIMEOUT


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(7)
    delays = [backoff(n, 1, 10, rng) for n in range(1, 8)]
    assert all(0.5 * min(10, 2 ** (n - 1)) <= d <= min(10, 2 ** (n - 1)) for n, d in enumerate(delays, 1))
    assert max(delays) <= 10
