#!/usr/bin/python3 -I
"""fleet-claude: runs one fleet task with Claude Code inside the agent's
container, and speaks fleet's job protocol for it.

    command = ["fleet-claude", "--model-token", "anthropic", "--git-token", "forge.example.com=forge"]

The payload (JSON on stdin) is `{"task": "what to do", "max_turns": 30}`.
Each task runs in a fresh directory (`--work-root`, by default on the
agent's volume: /state/fleet-tasks/<task>-<attempt>; a clone of a real
repository does not fit the 64 MB tmpfs $HOME) with a home, a Claude Code
configuration (`CLAUDE_CONFIG_DIR`) and a TMPDIR of its own, removed when
it ends, or by the next task when it was killed: nothing of one task is
left for the next (the container is long-lived).

Claude Code reads its API key from the `--model-token` file, which holds
fleet's placeholder when the token is injected at the egress proxy; it
reaches the model API and the forge through the proxy (HTTPS_PROXY and the
CA come from fleet). The task goes to it on stdin. Progress goes to stdout
a line per step; the last line is the result: the agent's final message,
turns, cost, session id and the largest resident set.

Exit codes (fleet's job protocol):
  0   Claude Code finished the task
  77  a credential was refused: the model API answered 401 (or 403 with a
      permission_error): the model token; or a forge named by --git-token
      refused git (git asked fleet's credential helper for another
      credential, which it never gives): that forge's token. The last
      stderr line names the token
  75  the model API failed transiently (429, 5xx, overloaded, no
      connection), the proxy could not decide, or the task's directory
      could not be made (a full volume)
  1   anything else (Claude Code gave up, hit its turn limit, crashed; the
      proxy refused a destination not in the agent's egress; a host fleet
      adds no token for refused git)
  2   a bad payload

Claude Code retries nothing itself (`CLAUDE_CODE_MAX_RETRIES=0`): fleet
retries, with backoff, and counts credential failures in its breaker."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
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
LOCK = ".lock"  # in a task's directory, held while it runs
ROOT_LOCK = ".claims"  # in the work root, held while a claim or a sweep looks at it
REFUSED_NOTE = "git-refused"  # in a task's directory: the hosts that refused git, a line each
MAX_TURNS = 500
TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleet-claude")
    parser.add_argument("--model-token", default="anthropic", help="the token file holding the API key")
    parser.add_argument("--git-token", action="append", default=[], type=host_token, metavar="HOST=TOKEN",
                        help="a forge whose refusal of git is a credential failure of TOKEN (repeatable)")
    parser.add_argument("--max-turns", type=turns_value, default=30, help=f"1 to {MAX_TURNS} (default 30)")
    parser.add_argument("--base-url", default="", help="ANTHROPIC_BASE_URL (default: Claude Code's own)")
    parser.add_argument("--work-root", type=Path, default=Path("/state/fleet-tasks"),
                        help="a directory of fleet-claude's own, where each task's directory is made: "
                             "anything in it that is not a running task's is removed")
    return parser.parse_args()


def turns_value(value: str) -> int:
    if not value.isdigit() or not turns_allowed(int(value)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of turns from 1 to {MAX_TURNS}")
    return int(value)


def turns_allowed(turns: object) -> bool:
    return isinstance(turns, int) and not isinstance(turns, bool) and 0 < turns <= MAX_TURNS


def host_token(value: str) -> tuple[str, str]:
    host, _, token = value.partition("=")
    if not host or not token:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST=TOKEN")
    return normal_host(host), token


def normal_host(host: str) -> str:
    """A host as the proxy matches it: lower case, no trailing dot, no :443."""
    name, port = host.strip().lower(), ""
    head, colon, tail = name.rpartition(":")
    if colon and tail.isdigit() and (":" not in head or head.endswith("]")):  # not a bare IPv6 address
        name, port = head, tail
    name = name.rstrip(".")
    return name if port in ("", "443") else f"{name}:{port}"


def read_payload() -> dict[str, Any]:
    try:
        payload = json.load(sys.stdin)
    except ValueError as error:
        fail(2, f"fleet-claude: the payload is not JSON ({error})")
    task = payload.get("task") if isinstance(payload, dict) else None
    if not isinstance(task, str) or not task.strip():
        fail(2, 'fleet-claude: the payload needs "task": a non-empty string')
    turns = payload.get("max_turns", None)
    if turns is not None and not turns_allowed(turns):
        fail(2, f'fleet-claude: "max_turns" must be an integer from 1 to {MAX_TURNS}')
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
        # A home of the task's own: nothing an earlier task left in the container's
        # $HOME (a .bashrc the Bash tool would source, a CLAUDE.md) reaches this one.
        "HOME": str(work / "home"), "LANG": env.get("LANG", "C.UTF-8"),
        "SHELL": "/bin/bash", "TMPDIR": str(work / "tmp"),
        "ANTHROPIC_API_KEY": token_value(options.model_token),
        "CLAUDE_CONFIG_DIR": str(work / "claude"),
        "CLAUDE_CODE_MAX_RETRIES": "0", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # git never prompts; a refused credential goes to fleet's helper, which notes it and gives nothing.
        "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(work / "gitconfig"),
        "GIT_AUTHOR_NAME": f"fleet {agent}", "GIT_AUTHOR_EMAIL": f"{agent}@fleet.invalid",
        "GIT_COMMITTER_NAME": f"fleet {agent}", "GIT_COMMITTER_EMAIL": f"{agent}@fleet.invalid",
        REFUSED_FILE: str(work / REFUSED_NOTE),
    })
    if options.base_url:
        env["ANTHROPIC_BASE_URL"] = options.base_url
    return env


def show(event: dict[str, Any]) -> None:
    """One line of progress per step, for the task's log."""
    kind = event.get("type")
    if kind == "system" and event.get("subtype") == "init":
        print(f"claude: session {event.get('session_id', '?')}, model {event.get('model', '?')}", flush=True)
    message = event.get("message") if kind in ("assistant", "user") else None
    content = message.get("content") if isinstance(message, dict) else None
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and kind == "assistant":
            print(f"claude: {str(block.get('text', '')).strip()[:2000]}", flush=True)
        elif block.get("type") == "tool_use":
            detail = block.get("input")
            detail = detail if isinstance(detail, dict) else {}
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
    command = [str(CLAUDE), "-p", "--output-format", "stream-json", "--verbose",
               "--max-turns", str(turns), "--dangerously-skip-permissions"]
    result: dict[str, Any] = {}
    # The task on stdin: no length limit, and not in /proc/*/cmdline.
    with (work / "prompt").open() as prompt, subprocess.Popen(
            command, cwd=work / "task", env=env, stdin=prompt, stdout=subprocess.PIPE, text=True) as claude:
        assert claude.stdout is not None
        try:
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
        except BaseException:  # terminated: Claude Code goes too, before the directory does
            claude.kill()
            raise
    return claude.returncode, result


def outcome(options: argparse.Namespace, code: int, result: dict[str, Any], work: Path) -> int:
    refused = work / REFUSED_NOTE
    hosts = sorted({normal_host(h) for h in refused.read_text().split()}) if refused.is_file() else []
    tokens = dict(options.git_token)
    ours = [host for host in hosts if host in tokens]
    if ours:
        fail(77, f"fleet-claude: {', '.join(ours)} refused git's credential\n"
                 f"fleet: credential-failure token={tokens[ours[0]]}")
    if hosts:  # a host whose token fleet does not add: the task's own mistake, not a credential of fleet's
        print(f"fleet-claude: {', '.join(hosts)} refused git (no token of this agent's is added there)",
              file=sys.stderr, flush=True)
    if not result:
        fail(1, f"fleet-claude: Claude Code ended (status {code}) without a result")
    if not result.get("is_error") and result.get("subtype") == "success":
        summary = {"result": result.get("result", ""), "turns": result.get("num_turns"),
                   "cost_usd": result.get("total_cost_usd"), "duration_ms": result.get("duration_ms"),
                   "session_id": result.get("session_id"),
                   # The largest resident set of Claude Code and the tools it ran (kB on Linux).
                   "max_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
        print(json.dumps(summary), flush=True)
        return 0
    if not result.get("is_error"):  # it stopped short: error_max_turns, error_during_execution
        fail(1, f"fleet-claude: Claude Code stopped: {result.get('subtype')}")
    fail(*api_error(options, result))


def api_error(options: argparse.Namespace, result: dict[str, Any]) -> tuple[int, str]:
    """The exit code and message of a result that is an error."""
    status = result.get("api_error_status")
    text = str(result.get("result", ""))
    message = f"fleet-claude: {text[:500]}"
    if "fleet egress:" in text or "ERR_PROXY_TUNNEL" in text:
        # fleet's proxy refused, not the API: a destination not in egress is the config's to fix.
        return (75 if "could not decide" in text else 1), message
    if status == 401 or (status == 403 and "permission_error" in text):
        return 77, f"{message}\nfleet: credential-failure token={options.model_token}"
    if status in TRANSIENT_STATUS or (status is None and result.get("terminal_reason") == "api_error"):
        return 75, message
    return 1, message


def claim(root: Path, name: str, payload: dict[str, Any]) -> tuple[Path, int]:
    """The task's fresh directory under `root` (its prompt and git config
    written), and a descriptor holding its lock for as long as the task
    runs. Claims and sweeps take turns under the root's own lock, so a
    sweep never sees a directory between its making and its locking."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with root_lock(root):
            sweep(root)
            work = root / name
            if work.exists():  # not swept: its lock is held
                fail(75, f"fleet-claude: {work} is in use by another run of this attempt")
            work.mkdir(mode=0o700)
            lock = os.open(work / LOCK, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
        for directory in ("task", "home", "claude", "tmp"):
            (work / directory).mkdir(mode=0o700)
        (work / "prompt").write_text(payload["task"])
        # git's libcurl sends the proxy's user (the task's label) only when challenged, unless told to;
        # a repository's own embedded bare repositories (and their config) are not used.
        (work / "gitconfig").write_text(f"[credential]\n\thelper = {CREDENTIAL_HELPER}\n"
                                        "[http]\n\tproxyAuthMethod = basic\n"
                                        "[safe]\n\tbareRepository = explicit\n")
    except OSError as error:  # a full or broken volume: the host's to mend, the task's to retry
        fail(75, f"fleet-claude: cannot make the task's directory under {root}: {error}")
    return work, lock


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    path = root / ROOT_LOCK
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    except OSError:  # something else put in its place
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def sweep(root: Path) -> None:
    """Empty the root of all but running tasks' directories: those of tasks
    that ended without removing theirs (killed at a timeout or a cancel,
    the container stopped) — nobody holds their lock — and anything else
    (Claude Code reads a CLAUDE.md in any directory above its own)."""
    for entry in root.iterdir():
        if entry.name == ROOT_LOCK:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
            continue
        try:
            lock = os.open(entry / LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock, or not a file: never a running task's (claims hold the root's lock)
            shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue  # a running task's
        shutil.rmtree(entry, ignore_errors=True)  # its lock held until it is gone
        os.close(lock)


def main() -> int:
    options = arguments()
    payload = read_payload()
    # fleet ends a cancelled or timed-out task with SIGTERM first: leave nothing behind then either.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    task = f"{os.environ.get('FLEET_TASK_ID', 'task')}-{os.environ.get('FLEET_ATTEMPT', '1')}"
    work, lock = claim(options.work_root, task, payload)
    try:
        code, result = run_claude(options, payload, work)
        return outcome(options, code, result, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)


if __name__ == "__main__":
    sys.exit(main())
