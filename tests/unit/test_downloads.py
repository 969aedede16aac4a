"""A recipe's pinned downloads: taken only when the tarball's SHA-512 is the
pinned one, the named member extracted whole, kept in a cache by integrity."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import platform
import tarfile
from pathlib import Path

import pytest

from fleet.container import downloads
from fleet.container.downloads import add_downloads, planned
from fleet.errors import ImageError


def tarball(path: Path, member: str, data: bytes) -> str:
    """A .tgz at `path` holding `member`; returns its npm-style integrity."""
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def context(tmp_path: Path, url: str, integrity: str, machine: str = "x86_64") -> Path:
    build = tmp_path / "context"
    build.mkdir()
    (build / "downloads.json").write_text(json.dumps({"files": [{
        "file": "tool", "member": "package/tool",
        "platforms": {machine: {"url": url, "integrity": integrity}}}]}))
    return build


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(downloads, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_the_member_is_extracted_executable_and_cached(tmp_path: Path) -> None:
    source = tmp_path / "tool.tgz"
    integrity = tarball(source, "package/tool", b"#!/bin/sh\necho tool\n")
    build = context(tmp_path, source.as_uri(), integrity, machine=platform.machine())
    reports: list[str] = []
    add_downloads(build, reports.append)
    (build / "tool").unlink()
    source.unlink()  # from now on only the cache can answer
    add_downloads(build, reports.append)
    assert (build / "tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert (build / "tool").stat().st_mode & 0o111
    assert len(reports) == 1  # downloaded once
    assert sorted(p.name for p in build.iterdir()) == ["downloads.json", "tool"]  # no tarball left in it


def test_a_tarball_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "tool.tgz"
    tarball(source, "package/tool", b"evil")
    pinned = "sha512-" + base64.b64encode(hashlib.sha512(b"what was reviewed").digest()).decode()
    [download] = planned(context(tmp_path, source.as_uri(), pinned), "x86_64")
    with pytest.raises(ImageError, match="is not what the recipe pins"):
        downloads.fetch(download, lambda line: None)
    assert not download.cached.exists()


def test_a_cache_changed_since_it_was_checked_is_not_used(tmp_path: Path) -> None:
    """Whoever can write the cache cannot put a binary of theirs into an image."""
    source = tmp_path / "tool.tgz"
    integrity = tarball(source, "package/tool", b"the reviewed tool")
    build = context(tmp_path, source.as_uri(), integrity, machine=platform.machine())
    [download] = planned(build)
    downloads.fetch(download, lambda line: None)
    tarball(download.cached, "package/tool", b"a planted tool")  # the cache, rewritten
    assert downloads.integrity_of(download.cached) != integrity
    reports: list[str] = []
    add_downloads(build, reports.append)
    assert (build / "tool").read_bytes() == b"the reviewed tool"
    assert reports == [f"downloading {source.as_uri()}"]  # fetched again, and checked


def test_a_member_that_is_a_link_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "tool.tgz"
    with tarfile.open(source, "w:gz") as archive:
        link = tarfile.TarInfo("package/tool")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(source.read_bytes()).digest()).decode()
    build = context(tmp_path, source.as_uri(), integrity, machine=platform.machine())
    with pytest.raises(ImageError, match="is not a regular file"):
        add_downloads(build, lambda line: None)
    assert not (build / "tool").exists()


def test_a_machine_without_a_download_is_named(tmp_path: Path) -> None:
    build = context(tmp_path, "file:///nowhere", "sha512-AAAA", machine="riscv64")
    with pytest.raises(ImageError, match="no download of tool for x86_64 \\(only riscv64\\)"):
        planned(build, "x86_64")


def test_the_claude_code_recipe_pins_its_release_for_both_linux_machines() -> None:
    recipe = Path(downloads.__file__).resolve().parents[1] / "inside" / "recipes" / "claude-code"
    pinned = {machine: planned(recipe, machine)[0] for machine in ("x86_64", "aarch64")}
    version = json.loads((recipe / "downloads.json").read_text())["version"]
    assert all(d.url.endswith(f"-{version}.tgz") and d.integrity.startswith("sha512-")
               for d in pinned.values())
