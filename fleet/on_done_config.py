"""The `on_done` part of the settings: hooks told when a task ends, each a
webhook (an HTTP POST of the final record, signed with HMAC-SHA256) or a
command (the same JSON on its stdin); and the signature a receiver checks.

Hooks are named in the configuration and chosen by name (per agent in
`agents.<name>.on_done`, per task at submit): a URL taken from Redis would
let whoever may write a record make every host POST anywhere, signed with
the hook's secret."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

HOOK_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
SIGNATURE_HEADER = "X-Fleet-Signature"  # "sha256=<hex>" of "<timestamp>.<body>"
TIMESTAMP_HEADER = "X-Fleet-Timestamp"  # epoch seconds the delivery was signed at
DELIVERY_HEADER = "X-Fleet-Delivery"  # the same for every try of one delivery: a receiver's dedup key


def check_hook_name(value: str) -> str:
    if not HOOK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a hook name (a-z, 0-9, _ and -, at most 32)")
    return value


HookName = Annotated[str, AfterValidator(check_hook_name)]


class OnDoneHook(BaseModel):
    """One hook: a `url` to POST to (with `secret_file` holding the HMAC
    key) or a `command`; tried again with exponential backoff from
    `backoff_s` to `backoff_max_s` until delivered or `give_up_after_s`
    has passed since the task ended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    secret_file: Path | None = None
    command: list[str] = Field(default_factory=list)
    timeout_s: float = Field(10.0, gt=0, le=300)
    backoff_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    give_up_after_s: float = Field(86400.0, gt=0)

    @model_validator(mode="after")
    def _one_way(self) -> OnDoneHook:
        if (self.url is None) == (not self.command):
            raise ValueError("give a hook either url or command")
        if self.url is not None:
            parts = urlsplit(self.url)
            try:
                parts.port  # noqa: B018 (it raises for a port that is not a number)
            except ValueError:
                raise ValueError(f"url {self.url!r} has a port that is not a number") from None
            if not parts.hostname:
                raise ValueError(f"url {self.url!r} names no host")
            if self.secret_file is None:
                raise ValueError("a url hook needs secret_file: its deliveries are signed")
        if self.command and self.secret_file is not None:
            raise ValueError("secret_file is for url hooks")
        if any(not word for word in self.command):
            raise ValueError("command words must not be empty")
        return self

    def secret(self) -> bytes:
        """The HMAC key (the file's content, surrounding whitespace stripped)."""
        assert self.secret_file is not None
        try:
            key = self.secret_file.read_bytes().strip()
        except OSError as error:
            raise ValueError(f"secret_file {str(self.secret_file)!r}: {error.strerror}") from None
        if len(key) < 16:
            raise ValueError(f"secret_file {str(self.secret_file)!r} holds under 16 bytes")
        return key


def check_agents_hooks(hooks: Mapping[str, OnDoneHook], agents: Mapping[str, list[str]]) -> None:
    """ValueError naming an agent's hook that is not configured."""
    for agent, named in agents.items():
        if unknown := [hook for hook in named if hook not in hooks]:
            raise ValueError(f"agents.{agent}.on_done: no hook {unknown[0]!r} in on_done")


def hooks_of_ends(hooks: Mapping[str, OnDoneHook],
                  agents: Mapping[str, list[str]]) -> Callable[[str, list[str]], list[str]] | None:
    """(agent, the task's own hooks) → the hooks its end is delivered to:
    the agent's, then the task's, those configured only. None without hooks."""
    if not hooks:
        return None

    def of_end(agent: str, named: list[str]) -> list[str]:
        return [hook for hook in dict.fromkeys([*agents.get(agent, []), *named]) if hook in hooks]
    return of_end


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The value of X-Fleet-Signature for a delivery."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signed: str, now: float,
           tolerance_s: float = 300.0) -> bool:
    """What a receiver checks: the signature matches and was made within
    `tolerance_s` of `now` (an old delivery replayed is refused)."""
    try:
        age = abs(now - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(signature(secret, timestamp, body), signed)
