"""Egress end to end on the real engine: `fleet worker` runs an agent whose
only way out is fleet's proxy (mitmproxy in its own container), towards a
stand-in HTTPS forge on a network only the proxy shares. The forge reports
the hash of the Authorization header it got; the real token is only ever
on the host and at the proxy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from egress_upstream import Upstream, auth_sha256, run_upstream
from support import Fleet, MakeFleet, RedisServer, all_redis_text, wait_for_state

from fleet.container.spec import container_name
from fleet.credentials.tokens import PLACEHOLDER
from fleet.record import ErrorKind, State

GOOD = "forge-token-good-9f8e7d6c5b4a39281706"
ROTATED = "forge-token-rotated-0a1b2c3d4e5f60718293"
FORGE = "forge.test"

# The agent's command runs the payload's script: tests say what the agent does in Python.
SCRIPT_AGENT = ["python3", "-c", "import json, sys; exec(json.load(sys.stdin)['script'])"]
GET = """
import http.client, json, os, socket, sys, urllib.error, urllib.parse, urllib.request
def get(url, **headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # a refused CONNECT: urllib keeps only the status line
        return 0, str(e)
def connect(target):
    proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
    with socket.create_connection((proxy.hostname, proxy.port), timeout=30) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
        answer = http.client.HTTPResponse(s, method="GET")
        answer.begin()
        return f"{answer.status} {answer.read().decode()}"
"""


def fetch(*requests: tuple[str, str, dict[str, str]], connect: str = "") -> dict[str, Any]:
    """A payload: GET each (name, url, headers) from the container, and a
    bare CONNECT to `connect`; the result maps name → [status, body] and
    "connect" → the proxy's whole answer."""
    return {"script": GET + f"print(json.dumps({{**{{n: get(u, **h) for n, u, h in {list(requests)!r}}}, "
                            f"'connect': connect({connect!r}) if {connect!r} else ''}}))"}


@pytest.fixture
def upstream(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[Upstream]:
    with run_upstream(docker_client, tmp_path, (FORGE, "other.test"), accept="token " + GOOD) as up:
        yield up


def egress_fleet(make_fleet: MakeFleet, upstream: Upstream, **agent: Any) -> Fleet:
    spec = {"tokens": ["forge"], "egress": [FORGE],
            "inject": {"forge": {"host": FORGE, "header": "Authorization", "value": "token {token}"}},
            "command": SCRIPT_AGENT, "credential_retries": 2, "credential_backoff_s": 60, **agent}
    return make_fleet({"dev": spec}, egress_network=upstream.network, egress_ca_file=str(upstream.ca_file),
                      egress_hosts={name: upstream.address for name in upstream.names})


def run(fleet: Fleet, payload: dict[str, Any], state: State = State.SUCCEEDED) -> Any:
    client = fleet.client()
    task_id = client.submit("dev", payload)
    try:
        record = wait_for_state(client, task_id, state, timeout=120)
    except AssertionError as failed:
        output = "".join(e.fields.get("data", "") for e in client.store.events.output(task_id))
        raise AssertionError(f"{failed}\n--- its output ---\n{output}") from None
    return record


def test_an_allowed_host_gets_the_injected_token_and_others_are_refused(
        make_fleet: MakeFleet, upstream: Upstream, redis_server: RedisServer,
        docker_client: docker.DockerClient) -> None:
    fleet = egress_fleet(make_fleet, upstream)
    assert fleet.cli("tokens", "set", "dev", "forge", input=GOOD + "\n").returncode == 0
    fleet.start_worker("dev")
    record = run(fleet, fetch(
        ("forge", f"https://{FORGE}/whoami", {"Authorization": "token attacker-chosen"}),
        ("other", "https://other.test/whoami", {}),
        ("plain", f"http://{FORGE}/whoami", {}), connect="other.test:443"))
    forge_status, forge_body = record.result["forge"]
    assert forge_status == 200
    seen = json.loads(forge_body)
    assert seen["auth_sha256"] == auth_sha256("token " + GOOD)  # overwritten, not the agent's own
    assert seen["proxy_auth"] is None  # the proxy's credentials stay at the proxy
    assert record.result["other"][0] == 0
    assert "Tunnel connection failed: 403" in record.result["other"][1]
    refusal = record.result["connect"]
    assert refusal.startswith("403 ")
    assert "fleet egress: agent 'dev' may not reach other.test:443 (not in agents.dev.egress)" in refusal
    assert record.result["plain"][0] == 403  # port 80 is not in its egress
    assert "may not reach forge.test:80" in record.result["plain"][1]

    events = [e.fields for e in fleet.client().store.events.of_task(record.id) if e.type == "egress"]
    decisions = {(e["destination"], e["decision"]) for e in events}
    assert {("forge.test:443", "allowed"), ("other.test:443", "refused"), ("forge.test:80", "refused")} \
        <= decisions
    allowed = next(e for e in events if e["decision"] == "allowed")
    assert int(allowed["bytes_in"]) == len(forge_body)

    # The container holds the placeholder, never the token: not in a file, the environment or output.
    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    uid = str(fleet.settings.agent_uid)
    token_file = container.exec_run(["cat", "/run/fleet/tokens/forge"], user=uid)
    assert token_file.output == PLACEHOLDER
    files = container.exec_run(["grep", "-rsl", "-e", GOOD, "/", "--exclude-dir=sys", "--exclude-dir=proc"],
                               user="0:0")
    assert files.output == b""
    environments = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ"], user="0:0")
    assert b"HTTPS_PROXY=" in environments.output or environments.output  # it read them
    assert GOOD.encode() not in environments.output
    assert GOOD not in json.dumps(container.attrs)
    output = "".join(e.fields.get("data", "") for e in fleet.client().store.events.output(record.id))
    assert GOOD not in output
    assert GOOD not in all_redis_text(redis_server)


def test_a_rotated_token_is_used_from_the_next_request(make_fleet: MakeFleet, upstream: Upstream) -> None:
    fleet = egress_fleet(make_fleet, upstream)
    assert fleet.cli("tokens", "set", "dev", "forge", input=GOOD).returncode == 0
    fleet.start_worker("dev")
    whoami = fetch(("forge", f"https://{FORGE}/whoami", {}))
    before = json.loads(run(fleet, whoami).result["forge"][1])
    assert fleet.cli("tokens", "set", "dev", "forge", input=ROTATED).returncode == 0
    after = json.loads(run(fleet, whoami).result["forge"][1])
    assert (before["auth_sha256"], after["auth_sha256"]) == (auth_sha256("token " + GOOD),
                                                             auth_sha256("token " + ROTATED))


def test_an_upstream_401_takes_the_credential_path(make_fleet: MakeFleet, upstream: Upstream) -> None:
    fleet = egress_fleet(make_fleet, upstream)
    assert fleet.cli("tokens", "set", "dev", "forge", input=ROTATED).returncode == 0  # not the one it accepts
    fleet.start_worker("dev")
    client = fleet.client()
    check = GET + f"""
placeholder = open("/run/fleet/tokens/forge").read().strip()
status, body = get("https://{FORGE}/check", Authorization="Bearer " + placeholder)
if status == 401:
    print("fleet: credential-failure token=forge", file=sys.stderr)
    sys.exit(77)
print(json.dumps({{"status": status}}))
"""
    task_id = client.submit("dev", {"script": check})
    retrying = wait_for_state(client, task_id, State.RETRYING, timeout=120)
    assert retrying.error.kind == ErrorKind.CREDENTIAL
    # The rotation makes the retry come at once (the backoff is a minute).
    assert fleet.cli("tokens", "set", "dev", "forge", input=GOOD).returncode == 0
    done = wait_for_state(client, task_id, State.SUCCEEDED, timeout=120)
    assert done.attempts == 2


def test_a_streamed_response_arrives_in_pieces(make_fleet: MakeFleet, upstream: Upstream) -> None:
    """The forge sends its second event only after the agent, having read
    the first through the proxy, asks for it: a proxy that buffered the
    response would hold the first back and the agent would time out."""
    fleet = egress_fleet(make_fleet, upstream)
    fleet.start_worker("dev")
    stream = """
import json, urllib.request
response = urllib.request.urlopen("https://forge.test/stream", timeout=30)
first = response.readline().decode()
urllib.request.urlopen("https://forge.test/release", timeout=30).read()
print(json.dumps({"first": first, "rest": response.read().decode()}))
"""
    record = run(fleet, {"script": stream})
    assert record.result == {"first": "data: one\n", "rest": "\ndata: two\n\n"}
