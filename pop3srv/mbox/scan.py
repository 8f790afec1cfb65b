# -*- test-case-name: tests.test_mbox_scan -*-
"""
Sequential scanner that splits an mbox file into message records.

A message begins at every line that starts with C{From } (at offset 0 or
after an LF).  Its content runs from the end of that line to the next one,
minus a trailing separator: if the two bytes before the next C{From } line
(or EOF) are C{\\n\\n} the last LF is dropped, else if the four bytes before
are C{\\r\\n\\r\\n} the last CRLF is dropped.  This is what CPython's
C{mailbox.mbox._generate_toc} does (plus the CRLF variant).

The scanner reads fixed-size chunks and does all per-byte work with C-speed
bytes and regex operations over offsets of the chunk (no per-line Python
loop, no copies of message slices): one regex pass finds both the message
starts and the mboxrd-quoted lines, C{bytes.count} with bounds gives the LF
and CRLF counts, and the digest is updated with memoryview slices.  On a
big scan the digest runs in a helper thread, one task per chunk, while the
next chunk is searched: hashing is the largest cost and releases the GIL,
so a cold scan of a large mbox takes about a third less time.  A single
long line or a huge message costs no more memory than a chunk plus a short
carry (see L{_undecided_from}).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from pop3srv.mbox.quoting import MAX_QUOTES

#: Bytes read per call.
CHUNK_SIZE = 1 << 20

#: Size of the per-message digest used for UIDLs.
DIGEST_SIZE = 12

#: A scan of at least this many bytes digests in a helper thread.
PARALLEL_DIGEST_MIN = 16 << 20
#: Ranges shorter than this are digested at once: they hold the GIL anyway
#: (hashlib releases it only for larger updates), and queueing them would
#: make the helper thread contend for it.
OFFLOAD_MIN = 16 << 10

# Every line start that matters is an LF followed by some ">" and "From ":
# none is a message start, 1..MAX_QUOTES is a line the un-quoter shortens.
# One pass of this regex (whose literal LF prefix sre searches for at C
# speed) finds both, so the content is not searched twice.
_LINE_FROM = re.compile(rb"\n>*From ")
_FROM_LEN = len(b"\nFrom ")
# A buffer that ends inside a possible match: LF, ">"s, a prefix of "From".
_PARTIAL_TAIL = re.compile(rb">{0,%d}(?:F|Fr|Fro|From)?" % MAX_QUOTES)
# The longest partial tail after its LF; a longer last line is decided.
_MAX_PARTIAL = MAX_QUOTES + len(b"From")
# Raw bytes before a message end that decide its separator.
_HISTORY = 4


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """
    Where one message lies in the mbox and what it looks like on the wire.

    @ivar start: offset of its C{From } line.
    @ivar body_start: offset just after the C{From } line's LF.
    @ivar end: offset where its content ends (before the separator).
    @ivar size: octets RETR sends before the terminating dot: un-quoted
        content with bare LF made CRLF, plus a CRLF if the content is
        non-empty and lacks a final LF.  Dot-stuffing is not counted.
    @ivar digest: blake2b of the raw bytes from C{start} to the next message
        (or EOF), separator included.
    """

    start: int
    body_start: int
    end: int
    size: int
    digest: bytes


class _Message:
    """
    One message while its bytes stream past, as counts.

    @ivar lf: LFs after the C{From } line.
    @ivar crlf: CR LF pairs after the C{From } line.
    @ivar quoted: lines after the C{From } line that lose a C{>}.
    """

    __slots__ = ("body_start", "crlf", "hasher", "lf", "offloaded", "quoted", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.body_start = -1
        self.hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self.lf = 0
        self.crlf = 0
        self.quoted = 0
        self.offloaded = False

    def absorb(self, buf: bytes, lo: int, hi: int, base: int, has_cr: bool, batch: _Batch) -> None:
        """
        Take the raw bytes C{buf[lo:hi]} of this message.

        A CRLF is counted where its CR is, so one whose LF lies just past
        C{hi} is counted here (the caller keeps that byte in C{buf}) and not
        again with the next range.

        @param buf: the current buffer.
        @param lo: first index of the range.
        @param hi: index just past the range.
        @param base: file offset of C{buf[0]}.
        @param has_cr: whether C{buf[lo:hi]} may hold a CR.
        @param batch: where a long range is queued for the digest.
        """
        if lo >= hi:
            return
        if self.offloaded or hi - lo >= OFFLOAD_MIN:
            # Once one range is queued, every later one is, to keep order.
            self.offloaded = True
            batch.append((self.hasher, buf, lo, hi))
        else:
            self.hasher.update(memoryview(buf)[lo:hi])
        if self.body_start < 0:
            nl = buf.find(b"\n", lo, hi)
            if nl < 0:
                return
            self.body_start = base + nl + 1
            lo = nl + 1
        self.lf += buf.count(b"\n", lo, hi)
        if has_cr:
            self.crlf += buf.count(b"\r\n", lo, hi + 1)

    def finish(self, next_start: int, tail: bytes) -> _Finished:
        """
        Close the message at C{next_start} (the next From_ line or EOF).

        @param tail: the last (up to four) raw bytes of the message.
        @return: the record's fields, and the digest still being fed.
        """
        if self.body_start < 0:
            # A From_ line with no LF at EOF: no content at all.
            self.body_start = next_start
        span_len = next_start - self.body_start
        drop_len = drop_lf = drop_crlf = 0
        if tail.endswith(b"\n\n"):
            drop_len, drop_lf = 1, 1
        elif tail == b"\r\n\r\n":
            drop_len, drop_lf, drop_crlf = 2, 1, 1
        content_len = span_len - drop_len
        if content_len <= 0:
            size = 0
            content_len = 0
        else:
            size = content_len - self.quoted + (self.lf - drop_lf) - (self.crlf - drop_crlf)
            if not drop_len and not tail.endswith(b"\n"):
                size += 2
        return (self.start, self.body_start, self.body_start + content_len, size, self.hasher)


#: Digest work queued while a chunk is scanned: (hasher, buffer, lo, hi).
_Batch = list[tuple[Any, bytes, int, int]]
#: A finished message: start, body_start, end, size, and its hasher.
_Finished = tuple[int, int, int, int, Any]


def _digest(batch: _Batch) -> None:
    for hasher, buf, lo, hi in batch:
        hasher.update(memoryview(buf)[lo:hi])


def _records(finished: list[_Finished]) -> Iterator[MessageRecord]:
    for start, body_start, end, size, hasher in finished:
        yield MessageRecord(start, body_start, end, size, hasher.digest())


def _undecided_from(buf: bytes, lo: int) -> int:
    """
    Where the undecided end of C{buf} begins, when more bytes will follow.

    An LF at index C{p} is decided once C{buf} shows whether a
    C{\\n>*From } match starts there (and a CR once its next byte is
    there).  Only the last line can be undecided: everything before its LF
    is complete.

    @return: an index C{>= lo}; C{buf[lo:result]} can be processed now.
    """
    end = len(buf)
    # "\nFrom " and "\r\n" need at most this many bytes after their start.
    decided = max(lo, end - (_FROM_LEN - 1))
    last_nl = buf.rfind(b"\n", max(lo, end - _MAX_PARTIAL - 1))
    if last_nl >= 0 and _PARTIAL_TAIL.fullmatch(buf, last_nl + 1) is not None:
        decided = min(decided, last_nl)
    return decided


def scan_mbox(
    fileobj: BinaryIO,
    start: int = 0,
    limit: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[MessageRecord]:
    """
    Yield a record for each message from C{start} on.

    Bytes before the first C{From } line are skipped silently.

    @param fileobj: a binary file positioned anywhere; it is seeked.
    @param start: a line start to begin at (0, or a message's C{start}).
    @param limit: stop reading at this offset, as if it were EOF.
    @param chunk_size: bytes per read.
    @return: records in file order.
    """
    fileobj.seek(start)
    # Hashing (which releases the GIL) overlaps the scan of the next chunk
    # on a big scan: each chunk's digest work is one task for a helper
    # thread, and a chunk's finished messages are handed out once their
    # task is done.  Small scans, such as an append, hash inline.
    span = None if limit is None else limit - start
    executor = (
        ThreadPoolExecutor(1, thread_name_prefix="pop3srv-digest")
        if span is None or span >= PARALLEL_DIGEST_MIN
        else None
    )
    submit: Callable[[_Batch], Future[None] | None] = (
        (lambda batch: executor.submit(_digest, batch)) if executor else _digest
    )
    waiting: tuple[Future[None] | None, list[_Finished]] = (None, [])
    try:
        # The buffer starts with an LF that is not in the file, so a From_
        # line at C{start} is found like any other; C{base} is the offset of
        # buf[0].
        buf = b"\n"
        base = start - 1
        # buf[:lo] is done (at most _HISTORY bytes of it are kept).
        lo = 0
        pos = start
        msg: _Message | None = None
        eof = False
        while not eof:
            want = chunk_size if limit is None else min(chunk_size, limit - pos)
            chunk = fileobj.read(want) if want > 0 else b""
            if chunk:
                pos += len(chunk)
                buf += chunk
                hi = _undecided_from(buf, lo)
                if hi <= lo:
                    continue
            else:
                eof = True
                hi = len(buf)
            has_cr = buf.find(b"\r", lo, hi) >= 0
            batch: _Batch = []
            finished: list[_Finished] = []
            i = lo
            for m in _LINE_FROM.finditer(buf, lo):
                p = m.start()
                if p >= hi:
                    break
                quotes = m.end() - p - _FROM_LEN
                if quotes:
                    if msg is not None and quotes <= MAX_QUOTES:
                        msg.quoted += 1
                    continue
                # A message starts at p + 1; the LF at p ends the previous one.
                nxt = p + 1
                if msg is not None:
                    msg.absorb(buf, i, nxt, base, has_cr, batch)
                    first = max(msg.start - base, nxt - _HISTORY)
                    finished.append(msg.finish(base + nxt, buf[first:nxt]))
                msg = _Message(base + nxt)
                i = nxt
            if msg is not None:
                msg.absorb(buf, i, hi, base, has_cr, batch)
                if eof:
                    end = len(buf)
                    first = max(msg.start - base, end - _HISTORY)
                    finished.append(msg.finish(base + end, buf[first:end]))
            done = submit(batch)
            previous, waiting = waiting, (done, finished)
            if previous[0] is not None:
                previous[0].result()
            yield from _records(previous[1])
            if eof:
                break
            # Keep the undecided end and a little history for the separator.
            keep = max(0, hi - _HISTORY)
            buf = buf[keep:]
            base += keep
            lo = hi - keep
        if waiting[0] is not None:
            waiting[0].result()
        yield from _records(waiting[1])
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
