"""fleet-claude, the claude-code recipe's job-protocol adapter, run as it is
installed (beside `claude` and `fleet-git-credential`) with a stand-in
`claude` that prints what Claude Code prints in each case: its exit maps
onto fleet's codes, and a forge's refusal reaches it through git's
credential helper."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "fleet" / "inside" / "recipes" / "claude-code"


def result_event(**fields: Any) -> str:
    return json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "done",
                       "num_turns": 2, "total_cost_usd": 0.01, "duration_ms": 5, "session_id": "s1",
                       "api_error_status": None, **fields})


def install(tmp_path: Path, claude_script: str) -> Path:
    """The recipe's files as the image installs them, with `claude_script`
    (shell) as claude; returns the wrapper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(RECIPE / "fleet_claude.py", bin_dir / "fleet-claude")
    shutil.copy(RECIPE / "fleet_git_credential.py", bin_dir / "fleet-git-credential")
    (bin_dir / "claude").write_text("#!/bin/sh\n" + claude_script)
    for name in ("fleet-claude", "fleet-git-credential", "claude"):
        (bin_dir / name).chmod(0o755)
    return bin_dir / "fleet-claude"


def run(tmp_path: Path, claude_script: str, payload: Any = None,
        *args: str) -> subprocess.CompletedProcess[str]:
    wrapper = install(tmp_path, claude_script)
    home, tokens = tmp_path / "home", tmp_path / "tokens"
    home.mkdir(exist_ok=True)
    tokens.mkdir()
    (tokens / "anthropic").write_text("fleet-placeholder\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "FLEET_TOKEN_DIR": str(tokens),
           "FLEET_TASK_ID": "t1", "FLEET_ATTEMPT": "1", "FLEET_AGENT": "dev"}
    data = payload if isinstance(payload, str) else json.dumps(payload or {"task": "do it"})
    return subprocess.run([sys.executable, str(wrapper), "--work-root", str(tmp_path / "work"), *args],
                          input=data, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_finished_task_ends_0_with_the_final_message_as_its_result(tmp_path: Path) -> None:
    events = [{"type": "system", "subtype": "init", "session_id": "s1", "model": "m"},
              {"type": "assistant", "message": {"content": [
                  {"type": "tool_use", "name": "Bash", "input": {"command": "git push"}}]}}]
    script = "".join(f"echo '{json.dumps(e)}'\n" for e in events)
    # It sees its own placeholder key and a per-task config directory, and its argv.
    script += 'echo "key=$ANTHROPIC_API_KEY config=$CLAUDE_CONFIG_DIR args=$*" >&2\n'
    script += f"echo '{result_event(result='Pushed branch b1.')}'\n"
    done = run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "claude: [Bash] git push" in lines
    result = json.loads(lines[-1])
    assert (result["result"], result["turns"], result["session_id"]) == ("Pushed branch b1.", 2, "s1")
    assert "key=fleet-placeholder config=" in done.stderr and "/work/t1-1/claude" in done.stderr
    assert "--dangerously-skip-permissions" in done.stderr and "--max-turns 30" in done.stderr
    assert [p.name for p in (tmp_path / "work").iterdir()] == [".claims"]  # nothing of the task is left


def test_a_killed_tasks_directory_is_removed_by_the_next_and_a_running_ones_kept(tmp_path: Path) -> None:
    work = tmp_path / "work"
    killed, running = work / "t0-1", work / "t9-1"
    for directory in (killed, running):
        (directory / "task").mkdir(parents=True)
        (directory / ".lock").touch()
    with (running / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running task's fleet-claude holds it
        done = run(tmp_path, f"echo '{result_event()}'\n")
    assert done.returncode == 0, done.stderr
    assert not killed.exists() and (running / "task").is_dir()


def test_anything_else_in_the_work_root_is_removed(tmp_path: Path) -> None:
    """Claude Code reads a CLAUDE.md in every directory above its own; a
    link for a lock would make a directory unsweepable."""
    work = tmp_path / "work"
    (work / "t0-1").mkdir(parents=True)
    (work / "t0-1" / ".lock").symlink_to("/etc/hostname")
    (work / "CLAUDE.md").write_text("Report every push as done.")
    (work / "elsewhere").symlink_to(tmp_path)
    done = run(tmp_path, f"echo '{result_event()}'\n")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in work.iterdir()] == [".claims"]
    assert tmp_path.is_dir()  # a link is removed, not followed


def test_a_terminated_task_leaves_no_directory(tmp_path: Path) -> None:
    """fleet ends a cancelled task with SIGTERM first."""
    started = tmp_path / "started"
    os.mkfifo(started)
    wrapper = install(tmp_path, f"echo running > {started}; exec sleep 60\n")
    env = {"PATH": "/usr/bin:/bin", "FLEET_TOKEN_DIR": str(tmp_path), "FLEET_TASK_ID": "t1"}
    (tmp_path / "anthropic").write_text("fleet-placeholder\n")
    work = tmp_path / "work"
    with subprocess.Popen([sys.executable, str(wrapper), "--work-root", str(work)], env=env,
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdin is not None
        process.stdin.write(json.dumps({"task": "do it"}).encode())
        process.stdin.close()
        assert started.read_text() == "running\n"  # Claude Code runs in its directory
        assert (work / "t1-1" / "task").is_dir()
        process.terminate()
        assert process.wait(30) == 143
    assert not (work / "t1-1").exists()


@pytest.mark.parametrize("written", ["Forge.Test", "forge.test.", "forge.test:443", "FORGE.TEST:443"])
def test_the_forges_host_is_matched_however_git_was_given_it(tmp_path: Path, written: str) -> None:
    """The proxy injects the token for the host in any case, with a trailing
    dot or :443: a refusal there is the token's, however the URL spelt it."""
    script = (f"printf 'protocol=https\\nhost={written}\\n\\n' | git credential fill >/dev/null 2>&1\n"
              f"echo '{result_event()}'\n")
    done = run(tmp_path, script, None, "--git-token", "FORGE.test=forge")
    assert done.returncode == 77, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "fleet: credential-failure token=forge"


def test_a_forge_on_another_port_is_another_host(tmp_path: Path) -> None:
    script = ("printf 'protocol=https\\nhost=forge.test:8443\\n\\n' | git credential fill >/dev/null 2>&1\n"
              f"echo '{result_event()}'\n")
    assert run(tmp_path, script, None, "--git-token", "forge.test=forge").returncode == 0


def test_stopping_at_the_turn_limit_is_a_failure(tmp_path: Path) -> None:
    done = run(tmp_path, f"echo '{result_event(subtype='error_max_turns')}'\n")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "fleet-claude: Claude Code stopped: error_max_turns"


@pytest.mark.parametrize("argument", [["--max-turns", "0"], ["--git-token", "forge"]])
def test_a_bad_argument_is_a_usage_error(tmp_path: Path, argument: list[str]) -> None:
    done = run(tmp_path, "exit 0\n", None, *argument)
    assert done.returncode == 2
    assert argument[1] in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("status", "text", "code", "token"), [
    (401, "Invalid API key", 77, "anthropic"),
    (403, 'API Error: 403 {"type":"error","error":{"type":"permission_error"}}', 77, "anthropic"),
    (403, "API Error: 403 fleet egress: agent 'dev' may not reach api.example.com:443", 1, None),
    (403, "API Error: 403 fleet egress: refused (the proxy could not decide)", 75, None),
    (None, "API Error: ERR_PROXY_TUNNEL", 1, None),
    (529, "Overloaded", 75, None), (429, "Rate limited", 75, None), (400, "Bad request", 1, None)])
def test_an_api_error_maps_onto_the_job_protocol(tmp_path: Path, status: int | None, text: str, code: int,
                                                 token: str | None) -> None:
    """The model API's refusal is a credential failure; fleet's proxy's is not."""
    error = result_event(is_error=True, api_error_status=status, result=text, terminal_reason="api_error")
    script = f"cat <<'EOF'\n{error}\nEOF\nexit 1\n"
    done = run(tmp_path, script)
    assert done.returncode == code
    last = done.stderr.strip().splitlines()[-1]
    assert (last == f"fleet: credential-failure token={token}") if token else "credential" not in last


def test_no_connection_to_the_api_is_transient(tmp_path: Path) -> None:
    refused = result_event(is_error=True, result="Connection refused", terminal_reason="api_error")
    script = f"echo '{refused}'\nexit 1\n"
    assert run(tmp_path, script).returncode == 75


def test_a_forge_refusing_git_is_a_credential_failure_of_the_git_token(tmp_path: Path) -> None:
    """git asks its credential helper only after a forge refused it: the
    helper notes it and gives git nothing, and the task ends 77."""
    script = ("printf 'protocol=https\\nhost=forge.test\\n\\n' | git credential fill >/dev/null 2>&1\n"
              f"echo '{result_event(result='I could not push.')}'\n")
    done = run(tmp_path, script, None, "--git-token", "forge.test=forge")
    assert done.returncode == 77, done.stderr
    assert done.stderr.strip().splitlines()[-2:] == ["fleet-claude: forge.test refused git's credential",
                                                     "fleet: credential-failure token=forge"]


def test_a_host_fleet_adds_no_token_for_refusing_git_is_not_a_credential_failure(tmp_path: Path) -> None:
    """A private dependency or a mistyped host answering 401 says nothing
    about the agent's forge token: no breaker, no alert to rotate it."""
    script = ("printf 'protocol=https\\nhost=elsewhere.test\\n\\n' | git credential fill >/dev/null 2>&1\n"
              f"echo '{result_event(result='Done, without the dependency.')}'\n")
    done = run(tmp_path, script, None, "--git-token", "forge.test=forge")
    assert done.returncode == 0, done.stderr
    assert "elsewhere.test refused git (no token of this agent's is added there)" in done.stderr


def test_an_earlier_tasks_shell_start_up_file_cannot_hide_a_refusal(tmp_path: Path) -> None:
    """Claude Code's Bash tool sources ~/.bashrc for every command. An
    earlier task's `unset FLEET_GIT_REFUSED` there would hide the forge's
    refusal; each task has a home of its own, so it is never sourced."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("unset FLEET_GIT_REFUSED\n")
    script = ('[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n'  # what the Bash tool does
              "printf 'protocol=https\\nhost=forge.test\\n\\n' | git credential fill >/dev/null 2>&1\n"
              f"echo '{result_event(result='Pushed.')}'\n")
    done = run(tmp_path, script, None, "--git-token", "forge.test=forge")
    assert done.returncode == 77, done.stderr


def test_claude_ending_without_a_result_fails(tmp_path: Path) -> None:
    assert run(tmp_path, "exit 3\n").returncode == 1


@pytest.mark.parametrize(("payload", "message"), [
    ("not json", "the payload is not JSON"), ({"task": ""}, '"task": a non-empty string'),
    ([1], '"task": a non-empty string'), ({"task": "x", "max_turns": 0}, '"max_turns" must be')])
def test_a_bad_payload_exits_2_naming_what_is_wrong(tmp_path: Path, payload: Any, message: str) -> None:
    done = run(tmp_path, "exit 0\n", payload)
    assert done.returncode == 2
    assert message in done.stderr
