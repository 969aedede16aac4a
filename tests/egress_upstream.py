"""The egress tests' upstream: fleet's stand-in (fleet/cli/standin.py) with
a certificate for its names from a CA of its own, on an internal network
only the proxy joins. It reports the SHA-256 of the Authorization header
it received, so a test compares hashes and never puts a token in a
container."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
from support import new_namespace

from fleet.settings import PROXY_IMAGE
from fleet.standin.upstream import auth_sha256, issue_certificate, start_standin

__all__ = ["Upstream", "auth_sha256", "run_upstream"]


@dataclass
class Upstream:
    network: str  # reachable only through it: give it to the proxy as egress_network
    address: str
    ca_file: Path  # its CA: the proxy's egress_ca_file
    names: tuple[str, ...]


@contextmanager
def run_upstream(client: docker.DockerClient, directory: Path, names: tuple[str, ...],
                 accept: str = "") -> Iterator[Upstream]:
    """An HTTPS upstream answering as each of `names`; `accept` is the
    Authorization value its /check lets in."""
    ca_file = issue_certificate(client, PROXY_IMAGE, directory / "upstream-certs", names)
    name = f"{new_namespace()}-upstream"
    standin = start_standin(client, name, names, namespace=name, accept=accept,
                            certificates=ca_file.parent)
    try:
        yield Upstream(standin.network, standin.address, ca_file, names)
    finally:
        standin.remove()
