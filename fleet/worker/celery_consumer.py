"""Celery's worker consumer as fleet's consumers run it: task events sent in
batches, and no message it cannot read ever stops it or goes unrecorded.

Events. Celery publishes the events it has buffered on every turn of its
event loop: with fleet's few slots that is one Redis round trip for almost
every event (received, started, the outcome), which measured as the largest
cost events add to a consumer (docs/performance.md). Here the buffer is
flushed at most every EVENT_BATCH_S: one `task.multi` message (Celery's own
batch format, which Flower and `celery events` read) carries what gathered
meanwhile. An event reaches Flower up to that much later; no task waits.

Unreadable messages. Anyone who may publish can put a message on an agent's
queue that Celery's own parser raises on (a body that is not a list, an id
that is a list, a `timelimit` that is a word): Celery calls that an
unrecoverable error, the consumer dies, the message goes back to the head of
the queue, and every consumer of the agent dies on it in turn. Here such a
message is dropped and recorded `rejected` (the runner's `reject_unreadable`,
given as the app's `fleet_unreadable` setting), like the messages Celery
itself refuses (an unknown task name, an undecodable body). And a message's
`expires` is removed before Celery reads it: an expired message would put its
id in Celery's revoked set, where every later message of that task (fleet's
own retries too) is discarded for hours — a revoke nobody may send."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from vine import promise

log = logging.getLogger("fleet.worker")

EVENT_BATCH_S = 0.25

# Record an unreadable message: (its id as the message gave it, why).
RecordUnreadable = Callable[[Any, str], None]


def message_id(message: Any) -> Any:
    headers = getattr(message, "headers", None)
    return headers.get("id") if isinstance(headers, dict) else None


class FleetConsumer(Consumer):
    """Celery's consumer, its task events batched and its unreadable
    messages recorded rather than fatal (see the module)."""

    hub: Any  # Celery's event loop (set when the consumer starts); untyped in celery-types
    connection_errors: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A flush is planned: later events join it without waking the loop.
        # (Read and set across threads without a lock: a race costs at most
        # one more planned flush, never a lost one, since it is cleared
        # before the buffer is read.)
        self._planned = False
        self._plan = promise(self._plan_flush)  # one object: queued once per loop turn

    # -- events ----------------------------------------------------------------

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

    # -- messages it cannot read -----------------------------------------------

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            headers = getattr(message, "headers", None)
            if isinstance(headers, dict):
                headers.pop("expires", None)
            try:
                return handle(message)
            except Exception as error:  # what Celery's parser raises on: never the consumer's end
                message.reject_log_error(log, self.connection_errors)
                self.record_unreadable(message, f"Celery cannot read it: {type(error).__name__}: {error}")
                return None

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        super().on_unknown_message(body, message)
        self.record_unreadable(message, "it is not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Any) -> None:
        super().on_unknown_task(body, message, exc)
        self.record_unreadable(message, f"task name {message.headers.get('task')!r:.80} is not fleet's")

    def on_invalid_task(self, body: Any, message: Any, exc: Any) -> None:
        super().on_invalid_task(body, message, exc)
        self.record_unreadable(message, f"Celery refused it: {exc}")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)
        self.record_unreadable(message, f"its body cannot be decoded: {type(exc).__name__}")

    def record_unreadable(self, message: Any, why: str) -> None:
        record: RecordUnreadable | None = self.app.conf.get("fleet_unreadable")
        if record is None:
            return
        try:
            record(message_id(message), why[:300])
        except Exception as error:  # Redis away: the message is gone all the same, and logged
            log.error("an unreadable message (%s) could not be recorded: %s", why[:300], error)
