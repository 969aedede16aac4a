"""The version of fleet, in this one place (pyproject.toml reads it from here)."""

__version__ = "0.3.0"
