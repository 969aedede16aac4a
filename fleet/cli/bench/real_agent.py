"""`fleet bench --only real-agent`: what a task of a real agent CLI costs in
fleet. The same job — clone the stand-in forge's repository, add a file,
commit, push a branch — is done N times by Claude Code (the claude-code
recipe, driven by the stand-in model API, which answers at once) and N
times by a script of git commands (the baseline: git alone, in the same
image, through the same proxy, with the same injected forge token). One
task at a time, after one of each to start the containers: submit → the
forge's push, submit → succeeded, and Claude Code's largest resident set."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import docker

from fleet.cli.bench.fleet_under_test import BenchFleet, Workspace
from fleet.container.recipes import build_recipe_and_base
from fleet.credentials.tokens import TokenStore
from fleet.egress.proxy import EgressProxy
from fleet.errors import FleetError
from fleet.settings import PROXY_IMAGE
from fleet.standin.real_agent import (
    REPOSITORY_URL,
    RealAgentWorld,
    claude_code_agent,
    egress_settings,
    push_task,
    start_real_agent_world,
)

NAMESPACE = "bench-real-agent"

# The baseline's command: the same job in plain git commands.
GIT_JOB = r"""
import json, os, shutil, subprocess, sys, tempfile
job = json.load(sys.stdin)
work = tempfile.mkdtemp(dir=os.environ["HOME"])
env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
       "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@fleet.invalid",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@fleet.invalid"}
def git(*args):
    subprocess.run(["git", "-c", "http.proxyAuthMethod=basic", *args], cwd=work, env=env, check=True)
try:
    git("clone", "--quiet", job["url"], "repo")
    git("-C", "repo", "checkout", "--quiet", "-b", job["branch"])
    with open(os.path.join(work, "repo", "NOTES.md"), "w") as notes:
        notes.write("Written by the baseline\n")
    git("-C", "repo", "add", "NOTES.md")
    git("-C", "repo", "commit", "--quiet", "-m", "Add NOTES.md")
    git("-C", "repo", "push", "--quiet", "origin", job["branch"])
finally:
    shutil.rmtree(work)
print(json.dumps({"pushed": job["branch"]}))
"""


def git_payload(branch: str) -> dict[str, Any]:
    return {"url": REPOSITORY_URL, "branch": branch}


def timed_tasks(fleet: BenchFleet, world: RealAgentWorld, agent: str, n: int,
                payload: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """One warm-up task, then `n` one at a time: per task, submit → the
    forge's push note and submit → succeeded (ms)."""
    to_push, to_done, memory = [], [], []
    for k in range(n + 1):
        pushes_before = len([e for e in world.notes(world.forge) if "pushed" in e])
        submitted = time.time()
        record = fleet.client.wait(fleet.client.submit(agent, payload(f"bench/{agent}-{k}")), 300)
        fleet.check(record)
        pushes = [e["at"] for e in world.notes(world.forge) if "pushed" in e]
        if len(pushes) != pushes_before + 1:
            raise FleetError(f"benchmark task {record.id} of {agent} succeeded without one push")
        if k == 0:
            continue  # the container's start
        to_push.append((pushes[-1] - submitted) * 1000)
        assert record.finished_at is not None
        to_done.append((datetime.fromisoformat(record.finished_at).timestamp() - submitted) * 1000)
        if isinstance(record.result, dict) and "max_rss_mb" in record.result:
            memory.append(record.result["max_rss_mb"])
    figures: dict[str, Any] = {
        "push_p50_ms": statistics.median(to_push), "push_max_ms": max(to_push),
        "done_p50_ms": statistics.median(to_done)}
    if memory:
        figures["max_rss_mb"] = max(memory)
    return figures


def real_agent_costs(engine: docker.DockerClient, bench: Workspace, n: int,
                     say: Callable[[str], None]) -> dict[str, Any]:
    image = build_recipe_and_base(engine, "claude-code", report=say)
    model_key, forge_token = f"sk-bench-{secrets.token_hex(12)}", f"forge-{secrets.token_hex(12)}"
    world = start_real_agent_world(engine, f"{NAMESPACE}-world", image=image, proxy_image=PROXY_IMAGE,
                                   namespace=NAMESPACE, directory=bench.scratch / "real-agent-certs",
                                   model_key=model_key, forge_authorization=f"token {forge_token}")
    claude = claude_code_agent(image)
    baseline = {**claude, "command": ["python3", "-I", "-c", GIT_JOB], "tokens": ["forge"],
                "inject": {"forge": claude["inject"]["forge"]}}
    top = {**egress_settings(world), "egress_dir": bench.scratch / "real-agent-egress"}
    fleet = BenchFleet(bench, NAMESPACE, {"claude": claude, "git": baseline}, top=top)
    try:
        with fleet:
            tokens = TokenStore(fleet.settings)
            tokens.set("claude", "anthropic", model_key.encode())
            for agent in ("claude", "git"):
                tokens.set(agent, "forge", forge_token.encode())
            fleet.start()
            say(f"real agent: {n} tasks each by Claude Code and by git alone, one at a time")
            cli = timed_tasks(fleet, world, "claude", n, push_task)
            plain = timed_tasks(fleet, world, "git", n, git_payload)
    finally:  # the worker stopped and the containers gone: the proxy's agent networks, then the world
        EgressProxy(engine, fleet.settings).remove()
        world.remove()
    size_mb = float(engine.images.get(image).attrs.get("Size", 0)) / 1e6
    return {"tasks": n, "image": image, "image_mb": size_mb, "claude_code": cli, "git_alone": plain,
            "push_ratio": cli["push_p50_ms"] / plain["push_p50_ms"]}

