"""Settings: `fleet.toml` (or the file named by FLEET_CONFIG), overridden by
FLEET_* environment variables (nested keys joined with `__`).

The file and the variables are read here, in a few lines, rather than by
pydantic-settings, with the same rules (a list or table value is given as
JSON, names are not case-sensitive): importing pydantic-settings takes
longer than everything else `fleet status` does together.

Everything is validated when loaded, so a typo fails at start with one line
that names the key, instead of surfacing mid-task."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.egress_config import Injection, canonical_destination, check_host_name
from fleet.errors import ConfigError
from fleet.on_done_config import HookName, OnDoneHook, check_agents_hooks, hooks_of_ends
from fleet.redis_url import check_redis_url, redact_credentials

AGENT_IMAGE = "fleet-agent:latest"
PROXY_IMAGE = "fleet-proxy:latest"
AGENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
HOST_ID = re.compile(r"[A-Za-z0-9_.-]{1,63}")
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MEMORY_SIZE = re.compile(r"(?i)(\d+(?:\.\d+)?)\s*([kmg]?)i?b?")
MEMORY_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MIN_MEMORY = 6 * 1024**2  # the Docker engine refuses less


def check_agent_name(name: str) -> str:
    if not AGENT_NAME.fullmatch(name):
        raise ValueError(f"bad agent name {name!r}: must match [a-z][a-z0-9-]{{0,30}}")
    return name


def check_token_name(name: str) -> str:
    if not TOKEN_NAME.fullmatch(name) or ".." in name or name in {".", ".."}:
        raise ValueError(f"bad token name {name!r}: use [A-Za-z0-9_.-], no '..' or '/'")
    return name


def check_host_id(name: str) -> str:
    if not HOST_ID.fullmatch(name):
        raise ValueError(f"bad host id {name!r}: use 1-63 of [A-Za-z0-9_.-]")
    return name


def parse_memory(value: str) -> int:
    """'512m' → bytes. Accepts the Docker engine's forms (b, k, m, g, with an
    optional 'i'/'b': 1g, 1G, 1gb, 1GiB)."""
    match = MEMORY_SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a memory size (use e.g. 512m or 1g)")
    size = int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
    if size < MIN_MEMORY:
        raise ValueError(f"{value!r} is below the engine's minimum of 6m")
    return size


def check_memory(value: str) -> str:
    parse_memory(value)
    return value


def check_network_name(value: str) -> str:
    if not NETWORK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a Docker network name")
    return value


def check_network(value: str) -> str:
    if value in {"host", "bridge", "default"} or value.startswith("container:"):
        raise ValueError(
            f"network {value!r} is not allowed: use 'none' or a user-defined network "
            "(the host's and the default bridge network break isolation)"
        )
    if not NETWORK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a Docker network name")
    return value


AgentName = Annotated[str, AfterValidator(check_agent_name)]
TokenName = Annotated[str, AfterValidator(check_token_name)]
HostId = Annotated[str, AfterValidator(check_host_id)]
PositiveInt = Annotated[int, Field(gt=0)]


class AgentSpec(BaseModel):
    """One agent: what runs in its container and the limits it runs under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(AGENT_IMAGE, min_length=1)
    command: list[str] = Field(default_factory=lambda: ["fleet-agent"], min_length=1)
    tokens: list[TokenName] = Field(default_factory=list)
    concurrency: PositiveInt = 1
    network: Annotated[str, AfterValidator(check_network)] = "none"
    memory: Annotated[str, AfterValidator(check_memory)] = "1g"
    cpus: float = Field(1.0, gt=0, le=1024)
    pids_limit: PositiveInt = 256
    timeout_s: float = Field(3600, gt=0)
    credential_retries: int = Field(3, ge=0, le=100)
    credential_backoff_s: float = Field(5.0, gt=0)
    credential_backoff_max_s: float = Field(600.0, gt=0)
    transient_retries: int = Field(3, ge=0, le=100)
    transient_backoff_s: float = Field(2.0, gt=0)
    transient_backoff_max_s: float = Field(300.0, gt=0)
    breaker_threshold: PositiveInt = 3  # consecutive credential failures that pause the agent
    hosts: list[HostId] = Field(default_factory=list)  # the hosts that may serve it; empty: any
    # A quota on /state (e.g. "2g"), enforced by the engine: its volumes must be on XFS
    # mounted with project quotas (pquota). Empty: no quota. Applies to newly made volumes.
    state_size: Annotated[str, AfterValidator(check_memory)] | None = None
    # The destinations it reaches through fleet's egress proxy, and nothing else
    # (host[:port], *.domain; 443 when no port is given). Empty: no network.
    egress: list[str] = Field(default_factory=list)
    # Tokens injected at the proxy rather than mounted: token name → where and how.
    inject: dict[TokenName, Injection] = Field(default_factory=dict)
    # Hooks (of the top-level `on_done`) told when any of its tasks ends.
    on_done: list[HookName] = Field(default_factory=list)
    # At most this many of its tasks run at once on all hosts together (None: no cap).
    max_running: PositiveInt | None = None

    def serves(self, host: str) -> bool:
        return not self.hosts or host in self.hosts

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)

    @field_validator("command")
    @classmethod
    def _command_words(cls, value: list[str]) -> list[str]:
        if any(not word for word in value):
            raise ValueError("command words must not be empty")
        return value

    @field_validator("egress")
    @classmethod
    def _egress(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(canonical_destination(entry) for entry in value))

    @model_validator(mode="after")
    def _egress_fits(self) -> AgentSpec:
        if self.egress and self.network != "none":
            raise ValueError("egress and network are exclusive: an agent with egress is on its own "
                             "network, shared only with fleet's proxy")
        for name, injection in self.inject.items():
            if name not in self.tokens:
                raise ValueError(f"inject.{name}: token {name!r} is not in tokens")
            if not any(entry.rpartition(":")[0] == injection.host
                       or (entry.startswith("*.") and injection.host.endswith(entry.rpartition(":")[0][1:]))
                       for entry in self.egress):
                raise ValueError(f"inject.{name}: host {injection.host!r} is not in egress")
        return self

    @property
    def has_egress(self) -> bool:
        return bool(self.egress)


def config_path() -> Path:
    return Path(os.environ.get("FLEET_CONFIG") or "fleet.toml")


class FleetSettings(BaseModel):
    """Every setting, validated. `load_settings` reads them from the file
    and the environment; constructed directly, it takes only what it is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: Annotated[str, AfterValidator(check_redis_url)] = Field(
        "redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|unix|sentinel)://")
    # With a sentinel:// redis_url: the name the sentinels monitor the primary under.
    redis_sentinel_master: str = Field("mymaster", pattern=r"^[A-Za-z0-9_.-]+$")
    # The sentinels' own credentials, when they ask for them (the primary's are in redis_url).
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    # With a rediss:// redis_url: the CA that signed the server's certificate (default: the
    # system's), and a client certificate and key if the server asks for one.
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    host_id: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,63}$")
    secrets_dir: Path = Path("/var/lib/fleet/secrets")
    namespace: str = Field("fleet", pattern=r"^[a-z][a-z0-9-]{0,30}$")
    agent_uid: int = Field(10001, gt=0)
    payload_limit: PositiveInt = 1024 * 1024
    log_limit: PositiveInt = 8 * 1024 * 1024
    retention_s: PositiveInt = 7 * 24 * 3600
    alert_command: list[str] = Field(default_factory=list)  # run with each alert as JSON on stdin
    lease_ttl_s: float = Field(15.0, ge=3)  # a running attempt's lease; renewed every third of it
    kill_grace_s: float = Field(5.0, ge=0)  # SIGTERM → SIGKILL when fleet ends a task
    shutdown_grace_s: float = Field(30.0, ge=0)  # SIGTERM to a worker: running tasks may finish this long
    heartbeat_s: float = Field(5.0, gt=0, le=300)  # a host's heartbeat; lost after three are missed
    # A queued task whose message is in no queue and delivered to no consumer
    # (lost with a failed-over Redis primary, say) this long is published again.
    lost_message_after_s: float = Field(300.0, ge=1)
    # How jobs get into containers: "channel" (a supervisor per container on
    # one long-lived exec session) or "exec" (one `docker exec` per task).
    forwarding: Literal["channel", "exec"] = "channel"
    # Egress (agents with `egress`): the proxy's image, the Docker network through
    # which it reaches upstreams, an extra CA bundle it trusts for them, names it
    # resolves statically (as /etc/hosts does), and where its host-side files live.
    egress_image: str = Field(PROXY_IMAGE, min_length=1)
    egress_network: Annotated[str, AfterValidator(check_network_name)] = "bridge"
    egress_ca_file: Path | None = None
    egress_hosts: dict[str, str] = Field(default_factory=dict)
    egress_dir: Path = Path("/var/lib/fleet/egress")
    # Signed submissions: a file of `<key id> <secret>` lines (credentials/signing.py). Set,
    # submissions are signed with its first key and workers run only tasks one of its keys signed.
    signing_key_file: Path | None = None
    # `fleet web`: the file of the token its actions need (none: read-only, and only on loopback).
    web_token_file: Path | None = None
    # Hooks told when a task ends (fleet.on_done_config), by name.
    on_done: dict[HookName, OnDoneHook] = Field(default_factory=dict)
    agents: dict[AgentName, AgentSpec] = Field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.host_id or socket.gethostname()

    @property
    def redis_tls(self) -> dict[str, str]:
        """redis-py's TLS options for a rediss:// redis_url (empty otherwise):
        the server's certificate is always verified."""
        if not self.redis_url.startswith("rediss://"):
            return {}
        options = {"ssl_cert_reqs": "required"}
        files = {"ssl_ca_certs": self.redis_tls_ca_file, "ssl_certfile": self.redis_tls_cert_file,
                 "ssl_keyfile": self.redis_tls_key_file}
        for option, path in files.items():
            if path is not None:
                options[option] = str(path)
        return options

    @property
    def sentinel_kwargs(self) -> dict[str, str]:
        """redis-py's options for the connections to the sentinels themselves."""
        return {name: value for name, value in (("username", self.redis_sentinel_username),
                                                ("password", self.redis_sentinel_password)) if value}

    @model_validator(mode="after")
    def _tls_files(self) -> FleetSettings:
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {str(path)!r} is not a file")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        return self

    @model_validator(mode="after")
    def _hooks_known(self) -> FleetSettings:
        check_agents_hooks(self.on_done, {name: spec.on_done for name, spec in self.agents.items()})
        return self

    @field_validator("egress_hosts")
    @classmethod
    def _egress_hosts(cls, value: dict[str, str]) -> dict[str, str]:
        import ipaddress

        checked = {}
        for name, address in value.items():
            try:
                checked[check_host_name(name)] = str(ipaddress.ip_address(address))
            except ValueError:
                raise ValueError(f"{name} = {address!r}: give a host name and an IP address") from None
        return checked

    @field_validator("egress_ca_file")
    @classmethod
    def _egress_ca_file(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if not value.is_file():
            raise ValueError(f"{str(value)!r} is not a file")
        return value

    @property
    def on_done_hooks(self) -> Callable[[str, list[str]], list[str]] | None:
        """What a task's end is delivered to (None: no hooks configured)."""
        return hooks_of_ends(self.on_done, {name: spec.on_done for name, spec in self.agents.items()})

    def agent(self, name: str) -> AgentSpec:
        from fleet.errors import UnknownAgent

        try:
            return self.agents[name]
        except KeyError:
            raise UnknownAgent(name, list(self.agents)) from None

    def check_serves(self, agent: str, host: str) -> None:
        """UsageError unless `agent` is configured and may run on `host`."""
        from fleet.errors import UsageError

        spec = self.agent(agent)
        if not spec.serves(host):
            raise UsageError(f"agent {agent!r} may not run on host {host!r} "
                             f"(its hosts: {', '.join(spec.hosts)})")


def describe_validation_error(error: ValidationError) -> str:
    """Pydantic's multi-line report → one line naming each bad key."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if p != "[key]")
        if item["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
            continue
        if item["type"] == "value_error":
            message = str(item["msg"]).removeprefix("Value error, ")
        else:
            message = f"{item['msg']} (got {item['input']!r})"
        parts.append(f"{loc}: {message}" if loc else message)
    return redact_credentials("; ".join(parts))


ENV_PREFIX = "FLEET_"
NOT_SETTINGS = frozenset({"FLEET_CONFIG"})  # names the file; not a setting


def environment_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """FLEET_* variables as nested values: FLEET_AGENTS__DEV__CPUS=2 is
    {"agents": {"dev": {"cpus": "2"}}}. A value that is a JSON list or
    object is decoded; anything else is left for the model to convert. A
    variable that names no setting (FLEET_SOMETHING_ELSE) is not fleet's:
    it is left alone, as pydantic-settings did."""
    values: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in FleetSettings.model_fields:
            continue
        value: Any = raw
        if raw.lstrip()[:1] in ("[", "{"):
            with suppress(ValueError):
                value = json.loads(raw)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is a value, not a table")
            node = child
        node[path[-1]] = value
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, tables merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(**overrides: Any) -> FleetSettings:
    """Load and validate settings (the file, then FLEET_* variables, then
    `overrides`), raising ConfigError with one line."""
    path = config_path()
    if os.environ.get("FLEET_CONFIG") and not path.is_file():
        raise ConfigError(f"FLEET_CONFIG: no such file {str(path)!r}")
    try:
        values: dict[str, Any] = {}
        if path.is_file():
            with path.open("rb") as f:
                values = tomllib.load(f)
        values = merged(merged(values, environment_values(os.environ)), overrides)
        return FleetSettings.model_validate(values)
    except ValidationError as error:
        raise ConfigError(
            f"invalid configuration ({path}): {describe_validation_error(error)}"
        ) from None
    except (OSError, ValueError) as error:  # unreadable file or bad TOML syntax
        raise ConfigError(f"invalid configuration ({path}): {redact_credentials(str(error))}") from None
