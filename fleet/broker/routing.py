"""Routing: a pure function from an agent (and, for a pinned task, a host)
to the queue its tasks go on. Every host serving an agent consumes its shared
queue and its own pinned queue for that agent."""

from __future__ import annotations


def queue_name(namespace: str, agent: str, host: str | None = None) -> str:
    """`fleet.agent.dev` for agent `dev`; `fleet.agent.dev.host.h1` for its tasks pinned to h1."""
    shared = f"{namespace}.agent.{agent}"
    return shared if host is None else f"{shared}.host.{host}"
