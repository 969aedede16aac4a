"""Masking token values in captured output, the last line of defence.

The control is that nothing but the token file holds a token; masking only
catches an agent that prints its own token. Each value is looked for in the
shapes real tools print it in:

- raw, and in JSON with any of its characters written as `\\uXXXX` (or
  `\\/`, `\\"`, `\\\\`);
- base64 at each of the three byte offsets it can sit at inside a longer
  encoded string (so `Authorization: Basic base64("user:" + token)` is
  caught), standard and URL-safe alphabets, with or without padding, and
  wrapped across lines (`base64` wraps at 76 columns, PEM at 64);
- hex, lower and upper case;
- URL-encoded (`%2F` and `%2f`).

`StreamMasker` masks stdout and stderr as one interleaved text, so a value
split across the two streams, or across chunks, is caught; text is released
a line at a time, and a line that looks like wrapped base64 waits for the
next. New values (a token rotated during the attempt) can be added at any
time; what has not been released yet is masked with them too."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote

MASK = "[masked]"
MAX_PENDING = 64 * 1024
MIN_FORM = 4  # shorter forms would mask ordinary text
# A line that ends in this much base64 may be wrapped base64 going on in the
# next line (base64 wraps at 76 columns, PEM at 64; a 40-digit hex hash is shorter).
B64_LINE_END = re.compile(r"[A-Za-z0-9+/=_-]{48,}\r?$")
WRAP = r"(?:\r?\n)?"  # a line break a wrapping tool may put between two characters


def base64_cores(value: bytes) -> set[str]:
    """The part of the base64 of `prefix + value + suffix` that depends on
    `value` alone, for each of the three lengths of prefix mod 3, in both
    alphabets: whatever surrounds the value, its encoding contains these."""
    cores = set()
    for offset in range(3):
        start = -(-8 * offset // 6)  # the first character made of the value's bits only
        end = 8 * (offset + len(value)) // 6  # one past the last such character
        encoded = base64.b64encode(b"\0" * offset + value + b"\0\0").decode()
        core = encoded[start:end]
        cores |= {core, core.translate(str.maketrans("+/", "-_"))}
    return cores


def hex_digits(number: int, width: int) -> str:
    """A pattern for `number` in hex, either case."""
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in f"{number:0{width}x}")


def escaped_spelling(text: str) -> str:
    """A pattern for `text` with each character as itself or escaped the
    ways JSON (`\\u00e9`, `\\/`), URLs (`%2F`, any character, either case)
    and HTML (`&#47;`, `&#x2f;`) write it, in any mix."""
    parts = []
    for char in text:
        code = ord(char)
        escapes = [re.escape(char), rf"&#0*{code};", rf"&#[xX]0*{hex_digits(code, 1)};"]
        if code < 0x10000:
            escapes.append(r"\\u" + hex_digits(code, 4))
        escapes += ["%" + hex_digits(byte, 2) for byte in [char.encode()[0]] if len(char.encode()) == 1]
        if char in '/"\\':
            escapes.append(re.escape("\\" + char))
        parts.append(f"(?:{'|'.join(escapes)})")
    return "".join(parts)


def base32_cores(value: bytes) -> set[str]:
    """As `base64_cores`, for base32 (five byte offsets, 5-bit characters)."""
    cores = set()
    for offset in range(5):
        start = -(-8 * offset // 5)
        end = 8 * (offset + len(value)) // 5
        cores.add(base64.b32encode(b"\0" * offset + value + b"\0" * 4).decode()[start:end])
    return cores


def wrapped(form: str) -> str:
    """A pattern for `form` with a line break allowed between any two characters."""
    return WRAP.join(map(re.escape, form))


def patterns(value: bytes) -> list[str]:
    """Regular expressions for every shape of one value, longest first."""
    text = value.decode("utf-8", "replace")
    shapes = {re.escape(form) for form in (quote(text, safe=""), quote(text))
              if len(form) >= MIN_FORM and form != text}
    shapes |= {wrapped(form) for form in (value.hex(), value.hex().upper())}  # xxd -p wraps at 60
    if len(text) >= MIN_FORM:
        shapes.add(escaped_spelling(text))
        shapes.add("".join(re.escape(char) + "\x00" for char in text))  # UTF-16LE, decoded as UTF-8
    for cores in (base64_cores(value), base64_cores(value + b"\n"), base32_cores(value)):
        shapes |= {wrapped(core) for core in cores if len(core) >= MIN_FORM}
    return sorted(shapes, key=len, reverse=True)


@lru_cache(maxsize=64)
def compiled(values: frozenset[bytes]) -> re.Pattern[str] | None:
    """One pattern for every shape of every value; cached, since an agent's
    tokens are the same task after task and compiling takes milliseconds."""
    shapes = sorted({p for v in values for p in patterns(v)}, key=len, reverse=True)
    return re.compile("|".join(shapes)) if shapes else None


class Masker:
    """Masks the shapes of a set of values in text; values can be added later."""

    def __init__(self, values: Iterable[bytes] = ()) -> None:
        self.values: set[bytes] = set()
        self._pattern: re.Pattern[str] | None = None
        self.longest = 0  # the longest a match can be, in characters
        self.add(values)

    def add(self, values: Iterable[bytes]) -> bool:
        """Mask these values too; True if any was new."""
        new = {form for v in values for form in (v, v.strip()) if form and form not in self.values}
        if not new:
            return False
        self.values |= new
        self._pattern = compiled(frozenset(self.values))
        # A JSON-escaped character is at most 6 long; a wrapped one may carry a line break.
        self.longest = max(8 * len(v) * 2 + 8 for v in self.values)
        return True

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [] if self._pattern is None else [m.span() for m in self._pattern.finditer(text)]

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern else text


class StreamMasker:
    """Masks stdout and stderr as they arrive, as one interleaved text.

    `feed` returns what is safe to release now, as (stream, text) pieces in
    order; `close` releases the rest. A match that spans pieces is replaced
    by one MASK in the piece where it starts."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._pending: list[tuple[str, str]] = []  # (stream, text), oldest first
        self._size = 0

    def feed(self, stream: str, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        if not self.masker.active and not self._pending:
            return [(stream, text)]
        self._pending.append((stream, text))
        self._size += len(text)
        if "\n" not in text and self._size <= MAX_PENDING:
            return []  # nothing can be released before a line ends: no scan
        joined = "".join(t for _, t in self._pending)
        cut = self._release_point(joined)
        return self._release(joined, cut)

    def close(self) -> list[tuple[str, str]]:
        joined = "".join(t for _, t in self._pending)
        return self._release(joined, len(joined))

    def _release_point(self, joined: str) -> int:
        """Up to the last line break; a last line that ends in what may be
        wrapped base64 waits for the next (a value may go on there). Past
        MAX_PENDING, all but a tail as long as the longest match."""
        cut = joined.rfind("\n") + 1
        while cut:  # a run of lines that may be wrapped base64 waits whole
            previous = joined.rfind("\n", 0, cut - 1) + 1
            if not B64_LINE_END.search(joined, previous, cut - 1):
                break
            cut = previous
        if len(joined) - cut > MAX_PENDING:
            cut = max(cut, len(joined) - self.masker.longest)
        return cut

    def _release(self, joined: str, cut: int) -> list[tuple[str, str]]:
        spans = self.masker.spans(joined)
        for start, end in spans:  # never cut through a match: it waits whole
            if start < cut < end:
                cut = start
        spans = [(s, e) for s, e in spans if e <= cut]
        released: list[tuple[str, str]] = []
        position, kept = 0, []
        for stream, text in self._pending:
            start, end = position, position + len(text)
            position = end
            if start >= cut:
                kept.append((stream, text))
                continue
            take = min(end, cut)
            released.append((stream, self._masked_piece(joined, start, take, spans)))
            if take < end:
                kept.append((stream, text[take - start:]))
        self._pending = kept
        self._size = sum(len(t) for _, t in kept)
        merged: list[tuple[str, str]] = []
        for stream, text in released:
            if not text:
                continue
            if merged and merged[-1][0] == stream:
                merged[-1] = (stream, merged[-1][1] + text)
            else:
                merged.append((stream, text))
        return merged

    @staticmethod
    def _masked_piece(joined: str, start: int, end: int, spans: list[tuple[int, int]]) -> str:
        """joined[start:end] with each match in it cut out, MASK where one begins."""
        out, position = [], start
        for s, e in spans:
            if e <= start or s >= end:
                continue
            if s >= position:
                out.append(joined[position:s])
            if s >= start:
                out.append(MASK)
            position = max(position, min(e, end))
        out.append(joined[position:end])
        return "".join(out)
