# -*- test-case-name: tests.test_mbox_index -*-
"""
The persisted per-mbox index that keeps UIDLs stable and reopening cheap.

Our own UIDL of a message is the hex of its digest; when several messages
share a digest (identical deliveries) each carries a persisted ordinal, and
every ordinal but 0 is appended as C{.N}.  Ordinals that left the file are
remembered (the I{retired} table), so a later identical arrival never gets
a UIDL a client has already seen.  A message may instead have a UIDL kept
as a string (I{pinned}): one another server gave it, chosen when it was
first indexed (L{pop3srv.mbox.pins}), or one an import pinned; those of
messages that left the file are remembered too (the I{retired pins}).
Either way a record's UIDL is decided once and kept; only an index written
by a tool (L{load_index} with C{provisional}) holds undecided ones, which
the server's next load decides.

File layout (little endian): a header (magic, version, flags, st_dev,
st_ino, size, mtime_ns, hashes of the first and last 4 KiB, record count,
retired count, the file's UIDVALIDITY and UID sequence, length of the
extras, length of the retired pins), fixed-size records, the extras (each
record's hidden header ranges and pinned UIDL, for the records that have
any), retired entries, retired pins, then a blake2b checksum of everything
before it.

Indexes of earlier versions are read only to carry their UIDLs into a full
rescan: the first had no extras (its sizes count hidden headers), and both
digested every byte of a message, where the digest now leaves the hidden
headers out (L{pop3srv.mbox.scan.MessageDigest}); that rescan computes
both digests to find their messages again.

A stored index is trusted as it is only if inode, size and mtime match and
the file still looks as it did where we look: both ends (the probes) and a
sample of message starts (L{boundaries_hold}).  A rewrite that kept size
and mtime (an MUA that restores mtime, or a coarse clock) and both ends
moves the starts between its edits, which the sample sees.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import overload

from twisted.logger import Logger

from pop3srv.core.metrics import INDEX_SCAN_SECONDS, INDEX_SCANS, PROCESS
from pop3srv.mbox.paths import (
    UnsafeStateFile,
    display_path,
    fsync_dir,
    open_state_file,
    read_bounded,
)
from pop3srv.mbox.pins import UidlChooser, UidSequence, looks_own, own_uidl, xuidl_reused
from pop3srv.mbox.scan import DIGEST_SIZE, MessageDigest, MessageRecord, scan_mbox
from pop3srv.mbox.uidlformat import UidlFormat, header_md5

_log = Logger()

_PROBE_SIZE = 16
#: Bytes hashed at each end of the mbox to tell a replaced file from ours
#: when inode, size and (coarse) mtime all happen to match.
PROBE_SPAN = 4096

MAGIC = b"P3MBXIDX"
#: The format written.
VERSION = 3
#: The formats of earlier releases, read to carry their UIDLs over.
LEGACY_VERSIONS = (1, 2)
_HEADER = struct.Struct(f"<8sIIQQQq{_PROBE_SIZE}s{_PROBE_SIZE}sQQIQQQQ")
_HEADER_V2 = struct.Struct(f"<8sIIQQQq{_PROBE_SIZE}s{_PROBE_SIZE}sQQIIIQ")
_HEADER_V1 = struct.Struct(f"<8sIIQQQq{_PROBE_SIZE}s{_PROBE_SIZE}sQQ")
# The last field is where the record's extras start in the extras, plus
# one; 0 if it has none.
_RECORD = struct.Struct(f"<QQQQ{DIGEST_SIZE}sIQ")
_RECORD_V1 = struct.Struct(f"<QQQQ{DIGEST_SIZE}sI")
_RETIRED = struct.Struct(f"<{DIGEST_SIZE}sI")
_CHECKSUM_SIZE = 16

# A record's extras: flags, the number of hidden ranges; the ranges
# (offset from body_start, length); then, if pinned, the UIDL's length and
# the UIDL.
_EXTRA = struct.Struct("<BI")
_EXTRA_V2 = struct.Struct("<BH")
_RANGE = struct.Struct("<II")
_PINNED = 1
_UNDECIDED = 2
#: Header flag: some record's UIDL is not decided yet.
_HAS_UNDECIDED = 1
#: Header flag: some pinned UIDL has the shape of our own (an import's).
_HAS_OWN_SHAPED_PINS = 2

#: Most retired digests remembered, and most retired pins; the oldest are
#: forgotten first.
MAX_RETIRED = 100_000

#: The shortest distance between two message starts: C{From } and an LF.
_MIN_MESSAGE = len(b"From \n")

#: Message starts checked before a stored index is trusted: half spread
#: evenly over the file, half drawn at random on each open, so that no
#: pattern of edits is missed on every open.  Each is one read of a few
#: octets.
BOUNDARY_SAMPLES = 24

_random = random.SystemRandom()

#: Octets read at a time to check a message's digest.
_READ_CHUNK = 1 << 20
#: The most octets of line ends an MDA may add after the last message
#: before the next: a missing final newline and a blank line, as CRLF.
_MAX_LINE_ENDS = 4


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """
    A scanned message plus its persisted UIDL.

    @ivar ordinal: 0 for the first message with this digest, then 1, 2, ...
    @ivar hidden: header ranges RETR leaves out, as
        L{MessageRecord.hidden}.
    @ivar pinned: its UIDL, if not our own (L{own_uidl}).
    @ivar decided: whether its UIDL is decided for good; only an index a
        tool wrote has undecided ones (see L{load_index}).
    """

    start: int
    body_start: int
    end: int
    size: int
    digest: bytes
    ordinal: int
    hidden: tuple[tuple[int, int], ...] = ()
    pinned: bytes | None = None
    decided: bool = True

    @property
    def uidl(self) -> bytes:
        """
        The POP3 unique-id: the pinned one, or the hex digest plus C{.N}
        for ordinal N > 0.
        """
        if self.pinned is not None:
            return self.pinned
        return own_uidl(self.digest, self.ordinal)

    def shifted(self, delta: int) -> IndexRecord:
        """
        The same message moved by C{delta} bytes.
        """
        return replace(
            self,
            start=self.start + delta,
            body_start=self.body_start + delta,
            end=self.end + delta,
        )


def _pack_extra(rec: IndexRecord) -> bytes | None:
    """A record's extras, or L{None} if it needs none."""
    flags = (_PINNED if rec.pinned is not None else 0) | (0 if rec.decided else _UNDECIDED)
    if not flags and not rec.hidden:
        return None
    parts = [_EXTRA.pack(flags, len(rec.hidden))]
    parts.extend(_RANGE.pack(offset, length) for offset, length in rec.hidden)
    if rec.pinned is not None:
        parts.append(bytes([len(rec.pinned)]) + rec.pinned)
    return b"".join(parts)


def _unpack_extra(
    extras: bytes, at: int, extra: struct.Struct = _EXTRA
) -> tuple[tuple[tuple[int, int], ...], bytes | None, bool]:
    """
    C{(hidden, pinned, decided)} from the extras at C{at}.

    @param extra: the layout of their first fields (L{_EXTRA_V2} in an
        index of version 2).
    """
    flags, count = extra.unpack_from(extras, at)
    at += extra.size
    hidden = tuple(_RANGE.iter_unpack(extras[at : at + count * _RANGE.size]))
    at += count * _RANGE.size
    pinned = None
    if flags & _PINNED:
        pinned = extras[at + 1 : at + 1 + extras[at]]
    return hidden, pinned, not flags & _UNDECIDED


class RecordTable(Sequence[IndexRecord]):
    """
    The records of an index, packed as they are stored in its file.

    A mailbox of tens of thousands of messages as that many Python objects
    costs several MiB per open session, and the allocator keeps much of it
    after the session ends; packed, it is one buffer of 56 bytes a message,
    and a second one with the extras of the messages that have any
    (hidden headers, a pinned UIDL).  Records are unpacked when asked for.
    """

    __slots__ = ("_count", "_data", "_extras", "own_shaped_pins", "undecided")

    def __init__(
        self,
        data: bytes,
        extras: bytes = b"",
        undecided: bool = False,
        own_shaped_pins: bool = False,
    ) -> None:
        """
        @param data: packed records, L{_RECORD} each.
        @param extras: the extras they refer to.
        @param undecided: whether some record's UIDL is undecided.
        @param own_shaped_pins: whether some pinned UIDL has the shape of
            our own (L{looks_own}), which our own UIDL of a new message must
            then be checked against.
        """
        if len(data) % _RECORD.size:
            raise ValueError("not a whole number of records")
        self._data = data
        self._extras = extras
        self._count = len(data) // _RECORD.size
        self.undecided = undecided
        self.own_shaped_pins = own_shaped_pins

    @classmethod
    def pack(cls, records: Iterable[IndexRecord], prefix: RecordTable | None = None) -> RecordTable:
        """
        Pack records (or return a table as it is).

        @param prefix: packed records to put before them.
        """
        if isinstance(records, RecordTable) and prefix is None:
            return records
        # Packed one by one into one buffer: a record is garbage as soon as
        # it is packed, so a streamed scan never holds them all as objects.
        pack = _RECORD.pack
        data = bytearray(prefix._data if prefix is not None else b"")
        extras = bytearray(prefix._extras if prefix is not None else b"")
        undecided = prefix.undecided if prefix is not None else False
        own_shaped = prefix.own_shaped_pins if prefix is not None else False
        for r in records:
            extra = _pack_extra(r)
            ref = 0
            if extra is not None:
                ref = len(extras) + 1
                extras += extra
                undecided = undecided or not r.decided
                own_shaped = own_shaped or (r.pinned is not None and looks_own(r.pinned))
            data += pack(r.start, r.body_start, r.end, r.size, r.digest, r.ordinal, ref)
        return cls(bytes(data), bytes(extras), undecided, own_shaped)

    @property
    def data(self) -> bytes:
        """The packed records, as written to the index file."""
        return self._data

    @property
    def extras(self) -> bytes:
        """The packed extras, as written to the index file."""
        return self._extras

    def _record(self, fields: tuple[int, int, int, int, bytes, int, int]) -> IndexRecord:
        start, body_start, end, size, digest, ordinal, ref = fields
        if not ref:
            return IndexRecord(start, body_start, end, size, digest, ordinal)
        hidden, pinned, decided = _unpack_extra(self._extras, ref - 1)
        return IndexRecord(start, body_start, end, size, digest, ordinal, hidden, pinned, decided)

    def choices(self) -> dict[tuple[bytes, int], tuple[bytes | None, bool]]:
        """
        The UIDLs that are not simply our own and decided: C{(digest,
        ordinal)} to C{(pinned, decided)}.
        """
        if not self._extras:
            return {}
        found = {}
        for fields in _RECORD.iter_unpack(self._data):
            if fields[6]:
                _, pinned, decided = _unpack_extra(self._extras, fields[6] - 1)
                if pinned is not None or not decided:
                    found[fields[4], fields[5]] = (pinned, decided)
        return found

    def pinned_uidls(self) -> set[bytes]:
        """The decided pinned UIDLs of all records."""
        found = set()
        if self._extras:
            for fields in _RECORD.iter_unpack(self._data):
                if fields[6]:
                    _, pinned, decided = _unpack_extra(self._extras, fields[6] - 1)
                    if pinned is not None and decided:
                        found.add(pinned)
        return found

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> IndexRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[IndexRecord]: ...

    def __getitem__(self, i: int | slice) -> IndexRecord | list[IndexRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("record index out of range")
        return self._record(_RECORD.unpack_from(self._data, i * _RECORD.size))

    def __iter__(self) -> Iterator[IndexRecord]:
        for fields in _RECORD.iter_unpack(self._data):
            yield self._record(fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordTable):
            return self._data == other._data and self._extras == other._extras
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def sizes(self) -> list[int]:
        """Every record's C{size}, without unpacking whole records."""
        if sys.byteorder == "little":
            # Each record is seven little-endian 64-bit words; size is the 4th.
            return memoryview(self._data).cast("Q")[3 :: _RECORD.size // 8].tolist()
        return [r.size for r in self]


@dataclass(slots=True)
class MboxIndex:
    """
    The index of one mbox as of one moment.

    @ivar dev: C{st_dev} of the indexed file.
    @ivar ino: C{st_ino} of the indexed file.
    @ivar size: the indexed length; records cover C{[0, size)}.
    @ivar mtime_ns: C{st_mtime_ns} when indexed.
    @ivar head_probe: hash of the first L{PROBE_SPAN} bytes (fewer if short).
    @ivar tail_probe: hash of the last L{PROBE_SPAN} bytes before C{size}.
    @ivar records: the messages in file order.
    @ivar retired: digest -> lowest ordinal never yet handed out, for
        digests whose messages left the file.
    @ivar scanned_from: where this load started reading the mbox: L{None}
        if the stored index was used as is, else the scan's start offset.
    @ivar uidvalidity: the file's UIDVALIDITY as the last scan read it
        (L{UidSequence}); 0 if unknown.
    @ivar next_uid: the next free IMAP UID after its last message (at
        most one past L{pop3srv.mbox.pins.MAX_UID}).
    @ivar prev_uid: the IMAP UID of its last message.
    @ivar legacy: read from an index of one of the L{LEGACY_VERSIONS}, to
        be rescanned; its digests are of every byte of a message
        (L{pop3srv.mbox.scan.MessageRecord.raw_digest}).
    @ivar retired_pins: the pinned UIDLs of messages that left the file,
        the oldest first (at most L{MAX_RETIRED}).
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    records: Sequence[IndexRecord]
    retired: dict[bytes, int] = field(default_factory=dict)
    scanned_from: int | None = None
    head_probe: bytes = bytes(_PROBE_SIZE)
    tail_probe: bytes = bytes(_PROBE_SIZE)
    uidvalidity: int = 0
    next_uid: int = 1
    prev_uid: int = 0
    legacy: bool = False
    retired_pins: list[bytes] = field(default_factory=list)

    def sequence(self) -> UidSequence:
        """Where the file's IMAP UIDs stood after its last indexed message."""
        return UidSequence(self.uidvalidity, self.next_uid, self.prev_uid)


class _OrdinalAllocator:
    """
    Hands out ordinals: reused ones first, then fresh ones never used.
    """

    def __init__(
        self,
        reusable: Iterable[IndexRecord],
        kept: Iterable[IndexRecord],
        retired: dict[bytes, int],
    ) -> None:
        self._reuse: dict[bytes, deque[int]] = {}
        self._next = dict(retired)
        for rec in reusable:
            self._reuse.setdefault(rec.digest, deque()).append(rec.ordinal)
            self._bump(rec.digest, rec.ordinal)
        for rec in kept:
            self._bump(rec.digest, rec.ordinal)

    def _bump(self, digest: bytes, ordinal: int) -> None:
        if self._next.get(digest, 0) <= ordinal:
            self._next[digest] = ordinal + 1

    def note(self, digest: bytes, ordinal: int) -> None:
        """Count C{ordinal} of C{digest} as handed out elsewhere."""
        self._bump(digest, ordinal)

    def allocate(self, digest: bytes) -> tuple[int, bool]:
        """
        The ordinal for the next message with C{digest}, in file order.

        @return: the ordinal, and whether an earlier index gave it to a
            message with this digest.
        """
        queue = self._reuse.get(digest)
        if queue:
            return queue.popleft(), True
        ordinal = self._next.get(digest, 0)
        self._next[digest] = ordinal + 1
        return ordinal, False

    def retired(self, old: dict[bytes, int]) -> dict[bytes, int]:
        """
        The retired table after allocation: the old one plus every digest
        whose reusable ordinals were not all taken.
        """
        result = dict(old)
        for digest, queue in self._reuse.items():
            if queue:
                result.pop(digest, None)
                result[digest] = self._next[digest]
        return trim_retired(result)


def trim_retired(retired: dict[bytes, int]) -> dict[bytes, int]:
    """
    Forget the oldest retired digests beyond L{MAX_RETIRED}.
    """
    if len(retired) <= MAX_RETIRED:
        return retired
    items = list(retired.items())[-MAX_RETIRED:]
    return dict(items)


def retire_pins(retired: Sequence[bytes], pins: Iterable[bytes]) -> list[bytes]:
    """
    The retired pins with C{pins} added as the newest, the oldest beyond
    L{MAX_RETIRED} forgotten.
    """
    result = dict.fromkeys(retired)
    for uidl in pins:
        # Re-inserted so the newest retirements are the last forgotten.
        result.pop(uidl, None)
        result[uidl] = None
    kept = list(result)
    return kept[-MAX_RETIRED:] if len(kept) > MAX_RETIRED else kept


class IndexEncodingError(ValueError):
    """An index that cannot be stored in the file format."""


def encode_index(index: MboxIndex) -> bytes:
    """
    Serialise C{index} with its checksum.

    @raise IndexEncodingError: a value does not fit its field (which the
        scan's bounds should rule out; the caller then goes without).
    """
    try:
        table = RecordTable.pack(index.records)
        pins = b"".join(bytes([len(p)]) + p for p in index.retired_pins)
        parts = [
            _HEADER.pack(
                MAGIC,
                VERSION,
                (_HAS_UNDECIDED if table.undecided else 0)
                | (_HAS_OWN_SHAPED_PINS if table.own_shaped_pins else 0),
                index.dev,
                index.ino,
                index.size,
                index.mtime_ns,
                index.head_probe,
                index.tail_probe,
                len(table),
                len(index.retired),
                index.uidvalidity,
                index.next_uid,
                index.prev_uid,
                len(table.extras),
                len(pins),
            )
        ]
        parts.append(table.data)
        parts.append(table.extras)
        parts.extend(_RETIRED.pack(d, n) for d, n in index.retired.items())
        parts.append(pins)
    except (struct.error, ValueError, OverflowError) as e:
        raise IndexEncodingError(str(e)) from e
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_CHECKSUM_SIZE).digest()


def decode_index(data: bytes) -> MboxIndex | None:
    """
    Parse an index file; anything damaged or foreign gives L{None}.
    """
    if len(data) < _HEADER_V1.size + _CHECKSUM_SIZE:
        return None
    body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
    if hashlib.blake2b(body, digest_size=_CHECKSUM_SIZE).digest() != checksum:
        return None
    magic, version = struct.unpack_from("<8sI", body)
    if magic != MAGIC:
        return None
    try:
        if version == 1:
            return _decode_v1(body)
        if version == 2:
            return _decode_v2(body)
        if version == VERSION:
            return _decode(body)
    except (struct.error, ValueError, IndexError):
        # A checksum that matches what we did not write.
        return None
    return None


def _decode(body: bytes) -> MboxIndex | None:
    if len(body) < _HEADER.size:
        return None
    (_, _, flags, dev, ino, size, mtime_ns, head, tail, n_rec, n_ret, validity, next_uid,
     prev_uid, n_extras, n_pins) = _HEADER.unpack_from(body)  # fmt: skip
    rec_end = _HEADER.size + n_rec * _RECORD.size
    extras_end = rec_end + n_extras
    retired_end = extras_end + n_ret * _RETIRED.size
    if len(body) != retired_end + n_pins:
        return None
    records = RecordTable(
        body[_HEADER.size : rec_end],
        body[rec_end:extras_end],
        bool(flags & _HAS_UNDECIDED),
        bool(flags & _HAS_OWN_SHAPED_PINS),
    )
    retired = dict(_RETIRED.iter_unpack(body[extras_end:retired_end]))
    return MboxIndex(
        dev,
        ino,
        size,
        mtime_ns,
        records,
        retired,
        head_probe=head,
        tail_probe=tail,
        uidvalidity=validity,
        next_uid=next_uid,
        prev_uid=prev_uid,
        retired_pins=_unpack_pins(body[retired_end:]),
    )


def _unpack_pins(data: bytes) -> list[bytes]:
    pins = []
    at = 0
    while at < len(data):
        length = data[at]
        if at + 1 + length > len(data):
            raise ValueError("a retired pin runs past the end")
        pins.append(data[at + 1 : at + 1 + length])
        at += 1 + length
    return pins


def _decode_v2(body: bytes) -> MboxIndex | None:
    """
    An index of version 2: its records (digests of every byte) with their
    UIDLs and UID sequence, for a full rescan to carry over.
    """
    if len(body) < _HEADER_V2.size:
        return None
    (_, _, _, dev, ino, size, mtime_ns, head, tail, n_rec, n_ret, validity, next_uid,
     prev_uid, n_extras) = _HEADER_V2.unpack_from(body)  # fmt: skip
    rec_end = _HEADER_V2.size + n_rec * _RECORD.size
    extras_end = rec_end + n_extras
    if len(body) != extras_end + n_ret * _RETIRED.size:
        return None
    extras = body[rec_end:extras_end]

    def records() -> Iterator[IndexRecord]:
        for start, body_start, end, size, digest, ordinal, ref in _RECORD.iter_unpack(
            body[_HEADER_V2.size : rec_end]
        ):
            hidden: tuple[tuple[int, int], ...] = ()
            pinned, decided = None, True
            if ref:
                hidden, pinned, decided = _unpack_extra(extras, ref - 1, _EXTRA_V2)
            yield IndexRecord(
                start, body_start, end, size, digest, ordinal, hidden, pinned, decided
            )

    retired = dict(_RETIRED.iter_unpack(body[extras_end:]))
    return MboxIndex(
        dev,
        ino,
        size,
        mtime_ns,
        RecordTable.pack(records()),
        retired,
        head_probe=head,
        tail_probe=tail,
        uidvalidity=validity,
        next_uid=next_uid,
        prev_uid=prev_uid,
        legacy=True,
    )


def _decode_v1(body: bytes) -> MboxIndex | None:
    """
    An index of version 1: its records' UIDLs (all our own, all served)
    for a full rescan to carry over.
    """
    if len(body) < _HEADER_V1.size:
        return None
    _, _, _, dev, ino, size, mtime_ns, head, tail, n_rec, n_ret = _HEADER_V1.unpack_from(body)
    rec_end = _HEADER_V1.size + n_rec * _RECORD_V1.size
    if len(body) != rec_end + n_ret * _RETIRED.size:
        return None
    records = RecordTable.pack(
        IndexRecord(*fields) for fields in _RECORD_V1.iter_unpack(body[_HEADER_V1.size : rec_end])
    )
    retired = dict(_RETIRED.iter_unpack(body[rec_end:]))
    return MboxIndex(
        dev, ino, size, mtime_ns, records, retired, head_probe=head, tail_probe=tail, legacy=True
    )


def index_size_limit(mbox_size: int) -> int:
    """
    The largest index file we could have written for an mbox of
    C{mbox_size} octets, or for an earlier, larger version of it.

    Records: at most one per L{_MIN_MESSAGE} octets of the file, plus
    L{MAX_RETIRED} for messages that have left it since (an index of a
    file that shrank still holds them, and no more of them than the
    retired table can keep are of use); retired entries and retired pins:
    L{MAX_RETIRED} each.  Extras: a pinned UIDL per record, and a hidden
    range per header line (a line is longer than a range takes).

    @param mbox_size: the mbox's size now.
    @return: octets.
    """
    records = mbox_size // _MIN_MESSAGE + 1 + MAX_RETIRED
    extras = records * (_EXTRA.size + 1 + 255) + mbox_size * _RANGE.size
    return (
        _HEADER.size
        + records * _RECORD.size
        + extras
        + MAX_RETIRED * (_RETIRED.size + 1 + 255)
        + _CHECKSUM_SIZE
    )


def read_index(index_path: str, mbox_size: int | None = None) -> MboxIndex | None:
    """
    Read and validate the index file, or L{None} if absent or unusable.

    The index is only a cache (its loss costs a scan, and UIDL ordinals of
    identical messages, as a damaged one does), so one that is not a file
    we wrote (a symlink, say to C{/dev/zero}, a FIFO, a device, a file of
    another owner, or one larger than L{index_size_limit}) is logged and
    treated as absent; it is never followed or read past the limit.  The
    rebuilt index is then renamed over it, which replaces the name itself
    and follows nothing.

    @param index_path: the index file.
    @param mbox_size: the mbox's size, which bounds the read; L{None} for
        the size of the largest mbox (tests and tools).
    """
    limit = index_size_limit(mbox_size if mbox_size is not None else 1 << 62)
    shown = display_path(index_path)
    try:
        fd = open_state_file(index_path, os.O_RDONLY)
        try:
            data = read_bounded(fd, limit, shown)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except UnsafeStateFile as e:
        _log.warn(
            "Ignoring index {path} (a fresh one is written in its place): {error}",
            path=shown,
            error=e,
        )
        return None
    except OSError as e:
        _log.warn("Cannot read index {path}: {error}", path=shown, error=e)
        return None
    return decode_index(data)


def write_index(index_path: str, index: MboxIndex) -> None:
    """
    Replace the index file atomically and durably.

    @raise OSError: if it cannot be written; the old file is left alone.
    @raise IndexEncodingError: if C{index} cannot be stored; nothing is
        written.
    """
    data = encode_index(index)
    directory, base = os.path.split(index_path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def _hash_at(fd: int, offset: int, length: int) -> bytes:
    return hashlib.blake2b(os.pread(fd, length, offset), digest_size=_PROBE_SIZE).digest()


def probes(fd: int, size: int) -> tuple[bytes, bytes]:
    """
    Hash the first and the last L{PROBE_SPAN} bytes of C{[0, size)}.

    @return: C{(head_probe, tail_probe)}.
    """
    span = min(PROBE_SPAN, size)
    return _hash_at(fd, 0, span), _hash_at(fd, size - span, span)


def boundaries_hold(fd: int, records: Sequence[IndexRecord], size: int) -> bool:
    """
    Whether a sample of the recorded message starts (L{BOUNDARY_SAMPLES}
    at most) still begin a C{From } line in C{[0, size)} of the file.

    @param fd: the mbox.
    @param records: the stored index's records.
    @param size: the indexed length.
    """
    n = len(records)
    if n == 0:
        return True
    half = BOUNDARY_SAMPLES // 2
    picks = {i * (n - 1) // max(1, half - 1) for i in range(half)}
    picks.update(_random.sample(range(n), min(n, BOUNDARY_SAMPLES - half)))
    for i in sorted(picks):
        start = records[i].start
        if start == 0:
            found = os.pread(fd, len(b"From "), 0) == b"From "
        else:
            found = start < size and os.pread(fd, len(b"\nFrom "), start - 1) == b"\nFrom "
        if not found:
            return False
    return True


def _scan(
    fd: int, start: int, limit: int, chooser: UidlChooser, *, raw_digest: bool = False
) -> Iterator[MessageRecord]:
    # closefd=False: the caller's fd (and its lock) must outlive the scan.
    with open(fd, "rb", buffering=0, closefd=False) as f:
        yield from scan_mbox(
            f,
            start,
            limit,
            header_md5=header_md5 if chooser.wants_md5 else None,
            raw_digest=raw_digest,
        )


#: What a rescan knows of the earlier index's records whose UIDL is not
#: simply our own and decided: C{(digest, ordinal)} to C{(pinned, decided)}.
_Kept = dict[tuple[bytes, int], tuple[bytes | None, bool]]


class _Indexer:
    """
    Makes index records of scanned messages, with their UIDLs.

    A message an earlier index had (same digest, a reused ordinal) keeps
    the UIDL it had if that was decided; any other gets one from the
    chooser, or our own.  A message whose candidate is a UIDL held for a
    record of the earlier index waits for the end of the scan
    (L{UidlChooser.must_wait}); L{settle} then decides it.

    @ivar waiting: the messages that wait: their number, candidates and
        provisional record.
    """

    def __init__(
        self,
        alloc: _OrdinalAllocator,
        chooser: UidlChooser,
        provisional: bool,
        *,
        own_shaped_pins: bool,
        kept: _Kept | None = None,
        raw_alloc: _OrdinalAllocator | None = None,
    ) -> None:
        """
        @param alloc: hands out ordinals of the digests scanned.
        @param chooser: chooses the UIDLs of messages not found again.
        @param provisional: leave the UIDLs chosen here undecided.
        @param own_shaped_pins: some pinned UIDL may be the same as our own
            of a new message (L{RecordTable.own_shaped_pins}).
        @param kept: the earlier index's records whose UIDL is pinned or
            undecided (keyed as L{raw_alloc} says); L{None} if there was
            no earlier index.
        @param raw_alloc: for an earlier index of a L{LEGACY_VERSIONS},
            whose digests are raw digests: finds its messages again by
            those, while C{alloc} numbers the new digests.
        """
        self._alloc = alloc
        self._chooser = chooser
        self._provisional = provisional
        self._own_shaped_pins = own_shaped_pins
        self._kept = kept
        self._raw_alloc = raw_alloc
        self._count = 0
        self.waiting: list[tuple[int, list[bytes], IndexRecord]] = []

    def records(
        self, scanned: Iterable[MessageRecord], *, from_file_start: bool
    ) -> Iterator[IndexRecord]:
        """
        The records of C{scanned}, the pseudo-message left out.

        @param from_file_start: the first scanned message is the file's first.
        """
        for m in scanned:
            if from_file_start:
                self._chooser.sequence.file_starts(m.meta)
                from_file_start = False
            if m.meta is not None and m.meta.pseudo:
                continue
            yield self._record(m)
            self._count += 1

    def _record(self, m: MessageRecord) -> IndexRecord:
        chooser = self._chooser
        candidates = chooser.candidates(m.meta)
        if self._raw_alloc is not None:
            assert m.raw_digest is not None
            raw_ordinal, reused = self._raw_alloc.allocate(m.raw_digest)
            if reused and m.digest == m.raw_digest:
                # Nothing hidden: the new digest is the old one, and so is
                # our own UIDL with the same ordinal (which C{alloc} gives
                # no one else: it counts every old one as handed out).
                ordinal = raw_ordinal
                self._alloc.note(m.digest, ordinal)
            else:
                ordinal = self._alloc.allocate(m.digest)[0]
            key = (m.raw_digest, raw_ordinal)
        else:
            ordinal, reused = self._alloc.allocate(m.digest)
            key = (m.digest, ordinal)
        if reused and self._kept is not None:
            pinned, decided = self._kept.get(key, (None, True))
            if decided:
                if pinned is None and key != (m.digest, ordinal):
                    # Our own UIDL of the old digest, kept as a string.
                    pinned = own_uidl(*key)
                    if pinned == own_uidl(m.digest, ordinal):
                        pinned = None
                if pinned is not None:
                    chooser.keep(pinned)
                return IndexRecord(
                    m.start, m.body_start, m.end, m.size, m.digest, ordinal, m.hidden, pinned
                )
        record = IndexRecord(
            m.start, m.body_start, m.end, m.size, m.digest, ordinal, m.hidden, None,
            not self._provisional,
        )  # fmt: skip
        if chooser.must_wait(candidates):
            self.waiting.append((self._count, candidates, record))
            return record
        pinned = chooser.claim(candidates)
        if pinned is not None:
            return replace(record, pinned=pinned)
        return self._own(record)

    def _own(self, record: IndexRecord) -> IndexRecord:
        """C{record} with our own UIDL, one no pinned UIDL is."""
        if not self._own_shaped_pins:
            return record
        ordinal = record.ordinal
        while self._chooser.taken(own_uidl(record.digest, ordinal)):
            ordinal = self._alloc.allocate(record.digest)[0]
        return record if ordinal == record.ordinal else replace(record, ordinal=ordinal)

    def settle(self) -> dict[int, IndexRecord]:
        """
        Decide the UIDLs of the messages that waited, in file order, now
        that the earlier records found again have kept theirs.

        @return: message number to its record, for those that changed.
        """
        changed = {}
        for number, candidates, record in self.waiting:
            pinned = self._chooser.claim(candidates)
            decided = replace(record, pinned=pinned) if pinned is not None else self._own(record)
            if decided != record:
                changed[number] = decided
        self.waiting = []
        return changed


def _own_shaped(table: RecordTable, retired_pins: Iterable[bytes]) -> bool:
    """Whether a pinned UIDL, current or retired, may be our own of a new message."""
    return table.own_shaped_pins or any(looks_own(p) for p in retired_pins)


def _full(
    st: os.stat_result,
    fd: int,
    old: MboxIndex | None,
    fmt: UidlFormat | None,
    provisional: bool,
    xuidl: bool,
) -> MboxIndex:
    old_records = RecordTable.pack(old.records) if old else RecordTable(b"")
    old_retired = old.retired if old else {}
    old_pins = old.retired_pins if old else []
    kept = old_records.choices() if old else None
    # A decided pinned UIDL of the earlier index stays with its message if
    # that is found again, and may go to a rewritten one if not; pins of
    # messages gone before are off limits (a client may still hold them).
    held = dict.fromkeys(p for p, decided in (kept or {}).values() if p is not None and decided)
    chooser = UidlChooser(
        fmt,
        old.sequence() if old else UidSequence(),
        lambda: old_pins,
        xuidl=xuidl,
        held=held,
    )
    legacy = old is not None and old.legacy
    if legacy:
        # Find the old records by their raw digests; number the new ones
        # above every ordinal the old index gave.
        raw_alloc: _OrdinalAllocator | None = _OrdinalAllocator(old_records, (), old_retired)
        alloc = _OrdinalAllocator((), old_records, old_retired)
    else:
        raw_alloc = None
        alloc = _OrdinalAllocator(old_records, (), old_retired)
    indexer = _Indexer(
        alloc,
        chooser,
        provisional,
        own_shaped_pins=_own_shaped(old_records, old_pins),
        kept=kept,
        raw_alloc=raw_alloc,
    )
    # Streamed, not listed: see RecordTable.pack.
    scanned = _scan(fd, 0, st.st_size, chooser, raw_digest=legacy)
    records = RecordTable.pack(indexer.records(scanned, from_file_start=True))
    changed = indexer.settle()
    if changed:
        records = RecordTable.pack(changed.get(i, r) for i, r in enumerate(records))
    uidvalidity, next_uid, prev_uid = chooser.sequence.state()
    return MboxIndex(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        records,
        (raw_alloc or alloc).retired(old_retired),
        0,
        *probes(fd, st.st_size),
        uidvalidity=uidvalidity,
        next_uid=next_uid,
        prev_uid=prev_uid,
        retired_pins=retire_pins(old_pins, chooser.unclaimed_held()),
    )


def _digest_of(fd: int, record: IndexRecord, stop: int) -> bytes:
    """The digest of C{record}'s message as it runs to C{stop} in the file now."""
    digest = MessageDigest(record.start, record.body_start, record.hidden)
    pos = record.start
    while pos < stop:
        data = os.pread(fd, min(_READ_CHUNK, stop - pos), pos)
        if not data:
            break
        digest.update(data)
        pos += len(data)
    return digest.digest()


def _line_end_added(
    fd: int, old: MboxIndex, last: IndexRecord, now: MessageRecord, stop: int
) -> bool:
    """
    Whether the last indexed message is as it was, with only a line end
    added after it (the final LF it lacked, or a blank separator line),
    which an MDA writes before the next message: what RETR sends is the
    same.

    @param now: the message as scanned now, from C{last.start}.
    @param stop: where it runs to now (the next message, or EOF).
    """
    added = stop - old.size
    if (
        not 0 < added <= _MAX_LINE_ENDS
        or (now.start, now.body_start, now.size) != (last.start, last.body_start, last.size)
        or os.pread(fd, added, old.size).strip(b"\r\n")
    ):
        return False
    return _digest_of(fd, last, old.size) == last.digest


def _grown(
    st: os.stat_result,
    fd: int,
    old: MboxIndex,
    fmt: UidlFormat | None,
    provisional: bool,
    xuidl: bool,
) -> MboxIndex | None:
    table = RecordTable.pack(old.records)
    last = table[-1]
    retired = dict(old.retired)
    # Every message of the old index is still in the file.
    chooser = UidlChooser(
        fmt,
        old.sequence(),
        lambda: table.pinned_uidls() | set(old.retired_pins),
        xuidl=xuidl,
    )
    scanned = list(_scan(fd, last.start, st.st_size, chooser))
    if not scanned or scanned[0].start != last.start:
        return None
    first = scanned[0]
    alloc = _OrdinalAllocator((), table, old.retired)
    if first.digest != last.digest:
        stop = scanned[1].start if len(scanned) > 1 else st.st_size
        if not _line_end_added(fd, old, last, first, stop):
            return None
        # The same message, digested with its new line end; it keeps its
        # UIDL, and its old digest and ordinal are never given again.
        ordinal = alloc.allocate(first.digest)[0]
        pinned = last.uidl if last.uidl != own_uidl(first.digest, ordinal) else None
        record = IndexRecord(
            first.start, first.body_start, first.end, first.size, first.digest, ordinal,
            first.hidden, pinned, last.decided,
        )  # fmt: skip
        retired[last.digest] = max(retired.pop(last.digest, 0), last.ordinal + 1)
        table = RecordTable.pack([*table[:-1], record])
    # The last message is the one indexed (its bytes, or those and a line
    # end, as above): only what follows it is new.
    indexer = _Indexer(
        alloc, chooser, provisional, own_shaped_pins=_own_shaped(table, old.retired_pins)
    )
    records = RecordTable.pack(indexer.records(scanned[1:], from_file_start=False), prefix=table)
    uidvalidity, next_uid, prev_uid = chooser.sequence.state()
    return MboxIndex(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        records,
        trim_retired(retired),
        last.start,
        *probes(fd, st.st_size),
        uidvalidity=uidvalidity,
        next_uid=next_uid,
        prev_uid=prev_uid,
        retired_pins=list(old.retired_pins),
    )


def load_index(
    fd: int,
    index_path: str,
    *,
    uidl_format: UidlFormat | None = None,
    provisional: bool = False,
    reuse_xuidl: bool | None = None,
) -> MboxIndex:
    """
    Bring the index of the open mbox C{fd} up to date.

    The caller holds the mbox lock.  A stored index that matches the file is
    used as is; if the same file only grew, only the last indexed message
    and what follows it are read; otherwise the whole file is scanned and
    the old ordinals and UIDLs are reused by digest, in file order.  A
    changed index is written back; failing to write it is logged, not
    fatal.

    @param fd: an open descriptor of the mbox.
    @param index_path: where the index lives.
    @param uidl_format: the format of new messages' UIDLs (L{pop3srv.mbox.pins});
        L{None} for our own.
    @param provisional: for a tool that reads the maildrop without serving
        it: the UIDLs of messages no earlier index had are chosen (and
        shown) but stay undecided, so the server's next load decides them
        with its own format.  A stored index with undecided UIDLs is used
        as it is only by such a load; the server's rescans the file.
    @param reuse_xuidl: whether C{X-UIDL} fields give new messages'
        UIDLs; L{None} for the default (L{xuidl_reused}).
    @return: the current index.
    """
    reuse = xuidl_reused(reuse_xuidl, uidl_format)
    st = os.fstat(fd)
    old = read_index(index_path, st.st_size)
    if (
        old is not None
        and (old.dev, old.ino) == (st.st_dev, st.st_ino)
        and not old.legacy
        and (provisional or not RecordTable.pack(old.records).undecided)
    ):
        head, tail = probes(fd, old.size)
        if (
            (old.size, old.mtime_ns, old.tail_probe) == (st.st_size, st.st_mtime_ns, tail)
            and head == old.head_probe
            and boundaries_hold(fd, old.records, old.size)
        ):
            return old
        if (
            old.size < st.st_size
            and old.records
            and head == old.head_probe
            and boundaries_hold(fd, old.records, old.size)
        ):
            with _scanning("append"):
                grown = _grown(st, fd, old, uidl_format, provisional, reuse)
            if grown is not None:
                save_index(index_path, grown)
                return grown
    with _scanning("full"):
        index = _full(st, fd, old, uidl_format, provisional, reuse)
    save_index(index_path, index)
    return index


@contextmanager
def _scanning(kind: str) -> Iterator[None]:
    """Count a scan of C{kind} (C{full} or C{append}) and its duration, if it ends."""
    with PROCESS.timed(INDEX_SCAN_SECONDS, kind=kind):
        yield
    PROCESS.inc(INDEX_SCANS, kind=kind)


def empty_index() -> MboxIndex:
    """
    The index of a maildrop whose mbox file does not exist.
    """
    return MboxIndex(0, 0, 0, 0, [], {}, scanned_from=None)


#: Index files this process could not encode, told once each.
_unencodable: set[str] = set()
_MAX_UNENCODABLE = 10_000


def save_index(index_path: str, index: MboxIndex) -> bool:
    """
    Write the index, or log why not: the index is a cache, and a maildrop
    whose index cannot be stored is served all the same (the next open
    scans it again).

    @return: whether it was written.
    """
    shown = display_path(index_path)
    try:
        write_index(index_path, index)
    except IndexEncodingError as e:
        # The same mbox would fail the same way at every open: say it once.
        if index_path not in _unencodable:
            if len(_unencodable) >= _MAX_UNENCODABLE:
                _unencodable.clear()
            _unencodable.add(index_path)
            _log.warn("Cannot store the index {path}, so it is not written: {error}",
                      path=shown, error=e)  # fmt: skip
        return False
    except OSError as e:
        _log.warn("Cannot write index {path}: {error}", path=shown, error=e.strerror or e)
        return False
    return True
