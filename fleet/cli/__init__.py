"""The `fleet` command line and the operator's tools: commands (`main`,
`tasks`, `operate`, `host`), tables (`display`), `doctor`, `audit`, `demo`
and `bench`."""

from fleet.cli.main import main

__all__ = ["main"]
