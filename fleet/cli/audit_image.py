"""`fleet audit --image`: the agent image's own filesystem and config
against the isolation policy (no setuid files, no secrets baked in, a
non-root user), read without running anything in it."""

from __future__ import annotations

import io
import re
import stat
import tarfile
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors

from fleet.cli.audit import Finding
from fleet.container.engine import engine_errors

SECRET_ENV_NAME = re.compile(r"(?i)(token|secret|passw|api_?key|private|credential)")
SECRET_VALUE = re.compile(
    rb"(ghp_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
    rb"|xox[abp]-[A-Za-z0-9-]{10,}|AKIA[A-Z0-9]{16}|sk-[A-Za-z0-9]{32,}"
    # A key, not a program that parses keys (libssh2 holds the header alone): the header and a body.
    rb"|-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{64})")
SECRET_FILE_NAMES = re.compile(
    r"(^|/)(\.claude\.json|\.netrc|\.git-credentials|\.npmrc|\.pypirc|id_rsa|id_ed25519|id_ecdsa"
    r"|credentials\.json|\.docker/config\.json)$")
MAX_SCANNED_FILE = 1024 * 1024

def image_files(client: docker.DockerClient, tag: str) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Every file of the image's filesystem (through a container that never starts)."""
    with engine_errors(f"reading the filesystem of {tag}"):
        container = client.containers.create(tag, command=["true"], network_mode="none")
        try:
            stream = io.BufferedReader(_ChunkReader(container.export()))  # type: ignore[arg-type]
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    data = b""
                    if member.isfile() and member.size <= MAX_SCANNED_FILE:
                        extracted = archive.extractfile(member)
                        data = extracted.read() if extracted else b""
                    yield member, data
        finally:
            container.remove(force=True)


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


def audit_image(client: docker.DockerClient, tag: str) -> list[Finding]:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return [Finding(tag, "image-present", False, "missing: run `fleet image build`")]
    config = image.attrs.get("Config") or {}
    user = str(config.get("User") or "")
    uid = user.split(":")[0]
    findings = [Finding(tag, "image-non-root-user", uid.isdigit() and int(uid) != 0, f"USER {user!r}",
                        "4.1")]
    env = config.get("Env") or []
    suspicious = [e.split("=", 1)[0] for e in env
                  if SECRET_ENV_NAME.search(e.split("=", 1)[0]) or SECRET_VALUE.search(e.encode())]
    findings.append(Finding(tag, "image-no-secret-env", not suspicious, f"ENV names: {suspicious}"
                            if suspicious else f"{len(env)} ENV entries, none secret-looking", "4.10"))
    base_id = (image.labels or {}).get("fleet.base-id", "")
    findings.append(Finding(tag, "image-base-pinned", base_id.startswith("sha256:"),
                            f"base {(image.labels or {}).get('fleet.base', '?')} = {base_id or 'unknown'}"))
    secret_files, setuid = [], []
    for member, data in image_files(client, tag):
        name = "/" + member.name.lstrip("./")
        if member.isfile() and (SECRET_FILE_NAMES.search(name) or SECRET_VALUE.search(data)):
            secret_files.append(name)
        if member.isfile() and member.mode & (stat.S_ISUID | stat.S_ISGID):
            setuid.append(name)
    findings.append(Finding(tag, "image-no-secret-files", not secret_files,
                            f"found: {secret_files[:5]}" if secret_files else "none found", "4.10"))
    findings.append(Finding(tag, "image-no-setuid", not setuid,
                            f"setuid/setgid: {setuid[:5]}" if setuid else "none", "4.8"))
    return findings

