"""Task state in Redis, shared by every process that talks to it: the key
scheme (`keys`), task records and their transitions (`records`), leases and
fenced writes (`leases`), event streams (`events`) and the host registry
(`hosts`). The Lua scripts live in `lua/`, loaded once per connection."""
