"""`fleet demo`: the newcomer's tour. It brings up what is missing (a private
redis-server if none answers, the agent image), starts consumers for boss,
dev and reviewer, publishes a handful of tasks that show every path
(success, a transient failure that succeeds on retry, a plain failure, a
token read), shows them moving live, and cleans up what it started."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.live import Live

from fleet.cli.display import task_table
from fleet.cli.private_redis import start_private_redis
from fleet.client import FleetClient
from fleet.container.engine import connect
from fleet.container.image import build_image
from fleet.container.manager import ContainerManager
from fleet.credentials.tokens import TokenStore
from fleet.errors import ConfigError
from fleet.record import State
from fleet.settings import FleetSettings, load_settings

DEMO_DIR = Path(".fleet/demo")
NAMESPACE = "fleet-demo"
AGENTS = ("boss", "dev", "reviewer")


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
)


def redis_answers(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.RedisError, ValueError):  # a sentinel:// URL: the demo runs its own Redis
        return False
    return True


def demo_config(redis_url: str) -> Path:
    secrets_dir = (DEMO_DIR / "secrets").resolve()
    lines = [f'redis_url = "{redis_url}"', f'namespace = "{NAMESPACE}"',
             f'secrets_dir = "{secrets_dir}"']
    for agent in AGENTS:
        lines += [f"[agents.{agent}]", 'tokens = ["forge"]', "concurrency = 2",
                  "transient_backoff_s = 0.5", 'memory = "256m"', "timeout_s = 120"]
    path = DEMO_DIR / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path.resolve()


def plant_tokens(settings: FleetSettings) -> None:
    """Give each demo agent a made-up forge token (it never leaves the file)."""
    store = TokenStore(settings)
    for agent in AGENTS:
        store.set(agent, "forge", secrets.token_hex(16).encode())


def base_redis_url() -> str:
    try:
        return load_settings().redis_url
    except ConfigError:
        return "redis://127.0.0.1:6379/0"


def run_demo(keep: bool, started: float) -> int:
    console = Console()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    engine = connect()
    build_image(engine, "fleet-agent:latest", report=lambda line: console.print(f"[dim]{line}[/]"))
    redis_process = None
    redis_url = base_redis_url()
    if not redis_answers(redis_url):
        redis_process, redis_url = start_private_redis(DEMO_DIR / "redis")
        console.print(f"[dim]started a private redis-server at {redis_url} (data in {DEMO_DIR / 'redis'})[/]")
    config = demo_config(redis_url)
    # The demo is its own world: its config, not the caller's FLEET_* overrides.
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        del os.environ[name]
    os.environ["FLEET_CONFIG"] = str(config)
    settings = load_settings()
    plant_tokens(settings)
    log_path = DEMO_DIR / "worker.log"
    console.print(f"starting consumers for {', '.join(AGENTS)} (log: {log_path})")
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "fleet.cli", "worker"], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ok = publish_and_watch(FleetClient(settings), console)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        if not keep:
            ContainerManager(engine, settings.model_copy(update={"agents": {}})).remove_orphans()
        if redis_process is not None and not keep:
            redis_process.terminate()
            redis_process.wait(timeout=30)
    console.print(f"records: Redis at {redis_url}, keys {NAMESPACE}:task:<id> "
                  f"(kept {settings.retention_s // 86400} days)")
    if keep:
        console.print(f"inspect them: FLEET_CONFIG={config} fleet tasks")
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
    return all(r.state == t.expect for r, t in zip(records, TASKS, strict=True))
