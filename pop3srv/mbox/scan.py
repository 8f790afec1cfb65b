# -*- test-case-name: tests.test_mbox_scan -*-
"""
Sequential scanner that splits an mbox file into message records.

A message begins at every line that starts with C{From } (at offset 0 or
after an LF).  Its content runs from the end of that line to the next one,
minus a trailing separator: if the two bytes before the next C{From } line
(or EOF) are C{\\n\\n} the last LF is dropped, else if the four bytes before
are C{\\r\\n\\r\\n} the last CRLF is dropped.  This is what CPython's
C{mailbox.mbox._generate_toc} does (plus the CRLF variant).

The scanner reads fixed-size chunks and works on each chunk with C-speed
bytes operations, so a single long line or a huge message costs no more
memory than a chunk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pop3srv.mbox.quoting import QuotedLineCounter

#: Bytes read per call.
CHUNK_SIZE = 1 << 20

#: Size of the per-message digest used for UIDLs.
DIGEST_SIZE = 12

_FROM = b"From "
_LINE_FROM = b"\nFrom "
# A "\nFrom " straddling two chunks needs this many bytes of the first one.
_HOLD_BACK = len(_LINE_FROM) - 1


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
    Accumulates one message while its bytes stream past.
    """

    __slots__ = (
        "body_start",
        "counter",
        "crlf",
        "hasher",
        "lf",
        "quoted",
        "span_len",
        "start",
        "tail",
    )

    def __init__(self, start: int) -> None:
        self.start = start
        self.body_start = -1
        self.hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self.span_len = 0
        self.lf = 0
        self.crlf = 0
        self.quoted = 0
        self.counter = QuotedLineCounter()
        # Last four raw bytes seen, From_ line included, for the separator.
        self.tail = b""

    def absorb(self, data: bytes, offset: int) -> None:
        """
        Take the next raw bytes of this message.

        @param data: bytes that belong to this message.
        @param offset: file offset of C{data[0]}.
        """
        if not data:
            return
        self.hasher.update(data)
        if self.body_start < 0:
            nl = data.find(b"\n")
            if nl < 0:
                self.tail = (self.tail + data)[-4:]
                return
            self.body_start = offset + nl + 1
            self.tail = (self.tail + data[: nl + 1])[-4:]
            data = data[nl + 1 :]
            if not data:
                return
        # A CRLF split across two calls is seen through the carried tail.
        if self.tail.endswith(b"\r") and data[0] == 0x0A and self.span_len:
            self.crlf += 1
        self.span_len += len(data)
        self.lf += data.count(b"\n")
        self.crlf += data.count(b"\r\n")
        self.quoted += self.counter.feed(data)
        self.tail = (self.tail + data[-4:])[-4:]

    def finish(self, next_start: int) -> MessageRecord:
        """
        Close the message at C{next_start} (the next From_ line or EOF).

        @return: the finished record.
        """
        self.counter.finish()
        if self.body_start < 0:
            # A From_ line with no LF at EOF: no content at all.
            self.body_start = next_start
        drop_len = drop_lf = drop_crlf = 0
        if self.tail.endswith(b"\n\n"):
            drop_len, drop_lf = 1, 1
        elif self.tail == b"\r\n\r\n":
            drop_len, drop_lf, drop_crlf = 2, 1, 1
        content_len = self.span_len - drop_len
        if content_len <= 0:
            size = 0
            content_len = 0
        else:
            size = content_len - self.quoted + (self.lf - drop_lf) - (self.crlf - drop_crlf)
            if not drop_len and not self.tail.endswith(b"\n"):
                size += 2
        return MessageRecord(
            start=self.start,
            body_start=self.body_start,
            end=self.body_start + content_len,
            size=size,
            digest=self.hasher.digest(),
        )


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
    # The byte before the buffer; an LF means "line start", as at offset 0.
    prev = b"\n"
    # Unconsumed bytes (at most _HOLD_BACK between reads) and their offset.
    buf = b""
    buf_off = start
    pos = start
    msg: _Message | None = None
    eof = False
    while not eof:
        want = chunk_size if limit is None else min(chunk_size, limit - pos)
        chunk = fileobj.read(want) if want > 0 else b""
        if not chunk:
            eof = True
        pos += len(chunk)
        buf = buf + chunk if buf else chunk
        i = 0
        # A From_ at buf[0] has its LF in the previous read (or is at start);
        # it may already have been started if it was held back last time.
        if prev == b"\n" and buf.startswith(_FROM) and (msg is None or msg.start != buf_off):
            if msg is not None:
                yield msg.finish(buf_off)
            msg = _Message(buf_off)
        hit = buf.find(_LINE_FROM)
        while hit >= 0:
            p = hit + 1
            if msg is not None:
                msg.absorb(buf[i:p], buf_off + i)
                yield msg.finish(buf_off + p)
            msg = _Message(buf_off + p)
            i = p
            hit = buf.find(_LINE_FROM, p)
        keep = 0 if eof else min(_HOLD_BACK, len(buf) - i)
        done = len(buf) - keep
        if msg is not None and done > i:
            msg.absorb(buf[i:done], buf_off + i)
        if done:
            prev = buf[done - 1 : done]
            buf_off += done
            buf = buf[done:]
    if msg is not None:
        yield msg.finish(buf_off)
