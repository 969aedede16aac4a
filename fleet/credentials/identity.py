"""One identity per agent on a host: a uid (and a group of the same number)
of its own, so that agents share no per-user kernel limit (processes,
inotify instances, pipe buffers) and no file permission.

The identity is kept where it is needed: it is the group of the agent's
token directory, `<secrets_dir>/<agent>/` (owned by root, mode 0750, its
files root-owned 0440), which the agent's container reads as that group.
A new agent gets the lowest id of the pool `[agent_uid, agent_uid +
UID_POOL)` no other agent's directory holds; an agent keeps its id for as
long as its directory exists, whatever agents come and go. The agent
image has a passwd and group entry for every id of the pool.

Without root (a laptop) nothing can be owned by another uid: every agent
then runs as `agent_uid`, as before, and `fleet audit` says so."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleet.errors import FleetError
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

UID_POOL = 1000  # the image has passwd entries for agent_uid … agent_uid + UID_POOL - 1
DIRECTORY_MODE = 0o750
FILE_MODE = 0o440
SECRETS_MODE = 0o700
LOCK_NAME = ".identities.lock"


def enforced() -> bool:
    """Whether this process can give agents identities of their own (it is root)."""
    return os.geteuid() == 0


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made 0600 if missing), held by one
    process of this host at a time: fleet's consumers start at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def proxy_id(settings: FleetSettings) -> int:
    """The egress proxy's uid and gid: the first after the agents' pool, so
    that no agent shares its group, which reads the injected tokens.
    Without root, the current user's (who owns every file then)."""
    return settings.agent_uid + UID_POOL if enforced() else os.getuid()


class AgentIdentities:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.pool = range(settings.agent_uid, settings.agent_uid + UID_POOL)

    def directory(self, agent: str) -> Path:
        return self.settings.secrets_dir / agent

    def uid(self, agent: str) -> int:
        """The agent's uid (and gid) on this host: allocated, and its token
        directory made, if it has none yet."""
        if not enforced():
            self.prepare_secrets_dir()
            directory = self.directory(agent)
            directory.mkdir(mode=0o700, exist_ok=True)
            return self.settings.agent_uid
        with self.locked():
            return self._allocate(agent)

    def current(self, agent: str) -> int:
        """The agent's uid as it stands, allocating nothing (for reading:
        the audit, the tables): its directory's group, else `agent_uid`."""
        try:
            gid = os.stat(self.directory(agent), follow_symlinks=False).st_gid
        except OSError:
            return self.settings.agent_uid
        return gid if enforced() and gid in self.pool else self.settings.agent_uid

    def prepare_secrets_dir(self) -> None:
        """`secrets_dir` exists and only its owner enters it; a looser mode is fixed."""
        path = self.settings.secrets_dir
        path.mkdir(mode=SECRETS_MODE, parents=True, exist_ok=True)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("secrets_dir %s was %s; made %s", path, oct(mode), oct(SECRETS_MODE))
            path.chmod(SECRETS_MODE)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One allocation at a time on this host (consumers start at once)."""
        self.prepare_secrets_dir()
        with host_lock(self.settings.secrets_dir / LOCK_NAME):
            yield

    def _allocate(self, agent: str) -> int:
        directory = self.directory(agent)
        try:
            info = os.stat(directory, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise FleetError(f"{directory} is not a directory: remove it (a token directory goes there)")
        gid = info.st_gid if info is not None else None
        held = self._held_by_others(agent, gid)
        if gid is None or gid not in self.pool or gid in held:
            free = next((i for i in self.pool if i not in held), None)
            if free is None:
                raise FleetError(f"no free agent uid left in {self.pool.start}-{self.pool.stop - 1}")
            if gid is not None:
                log.warning("agent %s: uid %d is not its own (shared or outside the pool); now %d",
                            agent, gid, free)
            gid = free
        directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
        self._own(directory, gid)
        return gid

    def _held_by_others(self, agent: str, own: int | None) -> set[int]:
        """The ids other agents' directories hold; where another shares the
        agent's own, the one whose name sorts first keeps it."""
        held = set()
        for entry in self.settings.secrets_dir.iterdir():
            if entry.name == agent or entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            gid = entry.stat(follow_symlinks=False).st_gid
            if gid == own and entry.name > agent:
                continue
            held.add(gid)
        return held

    def _own(self, directory: Path, gid: int) -> None:
        """root:gid 0750 for the directory, root:gid 0440 for its files."""
        os.chown(directory, 0, gid, follow_symlinks=False)
        directory.chmod(DIRECTORY_MODE)
        for entry in directory.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chown(entry, 0, gid, follow_symlinks=False)
                entry.chmod(FILE_MODE)
