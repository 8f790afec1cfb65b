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

Each message's header block (up to its first empty line) is also read for
the metadata other mail servers keep in it (L{HIDDEN_HEADERS}, which
Dovecot and UW-IMAP hide from their clients, and C{X-UIDL}): the record
names the byte ranges to hide, counts its size without them, and carries
the values a UIDL may be made of (L{MessageMeta}).  Only the header is
searched, with one C-speed regex pass, so a message without such headers
costs one short search.  The first message of a file that carries
C{X-IMAP} and the subject UW-IMAP and Dovecot give it is their
internal-data pseudo-message (L{MessageMeta.pseudo}), which is no mail.

A message's digest leaves its hidden ranges out, so a mail store that
rewrites its flags and UIDs (C{Status: O} made C{RO}, C{X-UID} added)
leaves it as it was: the digest names the message, not its metadata.  A
message with nothing hidden has the digest of all its bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

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

#: The header fields that carry a mail store's own metadata (flags, IMAP
#: UIDs, a length); Dovecot and UW-IMAP hide them from clients, and so do
#: we.  Lower case.
HIDDEN_HEADERS = frozenset(
    [b"x-imapbase", b"x-imap", b"x-uid", b"status", b"x-status", b"x-keywords", b"content-length"]
)

#: Header octets read for metadata per message: lines that start beyond
#: them are sent as they are.  A header this long is very rare, and mail
#: stores add their fields at its end, so the bound is generous.
MAX_HEADER = 1 << 20

#: Most separate runs of hidden fields in one header.  A mail store writes
#: its fields together (a few runs at most); a header with more was made by a
#: sender, and is sent as it is, nothing hidden: its ranges would cost
#: index space and RETR work for no client's benefit.
MAX_HIDDEN_RUNS = 64

#: The subject UW-IMAP and Dovecot give their internal-data message.
PSEUDO_SUBJECT = b"DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"

# The end of a header block: the LF ending its last line (or the From_
# line), then an empty line.
_END_OF_HEADER = re.compile(rb"\n\r?\n")
# Whichever comes first: the end of the header block, or a line that may
# start a field of interest (names that begin like one).  Most headers have
# none, and this one search tells.
_FIRST_OF_INTEREST = re.compile(
    rb"\n(?:\r?\n|(?=[XxSsCc])(?i:x-imap|x-uid|status|x-status|x-keywords|content-length))"
)
# Runs of adjacent hidden fields, each after the LF before it.  A field
# runs to the LF that ends its last continuation line (one that starts with
# a blank), or to the end of the block.  Names match in any case and may be
# followed by blanks before the colon, as Dovecot's parser allows.  The
# literal LF prefix keeps the search at C speed, the lookahead rules out
# most lines at their first letter, and the fields mail stores add are
# usually together, so a header takes one or two matches.
_HIDDEN_RUN = re.compile(
    rb"\n(?=[XxSsCc])(?:(?:x-imapbase|x-imap|x-uid|status|x-status|x-keywords|content-length)"
    rb"[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z))+",
    re.IGNORECASE,
)
# The fields whose values a UIDL may be made of, in header order.
_VALUE_FIELD = re.compile(
    rb"\n(?=[Xx])(x-uidl|x-uid|x-imapbase|x-imap)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)",
    re.IGNORECASE,
)
# The pseudo-message's Subject field, as both servers write it.
_PSEUDO_SUBJECT = re.compile(
    rb"\n(?i:subject)[ \t]*:[ \t]*" + re.escape(PSEUDO_SUBJECT) + rb"[ \t]*\r?\n"
)
_LWSP = b" \t\r\n"
_DIGITS = re.compile(rb"[0-9]*")


class MessageMeta(NamedTuple):
    """
    What a message's header says that a UIDL may be made of.

    @ivar uids: the values of its well-formed C{X-UID} fields, in order
        (the first that fits the file's sequence is its IMAP UID; see
        L{pop3srv.mbox.pins}).  In the first message of a file, only those
        after its C{X-IMAPbase}, as Dovecot reads them.
    @ivar uidl: the value of its first C{X-UIDL} field, without blanks
        around it (not checked).
    @ivar uidvalidity: the UIDVALIDITY of C{X-IMAPbase} (or C{X-IMAP}) in
        the first message of the file; 0 if none.
    @ivar uid_last: the last UID that field says was given.
    @ivar pseudo: whether this is the internal-data pseudo-message of
        UW-IMAP and Dovecot: the first message of the file, with a valid
        C{X-IMAP} field and their subject (L{PSEUDO_SUBJECT}).  C{X-IMAP}
        anywhere else says nothing: mail from outside could carry it.
    @ivar header_md5: Dovecot's header MD5 (C{%m}), if the scan was asked
        for it.
    """

    # A named tuple rather than a frozen dataclass: it is built for every
    # message of a mailbox that another server has written to, and is
    # several times cheaper to make.

    uids: tuple[int, ...] = ()
    uidl: bytes | None = None
    uidvalidity: int = 0
    uid_last: int = 0
    pseudo: bool = False
    header_md5: str | None = None


class _Header(NamedTuple):
    """
    The result of reading one header block.

    @ivar hidden: ranges to hide, C{(offset, length)} from the start of the
        content, ascending, adjacent ones merged.
    @ivar length: octets hidden.
    @ivar lf: LFs in them.
    @ivar crlf: CR LF pairs in them.
    @ivar end: where the last range ends, from the start of the content.
    @ivar meta: the values found, or L{None} if none.
    """

    hidden: tuple[tuple[int, int], ...]
    length: int
    lf: int
    crlf: int
    end: int
    meta: MessageMeta | None


def _imap_base(value: bytes) -> tuple[int, int] | None:
    """
    C{(uidvalidity, uid_last)} from an C{X-IMAPbase} or C{X-IMAP} value, or
    L{None} if Dovecot would find it broken.  Numbers wrap at 32 bits, as
    Dovecot's do.
    """
    value = value.strip(_LWSP)
    first = _DIGITS.match(value)
    assert first is not None
    i = first.end()
    if i == 0 or (i < len(value) and value[i] != 0x20):
        return None
    uidvalidity = int(value[:i]) & 0xFFFFFFFF
    if not uidvalidity:
        return None
    while i < len(value) and value[i] in _LWSP:
        i += 1
    last = _DIGITS.match(value, i)
    assert last is not None
    j = last.end()
    if j < len(value) and value[j] not in _LWSP:
        return None
    uid_last = int(value[i:j]) if j > i else 0
    return uidvalidity, uid_last & 0xFFFFFFFF


def _x_uid(value: bytes) -> int | None:
    """
    An C{X-UID} value, or L{None} unless it is digits between blanks.
    It wraps at 32 bits, as Dovecot's does.
    """
    value = value.strip(_LWSP)
    if not value.isdigit():
        return None
    return int(value) & 0xFFFFFFFF or None


def _read_header(
    buf: bytes | bytearray,
    lo: int,
    hi: int,
    first: bool,
    md5: Callable[[bytes], str] | None = None,
) -> _Header | None:
    """
    Find the metadata fields of one header block.

    @param buf: holds the block.
    @param lo: index of the LF before the block's first line (the From_
        line's).
    @param hi: index just past the block: past the LF of its last line, or
        the end of the message.
    @param first: whether this is the first message of the file, the only
        one whose C{X-IMAPbase} or C{X-IMAP} counts.
    @param md5: computes Dovecot's header MD5 of the block, if wanted.
    @return: what to hide and what was found, or L{None} if nothing.
    """
    run = _HIDDEN_RUN.search(buf, lo, hi)
    if run is None and md5 is None and _VALUE_FIELD.search(buf, lo, hi) is None:
        return None
    origin = lo + 1
    hidden: list[tuple[int, int]] = []
    while run is not None:
        if len(hidden) == MAX_HIDDEN_RUNS:
            hidden = []
            break
        hidden.append((run.start() + 1, run.end()))
        run = _HIDDEN_RUN.search(buf, run.end() - 1, hi) if run.end() < hi else None
    uids: list[int] = []
    uidl: bytes | None = None
    base: tuple[int, int] | None = None
    pseudo = False
    for field in _VALUE_FIELD.finditer(buf, lo, hi):
        name = field.group(1).lower()
        if name == b"x-uidl":
            if uidl is None:
                uidl = field.group(2).strip(_LWSP)
        elif name == b"x-uid":
            uid = _x_uid(field.group(2))
            if uid is not None and (base is not None or not first):
                uids.append(uid)
        elif first and base is None:
            if name == b"x-imap":
                if _PSEUDO_SUBJECT.search(buf, lo, hi) is None:
                    continue
                pseudo = True
            base = _imap_base(field.group(2))
            pseudo = pseudo and base is not None
    length = lf = crlf = 0
    for start, stop in hidden:
        length += stop - start
        lf += buf.count(b"\n", start, stop)
        crlf += buf.count(b"\r\n", start, stop)
    digest = md5(bytes(buf[origin:hi])) if md5 is not None else None
    meta = None
    if uids or uidl is not None or base is not None or digest is not None:
        meta = MessageMeta(
            tuple(uids),
            uidl,
            base[0] if base else 0,
            base[1] if base else 0,
            pseudo,
            digest,
        )
    ranges = tuple((start - origin, stop - start) for start, stop in hidden)
    end = hidden[-1][1] - origin if hidden else 0
    return _Header(ranges, length, lf, crlf, end, meta)


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
        (or EOF), separator included, less the C{hidden} ranges
        (L{MessageDigest}).
    @ivar hidden: header fields RETR leaves out (L{HIDDEN_HEADERS}), as
        C{(offset, length)} from C{body_start}, ascending; C{size} does not
        count them.
    @ivar meta: the header's metadata for UIDLs, or L{None} if it has none.
    @ivar raw_digest: blake2b of all those bytes, hidden ranges included
        (the digest of earlier index versions), if the scan was asked for
        it.
    """

    start: int
    body_start: int
    end: int
    size: int
    digest: bytes
    hidden: tuple[tuple[int, int], ...] = ()
    meta: MessageMeta | None = None
    raw_digest: bytes | None = None


class MessageDigest:
    """
    L{MessageRecord.digest} of a message whose raw bytes are fed in order,
    from its C{start}: the hidden ranges are left out as they pass.
    """

    def __init__(self, start: int, body_start: int, hidden: tuple[tuple[int, int], ...]) -> None:
        """
        @param start: offset of the message's C{From } line.
        @param body_start: offset of its content.
        @param hidden: its hidden ranges (L{MessageRecord.hidden}).
        """
        self._hash = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._pos = start
        # Absolute (start, stop) of the ranges still ahead, the next last.
        self._skips = [(body_start + o, body_start + o + n) for o, n in reversed(hidden)]

    def update(self, data: bytes) -> None:
        """Take the next raw bytes."""
        pos, end = self._pos, self._pos + len(data)
        view = memoryview(data)
        skips = self._skips
        while skips and skips[-1][0] < end:
            skip_start, skip_stop = skips[-1]
            if skip_start > pos:
                self._hash.update(view[pos - self._pos : skip_start - self._pos])
            if skip_stop > end:
                # The range goes on into the next bytes.
                self._pos = end
                return
            pos = max(pos, skip_stop)
            skips.pop()
        if pos < end:
            self._hash.update(view[pos - self._pos :])
        self._pos = end

    def digest(self) -> bytes:
        """The digest of the bytes so far."""
        return self._hash.digest()


class _Message:
    """
    One message while its bytes stream past, as counts.

    The digest leaves the hidden ranges out, which are known only once the
    header block is read: the content bytes before that are held (in
    C{header}) and digested when it is.

    @ivar lf: LFs after the C{From } line.
    @ivar crlf: CR LF pairs after the C{From } line.
    @ivar quoted: lines after the C{From } line that lose a C{>}.
    @ivar first: whether this is the first message of the file.
    @ivar header: its header block as read so far (after the LF of the
        From_ line, which it starts with) while the block's end is not in
        sight; L{None} before the From_ line ends and once it is read.
    @ivar found: what its header block holds, once read.
    @ivar raw: digests every byte, if asked for (L{MessageRecord.raw_digest}).
    """

    __slots__ = (
        "body_start",
        "crlf",
        "first",
        "found",
        "hasher",
        "header",
        "lf",
        "md5",
        "offloaded",
        "quoted",
        "raw",
        "start",
    )

    def __init__(
        self, start: int, first: bool, md5: Callable[[bytes], str] | None, raw: bool = False
    ) -> None:
        self.start = start
        self.first = first
        self.md5 = md5
        self.body_start = -1
        self.hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self.raw = hashlib.blake2b(digest_size=DIGEST_SIZE) if raw else None
        self.lf = 0
        self.crlf = 0
        self.quoted = 0
        self.offloaded = False
        self.header: bytearray | None = None
        self.found: _Header | None = None

    def _digest(self, hasher: Any, buf: bytes | bytearray, lo: int, hi: int, batch: _Batch) -> None:
        """Feed C{buf[lo:hi]} to C{hasher}, now or queued."""
        if lo >= hi:
            return
        if self.offloaded or hi - lo >= OFFLOAD_MIN:
            # Once one range is queued, every later one is, to keep order.
            self.offloaded = True
            batch.append((hasher, buf, lo, hi))
        else:
            hasher.update(memoryview(buf)[lo:hi])

    def _digest_content(
        self, buf: bytes | bytearray, lo: int, hi: int, at: int, batch: _Batch
    ) -> None:
        """
        Feed C{buf[lo:hi]}, which starts C{at} octets into the content, to
        the digest, less the hidden ranges.
        """
        found = self.found
        if found is None or found.end <= at:
            self._digest(self.hasher, buf, lo, hi, batch)
            return
        pos = lo
        for offset, length in found.hidden:
            skip_start = lo + offset - at
            skip_stop = skip_start + length
            if skip_stop <= pos:
                continue
            if skip_start >= hi:
                break
            self._digest(self.hasher, buf, pos, skip_start, batch)
            pos = min(max(pos, skip_stop), hi)
        self._digest(self.hasher, buf, pos, hi, batch)

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
        if self.raw is not None:
            self._digest(self.raw, buf, lo, hi, batch)
        if self.body_start < 0:
            nl = buf.find(b"\n", lo, hi)
            if nl < 0:
                self._digest(self.hasher, buf, lo, hi, batch)
                return
            self._digest(self.hasher, buf, lo, nl + 1, batch)
            self.body_start = base + nl + 1
            lo = nl + 1
            self._header_starts(buf, nl, hi)
            if self.header is None:
                self._digest_content(buf, lo, hi, 0, batch)
        elif self.header is not None:
            held = self.header
            seen = len(held)
            self._header_continues(buf, lo, hi)
            if self.header is None:
                # Read now: what was held (after its leading LF), then this.
                self._digest_content(held, 1, seen, 0, batch)
                self._digest_content(buf, lo, hi, seen - 1, batch)
        else:
            self._digest_content(buf, lo, hi, base + lo - self.body_start, batch)
        self.lf += buf.count(b"\n", lo, hi)
        if has_cr:
            self.crlf += buf.count(b"\r\n", lo, hi + 1)

    def _header_starts(self, buf: bytes, nl: int, hi: int) -> None:
        """
        Read the header block from the From_ line's LF at C{buf[nl]}, or
        keep what there is of it until more arrives.
        """
        bound = min(hi, nl + MAX_HEADER + 2)
        if self.md5 is None:
            first = _FIRST_OF_INTEREST.search(buf, nl, bound)
            if first is not None and buf[first.start() + 1] in b"\r\n":
                return
        eoh = _END_OF_HEADER.search(buf, nl, bound)
        if eoh is not None:
            self.found = _read_header(buf, nl, eoh.start() + 1, self.first, self.md5)
        elif hi - nl >= MAX_HEADER + 2:
            # The whole window is here, however the file was read in chunks
            # (so a rescan of any part of the file finds the same).
            self.found = _read_header(
                buf, nl, buf.rfind(b"\n", nl, nl + MAX_HEADER) + 1, self.first, self.md5
            )
        else:
            self.header = bytearray(buf[nl:hi])

    def _header_continues(self, buf: bytes, lo: int, hi: int) -> None:
        """Add C{buf[lo:hi]} to a header block whose end was not seen yet."""
        header = self.header
        assert header is not None
        seen = len(header)
        header += memoryview(buf)[lo : min(hi, lo + MAX_HEADER + 2 - seen)]
        eoh = _END_OF_HEADER.search(header, max(0, seen - 2))
        if eoh is not None:
            self._header_read(eoh.start() + 1)
        elif len(header) >= MAX_HEADER + 2:
            self._header_read(header.rfind(b"\n", 0, MAX_HEADER) + 1)

    def _header_read(self, end: int) -> None:
        header = self.header
        assert header is not None
        self.header = None
        self.found = _read_header(header, 0, end, self.first, self.md5)

    def finish(self, next_start: int, tail: bytes, batch: _Batch) -> _Finished:
        """
        Close the message at C{next_start} (the next From_ line or EOF).

        @param tail: the last (up to four) raw bytes of the message.
        @param batch: where the digest of held bytes is queued.
        @return: the record's fields, and the digests still being fed.
        """
        if self.body_start < 0:
            # A From_ line with no LF at EOF: no content at all.
            self.body_start = next_start
        if self.header is not None:
            # No empty line: the whole message is its header.
            held = self.header
            self._header_read(len(held))
            self._digest_content(held, 1, len(held), 0, batch)
        found = self.found
        span_len = next_start - self.body_start
        drop_len = drop_lf = drop_crlf = 0
        if tail.endswith(b"\n\n"):
            drop_len, drop_lf = 1, 1
        elif tail == b"\r\n\r\n":
            drop_len, drop_lf, drop_crlf = 2, 1, 1
        content_len = span_len - drop_len
        # A hidden field is whole lines of the header, which always end
        # before the separator, so its LFs and CR LFs are simply not sent;
        # none loses a ">".  What is sent ends with an LF if the content
        # does or if the last thing hidden is its end (every field starts
        # a line).
        hidden_len = hidden_lf = hidden_crlf = 0
        ends_hidden = False
        if found is not None:
            hidden_len, hidden_lf, hidden_crlf = found.length, found.lf, found.crlf
            ends_hidden = found.end == content_len
        if content_len <= 0:
            size = 0
            content_len = 0
        elif content_len <= hidden_len:
            size = 0
        else:
            size = (
                content_len
                - hidden_len
                - self.quoted
                + (self.lf - drop_lf - hidden_lf)
                - (self.crlf - drop_crlf - hidden_crlf)
            )
            if not drop_len and not tail.endswith(b"\n") and not ends_hidden:
                size += 2
        return (
            self.start,
            self.body_start,
            self.body_start + content_len,
            size,
            self.hasher,
            found.hidden if found is not None else (),
            found.meta if found is not None else None,
            self.raw,
        )


#: Digest work queued while a chunk is scanned: (hasher, buffer, lo, hi).
_Batch = list[tuple[Any, "bytes | bytearray", int, int]]
#: A finished message: start, body_start, end, size, its hasher, the
#: hidden ranges, the metadata and the raw hasher if any.
_Finished = tuple[int, int, int, int, Any, tuple[tuple[int, int], ...], MessageMeta | None, Any]


def _digest(batch: _Batch) -> None:
    for hasher, buf, lo, hi in batch:
        hasher.update(memoryview(buf)[lo:hi])


def _records(finished: list[_Finished]) -> Iterator[MessageRecord]:
    for start, body_start, end, size, hasher, hidden, meta, raw in finished:
        yield MessageRecord(
            start,
            body_start,
            end,
            size,
            hasher.digest(),
            hidden,
            meta,
            raw.digest() if raw is not None else None,
        )


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
    *,
    header_md5: Callable[[bytes], str] | None = None,
    raw_digest: bool = False,
) -> Iterator[MessageRecord]:
    """
    Yield a record for each message from C{start} on.

    Bytes before the first C{From } line are skipped silently.  The
    pseudo-message (L{MessageMeta.pseudo}) is yielded too.

    @param fileobj: a binary file positioned anywhere; it is seeked.
    @param start: a line start to begin at (0, or a message's C{start});
        from 0, the first message is the file's first.
    @param limit: stop reading at this offset, as if it were EOF.
    @param chunk_size: bytes per read.
    @param header_md5: computes Dovecot's header MD5 of a header block,
        for L{MessageMeta.header_md5}; L{None} if it is not wanted.
    @param raw_digest: compute L{MessageRecord.raw_digest} too.
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
        at_file_start = start == 0
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
                    finished.append(msg.finish(base + nxt, buf[first:nxt], batch))
                msg = _Message(base + nxt, at_file_start, header_md5, raw_digest)
                at_file_start = False
                i = nxt
            if msg is not None:
                msg.absorb(buf, i, hi, base, has_cr, batch)
                if eof:
                    end = len(buf)
                    first = max(msg.start - base, end - _HISTORY)
                    finished.append(msg.finish(base + end, buf[first:end], batch))
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
