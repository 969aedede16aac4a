#!/usr/bin/python3 -I
"""fleet-git-credential: git's credential helper in an agent's container.

git asks a helper for a credential only when a forge refused the request
it made (the egress proxy adds the agent's real token to every request to
the forge; the agent holds none). So a `get` means the agent's credential
was refused: the helper notes the host for fleet-claude, which ends the
task with a credential failure (exit 77), and tells git to stop (`quit`),
giving it nothing. There is no other credential to be had here."""

import os
import sys


def main() -> int:
    if sys.argv[1:2] != ["get"]:
        return 0  # store / erase: nothing is kept
    fields = dict(line.partition("=")[::2] for line in sys.stdin.read().splitlines() if "=" in line)
    refused = os.environ.get("FLEET_GIT_REFUSED")
    if refused:
        with open(refused, "a") as notes:
            notes.write(fields.get("host", "?") + "\n")
    print("quit=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
