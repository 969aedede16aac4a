"""The egress proxy's rules, as plain data and pure functions: which agent a
connection comes from, whether it may reach a destination, which header to
set on its requests. Runs inside the proxy container (imported by the
mitmproxy addon `fleet_egress.py`); standard library only, so the host's
unit tests import it by path.

Every decision is keyed on the destination the proxy itself connects to
(the CONNECT target, or the absolute URL of a plain HTTP request), never
on a Host header or a TLS server name the client chose."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

MAX_TOKEN_BYTES = 64 * 1024
SAFE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def normal_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets: the form rules compare."""
    return host.strip().rstrip(".").lower().removeprefix("[").removesuffix("]")


def authority_host(authority: str) -> str:
    """The host of a Host header (`name`, `name:port`, `[v6]:port`), normalised."""
    text = authority.strip()
    if text.startswith("["):
        return normal_host(text[1:text.find("]")])
    return normal_host(text.rpartition(":")[0] if text.count(":") == 1 else text)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Destination:
    """One entry of an agent's `egress`: `host[:port]` or `*.domain[:port]`."""

    host: str
    port: int

    @classmethod
    def parse(cls, entry: str) -> Destination:
        """The canonical `host:port` (`[v6]:port`) the host's settings wrote."""
        host, _, port = entry.rpartition(":")
        return cls(normal_host(host), int(port))

    def allows(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.host.startswith("*."):
            # A wildcard covers names below its domain, never an address and never the domain itself.
            return not is_ip_literal(host) and host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Injection:
    """Set `header` to `value` (its `{token}` replaced by the token file's
    content) on every request to `host`, whatever the agent sent."""

    host: str
    header: str
    value: str
    token_file: str

    def render(self, token: bytes) -> str:
        return self.value.replace("{token}", token.decode("utf-8", "replace").strip())


@dataclass(frozen=True)
class AgentPolicy:
    agent: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow: tuple[Destination, ...]
    inject: tuple[Injection, ...] = ()
    decisions: str = ""  # the directory of the agent's consumers' decision sockets

    @classmethod
    def from_json(cls, data: dict[str, object]) -> AgentPolicy:
        networks = tuple(ipaddress.ip_network(str(n)) for n in _list(data.get("networks")))
        allow = tuple(Destination.parse(str(e)) for e in _list(data.get("allow")))
        inject = tuple(Injection(normal_host(str(i["host"])), str(i["header"]), str(i["value"]),
                                 str(i["token_file"]))
                       for i in _list(data.get("inject")) if isinstance(i, dict))
        return cls(str(data["agent"]), networks, allow, inject, str(data.get("decisions", "")))

    def refusal(self, host: str, port: int) -> str | None:
        """Why the agent may not reach host:port; None if it may."""
        host = normal_host(host)
        if any(d.allows(host, port) for d in self.allow):
            return None
        return f"agent {self.agent!r} may not reach {host}:{port} (not in agents.{self.agent}.egress)"

    def injection(self, host: str) -> Injection | None:
        host = normal_host(host)
        return next((i for i in self.inject if i.host == host), None)


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


@dataclass
class Policies:
    """Every agent's policy on this host: one JSON file per agent in a
    directory, written by that agent's consumers. Read again when the
    directory changes (files are replaced by rename, so its mtime moves)."""

    directory: Path
    by_agent: dict[str, AgentPolicy] = field(default_factory=dict)
    _seen: tuple[int, int] | None = None

    def refresh(self) -> None:
        try:
            info = self.directory.stat()
        except OSError:
            self.by_agent, self._seen = {}, None
            return
        seen = (info.st_mtime_ns, info.st_ino)
        if seen == self._seen:
            return
        loaded = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                policy = AgentPolicy.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a half-written or foreign file grants nothing
            loaded[policy.agent] = policy
        self.by_agent, self._seen = loaded, seen

    def of_client(self, address: str) -> AgentPolicy | None:
        """The agent whose network `address` is on; None for anyone else."""
        self.refresh()
        try:
            ip = ipaddress.ip_address(address.removeprefix("::ffff:"))
        except ValueError:
            return None
        return next((p for p in self.by_agent.values() if any(ip in n for n in p.networks)), None)


def task_of(proxy_authorization: str) -> tuple[str, str]:
    """(task id, attempt) from the `Proxy-Authorization: Basic` the agent's
    proxy URL carries (`http://<task>:<attempt>@proxy:3128`); empty if absent.
    Only labels the decision log: the agent is known by its network."""
    scheme, _, encoded = proxy_authorization.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):  # ValueError: not ASCII, or not UTF-8 once decoded
        return "", ""
    return user[:64], password[:16]


def read_token(path: str) -> bytes | None:
    """A token file's content, read afresh on each request (so a rotation
    counts from the next one): regular files only, no link followed."""
    try:
        fd = os.open(path, SAFE_OPEN)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_TOKEN_BYTES) or None
    except OSError:
        return None
    finally:
        os.close(fd)
