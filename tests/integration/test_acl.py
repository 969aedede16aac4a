"""`fleet acl` roles on a real redis-server with ACL users: each role does
its job through fleet's own commands (a worker runs tasks, a submitter
publishes and follows them, a viewer reads) and is refused, with one line,
what it should not do."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from support import FLEET, Fleet, MakeFleet, RedisServer, start_redis

ADMIN = "acl-admin-password-0123"
PASSWORDS = {"worker": "worker-pw-0123456789", "submitter": "submitter-pw-0123456789",
             "viewer": "viewer-pw-0123456789"}


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("acl-redis"), "--user", "default", "off",
                         "--user", "admin", "on", f">{ADMIN}", "~*", "&*", "+@all")
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def as_role(fleet: Fleet, server: RedisServer, role: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**fleet.env, "FLEET_REDIS_URL": url(server, f"{fleet.settings.namespace}-{role}", PASSWORDS[role])}
    return subprocess.run([FLEET, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def refused(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no permissions" in lines[0], done.stderr


def test_each_role_does_its_job_and_no_more(make_fleet: MakeFleet, acl_redis: RedisServer) -> None:
    fleet = make_fleet({"dev": {}}, redis_url=url(acl_redis, "admin", ADMIN))
    namespace = fleet.settings.namespace
    for role, password in PASSWORDS.items():
        done = fleet.cli("acl", "--apply", "--role", role, input=password + "\n")
        assert done.returncode == 0 and f"user {namespace}-{role} set" in done.stdout, done.stderr

    worker = fleet.start_worker("dev", env={"FLEET_REDIS_URL": url(acl_redis, f"{namespace}-worker",
                                                                   PASSWORDS["worker"])})
    done = as_role(fleet, acl_redis, "submitter", "submit", "dev", "--payload", '{"echo": "by role"}')
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    waited = as_role(fleet, acl_redis, "submitter", "wait", task_id, "--timeout", "60")
    assert waited.returncode == 0 and "succeeded" in waited.stdout, waited.stdout + waited.stderr
    # A plain Celery publisher holding the submitter's password: its task
    # (and its `sent` event) go through, and AsyncResult waits on the result.
    config = json.loads(as_role(fleet, acl_redis, "submitter", "publisher-config", "--json").stdout)
    app = Celery("plain-publisher", set_as_current=False)
    app.conf.update({k: v for k, v in config.items() if k not in ("task", "queues")})
    sent = app.send_task(config["task"], kwargs={"agent": "dev", "payload": {"echo": "plain"}},
                         queue=config["queues"]["dev"])
    assert sent.get(timeout=60)["echo"] == "plain"
    for role in ("submitter", "viewer"):
        for args in (["status", task_id], ["logs", task_id], ["tasks"], ["agents"], ["hosts"]):
            shown = as_role(fleet, acl_redis, role, *args)
            assert shown.returncode == 0, (role, args, shown.stderr)
    assert "by role" in as_role(fleet, acl_redis, "viewer", "logs", task_id).stdout

    refused(as_role(fleet, acl_redis, "submitter", "agents", "resume", "dev"))
    refused(as_role(fleet, acl_redis, "submitter", "hosts", "drain", "testhost"))
    refused(as_role(fleet, acl_redis, "viewer", "submit", "dev", "--payload", "{}"))
    queued = as_role(fleet, acl_redis, "submitter", "submit", "dev", "--payload",
                     '{"sleep": 30}').stdout.strip()
    refused(as_role(fleet, acl_redis, "submitter", "cancel", queued))  # an operator's job
    never_ran = as_role(fleet, acl_redis, "submitter", "submit", "dev", "--in", "1h", "--payload", "{}")
    never_ran_id = never_ran.stdout.strip()
    assert never_ran.returncode == 0 and fleet.cli("cancel", never_ran_id).returncode == 0, never_ran.stderr
    refused(as_role(fleet, acl_redis, "submitter", "retry", never_ran_id))  # so is a retry
    assert json.loads(as_role(fleet, acl_redis, "viewer", "status", never_ran_id, "--json").stdout)[
        "state"] == "cancelled"  # the refused retry wrote nothing
    assert fleet.cli("cancel", queued).returncode == 0
    submitter = redis.Redis.from_url(url(acl_redis, f"{namespace}-submitter", PASSWORDS["submitter"]))
    with pytest.raises(redis.exceptions.NoPermissionError):  # kombu's unacked: what workers restore from
        submitter.hset(f"{namespace}:broker:unacked", "tag", "garbage")
    for forged in (  # what AsyncResult.get() and Flower believe
            (f"{namespace}:result:celery-task-meta-{task_id}", '{"status": "SUCCESS", "result": 1}'),
            (f"{namespace}:broker:/0.celeryev/worker.heartbeat", "{}")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            submitter.publish(*forged)
    with pytest.raises(redis.exceptions.NoPermissionError):
        submitter.set(f"{namespace}:result:celery-task-meta-{task_id}", '{"status": "SUCCESS"}')
    with pytest.raises(redis.exceptions.NoPermissionError):  # purging is an operator's job
        submitter.rpush(f"{namespace}:purged:{namespace}.agent.dev", '{"headers": {"id": "x"}}')
    # The same commands work for a user without the role's limits: it is the role that refuses them.
    assert fleet.cli("agents", "resume", "dev").returncode == 0
    assert fleet.cli("hosts", "undrain", "testhost").returncode == 0
    assert not [line for line in worker.lines if "permission" in line.lower()]  # the worker lacked nothing

    for role, password in PASSWORDS.items():
        client = redis.Redis.from_url(url(acl_redis, f"{namespace}-{role}", password))
        for command in (("ACL", "LIST"), ("CONFIG", "GET", "*"), ("FLUSHALL",), ("KEYS", "*"),
                        ("SET", "not-fleets:key", "x"), ("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
