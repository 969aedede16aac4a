"""The Docker engine boundary: one place that opens a client and translates
docker-py's exceptions into fleet's error tree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import docker
import docker.errors
import requests.exceptions

from fleet.errors import EngineError

ENGINE_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException)


def connect(timeout: int = 60) -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (or the local socket)."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except ENGINE_FAILURES as error:
        raise EngineError(f"no Docker engine answers: {first_line(error)}") from None
    return client


@contextmanager
def engine_errors(doing: str) -> Iterator[None]:
    """Re-raise any docker-py failure inside the block as EngineError."""
    try:
        yield
    except ENGINE_FAILURES as error:
        raise EngineError(f"{doing}: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
