#!/usr/bin/python3 -I
"""fleet-claude: runs one fleet task with Claude Code inside the agent's
container, and speaks fleet's job protocol for it.

    command = ["fleet-claude", "--model-token", "anthropic", "--git-token", "forge"]

The payload (JSON on stdin) is `{"task": "what to do", "max_turns": 30}`.
Each task runs in a fresh directory under $HOME with a Claude Code
configuration of its own (`CLAUDE_CONFIG_DIR`), both removed when it ends:
nothing of one task is left for the next (the container is long-lived).

Claude Code reads its API key from the `--model-token` file, which holds
fleet's placeholder when the token is injected at the egress proxy; it
reaches the model API and the forge through the proxy (HTTPS_PROXY and the
CA come from fleet). Progress goes to stdout a line per step; the last line
is the result: the agent's final message, turns, cost and session id.

Exit codes (fleet's job protocol):
  0   Claude Code finished the task
  77  a credential was refused: the model API answered 401/403 (the
      model token), or the forge refused git (the git token: git asked
      fleet's credential helper for another credential, which it never
      gives); the last stderr line names the token
  75  the model API failed transiently (429, 5xx, overloaded, no connection)
  1   anything else (Claude Code gave up, hit its turn limit, crashed)
  2   a bad payload

Claude Code retries nothing itself (`CLAUDE_CODE_MAX_RETRIES=0`): fleet
retries, with backoff, and counts credential failures in its breaker."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

# Installed side by side in /usr/local/bin (the recipe's Dockerfile).
HERE = Path(__file__).resolve().parent
CLAUDE = HERE / "claude"
CREDENTIAL_HELPER = HERE / "fleet-git-credential"
REFUSED_FILE = "FLEET_GIT_REFUSED"  # where the credential helper notes a forge's refusal
# What fleet sets for the task and Claude Code and its tools need: nothing else is passed on.
PASSED = ("PATH", "LANG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy",
          "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE",
          "FLEET_TASK_ID", "FLEET_ATTEMPT", "FLEET_AGENT", "FLEET_TOKEN_DIR")
TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
CREDENTIAL_STATUS = {401, 403}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleet-claude")
    parser.add_argument("--model-token", default="anthropic", help="the token file holding the API key")
    parser.add_argument("--git-token", default="forge", help="the token named when a forge refuses git")
    parser.add_argument("--max-turns", type=int, default=30)
    parser.add_argument("--base-url", default="", help="ANTHROPIC_BASE_URL (default: Claude Code's own)")
    return parser.parse_args()


def read_payload() -> dict[str, Any]:
    try:
        payload = json.load(sys.stdin)
    except ValueError as error:
        fail(2, f"fleet-claude: the payload is not JSON ({error})")
    task = payload.get("task") if isinstance(payload, dict) else None
    if not isinstance(task, str) or not task.strip():
        fail(2, 'fleet-claude: the payload needs "task": a non-empty string')
    turns = payload.get("max_turns", None)
    if turns is not None and (not isinstance(turns, int) or isinstance(turns, bool) or not 0 < turns <= 500):
        fail(2, 'fleet-claude: "max_turns" must be an integer from 1 to 500')
    return dict(payload)


def fail(code: int, line: str) -> NoReturn:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def token_value(name: str) -> str:
    token_dir = Path(os.environ.get("FLEET_TOKEN_DIR", "/run/fleet/tokens"))
    try:
        return (token_dir / name).read_text().strip()
    except OSError:
        fail(77, f"fleet-claude: no token file {name!r}\nfleet: credential-failure token={name}")


def environment(options: argparse.Namespace, work: Path) -> dict[str, str]:
    agent = os.environ.get("FLEET_AGENT", "agent")
    env = {name: os.environ[name] for name in PASSED if name in os.environ}
    env.update({
        "HOME": os.environ.get("HOME", "/home/agent"), "LANG": env.get("LANG", "C.UTF-8"),
        "SHELL": "/bin/bash", "TMPDIR": str(work / "tmp"),
        "ANTHROPIC_API_KEY": token_value(options.model_token),
        "CLAUDE_CONFIG_DIR": str(work / "claude"),
        "CLAUDE_CODE_MAX_RETRIES": "0", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # git never prompts; a refused credential goes to fleet's helper, which notes it and gives nothing.
        "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(work / "gitconfig"),
        "GIT_AUTHOR_NAME": f"fleet {agent}", "GIT_AUTHOR_EMAIL": f"{agent}@fleet.invalid",
        "GIT_COMMITTER_NAME": f"fleet {agent}", "GIT_COMMITTER_EMAIL": f"{agent}@fleet.invalid",
        REFUSED_FILE: str(work / "git-refused"),
    })
    if options.base_url:
        env["ANTHROPIC_BASE_URL"] = options.base_url
    # git's libcurl sends the proxy's user (the task's label) only when challenged, unless told to.
    (work / "gitconfig").write_text(f"[credential]\n\thelper = {CREDENTIAL_HELPER}\n"
                                    "[http]\n\tproxyAuthMethod = basic\n")
    return env


def show(event: dict[str, Any]) -> None:
    """One line of progress per step, for the task's log."""
    kind = event.get("type")
    if kind == "system" and event.get("subtype") == "init":
        print(f"claude: session {event.get('session_id', '?')}, model {event.get('model', '?')}", flush=True)
    content = (event.get("message") or {}).get("content") if kind in ("assistant", "user") else None
    for block in content if isinstance(content, list) else []:
        if block.get("type") == "text" and kind == "assistant":
            print(f"claude: {block.get('text', '').strip()[:2000]}", flush=True)
        elif block.get("type") == "tool_use":
            detail = block.get("input", {})
            shown = detail.get("command") or detail.get("file_path") or json.dumps(detail)[:200]
            print(f"claude: [{block.get('name')}] {shown}", flush=True)
        elif block.get("type") == "tool_result":
            body = block.get("content")
            text = body if isinstance(body, str) else " ".join(
                str(part.get("text", "")) for part in body or [] if isinstance(part, dict))
            lines = [line for line in text.splitlines() if line.strip()]
            mark = "error" if block.get("is_error") else "ok"
            print(f"claude:   → {mark}: {lines[-1][:300] if lines else '(no output)'}", flush=True)


def run_claude(options: argparse.Namespace, payload: dict[str, Any],
               work: Path) -> tuple[int, dict[str, Any]]:
    """Claude Code's exit status and its final `result` event ({} if none came)."""
    env = environment(options, work)
    turns = payload.get("max_turns") or options.max_turns
    command = [str(CLAUDE), "-p", payload["task"], "--output-format", "stream-json", "--verbose",
               "--max-turns", str(turns), "--dangerously-skip-permissions"]
    result: dict[str, Any] = {}
    with subprocess.Popen(command, cwd=work / "task", env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, text=True) as claude:
        assert claude.stdout is not None
        for line in claude.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                print(line.rstrip(), flush=True)
                continue
            if not isinstance(event, dict):
                continue
            if event.get("type") == "result":
                result = event
            else:
                show(event)
    return claude.returncode, result


def outcome(options: argparse.Namespace, code: int, result: dict[str, Any], work: Path) -> int:
    refused = work / "git-refused"
    if refused.is_file():
        hosts = sorted(set(refused.read_text().split()))
        fail(77, f"fleet-claude: {', '.join(hosts)} refused git's credential\n"
                 f"fleet: credential-failure token={options.git_token}")
    if not result:
        fail(1, f"fleet-claude: Claude Code ended (status {code}) without a result")
    summary = {"result": result.get("result", ""), "turns": result.get("num_turns"),
               "cost_usd": result.get("total_cost_usd"), "duration_ms": result.get("duration_ms"),
               "session_id": result.get("session_id"),
               # The largest resident set of Claude Code and the tools it ran (kB on Linux).
               "max_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
    if not result.get("is_error"):
        print(json.dumps(summary), flush=True)
        return 0
    status = result.get("api_error_status")
    message = f"fleet-claude: {str(result.get('result', ''))[:500]}"
    if status in CREDENTIAL_STATUS:
        fail(77, f"{message}\nfleet: credential-failure token={options.model_token}")
    if status in TRANSIENT_STATUS or (status is None and result.get("terminal_reason") == "api_error"):
        fail(75, message)
    fail(1, message)


def main() -> int:
    options = arguments()
    payload = read_payload()
    home = Path(os.environ.get("HOME", "/home/agent"))
    task = f"{os.environ.get('FLEET_TASK_ID', 'task')}-{os.environ.get('FLEET_ATTEMPT', '1')}"
    work = home / "fleet-tasks" / task
    shutil.rmtree(work, ignore_errors=True)
    for directory in ("task", "claude", "tmp"):
        (work / directory).mkdir(parents=True, mode=0o700)
    try:
        code, result = run_claude(options, payload, work)
        return outcome(options, code, result, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
