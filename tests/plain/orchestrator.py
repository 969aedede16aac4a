"""An orchestrator written only against Celery's public API: it imports
nothing of fleet. Given what `fleet publisher-config --json` printed (on
stdin), it submits to three agents, waits with AsyncResult, revokes one
task and reads every outcome; it prints one JSON object of what it saw.

Run by tests/integration/test_celery_native.py, which checks the result
against fleet's own records."""

from __future__ import annotations

import json
import sys
import time

from celery import Celery
from celery.exceptions import TaskRevokedError


def main() -> None:
    config = json.load(sys.stdin)
    agents = sys.argv[1:4]
    app = Celery("orchestrator")
    app.conf.update({key: value for key, value in config.items() if key not in ("task", "queues")})
    task, queues = config["task"], config["queues"]

    def send(agent: str, payload: dict[str, object], task_id: str | None = None):  # type: ignore[no-untyped-def]
        return app.send_task(task, kwargs={"agent": agent, "payload": payload}, queue=queues[agent],
                             task_id=task_id)

    seen: dict[str, object] = {}
    ok = [send(agent, {"echo": f"hello {agent}"}) for agent in agents]
    failing = send(agents[0], {"exit": 1})
    slow = send(agents[1], {"sleep": 60})
    named = send(agents[2], {"echo": "mine"}, task_id="orchestrator-chose-this-id")
    seen["ids"] = {"ok": [r.id for r in ok], "failing": failing.id, "slow": slow.id, "named": named.id}
    seen["results"] = [r.get(timeout=120) for r in ok]
    seen["named"] = named.get(timeout=120)
    try:
        failing.get(timeout=120)
        seen["failing"] = "no exception"
    except Exception as error:  # what Celery makes of fleet's error: its class name and message
        seen["failing"] = {"type": type(error).__name__, "message": str(error)}
    deadline = time.monotonic() + 60
    while slow.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.1)  # AsyncResult offers no wait for a state short of ready
    seen["slow_state_before_revoke"] = slow.state
    app.control.revoke(slow.id, terminate=True)
    try:
        slow.get(timeout=120)
        seen["slow"] = "no exception"
    except TaskRevokedError as error:
        seen["slow"] = {"type": "TaskRevokedError", "message": str(error)}
    seen["states"] = {r.id: r.state for r in [*ok, failing, slow, named]}
    seen["imported_fleet"] = any(name == "fleet" or name.startswith("fleet.") for name in sys.modules)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
