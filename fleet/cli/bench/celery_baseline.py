"""The baseline of `fleet bench`: a bare Celery app on the benchmark's Redis
(its URL in BENCH_REDIS_URL), results in Redis, no fleet code in the path.
The benchmark runs it as `celery -A fleet.cli.bench.celery_baseline worker -P threads`."""

from __future__ import annotations

import os
import subprocess

from celery import Celery

REDIS_URL_ENV = "BENCH_REDIS_URL"

app = Celery("bench")


def configure(redis_url: str | None) -> None:
    app.conf.update(broker_url=redis_url, result_backend=redis_url, worker_prefetch_multiplier=1,
                    task_acks_late=True, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)


configure(os.environ.get(REDIS_URL_ENV))


@app.task(name="bench.noop")
def noop() -> str:
    return "ok"


@app.task(name="bench.cat")
def cat() -> str:
    """The same trivial job fleet runs (`cat` of the payload), as a host
    subprocess: no isolation."""
    return subprocess.run(["cat"], input=b"{}", capture_output=True, check=True).stdout.decode()
