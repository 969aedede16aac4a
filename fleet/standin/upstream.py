"""A stand-in upstream for the demo, the benchmark and the tests: a small
web server in a container of the agent image, on an internal network of
its own that only fleet's egress proxy joins (give it as `egress_network`).
It serves plain HTTP on port 80 and, given a certificate from a CA made
for it (by mitmproxy's own certificate code, in a one-off run of the proxy
image), HTTPS on 443. It never holds a token: it knows the SHA-256 of the
Authorization value it accepts, and reports the hash of what it got."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import Mount

from fleet.container.spec import LABEL_NAMESPACE
from fleet.settings import AGENT_IMAGE

READY_TIMEOUT_S = 60

STANDIN_SCRIPT = r'''
import hashlib, http.server, json, os, ssl, threading
released = threading.Event()
ACCEPT = os.environ.get("ACCEPT_SHA256", "")

http.server.ThreadingHTTPServer.request_queue_size = 1024

class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a kept-alive answer must not wait for a delayed ACK
    wbufsize = 65536  # the status line, headers and body leave in one write

    def reply(self, code, body, kind="application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, text):
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        auth = self.headers.get("Authorization")
        digest = hashlib.sha256(auth.encode()).hexdigest() if auth is not None else None
        if self.path == "/whoami":
            self.reply(200, json.dumps({"auth_sha256": digest, "host": self.headers.get("Host"),
                                        "proxy_auth": self.headers.get("Proxy-Authorization")}))
        elif self.path == "/check":
            ok = digest == ACCEPT
            self.reply(200 if ok else 401, "welcome" if ok else "bad credentials", "text/plain")
        elif self.path == "/stream":  # server-sent events: the second waits for /release
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk("data: one\n\n")
            self.chunk("data: two\n\n" if released.wait(60) else "data: never released\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif self.path == "/release":
            released.set()
            self.reply(200, "{}")
        else:  # /<n>: n bytes
            self.reply(200, "x" * int(self.path.strip("/") or 0), "text/plain")

    def log_message(self, *args):
        pass

plain = http.server.ThreadingHTTPServer(("0.0.0.0", 80), Upstream)
if os.path.exists("/certs/upstream.pem"):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain("/certs/upstream.pem")
    tls = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Upstream)
    # Each handshake in its connection's thread, not in the accept loop: a slow client stalls no other.
    tls.socket = context.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
'''

ISSUE_SCRIPT = r'''
import sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore
names = sys.argv[1:]
store = CertStore.from_store("/out/ca", "standin", 2048)
entry = store.get_cert(names[0], [x509.DNSName(n) for n in names])
key = entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
open("/out/upstream.pem", "wb").write(key + entry.cert.to_pem())
open("/out/ca.pem", "wb").write(store.default_ca.to_pem())
'''


def auth_sha256(header_value: str) -> str:
    return hashlib.sha256(header_value.encode()).hexdigest()


def issue_certificate(client: docker.DockerClient, proxy_image: str, directory: Path,
                      names: tuple[str, ...]) -> Path:
    """A CA of its own and a certificate for `names` signed by it, made by
    mitmproxy's certificate code in a one-off run of the proxy image:
    `directory/upstream.pem` (key and certificate, for the stand-in) and
    `directory/ca.pem` (for the proxy's `egress_ca_file`). Returns the latter."""
    directory.mkdir(parents=True, exist_ok=True)
    client.containers.run(
        proxy_image, ["-c", ISSUE_SCRIPT, *names], entrypoint=["/opt/mitmproxy/bin/python3"], remove=True,
        user="0:0", network_mode="none", cap_drop=["ALL"], read_only=True,
        mounts=[Mount(target="/out", source=str(directory.resolve()), type="bind")])
    (directory / "upstream.pem").chmod(0o644)
    return directory / "ca.pem"


@dataclass
class StandIn:
    network: str  # the only way to it: the proxy's egress_network
    address: str
    container: Container
    net: Network

    def remove(self) -> None:
        remove_standins([self.container], self.net)


def remove_standins(containers: list[Container], net: Network) -> None:
    """The stand-ins' containers, and their network with whatever else is
    still attached to it (the proxy, if it is still up)."""
    for container in containers:
        with suppress(docker.errors.NotFound):
            container.remove(force=True)
    with suppress(docker.errors.NotFound):
        net.reload()
        for attached in net.containers:
            with suppress(docker.errors.APIError):
                net.disconnect(attached, force=True)
        net.remove()


def fresh_network(client: docker.DockerClient, name: str, namespace: str) -> Network:
    """An internal network `name` (no route out), made anew: a stale one
    is removed with whatever is still attached to it."""
    for stale in client.networks.list(names=[name]):
        remove_standins([], stale)
    return client.networks.create(name, internal=True, labels={LABEL_NAMESPACE: namespace})


def start_server(client: docker.DockerClient, net: Network, name: str, names: tuple[str, ...], *,
                 image: str, command: list[str], namespace: str, mounts: list[Mount],
                 environment: dict[str, str], tmpfs: dict[str, str] | None = None) -> tuple[Container, str]:
    """A stand-in server `name` on `net`, answering to `names` there (and
    only there), as root with no capability but binding low ports, on a
    read-only root. Returns it and its address once it prints `ready`."""
    network = str(net.name)
    for stale in client.containers.list(all=True, filters={"name": f"^{name}$"}):
        stale.remove(force=True)
    container = client.containers.create(
        image, command, name=name, user="0:0", labels={LABEL_NAMESPACE: namespace}, network=network,
        cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"], read_only=True, mounts=mounts, tmpfs=tmpfs or {},
        environment=environment)
    try:
        net.disconnect(container)
        net.connect(container, aliases=list(names))
        container.start()
        # Until it says it listens; one that hangs is killed, which ends the stream.
        watchdog = threading.Timer(READY_TIMEOUT_S, lambda: suppress_engine(container.kill))
        watchdog.start()
        try:
            for line in container.logs(stream=True, follow=True):
                if is_ready_line(line):
                    break
        finally:
            watchdog.cancel()
        container.reload()
        if container.status != "running":
            tail = container.logs(tail=5).decode(errors="replace").strip()
            raise RuntimeError(f"stand-in {name} did not start: {tail}")
        return container, str(container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])
    except BaseException:
        with suppress(docker.errors.NotFound):
            container.remove(force=True)
        raise


def is_ready_line(line: bytes) -> bool:
    """What a stand-in prints once it listens: `ready`, or a JSON note `{"ready": true, …}`."""
    return line.strip() == b"ready" or line.startswith(b'{"ready": true')


def suppress_engine(action: Callable[[], object]) -> None:
    with suppress(docker.errors.APIError):
        action()


def certificate_mount(certificates: Path) -> Mount:
    return Mount(target="/certs", source=str(certificates.resolve()), type="bind", read_only=True)


def start_standin(client: docker.DockerClient, name: str, names: tuple[str, ...], *,
                  namespace: str, accept: str = "", certificates: Path | None = None) -> StandIn:
    """The stand-in named `name`, answering to `names` on its network (HTTP,
    and HTTPS with `certificates/upstream.pem`); `accept` is the
    Authorization value /check lets in. Returns once it listens."""
    net = fresh_network(client, name, namespace)
    try:
        container, address = start_server(
            client, net, name, names, image=AGENT_IMAGE, command=["python3", "-c", STANDIN_SCRIPT],
            namespace=namespace, mounts=[certificate_mount(certificates)] if certificates else [],
            environment={"ACCEPT_SHA256": auth_sha256(accept) if accept else ""})
    except BaseException:
        remove_standins([], net)
        raise
    return StandIn(name, address, container, net)
