"""The dashboard's pages (server-rendered, read-only) and its live streams
(server-sent events from the Redis streams: a task's log, the alerts).
Each page reads what the CLI's commands read, through the same client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fleet.connection import redis_errors
from fleet.container.spec import container_name
from fleet.credentials.alerts import CREDENTIAL_FAILURE
from fleet.errors import FleetError, TaskNotFound
from fleet.record import State, task_id_problem
from fleet.state.events import Event
from fleet.web.context import MAX_STREAMS, Web

STREAM_BLOCK_MS = 2000  # one blocking read of a stream; a quiet spell sends a comment (keeps proxies open)
PAGE = 50
LOG_SHOWN = 1_000_000  # characters of a task's log its page shows at most
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
        if task_id_problem(task_id) is not None:
            raise TaskNotFound(task_id)
        record = web.client.status(task_id)
    except TaskNotFound:
        raise HTTPException(404, f"no task {task_id}") from None
    events = web.client.store.events.of_task(task_id)
    log = "".join(e.fields.get("data", "") for e in events if e.type == "output")
    if len(log) > LOG_SHOWN:  # the page shows the end of a long log (fleet logs ID has it all)
        log = f"[… the first {len(log) - LOG_SHOWN} characters: fleet logs {task_id}]\n" + log[-LOG_SHOWN:]
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
        when = moment.strftime("%Y-%m-%d %H:%M:%S") if (moment := event.at) else event.id
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
            "name": name, "queued": client.queue_depth(name, hosts), "max_running": spec.max_running,
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


def sse(web: Web, key: str, after: str, pick: Callable[[Event], Any]) -> StreamingResponse:
    """Server-sent events of the Redis stream `key` after `after`: one
    `data:` line of JSON per event `pick` keeps (None: skipped), a comment
    after a quiet spell. Waits on the asyncio connection; at most
    MAX_STREAMS at once. A Redis error ends the stream (the browser's
    EventSource reconnects, with the last id it saw)."""
    if web.open_streams >= MAX_STREAMS:
        raise HTTPException(503, f"{MAX_STREAMS} live streams are open already")

    async def lines() -> AsyncIterator[str]:
        web.open_streams += 1
        cursor = after
        try:
            while True:
                reply: Any = await web.streams.xread({key: cursor}, block=STREAM_BLOCK_MS, count=1000)
                if not reply:
                    yield ": quiet\n\n"
                for _, entries in reply or []:
                    for event_id, fields in entries:
                        cursor = event_id
                        if (data := pick(Event(event_id, fields))) is not None:
                            yield f"id: {event_id}\ndata: {json.dumps(data)}\n\n"
        except redis.RedisError:
            return
        finally:
            web.open_streams -= 1

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def task_log(web: Web, request: Request) -> StreamingResponse:
    """The task's output as it is recorded, after `after` (the page's last event)."""
    keys = web.client.store.keys
    task_id = request.path_params["task_id"]
    if task_id_problem(task_id) is not None or not await web.streams.exists(keys.task(task_id)):
        raise HTTPException(404, f"no task {task_id}")
    after = request.headers.get("last-event-id") or request.query_params.get("after", "0-0")
    return sse(web, keys.events(task_id), after, lambda e: {"stream": e.fields.get("stream"),
                                                            "data": e.fields.get("data", "")}
               if e.type == "output" else {"state": e.fields.get("state")} if e.type == "state" else None)


async def alert_stream(web: Web, request: Request) -> StreamingResponse:
    after = request.headers.get("last-event-id") or request.query_params.get("after", "$")
    return sse(web, web.client.store.keys.alerts, after, lambda e: e.fields)
