"""Recording a running task's output into its event stream, within the size
limit, while keeping the last line of each stream for the job protocol."""

from __future__ import annotations

import codecs

from fleet.store import TaskStore

TAIL_LIMIT = 1024 * 1024  # the result line must fit
TRUNCATED = "\n[fleet: output truncated at the log limit]\n"


class OutputRecorder:
    def __init__(self, store: TaskStore, task_id: str, limit: int) -> None:
        self.store = store
        self.task_id = task_id
        self.remaining = limit
        self.truncated = False
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace")
                          for s in ("stdout", "stderr")}
        self._tails = {"stdout": "", "stderr": ""}

    def write(self, stream: str, data: bytes) -> None:
        text = self._decoders[stream].decode(data)
        self._remember_tail(stream, text)
        self._store(stream, text)

    def _store(self, stream: str, text: str) -> None:
        if not text or self.truncated:
            return
        if len(text) > self.remaining:
            text = text[: self.remaining] + TRUNCATED
            self.truncated = True
        self.remaining -= len(text)
        self.store.append_output(self.task_id, stream, text)

    def _remember_tail(self, stream: str, text: str) -> None:
        # Only the last complete line matters, and it may span chunks.
        tail = (self._tails[stream] + text)[-TAIL_LIMIT:]
        self._tails[stream] = tail

    def last_line(self, stream: str) -> str:
        lines = [line for line in self._tails[stream].splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""
