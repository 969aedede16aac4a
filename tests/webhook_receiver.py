"""A webhook receiver for the on_done tests, run as its own process (so a
test can take it down and bring it back): an HTTP server (the standard
library's) that checks each POST's HMAC-SHA256 signature with its own code,
as a receiver written from the docs would, answers 401 to a bad one and 200
to a good one, and appends what it got to a JSON-lines file.

    python webhook_receiver.py PORT SECRET_FILE OUT_FILE"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock

PORT, SECRET, OUT = int(sys.argv[1]), Path(sys.argv[2]).read_bytes().strip(), Path(sys.argv[3])
WRITING = Lock()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        timestamp = self.headers.get("X-Fleet-Timestamp", "")
        expected = "sha256=" + hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, self.headers.get("X-Fleet-Signature", ""))
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
        seen = {"at": time.time(), "valid": valid and fresh,
                "delivery": self.headers.get("X-Fleet-Delivery"), "body": json.loads(body)}
        with WRITING, OUT.open("a") as out:
            out.write(json.dumps(seen) + "\n")
        self.send_response(200 if valid and fresh else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Receiver)
print("listening", flush=True)
server.serve_forever()
