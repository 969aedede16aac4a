"""Pinned downloads for an image's build context: what a recipe's
`downloads.json` names (a registry tarball per machine, with its SHA-512
integrity, and the member to take out of it), fetched on the host, where
the registries answer over HTTPS, and checked before anything of it is
used. Kept in a cache by integrity, so a rebuild downloads nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import ImageError

DOWNLOADS_FILE = "downloads.json"
CACHE = Path.home() / ".cache" / "fleet" / "downloads"
CHUNK = 1 << 20

Report = Callable[[str], None]


@dataclass(frozen=True)
class Download:
    file: str  # its name in the build context
    member: str  # its path inside the tarball
    url: str
    integrity: str  # "sha512-<base64>", as npm's registry states it

    @property
    def cached(self) -> Path:
        digest = base64.b64decode(self.integrity.removeprefix("sha512-")).hex()[:32]
        return CACHE / digest / self.file


def planned(context: Path, machine: str | None = None) -> list[Download]:
    """The downloads `context/downloads.json` names for this machine."""
    path = context / DOWNLOADS_FILE
    if not path.is_file():
        return []
    machine = machine or platform.machine()
    found = []
    for entry in json.loads(path.read_text())["files"]:
        target = entry["platforms"].get(machine)
        if target is None:
            raise ImageError(f"{context.name}: no download of {entry['file']} for {machine} "
                             f"(only {', '.join(sorted(entry['platforms']))})")
        if not str(target["integrity"]).startswith("sha512-"):
            raise ImageError(f"{context.name}: {entry['file']}'s integrity is not a sha512- value")
        found.append(Download(entry["file"], entry["member"], target["url"], target["integrity"]))
    return found


def fetch(download: Download, report: Report) -> Path:
    """The file, from the cache or downloaded, its tarball checked first."""
    if download.cached.is_file():
        return download.cached
    report(f"downloading {download.url}")
    download.cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=download.cached.parent) as scratch:
        tarball = Path(scratch) / "download.tgz"
        digest = hashlib.sha512()
        try:
            with urllib.request.urlopen(download.url, timeout=60) as answer, tarball.open("wb") as out:
                while chunk := answer.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            raise ImageError(f"downloading {download.url} failed: {error}") from None
        got = "sha512-" + base64.b64encode(digest.digest()).decode()
        if got != download.integrity:
            raise ImageError(f"{download.url} is not what the recipe pins: integrity {got}, "
                             f"expected {download.integrity}")
        with tarfile.open(tarball) as archive:
            try:
                member = archive.getmember(download.member)
            except KeyError:
                raise ImageError(f"{download.url} has no {download.member}") from None
            source = archive.extractfile(member)
            if source is None:
                raise ImageError(f"{download.url}: {download.member} is not a file")
            partial = Path(scratch) / download.file
            with source, partial.open("wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
        partial.chmod(0o755)
        partial.replace(download.cached)  # whole or not at all
    return download.cached


def add_downloads(build_dir: Path, report: Report) -> None:
    """Put each of the build context's pinned downloads into it."""
    for download in planned(build_dir):
        cached, target = fetch(download, report), build_dir / download.file
        try:
            target.hardlink_to(cached)  # no copy of a large binary where the cache is on the same disk
        except OSError:
            shutil.copy2(cached, target)
