"""A hostile agent prints its own token the way real tools print it — in
Basic credentials as `curl -v` shows them, hex, wrapped and URL-safe base64,
URL-encoded, JSON-escaped in its result, split between stdout and stderr —
and prints the new value of a token rotated while it runs. None of it may
reach the task's log, its result, any key in Redis or the worker's log."""

from __future__ import annotations

import base64
import os
from urllib.parse import quote

from support import MakeFleet, RedisServer, all_redis_text

from fleet.credentials.masking import base64_cores
from fleet.record import State

# Runs in the container: every shape of the token, then waits for its
# rotation and prints the new value too.
LEAKER = r"""
import base64, binascii, json, os, sys, textwrap, time, urllib.parse
path = "/run/fleet/tokens/forge"
t = open(path, "rb").read()
s = t.decode()
out, err = sys.stdout, sys.stderr
print("raw", s)
print("> Authorization: Basic " + base64.b64encode(b"x-access-token:" + t).decode())
print("> Authorization: Basic " + base64.b64encode(b"me:" + t).decode())
print("hex", t.hex(), t.hex().upper())
print("\n".join(textwrap.wrap(base64.b64encode(b"-" * 61 + t + b"=" * 30).decode(), 76)))
print("urlsafe", base64.urlsafe_b64encode(b"ab" + t).decode().rstrip("="))
print("url", urllib.parse.quote(s, safe=""), urllib.parse.quote(s, safe="").lower())
half = len(s) // 2
out.write("split " + s[:half]); out.flush()
err.write(s[half:] + " end\n"); err.flush()
print("rotate-me", flush=True)
while open(path, "rb").read() == t:
    time.sleep(0.05)
new = open(path, "rb").read()
print("new", new.decode(), base64.b64encode(b"u:" + new).decode())
escaped = "".join("\\u%04x" % ord(c) for c in s)
mixed = s[:3] + escaped[18:]
print('{"token": "' + escaped + '", "mixed": "' + mixed + '", "new": ' + json.dumps(new.decode()) + '}')
"""


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, raw.hex(), raw.hex().upper(), quote(value, safe=""),
            *[core for core in base64_cores(raw) if len(core) >= 8]]


def test_no_shape_of_a_printed_token_reaches_log_result_redis_or_worker_log(
        make_fleet: MakeFleet, redis_server: RedisServer) -> None:
    fleet = make_fleet({"leaky": {"tokens": ["forge"], "command": ["python3", "-c", LEAKER]}})
    old, new = "old-" + os.urandom(16).hex(), "new-" + os.urandom(16).hex()
    assert fleet.cli("tokens", "set", "leaky", "forge", input=old).returncode == 0
    worker = fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("leaky", {})
    key = client.store.keys.events(task_id)
    for batch in client.store.events.follow(key, block_ms=1000):
        if any("rotate-me" in e.fields.get("data", "") for e in batch):
            break
    assert fleet.cli("tokens", "set", "leaky", "forge", input=new).returncode == 0
    record = client.wait(task_id, 60)
    assert record.state == State.SUCCEEDED, fleet.cli("logs", task_id).stderr
    assert record.result == {"token": "[masked]", "mixed": "[masked]", "new": "[masked]"}

    logs = fleet.cli("logs", task_id)
    shown = logs.stdout + logs.stderr
    assert shown.count("[masked]") >= 10
    everything = all_redis_text(redis_server)
    assert task_id in everything
    worker.stop()
    worker_log = "".join(worker.lines)
    for value in (old, new):
        for form in forms(value):
            assert form not in shown.replace("\n", ""), form
            assert form not in everything, form
            assert form not in worker_log, form
    assert base64.b64encode(old.encode()).decode()[:12] not in shown
