"""An agent's max_running slots over fakeredis (fleet/state/leases.py and
lua/take_slot.lua): taken by a claim, renewed with the lease, freed by the
attempt's end, and freed by time when a dead host's lease runs out."""

from __future__ import annotations

import fakeredis
import pytest

from fleet.errors import LeaseHeld, SlotsTaken, StaleTransition
from fleet.record import State
from fleet.state.store import TaskStore

TTL_MS = 30_000


def store() -> TaskStore:
    return TaskStore(fakeredis.FakeRedis(decode_responses=True), "t", 3600)


def claim(s: TaskStore, task_id: str, cap: int | None = 2, ttl_ms: int = TTL_MS) -> None:
    s.leases.claim(s.records.get(task_id), 1, "h1:1", ttl_ms, cap, host="h1")


def test_no_more_than_max_running_claims_hold_a_slot_until_one_ends() -> None:
    s = store()
    ids = [s.records.create("dev", {})[0] for _ in range(3)]
    claim(s, ids[0])
    claim(s, ids[1])
    with pytest.raises(SlotsTaken, match="agent dev runs its max_running=2 tasks"):
        claim(s, ids[2])
    assert s.records.get(ids[2]).state == State.QUEUED  # waits, nothing used up
    s.records.transition(ids[0], State.SUCCEEDED, finished_at="2026-11-30T00:00:00+00:00")
    claim(s, ids[2])
    assert sorted(s.redis.zrange(s.keys.running("dev"), 0, -1)) == sorted(ids[1:])


def test_another_agents_slots_and_an_uncapped_claim_are_apart() -> None:
    s = store()
    dev, boss = s.records.create("dev", {})[0], s.records.create("boss", {})[0]
    claim(s, dev, cap=1)
    claim(s, boss, cap=1)
    uncapped = s.records.create("dev", {})[0]
    claim(s, uncapped, cap=None)
    assert s.redis.zcard(s.keys.running("dev")) == 1


def test_a_dead_hosts_slot_is_free_once_its_lease_ran_out_and_a_live_one_is_renewed() -> None:
    s = store()
    dead, live, waiting = (s.records.create("dev", {})[0] for _ in range(3))
    claim(s, dead, cap=2, ttl_ms=1)  # its lease has run out at once
    s.redis.zadd(s.keys.running("dev"), {dead: 1})  # and its slot (a second later) too
    claim(s, live, cap=2)
    s.redis.zadd(s.keys.running("dev"), {live: 1})  # as if about to run out: the renewal moves it on
    assert s.leases.renew(live, "dev", "h1:1", 1, TTL_MS, max_running=2)
    claim(s, waiting, cap=2)
    assert sorted(s.redis.zrange(s.keys.running("dev"), 0, -1)) == sorted([live, waiting])


def test_a_refused_claim_gives_back_only_a_slot_it_took() -> None:
    s = store()
    task_id = s.records.create("dev", {})[0]
    claim(s, task_id)
    with pytest.raises(LeaseHeld):  # a duplicate message of the running attempt
        claim(s, task_id)
    assert s.redis.zrange(s.keys.running("dev"), 0, -1) == [task_id]  # the run keeps its slot
    other = s.records.create("dev", {})[0]
    s.records.transition(other, State.CANCELLED, finished_at="2026-11-30T00:00:00+00:00")
    with pytest.raises(StaleTransition):
        s.leases.claim(s.records.get(other), None, "h1:1", TTL_MS, 2)
    assert s.redis.zrange(s.keys.running("dev"), 0, -1) == [task_id]


def test_a_run_taken_over_through_its_message_holds_a_slot() -> None:
    """Found in review: the take-over freed the slot it had just taken."""
    s = store()
    lost, waiting = s.records.create("dev", {})[0], s.records.create("dev", {})[0]
    claim(s, lost, cap=1, ttl_ms=1)  # its host died: the lease runs out
    s.redis.delete(s.keys.lease(lost))
    s.leases.claim(s.records.get(lost), None, "h2:1", TTL_MS, 1, host="h2")  # taken over here
    assert s.records.get(lost).attempts == 2
    with pytest.raises(SlotsTaken):
        claim(s, waiting, cap=1)


def test_a_renewal_that_takes_its_lease_back_takes_its_slot_back() -> None:
    """Found in review: after a Redis restart that lost the lease and the
    slot, the renewal took the lease back but not the slot."""
    s = store()
    running, waiting = s.records.create("dev", {})[0], s.records.create("dev", {})[0]
    claim(s, running, cap=1)
    s.redis.delete(s.keys.lease(running), s.keys.running("dev"))
    assert s.leases.renew(running, "dev", "h1:1", 1, TTL_MS, max_running=1)
    with pytest.raises(SlotsTaken):
        claim(s, waiting, cap=1)


def test_an_uncapped_renewal_takes_no_slot() -> None:
    s = store()
    task_id = s.records.create("dev", {})[0]
    claim(s, task_id, cap=None)
    assert s.leases.renew(task_id, "dev", "h1:1", 1, TTL_MS)
    assert s.leases.slots_taken("dev") == 0


def test_a_lease_taken_back_takes_no_slot_another_task_took_meanwhile() -> None:
    """Found in review: the renewal re-added the slot over the cap."""
    s = store()
    lost, other = s.records.create("dev", {})[0], s.records.create("dev", {})[0]
    claim(s, lost, cap=1)
    s.redis.delete(s.keys.lease(lost), s.keys.running("dev"))  # a Redis restart lost both
    claim(s, other, cap=1)  # and another task took the one slot
    assert not s.leases.renew(lost, "dev", "h1:1", 1, TTL_MS, max_running=1)  # so this run ends
    assert s.leases.slots_taken("dev") == 1
