"""fleet on a Redis that asks who it is: a password, an ACL user, and TLS
(rediss:// with the server's CA, as the settings name it). The worker,
the client and the command line work with the credentials; without them
they fail with one clear line, which never shows the password."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import Fleet, MakeFleet, RedisServer, free_port, start_redis, start_sentinel

from fleet.record import State

PASSWORD = "redis-password-7f3a9c"


@dataclass
class SecureRedis:
    server: RedisServer
    url: str  # with the credentials
    ca_file: Path | None


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a server certificate it signed for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                          "server.pem"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=fleet test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    return ca, cert, key


@pytest.fixture(scope="module", params=["password over TLS", "ACL user"])
def secure_redis(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    directory = tmp_path_factory.mktemp("secure-redis")
    if request.param == "password over TLS":
        ca, cert, key = certificates(directory)
        port = free_port()
        server = start_redis(directory / "data", "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                             str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                             "--tls-auth-clients", "no", "--requirepass", PASSWORD)
        secure = SecureRedis(server, f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", ca)
    else:
        server = start_redis(directory / "data", "--user", "default", "off", "--user", "fleet", "on",
                             f">{PASSWORD}", "~*", "&*", "+@all")
        secure = SecureRedis(server, f"redis://fleet:{PASSWORD}@127.0.0.1:{server.port}/0", None)
    yield secure
    server.process.terminate()
    server.process.wait(timeout=10)


def secure_fleet(make_fleet: MakeFleet, redis: SecureRedis, url: str | None = None) -> Fleet:
    tls = {"redis_tls_ca_file": str(redis.ca_file)} if redis.ca_file else {}
    return make_fleet({"dev": {}}, redis_url=url or redis.url, **tls)


def test_worker_client_and_cli_work_with_the_credentials(make_fleet: MakeFleet,
                                                         secure_redis: SecureRedis) -> None:
    fleet = secure_fleet(make_fleet, secure_redis)
    fleet.start_worker("dev")
    done = fleet.cli("submit", "dev", "--payload", '{"echo": "over a guarded line"}', "--wait",
                     "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    client = fleet.client()
    assert client.wait(client.submit("dev", {}), 60).state == State.SUCCEEDED
    assert fleet.cli("tasks", "--agent", "dev").returncode == 0


def assert_one_clear_line(fleet: Fleet, *expected: str) -> None:
    for args in (["tasks"], ["worker"]):
        done = fleet.cli(*args, timeout=60)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert PASSWORD not in done.stderr and "not-the-password" not in done.stderr
        assert any(word in lines[0] for word in expected), lines[0]


def test_a_wrong_password_fails_with_one_clear_line(make_fleet: MakeFleet, secure_redis: SecureRedis) -> None:
    fleet = secure_fleet(make_fleet, secure_redis, secure_redis.url.replace(PASSWORD, "not-the-password"))
    assert_one_clear_line(fleet, "WRONGPASS", "invalid username-password", "Authentication")


@pytest.mark.parametrize("secure_redis", ["password over TLS"], indirect=True)
def test_an_unknown_server_certificate_fails_with_one_clear_line(make_fleet: MakeFleet,
                                                                 secure_redis: SecureRedis) -> None:
    fleet = make_fleet({"dev": {}}, redis_url=secure_redis.url)  # the system's CAs do not know the test's
    assert_one_clear_line(fleet, "certificate verify failed", "CERTIFICATE_VERIFY_FAILED")


def test_sentinels_that_ask_for_a_password(make_fleet: MakeFleet, tmp_path: Path) -> None:
    primary = start_redis(tmp_path / "primary")
    sentinel = start_sentinel(tmp_path / "sentinel", primary.port, "fleet-primary", password=PASSWORD)
    try:
        fleet = make_fleet({"dev": {}}, redis_url=sentinel.url, redis_sentinel_master="fleet-primary",
                           redis_sentinel_password=PASSWORD)
        fleet.start_worker("dev")
        done = fleet.cli("submit", "dev", "--payload", "{}", "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        without = make_fleet({"dev": {}}, redis_url=sentinel.url, redis_sentinel_master="fleet-primary")
        assert_one_clear_line(without, "Authentication", "NOAUTH", "No master found")
    finally:
        for server in (sentinel, primary):
            server.process.terminate()
            server.process.wait(timeout=10)
