"""`fleet audit`: fleet's containers on this host, their token directories and
the agent image, checked against the isolation policy (docs/security.md).

Each check is a small pure function of `docker inspect` data, so a weakened
container (privileged, root, a writable token mount, the Docker socket)
fails with a line that names the check and the offending value. Where a
check is an item of the CIS Docker Benchmark (v1.6, sections 4 and 5), its
number is given."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import docker
import docker.errors

from fleet.container.spec import (
    HOME,
    LABEL_AGENT,
    LABEL_SPEC_HASH,
    STATE_DIR,
    TOKEN_DIR,
    build_spec,
    container_name,
)
from fleet.credentials.identity import DIRECTORY_MODE, FILE_MODE, AgentIdentities, enforced
from fleet.credentials.tokens import TokenStore
from fleet.egress.layout import LABEL_ROLE, ROLE_PROXY, EgressLayout
from fleet.egress.proxy import INTERNAL_OPTIONS
from fleet.settings import FleetSettings

DOCKER_SOCKETS = ("docker.sock", "containerd.sock", "podman.sock")


@dataclass(frozen=True)
class Finding:
    subject: str
    check: str
    ok: bool
    detail: str
    cis: str = ""

    def line(self) -> str:
        cis = f" (CIS {self.cis})" if self.cis else ""
        return f"{'PASS' if self.ok else 'FAIL'}  {self.subject}  {self.check}{cis}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Expected:
    """What fleet's spec says the container must be."""

    token_dir: str
    volume: str
    spec_hash: str
    token_values: tuple[bytes, ...]
    egress_ca: str | None = None  # fleet's CA certificate, mounted for an agent with egress


Check = Callable[[dict[str, Any], Expected], tuple[bool, str]]
CHECKS: list[tuple[str, str, Check]] = []
AGENT_ONLY: set[str] = set()  # checks of what only an agent's container has (the proxy has none of it)


def check(name: str, cis: str = "", *, agent_only: bool = False) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.append((name, cis, function))
        if agent_only:
            AGENT_ONLY.add(name)
        return function
    return register


def host(attrs: dict[str, Any]) -> dict[str, Any]:
    return dict(attrs.get("HostConfig") or {})


def mounts(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(attrs.get("Mounts") or [])


@check("not-privileged", "5.4")
def _privileged(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    return not host(attrs).get("Privileged"), f"Privileged={host(attrs).get('Privileged')}"


@check("non-root-user", "4.1")
def _user(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    user = str((attrs.get("Config") or {}).get("User") or "")
    uid = user.split(":")[0]
    ok = uid.isdigit() and int(uid) != 0
    return ok, f"User={user!r}" + ("" if ok else " (root, or a name that may be root)")


@check("read-only-rootfs", "5.12")
def _rootfs(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    return bool(host(attrs).get("ReadonlyRootfs")), f"ReadonlyRootfs={host(attrs).get('ReadonlyRootfs')}"


@check("capabilities-dropped", "5.3")
def _caps(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    dropped = [c.upper() for c in host(attrs).get("CapDrop") or []]
    added = host(attrs).get("CapAdd") or []
    return "ALL" in dropped and not added, f"CapDrop={dropped} CapAdd={added}"


@check("no-new-privileges", "5.25")
def _nnp(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    options = host(attrs).get("SecurityOpt") or []
    ok = any(o.startswith("no-new-privileges") and not o.endswith(("false", "=0")) for o in options)
    return ok, f"SecurityOpt={options}"


@check("seccomp-confined", "5.21")
def _seccomp(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    options = host(attrs).get("SecurityOpt") or []
    unconfined = [o for o in options if o.replace(":", "=") == "seccomp=unconfined"]
    return not unconfined, f"SecurityOpt={options}"


@check("pids-limit", "5.28")
def _pids(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    limit = host(attrs).get("PidsLimit") or 0
    return limit > 0, f"PidsLimit={limit}"


@check("memory-limit", "5.10")
def _memory(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    memory = host(attrs).get("Memory") or 0
    return memory > 0, f"Memory={memory}"


@check("cpu-limit", "5.11", agent_only=True)
def _cpu(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    nano, quota = host(attrs).get("NanoCpus") or 0, host(attrs).get("CpuQuota") or 0
    return nano > 0 or quota > 0, f"NanoCpus={nano} CpuQuota={quota}"


def namespace_check(key: str) -> Check:
    def not_host(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
        value = host(attrs).get(key) or ""
        return value != "host" and not value.startswith("container:"), f"{key}={value!r}"
    return not_host


check("no-host-network", "5.9")(namespace_check("NetworkMode"))
check("no-host-pid", "5.15")(namespace_check("PidMode"))
check("no-host-ipc", "5.16")(namespace_check("IpcMode"))
check("no-host-uts", "5.20")(namespace_check("UTSMode"))


@check("no-devices", "5.17")
def _devices(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    devices = host(attrs).get("Devices") or []
    return not devices, f"Devices={[d.get('PathOnHost') for d in devices]}"


@check("no-docker-socket", "5.31")
def _socket(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    found = [m.get("Source", "") for m in mounts(attrs) if m.get("Source", "").endswith(DOCKER_SOCKETS)]
    return not found, f"socket mounts={found}" if found else "no engine socket mounted"


@check("only-own-token-dir-from-host", "5.5", agent_only=True)
def _host_paths(attrs: dict[str, Any], expected: Expected) -> tuple[bool, str]:
    binds = [m.get("Source", "") for m in mounts(attrs) if m.get("Type") == "bind"]
    extra = [b for b in binds if b not in (expected.token_dir, expected.egress_ca)]
    return not extra, f"host paths={binds}"


@check("token-mount-read-only", "5.5", agent_only=True)
def _token_mount(attrs: dict[str, Any], expected: Expected) -> tuple[bool, str]:
    found = [m for m in mounts(attrs) if m.get("Destination") == TOKEN_DIR]
    if len(found) != 1:
        return False, f"{len(found)} mounts at {TOKEN_DIR}"
    mount = found[0]
    ok = not mount.get("RW") and mount.get("Source") == expected.token_dir
    return ok, f"{mount.get('Source')} RW={mount.get('RW')}"


@check("home-is-empty-tmpfs", agent_only=True)
def _home(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    tmpfs = host(attrs).get("Tmpfs") or {}
    mounted = [m.get("Source") for m in mounts(attrs) if m.get("Destination") == HOME]
    return HOME in tmpfs and not mounted, f"Tmpfs={sorted(tmpfs)} mounts at {HOME}={mounted}"


@check("own-state-volume", agent_only=True)
def _state(attrs: dict[str, Any], expected: Expected) -> tuple[bool, str]:
    found = [m for m in mounts(attrs) if m.get("Destination") == STATE_DIR]
    names = [(m.get("Type"), m.get("Name")) for m in found]
    return names == [("volume", expected.volume)], f"{STATE_DIR}: {names}, expected {expected.volume}"


@check("no-token-in-environment", "4.10")
def _env(attrs: dict[str, Any], expected: Expected) -> tuple[bool, str]:
    env = (attrs.get("Config") or {}).get("Env") or []
    holding = [e.split("=", 1)[0] for e in env
               if any(v.decode(errors="replace") in e for v in expected.token_values if v)]
    return not holding, f"variables holding a token: {holding}" if holding else f"{len(env)} variables"


@check("no-published-ports", "5.8")
def _ports(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    bindings = host(attrs).get("PortBindings") or {}
    publish_all = bool(host(attrs).get("PublishAllPorts"))
    return not bindings and not publish_all, f"PortBindings={bindings} PublishAllPorts={publish_all}"


@check("not-default-bridge", "5.29", agent_only=True)  # the proxy sits on egress_network, bridge by default
def _bridge(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    mode = host(attrs).get("NetworkMode") or ""
    return mode not in ("default", "bridge"), f"NetworkMode={mode!r}"


@check("no-shared-propagation", "5.19")
def _propagation(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    shared = [m.get("Destination") for m in mounts(attrs) if m.get("Propagation") in ("shared", "rshared")]
    return not shared, f"shared mounts={shared}"


@check("ulimits-set", "5.18")
def _ulimits(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    limits = {u.get("Name"): u.get("Hard") for u in host(attrs).get("Ulimits") or []}
    ok = limits.get("core") == 0 and 0 < (limits.get("nofile") or 0) <= 65536
    return ok, f"Ulimits={limits} (core dumps off, a nofile limit)"


@check("apparmor-confined", "5.1")
def _apparmor(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    profile = attrs.get("AppArmorProfile") or ""
    options = host(attrs).get("SecurityOpt") or []
    unconfined = profile == "unconfined" or any(o.replace(":", "=") == "apparmor=unconfined"
                                                for o in options)
    return not unconfined, f"AppArmorProfile={profile!r}"


@check("init-process")
def _init(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    return bool(host(attrs).get("Init")), f"Init={host(attrs).get('Init')}"


@check("restart-policy-bounded", "5.14", agent_only=True)
def _restart(attrs: dict[str, Any], _: Expected) -> tuple[bool, str]:
    policy = host(attrs).get("RestartPolicy") or {}
    name, retries = policy.get("Name") or "no", policy.get("MaximumRetryCount") or 0
    ok = name == "no" or (name == "on-failure" and 0 < retries <= 5)
    return ok, f"RestartPolicy={name}:{retries}"


@check("spec-current", agent_only=True)
def _spec(attrs: dict[str, Any], expected: Expected) -> tuple[bool, str]:
    label = ((attrs.get("Config") or {}).get("Labels") or {}).get(LABEL_SPEC_HASH)
    return label == expected.spec_hash, f"spec hash {label}, configured {expected.spec_hash}"


def audit_container(attrs: dict[str, Any], expected: Expected | None) -> list[Finding]:
    """Every check; for the egress proxy (no `expected`), those not only an agent's."""
    subject = str(attrs.get("Name", "?")).lstrip("/")
    findings = []
    for name, cis, function in CHECKS:
        if expected is None and name in AGENT_ONLY:
            continue
        ok, detail = function(attrs, expected or Expected("", "", "", ()))
        findings.append(Finding(subject, name, ok, detail, cis))
    return findings


def audit_token_dirs(settings: FleetSettings) -> list[Finding]:
    """The host side: <secrets_dir> 0700; each agent's directory root's,
    of the agent's own group, 0750, its files root's 0440 (as root; without
    root 0700 and 0600), no links; no two agents sharing a group."""
    findings = []
    mode = stat.S_IMODE(os.stat(settings.secrets_dir).st_mode) if settings.secrets_dir.is_dir() else None
    if mode is not None:
        findings.append(Finding(str(settings.secrets_dir), "secrets-dir-private", mode & 0o077 == 0,
                                f"mode {oct(mode)}", "5.5"))
    root = enforced()
    want_dir, want_file = (DIRECTORY_MODE, FILE_MODE) if root else (0o700, 0o600)
    groups: dict[int, list[str]] = {}
    for agent in sorted(settings.agents):
        directory = settings.secrets_dir / agent
        if not directory.exists():
            continue
        problems = []
        info = os.lstat(directory)
        groups.setdefault(info.st_gid, []).append(agent)
        if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) != want_dir:
            problems.append(f"{directory} is {oct(stat.S_IMODE(info.st_mode))}")
        if root and info.st_uid != 0:
            problems.append(f"{directory} is owned by uid {info.st_uid}, not root")
        for entry in directory.iterdir():
            entry_info = os.lstat(entry)
            if not stat.S_ISREG(entry_info.st_mode):
                problems.append(f"{entry.name} is not a regular file")
            elif stat.S_IMODE(entry_info.st_mode) != want_file:
                problems.append(f"{entry.name} is {oct(stat.S_IMODE(entry_info.st_mode))}")
            elif root and (entry_info.st_uid, entry_info.st_gid) != (0, info.st_gid):
                problems.append(f"{entry.name} is owned by {entry_info.st_uid}:{entry_info.st_gid}")
        findings.append(Finding(str(directory), "token-dir-private", not problems,
                                "; ".join(problems) or f"{oct(want_dir)} directory, {oct(want_file)} files",
                                "5.5"))
    shared = {gid: agents for gid, agents in groups.items() if len(agents) > 1}
    detail = ("; ".join(f"gid {gid}: {', '.join(agents)}" for gid, agents in shared.items())
              or "one group per agent")
    if not root:
        detail = "not root: every agent runs as agent_uid (identities need root)"
    findings.append(Finding(str(settings.secrets_dir), "own-identity-per-agent", root and not shared,
                            detail))
    return findings


def audit_networks(settings: FleetSettings, client: docker.DockerClient) -> list[Finding]:
    """Each agent's way out: none, or fleet's proxy on a network of its own
    (internal, no address of the host's, shared with the proxy only). An
    agent on a network of the user's reaches whatever that network does."""
    layout = EgressLayout(settings)
    findings = []
    for agent, spec in sorted(settings.agents.items()):
        if not spec.egress:
            ok = spec.network == "none"
            findings.append(Finding(agent, "network-restricted", ok, "no network" if ok else
                                    f"unrestricted: on network {spec.network!r}, which fleet does not "
                                    "police; give it `egress` instead"))
            continue
        name = layout.network_name(agent)
        try:
            network = client.networks.get(name)
        except docker.errors.NotFound:
            findings.append(Finding(agent, "egress-network", True, f"{name} not made yet (no container)"))
            continue
        attrs = network.attrs
        options = attrs.get("Options") or {}
        attached = sorted(str(c.get("Name")) for c in (attrs.get("Containers") or {}).values())
        strangers = [c for c in attached if c not in (layout.proxy_name, container_name(settings, agent))]
        problems = [f"{key}={options.get(key)!r}" for key, value in INTERNAL_OPTIONS.items()
                    if options.get(key) != value]
        problems += [] if attrs.get("Internal") else ["not internal"]
        problems += [f"also attached: {', '.join(strangers)}"] if strangers else []
        findings.append(Finding(agent, "egress-network", not problems,
                                "; ".join(problems) or f"{name}: internal, no host address, "
                                f"shared with the proxy only ({len(attached)} attached)"))
    return findings


def expected_for(settings: FleetSettings, agent: str) -> Expected:
    spec = build_spec(settings, agent, uid=AgentIdentities(settings).current(agent))
    tokens = TokenStore(settings)
    values = tuple(v for name in settings.agents for v in tokens.values(name))
    return Expected(spec.token_dir, spec.volume, spec.hash, values, spec.egress_ca)


def audit_host(settings: FleetSettings, client: docker.DockerClient) -> list[Finding]:
    from fleet.container.manager import ContainerManager

    findings = []
    users: dict[str, list[str]] = {}
    for container in ContainerManager(client, settings).containers():
        if container.labels.get(LABEL_ROLE) == ROLE_PROXY:
            findings += audit_container(container.attrs, None)
            continue
        agent = container.labels.get(LABEL_AGENT, "")
        if agent not in settings.agents:
            findings.append(Finding(str(container.name), "configured-agent", False,
                                    f"agent {agent!r} is not configured (an orphan)"))
            continue
        findings += audit_container(container.attrs, expected_for(settings, agent))
        users.setdefault(str(container.attrs["Config"].get("User", "")).split(":")[0], []).append(agent)
    if users:
        shared = {uid: agents for uid, agents in users.items() if len(agents) > 1}
        findings.append(Finding("containers", "uid-per-agent", not shared,
                                "; ".join(f"uid {u}: {', '.join(a)}" for u, a in shared.items())
                                or f"{len(users)} agents, {len(users)} uids"))
    return findings + audit_networks(settings, client) + audit_token_dirs(settings)
