"""The `fleet web` application (Starlette) and serving it (uvicorn).

Why Starlette: a small, well-kept ASGI toolkit — routing, forms, cookies,
streaming responses for server-sent events, a test client — without the
schema and dependency-injection layers FastAPI adds on top, which a
server-rendered dashboard does not use; uvicorn is its usual server. The
pages are Jinja2 templates with a few lines of plain JavaScript for the
live parts: no front-end build, nothing fetched from elsewhere at run time."""

from __future__ import annotations

import ipaddress
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from fleet.client import FleetClient
from fleet.errors import UsageError
from fleet.settings import FleetSettings
from fleet.web import actions, pages
from fleet.web.auth import SESSION_COOKIE, read_token
from fleet.web.context import Web
from fleet.web.metrics import FleetCollector


def make_app(settings: FleetSettings, client: FleetClient | None = None) -> Starlette:
    web = Web.make(client or FleetClient(settings), read_token(settings.web_token_file))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(web.client))

    def page(handler: Any) -> Any:
        return partial(handler, web)

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(request: Request) -> Response:
        try:
            web.client.store.redis.ping()
        except Exception as error:  # redis-py's, or a socket's: the service is up, Redis is not
            return JSONResponse({"status": "unhealthy", "redis": str(error)[:200]}, status_code=503)
        return JSONResponse({"status": "ok", "redis": "ok"})

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return web.render(request, "login.html")
        form = await request.form()
        if not web.operators.token_matches(str(form.get("token", ""))):
            return web.render(request, "login.html", status=401, failed=True)
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(SESSION_COOKIE, web.operators.session, httponly=True, samesite="strict")
        return answer

    def logout(request: Request) -> Response:
        answer = RedirectResponse("/", status_code=303)
        answer.delete_cookie(SESSION_COOKIE)
        return answer

    def errors(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if "text/html" in request.headers.get("accept", ""):
            return web.render(request, "error.html", status=error.status_code, message=error.detail)
        return PlainTextResponse(f"{error.detail}\n", status_code=error.status_code)

    routes = [
        Route("/", lambda request: RedirectResponse("/tasks")),
        Route("/tasks", page(pages.tasks)),
        Route("/tasks/{task_id}", page(pages.task)),
        Route("/tasks/{task_id}/log", page(pages.task_log)),
        Route("/tasks/{task_id}/cancel", actions.cancel(web), methods=["POST"]),
        Route("/tasks/{task_id}/retry", actions.retry(web), methods=["POST"]),
        Route("/agents", page(pages.agents)),
        Route("/agents/{agent}/resume", actions.resume(web), methods=["POST"]),
        Route("/hosts", page(pages.hosts)),
        Route("/hosts/{host}/drain", actions.drain(web, undo=False), methods=["POST"]),
        Route("/hosts/{host}/undrain", actions.drain(web, undo=True), methods=["POST"]),
        Route("/alerts", page(pages.alerts)),
        Route("/alerts/stream", page(pages.alert_stream)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: errors})


def check_bind(host: str, settings: FleetSettings) -> None:
    """A service bound beyond loopback must have its token: refused otherwise."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and settings.web_token_file is None:
        raise UsageError(f"fleet web binds to {host} only with web_token_file set: without a token "
                         "anyone who reaches it could act; bind to 127.0.0.1, or configure the token")


def serve(settings: FleetSettings, host: str, port: int) -> None:
    import uvicorn

    check_bind(host, settings)
    uvicorn.run(make_app(settings), host=host, port=port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5)  # live streams never end on their own
