"""Fixtures of the unit tests: a fake forwarder and a running-task table over it."""

from fakes import forwarder, running

__all__ = ["forwarder", "running"]
