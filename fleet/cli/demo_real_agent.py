"""`fleet demo --real-agent`: Claude Code (the claude-code recipe's image,
its pinned release) runs as the dev agent, against a stand-in model API
and a stand-in forge reached only through fleet's egress proxy, which adds
both credentials. Two tasks: one clones, commits and pushes a branch; then
the forge token is revoked, the next task's push is refused (401) and it
takes the credential path, and `fleet tokens set` (done here, as an
operator would) lets its retry push. Figures at the end: the image's size,
submit → push, and the CLI's memory."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import docker
from rich.console import Console

from fleet.cli.demo import DEMO_DIR, NAMESPACE, build_images, demo_redis, demo_worker, finish, use_config
from fleet.client import FleetClient
from fleet.config_writer import config_text
from fleet.container.engine import connect
from fleet.container.recipes import build_recipe
from fleet.credentials.tokens import TokenStore
from fleet.record import State, TaskRecord
from fleet.settings import PROXY_IMAGE
from fleet.standin.real_agent import (
    REPOSITORY_URL,
    RealAgentWorld,
    claude_code_agent,
    egress_settings,
    push_task,
    start_real_agent_world,
)

AGENT = "dev"
RECIPE = "claude-code"


def write_config(redis_url: str, world: RealAgentWorld, image: str) -> Path:
    agent = {**claude_code_agent(image), "credential_retries": 3, "credential_backoff_s": 2,
             "transient_backoff_s": 1}
    top = {"redis_url": redis_url, "namespace": f"{NAMESPACE}-real",
           "secrets_dir": (DEMO_DIR / "real-secrets").resolve(),
           "egress_dir": (DEMO_DIR / "real-egress").resolve(), **egress_settings(world)}
    path = DEMO_DIR / "real-agent.toml"
    path.write_text(config_text(top, {AGENT: agent}))
    return path.resolve()


def run_real_agent_demo(keep: bool, started: float) -> int:
    console = Console()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    engine = connect(timeout=1800)
    build_images(engine, console)
    image = build_recipe(engine, RECIPE, report=lambda line: console.print(f"[dim]{line}[/]"))
    model_key, forge_token = f"sk-ant-demo-{secrets.token_hex(16)}", f"forge-{secrets.token_hex(16)}"
    world = start_real_agent_world(engine, f"{NAMESPACE}-real-world", image=image, proxy_image=PROXY_IMAGE,
                                   namespace=f"{NAMESPACE}-real", directory=DEMO_DIR / "real-certs",
                                   model_key=model_key, forge_authorization=f"token {forge_token}")
    try:
        with demo_redis(console, keep) as redis_url:
            settings = use_config(write_config(redis_url, world, image))
            tokens = TokenStore(settings)
            tokens.set(AGENT, "anthropic", model_key.encode())
            tokens.set(AGENT, "forge", forge_token.encode())
            console.print(f"starting the consumer for {AGENT}: Claude Code in {image} "
                          f"(log: {DEMO_DIR / 'worker.log'})")
            with demo_worker(engine, settings, keep):
                ok = run_tasks(FleetClient(settings), tokens, world, engine, image, forge_token, console)
    finally:
        if not keep:
            world.remove()
    return finish(console, settings, ok, keep, started)


def run_tasks(client: FleetClient, tokens: TokenStore, world: RealAgentWorld, engine: docker.DockerClient,
              image: str, forge_token: str, console: Console) -> bool:
    console.print(f"[bold]1.[/] {AGENT} clones {REPOSITORY_URL}, commits and pushes a branch")
    submitted = time.time()
    first = follow(client, client.submit(AGENT, push_task("fleet/demo-notes")), console)
    pushed = [n["at"] for n in world.notes(world.forge) if "pushed" in n and "at" in n]
    console.print("[bold]2.[/] the forge token is revoked; the next task's push is refused")
    tokens.set(AGENT, "forge", b"revoked-" + secrets.token_hex(8).encode())
    second_id = client.submit(AGENT, push_task("fleet/demo-after-rotation"))
    retrying = wait_for(client, second_id, State.RETRYING)
    console.print(f"  {second_id[:8]} {retrying.state.value}: "
                  f"{retrying.error.message if retrying.error else ''}")
    console.print(f"[bold]3.[/] rotated: `fleet tokens set {AGENT} forge` (the retry comes at once)")
    tokens.set(AGENT, "forge", forge_token.encode())
    second = follow(client, second_id, console)
    ok = first.state == second.state == State.SUCCEEDED and second.attempts >= 2
    branches = {b: world.branch_head(b) for b in ("fleet/demo-notes", "fleet/demo-after-rotation")}
    for branch, head in branches.items():
        console.print(f"  forge: {branch} → {head or 'missing'}")
    size = engine.images.get(image).attrs.get("Size", 0) / 1e6
    memory = [r.result.get("max_rss_mb") for r in (first, second) if isinstance(r.result, dict)]
    to_push = f"{pushed[0] - submitted:.1f} s" if pushed else "no push was noted"
    console.print(f"figures: image {image} {size:.0f} MB; submit → push {to_push}")
    console.print(f"         Claude Code's largest resident set: {memory} MB; "
                  f"task 2 took {second.attempts} attempts")
    return ok and all(branches.values())


def wait_for(client: FleetClient, task_id: str, state: State, timeout: float = 300) -> TaskRecord:
    """The task's record once it is in `state` (or final): woken by its events."""
    deadline = time.monotonic() + timeout
    cursors = {task_id: "0-0"}  # advanced by wait_any
    while time.monotonic() < deadline:
        record = client.status(task_id)
        if record.state == state or record.state.final:
            return record
        client.store.events.wait_any(cursors, block_ms=1000)
    return client.status(task_id)


def follow(client: FleetClient, task_id: str, console: Console) -> TaskRecord:
    record = client.wait(task_id, 300)
    for event in client.store.events.output(task_id):
        for line in event.fields.get("data", "").splitlines():
            if line.startswith("claude:") or line.startswith("fleet"):
                console.print(f"  {task_id[:8]} {line}", markup=False, highlight=False, overflow="ellipsis",
                              no_wrap=True)
    result = record.result.get("result") if isinstance(record.result, dict) else None
    console.print(f"  {task_id[:8]} {record.state.value} after {record.attempts} attempt(s): {result}")
    return record
