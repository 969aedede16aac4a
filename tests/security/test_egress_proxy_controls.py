"""The egress proxy's own controls, each seen to be what blocks its probe.

A hostile agent's requests (raw sockets, from its container) are sent
through the real proxy; then the proxy is made again with one control taken
out of fleet's addon (a weakened copy of `fleet_egress.py` or
`egress_rules.py` mounted over the image's), and the probe that control
guards is seen to get through. Some controls stand behind others (a hook
that fails is refused; every upstream connection is checked again where it
opens): a fault is injected (the proxy-authorization parser raises) to
reach them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.types import Mount
from egress_upstream import Upstream, run_upstream
from support import MakeFleet

from fleet.container.manager import ContainerManager
from fleet.credentials.tokens import TokenStore
from fleet.egress import proxy as egress_proxy

ADDON = Path(egress_proxy.__file__).resolve().parents[1] / "inside" / "proxy_image"
FORGE = "forge.test"

ATTACKS = r"""
import json, os, socket, ssl, sys
from urllib.parse import urlsplit
proxy = urlsplit(os.environ["HTTPS_PROXY"])
def exchange(sock, data):
    sock.sendall(data)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except OSError as error:
        return f"closed: {error}"
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (lines[0] + b" " + body).decode(errors="replace")
def plain(data):
    with socket.create_connection((proxy.hostname, proxy.port), timeout=30) as s:
        return exchange(s, data)
def tunnelled(target, data):
    with socket.create_connection((proxy.hostname, proxy.port), timeout=30) as s:
        opened = exchange(s, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        if " 200 " not in opened:
            return opened
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        with context.wrap_socket(s, server_hostname=target.rsplit(":", 1)[0]) as t:
            return exchange(t, data)
def hog():
    held = []
    for _ in range(530):
        s = socket.create_connection((proxy.hostname, proxy.port), timeout=30)
        answer = exchange(s, b"CONNECT forge.test:443 HTTP/1.1\r\nHost: forge.test:443\r\n\r\n")
        if answer.startswith("HTTP/1.1 200"):
            held.append(s)
    return len(held)
print(json.dumps({
    "refused host": plain(b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n"
                          b"Proxy-Authorization: Basic dDox\r\n\r\n"),
    "absolute form": tunnelled("forge.test:443", b"GET https://other.test/whoami HTTP/1.1\r\n"
                               b"Host: forge.test\r\n\r\n"),
    "cleartext": plain(b"GET http://forge.test/whoami HTTP/1.1\r\nHost: forge.test\r\n\r\n"),
    "held connections": hog(),
}))
"""

# The probes: each holds while its control is in place.
PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "refused host": lambda found: not found["refused host"].startswith("HTTP/1.1 200"),
    "refused by fleet": lambda found: found["refused host"].startswith("HTTP/1.1 403 ")
    and "fleet egress:" in found["refused host"],
    "absolute form": lambda found: "may name only its destination" in found["absolute form"],
    "cleartext": lambda found: json.loads(found["cleartext"].partition(" OK ")[2])["auth_sha256"] is None,
    "held connections": lambda found: found["held connections"] == 512,
}

FAULT = ("egress_rules.py", 'def task_of(proxy_authorization: str) -> tuple[str, str]:\n',
         'def task_of(proxy_authorization: str) -> tuple[str, str]:\n    raise ValueError("a parser bug")\n')
NO_FAIL_CLOSED = ("fleet_egress.py", "    @fail_closed\n    def http_connect", "    def http_connect")
NO_CONNECT_CHECK = ("fleet_egress.py", '            data.server.error = f"fleet egress: {reason}"',
                    "            pass")
# control → (the edits that take it out, the probes that must then fail)
WEAKENED: dict[str, tuple[list[tuple[str, str, str]], list[str]]] = {
    "injection over TLS only": (
        [("fleet_egress.py", 'if request.scheme == "https" else None', "")], ["cleartext"]),
    "a request names only its destination": (
        [("fleet_egress.py", "if n and authority_host(n) != normal_host(request.host)]", "if False]")],
        ["absolute form"]),
    "connections per agent": (
        [("fleet_egress.py", "MAX_CONNECTIONS_PER_AGENT = 512", "MAX_CONNECTIONS_PER_AGENT = 100_000")],
        ["held connections"]),
    "a failing hook refuses its flow": ([FAULT, NO_FAIL_CLOSED], ["refused by fleet"]),
    "every upstream connection checked where it opens": (
        [FAULT, NO_FAIL_CLOSED, NO_CONNECT_CHECK], ["refused host"]),
}


@pytest.fixture(scope="module")
def upstream(docker_client: docker.DockerClient,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with run_upstream(docker_client, tmp_path_factory.mktemp("upstream"), (FORGE, "other.test")) as up:
        yield up


def attack(make_fleet: MakeFleet, upstream: Upstream, docker_client: docker.DockerClient) -> dict[str, Any]:
    fleet = make_fleet({"dev": {"tokens": ["forge"], "egress": [FORGE, f"{FORGE}:80"],
                                "inject": {"forge": {"host": FORGE, "value": "token {token}"}}}},
                       egress_network=upstream.network, egress_ca_file=str(upstream.ca_file),
                       egress_hosts={name: upstream.address for name in upstream.names})
    TokenStore(fleet.settings).set("dev", "forge", b"a-token-for-the-probes")
    manager = ContainerManager(docker_client, fleet.settings)
    container = manager.ensure("dev")
    done = container.exec_run(["python3", "-c", ATTACKS], user=str(manager.spec("dev").uid),
                              environment=dict(manager.network_environment("dev", "probe", 1)))
    assert done.exit_code == 0, done.output
    found: dict[str, Any] = json.loads(done.output)
    return found


def test_every_probe_holds_against_the_real_proxy(make_fleet: MakeFleet, upstream: Upstream,
                                                   docker_client: docker.DockerClient) -> None:
    found = attack(make_fleet, upstream, docker_client)
    assert {name: probe(found) for name, probe in PROBES.items()} == dict.fromkeys(PROBES, True), found


@pytest.mark.parametrize("control", list(WEAKENED))
def test_each_control_of_the_proxy_is_what_blocks_its_probe(
        control: str, make_fleet: MakeFleet, upstream: Upstream, docker_client: docker.DockerClient,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    edits, probes = WEAKENED[control]
    sources = {name: (ADDON / name).read_text() for name in ("fleet_egress.py", "egress_rules.py")}
    for name, old, new in edits:
        assert old in sources[name], f"{name} no longer has {old!r}: update this test"
        sources[name] = sources[name].replace(old, new)
    mounts = []
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
        mounts.append(Mount(target=f"/opt/fleet/{name}", source=str(tmp_path / name), type="bind",
                            read_only=True))
    original = egress_proxy.proxy_create_kwargs

    def weakened(settings: Any) -> dict[str, Any]:
        kwargs = original(settings)
        kwargs["mounts"] = [*kwargs["mounts"], *mounts]
        return kwargs

    monkeypatch.setattr(egress_proxy, "proxy_create_kwargs", weakened)
    found = attack(make_fleet, upstream, docker_client)
    assert {name: PROBES[name](found) for name in probes} == dict.fromkeys(probes, False), found
