"""The baseline: a bare Celery app on the same Redis, a no-op task, results
in Redis. Started as a worker by benchmarks/roundtrip.py."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bare", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


@app.task(name="bare.noop")
def noop() -> str:
    return "ok"


@app.task(name="bare.cat")
def cat() -> str:
    """The same trivial job fleet runs, as a host subprocess: no isolation."""
    import subprocess

    return subprocess.run(["cat"], input=b"{}", capture_output=True, check=True).stdout.decode()
