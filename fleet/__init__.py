"""fleet: a worker fleet that runs autonomous coding agents, each in its own
long-lived, isolated container."""

from fleet.client import FleetClient
from fleet.record import State, TaskRecord

__all__ = ["FleetClient", "State", "TaskRecord"]
