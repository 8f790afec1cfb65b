"""
Tests for L{pop3srv.mbox.quoting}.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3srv.mbox.quoting import MAX_CARRY, MboxUnquoter, QuotedLineCounter, unquote
from pop3srv.mbox.testing import reference_unquote

# Pieces that make quoting cases likely: quote runs, From, line ends.
_PIECES = st.sampled_from(
    [b"From ", b">", b">>", b">From ", b"\n", b"\r\n", b"\r", b"x", b"F", b"Fro", b" ", b"."]
)
_CONTENT = st.lists(_PIECES, max_size=60).map(b"".join)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _feed_all(chunks: list[bytes]) -> bytes:
    unquoter = MboxUnquoter()
    return b"".join(unquoter.feed(c) for c in chunks) + unquoter.finish()


@settings(deadline=None, max_examples=300)
@given(_CONTENT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_chunking_does_not_matter(content: bytes, cuts: list[int]) -> None:
    """
    However the content is split, the output equals the line-by-line
    reference applied to the whole.
    """
    expected = reference_unquote(content)
    assert _feed_all(_chunked(content, cuts)) == expected
    assert _feed_all([content[i : i + 1] for i in range(len(content))]) == expected
    assert unquote(content) == expected


@settings(deadline=None, max_examples=200)
@given(_CONTENT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_counter_matches_unquoter(content: bytes, cuts: list[int]) -> None:
    """
    L{QuotedLineCounter} counts exactly the octets the un-quoter removes.
    """
    counter = QuotedLineCounter()
    count = sum(counter.feed(c) for c in _chunked(content, cuts)) + counter.finish()
    assert count == len(content) - len(unquote(content))


def test_mboxrd_examples() -> None:
    """
    One C{>} is removed from C{>From } and C{>>From } lines at a line start;
    other lines are untouched and line ends stay as stored.
    """
    raw = b">From a\r\n>>From b\nx>From c\n>From\n>Frm d\nFrom e\n"
    assert unquote(raw) == b"From a\r\n>From b\nx>From c\n>From\n>Frm d\nFrom e\n"


def test_quote_run_cap() -> None:
    """
    A run of 1000 C{>} is un-quoted; a run of 1001 is left alone, whether
    or not it is split across chunks.
    """
    ok = b">" * 1000 + b"From x\n"
    too_long = b">" * 1001 + b"From x\n"
    assert unquote(ok) == ok[1:]
    assert unquote(too_long) == too_long
    for cut in (1, 999, 1000, 1001, 1003):
        assert _feed_all([ok[:cut], ok[cut:]]) == ok[1:]
        assert _feed_all([too_long[:cut], too_long[cut:]]) == too_long


def test_carry_is_bounded() -> None:
    """
    Feeding an ambiguous line start returns everything but at most
    C{MAX_CARRY} bytes; a longer run of C{>} is released at once.
    """
    unquoter = MboxUnquoter()
    out = unquoter.feed(b"line\n" + b">" * 1000 + b"From")
    assert out == b"line\n"
    assert len(unquoter.finish()) <= MAX_CARRY
    unquoter = MboxUnquoter()
    assert unquoter.feed(b">" * 2000) == b">" * 2000


def test_finish_resets() -> None:
    """
    After L{MboxUnquoter.finish} the transform starts a fresh message at a
    line start.
    """
    unquoter = MboxUnquoter()
    assert unquoter.feed(b"abc") == b"abc"
    assert unquoter.finish() == b""
    assert unquoter.feed(b">From x\n") == b"From x\n"


_RUN_PIECES = st.sampled_from(
    [b">" * 999, b">" * 1000, b">" * 1001, b">", b"From ", b"From", b"\n", b"\r\n", b"x"]
)


@settings(deadline=None, max_examples=200)
@given(
    st.lists(_RUN_PIECES, max_size=12).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=5_000), max_size=8),
)
def test_long_runs_and_chunks_without_quotes(content: bytes, cuts: list[int]) -> None:
    """
    Quote runs at and around the cap, split anywhere, and chunks with no
    C{>} at all (the pass-through path) give the reference output; the
    counter agrees.
    """
    expected = reference_unquote(content)
    chunks = _chunked(content, cuts)
    assert _feed_all(chunks) == expected
    counter = QuotedLineCounter()
    count = sum(counter.feed(c) for c in chunks) + counter.finish()
    assert count == len(content) - len(expected)


def test_chunk_without_quote_is_passed_through() -> None:
    """
    A chunk with no C{>} is returned as the same object (no copy), and the
    line state it leaves is used for the next chunk.
    """
    unquoter = MboxUnquoter()
    chunk = b"no quotes here\nnor here"
    assert unquoter.feed(chunk) is chunk
    # Mid-line now: a ">From " continuing that line is not a line start.
    assert unquoter.feed(b">From x\n>From y\n") == b">From x\nFrom y\n"
    assert unquoter.finish() == b""
