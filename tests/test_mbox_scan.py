"""
Tests for L{pop3srv.mbox.scan}, and the round trip through CPython's
C{mailbox.mbox} writer, the scanner and L{MboxMailbox.getMessage}.
"""

from __future__ import annotations

import hashlib
import io
import mailbox
import re
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3srv.mbox import open_maildrop
from pop3srv.mbox import scan as scan_module
from pop3srv.mbox.quoting import unquote
from pop3srv.mbox.scan import MessageRecord, scan_mbox
from pop3srv.mbox.testing import (
    reference_split,
    reference_wire,
    synchronous_defer_to_thread,
)

_PIECES = st.sampled_from(
    [
        b"From ",
        b"From x\n",
        b"\n",
        b"\n\n",
        b"\r\n",
        b"\r\n\r\n",
        b"\r",
        b">",
        b">From ",
        b"a",
        b"F",
        b" ",
        b".",
    ]
)
_MBOX = st.lists(_PIECES, max_size=80).map(b"".join)


def _scan(data: bytes, **kwargs: int) -> list[MessageRecord]:
    return list(scan_mbox(io.BytesIO(data), **kwargs))


def _expected(data: bytes) -> list[MessageRecord]:
    return [
        MessageRecord(
            start=start,
            body_start=body_start,
            end=end,
            size=len(reference_wire(data[body_start:end])),
            digest=hashlib.blake2b(data[start:nxt], digest_size=12).digest(),
        )
        for start, body_start, end, nxt in reference_split(data)
    ]


@settings(deadline=None, max_examples=400)
@given(_MBOX, st.integers(min_value=1, max_value=40))
def test_records_match_reference(data: bytes, chunk_size: int) -> None:
    """
    Offsets, sizes and digests equal those of a whole-buffer reference,
    whatever the chunk size; sizes equal the length of the un-quoted,
    CRLF-normalised content plus the final CRLF fix.  Both digest modes
    agree: a scan without a limit digests in a helper thread, a small
    limited one inline.
    """
    records = _scan(data, chunk_size=chunk_size)
    assert records == _expected(data)
    assert _scan(data, chunk_size=chunk_size, limit=len(data)) == records
    # Ranges queued for the helper thread, every one or only the longer.
    saved = scan_module.OFFLOAD_MIN
    try:
        for offload_min in (1, 3):
            scan_module.OFFLOAD_MIN = offload_min
            assert _scan(data, chunk_size=chunk_size) == records
    finally:
        scan_module.OFFLOAD_MIN = saved
    for rec in records:
        # The same size again, through the production un-quoter.
        text = unquote(data[rec.body_start : rec.end])
        wire = re.sub(rb"(?<!\r)\n", b"\r\n", text)
        fix = 2 if text and not text.endswith(b"\n") else 0
        assert rec.size == len(wire) + fix


@settings(deadline=None, max_examples=200)
@given(st.lists(st.sampled_from([b"From a\n", b"\n", b"x\n", b"From ", b"y"]), max_size=40))
def test_matches_cpython_toc(pieces: list[bytes]) -> None:
    """
    For LF-only files the message boundaries are those of CPython's
    C{mailbox.mbox._generate_toc}.
    """
    data = b"".join(pieces)
    with io.BytesIO(data) as f:
        box = mailbox.mbox.__new__(mailbox.mbox)
        box._file = f  # type: ignore[attr-defined]
        box._generate_toc()  # type: ignore[attr-defined]
        toc = [box._toc[k] for k in sorted(box._toc)]  # type: ignore[attr-defined]
    got = _scan(data, chunk_size=7)
    assert [(r.start, r.end) for r in got] == toc


def test_garbage_before_first_message_skipped() -> None:
    """
    Bytes before the first C{From } line belong to no message.
    """
    data = b"junk\nmore From junk\nFrom a\nbody\n"
    (rec,) = _scan(data)
    assert (rec.start, rec.body_start, rec.end) == (20, 27, 32)
    assert _scan(b"no messages\n") == []
    assert _scan(b"") == []


def test_empty_content_and_missing_newline() -> None:
    """
    A From_ line followed by a blank separator has empty content and size
    0; content without a final LF gets a CRLF counted.
    """
    data = b"From a\n\nFrom b\nabc"
    first, second = _scan(data)
    assert (first.body_start, first.end, first.size) == (7, 7, 0)
    assert (second.body_start, second.end, second.size) == (15, 18, 5)


def test_start_and_limit() -> None:
    """
    Scanning can begin at a message start and stop at a limit offset.
    """
    data = b"From a\nx\n\nFrom b\ny\n\nFrom c\nz\n"
    whole = _scan(data)
    assert _scan(data, start=whole[1].start) == whole[1:]
    limited = _scan(data, limit=whole[2].start)
    assert [r.start for r in limited] == [whole[0].start, whole[1].start]
    assert limited[1] == whole[1]


def test_long_line_bounded_memory(tmp_path: Path) -> None:
    """
    A message whose body is one 8 MiB line is scanned in chunks; peak
    memory stays a small multiple of the chunk size.
    """
    path = tmp_path / "mbox"
    with path.open("wb") as f:
        f.write(b"From a\n")
        for _ in range(8):
            f.write(b"x" * (1 << 20))
        f.write(b"\n\nFrom b\nshort\n")
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            records = list(scan_mbox(f, chunk_size=1 << 18))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.size for r in records] == [(8 << 20) + 2, 7]
    assert peak < 4 << 20


_LINE = st.one_of(
    st.sampled_from([b"From me", b"From ", b".", b"..", b"", b" From x", b"Frommage"]),
    st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(_LINE, max_size=12))
    # Python's writer is mboxo: it quotes "From " but not ">From ", so
    # lines that start with ">+From " cannot survive a round trip.
    lines = [ln for ln in lines if not ln.lstrip(b">").startswith(b"From ") or ln[:1] != b">"]
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = b"Subject: t\n\n" + eol.join(lines)
    if draw(st.booleans()):
        body += eol
    return body


def _normalise(text: bytes) -> bytes:
    if not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\r\n", b"\n")


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(_bodies(), max_size=6), st.integers(min_value=1, max_value=50))
def test_round_trip_through_cpython_writer(
    tmp_path: Path, bodies: list[bytes], read_size: int
) -> None:
    """
    Messages written with C{mailbox.mbox.add} come back through the scanner
    and L{getMessage} byte-exact modulo line ends, and LIST sizes are the
    octets RETR would send.
    """
    # A fresh directory per example: no state files left from the last one.
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    path = work / "rt.mbox"
    box = mailbox.mbox(str(path))
    for body in bodies:
        box.add(body)
    box.close()
    mb = open_maildrop(str(path), index_dir=str(work), defer_to_thread=synchronous_defer_to_thread)
    try:
        sizes = mb.listMessages()
        assert isinstance(sizes, list)
        assert len(sizes) == len(bodies)
        for i, body in enumerate(bodies):
            reader = mb.getMessage(i)
            parts = []
            while chunk := reader.read(read_size):
                parts.append(chunk)
            content = b"".join(parts)
            assert _normalise(content) == _normalise(body)
            wire = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if content and not content.endswith(b"\n"):
                wire += b"\r\n"
            assert sizes[i] == len(wire)
    finally:
        mb.close()


_RUN_MBOX = st.lists(
    st.sampled_from(
        [
            b"From x\n",
            b"From ",
            b"\n",
            b"\r\n",
            b"\r",
            b"a",
            b">" * 999,
            b">" * 1000,
            b">" * 1001,
            b">From ",
        ]
    ),
    max_size=24,
).map(b"".join)


@settings(deadline=None, max_examples=150)
@given(_RUN_MBOX, st.integers(min_value=1, max_value=2100))
def test_quote_runs_across_chunks(data: bytes, chunk_size: int) -> None:
    """
    Quote runs at and beyond the cap, CRs and From_ lines split anywhere by
    the chunking still give the reference records (the scanner holds back
    an undecided line start, however long, and a CR whose LF is not read
    yet).
    """
    assert _scan(data, chunk_size=chunk_size) == _expected(data)


def test_reader_block_and_read_sizes_do_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    L{MessageReader} gives the same bytes whatever its internal block size
    and whatever sizes the caller asks for.
    """
    from pop3srv.mbox import mailbox as mailbox_module

    body = b"".join(b">From %d\n.line %d\n" % (i, i) + b"x" * (i % 50) + b"\n" for i in range(300))
    path = tmp_path / "mbox"
    path.write_bytes(b"From a\n" + body + b"\nFrom b\nshort\n")
    expected = unquote(body)
    for block in (1, 7, 64, 4096, 1 << 20):
        monkeypatch.setattr(mailbox_module, "READ_CHUNK", block)
        for size in (1, 5, 100, 65536):
            work = tmp_path / f"w{block}-{size}"
            work.mkdir()
            mb = open_maildrop(
                str(path), index_dir=str(work), defer_to_thread=synchronous_defer_to_thread
            )
            try:
                reader = mb.getMessage(0)
                parts = []
                while chunk := reader.read(size):
                    assert len(chunk) <= size
                    parts.append(chunk)
                assert b"".join(parts) == expected
                assert mb.getMessage(0).read() == expected
            finally:
                mb.close()
