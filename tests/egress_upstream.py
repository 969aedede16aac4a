"""Stand-in upstreams for the egress tests: an HTTPS server with a
certificate from the test's own CA (trustme), in a container of the agent
image on a network only the proxy shares. It never sees a token in the
clear in the test's view: it reports the SHA-256 of the Authorization
header it received, so the test compares hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import trustme
from support import new_namespace

from fleet.container.spec import LABEL_NAMESPACE

UPSTREAM_SCRIPT = r'''
import hashlib, http.server, json, os, ssl, threading
released = threading.Event()
ACCEPT = os.environ.get("ACCEPT_SHA256", "")

class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

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
        else:
            self.reply(200, json.dumps({"bytes": "x" * int(self.path.strip("/") or 0)}))

    def log_message(self, *args):
        pass

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain("/certs/upstream.pem")
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Upstream)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
'''


def auth_sha256(header_value: str) -> str:
    return hashlib.sha256(header_value.encode()).hexdigest()


@dataclass
class Upstream:
    network: str  # reachable only through it: give it to the proxy as egress_network
    address: str
    ca_file: Path  # the test CA: the proxy's egress_ca_file
    names: tuple[str, ...]


@contextmanager
def run_upstream(client: docker.DockerClient, directory: Path, names: tuple[str, ...],
                 accept: str = "") -> Iterator[Upstream]:
    """An HTTPS upstream answering as each of `names`, on an internal network
    of its own; `accept` is the Authorization value /check lets in."""
    ca = trustme.CA()
    certs = directory / "upstream-certs"
    certs.mkdir(exist_ok=True)
    ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(certs / "upstream.pem"))
    (certs / "upstream.pem").chmod(0o644)
    ca.cert_pem.write_to_path(str(directory / "upstream-ca.pem"))
    name = f"{new_namespace()}-upstream"
    labels = {LABEL_NAMESPACE: name}
    network = client.networks.create(name, internal=True, labels=labels)
    upstream = client.containers.run(
        "fleet-agent:latest", ["python3", "-c", UPSTREAM_SCRIPT], name=name, detach=True, user="0:0",
        environment={"ACCEPT_SHA256": auth_sha256(accept) if accept else ""}, network=name, labels=labels,
        read_only=True, cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"],
        volumes={str(certs): {"bind": "/certs", "mode": "ro"}})
    try:
        network.disconnect(upstream)
        network.connect(upstream, aliases=list(names))  # the names resolve on its network (and only there)
        for line in upstream.logs(stream=True, follow=True):  # until it listens
            if b"ready" in line:
                break
        upstream.reload()
        address = upstream.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
        yield Upstream(name, address, directory / "upstream-ca.pem", names)
    finally:
        upstream.remove(force=True)
        network.reload()
        for attached in network.containers:  # the proxy, if its fleet is still up
            network.disconnect(attached, force=True)
        network.remove()
