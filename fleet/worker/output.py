"""Recording a running task's output into its event stream, masked, within
the size limit, while keeping the last line of each stream for the job
protocol (the result is stdout's last line, after masking).

stdout and stderr are masked as one interleaved text (a value split between
them is caught); before each chunk the token files are looked at again, so a
token rotated while the attempt runs is masked from then on, old and new."""

from __future__ import annotations

import codecs
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from fleet.credentials.masking import Masker, StreamMasker
from fleet.errors import StaleTransition, StateStoreError
from fleet.state.events import EventStreams

log = logging.getLogger(__name__)

TAIL_LIMIT = 1024 * 1024  # the result line must fit
TRUNCATED = "\n[fleet: output truncated at the log limit]\n"
STREAMS = ("stdout", "stderr")


class OutputRecorder:
    def __init__(self, events: EventStreams, task_id: str, epoch: int, limit: int,
                 secrets: Iterable[bytes] = (),
                 rotated: Callable[[], Iterable[bytes]] | None = None) -> None:
        self.events = events
        self.task_id = task_id
        self.epoch = epoch  # the attempt: output is refused once the task has moved on
        self.refused = False
        self.remaining = limit
        self.truncated = False
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS}
        self.masker = Masker(secrets)
        # Masked as one interleaved text, then each stream again on its own:
        # a reader of one stream alone must not see a value the other broke up.
        self._streams = StreamMasker(self.masker)
        self._each = {s: StreamMasker(self.masker) for s in STREAMS}
        self._rotated = rotated  # values of tokens rotated since the last call (usually none)
        self._tails: dict[str, deque[str]] = {s: deque() for s in STREAMS}
        self._tail_sizes = dict.fromkeys(STREAMS, 0)
        self._unsent: list[tuple[str, str]] = []

    def write(self, stream: str, data: bytes) -> None:
        if self._rotated is not None:
            self.masker.add(self._rotated())
        for piece in self._streams.feed(stream, self._decoders[stream].decode(data)):
            self._pass_on(*piece)

    def close(self) -> None:
        """Release what the masker holds back (an unfinished last line)."""
        for stream in STREAMS:
            for piece in self._streams.feed(stream, self._decoders[stream].decode(b"", True)):
                self._pass_on(*piece)
        for piece in self._streams.close():
            self._pass_on(*piece)
        for masker in self._each.values():
            for piece in masker.close():
                self._record(*piece)
        self._send()

    def _pass_on(self, stream: str, text: str) -> None:
        for piece in self._each[stream].feed(stream, text):
            self._record(*piece)

    def flush(self) -> None:
        """Store what still waits for Redis; StateStoreError while it is away."""
        if self._send() is not None:
            raise StateStoreError(f"task {self.task_id}: output not stored yet")

    def _record(self, stream: str, text: str) -> None:
        if not text:
            return
        tail = self._tails[stream]  # recent pieces, at least TAIL_LIMIT long, no copy per piece
        tail.append(text)
        self._tail_sizes[stream] += len(text)
        while self._tail_sizes[stream] - len(tail[0]) >= TAIL_LIMIT:
            self._tail_sizes[stream] -= len(tail.popleft())
        if self.truncated:
            return
        if len(text) > self.remaining:
            text = text[: self.remaining] + TRUNCATED
            self.truncated = True
        self.remaining -= len(text)
        self._unsent.append((stream, text))
        self._send()

    def _send(self) -> StateStoreError | None:
        """Store what is waiting, in order. While Redis is away the output
        waits here (the task goes on) and is stored when it is back; once
        the task has moved to another attempt, it is refused and dropped."""
        while self._unsent and not self.refused:
            stream, text = self._unsent[0]
            try:
                self.events.append_output(self.task_id, self.epoch, stream, text)
            except StateStoreError as error:
                log.warning("task %s: output kept until Redis answers: %s", self.task_id, error)
                return error
            except StaleTransition as refused:
                log.error("task %s: output of attempt %d refused, dropped: %s", self.task_id,
                          self.epoch, refused)
                self.refused = True
                self._unsent.clear()
            else:
                self._unsent.pop(0)
        return None

    def last_line(self, stream: str) -> str:
        """The stream's last line, masked. On stdout a JSON line (the result)
        is masked again after decoding: a value JSON spelled some other way
        than the masker looks for does not reach the result either."""
        lines = [line for line in "".join(self._tails[stream])[-TAIL_LIMIT:].splitlines() if line.strip()]
        line = lines[-1].strip() if lines else ""
        if stream != "stdout" or not self.masker.active:
            return line
        try:
            value = json.loads(line)
        except ValueError:
            return line
        masked = self._mask_decoded(value)
        return line if masked == value else json.dumps(masked)

    def _mask_decoded(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.masker.mask(value)
        if isinstance(value, list):
            return [self._mask_decoded(v) for v in value]
        if isinstance(value, dict):
            return {self.masker.mask(k): self._mask_decoded(v) for k, v in value.items()}
        return value
