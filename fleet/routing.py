"""Routing: a pure function from an agent to the queue its tasks go on."""

from __future__ import annotations


def queue_name(namespace: str, agent: str) -> str:
    """`fleet.agent.dev` for agent `dev` in namespace `fleet`."""
    return f"{namespace}.agent.{agent}"
