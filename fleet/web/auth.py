"""Who may act in `fleet web`: whoever shows the token of `web_token_file` —
as `Authorization: Bearer <token>` (scripts), or once at /login, which sets
a session cookie (browsers). Everyone else reads.

A browser's action also carries a CSRF value in its form: a cookie rides
along with a request another site makes the browser send, the form value
does not (it is derived from the token, so no server-side session store
is needed). The cookie carries its expiry (12 hours) signed with the
token, and is HttpOnly, SameSite=Strict and, over https, Secure. A bearer
header is never sent by a browser on its own, so it needs none."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request

from fleet.errors import UsageError

SESSION_COOKIE = "fleet_session"
SESSION_S = 12 * 3600  # a sign-in lasts this long
MIN_TOKEN_LENGTH = 16


def read_token(path: Path | None) -> str | None:
    """The token (surrounding whitespace stripped); UsageError for a file
    that cannot be read or holds too short a token."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise UsageError(f"web_token_file {str(path)!r}: {error.strerror}") from None
    if len(token) < MIN_TOKEN_LENGTH:
        raise UsageError(f"web_token_file {str(path)!r} holds under {MIN_TOKEN_LENGTH} characters")
    return token


class Operators:
    def __init__(self, token: str | None) -> None:
        self.token = token

    def derived(self, purpose: bytes) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), purpose, hashlib.sha256).hexdigest()

    def session(self, now: float | None = None) -> str:
        """A session cookie's value: when it expires, signed (so it lapses on
        its own, and no store of sessions is needed)."""
        expires = int((time.time() if now is None else now) + SESSION_S)
        return f"{expires}.{self.derived(f'fleet-web session {expires}'.encode())}"

    def session_valid(self, cookie: str) -> bool:
        expires, _, signed = cookie.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        expected = self.derived(f"fleet-web session {expires}".encode())
        return hmac.compare_digest(signed.encode(), expected.encode())

    @property
    def csrf(self) -> str:
        return self.derived(b"fleet-web csrf")

    def bearer(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return (self.token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip().encode(), self.token.encode()))

    def signed_in(self, request: Request) -> bool:
        """Whether this request may act (and so sees the actions)."""
        if self.token is None:
            return False
        return self.bearer(request) or self.session_valid(request.cookies.get(SESSION_COOKIE, ""))

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.strip().encode(), self.token.encode())

    async def check(self, request: Request) -> None:
        """An action's gate: 401 without the token, 403 for a browser's
        action without its CSRF value. Nothing has been done when it refuses."""
        if not self.signed_in(request):
            raise HTTPException(401, "this action needs the token of web_token_file")
        if self.bearer(request):
            return
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), self.csrf.encode()):
            raise HTTPException(403, "the form's CSRF value is missing or wrong")
