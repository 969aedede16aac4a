"""Token values are masked in output: raw, base64, URL-encoded, across chunks."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from fleet.credentials.masking import MASK, MAX_PENDING, Masker

TOKEN = b"ghp_s3cr3t/value+with=odd&chars"


def run(masker: Masker, chunks: list[str]) -> str:
    return "".join(masker.feed(c) for c in chunks) + masker.flush()


@pytest.mark.parametrize("form", [
    TOKEN.decode(),
    base64.b64encode(TOKEN).decode(),
    base64.b64encode(TOKEN + b"\n").decode(),
    base64.b64encode(TOKEN).decode().rstrip("="),
    base64.urlsafe_b64encode(TOKEN).decode().rstrip("="),
    quote(TOKEN.decode(), safe=""),
])
def test_each_form_is_masked(form: str) -> None:
    out = run(Masker([TOKEN]), [f"before {form} after\n"])
    assert out == f"before {MASK} after\n"


def test_a_value_split_across_chunks_is_caught() -> None:
    text = f"token={TOKEN.decode()}\nnext line\n"
    for cut in range(1, len(text)):
        out = run(Masker([TOKEN]), [text[:cut], text[cut:]])
        assert TOKEN.decode() not in out and out == f"token={MASK}\nnext line\n"


def test_a_line_longer_than_the_buffer_is_released_masked() -> None:
    masker = Masker([TOKEN])
    filler = "x" * (MAX_PENDING + 10 - 7)
    released = masker.feed(filler + TOKEN.decode()[:7])  # the value starts at the cut
    assert TOKEN.decode()[:7] not in released
    out = released + masker.feed(TOKEN.decode()[7:] + "\n") + masker.flush()
    assert TOKEN.decode() not in out and out.endswith(MASK + "\n")


def test_output_without_tokens_passes_through() -> None:
    assert run(Masker([]), ["a", "b\n"]) == "ab\n"
    assert run(Masker([TOKEN]), ["partial line"]) == "partial line"
