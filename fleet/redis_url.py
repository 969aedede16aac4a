"""Redis URLs as fleet reads them: Celery's Sentinel form, and the
redaction of a password from anything printed about a URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

SENTINEL_DEFAULT_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """`sentinel://[[user]:password@]host[:port][/db][;sentinel://host2[:port]]...`,
    Celery's form. The first part's credentials and db are the primary's."""

    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(url: str) -> SentinelURL:
    form = "use sentinel://host:port[;sentinel://host2:port]..."
    nodes: list[tuple[str, int]] = []
    split: list[SplitResult] = []
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
            port = parts.port or SENTINEL_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{part!r} is not a Sentinel address ({form})") from None
        path = parts.path.strip("/")
        if parts.scheme != "sentinel" or not parts.hostname or parts.query or parts.fragment \
                or (path and not path.isdigit()):
            raise ValueError(f"{part!r} is not a Sentinel address ({form})")
        nodes.append((parts.hostname, port))
        split.append(parts)
    first = split[0]
    return SentinelURL(tuple(nodes), int(first.path.strip("/") or 0),
                       unquote(first.username) if first.username else None,
                       unquote(first.password) if first.password else None)


def check_redis_url(url: str) -> str:
    if is_sentinel_url(url):
        parse_sentinel_url(url)
    return url



URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s'\"]+@")


# redis-py's reprs of a connection (in its error messages): password=..., 'password': '...'
KEYWORD_PASSWORD = re.compile(r"(\bpassword=)(?!None\b)[^,)\s]+|('password':\s*')[^']*(')")


def redact_credentials(text: str) -> str:
    """Every `scheme://user:password@` in `text`, and every password a
    redis-py message shows of a connection, replaced by `***`: no message
    about Redis ever shows its password."""
    text = URL_PASSWORD.sub(r"\1***@", text)
    return KEYWORD_PASSWORD.sub(
        lambda m: f"{m.group(1)}***" if m.group(1) else f"{m.group(2)}***{m.group(3)}", text)
