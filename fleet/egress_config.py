"""The egress part of the settings: host names, ports and the destinations
of an agent's `egress`, checked and written in one canonical form
(`host:port`, `[v6]:port`) that the egress proxy compares as plain
strings, and the rules of a token injected at the proxy."""

from __future__ import annotations

import ipaddress
import re
from contextlib import suppress

from pydantic import BaseModel, ConfigDict, field_validator

HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
HOST_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_LABELS = re.compile(rf"(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*")


def split_host_port(entry: str, default_port: int | None) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (lower-case host, port)."""
    text = entry.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else (rest or "")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r} is not host[:port]")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    host = host.rstrip(".").lower()
    if not port_text and default_port is None:
        raise ValueError(f"{entry!r} has no port")
    try:
        port = int(port_text) if port_text else int(default_port or 0)
    except ValueError:
        raise ValueError(f"{entry!r}: {port_text!r} is not a port") from None
    if not 0 < port < 65536:
        raise ValueError(f"{entry!r}: port {port} is out of range")
    return host, port


def check_host_name(host: str, *, wildcard: bool = False) -> str:
    """A DNS name or an IP address; with `wildcard`, also `*.domain` (of two labels at least)."""
    name = host.rstrip(".").lower()
    with suppress(ValueError):
        return str(ipaddress.ip_address(name))
    if wildcard and name.startswith("*."):
        if name.count(".") < 2:
            raise ValueError(f"{host!r} is too wide: a wildcard needs a domain of two labels at least "
                             "(*.example.com, not *.com)")
        name = name[2:]
    if not HOST_LABELS.fullmatch(name):
        raise ValueError(f"{host!r} is not a host name")
    return host.rstrip(".").lower()


def canonical_destination(entry: str) -> str:
    """An `egress` entry as the proxy reads it: `host:port` (443 when none is
    given), `[v6]:port` for an IPv6 address."""
    host, port = split_host_port(entry, 443)
    host = check_host_name(host, wildcard=True)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Injection(BaseModel):
    """A token injected at the egress proxy: requests to `host` get `header`
    set to `value`, whose `{token}` is the token's host-side value. The
    agent's own file of that token holds a placeholder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    header: str = "Authorization"
    value: str = "Bearer {token}"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        host, _ = split_host_port(value, 443)
        return check_host_name(host)

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value) or value.lower() in {"host", "proxy-authorization",
                                                                 "content-length", "transfer-encoding"}:
            raise ValueError(f"{value!r} cannot be an injected header")
        return value

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        if "{token}" not in value:
            raise ValueError("the value template must contain {token}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError("the value template must be one line")
        return value
