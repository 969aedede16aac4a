"""Listing tasks (fleet/state/listing.py) over fakeredis: every filter at
once, pages that neither repeat nor skip a task, in a stable order."""

from __future__ import annotations

import time

import fakeredis
import pytest

from fleet.record import State
from fleet.state.listing import Filters, parse_cursor
from fleet.state.store import TaskStore


def store() -> TaskStore:
    return TaskStore(fakeredis.FakeRedis(decode_responses=True), "t", 3600)


def all_pages(s: TaskStore, filters: Filters, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = s.listing.page(filters, limit, cursor)
        pages.append([r.id for r in page.records])
        if page.cursor is None:
            return pages
        cursor = page.cursor


def test_pages_cover_every_task_once_newest_first_even_with_tasks_created_between_pages() -> None:
    s = store()
    made = [s.records.create("dev" if n % 3 else "boss", {})[0] for n in range(2500)]
    first = s.listing.page(Filters(), 1000)
    assert first.cursor is not None
    s.records.create("dev", {})  # newer than every page: does not shift them
    rest = all_pages(s, Filters(), 1000)
    later = s.listing.page(Filters(), 1000, first.cursor)
    assert [r.id for r in first.records] == list(reversed(made))[:1000]
    assert [r.id for r in later.records] == list(reversed(made))[1000:2000]
    assert sum(len(p) for p in rest) == 2501 and len(set().union(*map(set, rest))) == 2501


def test_equal_times_are_ordered_by_id_and_a_cursor_among_them_skips_none() -> None:
    s = store()
    ids = [s.records.create("dev", {})[0] for _ in range(7)]
    s.redis.zadd(s.keys.by_agent("dev"), dict.fromkeys(ids, 1000.0))  # all created in one instant
    pages = all_pages(s, Filters(agent="dev"), 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == sorted(ids, reverse=True)


def test_filters_combine_host_state_agent_and_since() -> None:
    s = store()
    old = s.records.create("dev", {}, pinned_host="h1")[0]
    s.redis.hset(s.keys.task(old), "created_at", '"2020-01-01T00:00:00+00:00"')
    pinned = s.records.create("dev", {}, pinned_host="h1")[0]
    ran = s.records.create("dev", {})[0]
    s.records.transition(ran, State.RUNNING, host="h1")
    elsewhere = s.records.create("boss", {}, pinned_host="h2")[0]
    assert [r.id for r in s.listing.find(Filters(host="h1"))] == [ran, pinned, old]
    assert [r.id for r in s.listing.find(Filters(host="h1", since=time.time() - 60))] == [ran, pinned]
    queued_dev = Filters(host="h1", state=State.QUEUED, agent="dev")
    assert [r.id for r in s.listing.find(queued_dev)] == [pinned, old]
    assert [r.id for r in s.listing.find(Filters(host="h2", agent="dev"))] == []
    assert [r.id for r in s.listing.find(Filters(host="h2"))] == [elsewhere]


def test_a_key_names_its_task_if_the_filters_match() -> None:
    s = store()
    task_id = s.records.create("dev", {}, key="build-42")[0]
    assert [r.id for r in s.listing.by_key("build-42", Filters(agent="dev"))] == [task_id]
    assert s.listing.by_key("build-42", Filters(agent="boss")) == []
    assert s.listing.by_key("nosuch", Filters()) == []


def test_expired_records_are_pruned_without_skipping_the_next_ones() -> None:
    s = store()
    ids = [s.records.create("dev", {})[0] for _ in range(2200)]
    for task_id in ids[1000:1400]:  # expired mid-index: pruning must not shift what is read next
        s.redis.delete(s.keys.task(task_id))
    found = [r.id for r in s.listing.find(Filters(agent="dev"), limit=5000)]
    assert found == list(reversed(ids[:1000] + ids[1400:]))
    assert s.redis.zcard(s.keys.by_agent("dev")) == 1800


@pytest.mark.parametrize("cursor", ["nonsense", "1.5:", "x:abc"])
def test_a_cursor_fleet_did_not_give_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError):
        parse_cursor(cursor)
