"""The `fleet web` application (Starlette) and serving it (uvicorn).

Why Starlette: a small, well-kept ASGI toolkit — routing, forms, cookies,
streaming responses for server-sent events, a test client — without the
schema and dependency-injection layers FastAPI adds on top, which a
server-rendered dashboard does not use; uvicorn is its usual server. The
pages are Jinja2 templates with a few lines of plain JavaScript for the
live parts: no front-end build, nothing fetched from elsewhere at run time."""

from __future__ import annotations

import asyncio
import ipaddress
from functools import partial
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.client import FleetClient
from fleet.connection import connect_redis_async
from fleet.errors import UsageError
from fleet.settings import FleetSettings
from fleet.web import actions, pages
from fleet.web.auth import SESSION_COOKIE, SESSION_S, read_token
from fleet.web.context import Web
from fleet.web.metrics import FleetCollector

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]


class SecurityHeaders:
    """Every answer says: never in a frame (clickjacking), no type sniffing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, sending if scope["type"] == "http" else send)


def make_app(settings: FleetSettings, client: FleetClient | None = None,
             streams: redis.asyncio.Redis | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app; `allowed_hosts`: the Host names it answers (default: loopback's
    only — a DNS-rebinding page then cannot read it through the browser)."""
    web = Web.make(client or FleetClient(settings), read_token(settings.web_token_file),
                   streams or connect_redis_async(settings))
    failed_logins = asyncio.Lock()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(web.client))

    def page(handler: Any) -> Any:
        return partial(handler, web)

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        try:
            await web.streams.ping()
        except Exception as error:  # redis-py's, or a socket's: the service is up, Redis is not
            return JSONResponse({"status": "unhealthy", "redis": str(error)[:200]}, status_code=503)
        return JSONResponse({"status": "ok", "redis": "ok"})

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return web.render(request, "login.html")
        form = await request.form()
        if not web.operators.token_matches(str(form.get("token", ""))):
            async with failed_logins:  # one wrong guess a second, whoever guesses
                await asyncio.sleep(1)
            return web.render(request, "login.html", status=401, failed=True)
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(SESSION_COOKIE, web.operators.session(), max_age=SESSION_S, httponly=True,
                          samesite="strict", secure=request.url.scheme == "https")
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
    app = Starlette(routes=routes, exception_handlers={HTTPException: errors}, middleware=[
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_NAMES)])
    app.state.web = web
    return app


def check_bind(host: str, settings: FleetSettings) -> None:
    """A service bound beyond loopback must have its token: refused otherwise."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and settings.web_token_file is None:
        raise UsageError(f"fleet web binds to {host} only with web_token_file set: without a token "
                         "anyone who reaches it could act; bind to 127.0.0.1, or configure the token")


def serve(settings: FleetSettings, host: str, port: int, names: list[str]) -> None:
    """Serve on host:port; `names` are further Host names it answers to (a
    bind to every address answers any)."""
    import uvicorn

    check_bind(host, settings)
    everywhere = host in ("0.0.0.0", "::")
    allowed = ["*"] if everywhere else [*LOOPBACK_NAMES, host, f"[{host}]", *names]
    uvicorn.run(make_app(settings, allowed_hosts=allowed), host=host, port=port, log_level="info",
                access_log=False,
                timeout_graceful_shutdown=5)  # live streams never end on their own
