"""`fleet doctor`: checks what fleet needs on this host and says how to fix
what is wrong. Each check is independent, so one failure does not hide the
others."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from fleet.container.engine import connect
from fleet.container.image import INSIDE, image_is_current
from fleet.container.recipes import build_command, build_context
from fleet.errors import EngineError, StateStoreError
from fleet.settings import AGENT_IMAGE, FleetSettings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_engine() -> tuple[Check, docker.DockerClient | None]:
    try:
        client = connect(timeout=10)
    except EngineError as error:
        fix = "start the engine: `scripts/bootstrap.sh` (as root it starts dockerd) or start Docker"
        return Check("engine", False, str(error), fix), None
    version = client.version().get("Version", "?")
    return Check("engine", True, f"Docker {version} answers"), client


def check_signing(settings: FleetSettings) -> Check:
    """Signed submissions: whether workers here verify them (a note, not a failure, when they do not)."""
    from fleet.credentials.signing import SigningKeys
    from fleet.errors import ConfigError

    if settings.signing_key_file is None:
        return Check("signing", True, "submissions are NOT verified: whoever can write to Redis can have "
                     "any agent run a task (set signing_key_file; docs/security.md)")
    try:
        keys = SigningKeys.load(settings.signing_key_file)
    except ConfigError as error:
        return Check("signing", False, str(error), "write '<key id> <secret>' lines, mode 0600")
    ids = ", ".join(key_id for key_id, _ in keys.keys)
    return Check("signing", True, f"submissions are signed with key {keys.keys[0][0]!r}; "
                 f"workers accept {ids}")


def check_redis(settings: FleetSettings) -> Check:
    from fleet.connection import connect_redis, redis_errors

    shown = redis_display(settings.redis_url)
    if settings.redis_url.startswith("sentinel://"):
        shown += f" (master {settings.redis_sentinel_master})"
    try:
        with redis_errors():
            client = connect_redis(settings, decode_responses=False, socket_connect_timeout=3,
                                   socket_timeout=3)
            info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
    except StateStoreError as error:
        fix = "start redis-server, or point redis_url (FLEET_REDIS_URL) at a running one"
        return Check("redis", False, f"{shown}: {error}", fix)
    return Check("redis", True, f"Redis {info.get('redis_version', '?')} at {shown}")


def redis_display(url: str) -> str:
    """The URL without a password, for printing (each part of a sentinel URL)."""
    from fleet.redis_url import redact_credentials

    return redact_credentials(url)


def check_images(client: docker.DockerClient | None, images: list[str]) -> list[Check]:
    if client is None:
        return [Check("image", False, "not checked: no engine", "start the engine first")]
    checks = []
    for tag in images:
        try:
            client.images.get(tag)
        except docker.errors.ImageNotFound:
            checks.append(Check("image", False, f"{tag} is missing", f"run `{build_command(tag)}`"))
            continue
        context = build_context(tag)
        if context is not None and not image_is_current(client, tag, context):
            where = context.relative_to(INSIDE.parent).as_posix()
            checks.append(Check("image", False, f"{tag} is older than its build context (fleet/{where})",
                                f"run `{build_command(tag)}`"))
            continue
        checks.append(Check("image", True, f"{tag} is present"))
    return checks


def check_secrets_dir(path: Path) -> Check:
    if not path.is_dir():
        return Check("secrets", False, f"{path} does not exist",
                     f"install -d -m 700 {path} (or `fleet tokens set` creates it)")
    bad = [str(p) for p in [path, *path.iterdir()] if p.is_dir() and loose(p, 0o077)]
    bad += [str(f) for d in path.iterdir() if d.is_dir() for f in d.iterdir() if loose(f, 0o077)]
    if bad:
        return Check("secrets", False, f"readable by others: {', '.join(bad[:3])}",
                     f"chmod -R go-rwx {path}")
    return Check("secrets", True, f"{path} is private (0700 directories, 0600 files)")


def loose(path: Path, forbidden: int) -> bool:
    return bool(os.lstat(path).st_mode & forbidden & (stat.S_IRWXG | stat.S_IRWXO))


def run_checks(settings: FleetSettings) -> list[Check]:
    engine, client = check_engine()
    images = sorted({spec.image for spec in settings.agents.values()} or {AGENT_IMAGE})
    if any(spec.egress for spec in settings.agents.values()):
        images.append(settings.egress_image)
    return [
        engine,
        check_redis(settings),
        *check_images(client, images),
        check_secrets_dir(settings.secrets_dir),
        check_signing(settings),
    ]


def print_checks(checks: list[Check], echo: Callable[[str], None]) -> None:
    for check in checks:
        echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<8} {check.detail}")
        if not check.ok:
            echo(f"      fix: {check.fix}")
