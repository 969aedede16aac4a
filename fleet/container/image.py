"""Building fleet's images without depending on a registry: the agent image
(`fleet/inside/agent_image`) and the egress proxy's (`fleet/inside/proxy_image`).

Where a registry answers, the Dockerfiles build on `debian:bookworm-slim`.
Where none does (this project's machines), a Debian base is made once with
`debootstrap --variant=minbase` and `docker import`, cached by tag, and the
same Dockerfiles build on it. Each image carries a hash of its build context
as a label, so a changed Dockerfile or script triggers a rebuild and an
unchanged one does not.

The proxy's Python packages are downloaded on the host (`pip download`, for
the base's Python 3.11) into a copy of its context: inside a build here no
package index answers over HTTPS."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors

from fleet.container.downloads import add_downloads
from fleet.container.engine import engine_errors
from fleet.errors import ImageError

# The build contexts ship in the package (package data), so an installed
# wheel builds the same images as a checkout.
INSIDE = Path(__file__).resolve().parent.parent / "inside"
CONTEXT_DIR = INSIDE / "agent_image"
PROXY_CONTEXT_DIR = INSIDE / "proxy_image"
BASE_PYTHON = "3.11"  # bookworm's, which both images run on
WHEEL_CACHE = Path.home() / ".cache" / "fleet" / "wheels"
# Published only as a source archive, which `pip download --only-binary` cannot take: made into a wheel here.
SOURCE_ONLY = ("pyperclip==1.9.0",)
REGISTRY_BASE = "debian:bookworm-slim"
BOOTSTRAP_BASE = "fleet-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CONTEXT_LABEL = "fleet.context-hash"
RECIPE = "2"  # bump when build_image changes what it puts in the image (e.g. its labels)

Report = Callable[[str], None]


def context_hash(context: Path = CONTEXT_DIR) -> str:
    digest = hashlib.sha256(f"recipe {RECIPE}\0".encode())
    # Only what the build reads: not the bytecode an install compiles next to the agent's script.
    for path in sorted(p for p in context.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"):
        digest.update(path.relative_to(context).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_is_current(client: docker.DockerClient, tag: str, context: Path = CONTEXT_DIR) -> bool:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    labels = image.labels or {}
    return labels.get(CONTEXT_LABEL) == context_hash(context) and base_is_current(client, labels)


def base_is_current(client: docker.DockerClient, labels: dict[str, str]) -> bool:
    """The image was built on the base that carries its base's tag now (a
    recipe's base is fleet's agent image, rebuilt when its context changes)."""
    base = labels.get("fleet.base")
    if not base or not has_image(client, base):
        return True
    return str(client.images.get(base).id) == labels.get("fleet.base-id")


def has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def local_base(client: docker.DockerClient) -> str | None:
    """A base already here: the registry's, else one bootstrapped earlier."""
    return next((tag for tag in (REGISTRY_BASE, BOOTSTRAP_BASE) if has_image(client, tag)), None)


def pulled_base(client: docker.DockerClient, report: Report) -> str | None:
    """The registry base if it can be pulled, else None."""
    report(f"pulling {REGISTRY_BASE}")
    try:
        client.images.pull(REGISTRY_BASE)
    except docker.errors.APIError:
        report(f"no registry answers: pulling {REGISTRY_BASE} failed")
        return None
    return REGISTRY_BASE


def bootstrap_base(client: docker.DockerClient, report: Report, mirror: str) -> str:
    """Make `fleet-base:bookworm` with debootstrap unless it exists already."""
    if has_image(client, BOOTSTRAP_BASE):
        return BOOTSTRAP_BASE
    if shutil.which("debootstrap") is None:
        raise ImageError("no registry answers and debootstrap is missing: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise ImageError("no registry answers and debootstrap needs root: run `fleet image build` as root")
    report(f"bootstrapping a Debian {DEBIAN_SUITE} base with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="fleet-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        tarball = Path(scratch) / "rootfs.tar"
        command = [
            "debootstrap", "--variant=minbase", "--include=python3",
            DEBIAN_SUITE, str(rootfs), mirror,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ImageError(f"debootstrap failed: {tail[0]}")
        # apt caches and lists are not needed in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / leftover, ignore_errors=True)
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        repository, tag = BOOTSTRAP_BASE.split(":")
        with engine_errors("docker import of the bootstrapped base"):
            client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    return BOOTSTRAP_BASE


def build_image(
    client: docker.DockerClient,
    tag: str,
    *,
    report: Report,
    force: bool = False,
    base: str | None = None,
    mirror: str = DEFAULT_MIRROR,
    context: Path = CONTEXT_DIR,
) -> bool:
    """Build the image of `context` unless it is current. Returns True if it built."""
    if not force and image_is_current(client, tag, context):
        report(f"image {tag} is up to date")
        return False
    base = (base or local_base(client) or pulled_base(client, report)
            or bootstrap_base(client, report, mirror))
    report(f"building {tag} on {base}")
    with tempfile.TemporaryDirectory(prefix="fleet-context-") as scratch:
        build_dir = Path(scratch) / "context"
        shutil.copytree(context, build_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if (build_dir / "requirements.txt").is_file():
            download_wheels(build_dir / "requirements.txt", build_dir / "wheels", report, tag)
        add_downloads(build_dir, report)
        try:
            client.images.build(
                path=str(build_dir),
                tag=tag,
                buildargs={"BASE": base},
                # The exact base it was built on, so an audit can tell it is pinned.
                labels={CONTEXT_LABEL: context_hash(context), "fleet.base": base,
                        "fleet.base-id": str(client.images.get(base).id)},
                rm=True,
                forcerm=True,
            )
        except docker.errors.BuildError as error:
            lines = [str(chunk.get("stream", "")).strip() for chunk in error.build_log]
            detail = next((line for line in reversed(lines) if line), str(error))
            raise ImageError(f"building {tag} failed: {detail}") from None
        except docker.errors.APIError as error:
            raise ImageError(f"building {tag} failed: {error}") from None
    return True


def download_wheels(requirements: Path, into: Path, report: Report, tag: str) -> None:
    """The wheels `requirements` needs on the base's Python, for this
    machine's platform, from the host's package index; kept in a cache by
    the requirements' hash, so a rebuild downloads nothing."""
    cache = WHEEL_CACHE / hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    if not (cache / ".complete").is_file():
        report(f"downloading the Python packages of {tag} for Python {BASE_PYTHON}")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        steps = [
            [*pip, "wheel", "--no-deps", "-w", str(cache), *SOURCE_ONLY],
            [*pip, "download", "--only-binary=:all:", "--python-version", BASE_PYTHON,
             "--find-links", str(cache), "-d", str(cache), "-r", str(requirements)],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise ImageError(f"downloading the Python packages of {tag} failed: {tail[0]}")
        (cache / ".complete").touch()
    shutil.copytree(cache, into)
