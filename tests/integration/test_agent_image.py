"""The built agent image in a real container: a non-root user, an empty HOME,
and fleet-agent following the job protocol for every exit code."""

from __future__ import annotations

import json

import docker
import pytest
from support import MakeFleet

from fleet.container.manager import ContainerManager
from fleet.forwarding.base import ExitStatus, Job
from fleet.forwarding.exec import ExecForwarder


@pytest.fixture
def agent(make_fleet: MakeFleet, docker_client: docker.DockerClient):
    fleet = make_fleet({"dev": {}})
    manager = ContainerManager(docker_client, fleet.settings)
    container = manager.ensure("dev")
    forwarder = ExecForwarder()
    attempt = iter(range(1, 100))

    def run(payload: dict[str, object], command: list[str] | None = None) -> tuple[ExitStatus, str, str]:
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        job = Job(task_id="t1", agent="dev", attempt=next(attempt), payload=json.dumps(payload).encode(),
                  command=command or ["fleet-agent"], user="10001")
        status = forwarder.run(container, job, lambda s, d: out[s].extend(d))
        return status, out["stdout"].decode(), out["stderr"].decode()

    return run


def test_runs_as_a_non_root_user_with_an_empty_home(agent) -> None:
    status, out, _ = agent({"shell": "id -u; id -g; echo home=$HOME; ls -A $HOME | wc -l"})
    assert status.code == 0
    uid, gid, home, entries = out.splitlines()[:4]
    assert (uid, gid) == ("10001", "10001")
    assert home == "home=/home/agent"
    assert entries == "0"


def test_payload_on_stdin_and_result_on_the_last_line(agent) -> None:
    status, out, _ = agent({"echo": "hello"})
    assert status.code == 0
    lines = out.splitlines()
    assert lines[0] == "hello"
    assert json.loads(lines[-1]) == {"agent": "dev", "task": "t1", "attempt": 1, "echo": "hello"}


@pytest.mark.parametrize("code", [75, 77, 1, 3])
def test_each_exit_code_of_the_protocol(agent, code: int) -> None:
    status, _, err = agent({"exit": code})
    assert status.code == code
    assert f"exiting with {code}" in err


def test_a_missing_token_is_a_credential_failure(agent) -> None:
    status, _, err = agent({"check_token": "forge"})
    assert status.code == 77
    assert err.strip().splitlines()[-1] == "fleet: credential-failure token=forge"


def test_transient_failure_until_an_attempt(agent) -> None:
    payload = {"exit": 75, "fail_until_attempt": 2}
    assert agent(payload)[0].code == 75
    assert agent(payload)[0].code == 0


def test_the_process_environment_is_only_the_contract(agent) -> None:
    status, out, _ = agent({}, command=["/usr/bin/env"])
    assert status.code == 0
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert names == {"HOME", "PATH", "FLEET_TASK_ID", "FLEET_ATTEMPT", "FLEET_AGENT", "FLEET_TOKEN_DIR"}
