"""The channel's protocol as the host reads it: what the supervisor may send,
checked message by message. The container is hostile: whatever arrives
is bounded in size and must be one of the messages `fleet/inside/supervisor.py`
sends, with fields of the right types — anything else is a violation, and
the channel ends (its container is then no longer trusted)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fleet.errors import EngineError

# One message. Output travels in chunks of at most 64 KiB, base64 in JSON: ~88 KiB.
MAX_LINE = 256 * 1024

# Each message type and its fields (bool is not an int here).
MESSAGES: dict[str, dict[str, type]] = {
    "ready": {"pid": int},
    "pong": {"nonce": str},
    "out": {"id": str, "s": str, "d": str},
    "exit": {"id": str, "code": int, "left": int},
    "killed": {"ref": str, "n": int},
}
STREAMS = ("stdout", "stderr")


class ProtocolViolation(EngineError):
    """The supervisor's end sent something the protocol does not allow."""


def parse_message(line: bytes) -> dict[str, Any]:
    """One message, checked; ProtocolViolation if it is not one the supervisor sends."""
    try:
        message = json.loads(line)
    except ValueError:
        raise ProtocolViolation(f"not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict) or message.get("t") not in MESSAGES:
        raise ProtocolViolation(f"not a message of the protocol: {line[:80]!r}")
    for field, kind in MESSAGES[message["t"]].items():
        value = message.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolViolation(f"{message['t']!r} message with a bad {field!r}: {value!r:.80}")
    if message["t"] == "out":
        if message["s"] not in STREAMS:
            raise ProtocolViolation(f"output on an unknown stream {message['s']!r:.40}")
        try:
            message["d"] = base64.b64decode(message["d"], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolViolation("output that is not base64") from None
    return message


class LineReader:
    """Splits the supervisor's stdout into lines, refusing one longer than
    MAX_LINE; each byte is scanned once, whatever the chunks."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        scanned = len(self._buffer)  # what is buffered holds no line break
        self._buffer += data
        lines, start = [], 0
        while (end := self._buffer.find(b"\n", max(start, scanned))) >= 0:
            lines.append(bytes(self._buffer[start:end]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.limit:
            raise ProtocolViolation(f"a message longer than {self.limit} bytes")
        return lines
