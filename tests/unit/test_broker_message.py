"""Reading a message of an agent's queue (fleet/broker/message.py): fleet's
own shape, a plain Celery publisher's, and what is neither."""

from __future__ import annotations

import pytest

from fleet.broker.message import Malformed, NewTask, RunTask, read_message

FLEET_ID = "0123456789abcdef0123456789abcdef"
CELERY_ID = "d9b1d7db-4f37-4a5b-9c52-0f8a1a2b3c4d"


def test_fleets_own_message_runs_its_task_as_the_attempt_it_names() -> None:
    assert read_message(FLEET_ID, [FLEET_ID], {"agent": "dev", "attempt": 2}) == RunTask(FLEET_ID, 2)
    assert read_message(FLEET_ID, [FLEET_ID], {"agent": "dev"}) == RunTask(FLEET_ID, None)


def test_a_publishers_message_is_a_new_task_under_the_celery_id() -> None:
    message = read_message(CELERY_ID, [], {"agent": "dev", "payload": {"x": 1}})
    assert message == NewTask(CELERY_ID, "dev", {"x": 1})
    signed = read_message("job-42", (), {"agent": "dev", "payload": {}, "signed_by": "k1",
                                         "signature": "ab", "created_at": "2026-01-01T00:00:00+00:00"})
    assert signed == NewTask("job-42", "dev", {}, "k1", "ab", "2026-01-01T00:00:00+00:00")


@pytest.mark.parametrize(("message_id", "args", "kwargs", "expected_id", "reason"), [
    ("bad:id", [], {"agent": "dev", "payload": {}}, None, "task id 'bad:id' is not"),
    ("a" * 65, [], {"agent": "dev", "payload": {}}, None, "is not 1-64"),
    (None, [], {"agent": "dev", "payload": {}}, None, "task id 'None'"),
    (CELERY_ID, [], {"payload": {}}, CELERY_ID, "no agent"),
    (CELERY_ID, [], {"agent": 3, "payload": {}}, CELERY_ID, "no agent"),
    (CELERY_ID, [], {"agent": "dev"}, CELERY_ID, "no payload"),
    (CELERY_ID, [], {"agent": "dev", "payload": {}, "prio": 1}, CELERY_ID, "unknown keyword argument(s)"),
    (CELERY_ID, [], {"agent": "dev", "payload": {}, "signature": 5}, CELERY_ID, "must be strings"),
    (CELERY_ID, [1, 2], {}, CELERY_ID, "its arguments [1, 2] are not [its task id]"),
    (CELERY_ID, [], {"agent": "dev", "payload": {}, "created_at": "2026-11-30T11:53:41"}, CELERY_ID,
     "is not an ISO 8601 time with a zone"),
    (CELERY_ID, [], {"agent": "dev", "payload": {}, "created_at": "garbage"}, CELERY_ID, "not an ISO 8601"),
    (FLEET_ID, [FLEET_ID], {"agent": "dev", "attempt": 0}, FLEET_ID, "attempt 0 is not a positive"),
    (FLEET_ID, [FLEET_ID], {"agent": "dev", "attempt": True}, FLEET_ID, "attempt True is not"),
    (FLEET_ID, [FLEET_ID], {"agent": "dev", "payload": {}}, FLEET_ID, "unknown keyword argument(s) payload"),
])
def test_anything_else_is_malformed_with_the_reason(message_id: object, args: list[object],
                                                    kwargs: dict[str, object], expected_id: str | None,
                                                    reason: str) -> None:
    message = read_message(message_id, args, kwargs)
    assert isinstance(message, Malformed)
    assert message.task_id == expected_id
    assert reason in message.reason
