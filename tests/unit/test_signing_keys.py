"""Signed submissions (credentials/signing.py): what a signature covers, the
key file's rules, a worker's keys read again when the file changes, and
what a rejection records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.credentials.alerts import TASK_REJECTED
from fleet.credentials.signing import KeyFile, SigningKeys
from fleet.errors import ConfigError
from fleet.record import ErrorKind, State
from fleet.worker.decision import RaiseAlert, RecordEvent, RecordOutcome, rejection

ALICE = SigningKeys((("alice", b"alice-secret-0123456789"),))
TASK = ("t1", "dev", None, {"do": "it", "n": [1, 2]}, "2026-11-30T09:00:00.000+00:00")


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_signature_holds_for_its_task_and_no_other() -> None:
    key_id, signature = ALICE.sign(*TASK)
    assert key_id == "alice"
    assert ALICE.refusal(*TASK, key_id, signature) is None
    task_id, agent, host, payload, created = TASK
    for changed in [("t2", agent, host, payload, created), (task_id, "boss", host, payload, created),
                    (task_id, agent, "elsewhere", payload, created),
                    (task_id, agent, host, {"do": "else"}, created),
                    (task_id, agent, host, payload, "2026-11-30T09:00:00.001+00:00")]:
        assert "does not match the task" in (ALICE.refusal(*changed, key_id, signature) or "")


def test_the_payload_is_signed_by_content_not_by_spelling() -> None:
    task_id, agent, host, _, created = TASK
    _, signature = ALICE.sign(*TASK)
    reordered = {"n": [1, 2], "do": "it"}
    assert ALICE.refusal(task_id, agent, host, reordered, created, "alice", signature) is None


@pytest.mark.parametrize(("key_id", "signature", "message"), [
    (None, None, "it is not signed"),
    ("mallory", "00", "signed with key 'mallory', which this worker does not accept"),
    ("alice", "00" * 32, "does not match the task"),
])
def test_a_missing_unknown_or_wrong_signature_is_refused(key_id: str | None, signature: str | None,
                                                        message: str) -> None:
    assert message in (ALICE.refusal(*TASK, key_id, signature) or "")


def test_the_first_key_signs_and_every_key_verifies(tmp_path: Path) -> None:
    keys = SigningKeys.load(key_file(tmp_path, "# rotation\nbob   bob-secret-0123456789\n"
                                                "alice alice-secret-0123456789  # the old one\n"))
    assert keys.sign(*TASK)[0] == "bob"
    assert keys.refusal(*TASK, *ALICE.sign(*TASK)) is None


def test_a_line_with_the_secret_alone_is_key_default(tmp_path: Path) -> None:
    assert SigningKeys.load(key_file(tmp_path, "only-a-secret-0123456789\n")).sign(*TASK)[0] == "default"


@pytest.mark.parametrize(("text", "mode", "message"), [
    ("alice alice-secret-0123456789\n", 0o644, "readable by others"),
    ("alice short\n", 0o600, "line 1: use '<key id> <secret>'"),
    ("a b c\n", 0o600, "line 1"),
    ("al/ce alice-secret-0123456789\n", 0o600, "line 1"),
    ("a s1-0123456789abcdef\na s2-0123456789abcdef\n", 0o600, "key id 'a' twice"),
    ("# nothing\n", 0o600, "holds no key"),
])
def test_a_bad_key_file_is_refused_with_one_line(tmp_path: Path, text: str, mode: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SigningKeys.load(key_file(tmp_path, text, mode))


def test_a_workers_keys_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = key_file(tmp_path, "alice alice-secret-0123456789\nbob bob-secret-0123456789\n")
    keys = KeyFile(path)
    bob = SigningKeys((("bob", b"bob-secret-0123456789"),)).sign(*TASK)
    assert keys.current().refusal(*TASK, *bob) is None
    replacement = tmp_path / "new"
    replacement.write_text("alice alice-secret-0123456789\n")
    replacement.chmod(0o600)
    os.replace(replacement, path)  # bob's key withdrawn
    assert "does not accept" in (keys.current().refusal(*TASK, *bob) or "")
    path.unlink()
    with pytest.raises(ConfigError, match="No such file"):
        keys.current()


def test_a_rejection_fails_the_task_without_an_attempt_and_says_so() -> None:
    decision = rejection("t1", "dev", "host-a", 0, "it is not signed", State.QUEUED)
    assert decision.outcome is not None and decision.outcome.state == State.FAILED
    assert decision.outcome.error is not None and decision.outcome.error.kind == ErrorKind.REJECTED
    assert decision.outcome.error.message == "rejected by host-a: it is not signed"
    kinds = [type(step) for step in decision.steps]
    assert kinds == [RecordEvent, RaiseAlert, RecordOutcome]
    alert = decision.steps[1]
    assert isinstance(alert, RaiseAlert) and alert.kind == TASK_REJECTED
    write = decision.steps[2]
    assert isinstance(write, RecordOutcome)
    assert (write.attempts, write.while_running, write.require) == (0, False, State.QUEUED)


def test_the_doctor_says_whether_submissions_are_verified(tmp_path: Path) -> None:
    from fleet.cli.doctor import check_signing
    from fleet.settings import FleetSettings

    unsigned = check_signing(FleetSettings())
    assert unsigned.ok and "NOT verified" in unsigned.detail
    path = key_file(tmp_path, "alice alice-secret-0123456789\n")
    signed = check_signing(FleetSettings(signing_key_file=path))
    assert signed.ok and "signed with key 'alice'" in signed.detail
    loose = check_signing(FleetSettings(signing_key_file=key_file(tmp_path, "x" * 20, 0o644)))
    assert not loose.ok and "readable by others" in loose.detail


def test_a_key_file_must_be_a_file_of_its_own_not_a_link(tmp_path: Path) -> None:
    real = key_file(tmp_path, "alice alice-secret-0123456789\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="a symbolic link"):
        SigningKeys.load(link)
    os.chown(real, 65534, 65534)  # another user's (nobody): not a key this worker takes
    with pytest.raises(ConfigError, match="must be a file of root's or of this user's"):
        SigningKeys.load(real)


def test_a_signed_tasks_creation_time_must_be_zoned_recent_and_not_ahead() -> None:
    from datetime import UTC, datetime, timedelta

    from fleet.worker.runner import signature_age_problem

    now = datetime.now(UTC)
    assert signature_age_problem(now.isoformat(), 3600) is None
    old = (now - timedelta(hours=2)).isoformat()
    assert "more than retention_s=3600" in str(signature_age_problem(old, 3600))
    assert "in the future" in str(signature_age_problem((now + timedelta(days=30)).isoformat(), 3600))
    for bad in ("2026-11-30T11:53:41", "garbage"):  # no zone: a TypeError once, and the task looped
        assert "not an ISO 8601 time with a zone" in str(signature_age_problem(bad, 3600))
