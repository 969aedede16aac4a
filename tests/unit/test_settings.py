"""Every validation rule of the settings, each with the key named in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from fleet.errors import ConfigError
from fleet.settings import load_settings, parse_memory


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in list(__import__("os").environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    path = tmp_path / "fleet.toml"
    monkeypatch.setenv("FLEET_CONFIG", str(path))

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    return write


def load_error(config, text: str) -> str:
    config(text)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_and_a_full_agent(config) -> None:
    config('''
redis_url = "redis://127.0.0.1:6379/0"
host_id = ""
secrets_dir = "/var/lib/fleet/secrets"
[agents.dev]
image = "fleet-agent:latest"
command = ["fleet-agent"]
tokens = ["forge"]
concurrency = 1
network = "none"
memory = "1g"
cpus = 1.0
pids_limit = 256
timeout_s = 3600
credential_retries = 3
''')
    settings = load_settings()
    dev = settings.agents["dev"]
    assert dev.tokens == ["forge"]
    assert dev.memory_bytes == 1024**3
    assert settings.host  # defaults to the machine's hostname
    assert settings.namespace == "fleet"


def test_environment_overrides_the_file(config, monkeypatch: pytest.MonkeyPatch) -> None:
    config('[agents.dev]\ncpus = 1.0\n')
    monkeypatch.setenv("FLEET_AGENTS__DEV__CPUS", "2.5")
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://example:6380/1")
    settings = load_settings()
    assert settings.agents["dev"].cpus == 2.5
    assert settings.redis_url == "redis://example:6380/1"


@pytest.mark.parametrize(("text", "expected"), [
    ('colour = "red"\n', "colour: unknown key"),
    ('[agents.dev]\ncolour = "red"\n', "agents.dev.colour: unknown key"),
    ("[agents.Dev]\n", "agents.Dev: bad agent name 'Dev'"),
    ("[agents.1dev]\n", "agents.1dev: bad agent name"),
    (f"[agents.{'a' * 32}]\n", "bad agent name"),
    ('[agents.dev]\ntokens = ["../forge"]\n', "agents.dev.tokens.0: bad token name '../forge'"),
    ('[agents.dev]\ntokens = ["a/b"]\n', "agents.dev.tokens.0: bad token name 'a/b'"),
    ('[agents.dev]\ntokens = ["a..b"]\n', "agents.dev.tokens.0: bad token name 'a..b'"),
    ('[agents.dev]\ntokens = [".."]\n', "agents.dev.tokens.0: bad token name"),
    ("[agents.dev]\nconcurrency = 0\n", "agents.dev.concurrency: Input should be greater than 0 (got 0)"),
    ('[agents.dev]\nhosts = ["a b"]\n', "agents.dev.hosts.0: bad host id 'a b'"),
    ('[agents.dev]\nhosts = [""]\n', "agents.dev.hosts.0: bad host id ''"),
    ("heartbeat_s = 0\n", "heartbeat_s: Input should be greater than 0"),
    ("[agents.dev]\npids_limit = -1\n", "agents.dev.pids_limit: Input should be greater than 0"),
    ("[agents.dev]\ncpus = 0\n", "agents.dev.cpus: Input should be greater than 0"),
    ("[agents.dev]\ntimeout_s = 0\n", "agents.dev.timeout_s: Input should be greater than 0"),
    ("[agents.dev]\ncredential_retries = -1\n", "agents.dev.credential_retries:"),
    ('[agents.dev]\nmemory = "lots"\n', "agents.dev.memory: 'lots' is not a memory size"),
    ('[agents.dev]\nmemory = "1x"\n', "agents.dev.memory: '1x' is not a memory size"),
    ('[agents.dev]\nmemory = "1k"\n', "agents.dev.memory: '1k' is below the engine's minimum"),
    ('[agents.dev]\nnetwork = "host"\n', "agents.dev.network: network 'host' is not allowed"),
    ('[agents.dev]\nnetwork = "bridge"\n', "agents.dev.network: network 'bridge' is not allowed"),
    ('[agents.dev]\ncommand = []\n', "agents.dev.command:"),
    ('redis_url = "http://x"\n', "redis_url:"),
    ('redis_url = "sentinel://h:x"\n', "redis_url: 'sentinel://h:x' is not a Sentinel address"),
    ('redis_url = "sentinel://a:26379;redis://b:6379"\n', "redis_url: 'redis://b:6379' is not a Sentinel"),
    ('redis_url = "sentinel://a:26379/zero"\n', "redis_url: 'sentinel://a:26379/zero' is not a Sentinel"),
    ('redis_url = "sentinel://a:26379;"\n', "redis_url: '' is not a Sentinel address"),
    ('redis_sentinel_master = ""\n', "redis_sentinel_master: String should match pattern"),
    ('redis_sentinel_master = "my master"\n', "redis_sentinel_master: String should match pattern"),
    ('namespace = "Fleet"\n', "namespace:"),
    ("payload_limit = 0\n", "payload_limit: Input should be greater than 0"),
])
def test_rejected_with_the_key_named(config, text: str, expected: str) -> None:
    assert expected in load_error(config, text)


def test_a_sentinel_url_in_celerys_form(config) -> None:
    from fleet.redis_url import parse_sentinel_url

    config('redis_url = "sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://sentinel-b"\n'
           'redis_sentinel_master = "fleet-primary.1"\n')
    settings = load_settings()
    assert settings.redis_sentinel_master == "fleet-primary.1"
    parsed = parse_sentinel_url(settings.redis_url)
    assert parsed.nodes == (("10.0.0.1", 26379), ("sentinel-b", 26379))
    assert (parsed.db, parsed.password) == (2, "s@cret")
    config("")
    assert load_settings().redis_sentinel_master == "mymaster"


def test_bad_toml_syntax_is_one_line(config) -> None:
    assert "invalid configuration" in load_error(config, "[agents.dev\n")


def test_missing_config_file_named_by_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="FLEET_CONFIG: no such file"):
        load_settings()


@pytest.mark.parametrize(("text", "size"), [
    ("512m", 512 * 1024**2), ("1g", 1024**3), ("1G", 1024**3), ("2GiB", 2 * 1024**3),
    ("1.5g", int(1.5 * 1024**3)), ("7340032", 7340032), ("64mb", 64 * 1024**2),
])
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory(text) == size


def test_environment_values_nest_decode_json_and_leave_other_variables_alone() -> None:
    from fleet.settings import environment_values

    values = environment_values({
        "FLEET_AGENTS__DEV__COMMAND": '["a", "b"]', "FLEET_AGENTS__DEV__CPUS": "2",
        "fleet_namespace": "lower", "FLEET_CONFIG": "/etc/fleet.toml", "FLEET_TEST_SECRET": "not ours",
        "HOME": "/root"})
    assert values == {"agents": {"dev": {"command": ["a", "b"], "cpus": "2"}}, "namespace": "lower"}


@pytest.mark.parametrize("url", ["http://:hunter2-secret@h:6379/0", "sentinel://u:hunter2-secret@h:x",
                                 "sentinel://a:26379;redis://:hunter2-secret@b:6379"])
def test_a_bad_redis_url_is_named_without_its_password(config, url: str) -> None:
    message = load_error(config, f'redis_url = "{url}"\n')
    assert "redis_url:" in message and "hunter2-secret" not in message and ":***@" in message


@pytest.mark.parametrize(("url", "db"), [("redis://h:6379/3", 3), ("rediss://u:p@h/0", 0), ("redis://h", 0),
                                         ("sentinel://a:26379/5;sentinel://b:26379", 5)])
def test_the_acl_roles_name_celerys_channel_in_redis_urls_database(url: str, db: int) -> None:
    from fleet.cli.acl import redis_db, roles

    assert redis_db(url) == db
    worker, submitter, viewer = (roles("ns", redis_db(url))[r] for r in ("worker", "submitter", "viewer"))
    assert f"&ns:broker:/{db}.celery.pidbox" in worker.channels
    assert all(key.startswith(("%R~ns:", "%W~ns:")) for key in submitter.keys)
    assert not [key for key in submitter.keys if key.startswith("%W~ns:broker:") and "unacked" in key]
    assert viewer.keys == ("%R~ns:*",) and "-@write" in viewer.commands


def test_a_redis_error_shows_no_password() -> None:
    from fleet.connection import redis_errors
    from fleet.errors import StateStoreError

    with pytest.raises(StateStoreError) as caught, redis_errors():
        raise redis.AuthenticationError("No master found: <Connection(username=u,password=hunter2-secret)> "
                                        "{'password': 'hunter2-secret'} redis://:hunter2-secret@h/0")
    assert "hunter2-secret" not in str(caught.value) and "password=***" in str(caught.value)
