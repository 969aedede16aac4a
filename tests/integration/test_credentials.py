"""Credential failures end to end: a forge stand-in that answers 401 unless
the bearer token is right, token rotation while the agent's container runs,
retries, alerts, the circuit breaker, and masking of token values."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import docker
import pytest
from support import FLEET, Fleet, MakeFleet, RedisServer, all_redis_text, new_namespace, wait_for_state

from fleet.container.spec import LABEL_NAMESPACE, container_name
from fleet.credentials.tokens import TokenStore
from fleet.record import ErrorKind, State

GOOD = "forge-token-right-0123456789abcdef"
BAD = "forge-token-wrong-0123456789abcdef"
FORGE_URL = "http://forge:8080/"
FORGE_SCRIPT = """
import http.server, os
class Forge(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer " + os.environ["FORGE_TOKEN"]
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"welcome" if ok else b"bad credentials")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("0.0.0.0", 8080), Forge)
print("ready", flush=True)
server.serve_forever()
"""
CHECK = {"check_token": "forge", "forge_url": FORGE_URL}


@pytest.fixture
def forge_network(docker_client: docker.DockerClient) -> Iterator[str]:
    """An internal network with a forge stand-in on it, reachable as `forge`."""
    name = f"{new_namespace()}-forge"
    network = docker_client.networks.create(name, internal=True, labels={LABEL_NAMESPACE: name})
    forge = docker_client.containers.run(
        "fleet-agent:latest", ["python3", "-c", FORGE_SCRIPT], name=name, detach=True,
        environment={"FORGE_TOKEN": GOOD}, network=name, labels={LABEL_NAMESPACE: name},
        read_only=True, cap_drop=["ALL"])
    network.disconnect(forge)
    network.connect(forge, aliases=["forge"])
    for line in forge.logs(stream=True, follow=True):  # blocks until the forge says it listens
        if b"ready" in line:
            break
    yield name
    forge.remove(force=True)
    network.reload()
    for attached in network.containers:  # the agent's container, if the fleet is still up
        network.disconnect(attached, force=True)
    network.remove()


def set_token(fleet: Fleet, agent: str, value: str) -> subprocess.CompletedProcess[str]:
    done = fleet.cli("tokens", "set", agent, "forge", input=value + "\n")
    assert done.returncode == 0, done.stderr
    return done


def alerts(fleet: Fleet) -> list[dict[str, str]]:
    out = fleet.cli("alerts", "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_a_rejected_token_is_retried_and_succeeds_after_rotation(
        make_fleet: MakeFleet, forge_network: str) -> None:
    # A long backoff: only the rotation can make the retry come soon.
    fleet = make_fleet({"dev": {"tokens": ["forge"], "network": forge_network,
                                "credential_backoff_s": 600, "credential_backoff_max_s": 600}})
    set_token(fleet, "dev", BAD)
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", CHECK)
    retrying = wait_for_state(client, task_id, State.RETRYING)
    assert retrying.error is not None and retrying.error.kind == ErrorKind.CREDENTIAL
    assert "fleet tokens set dev forge" in retrying.error.message
    failures = [a for a in alerts(fleet) if a["kind"] == "credential_failure"]
    assert [(a["task"], a["token"]) for a in failures] == [(task_id, "forge")]
    events = [e.fields for e in client.store.events.of_task(task_id) if e.type == "credential_failure"]
    assert events == [{"type": "credential_failure", "token": "forge", "attempt": "1"}]

    rotated = set_token(fleet, "dev", GOOD)
    assert f"retrying now: {task_id}" in rotated.stdout
    record = client.wait(task_id, 60)
    assert (record.state, record.attempts) == (State.SUCCEEDED, 2)
    assert record.container == retrying.container  # the same long-lived container
    assert record.result is not None and record.result["token"] == "forge answered 200"


def test_a_token_never_fixed_fails_pauses_the_agent_and_rotation_resumes_it(
        make_fleet: MakeFleet, forge_network: str) -> None:
    fleet = make_fleet({
        "dev": {"tokens": ["forge"], "network": forge_network, "credential_retries": 2,
                "credential_backoff_s": 0.1, "credential_backoff_max_s": 0.2, "breaker_threshold": 3},
        "boss": {},
    })
    set_token(fleet, "dev", BAD)
    fleet.start_worker()
    client = fleet.client()
    doomed = client.wait(client.submit("dev", CHECK), 60)
    assert doomed.state == State.FAILED
    assert doomed.error is not None and doomed.error.kind == ErrorKind.CREDENTIAL
    assert doomed.attempts == 3  # credential_retries + 1

    agents = {row["agent"]: row for row in json.loads(fleet.cli("agents", "--json").stdout)}
    assert agents["dev"]["paused"] is True
    assert agents["dev"]["status"] == "paused: credential failure (token forge)"
    assert agents["boss"]["status"] == "active"
    assert "breaker_opened" in [a["kind"] for a in alerts(fleet)]

    waiting = client.submit("dev", CHECK)
    for _ in range(3):  # another agent's tasks still run meanwhile
        assert client.wait(client.submit("boss", {"echo": "planning"}), 60).state == State.SUCCEEDED
    assert client.status(waiting).state == State.QUEUED
    assert client.status(waiting).attempts == 0

    set_token(fleet, "dev", GOOD)
    assert client.wait(waiting, 60).state == State.SUCCEEDED
    assert "breaker_closed" in [a["kind"] for a in alerts(fleet)]
    rows = {row["agent"]: row for row in json.loads(fleet.cli("agents", "--json").stdout)}
    assert rows["dev"]["paused"] is False


def test_a_paused_agent_stays_paused_for_a_worker_that_starts_later(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    client = fleet.client()
    client.breaker.pause("dev", "credential failure", "forge")
    waiting = client.submit("dev", {})
    worker = fleet.start_worker()
    worker.wait_for_line("is paused: no longer consuming")
    assert client.status(waiting).state == State.QUEUED
    assert fleet.cli("agents", "resume", "dev").stdout.strip() == "agent dev resumed"
    assert client.wait(waiting, 60).state == State.SUCCEEDED


def secret_forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, base64.b64encode(raw).decode(), base64.b64encode(raw + b"\n").decode(),
            quote(value, safe="")]


def test_printed_tokens_are_masked_in_logs_result_and_every_redis_key(
        make_fleet: MakeFleet, redis_server: RedisServer) -> None:
    script = ('t=$(cat /run/fleet/tokens/forge); echo "plain $t"; printf %s "$t" | base64; '
              'echo "$t" | base64; printf \'{"token": "%s"}\\n\' "$t"')
    fleet = make_fleet({"leaky": {"tokens": ["forge"], "command": ["/bin/sh", "-c", script]}})
    secret = "s3cr3t-" + os.urandom(12).hex()
    set_token(fleet, "leaky", secret)
    fleet.start_worker()
    client = fleet.client()
    record = client.wait(client.submit("leaky", {}), 60)
    assert record.state == State.SUCCEEDED
    assert record.result == {"token": "[masked]"}
    logs = fleet.cli("logs", record.id).stdout
    assert logs.count("[masked]") == 4
    everything = all_redis_text(redis_server)
    assert record.id in everything  # the scan does see this task's keys
    for form in secret_forms(secret):
        assert form not in logs
        assert form not in everything
        assert form not in fleet.cli("status", record.id, "--json").stdout


def test_a_reader_never_sees_a_partial_token_during_rotations(
        make_fleet: MakeFleet, docker_client: docker.DockerClient) -> None:
    reader = """
import json, os, sys
seen, bad, reads = set(), 0, 0
print("reading", flush=True)
while not os.path.exists("/state/stop"):
    with open("/run/fleet/tokens/forge") as f:
        value = f.read()
    reads += 1
    if value not in ("A" * 4096, "B" * 4096):
        bad += 1
    seen.add(value[:1])
print(json.dumps({"reads": reads, "bad": bad, "seen": sorted(seen)}))
"""
    fleet = make_fleet({"dev": {"tokens": ["forge"], "command": ["python3", "-c", reader]}})
    tokens = TokenStore(fleet.settings)
    tokens.set("dev", "forge", b"A" * 4096)
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {})
    follow = subprocess.Popen([FLEET, "logs", "--follow", task_id], env=fleet.env,
                              stdout=subprocess.PIPE, text=True)
    assert follow.stdout is not None and follow.stdout.readline() == "reading\n"
    for n in range(300):
        tokens.set("dev", "forge", (b"B" if n % 2 == 0 else b"A") * 4096)
    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    container.exec_run(["touch", "/state/stop"])
    follow.wait(timeout=60)
    record = client.wait(task_id, 60)
    assert record.result is not None
    assert record.result["bad"] == 0
    assert record.result["reads"] > 0
    assert record.result["seen"] == ["A", "B"]  # rotations were visible inside the running container


def test_token_files_commands_and_permissions(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {"tokens": ["forge"]}})
    secret = "tok-" + os.urandom(8).hex()
    set_token(fleet, "dev", secret)
    path = fleet.settings.secrets_dir / "dev" / "forge"
    assert path.read_text() == secret  # one trailing newline stripped
    # Root's, readable by the agent's own group only (its uid's, in its container).
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert (path.stat().st_uid, path.parent.stat().st_uid) == (0, 0)
    assert path.stat().st_gid == path.parent.stat().st_gid == 10001
    assert stat.S_IMODE(fleet.settings.secrets_dir.stat().st_mode) == 0o700
    listing = fleet.cli("tokens", "list")
    assert listing.returncode == 0 and "forge" in listing.stdout and "sha256:" in listing.stdout
    assert secret not in listing.stdout
    in_argv = fleet.cli("tokens", "set", "dev", "forge", secret, input="")
    assert in_argv.returncode == 2 and "unexpected extra argument" in in_argv.stderr.lower()
    undeclared = fleet.cli("tokens", "set", "dev", "github", input="x")
    assert undeclared.returncode == 2
    assert "does not declare token 'github'" in undeclared.stderr
    assert not (path.parent / "github").exists()
    empty = fleet.cli("tokens", "set", "dev", "forge", input="\n")
    assert empty.returncode == 2 and "empty" in empty.stderr
    assert path.read_text() == secret
    assert fleet.cli("tokens", "rm", "dev", "forge").returncode == 0
    assert not path.exists()


def test_the_alert_hook_gets_each_alert_as_json(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fifo = tmp_path / "alerts.fifo"
    os.mkfifo(fifo)
    fleet = make_fleet({"dev": {"credential_retries": 0}},
                       alert_command=["/bin/sh", "-c", f"cat > {fifo}"])
    fleet.start_worker()
    client = fleet.client()
    task_id = client.submit("dev", {"check_token": "forge"})  # no token file: exit 77
    with fifo.open() as hooked:  # blocks until the hook writes
        alert = json.loads(hooked.readline())
    assert (alert["kind"], alert["agent"], alert["task"]) == ("credential_failure", "dev", task_id)
    assert client.wait(task_id, 60).state == State.FAILED
