"""The host's token store: <secrets_dir>/<agent>/<name>. As root, each
agent's directory is root:<agent's gid> 0750 and its files root:<gid> 0440
(identity.py): only that agent's user, inside its container, reads them.
Without root, directories 0700 and files 0600 of the current user.

A token is written to a temporary file in the same directory, fsynced and
renamed over the old one. The container sees the directory through a bind
mount (not single files: a single-file bind keeps the old inode after a
rename), so a rotation is visible inside a running container at once, and a
reader sees the whole old value or the whole new one, never a mix.

A token the agent's config injects at the egress proxy (`inject`) lives
elsewhere: `<secrets_dir>/.injected/<agent>/<name>`, root:<proxy's gid>,
mounted into the proxy only. The agent's own directory holds a placeholder
under that name, so its tools find a file, and nothing of value."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.credentials.identity import DIRECTORY_MODE, FILE_MODE, AgentIdentities, enforced, proxy_id
from fleet.errors import UsageError
from fleet.settings import FleetSettings, check_token_name

log = logging.getLogger(__name__)

FINGERPRINT_LENGTH = 12
MAX_TOKEN_BYTES = 64 * 1024
SAFE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
INJECTED = ".injected"  # <secrets_dir>/.injected/<agent>/<name>: seen by the egress proxy only
PLACEHOLDER = b"fleet-placeholder:injected-at-the-egress-proxy"


@dataclass(frozen=True)
class TokenInfo:
    agent: str
    name: str
    age_s: float
    fingerprint: str
    injected: bool = False  # added at the egress proxy; the agent's file holds a placeholder


def fingerprint(value: bytes) -> str:
    """A short digest that tells two values apart without revealing either."""
    return "sha256:" + hashlib.sha256(value).hexdigest()[:FINGERPRINT_LENGTH]


def present(tokens: dict[str, bytes | None]) -> list[bytes]:
    return [value for value in tokens.values() if value]


def fingerprints_of(tokens: dict[str, bytes | None]) -> dict[str, str]:
    return {name: fingerprint(value) if value else "missing" for name, value in tokens.items()}


def read_regular(path: Path) -> bytes | None:
    try:
        fd = os.open(path, SAFE_OPEN)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TOKEN_BYTES:
            return None
        return os.read(fd, MAX_TOKEN_BYTES + 1)[:MAX_TOKEN_BYTES]
    except OSError:
        return None
    finally:
        os.close(fd)


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a token file is replaced (inode, mtime, size)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


class TokenWatch:
    """Notices an agent's token files being replaced while an attempt runs
    (a rotation), so the new values are masked too. Made before the tokens
    are read: a rotation in between is seen, not missed. A check is one
    stat per token file."""

    def __init__(self, store: TokenStore, agent: str) -> None:
        self.paths = {name: store.path(agent, name) for name in store.settings.agent(agent).tokens}
        self.seen = {name: file_identity(path) for name, path in self.paths.items()}

    def rotated(self) -> list[bytes]:
        """The values of the token files replaced since the last call."""
        values = []
        for name, path in self.paths.items():
            identity = file_identity(path)
            if identity != self.seen[name]:
                self.seen[name] = identity
                value = read_regular(path)
                if value:
                    values.append(value)
        return values


class TokenStore:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings

    def directory(self, agent: str) -> Path:
        return self.settings.secrets_dir / agent

    def declared(self, agent: str, name: str) -> None:
        """Refuse names the agent's config does not list."""
        spec = self.settings.agent(agent)
        try:
            check_token_name(name)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if name not in spec.tokens:
            listed = ", ".join(spec.tokens) or "none"
            raise UsageError(f"agent {agent!r} does not declare token {name!r} (tokens: {listed})")

    def injected(self, agent: str, name: str) -> bool:
        return name in self.settings.agent(agent).inject

    def injected_directory(self, agent: str) -> Path:
        return self.settings.secrets_dir / INJECTED / agent

    def path(self, agent: str, name: str) -> Path:
        """Where the token's real value is: the agent's directory, or the
        injected tree for a token the proxy adds."""
        if self.injected(agent, name):
            return self.injected_directory(agent) / name
        return self.directory(agent) / name

    def prepare(self, agent: str) -> int:
        """The agent's directory, made and owned as it should be; returns the agent's uid."""
        return AgentIdentities(self.settings).uid(agent)

    def prepare_injected(self, agent: str) -> int:
        """`.injected/<agent>/`, made root:<proxy's gid> 0750; returns that gid."""
        gid = proxy_id(self.settings)
        AgentIdentities(self.settings).prepare_secrets_dir()
        for directory in (self.settings.secrets_dir / INJECTED, self.injected_directory(agent)):
            directory.mkdir(mode=DIRECTORY_MODE if enforced() else 0o700, exist_ok=True)
            if enforced():
                os.chown(directory, 0, gid, follow_symlinks=False)
                directory.chmod(DIRECTORY_MODE)
        return gid

    def set(self, agent: str, name: str, value: bytes) -> TokenInfo:
        """Write a token atomically: temp file, fsync, rename, fsync the directory."""
        self.declared(agent, name)
        if not value:
            raise UsageError("the token value is empty")
        if self.injected(agent, name):
            write_atomically(self.injected_directory(agent), name, value, self.prepare_injected(agent))
            self.place_placeholders(agent)
        else:
            write_atomically(self.directory(agent), name, value, self.prepare(agent))
        return self.info(agent, name)

    def place_placeholders(self, agent: str) -> None:
        """For each injected token, the placeholder in the agent's own
        directory. A real value found there (the token was mounted before
        the config injected it, or was copied in by hand) is moved to the
        injected tree first, unless that already holds one: nothing lost,
        nothing of value left where the container reads."""
        gid = self.prepare(agent)
        for name in self.settings.agent(agent).inject:
            visible = self.directory(agent) / name
            value = read_regular(visible)
            if value == PLACEHOLDER:
                continue
            if value and read_regular(self.injected_directory(agent) / name) is None:
                write_atomically(self.injected_directory(agent), name, value, self.prepare_injected(agent))
            elif value:
                log.warning("agent %s: token %s in its directory was not the injected one; "
                            "replaced by the placeholder", agent, name)
            write_atomically(self.directory(agent), name, PLACEHOLDER, gid)

    def remove(self, agent: str, name: str) -> None:
        self.declared(agent, name)
        path = self.path(agent, name)
        if not path.is_file():
            raise UsageError(f"agent {agent!r} has no token {name!r}")
        path.unlink()

    def read(self, agent: str, name: str) -> bytes | None:
        """The value, for fleet's own use on the host (fingerprints, masking).
        None unless it is a regular file of at most MAX_TOKEN_BYTES: never a
        link followed (O_NOFOLLOW, checked on the open file, no race), never a
        FIFO waited on (O_NONBLOCK)."""
        return read_regular(self.path(agent, name))

    def read_all(self, agent: str) -> dict[str, bytes | None]:
        """Every token the agent declares, read once: name → value (None if missing)."""
        return {name: self.read(agent, name) for name in self.settings.agent(agent).tokens}

    def values(self, agent: str) -> list[bytes]:
        return present(self.read_all(agent))

    def fingerprints(self, agent: str) -> dict[str, str]:
        return fingerprints_of(self.read_all(agent))

    def info(self, agent: str, name: str) -> TokenInfo:
        path = self.path(agent, name)
        value = self.read(agent, name) or b""
        return TokenInfo(agent, name, time.time() - path.stat().st_mtime, fingerprint(value),
                         self.injected(agent, name))

    def list(self, agent: str | None = None) -> list[TokenInfo]:
        agents = [agent] if agent else sorted(self.settings.agents)
        found = []
        for name in agents:
            self.settings.agent(name)
            for token in self.settings.agents[name].tokens:
                if self.path(name, token).is_file():
                    found.append(self.info(name, token))
        return found


def write_atomically(directory: Path, name: str, value: bytes, gid: int) -> None:
    """`directory/name` := value, root:gid 0440 (0600 of the current user
    without root): temp file, fsync, rename, fsync the directory."""
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        if enforced():
            os.fchown(fd, 0, gid)
            os.fchmod(fd, FILE_MODE)
        else:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, directory / name)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
