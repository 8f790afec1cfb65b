# -*- test-case-name: tests.test_mbox_index -*-
"""
The persisted per-mbox index that keeps UIDLs stable and reopening cheap.

A message's UIDL is the hex of its digest; when several messages share a
digest (identical deliveries) each carries a persisted ordinal, and every
ordinal but 0 is appended as C{.N}.  Ordinals that left the file are
remembered (the I{retired} table), so a later identical arrival never gets
a UIDL a client has already seen.

File layout (little endian): a header (magic, version, st_dev, st_ino,
size, mtime_ns, hashes of the first and last 4 KiB, record count, retired
count), fixed-size records, retired
entries, then a blake2b checksum of everything before it.

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
from pop3srv.mbox.scan import DIGEST_SIZE, MessageRecord, scan_mbox

_log = Logger()

_PROBE_SIZE = 16
#: Bytes hashed at each end of the mbox to tell a replaced file from ours
#: when inode, size and (coarse) mtime all happen to match.
PROBE_SPAN = 4096

MAGIC = b"P3MBXIDX"
VERSION = 1
_HEADER = struct.Struct(f"<8sIIQQQq{_PROBE_SIZE}s{_PROBE_SIZE}sQQ")
_RECORD = struct.Struct(f"<QQQQ{DIGEST_SIZE}sI")
_RETIRED = struct.Struct(f"<{DIGEST_SIZE}sI")
_CHECKSUM_SIZE = 16

#: Most retired digests remembered; the oldest are forgotten first.
MAX_RETIRED = 100_000

#: The shortest distance between two message starts: C{From } and an LF.
_MIN_MESSAGE = len(b"From \n")

#: Message starts checked before a stored index is trusted: half spread
#: evenly over the file, half drawn at random on each open, so that no
#: pattern of edits is missed on every open.  Each is one read of a few
#: octets.
BOUNDARY_SAMPLES = 24

_random = random.SystemRandom()


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """
    A scanned message plus its persisted UIDL ordinal.

    @ivar ordinal: 0 for the first message with this digest, then 1, 2, ...
    """

    start: int
    body_start: int
    end: int
    size: int
    digest: bytes
    ordinal: int

    @property
    def uidl(self) -> bytes:
        """
        The POP3 unique-id: hex digest, plus C{.N} for ordinal N > 0.
        """
        uid = self.digest.hex().encode("ascii")
        if self.ordinal:
            uid += b".%d" % (self.ordinal,)
        return uid

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


class RecordTable(Sequence[IndexRecord]):
    """
    The records of an index, packed as they are stored in its file.

    A mailbox of tens of thousands of messages as that many Python objects
    costs several MiB per open session, and the allocator keeps much of it
    after the session ends; packed, it is one buffer of 48 bytes a message.
    Records are unpacked when asked for.
    """

    __slots__ = ("_count", "_data")

    def __init__(self, data: bytes) -> None:
        """
        @param data: packed records, L{_RECORD} each.
        """
        if len(data) % _RECORD.size:
            raise ValueError("not a whole number of records")
        self._data = data
        self._count = len(data) // _RECORD.size

    @classmethod
    def pack(cls, records: Iterable[IndexRecord]) -> RecordTable:
        """Pack records (or return a table as it is)."""
        if isinstance(records, RecordTable):
            return records
        # Packed one by one into one buffer: a record is garbage as soon as
        # it is packed, so a streamed scan never holds them all as objects.
        pack = _RECORD.pack
        data = bytearray()
        for r in records:
            data += pack(r.start, r.body_start, r.end, r.size, r.digest, r.ordinal)
        return cls(bytes(data))

    @property
    def data(self) -> bytes:
        """The packed records, as written to the index file."""
        return self._data

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
        return IndexRecord(*_RECORD.unpack_from(self._data, i * _RECORD.size))

    def __iter__(self) -> Iterator[IndexRecord]:
        for fields in _RECORD.iter_unpack(self._data):
            yield IndexRecord(*fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordTable):
            return self._data == other._data
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def sizes(self) -> list[int]:
        """Every record's C{size}, without unpacking whole records."""
        if sys.byteorder == "little":
            # Each record is six little-endian 64-bit words; size is the 4th.
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

    def allocate(self, digest: bytes) -> int:
        """
        The ordinal for the next message with C{digest}, in file order.
        """
        queue = self._reuse.get(digest)
        if queue:
            return queue.popleft()
        ordinal = self._next.get(digest, 0)
        self._next[digest] = ordinal + 1
        return ordinal

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


def encode_index(index: MboxIndex) -> bytes:
    """
    Serialise C{index} with its checksum.
    """
    parts = [
        _HEADER.pack(
            MAGIC,
            VERSION,
            0,
            index.dev,
            index.ino,
            index.size,
            index.mtime_ns,
            index.head_probe,
            index.tail_probe,
            len(index.records),
            len(index.retired),
        )
    ]
    parts.append(RecordTable.pack(index.records).data)
    parts.extend(_RETIRED.pack(d, n) for d, n in index.retired.items())
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_CHECKSUM_SIZE).digest()


def decode_index(data: bytes) -> MboxIndex | None:
    """
    Parse an index file; anything damaged or foreign gives L{None}.
    """
    if len(data) < _HEADER.size + _CHECKSUM_SIZE:
        return None
    body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
    if hashlib.blake2b(body, digest_size=_CHECKSUM_SIZE).digest() != checksum:
        return None
    magic, version, _flags, dev, ino, size, mtime_ns, head, tail, n_rec, n_ret = (
        _HEADER.unpack_from(body)
    )
    if magic != MAGIC or version != VERSION:
        return None
    rec_end = _HEADER.size + n_rec * _RECORD.size
    if len(body) != rec_end + n_ret * _RETIRED.size:
        return None
    records = RecordTable(body[_HEADER.size : rec_end])
    retired = dict(_RETIRED.iter_unpack(body[rec_end:]))
    return MboxIndex(dev, ino, size, mtime_ns, records, retired, head_probe=head, tail_probe=tail)


def index_size_limit(mbox_size: int) -> int:
    """
    The largest index file we could have written for an mbox of
    C{mbox_size} octets, or for an earlier, larger version of it.

    Records: at most one per L{_MIN_MESSAGE} octets of the file, plus
    L{MAX_RETIRED} for messages that have left it since (an index of a
    file that shrank still holds them, and no more of them than the
    retired table can keep are of use); retired entries: L{MAX_RETIRED}.

    @param mbox_size: the mbox's size now.
    @return: octets.
    """
    records = mbox_size // _MIN_MESSAGE + 1 + MAX_RETIRED
    return _HEADER.size + records * _RECORD.size + MAX_RETIRED * _RETIRED.size + _CHECKSUM_SIZE


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
    """
    directory, base = os.path.split(index_path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_index(index))
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


def _scan(fd: int, start: int, limit: int) -> Iterator[MessageRecord]:
    # closefd=False: the caller's fd (and its lock) must outlive the scan.
    with open(fd, "rb", buffering=0, closefd=False) as f:
        yield from scan_mbox(f, start, limit)


def _full(st: os.stat_result, fd: int, old: MboxIndex | None) -> MboxIndex:
    # Streamed, not listed: see RecordTable.pack.
    scanned = _scan(fd, 0, st.st_size)
    old_records: Sequence[IndexRecord] = old.records if old else ()
    old_retired = old.retired if old else {}
    alloc = _OrdinalAllocator(old_records, (), old_retired)
    records = RecordTable.pack(
        IndexRecord(m.start, m.body_start, m.end, m.size, m.digest, alloc.allocate(m.digest))
        for m in scanned
    )
    return MboxIndex(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        records,
        alloc.retired(old_retired),
        0,
        *probes(fd, st.st_size),
    )


def _grown(st: os.stat_result, fd: int, old: MboxIndex) -> MboxIndex | None:
    last = old.records[-1]
    scanned = list(_scan(fd, last.start, st.st_size))
    if not scanned or scanned[0].start != last.start:
        return None
    if scanned[0].digest != last.digest:
        return None
    kept = RecordTable.pack(old.records).data[: -_RECORD.size]
    alloc = _OrdinalAllocator((), old.records, old.retired)
    m = scanned[0]
    appended = [IndexRecord(m.start, m.body_start, m.end, m.size, m.digest, last.ordinal)]
    appended.extend(
        IndexRecord(m.start, m.body_start, m.end, m.size, m.digest, alloc.allocate(m.digest))
        for m in scanned[1:]
    )
    records = RecordTable(kept + RecordTable.pack(appended).data)
    return MboxIndex(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        records,
        dict(old.retired),
        last.start,
        *probes(fd, st.st_size),
    )


def load_index(fd: int, index_path: str) -> MboxIndex:
    """
    Bring the index of the open mbox C{fd} up to date.

    The caller holds the mbox lock.  A stored index that matches the file is
    used as is; if the same file only grew, only the last indexed message
    and what follows it are read; otherwise the whole file is scanned and
    the old ordinals are reused by digest, in file order.  A changed index
    is written back; failing to write it is logged, not fatal.

    @param fd: an open descriptor of the mbox.
    @param index_path: where the index lives.
    @return: the current index.
    """
    st = os.fstat(fd)
    old = read_index(index_path, st.st_size)
    if old is not None and (old.dev, old.ino) == (st.st_dev, st.st_ino):
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
                grown = _grown(st, fd, old)
            if grown is not None:
                _save(index_path, grown)
                return grown
    with _scanning("full"):
        index = _full(st, fd, old)
    _save(index_path, index)
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


def _save(index_path: str, index: MboxIndex) -> None:
    try:
        write_index(index_path, index)
    except OSError as e:
        _log.warn("Cannot write index {path}: {error}", path=display_path(index_path), error=e)
