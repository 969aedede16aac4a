"""`fleet demo`: the newcomer's tour. It brings up what is missing (a private
redis-server if none answers, the images), starts consumers for boss, dev,
reviewer and scout, publishes a handful of tasks that show every path
(success, a transient failure that succeeds on retry, a plain failure, a
token read, and scout reaching a stand-in forge through fleet's egress
proxy, which adds scout's token, and being refused elsewhere), shows them
moving live, and cleans up what it started."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import redis
from rich.console import Console
from rich.live import Live

from fleet.cli.display import task_table
from fleet.cli.private_redis import start_private_redis
from fleet.client import FleetClient
from fleet.container.engine import connect
from fleet.container.image import CONTEXT_DIR, PROXY_CONTEXT_DIR, build_image
from fleet.container.manager import ContainerManager
from fleet.credentials.tokens import TokenStore
from fleet.egress.proxy import EgressProxy
from fleet.errors import ConfigError
from fleet.record import State
from fleet.settings import AGENT_IMAGE, PROXY_IMAGE, FleetSettings, load_settings
from fleet.standin.upstream import StandIn, issue_certificate, start_standin

DEMO_DIR = Path(".fleet/demo")
NAMESPACE = "fleet-demo"
AGENTS = ("boss", "dev", "reviewer")
SCOUT = "scout"  # reaches the network only through fleet's egress proxy
FORGE = "forge.demo"


@dataclass(frozen=True)
class DemoTask:
    agent: str
    payload: dict[str, Any]
    expect: State
    what: str


TASKS = (
    DemoTask("boss", {"echo": "plan: ticket 42 → one change for dev, one review"}, State.SUCCEEDED,
             "plans the work"),
    DemoTask("dev", {"lines": 4, "interval": 0.4, "echo": "change 1 written"}, State.SUCCEEDED,
             "streams output while it works"),
    DemoTask("dev", {"check_token": "forge", "echo": "pushed with its own token"}, State.SUCCEEDED,
             "reads its own token file"),
    DemoTask("dev", {"exit": 75, "fail_until_attempt": 2, "echo": "flaky, then fine"},
             State.SUCCEEDED, "fails transiently (exit 75), succeeds on retry"),
    DemoTask("reviewer", {"sleep": 1, "echo": "LGTM"}, State.SUCCEEDED, "reviews"),
    DemoTask("reviewer", {"exit": 1}, State.FAILED, "fails plainly (exit 1): not retried"),
    DemoTask(SCOUT, {"check_token": "forge", "forge_url": f"https://{FORGE}/check"}, State.SUCCEEDED,
             "reaches the forge through fleet's proxy, which adds its token"),
    DemoTask(SCOUT, {"check_token": "forge", "forge_url": "http://elsewhere.demo/"}, State.FAILED,
             "is refused by the proxy anywhere else (exit 1, not a credential failure)"),
)


def redis_answers(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.RedisError, ValueError):  # a sentinel:// URL: the demo runs its own Redis
        return False
    return True


def demo_config(redis_url: str, forge: StandIn, forge_ca: Path) -> Path:
    secrets_dir = (DEMO_DIR / "secrets").resolve()
    lines = [f'redis_url = "{redis_url}"', f'namespace = "{NAMESPACE}"',
             f'secrets_dir = "{secrets_dir}"', f'egress_dir = "{(DEMO_DIR / "egress").resolve()}"',
             f'egress_network = "{forge.network}"', f'egress_ca_file = "{forge_ca.resolve()}"',
             f'egress_hosts = {{"{FORGE}" = "{forge.address}"}}']
    for agent in (*AGENTS, SCOUT):
        lines += [f"[agents.{agent}]", 'tokens = ["forge"]', "concurrency = 2",
                  "transient_backoff_s = 0.5", 'memory = "256m"', "timeout_s = 120"]
    lines += [f'egress = ["{FORGE}"]', f"[agents.{SCOUT}.inject.forge]", f'host = "{FORGE}"',
              'header = "Authorization"', 'value = "Bearer {token}"']
    path = DEMO_DIR / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path.resolve()


def plant_tokens(settings: FleetSettings, scout_token: bytes) -> None:
    """Give each demo agent a made-up forge token (it never leaves the file;
    scout's never enters its container: the proxy adds it)."""
    store = TokenStore(settings)
    for agent in AGENTS:
        store.set(agent, "forge", secrets.token_hex(16).encode())
    store.set(SCOUT, "forge", scout_token)


def base_redis_url() -> str:
    try:
        return load_settings().redis_url
    except ConfigError:
        return "redis://127.0.0.1:6379/0"


def run_demo(keep: bool, started: float) -> int:
    console = Console()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    engine = connect()
    build_images(engine, console)
    scout_token = secrets.token_hex(16)
    forge_ca = issue_certificate(engine, PROXY_IMAGE, DEMO_DIR / "forge-certs", (FORGE,))
    forge = start_standin(engine, f"{NAMESPACE}-forge", (FORGE,), namespace=NAMESPACE,
                          accept=f"Bearer {scout_token}", certificates=forge_ca.parent)
    try:
        with demo_redis(console, keep) as redis_url:
            settings = use_config(demo_config(redis_url, forge, forge_ca))
            plant_tokens(settings, scout_token.encode())
            console.print(f"starting consumers for {', '.join(AGENTS)} (log: {DEMO_DIR / 'worker.log'})")
            with demo_worker(engine, settings, keep):
                ok = publish_and_watch(FleetClient(settings), console)
    finally:
        if not keep:
            forge.remove()
    return finish(console, settings, ok, keep, started)


def build_images(engine: docker.DockerClient, console: Console) -> None:
    for tag, context in ((AGENT_IMAGE, CONTEXT_DIR), (PROXY_IMAGE, PROXY_CONTEXT_DIR)):
        build_image(engine, tag, context=context, report=lambda line: console.print(f"[dim]{line}[/]"))


@contextmanager
def demo_redis(console: Console, keep: bool) -> Iterator[str]:
    """The Redis the caller's config names if it answers, else a private one."""
    redis_process = None
    redis_url = base_redis_url()
    if not redis_answers(redis_url):
        redis_process, redis_url = start_private_redis(DEMO_DIR / "redis")
        console.print(f"[dim]started a private redis-server at {redis_url} (data in {DEMO_DIR / 'redis'})[/]")
    try:
        yield redis_url
    finally:
        if redis_process is not None and not keep:
            redis_process.terminate()
            redis_process.wait(timeout=30)


def use_config(config: Path) -> FleetSettings:
    """The demo is its own world: its config, not the caller's FLEET_* overrides."""
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        del os.environ[name]
    os.environ["FLEET_CONFIG"] = str(config)
    return load_settings()


@contextmanager
def demo_worker(engine: docker.DockerClient, settings: FleetSettings, keep: bool) -> Iterator[None]:
    """`fleet worker` for every agent of the config, logging to worker.log;
    stopped (and its containers and proxy removed unless `keep`) after."""
    with (DEMO_DIR / "worker.log").open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker"], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        if not keep:
            ContainerManager(engine, settings.model_copy(update={"agents": {}})).remove_orphans()
            EgressProxy(engine, settings).remove()


def finish(console: Console, settings: FleetSettings, ok: bool, keep: bool, started: float) -> int:
    console.print(f"records: Redis at {settings.redis_url}, keys {settings.namespace}:task:<id> "
                  f"(kept {settings.retention_s // 86400} days)")
    if keep:
        console.print(f"inspect them: FLEET_CONFIG={os.environ['FLEET_CONFIG']} fleet tasks")
    console.print(f"demo took {time.monotonic() - started:.1f} s; "
                  f"{'every task ended as expected' if ok else 'SOME TASKS DID NOT END AS EXPECTED'}")
    return 0 if ok else 1


def publish_and_watch(client: FleetClient, console: Console) -> bool:
    ids = [client.submit(task.agent, task.payload) for task in TASKS]
    for task, task_id in zip(TASKS, ids, strict=True):
        console.print(f"  {task_id[:8]}  {task.agent:<9} {task.what}")
    cursors = dict.fromkeys(ids, "0-0")
    deadline = time.monotonic() + 180
    with Live(task_table([client.status(i) for i in ids]).table, console=console,
              refresh_per_second=8) as live:
        while time.monotonic() < deadline:
            records = [client.status(i) for i in ids]
            live.update(task_table(records, title="tasks (live)").table)
            if all(r.state.final for r in records):
                break
            # Wake on the next event of any task rather than on a timer.
            client.store.events.wait_any(cursors, block_ms=1000)
    records = [client.status(i) for i in ids]
    console.print(task_table(records, title="summary").table)
    for task_id in (i for i, t in zip(ids, TASKS, strict=True) if t.agent == SCOUT):
        for event in client.store.events.of_task(task_id):
            if event.type == "egress":
                f = event.fields
                console.print(f"  {task_id[:8]}  {SCOUT} → {f.get('destination')}: {f.get('decision')}"
                              + (f" (HTTP {f.get('status')}, {f.get('bytes_in')} bytes in)"
                                 if f.get("decision") == "allowed" else f" — {f.get('reason')}"))
    return all(r.state == t.expect for r, t in zip(records, TASKS, strict=True))
