"""Masking token values in captured output, the last line of defence.

The control is that nothing but the token file holds a token; masking only
catches an agent that prints its own token. Each value is looked for raw,
base64-encoded (with and without a trailing newline, standard and URL-safe
alphabets) and URL-encoded. Output is masked line by line, so a value split
across two chunks of output is still caught; a line longer than
`MAX_PENDING` is masked and released in pieces, keeping enough of its tail to
catch a value that straddles the cut."""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

MASK = "[masked]"
MAX_PENDING = 64 * 1024


def encodings(value: bytes) -> set[str]:
    forms = {value, value + b"\n"}
    found = set()
    for form in forms:
        found.add(base64.b64encode(form).decode())
        found.add(base64.b64encode(form).decode().rstrip("="))
        found.add(base64.urlsafe_b64encode(form).decode().rstrip("="))
    text = value.decode("utf-8", "replace")
    found |= {text, quote(text, safe=""), quote(text)}
    return {f for f in found if len(f) >= 4}


class Masker:
    def __init__(self, values: list[bytes]) -> None:
        patterns = sorted({form for value in values if value for form in encodings(value)},
                          key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, patterns))) if patterns else None
        self._keep = max((len(p) for p in patterns), default=1) - 1
        self._pending = ""

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern else text

    def feed(self, text: str) -> str:
        """Masked text that is safe to release now; the rest waits for more."""
        if self._pattern is None:
            return text
        self._pending += text
        cut = self._pending.rfind("\n") + 1
        if cut:
            released, self._pending = self.mask(self._pending[:cut]), self._pending[cut:]
            return released
        if len(self._pending) <= MAX_PENDING:
            return ""
        # An over-long line: mask what is here, hold back a tail as long as
        # the longest pattern less one, where a value cut short may begin.
        masked = self.mask(self._pending)
        released, self._pending = masked[: -self._keep or None], masked[len(masked) - self._keep:]
        return released

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return self.mask(rest)
