"""Token values are masked in output in the shapes tools print them: raw,
JSON-escaped, base64 at every offset (Basic credentials), URL-safe and
wrapped base64, hex, URL-encoded; across chunks and across stdout/stderr; a
property test generates tokens and shapes and finds none that gets through."""

from __future__ import annotations

import base64
import html
import json
import random
import textwrap
from collections.abc import Callable
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.credentials.masking import MASK, MAX_PENDING, Masker, StreamMasker, base32_cores, base64_cores

TOKEN = b"ghp_s3cr3t/value+with=odd&chars"


def run(masker: Masker, pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    streams = StreamMasker(masker)
    out = [p for stream, text in pieces for p in streams.feed(stream, text)]
    return out + streams.close()


def text_of(pieces: list[tuple[str, str]]) -> str:
    return "".join(text for _, text in pieces)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def json_escaped(value: str, rng: random.Random) -> str:
    """The value as JSON with some characters written as \\uXXXX."""
    return "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else json.dumps(c)[1:-1] for c in value)


# Each shape: how a tool might print the token (bytes) inside a line.
SHAPES: dict[str, Callable[[bytes, random.Random], str]] = {
    "raw": lambda t, r: t.decode(),
    "json": lambda t, r: json.dumps({"token": t.decode()}),
    "json-escaped": lambda t, r: '{"token": "' + json_escaped(t.decode(), r) + '"}',
    "json-all-escaped": lambda t, r: json.dumps({"token": t.decode()}, ensure_ascii=True).replace(
        t.decode()[0], f"\\u{ord(t.decode()[0]):04x}"),
    "base64": lambda t, r: b64(t),
    "base64-newline": lambda t, r: b64(t + b"\n"),
    "base64-unpadded": lambda t, r: b64(t).rstrip("="),
    "base64-offset-1": lambda t, r: b64(b"x" + t + b"yz"),
    "base64-offset-2": lambda t, r: b64(b"xy" + t),
    "basic-auth": lambda t, r: "Authorization: Basic " + b64(b"x-access-token:" + t),
    "basic-auth-user": lambda t, r: "Authorization: Basic " + b64(b"user:" + t),
    "urlsafe": lambda t, r: base64.urlsafe_b64encode(b"a" + t).decode().rstrip("="),
    "wrapped-76": lambda t, r: "\n".join(textwrap.wrap(b64(b"-" * 70 + t + b"-" * 40), 76)),
    "wrapped-64": lambda t, r: "\n".join(textwrap.wrap(b64(b"." * 45 + t), 64)),
    "hex": lambda t, r: t.hex(),
    "HEX": lambda t, r: t.hex().upper(),
    "url": lambda t, r: quote(t.decode(), safe=""),
    "url-lower": lambda t, r: quote(t.decode(), safe="").lower(),
    "url-path": lambda t, r: "https://h/x?t=" + quote(t.decode()),
    "url-every-byte": lambda t, r: "".join(f"%{b:02X}" for b in t),
    "url-some-bytes": lambda t, r: "".join(f"%{b:02x}" if r.random() < 0.5 else chr(b) for b in t),
    "html-entities": lambda t, r: "".join(f"&#{b};" if r.random() < 0.5 else f"&#x{b:x};" for b in t),
    "xxd-hex-wrapped": lambda t, r: "\n".join(textwrap.wrap((b"xx" + t).hex(), 60)),
    "base32": lambda t, r: base64.b32encode(b"abc" + t).decode(),
    "utf-16le": lambda t, r: (t.decode() + "!").encode("utf-16-le").decode(),
    "wrapped-long-basic": lambda t, r: "\n".join(textwrap.wrap(b64(b"user:" + t * 4), 64)),
}


def leaks(token: bytes, out: str) -> list[str]:
    """The encodings of `token` still readable in `out`."""
    flat = out.replace("\n", "")
    found = [form for form in (token.decode(), token.hex(), token.hex().upper(),
                               quote(token.decode(), safe="")) if form in out]
    found += [core for core in base64_cores(token) | base32_cores(token) if len(core) >= 8 and core in flat]
    decoded = html.unescape(unquote(flat)).replace("\x00", "")  # entities, %XX, UTF-16's zero bytes
    found += [f"decoded: {token.decode()}"] if token.decode() in decoded else []
    found += [f"hex: {token.hex()}"] if token.hex() in flat.lower() else []
    return found


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_is_masked(shape: str) -> None:
    printed = SHAPES[shape](TOKEN, random.Random(7))
    out = text_of(run(Masker([TOKEN]), [("stdout", f"before {printed} after\n")]))
    assert MASK in out
    assert leaks(TOKEN, out) == []
    assert out.startswith("before ") and out.endswith(" after\n")


def test_a_value_split_across_chunks_is_caught() -> None:
    text = f"token={TOKEN.decode()}\nnext line\n"
    for cut in range(1, len(text)):
        out = text_of(run(Masker([TOKEN]), [("stdout", text[:cut]), ("stdout", text[cut:])]))
        assert out == f"token={MASK}\nnext line\n"


def test_a_value_with_a_trailing_line_end_in_its_file_is_masked_as_printed() -> None:
    out = text_of(run(Masker([TOKEN + b"\r\n"]), [("stdout", f"token {TOKEN.decode()} ok\n")]))
    assert out == f"token {MASK} ok\n"


def test_a_value_split_across_stdout_and_stderr_is_caught() -> None:
    half = len(TOKEN) // 2
    out = run(Masker([TOKEN]), [("stdout", "a " + TOKEN[:half].decode()),
                                ("stderr", TOKEN[half:].decode() + " b\n")])
    assert leaks(TOKEN, text_of(out)) == [] and TOKEN[half:].decode() not in text_of(out)
    assert out == [("stdout", "a " + MASK), ("stderr", " b\n")]


def test_streams_keep_their_order_and_names() -> None:
    out = run(Masker([TOKEN]), [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")])
    assert out == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]


def test_a_wrapped_base64_line_waits_for_the_next() -> None:
    lines = textwrap.wrap(b64(b"-" * 70 + TOKEN), 76)
    streams = StreamMasker(Masker([TOKEN]))
    first = streams.feed("stdout", lines[0] + "\n")
    assert first == []  # it may go on in the next line
    rest = streams.feed("stdout", "\n".join(lines[1:]) + "\nplain\n") + streams.close()
    assert leaks(TOKEN, text_of(first + rest)) == []


def test_a_token_added_later_masks_what_is_still_held() -> None:
    new = b"rotated-token-value-42"
    masker = Masker([TOKEN])
    streams = StreamMasker(masker)
    held = streams.feed("stdout", "partial " + new.decode())
    masker.add([new])
    out = held + streams.feed("stdout", " end\n") + streams.close()
    assert text_of(out) == f"partial {MASK} end\n"


def test_a_line_longer_than_the_buffer_is_released_masked() -> None:
    streams = StreamMasker(Masker([TOKEN]))
    filler = "x" * (MAX_PENDING + 10 - 7)
    released = streams.feed("stdout", filler + TOKEN.decode()[:7])  # the value starts at the cut
    assert released and TOKEN.decode()[:7] not in text_of(released)
    out = text_of(released + streams.feed("stdout", TOKEN.decode()[7:] + "\n") + streams.close())
    assert TOKEN.decode() not in out and out.endswith(MASK + "\n")


def test_output_without_tokens_passes_through_at_once() -> None:
    assert run(Masker([]), [("stdout", "a"), ("stdout", "b\n")]) == [("stdout", "a"), ("stdout", "b\n")]
    assert text_of(run(Masker([TOKEN]), [("stdout", "partial line")])) == "partial line"


def test_ordinary_text_is_left_alone() -> None:
    text = "hello world, the build passed in 3.2 s; base64 of nothing: aGVsbG8=\n"
    assert text_of(run(Masker([TOKEN]), [("stdout", text)])) == text


# -- the property -----------------------------------------------------------

TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=st.text(TOKEN_CHARS, min_size=12, max_size=64), shape=st.sampled_from(sorted(SHAPES)),
       seed=st.integers(0, 2**32), cuts=st.lists(st.integers(0, 400), max_size=4),
       split_streams=st.booleans())
def test_no_shape_of_a_random_token_gets_through(token: str, shape: str, seed: int, cuts: list[int],
                                                 split_streams: bool) -> None:
    value = token.encode()
    rng = random.Random(seed)
    line = f"log: {SHAPES[shape](value, rng)} done\n"
    pieces, start = [], 0
    for n, cut in enumerate(sorted({c % len(line) for c in cuts} - {0})):
        stream = "stderr" if split_streams and n % 2 else "stdout"
        pieces.append((stream, line[start:cut]))
        start = cut
    pieces.append(("stdout", line[start:]))
    out = text_of(run(Masker([value]), pieces))
    assert leaks(value, out) == [], (shape, out)
