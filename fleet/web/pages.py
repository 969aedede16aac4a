"""The dashboard's pages (server-rendered, read-only) and its live streams
(server-sent events from the Redis streams: a task's log, the alerts).
Each page reads what the CLI's commands read, through the same client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fleet.connection import redis_errors
from fleet.container.spec import container_name
from fleet.credentials.alerts import CREDENTIAL_FAILURE
from fleet.errors import FleetError, TaskNotFound
from fleet.record import State
from fleet.state.events import Event
from fleet.web.context import Web

STREAM_BLOCK_MS = 2000  # one blocking read of a stream; a quiet spell sends a comment (keeps proxies open)
PAGE = 50
ALERTS_LOOKED_AT = 1000  # the newest alerts searched for an agent's last credential failure


def since_param(value: str) -> float | None:
    """The tasks page's `since`: hours ago (the form's choices)."""
    try:
        return time.time() - float(value) * 3600 if value else None
    except ValueError:
        raise HTTPException(400, f"since {value!r} is not a number of hours") from None


def tasks(web: Web, request: Request) -> Response:
    query = request.query_params
    state = query.get("state") or None
    if state is not None and state not in {s.value for s in State}:
        raise HTTPException(400, f"no state {state!r}")
    agent = query.get("agent") or None
    try:
        page = web.client.tasks_page(agent=agent, state=state, host=query.get("host") or None,
                                     key=query.get("key") or None, since=since_param(query.get("since", "")),
                                     limit=PAGE, cursor=query.get("cursor") or None)
    except FleetError as error:  # an unknown agent, a bad cursor
        raise HTTPException(400, str(error)) from None
    filters = {name: query.get(name, "") for name in ("agent", "state", "host", "key", "since")}
    return web.render(request, "tasks.html", records=page.records, cursor=page.cursor, filters=filters,
                      agents=sorted(web.client.settings.agents), states=[s.value for s in State])


def task(web: Web, request: Request) -> Response:
    task_id = request.path_params["task_id"]
    try:
        record = web.client.status(task_id)
    except TaskNotFound:
        raise HTTPException(404, f"no task {task_id}") from None
    events = web.client.store.events.of_task(task_id)
    log = "".join(e.fields.get("data", "") for e in events if e.type == "output")
    return web.render(request, "task.html", record=record, record_json=record.model_dump_json(indent=2),
                      attempts=attempts_of(events), events=[e for e in events if e.type != "output"],
                      log=log, last_event=events[-1].id if events else "0-0")


def attempts_of(events: list[Event]) -> list[dict[str, str]]:
    """Each attempt's start and how it ended, from the state events."""
    found: dict[str, dict[str, str]] = {}
    for event in events:
        if event.type != "state" or event.fields.get("attempt", "0") == "0":
            continue
        number, state = event.fields["attempt"], event.fields.get("state", "")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(event.id.split("-")[0]) / 1000))
        entry = found.setdefault(number, {"attempt": number, "started": "", "ended": "", "how": ""})
        if state == "running":
            entry["started"] = when
        else:
            entry["ended"], entry["how"] = when, state + (f" ({event.fields['error']})"
                                                          if "error" in event.fields else "")
    return list(found.values())


def agents(web: Web, request: Request) -> Response:
    from fleet.credentials.tokens import TokenStore

    client = web.client
    hosts = client.hosts.all()
    tokens = TokenStore(client.settings).list() if client.settings.secrets_dir.is_dir() else []
    last_failure: dict[str, dict[str, str]] = {}  # the newest credential failure of each agent
    with redis_errors():
        recent: Any = client.store.redis.xrevrange(client.store.keys.alerts, "+", "-", ALERTS_LOOKED_AT)
    for _, fields in recent:
        if fields.get("kind") == CREDENTIAL_FAILURE:
            last_failure.setdefault(fields.get("agent", ""), fields)
    rows = []
    for name, spec in sorted(client.settings.agents.items()):
        pause = client.breaker.paused(name)
        rows.append({
            "name": name, "queued": client.queue_depth(name), "max_running": spec.max_running,
            "running": sum(h.consumers[name].running for h in hosts if name in h.consumers),
            "slots": {h.registration.host_id: h.registration.slots.get(name, 0) for h in hosts
                      if name in h.registration.agents},
            "paused": pause, "tokens": [t for t in tokens if t.agent == name],
            "last_failure": last_failure.get(name)})
    return web.render(request, "agents.html", agents=rows, now=time.time())


def hosts(web: Web, request: Request) -> Response:
    rows = []
    for host in web.client.hosts.all():
        registration = host.registration
        settings = web.client.settings.model_copy(update={"host_id": registration.host_id})
        expected = {container_name(settings, agent): spec for agent, spec in registration.specs.items()}
        rows.append({"status": host, "containers": [
            (name, spec, "current" if expected.get(name) == spec else "drifted" if name in expected else "")
            for name, spec in sorted(registration.containers.items())]})
    return web.render(request, "hosts.html", hosts=rows, now=time.time())


def alerts(web: Web, request: Request) -> Response:
    store = web.client.store
    recent = store.events.read(store.keys.alerts)[-200:]
    return web.render(request, "alerts.html", alerts=list(reversed(recent)),
                      last_event=recent[-1].id if recent else "0-0")


def sse(events: Iterator[list[Event]], pick: Any) -> StreamingResponse:
    """Server-sent events: one `data:` line of JSON per event `pick` keeps."""
    def lines() -> Iterator[str]:
        for batch in events:
            if not batch:
                yield ": quiet\n\n"
            for event in batch:
                if (data := pick(event)) is not None:
                    yield f"id: {event.id}\ndata: {json.dumps(data)}\n\n"

    return StreamingResponse(iterate_in_threadpool(lines()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


def task_log(web: Web, request: Request) -> StreamingResponse:
    """The task's output as it is recorded, after `after` (the page's last event)."""
    store = web.client.store
    task_id = request.path_params["task_id"]
    try:
        store.records.get(task_id)
    except TaskNotFound:
        raise HTTPException(404, f"no task {task_id}") from None
    after = request.headers.get("last-event-id") or request.query_params.get("after", "0-0")
    follow = store.events.follow(store.keys.events(task_id), after, block_ms=STREAM_BLOCK_MS)
    return sse(follow, lambda e: {"stream": e.fields.get("stream"), "data": e.fields.get("data", "")}
               if e.type == "output" else {"state": e.fields.get("state")} if e.type == "state" else None)


def alert_stream(web: Web, request: Request) -> StreamingResponse:
    store = web.client.store
    after = request.headers.get("last-event-id") or request.query_params.get("after", "$")
    follow = store.events.follow(store.keys.alerts, after, block_ms=STREAM_BLOCK_MS)
    return sse(follow, lambda e: e.fields)
