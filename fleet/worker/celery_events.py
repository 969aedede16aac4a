"""Celery's worker consumer, its task events sent in batches. Celery
publishes the events it has buffered on every turn of its event loop: with
fleet's few slots that is one Redis round trip for almost every event
(received, started, the outcome), which measured as the largest cost events
add to a consumer. Here the buffer is flushed at most every EVENT_BATCH_S:
one `task.multi` message (Celery's own batch format, which Flower and
`celery events` read) carries what gathered meanwhile. An event reaches
Flower up to that much later; the task does not wait for it."""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer
from vine import promise

EVENT_BATCH_S = 0.25


class BatchingConsumer(Consumer):
    """Celery's consumer whose buffered task events go out together, at most every EVENT_BATCH_S."""

    hub: Any  # Celery's event loop (set when the consumer starts); untyped in celery-types

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A flush is planned: later events join it without waking the loop.
        # (Read and set across threads without a lock: a race costs at most
        # one more planned flush, never a lost one, since it is cleared
        # before the buffer is read.)
        self._planned = False
        self._plan = promise(self._plan_flush)  # one object: queued once per loop turn

    def on_send_event_buffered(self) -> None:  # type: ignore[override]
        """An event was buffered (from any thread): have the loop thread plan a flush."""
        if self.hub and not self._planned:
            self._planned = True
            self.hub.call_soon(self._plan)

    def _plan_flush(self) -> None:
        self.hub.call_later(EVENT_BATCH_S, self._flush_batch)

    def _flush_batch(self) -> None:
        self._planned = False
        Consumer._flush_events(self)  # type: ignore[attr-defined]
