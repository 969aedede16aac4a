#!/usr/bin/env python3
"""fleet-agent: the demo agent. It follows the job protocol (docs/protocol.md)
so the demo and the tests can drive every outcome.

The payload is one JSON object on stdin. Every key is optional; steps run in
this order:

  record      "name"    append "start <task> <attempt> <time>" to /state/<name>
  lines       N         print N numbered lines on stdout, one every `interval` s
  echo        "text"    print the text
  shell       "cmd"     run /bin/sh -c cmd (its output passes through)
  sleep       S         sleep S seconds
  check_token "name"    read $FLEET_TOKEN_DIR/<name>; if forge_url is given, call
                        it with "Authorization: Bearer <token>"; a missing or
                        empty token or an HTTP 401/403 exits 77 (but a refusal
                        by fleet's egress proxy exits 1: no credential is wrong)
  exit        CODE      exit with CODE ... while FLEET_ATTEMPT < fail_until_attempt
                        (if given), else succeed
  (record)              append "end ..." to /state/<name>; "killed ..." if SIGTERM ends it

On success the last stdout line is the result, a JSON object.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

CREDENTIAL_FAILURE = 77


def credential_failure(token: str, why: str) -> None:
    print(f"credential failure: {why}", file=sys.stderr)
    print(f"fleet: credential-failure token={token}", file=sys.stderr, flush=True)
    sys.exit(CREDENTIAL_FAILURE)


def check_token(name: str, forge_url: str | None) -> str:
    path = os.path.join(os.environ.get("FLEET_TOKEN_DIR", "/run/fleet/tokens"), name)
    try:
        with open(path) as f:
            token = f.read()
    except OSError as error:
        credential_failure(name, f"cannot read token {name}: {error.strerror}")
    if not token:
        credential_failure(name, f"token {name} is empty")
    if forge_url:
        request = urllib.request.Request(forge_url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return f"forge answered {response.status}"
        except urllib.error.HTTPError as error:
            if error.headers.get("X-Fleet-Egress") == "refused":  # fleet's proxy, not the forge, said no
                print(f"egress refused: {error.read().decode(errors='replace').strip()}", file=sys.stderr)
                sys.exit(1)
            if error.code in (401, 403):
                credential_failure(name, f"forge rejected token {name} with HTTP {error.code}")
            raise
    return "token present"


def record(name: str | None, what: str) -> None:
    if not name:
        return
    task = os.environ.get("FLEET_TASK_ID", "")
    attempt = os.environ.get("FLEET_ATTEMPT", "")
    with open(os.path.join("/state", name), "a") as f:
        f.write(f"{what} {task} {attempt} {time.time():.6f}\n")


def main() -> int:
    raw = sys.stdin.read()
    payload = json.loads(raw) if raw.strip() else {}
    if not isinstance(payload, dict):
        print("payload must be a JSON object", file=sys.stderr)
        return 2
    attempt = int(os.environ.get("FLEET_ATTEMPT", "1"))

    def on_sigterm(signum: int, frame: object) -> None:
        record(payload.get("record"), "killed")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    result: dict[str, object] = {
        "agent": os.environ.get("FLEET_AGENT"),
        "task": os.environ.get("FLEET_TASK_ID"),
        "attempt": attempt,
    }
    record(payload.get("record"), "start")
    for n in range(int(payload.get("lines", 0))):
        print(f"line {n + 1}", flush=True)
        time.sleep(float(payload.get("interval", 0)))
    if "echo" in payload:
        print(payload["echo"], flush=True)
        result["echo"] = payload["echo"]
    if "shell" in payload:
        done = subprocess.run(["/bin/sh", "-c", payload["shell"]], check=False)
        result["shell_exit"] = done.returncode
    if "sleep" in payload:
        time.sleep(float(payload["sleep"]))
    if "check_token" in payload:
        result["token"] = check_token(payload["check_token"], payload.get("forge_url"))
    record(payload.get("record"), "end")
    code = int(payload.get("exit", 0))
    if code and attempt < int(payload.get("fail_until_attempt", sys.maxsize)):
        print(f"exiting with {code} on attempt {attempt}", file=sys.stderr, flush=True)
        return code
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
