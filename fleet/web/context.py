"""What every handler of `fleet web` shares: the client, who may act, and
the templates (package data, rendered on the server with Jinja2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from fleet.client import FleetClient
from fleet.web.auth import Operators

MAX_STREAMS = 100  # live streams (logs, alerts) open at once; more are refused (503)


@dataclass
class Web:
    """`streams` is the asyncio connection the live streams wait on: they
    never hold one of the threads the pages run on (found in review: idle
    streams starved every page, /metrics and /healthz)."""

    client: FleetClient
    operators: Operators
    templates: Environment
    streams: redis.asyncio.Redis
    open_streams: int = 0

    @classmethod
    def make(cls, client: FleetClient, token: str | None, streams: redis.asyncio.Redis) -> Web:
        env = Environment(loader=PackageLoader("fleet.web", "templates"), autoescape=select_autoescape())
        return cls(client, Operators(token), env, streams)

    def render(self, request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        signed_in = self.operators.signed_in(request)
        html = self.templates.get_template(name).render(
            request=request, signed_in=signed_in, csrf=self.operators.csrf if signed_in else "",
            can_sign_in=self.operators.token is not None,
            namespace=self.client.settings.namespace, **values)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})
