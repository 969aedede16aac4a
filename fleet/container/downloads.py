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
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
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
        """The tarball, as downloaded: checked again each time it is used."""
        digest = base64.b64decode(self.integrity.removeprefix("sha512-")).hex()[:32]
        return CACHE / digest / "download.tgz"


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


def checked_copy(source: Path, target: Path, integrity: str) -> bool:
    """Copy `source` to `target`, hashing what is copied: True if that is
    the pinned tarball (then `target` is what was checked, whatever happens
    to `source` after), else False and no `target`."""
    if not source.is_file():
        return False
    if integrity_of(source, copy_to=target) == integrity:
        return True
    target.unlink()
    return False


def fetch(download: Download, report: Report) -> None:
    """Download the tarball into the cache, if it is the pinned one."""
    report(f"downloading {download.url}")
    download.cached.parent.mkdir(parents=True, exist_ok=True)
    partial = download.cached.with_suffix(".partial")
    try:
        with urllib.request.urlopen(download.url, timeout=60) as answer, partial.open("wb") as out:
            shutil.copyfileobj(answer, out, CHUNK)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise ImageError(f"downloading {download.url} failed: {error}") from None
    got = integrity_of(partial)
    if got != download.integrity:
        partial.unlink()
        raise ImageError(f"{download.url} is not what the recipe pins: integrity {got}, "
                         f"expected {download.integrity}")
    partial.replace(download.cached)


def integrity_of(path: Path, copy_to: Path | None = None) -> str:
    """The file's integrity as npm states it; with `copy_to`, of the very
    bytes written there as they are read."""
    digest = hashlib.sha512()
    with path.open("rb") as data, copy_to.open("wb") if copy_to else nullcontext() as out:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def extract(download: Download, tarball: Path, into: Path) -> None:
    """The download's one member, a regular file, into `into` as an executable."""
    with tarfile.open(tarball) as archive:
        try:
            member = archive.getmember(download.member)
        except KeyError:
            raise ImageError(f"{download.url} has no {download.member}") from None
        source = archive.extractfile(member) if member.isfile() else None
        if source is None:
            raise ImageError(f"{download.url}: {download.member} is not a regular file")
        target = into / download.file
        with source, target.open("wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        target.chmod(0o755)


def add_downloads(build_dir: Path, report: Report) -> None:
    """Put each of the build context's pinned downloads into it: the cached
    tarball if it still is the pinned one, else a new download, checked as
    it is copied into the build and extracted from that copy."""
    for download in planned(build_dir):
        private = build_dir / f".{download.file}.tgz"
        if not checked_copy(download.cached, private, download.integrity):
            fetch(download, report)
            if not checked_copy(download.cached, private, download.integrity):
                raise ImageError(f"the cached {download.url} changed as it was used")
        extract(download, private, build_dir)
        private.unlink()
