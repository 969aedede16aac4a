"""Signed submissions: a submitter signs each task with a secret key, and
every worker refuses a task whose signature is missing or wrong, so that
whoever can write to Redis cannot make an agent run a task of their own.

The key file (`signing_key_file`) holds one key a line, `<key id> <secret>`
(a line with the secret alone is key id `default`); `#` starts a comment.
A submitter signs with the first key; a worker accepts any of them: to
rotate, add the new key to the workers' files, give it to the submitters
first in theirs, then remove the old one everywhere.

The signature is HMAC-SHA256 over the task id, the agent, the pinned host,
the SHA-256 of the payload (canonical JSON) and the creation time, so none
of them can be changed, nor a signature moved to another task."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.errors import ConfigError

SCHEME = "fleet-v1"
MIN_SECRET_BYTES = 16
KEY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def payload_digest(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def signed_text(task_id: str, agent: str, pinned_host: str | None, payload: dict[str, Any],
                created_at: str) -> bytes:
    return json.dumps([SCHEME, task_id, agent, pinned_host or "", payload_digest(payload), created_at],
                      separators=(",", ":")).encode()


@dataclass(frozen=True)
class SigningKeys:
    """The keys of one file, in its order: the first signs, all verify."""

    keys: tuple[tuple[str, bytes], ...]

    @classmethod
    def load(cls, path: Path) -> SigningKeys:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            why = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
            raise ConfigError(f"signing_key_file {str(path)!r}: {why}") from None
        with os.fdopen(fd) as f:
            info = os.fstat(f.fileno())
            text = f.read(64 * 1024) if stat.S_ISREG(info.st_mode) else ""
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"signing_key_file {str(path)!r} must be a file of root's or of this user's")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ConfigError(f"signing_key_file {str(path)!r} is readable by others "
                              f"({oct(stat.S_IMODE(info.st_mode))}): chmod 600 it")
        keys: list[tuple[str, bytes]] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key_id, secret = (words[0], words[1]) if len(words) == 2 else ("default", words[0])
            if len(words) > 2 or not set(key_id) <= KEY_ID_CHARS or len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(f"signing_key_file {str(path)!r} line {number}: use '<key id> <secret>' "
                                  f"with a secret of {MIN_SECRET_BYTES} characters at least")
            if any(key_id == known for known, _ in keys):
                raise ConfigError(f"signing_key_file {str(path)!r} line {number}: key id {key_id!r} twice")
            keys.append((key_id, secret.encode()))
        if not keys:
            raise ConfigError(f"signing_key_file {str(path)!r} holds no key")
        return cls(tuple(keys))

    def sign(self, task_id: str, agent: str, pinned_host: str | None, payload: dict[str, Any],
             created_at: str) -> tuple[str, str]:
        """(key id, signature) with the first key."""
        key_id, secret = self.keys[0]
        text = signed_text(task_id, agent, pinned_host, payload, created_at)
        return key_id, hmac.new(secret, text, hashlib.sha256).hexdigest()

    def refusal(self, task_id: str, agent: str, pinned_host: str | None, payload: dict[str, Any],
                created_at: str, key_id: str | None, signature: str | None) -> str | None:
        """Why the signature does not hold; None if it does."""
        if not key_id or not signature:
            return "it is not signed, and this worker runs only signed tasks"
        secret = dict(self.keys).get(key_id)
        if secret is None:
            return f"it is signed with key {key_id!r}, which this worker does not accept"
        expected = hmac.new(secret, signed_text(task_id, agent, pinned_host, payload, created_at),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return (f"its signature (key {key_id!r}) does not match the task: it was changed after it "
                    "was signed, or signed with another secret")
        return None


class KeyFile:
    """A worker's key file, read again when it changes (a key added or
    removed counts from the next task, without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._keys: SigningKeys | None = None

    def current(self) -> SigningKeys:
        """The keys as the file has them now; ConfigError if it is unusable."""
        try:
            info = os.stat(self.path)
        except OSError as error:
            raise ConfigError(f"signing_key_file {str(self.path)!r}: {error.strerror}") from None
        seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        if self._keys is None or seen != self._seen:
            self._keys, self._seen = SigningKeys.load(self.path), seen
        return self._keys
