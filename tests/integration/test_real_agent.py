"""A real coding agent in fleet: Claude Code (its pinned release, the
claude-code recipe's image) runs a task in the dev container. It talks to
a stand-in model API and pushes to a stand-in forge, both reached only
through fleet's egress proxy, which adds the API key and the forge token;
the container holds placeholders. Then the seed's incident, replayed: the
forge token is revoked, the push is refused with 401, the task takes the
credential path, and after `fleet tokens set` it succeeds, with the
isolation suite's canaries never found."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from support import Fleet, MakeFleet, RedisServer, all_redis_text, eventually, new_namespace, wait_for_state

from fleet.container.recipes import build_recipe_and_base
from fleet.container.spec import container_name
from fleet.credentials.tokens import PLACEHOLDER
from fleet.record import ErrorKind, State
from fleet.settings import PROXY_IMAGE
from fleet.standin.real_agent import (
    FORGE_HOST,
    MODEL_HOST,
    RealAgentWorld,
    claude_code_agent,
    egress_settings,
    push_task,
    start_real_agent_world,
)
from fleet.standin.upstream import auth_sha256

MODEL_KEY = "sk-ant-api03-standin-9f8e7d6c5b4a3928170615243342"
FORGE_TOKEN = "forge-token-good-0a1b2c3d4e5f60718293a4b5"
REVOKED = "forge-token-revoked-77aa88bb99cc00dd11ee"


@pytest.fixture(scope="module")
def claude_image(docker_client: docker.DockerClient) -> str:
    return build_recipe_and_base(docker_client, "claude-code", report=print)


@pytest.fixture
def world(docker_client: docker.DockerClient, claude_image: str, tmp_path: Path) -> Iterator[RealAgentWorld]:
    name = f"{new_namespace()}-world"
    made = start_real_agent_world(docker_client, name, image=claude_image, proxy_image=PROXY_IMAGE,
                                  namespace=name, directory=tmp_path / "world-certs", model_key=MODEL_KEY,
                                  forge_authorization=f"token {FORGE_TOKEN}")
    yield made
    made.remove()


def claude_fleet(make_fleet: MakeFleet, world: RealAgentWorld, image: str, forge_token: str) -> Fleet:
    agent = {**claude_code_agent(image), "credential_retries": 3, "credential_backoff_s": 60}
    fleet = make_fleet({"dev": agent}, **egress_settings(world))
    assert fleet.cli("tokens", "set", "dev", "anthropic", input=MODEL_KEY).returncode == 0
    assert fleet.cli("tokens", "set", "dev", "forge", input=forge_token).returncode == 0
    return fleet


def output_of(fleet: Fleet, task_id: str) -> str:
    return "".join(e.fields.get("data", "") for e in fleet.client().store.events.output(task_id))


def test_claude_code_pushes_a_branch_through_the_proxy(
        make_fleet: MakeFleet, world: RealAgentWorld, claude_image: str, redis_server: RedisServer,
        docker_client: docker.DockerClient) -> None:
    fleet = claude_fleet(make_fleet, world, claude_image, FORGE_TOKEN)
    fleet.start_worker("dev")
    client = fleet.client()
    task_id = client.submit("dev", push_task("fleet/notes"))
    try:
        record = wait_for_state(client, task_id, State.SUCCEEDED, timeout=240)
    except AssertionError as failed:
        raise AssertionError(f"{failed}\n--- output ---\n{output_of(fleet, task_id)}") from None

    head = world.branch_head("fleet/notes")
    assert head is not None, "the branch is not on the forge"
    assert record.result["result"] == f"Pushed branch fleet/notes with NOTES.md (commit {head})."
    assert world.git("show", "--format=%an <%ae>", "--no-patch", head)[1] == "fleet dev <dev@fleet.invalid>"
    assert world.git("show", f"{head}:NOTES.md")[0] == 0

    # Every request reached the stand-ins with the real credentials, which only the proxy added.
    model_calls = [n for n in world.notes(world.model) if "accepted" in n]
    assert model_calls and all(n["key_sha256"] == auth_sha256(MODEL_KEY) for n in model_calls)
    forge_calls = [n for n in world.notes(world.forge) if "accepted" in n]
    assert forge_calls and all(n["auth_sha256"] == auth_sha256(f"token {FORGE_TOKEN}") for n in forge_calls)
    assert any(n.get("pushed") == "/team/app.git" for n in world.notes(world.forge))

    container = docker_client.containers.get(container_name(fleet.settings, "dev"))
    uid = str(fleet.settings.agent_uid)
    for name in ("anthropic", "forge"):
        assert container.exec_run(["cat", f"/run/fleet/tokens/{name}"], user=uid).output == PLACEHOLDER
    found = container.exec_run(["grep", "-rlsF", "-e", MODEL_KEY, "-e", FORGE_TOKEN, "/",
                                "--exclude-dir=sys", "--exclude-dir=proc"], user="0:0")
    assert found.output == b""
    assert container.exec_run(["ls", "-A", "/state/fleet-tasks"], user=uid).output == b".claims\n"
    for secret in (MODEL_KEY, FORGE_TOKEN):
        assert secret not in json.dumps(container.attrs)
        assert secret not in output_of(fleet, task_id)
        assert secret not in all_redis_text(redis_server)
    egress = [e.fields for e in client.store.events.of_task(task_id) if e.type == "egress"]
    destinations = {e["destination"] for e in egress}
    assert destinations == {f"{MODEL_HOST}:443", f"{FORGE_HOST}:443"}


def canary() -> str:
    return "fleet" + "canary-" + uuid.uuid4().hex


def alerts(fleet: Fleet) -> list[str]:
    return [json.loads(line)["kind"] for line in fleet.cli("alerts", "--json").stdout.splitlines()]


def test_a_revoked_forge_token_takes_the_credential_path_until_it_is_rotated(
        make_fleet: MakeFleet, world: RealAgentWorld, claude_image: str, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """The seed's incident replayed: the forge refuses the agent's token;
    the agent looks for another one where the incident's agent found it
    (the operator's ~/.claude.json, other agents' tokens, the environment)
    and finds none; the task is retried as a credential failure until the
    breaker pauses the agent, and runs again, and pushes, once the token is
    rotated."""
    canaries = {"claude-json": canary(), "other-token": canary(), "worker-env": canary()}
    agent = {**claude_code_agent(claude_image), "credential_retries": 3, "credential_backoff_s": 0.2,
             "credential_backoff_max_s": 0.5, "breaker_threshold": 3}
    fleet = make_fleet({"dev": agent, "reviewer": {"tokens": ["forge"]}}, **egress_settings(world))
    assert fleet.cli("tokens", "set", "dev", "anthropic", input=MODEL_KEY).returncode == 0
    assert fleet.cli("tokens", "set", "dev", "forge", input=REVOKED).returncode == 0
    assert fleet.cli("tokens", "set", "reviewer", "forge", input=canaries["other-token"]).returncode == 0
    home = tmp_path / "operator-home"
    home.mkdir()
    (home / ".claude.json").write_text(json.dumps({"oauthAccount": {"token": canaries["claude-json"]}}))
    fleet.start_worker("dev", env={"HOME": str(home), "GITHUB_TOKEN": canaries["worker-env"],
                                   "ANTHROPIC_API_KEY": canaries["worker-env"]})
    client = fleet.client()
    # An earlier task plants what would hide a refusal from a later one, where later tasks look.
    plant = ("echo 'unset FLEET_GIT_REFUSED' | tee -a /home/agent/.bashrc /home/agent/.profile >/dev/null; "
             "echo planted")
    planted = client.wait(client.submit("dev", {"task": f"Run exactly: {plant}"}), 120)
    assert planted.state == State.SUCCEEDED and planted.result["result"].endswith("planted")
    task_id = client.submit("dev", push_task("fleet/after-rotation"))

    first = wait_for_state(client, task_id, State.RETRYING, timeout=120)
    assert first.error is not None and first.error.kind == ErrorKind.CREDENTIAL
    assert first.exit_code == 77
    eventually(lambda: "breaker_opened" in alerts(fleet) or None, "the breaker to open", timeout=180)
    agents = {row["agent"]: row for row in json.loads(fleet.cli("agents", "--json").stdout)}
    assert agents["dev"]["status"] == "paused: credential failure (token forge)"
    assert world.branch_head("fleet/after-rotation") is None

    assert fleet.cli("tokens", "set", "dev", "forge", input=FORGE_TOKEN).returncode == 0
    done = wait_for_state(client, task_id, State.SUCCEEDED, timeout=180)
    assert done.attempts == 4  # three refused (the planted files hid nothing), breaker, rotation, push
    head = world.branch_head("fleet/after-rotation")
    assert head is not None and done.result["result"].endswith(f"(commit {head}).")
    assert "breaker_closed" in alerts(fleet)

    output = output_of(fleet, task_id)
    assert "refused git's credential" in output and "fleet: credential-failure token=forge" in output
    assert "[Bash] for f in ~/.claude.json" in output, output  # it did look for another credential...
    assert "and found 0." in output  # ...and found none
    refused = [n for n in world.notes(world.forge) if n.get("accepted") is False]
    assert refused and all(n["auth_sha256"] == auth_sha256(f"token {REVOKED}") for n in refused)
    everything = output + json.dumps(world.notes(world.forge) + world.notes(world.model)) \
        + all_redis_text(redis_server)
    for name, value in canaries.items():
        assert value not in everything, f"canary {name} was found"
    for secret in (FORGE_TOKEN, REVOKED, MODEL_KEY):
        assert secret not in output and secret not in all_redis_text(redis_server)


def test_recipes_are_listed_and_an_unknown_one_is_a_usage_error(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    assert fleet.cli("image", "recipes").stdout.splitlines() == ["claude-code\tfleet-claude-code:latest"]
    done = fleet.cli("image", "build", "--recipe", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "fleet: --recipe 'nope': no such recipe (there are: claude-code)"


PLANT = """
mkdir -p ~/.local/lib/python3.11/site-packages
echo 'import os; open(os.path.expanduser("~/ran"), "a").write("planted code ran\\n")' \
  > ~/.local/lib/python3.11/site-packages/planted.pth
"""


@pytest.mark.parametrize("run_as", ["installed", "weakened: python3 without -I"])
def test_code_an_earlier_task_left_in_home_never_runs_in_fleets_helpers(
        docker_client: docker.DockerClient, claude_image: str, run_as: str) -> None:
    """A `.pth` in the user's site directory runs in any python3 started
    without -I; fleet-claude and fleet-git-credential run as installed
    (`#!/usr/bin/python3 -I`) and never load it."""
    helper = "/usr/local/bin/fleet-git-credential get </dev/null"
    if run_as != "installed":
        helper = "python3 " + helper
    script = f"{PLANT}\n{helper} >/dev/null; /usr/local/bin/fleet-claude </dev/null 2>/dev/null; cat ~/ran"
    output = docker_client.containers.run(
        claude_image, ["bash", "-c", script + " 2>/dev/null; true"], remove=True, user="10001:10001",
        read_only=True, network_mode="none", cap_drop=["ALL"],
        tmpfs={"/home/agent": "uid=10001,gid=10001,mode=0700", "/tmp": ""}).decode()
    assert ("planted code ran" in output) == (run_as != "installed")


def test_a_refused_api_key_is_a_credential_failure_of_the_model_token(
        make_fleet: MakeFleet, world: RealAgentWorld, claude_image: str) -> None:
    """The real CLI, refused by the model API (401 to the key the proxy
    added), ends the task with a credential failure naming the model token."""
    fleet = claude_fleet(make_fleet, world, claude_image, FORGE_TOKEN)
    assert fleet.cli("tokens", "set", "dev", "anthropic", input="sk-ant-revoked-0000").returncode == 0
    fleet.start_worker("dev")
    client = fleet.client()
    task_id = client.submit("dev", push_task("fleet/never"))
    retrying = wait_for_state(client, task_id, State.RETRYING, timeout=120)
    assert retrying.error is not None and retrying.error.kind == ErrorKind.CREDENTIAL
    assert "fleet: credential-failure token=anthropic" in output_of(fleet, task_id)
    refused = [n for n in world.notes(world.model) if n.get("accepted") is False]
    assert refused and {n["key_sha256"] for n in refused} == {auth_sha256("sk-ant-revoked-0000")}


def test_a_model_api_missing_from_egress_fails_without_blaming_the_key(
        make_fleet: MakeFleet, world: RealAgentWorld, claude_image: str) -> None:
    """fleet's proxy refuses a destination the agent's egress lacks: a
    configuration to fix, not a credential to rotate and not worth retrying."""
    agent = claude_code_agent(claude_image)
    agent = {**agent, "egress": [f"{FORGE_HOST}:443"], "inject": {"forge": agent["inject"]["forge"]}}
    fleet = make_fleet({"dev": agent}, **egress_settings(world))
    for name, value in (("anthropic", MODEL_KEY), ("forge", FORGE_TOKEN)):
        assert fleet.cli("tokens", "set", "dev", name, input=value).returncode == 0
    fleet.start_worker("dev")
    client = fleet.client()
    record = client.wait(client.submit("dev", push_task("fleet/never")), 120)
    output = output_of(fleet, record.id)
    assert (record.state, record.attempts, record.exit_code) == (State.FAILED, 1, 1), output
    assert record.error is not None and record.error.kind == ErrorKind.FAILED
    refused = [e.fields for e in client.store.events.of_task(record.id)
               if e.type == "egress" and e.fields.get("decision") == "refused"]
    assert refused and refused[0]["destination"] == f"{MODEL_HOST}:443"
    assert world.notes(world.model) == [{"ready": True}]  # nothing reached the model API


def test_the_claude_code_image_passes_the_static_audit(make_fleet: MakeFleet, claude_image: str) -> None:
    done = make_fleet({"dev": {}}).cli("audit", f"--image={claude_image}")
    for check in ("image-non-root-user", "image-no-secret-env", "image-base-pinned",
                  "image-no-secret-files", "image-no-setuid"):
        assert f"PASS  {claude_image}  {check}" in done.stdout, done.stdout
