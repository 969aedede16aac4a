"""`fleet web` over fakeredis, through Starlette's test client: the pages,
who may act (no token: 401 and nothing changes; a browser without the CSRF
value: 403), /metrics parsed by prometheus_client's own parser, /healthz,
and the bind rule."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from fleet.client import FleetClient
from fleet.errors import UsageError
from fleet.record import State
from fleet.settings import FleetSettings
from fleet.web.app import check_bind, make_app
from fleet.web.auth import SESSION_COOKIE, SESSION_S, Operators
from fleet.web.context import MAX_STREAMS

TOKEN = "a-web-token-of-some-length"
DONE = "2026-11-30T00:00:00+00:00"


def settings(tmp_path: Path, token: bool = True) -> FleetSettings:
    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN + "\n")
    return FleetSettings.model_validate({
        "namespace": "t", "host_id": "h1", "secrets_dir": str(tmp_path / "secrets"),
        "web_token_file": str(token_file) if token else None, "agents": {"dev": {}, "boss": {}}})


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fleet(tmp_path: Path, server: fakeredis.FakeServer) -> FleetClient:
    return FleetClient(settings(tmp_path), fakeredis.FakeRedis(server=server, decode_responses=True))


def app_of(fleet: FleetClient, server: fakeredis.FakeServer) -> Starlette:
    return make_app(fleet.settings, fleet, fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
                    allowed_hosts=["testserver"])


@pytest.fixture
def browser(fleet: FleetClient, server: fakeredis.FakeServer) -> TestClient:
    return TestClient(app_of(fleet, server), headers={"accept": "text/html"})


def queued(fleet: FleetClient, agent: str = "dev") -> str:
    return fleet.store.records.create(agent, {})[0]


def test_the_pages_show_the_tasks_and_a_task_with_its_log(fleet: FleetClient, browser: TestClient) -> None:
    task_id = queued(fleet)
    fleet.store.events.add(task_id, "output", stream="stdout", data="hello <b>from the agent</b>\n")
    other = queued(fleet, "boss")
    page = browser.get("/tasks?agent=dev")
    assert page.status_code == 200 and task_id in page.text and other not in page.text
    page = browser.get(f"/tasks/{task_id}")
    assert "hello &lt;b&gt;from the agent&lt;/b&gt;" in page.text  # escaped
    assert 'id="cancel"' not in page.text and "read-only" in page.text
    for path in ("/agents", "/hosts", "/alerts"):
        assert browser.get(path).status_code == 200
    fleet.alerts.emit("credential_failure", "dev", "token forge was rejected with HTTP 401")
    dev_row = browser.get("/agents").text.split('data-agent="dev"')[1]
    assert "token forge was rejected with HTTP 401" in dev_row
    assert browser.get("/tasks/nosuch").status_code == 404
    assert browser.get("/tasks?state=bogus").status_code == 400
    assert browser.get("/tasks?cursor=nonsense").status_code == 400


def test_pages_follow_their_cursor(fleet: FleetClient, browser: TestClient) -> None:
    made = [queued(fleet) for _ in range(60)]
    first = browser.get("/tasks")
    assert made[-1] in first.text and made[9] not in first.text and 'id="next"' in first.text
    cursor = first.text.split("cursor=")[1].split('"')[0].replace("%3A", ":")
    second = browser.get(f"/tasks?cursor={cursor}")
    assert made[9] in second.text and made[-1] not in second.text


@pytest.mark.parametrize("path", ["/tasks/{queued}/cancel", "/tasks/{finished}/retry", "/agents/dev/resume",
                                  "/hosts/h1/drain", "/hosts/h2/undrain"])
def test_without_the_token_every_action_is_refused_and_changes_nothing(
        fleet: FleetClient, browser: TestClient, path: str) -> None:
    from fleet.state.hosts import Registration

    task_id, finished = queued(fleet), queued(fleet)
    fleet.store.records.transition(finished, State.FAILED, finished_at=DONE)
    fleet.breaker.pause("dev", "credential failure", "forge")
    for host in ("h1", "h2"):
        fleet.hosts.beat(Registration(host_id=host, agents=["dev"], slots={"dev": 1}, pid=1, started_at=0))
    fleet.hosts.drain("h2")
    url = path.format(queued=task_id, finished=finished)
    assert browser.post(url).status_code == 401
    assert browser.post(url, headers={"authorization": "Bearer not-the-token-at-all"}).status_code == 401
    browser.cookies.set(SESSION_COOKIE, "forged")
    assert browser.post(url, data={"csrf": "x"}).status_code == 401
    assert fleet.status(task_id).state == State.QUEUED and fleet.status(finished).state == State.FAILED
    assert fleet.breaker.paused("dev") is not None
    assert not fleet.hosts.is_drained("h1") and fleet.hosts.is_drained("h2")


def test_a_signed_in_browser_acts_only_with_its_csrf_value(fleet: FleetClient, browser: TestClient) -> None:
    task_id = queued(fleet)
    assert browser.post("/login", data={"token": "wrong"}).status_code == 401
    signed = browser.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert signed.status_code == 303 and "httponly" in signed.headers["set-cookie"].lower()
    assert "samesite=strict" in signed.headers["set-cookie"].lower()
    page = browser.get(f"/tasks/{task_id}")
    assert 'id="cancel"' in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert browser.post(f"/tasks/{task_id}/cancel").status_code == 403  # a cross-site form has no csrf
    assert fleet.status(task_id).state == State.QUEUED
    done = browser.post(f"/tasks/{task_id}/cancel", data={"csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and fleet.status(task_id).state == State.CANCELLED


def test_a_script_acts_with_the_bearer_token(fleet: FleetClient, browser: TestClient) -> None:
    task_id, bearer = queued(fleet), {"authorization": f"Bearer {TOKEN}"}
    refused = browser.post(f"/tasks/{task_id}/retry", headers=bearer)
    assert refused.status_code == 409 and "only a finished task can be retried" in refused.text
    done = browser.post(f"/tasks/{task_id}/cancel", headers=bearer)
    assert done.status_code == 200 and done.json() == {"ok": True, "result": "cancelled"}
    assert browser.post("/tasks/nosuch/cancel", headers=bearer).status_code == 404
    assert browser.post("/hosts/nosuch/drain", headers=bearer).status_code in (404, 409)


def test_metrics_parse_and_count_what_the_tasks_came_to(fleet: FleetClient, browser: TestClient) -> None:
    records = fleet.store.records
    for state in (State.SUCCEEDED, State.SUCCEEDED, State.FAILED):
        task_id = queued(fleet)
        records.transition(task_id, State.RUNNING, update=lambda r: {"attempts": 1},
                           started_at="2026-11-30T00:00:00+00:00")
        records.transition(task_id, state, finished_at="2026-11-30T00:00:42+00:00")
    retried = queued(fleet)
    records.transition(retried, State.RUNNING, update=lambda r: {"attempts": 1})
    records.transition(retried, State.RETRYING)
    records.transition(queued(fleet, "boss"), State.CANCELLED, finished_at=DONE)
    queued(fleet)
    text = browser.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("fleet_tasks", (("agent", "dev"), ("state", "succeeded")))] == 2
    assert samples[("fleet_tasks", (("agent", "dev"), ("state", "queued")))] == 1
    assert samples[("fleet_tasks", (("agent", "dev"), ("state", "retrying")))] == 1
    assert samples[("fleet_tasks_finished_total", (("agent", "dev"), ("outcome", "failed")))] == 1
    assert samples[("fleet_tasks_finished_total", (("agent", "boss"), ("outcome", "cancelled")))] == 1
    assert samples[("fleet_task_retries_total", (("agent", "dev"), ("kind", "unknown")))] == 1
    assert samples[("fleet_task_duration_seconds_bucket", (("agent", "dev"), ("le", "15.0")))] == 0
    assert samples[("fleet_task_duration_seconds_bucket", (("agent", "dev"), ("le", "60.0")))] == 3
    assert samples[("fleet_task_duration_seconds_sum", (("agent", "dev"),))] == 126
    assert samples[("fleet_breaker_open", (("agent", "dev"),))] == 0
    assert samples[("fleet_queue_depth", (("agent", "dev"),))] == 0


def test_healthz_says_whether_redis_answers(browser: TestClient, server: fakeredis.FakeServer) -> None:
    assert browser.get("/healthz").json() == {"status": "ok", "redis": "ok"}
    server.connected = False
    answer = browser.get("/healthz")
    assert answer.status_code == 503 and answer.json()["status"] == "unhealthy"


def test_beyond_loopback_only_with_a_token(tmp_path: Path) -> None:
    check_bind("127.0.0.1", settings(tmp_path, token=False))
    check_bind("::1", settings(tmp_path, token=False))
    check_bind("0.0.0.0", settings(tmp_path))
    with pytest.raises(UsageError, match=r"binds to 0\.0\.0\.0 only with web_token_file set"):
        check_bind("0.0.0.0", settings(tmp_path, token=False))
    short = tmp_path / "short"
    short.write_text("short")
    with pytest.raises(UsageError, match="holds under 16 characters"):
        make_app(settings(tmp_path).model_copy(update={"web_token_file": short}))


def test_the_hosts_page_shows_a_container_whose_spec_drifted(fleet: FleetClient, browser: TestClient) -> None:
    from fleet.container.spec import container_name
    from fleet.state.hosts import Registration

    named = {agent: container_name(fleet.settings, agent) for agent in ("dev", "boss")}
    fleet.hosts.beat(Registration(host_id="h1", agents=["dev", "boss"], slots={"dev": 1, "boss": 1}, pid=1,
                                  started_at=0, containers={named["dev"]: "aaaa", named["boss"]: "old"},
                                  specs={"dev": "aaaa", "boss": "bbbb"}))
    page = browser.get("/hosts").text
    dev_row, boss_row = (page.split(named[agent])[1].split("<br>")[0] for agent in ("dev", "boss"))
    assert "current" in dev_row and "drifted" not in dev_row
    assert "drifted" in boss_row


def test_a_record_under_another_tasks_id_is_no_task_to_show_or_act_on(
        fleet: FleetClient, browser: TestClient) -> None:
    """Found in review: a record a submitter wrote under its own key with a
    victim's id aimed an operator's cancel at the victim, and its page's
    buttons at any other action (`<id>/../../agents/dev/resume?`)."""
    victim, mine = queued(fleet), queued(fleet)
    for forged in (victim, f"{victim}/../../agents/dev/resume?"):
        fleet.store.redis.hset(fleet.store.keys.task(mine), "id", json.dumps(forged))
        assert browser.get(f"/tasks/{mine}").status_code == 404
        cancel = browser.post(f"/tasks/{mine}/cancel", headers={"authorization": f"Bearer {TOKEN}"})
        assert cancel.status_code == 404
    assert fleet.status(victim).state == State.QUEUED and not fleet.store.records.finished_before(victim)


def test_only_loopback_names_are_answered_and_no_page_may_be_framed(fleet: FleetClient,
                                                                    server: fakeredis.FakeServer) -> None:
    app = make_app(fleet.settings, fleet, fakeredis.FakeAsyncRedis(server=server, decode_responses=True))
    assert TestClient(app, base_url="http://127.0.0.1:8055").get("/tasks").status_code == 200
    rebound = TestClient(app, base_url="http://attacker.example:8055").get("/tasks")
    assert rebound.status_code == 400  # a DNS-rebinding page gets nothing
    answer = TestClient(app, base_url="http://localhost:8055").get("/tasks")
    assert answer.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


def test_a_session_lapses(fleet: FleetClient, browser: TestClient) -> None:
    task_id = queued(fleet)
    browser.cookies.set(SESSION_COOKIE, Operators(TOKEN).session(now=time.time() - SESSION_S - 1))
    assert 'id="cancel"' not in browser.get(f"/tasks/{task_id}").text
    browser.cookies.set(SESSION_COOKIE, Operators(TOKEN).session())
    assert 'id="cancel"' in browser.get(f"/tasks/{task_id}").text


def test_live_streams_are_capped(fleet: FleetClient, server: fakeredis.FakeServer) -> None:
    app = app_of(fleet, server)
    browser = TestClient(app)
    web = app.state.web
    web.open_streams = MAX_STREAMS
    assert browser.get("/alerts/stream").status_code == 503


def test_a_retried_task_cancelled_before_it_ran_again_adds_no_run_duration(fleet: FleetClient) -> None:
    """Found in review: its old start made the idle time a run of days."""
    records = fleet.store.records
    task_id = queued(fleet)
    records.transition(task_id, State.RUNNING, started_at="2026-11-30T00:00:00+00:00")
    records.transition(task_id, State.FAILED, finished_at="2026-11-30T00:00:10+00:00")
    records.reopen(task_id)
    records.transition(task_id, State.CANCELLED, finished_at="2026-12-30T00:00:00+00:00")
    histogram = fleet.store.redis.hgetall(fleet.store.keys.stats_duration("dev"))
    assert histogram["count"] == "1" and float(histogram["sum"]) == 10
