"""A stand-in forge: git's smart HTTP (`git http-backend`, git's own server
side) behind a small HTTPS server, checking the Authorization header of
every request. It runs in a container of its own, reached only through
fleet's egress proxy, which adds the agent's forge token; it knows the
header's SHA-256, never the token, and answers 401 to anything else, as a
forge does to a revoked token.

At start it makes each repository named on the command line (`team/app`)
as a bare repository with one commit, under /srv/git (a tmpfs). Every
request is noted as a JSON line on stdout (path, the header's hash,
accepted or not); a push git http-backend answered also notes its
repository and time (which refs it changed, the bare repository says).

Standard library and git only: it runs on an image with git installed."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = "/srv/git"
ACCEPT = os.environ.get("ACCEPT_SHA256", "")
LOG = threading.Lock()
MAX_BODY = 64 * 1024 * 1024


def note(**fields: Any) -> None:
    with LOG:
        print(json.dumps(fields), flush=True)


def make_repository(name: str) -> None:
    """A bare repository `<ROOT>/<name>.git` whose main branch has a README."""
    bare = f"{ROOT}/{name}.git"
    identity = {"GIT_AUTHOR_NAME": "forge", "GIT_AUTHOR_EMAIL": "forge@standin",
                "GIT_COMMITTER_NAME": "forge", "GIT_COMMITTER_EMAIL": "forge@standin",
                "HOME": ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    with tempfile.TemporaryDirectory(dir=ROOT) as work:
        for command in (["git", "init", "--quiet", "--bare", "--initial-branch=main", bare],
                        ["git", "init", "--quiet", "--initial-branch=main", work]):
            subprocess.run(command, check=True, env=identity)
        with open(f"{work}/README.md", "w") as readme:
            readme.write(f"# {name}\n")
        for command in (["git", "-C", work, "add", "README.md"],
                        ["git", "-C", work, "commit", "--quiet", "-m", "First commit"],
                        ["git", "-C", work, "push", "--quiet", bare, "main"]):
            subprocess.run(command, check=True, env=identity)
    subprocess.run(["git", "--git-dir", bare, "config", "http.receivepack", "true"], check=True)


def read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request's body, sent with a length or chunked (git chunks large pushes)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        total = 0
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise ValueError("body too large")
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    if length > MAX_BODY:
        raise ValueError("body too large")
    return handler.rfile.read(length)


class SmartHttp(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def refuse(self, code: int, text: str, **headers: str) -> None:
        data = text.encode()
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_git(self) -> None:
        auth = self.headers.get("Authorization")
        digest = hashlib.sha256(auth.encode()).hexdigest() if auth is not None else None
        path, _, query = self.path.partition("?")
        note(method=self.command, path=path, auth_sha256=digest, accepted=digest == ACCEPT)
        if digest != ACCEPT:
            self.refuse(401, "bad credentials\n", **{"WWW-Authenticate": 'Basic realm="forge"'})
            return
        try:
            body = read_body(self)
        except ValueError as error:
            self.refuse(413, f"{error}\n")
            return
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": ROOT,
            "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
            "REQUEST_METHOD": self.command, "REMOTE_USER": "agent", "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        done = subprocess.run(["git", "http-backend"], input=body, capture_output=True, env=environment)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        if path.endswith("/git-receive-pack") and status == 200:
            note(pushed=path.rsplit("/", 1)[0], by_sha256=digest, at=time.time())

    do_GET = handle_git
    do_POST = handle_git

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    os.makedirs(ROOT, exist_ok=True)
    for name in sys.argv[1:]:
        make_repository(name)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), SmartHttp)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain("/certs/upstream.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    note(ready=True, git=shutil.which("git"))
    server.serve_forever()


if __name__ == "__main__":
    main()
