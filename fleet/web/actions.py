"""The dashboard's actions — cancel, retry, resume an agent, drain and
undrain a host — each behind the operators' gate (fleet.web.auth), each the
same call the CLI makes. A browser is sent back to the page it came from; a
script (bearer token) gets JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from kombu.exceptions import KombuError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from fleet.errors import FleetError, TaskNotFound, UnknownAgent, UsageError
from fleet.web.context import Web


async def act(web: Web, request: Request, do: Callable[[], Any], back: str) -> Response:
    await web.operators.check(request)
    try:
        done = await run_in_threadpool(do)
    except (TaskNotFound, UnknownAgent) as error:
        raise HTTPException(404, str(error)) from None
    except UsageError as error:
        raise HTTPException(409, str(error)) from None
    except (FleetError, KombuError) as error:  # Redis or the broker away
        raise HTTPException(503, str(error)) from None
    if web.operators.bearer(request):
        return JSONResponse({"ok": True, "result": done})
    return RedirectResponse(back, status_code=303)


def cancel(web: Web) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        return await act(web, request, lambda: str(web.client.cancel(task_id).state), f"/tasks/{task_id}")
    return endpoint


def retry(web: Web) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        return await act(web, request, lambda: str(web.client.retry(task_id).state), f"/tasks/{task_id}")
    return endpoint


def resume(web: Web) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        agent = request.path_params["agent"]
        return await act(web, request, lambda: web.client.resume(agent, "resumed from fleet web"), "/agents")
    return endpoint


def drain(web: Web, undo: bool) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        host = request.path_params["host"]
        hosts = web.client.hosts
        return await act(web, request, lambda: hosts.undrain(host) if undo else hosts.drain(host), "/hosts")
    return endpoint
