"""fleet: a worker fleet that runs autonomous coding agents, each in its own
long-lived, isolated container.

The names below are imported on first use, so that `import fleet` (and every
`fleet` command that does not publish) does not pay for Celery and kombu."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.version import __version__

if TYPE_CHECKING:
    from fleet.async_client import AsyncFleetClient
    from fleet.client import FleetClient
    from fleet.record import State, TaskRecord

__all__ = ["AsyncFleetClient", "FleetClient", "State", "TaskRecord", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "FleetClient":
        from fleet.client import FleetClient

        return FleetClient
    if name == "AsyncFleetClient":
        from fleet.async_client import AsyncFleetClient

        return AsyncFleetClient
    if name in ("State", "TaskRecord"):
        from fleet import record

        return getattr(record, name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
