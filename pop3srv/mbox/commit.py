# -*- test-case-name: tests.test_mbox_commit -*-
"""
Crash-safe, in-place commit of deletions, and recovery after a crash.

The mbox is rewritten in place so that its inode, owner and mode stay; a
new file renamed over it would let an MDA that is waiting on the old inode
append to a deleted file.  The new bytes of C{[P, new_size)} (P = start of
the first deleted message) go first into a journal; once the journal and
its directory are synced the commit is decided, and applying it (pwrite,
ftruncate, fsync, unlink journal) can be repeated after a crash by
L{recover}.

Everything here blocks and expects the caller to hold L{MboxFileLock}.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.logger import Logger

from pop3srv.core.errors import MaildropChanged
from pop3srv.mbox.index import MboxIndex, RecordTable, probes, trim_retired
from pop3srv.mbox.paths import StatePaths, fsync_dir

_log = Logger()

#: Bytes copied per read/write.
COPY_CHUNK = 1 << 20

MAGIC = b"P3MBXJNL"
VERSION = 1
_HASH_SIZE = 32
_HEADER = struct.Struct(f"<8sIQQQQQQ{_HASH_SIZE}s{_HASH_SIZE}s")
HEADER_SIZE = _HEADER.size + _HASH_SIZE

#: A fault-injection hook for tests: called with the name of each phase
#: just reached ("journal_written", "payload_partial", "payload_written",
#: "truncated"); raising from it simulates a crash there.
FaultHook = Callable[[str], None]


def no_fault(point: str) -> None:
    """
    The production L{FaultHook}: no faults.
    """


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=_HASH_SIZE)


@dataclass(frozen=True, slots=True)
class JournalHeader:
    """
    What a journal says.

    @ivar dev: C{st_dev} of the mbox it belongs to.
    @ivar ino: C{st_ino} of the mbox it belongs to.
    @ivar start: P, where the payload goes.
    @ivar old_size: the mbox size when the journal was made.
    @ivar new_size: the mbox size after applying it, C{start + len(payload)}.
    @ivar cut_hash: blake2b of the old bytes C{[new_size, old_size)}, which
        the truncate removes.
    @ivar payload_hash: blake2b of the payload.
    """

    dev: int
    ino: int
    start: int
    old_size: int
    new_size: int
    cut_hash: bytes
    payload_hash: bytes

    def encode(self) -> bytes:
        """
        The header bytes, checksum included.
        """
        body = _HEADER.pack(
            MAGIC,
            VERSION,
            self.dev,
            self.ino,
            self.start,
            self.old_size,
            self.new_size,
            self.new_size - self.start,
            self.cut_hash,
            self.payload_hash,
        )
        return body + hashlib.blake2b(body, digest_size=_HASH_SIZE).digest()

    @classmethod
    def decode(cls, data: bytes) -> JournalHeader | None:
        """
        Parse a header; L{None} if it is damaged or foreign.
        """
        if len(data) != HEADER_SIZE:
            return None
        body, checksum = data[: _HEADER.size], data[_HEADER.size :]
        if hashlib.blake2b(body, digest_size=_HASH_SIZE).digest() != checksum:
            return None
        (magic, version, dev, ino, start, old, new, length, cut, payload) = _HEADER.unpack(body)
        if magic != MAGIC or version != VERSION or new - start != length:
            return None
        return cls(dev, ino, start, old, new, cut, payload)


def _copy_range(src: int, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
    """
    Read C{[offset, offset + length)} of C{src} in chunks into C{sink}.

    @raise MaildropChanged: if the file ends early.
    """
    end = offset + length
    while offset < end:
        data = os.pread(src, min(COPY_CHUNK, end - offset), offset)
        if not data:
            raise MaildropChanged("mbox shrank while being read")
        sink(data)
        offset += len(data)


def _hash_range(fd: int, offset: int, length: int) -> bytes:
    h = _hasher()
    _copy_range(fd, offset, length, h.update)
    return h.digest()


class _JournalWriter:
    """
    Streams a payload into a temporary journal, then installs it.
    """

    def __init__(self, journal_path: str) -> None:
        self.path = journal_path
        directory, base = os.path.split(journal_path)
        self.fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
        self.length = 0
        self.hash = _hasher()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, HEADER_SIZE + self.length)
            self.length += n
            view = view[n:]
        self.hash.update(data)

    def install(self, header: JournalHeader) -> None:
        """
        Write the header, sync, and rename into place: the commit point.
        """
        os.pwrite(self.fd, header.encode(), 0)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class _HashTee:
    """
    Hashes what it is given and, for a kept message, copies it on.
    """

    def __init__(self, digest_size: int, writer: _JournalWriter | None) -> None:
        self.hash = hashlib.blake2b(digest_size=digest_size)
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        if self.writer is not None:
            self.writer.write(data)


def _apply(
    mbox_fd: int,
    journal_path: str,
    journal_fd: int,
    header: JournalHeader,
    fault: FaultHook,
) -> None:
    """
    Apply a committed journal to the mbox; safe to repeat after a crash.
    """
    length = header.new_size - header.start
    half = length // 2
    written = 0

    def put(data: bytes) -> None:
        nonlocal written
        view = memoryview(data)
        while view:
            n = os.pwrite(mbox_fd, view, header.start + written)
            written += n
            view = view[n:]

    _copy_range(journal_fd, HEADER_SIZE, half, put)
    fault("payload_partial")
    _copy_range(journal_fd, HEADER_SIZE + half, length - half, put)
    fault("payload_written")
    os.ftruncate(mbox_fd, header.new_size)
    fault("truncated")
    os.fsync(mbox_fd)
    os.unlink(journal_path)
    fsync_dir(os.path.dirname(journal_path))


def commit_deletions(
    mbox_fd: int,
    paths: StatePaths,
    index: MboxIndex,
    deleted: Iterable[int],
    *,
    fault: FaultHook = no_fault,
) -> MboxIndex | None:
    """
    Remove the messages C{deleted} from the mbox, durably and in place.

    The caller holds L{MboxFileLock}.  Mail appended after the snapshot
    C{index} was taken is kept.

    @param mbox_fd: a read-write descriptor of the mbox the index describes.
    @param paths: the state file names.
    @param index: the snapshot the session has shown the client.
    @param deleted: indexes into C{index.records}.
    @param fault: test hook, see L{FaultHook}.
    @return: the index of the new file (UIDLs unchanged; mail appended
        during the session is left for the next load to index), or L{None}
        if the commit is decided but applying it failed (it is then
        finished by the next L{recover}).
    @raise MaildropChanged: the mbox is not the one in C{index} any more;
        nothing was changed.
    @raise OSError: the commit failed before its commit point; nothing was
        changed.
    """
    gone = sorted(set(deleted))
    if not gone:
        return index
    records = index.records
    st = os.fstat(mbox_fd)
    try:
        cur = os.stat(paths.mbox)
    except FileNotFoundError as e:
        raise MaildropChanged("mbox was removed") from e
    ident = (index.dev, index.ino)
    if ident != (st.st_dev, st.st_ino) or ident != (cur.st_dev, cur.st_ino):
        raise MaildropChanged("mbox was replaced")
    current_size = st.st_size
    if current_size < index.size:
        raise MaildropChanged("mbox shrank")
    first = gone[0]
    start = records[first].start
    gone_set = set(gone)
    writer = _JournalWriter(paths.journal)
    try:
        for i in range(first, len(records)):
            rec = records[i]
            stop = records[i + 1].start if i + 1 < len(records) else index.size
            check = _HashTee(len(rec.digest), None if i in gone_set else writer)
            _copy_range(mbox_fd, rec.start, stop - rec.start, check.write)
            if check.hash.digest() != rec.digest:
                raise MaildropChanged(f"message {i} changed under us")
        _copy_range(mbox_fd, index.size, current_size - index.size, writer.write)
        new_size = start + writer.length
        header = JournalHeader(
            dev=st.st_dev,
            ino=st.st_ino,
            start=start,
            old_size=current_size,
            new_size=new_size,
            cut_hash=_hash_range(mbox_fd, new_size, current_size - new_size),
            payload_hash=writer.hash.digest(),
        )
        writer.install(header)
    except BaseException:
        writer.abandon()
        raise
    fault("journal_written")
    try:
        jfd = os.open(paths.journal, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _apply(mbox_fd, paths.journal, jfd, header, fault)
        finally:
            os.close(jfd)
    except OSError:
        # Past the commit point the deletions are decided and durable in
        # the journal; the next open (or sync) applies it.
        _log.failure(
            "Commit of {path} is journalled but could not be applied yet",
            path=paths.mbox,
        )
        return None
    return _index_after(index, gone_set, mbox_fd)


def _index_after(index: MboxIndex, gone: set[int], fd: int) -> MboxIndex:
    """
    The snapshot index with C{gone} removed and later records shifted.
    """
    st = os.fstat(fd)
    records = []
    retired = dict(index.retired)
    shift = 0
    for i, rec in enumerate(index.records):
        if i in gone:
            stop = index.records[i + 1].start if i + 1 < len(index.records) else index.size
            shift -= stop - rec.start
            # Re-inserted so the newest retirements are the last forgotten.
            retired[rec.digest] = max(retired.pop(rec.digest, 0), rec.ordinal + 1)
        else:
            records.append(rec.shifted(shift) if shift else rec)
    # Mail appended during the session lies beyond index.size + shift; the
    # next load sees the file "grown" and indexes just that part.
    size = index.size + shift
    return MboxIndex(
        st.st_dev,
        st.st_ino,
        size,
        st.st_mtime_ns,
        RecordTable.pack(records),
        trim_retired(retired),
        None,
        *probes(fd, size),
    )


def _read_journal(journal_path: str, mbox_st: os.stat_result) -> tuple[int, JournalHeader] | None:
    """
    Open and fully validate a journal for this mbox.

    @return: C{(fd, header)}, or L{None} if it is invalid (it is then
        logged and removed).
    """
    fd = os.open(journal_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = JournalHeader.decode(os.pread(fd, HEADER_SIZE, 0))
        problem = None
        if header is None:
            problem = "damaged header"
        elif header.ino != mbox_st.st_ino:
            # Not st_dev: device numbers can change across a reboot (LVM,
            # btrfs, NFS), and discarding a committed journal then would leave
            # a half-applied mbox.  recover() checks the file's content too.
            problem = "journal belongs to another file"
        elif os.fstat(fd).st_size != HEADER_SIZE + header.new_size - header.start:
            problem = "truncated payload"
        elif _hash_range(fd, HEADER_SIZE, header.new_size - header.start) != header.payload_hash:
            problem = "payload checksum mismatch"
    except BaseException:
        os.close(fd)
        raise
    if problem is None and header is not None:
        return fd, header
    os.close(fd)
    _log.warn(
        "Discarding invalid journal {path}: {problem}",
        path=journal_path,
        problem=problem,
    )
    os.unlink(journal_path)
    fsync_dir(os.path.dirname(journal_path))
    return None


def recover(mbox_path: str, journal_path: str, *, fault: FaultHook = no_fault) -> bool:
    """
    Finish a commit that a crash interrupted.

    Call this under L{MboxFileLock} every time the maildrop is opened,
    before its index is used.  Mail an MDA appended after the crash is
    kept, whether the crash came before or after the truncate.

    @param mbox_path: the mbox.
    @param journal_path: its journal.
    @param fault: test hook, see L{FaultHook}.
    @return: whether a journal was applied.
    """
    if not os.path.exists(journal_path):
        return False
    try:
        mbox_fd = os.open(mbox_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        found = _read_journal(journal_path, os.fstat(mbox_fd))
        if found is None:
            return False
        jfd, header = found
        try:
            size = os.fstat(mbox_fd).st_size
            cut = header.old_size - header.new_size
            if size >= header.old_size and (
                _hash_range(mbox_fd, header.new_size, cut) == header.cut_hash
            ):
                # Not truncated yet: beyond old_size is mail from after the crash.
                tail_start = header.old_size
            elif (
                size >= header.new_size
                and _hash_range(mbox_fd, header.start, header.new_size - header.start)
                == header.payload_hash
            ):
                # Truncated, so the payload is fully in place: beyond it is new mail.
                tail_start = header.new_size
            else:
                # Neither state of our commit: another program rewrote the file
                # after the crash.  Applying the journal now would duplicate or
                # lose mail, so set it aside for the admin.
                _set_aside(journal_path, mbox_path)
                return False
            if size > tail_start:
                os.close(jfd)
                jfd = -1
                jfd, header = _rejournal(mbox_fd, journal_path, header, tail_start, size)
            _log.info("Recovering interrupted commit of {path}", path=mbox_path)
            _apply(mbox_fd, journal_path, jfd, header, fault)
        finally:
            if jfd >= 0:
                os.close(jfd)
        return True
    finally:
        os.close(mbox_fd)


def _set_aside(journal_path: str, mbox_path: str) -> None:
    kept = f"{journal_path}.rejected-{int(time.time())}"
    os.rename(journal_path, kept)
    fsync_dir(os.path.dirname(journal_path))
    _log.critical(
        "Journal of an interrupted commit no longer matches {path}, which another program "
        "rewrote; not applied, kept as {kept} for inspection",
        path=mbox_path,
        kept=kept,
    )


def _rejournal(
    mbox_fd: int,
    journal_path: str,
    header: JournalHeader,
    tail_start: int,
    size: int,
) -> tuple[int, JournalHeader]:
    """
    Replace the journal by one whose payload also holds C{[tail_start,
    size)} of the mbox, mail delivered after the crash.
    """
    writer = _JournalWriter(journal_path)
    try:
        old = os.open(journal_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _copy_range(old, HEADER_SIZE, header.new_size - header.start, writer.write)
        finally:
            os.close(old)
        _copy_range(mbox_fd, tail_start, size - tail_start, writer.write)
        new_size = header.start + writer.length
        fresh = JournalHeader(
            dev=header.dev,
            ino=header.ino,
            start=header.start,
            old_size=size,
            new_size=new_size,
            cut_hash=_hash_range(mbox_fd, new_size, max(0, size - new_size)),
            payload_hash=writer.hash.digest(),
        )
        writer.install(fresh)
    except BaseException:
        writer.abandon()
        raise
    return os.open(journal_path, os.O_RDONLY | os.O_CLOEXEC), fresh
