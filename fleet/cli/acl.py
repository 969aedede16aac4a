"""`fleet acl`: Redis ACL users for the three kinds of fleet client, so that
whoever holds a role's password can do that role's job and nothing more.

  worker     what a host's `fleet worker` needs: every key of the namespace,
             its control channel and the broker's; no admin command
  submitter  publishes tasks and follows them: writes task records, their
             indexes, idempotency keys and the broker's queues, sends Celery's
             `task-sent` events and listens for results (AsyncResult), without
             publishing there; reads the rest;
             cannot pause or resume agents, drain hosts, touch leases or the
             marks of finished tasks (so neither cancel: an operator's job)
  viewer     reads records, events, alerts, hosts and queues; writes nothing

Every role is confined to the namespace's keys (`<namespace>:*`; the broker's
live under `<namespace>:broker:`). Redis 7's key selectors (`%R~`, `%W~`)
carry the read/write split. The rules are printed as `ACL SETUSER` lines
(without a password: add `>password`, or give it with --apply on stdin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("worker", "submitter", "viewer")
# What every client needs to connect and keep the connection healthy.
CONNECTION = "+@connection"
# Commands fleet (and kombu, and Celery) use beyond reading, for the roles that write.
# (TIME: kombu's scripts read the server's clock.)
# (FUNCTION and SCRIPT FLUSH/KILL reach beyond the namespace: every client's scripts and functions.)
WRITING = "+@read +@write +@stream +@hash +@list +@set +@sortedset +@string +@keyspace +@scripting " \
          "+@transaction +@blocking +@pubsub +time -@dangerous -@admin -function -fcall -fcall_ro " \
          "-script|flush -script|kill"


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    keys: tuple[str, ...]
    channels: tuple[str, ...]
    commands: str
    # Redis 7 selectors: further permissions, each its own (rules); a command
    # is allowed if the root rules or one selector allow it.
    selectors: tuple[str, ...] = ()


def roles(namespace: str, db: int = 0) -> dict[str, Role]:
    """The roles for a namespace; `db` is redis_url's database, which names
    Celery's remote-control channel (kombu subscribes to it by pattern, and a
    pattern subscription is allowed only for a pattern the ACL names exactly)."""
    ns = namespace
    return {
        "worker": Role("worker", "a host's fleet worker", (f"~{ns}:*",),
                       (f"&{ns}:*", f"&{ns}:broker:/{db}.celery.pidbox"), f"{CONNECTION} {WRITING}"),
        "submitter": Role(
            "submitter", "publishes tasks and follows them",
            # The broker's queues and bindings only: not kombu's `unacked`, which workers restore from.
            (f"%R~{ns}:*", f"%W~{ns}:task:*", f"%W~{ns}:index:*", f"%W~{ns}:idem:*",
             f"%W~{ns}:broker:{ns}.agent.*", f"%W~{ns}:broker:_kombu.*"),
            # Celery's `task-sent` events (no other event: Flower believes them).
            (f"&{ns}:control", f"&{ns}:broker:/{db}.celeryev/task.sent"),
            f"{CONNECTION} {WRITING}",
            # The channels AsyncResult.get() waits on, to listen only: whoever
            # may publish there can make a client's get() return anything.
            (f"(+subscribe +unsubscribe &{ns}:result:*)",)),
        "viewer": Role("viewer", "reads, writes nothing", (f"%R~{ns}:*",), (f"&{ns}:*",),
                       f"{CONNECTION} +@read +@blocking +subscribe +psubscribe +unsubscribe "
                       "+punsubscribe -@write -@dangerous -@admin"),
    }


def setuser_args(role: Role, user: str) -> list[str]:
    """`ACL SETUSER user ...` arguments: a fresh user (reset), on, confined to the role."""
    return [user, "reset", "on", *role.keys, *role.channels, *role.commands.split(), *role.selectors]


def setuser_line(role: Role, user: str) -> str:
    words = [f'"{word}"' if " " in word else word for word in setuser_args(role, user)]
    return f"ACL SETUSER {' '.join(words)}   # then: ACL SETUSER {user} >PASSWORD"


def apply_role(client: Any, role: Role, user: str, password: str) -> None:
    """Create or replace the user in the Redis `client` is connected to (as a
    user allowed ACL SETUSER) with the role's rules and this password."""
    from fleet.connection import redis_errors

    with redis_errors():
        client.execute_command("ACL", "SETUSER", *setuser_args(role, user), f">{password}")


def redis_db(url: str) -> int:
    """The database number of a redis_url (0 if it names none)."""
    from urllib.parse import urlsplit

    from fleet.redis_url import is_sentinel_url, parse_sentinel_url

    if is_sentinel_url(url):
        return parse_sentinel_url(url).db
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0
