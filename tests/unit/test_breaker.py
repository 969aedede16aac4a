"""The circuit breaker and the alerts stream (fakeredis)."""

from __future__ import annotations

import fakeredis

from fleet.credentials.alerts import Alerts
from fleet.credentials.breaker import Breaker
from fleet.state.events import EventStreams
from fleet.state.keys import Keys


def breaker() -> Breaker:
    client = fakeredis.FakeRedis(decode_responses=True)
    keys = Keys("ns")
    return Breaker(client, keys, Alerts(client, keys))


def kinds(b: Breaker) -> list[str]:
    streams = EventStreams(b.redis, b.keys)
    return [event.fields["kind"] for batch in streams.follow(b.keys.alerts) for event in batch]


def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    b = breaker()
    assert not b.credential_failure("dev", "forge", threshold=3)
    assert not b.credential_failure("dev", "forge", threshold=3)
    assert b.paused("dev") is None
    assert b.credential_failure("dev", "forge", threshold=3)
    pause = b.paused("dev")
    assert pause is not None and pause.describe() == "paused: credential failure (token forge)"
    assert b.paused("boss") is None
    assert not b.credential_failure("dev", "forge", threshold=3)  # already open: one alert only
    assert kinds(b) == ["breaker_opened"]


def test_a_success_resets_the_count() -> None:
    b = breaker()
    b.credential_failure("dev", "forge", threshold=2)
    b.succeeded("dev")
    assert not b.credential_failure("dev", "forge", threshold=2)
    assert b.paused("dev") is None


def test_resume_closes_it_once() -> None:
    b = breaker()
    b.pause("dev", "credential failure", "forge")
    assert b.resume("dev", "token forge rotated")
    assert b.paused("dev") is None
    assert not b.resume("dev", "again")
    assert kinds(b) == ["breaker_opened", "breaker_closed"]
    assert not b.credential_failure("dev", "forge", threshold=2)  # the count restarted
