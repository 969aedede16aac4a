"""The Lua scripts of the state store (`lua/*.lua`, package data), each
registered once per connection; redis-py sends it by digest after the first call."""

from __future__ import annotations

from importlib.resources import files

import redis
from redis.commands.core import Script


def load_script(client: redis.Redis, name: str) -> Script:
    source = files("fleet.state").joinpath("lua", f"{name}.lua").read_text()
    return client.register_script(source)
