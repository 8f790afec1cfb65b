# -*- test-case-name: tests.test_mbox_commit -*-
"""
Crash-safe, in-place commit of deletions, and recovery after a crash.

The mbox is rewritten in place so that its inode, owner and mode stay; a
new file renamed over it would let an MDA that is waiting on the old inode
append to a deleted file.  With P the start of the first deleted message,
a commit runs these steps, each made durable before the next relies on it:

 1. The new bytes of C{[P, new_size)} (the payload) go into a journal,
    which is synced and renamed into place, and its directory synced: the
    commit point.
 2. The payload is written over C{[P, new_size)} of the mbox, and
    L{CUT_MARK} over the first bytes of C{[new_size, old_size)}, the part
    the truncate will cut; then the mbox is C{fdatasync}ed.  Without that
    sync the disk may keep the truncate of step 4 and lose these writes.
 3. The journal's phase slot is set to "truncating to new_size" and the
    journal C{fdatasync}ed: the truncate is decided.
 4. The mbox is truncated to C{new_size} and C{fsync}ed.
 5. The journal is removed and its directory synced.

L{recover} finishes a commit that a crash interrupted.  Before step 3 the
file was never truncated, so it is at least C{old_size} long and anything
beyond C{old_size} is mail an MDA delivered after the crash; steps 2 to 5
are done again.  After step 3 the payload is durable in place; the truncate
has not happened if L{CUT_MARK} is still at C{new_size}, and has happened
otherwise, and then everything beyond C{new_size} is mail delivered since,
even a message byte-identical to the part cut away: an MDA's delivery
starts with C{From } (or a blank line), never with the mark's NUL.  The
phase alone could not tell a crash just before the truncate from one just
after it followed by such a delivery; the mark alone could not tell it
from a crash before step 2 ended.

Journals of L{LEGACY_VERSION} (no phase slot, no mark) are still
recovered by their own rules, which cannot make that distinction; they
are rewritten in the current format before anything is applied.

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
from enum import Enum

from twisted.logger import Logger

from pop3srv.core.errors import MaildropChanged
from pop3srv.core.metrics import COMMIT_FAILURES, JOURNALS_PENDING, JOURNALS_RECOVERED, PROCESS
from pop3srv.mbox.index import (
    IndexRecord,
    MboxIndex,
    RecordTable,
    probes,
    retire_pins,
    trim_retired,
)
from pop3srv.mbox.paths import (
    StatePaths,
    UnsafeStateFile,
    display_path,
    fsync_dir,
    open_mbox_file,
    open_state_file,
)
from pop3srv.mbox.scan import MessageDigest

_log = Logger()

#: Bytes copied per read/write.
COPY_CHUNK = 1 << 20

MAGIC = b"P3MBXJNL"
#: The journal format written: a header, a phase slot, the payload.
VERSION = 2
#: The format of earlier releases: a header and the payload.
LEGACY_VERSION = 1
_HASH_SIZE = 32
_HEADER = struct.Struct(f"<8sIQQQQQQ{_HASH_SIZE}s{_HASH_SIZE}s")
HEADER_SIZE = _HEADER.size + _HASH_SIZE

_PHASE_MAGIC = b"P3MBXTRN"
_PHASE = struct.Struct("<8sQ")
#: Octets reserved after a L{VERSION} header for the phase record; zeros
#: until the truncate is decided.  One small write inside one sector: it
#: lands whole or (checked by its digest) counts as not written.
PHASE_SIZE = 64

#: Written over the first octets of the part a commit cuts off, before the
#: truncate is decided, so that the untruncated file cannot look like a
#: truncated one plus a delivery.  It starts with a NUL, which no MDA
#: writes where a message begins.
CUT_MARK = b"\x00pop3srv-cut\x00"

#: A fault-injection hook for tests: called with the name of each phase
#: just reached (see L{FAULT_POINTS}); raising from it simulates a crash
#: there.
FaultHook = Callable[[str], None]

#: The points a L{FaultHook} is called at, in order.
FAULT_POINTS = (
    "journal_written",
    "payload_partial",
    "payload_written",
    "cut_marked",
    "truncate_decided",
    "truncated",
)


def no_fault(point: str) -> None:
    """
    The production L{FaultHook}: no faults.
    """


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=_HASH_SIZE)


class _Phase(Enum):
    """
    How far a journal says its commit went.
    """

    LEGACY = "legacy"
    """A L{LEGACY_VERSION} journal: it does not say."""
    COMMITTED = "committed"
    """Decided; the mbox was not truncated yet."""
    TRUNCATING = "truncating"
    """Payload and mark are durable in place; the truncate was decided."""


@dataclass(frozen=True, slots=True)
class JournalHeader:
    """
    What a journal says.

    @ivar dev: C{st_dev} of the mbox it belongs to.
    @ivar ino: C{st_ino} of the mbox it belongs to.
    @ivar start: P, where the payload goes.
    @ivar old_size: the mbox size when the journal was made.
    @ivar new_size: the mbox size after applying it, C{start + len(payload)}.
    @ivar cut_hash: blake2b of the old bytes of L{cut_span}, the part the
        truncate removes less the bytes L{CUT_MARK} overwrites.
    @ivar payload_hash: blake2b of the payload.
    @ivar version: the format, L{VERSION} or L{LEGACY_VERSION}.
    """

    dev: int
    ino: int
    start: int
    old_size: int
    new_size: int
    cut_hash: bytes
    payload_hash: bytes
    version: int = VERSION

    @property
    def length(self) -> int:
        """The payload's length."""
        return self.new_size - self.start

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the journal."""
        return HEADER_SIZE + (PHASE_SIZE if self.version >= VERSION else 0)

    @property
    def mark(self) -> bytes:
        """What step 2 writes at C{new_size}: L{CUT_MARK}, cut to fit."""
        if self.version < VERSION:
            return b""
        return CUT_MARK[: max(0, self.old_size - self.new_size)]

    @property
    def cut_span(self) -> tuple[int, int]:
        """C{(offset, length)} of the old bytes C{cut_hash} covers."""
        offset = self.new_size + len(self.mark)
        return offset, max(0, self.old_size - offset)

    def encode(self) -> bytes:
        """
        The header bytes, checksum included.
        """
        body = _HEADER.pack(
            MAGIC,
            self.version,
            self.dev,
            self.ino,
            self.start,
            self.old_size,
            self.new_size,
            self.length,
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
        if magic != MAGIC or version not in (VERSION, LEGACY_VERSION) or new - start != length:
            return None
        if not start <= new <= old:
            return None
        return cls(dev, ino, start, old, new, cut, payload, version)

    def truncating(self) -> bytes:
        """
        The phase slot that says the truncate to C{new_size} is decided,
        bound to this header by a digest.
        """
        body = _PHASE.pack(_PHASE_MAGIC, self.new_size)
        digest = hashlib.blake2b(
            body + self.encode(), digest_size=PHASE_SIZE - _PHASE.size
        ).digest()
        return body + digest


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def _cut_hash(mbox_fd: int, new_size: int, size: int) -> bytes:
    """
    The C{cut_hash} of a L{VERSION} journal that truncates C{[0, size)} of
    the mbox to C{new_size}.
    """
    offset = new_size + min(len(CUT_MARK), size - new_size)
    return _hash_range(mbox_fd, offset, size - offset)


class _JournalWriter:
    """
    Streams a payload into a temporary journal, then installs it.
    """

    def __init__(self, journal_path: str) -> None:
        self.path = journal_path
        directory, base = os.path.split(journal_path)
        # mkstemp: O_EXCL, so nothing planted under the name is followed.
        self.fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
        self.length = 0
        self.hash = _hasher()

    def write(self, data: bytes) -> None:
        _pwrite_all(self.fd, data, HEADER_SIZE + PHASE_SIZE + self.length)
        self.length += len(data)
        self.hash.update(data)

    def install(self, header: JournalHeader) -> int:
        """
        Write the header and an empty phase slot, sync, and rename into
        place: the commit point.

        @return: the journal's descriptor (read-write), now the caller's.
        """
        _pwrite_all(self.fd, header.encode() + bytes(PHASE_SIZE), 0)
        os.fsync(self.fd)
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        # Kept open rather than opened again by name: the name is in a
        # directory its user may write to.
        fd, self.fd = self.fd, -1
        return fd

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
    Digests a message's bytes as its record's digest was made
    (L{MessageDigest}) and, for a kept message, copies them on.
    """

    def __init__(self, rec: IndexRecord, writer: _JournalWriter | None) -> None:
        self.hash = MessageDigest(rec.start, rec.body_start, rec.hidden)
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
    *,
    decided: bool = False,
) -> None:
    """
    Apply a committed journal to the mbox; safe to repeat after a crash.

    @param decided: the journal's phase is already L{_Phase.TRUNCATING}, so
        payload and mark are durable in place: only truncate.  (The mark
        must not be written again: the file may be truncated already.)
    """
    if not decided:
        length = header.length
        half = length // 2
        written = 0

        def put(data: bytes) -> None:
            nonlocal written
            _pwrite_all(mbox_fd, data, header.start + written)
            written += len(data)

        _copy_range(journal_fd, header.payload_offset, half, put)
        fault("payload_partial")
        _copy_range(journal_fd, header.payload_offset + half, length - half, put)
        fault("payload_written")
        _pwrite_all(mbox_fd, header.mark, header.new_size)
        fault("cut_marked")
        # Payload and mark must be on disk before the truncate can be:
        # otherwise a power cut may keep the shorter file and lose them.
        os.fdatasync(mbox_fd)
        _pwrite_all(journal_fd, header.truncating(), HEADER_SIZE)
        os.fdatasync(journal_fd)
        fault("truncate_decided")
    os.ftruncate(mbox_fd, header.new_size)
    fault("truncated")
    _finish(mbox_fd, journal_path)


def _finish(mbox_fd: int, journal_path: str) -> None:
    """
    Make the applied mbox durable, then drop its journal.
    """
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
    try:
        after = _commit_deletions(mbox_fd, paths, index, deleted, fault)
    except MaildropChanged:
        PROCESS.inc(COMMIT_FAILURES, reason="changed")
        raise
    except Exception:
        PROCESS.inc(COMMIT_FAILURES, reason="error")
        raise
    if after is None:
        PROCESS.inc(COMMIT_FAILURES, reason="deferred")
    return after


def _commit_deletions(
    mbox_fd: int, paths: StatePaths, index: MboxIndex, deleted: Iterable[int], fault: FaultHook
) -> MboxIndex | None:
    """L{commit_deletions}, uncounted."""
    gone = sorted(set(deleted))
    if not gone:
        return index
    records = index.records
    st = os.fstat(mbox_fd)
    try:
        cur = os.stat(paths.mbox, follow_symlinks=False)
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
            check = _HashTee(rec, None if i in gone_set else writer)
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
            cut_hash=_cut_hash(mbox_fd, new_size, current_size),
            payload_hash=writer.hash.digest(),
        )
        jfd = writer.install(header)
    except BaseException:
        writer.abandon()
        raise
    PROCESS.inc(JOURNALS_PENDING)
    try:
        fault("journal_written")
        _apply(mbox_fd, paths.journal, jfd, header, fault)
    except OSError:
        # Past the commit point the deletions are decided and durable in
        # the journal; the next open (or sync) applies it.
        _log.failure(
            "Commit of {path} is journalled but could not be applied yet",
            path=display_path(paths.mbox),
        )
        return None
    finally:
        os.close(jfd)
        PROCESS.dec(JOURNALS_PENDING)
    return _index_after(index, gone_set, mbox_fd)


def _index_after(index: MboxIndex, gone: set[int], fd: int) -> MboxIndex:
    """
    The snapshot index with C{gone} removed and later records shifted.
    Kept records keep their UIDLs; those of the records removed are
    retired, never to be given again: our own by their ordinal, a pinned
    one as it is.
    """
    st = os.fstat(fd)
    records = []
    retired = dict(index.retired)
    pins: list[bytes] = []
    shift = 0
    for i, rec in enumerate(index.records):
        if i in gone:
            stop = index.records[i + 1].start if i + 1 < len(index.records) else index.size
            shift -= stop - rec.start
            # Re-inserted so the newest retirements are the last forgotten.
            retired[rec.digest] = max(retired.pop(rec.digest, 0), rec.ordinal + 1)
            if rec.pinned is not None and rec.decided:
                pins.append(rec.pinned)
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
        uidvalidity=index.uidvalidity,
        next_uid=index.next_uid,
        prev_uid=index.prev_uid,
        retired_pins=retire_pins(index.retired_pins, pins),
    )


def _read_journal(
    journal_path: str, mbox_st: os.stat_result
) -> tuple[int, JournalHeader, _Phase] | None:
    """
    Open and fully validate a journal for this mbox.

    The journal is opened with L{open_state_file}: a symlink, a FIFO, a
    device or a file of another owner raises L{UnsafeStateFile} and is left
    where it is.  Only the fixed-size header and phase slot are read whole;
    the payload is streamed through a hash in L{COPY_CHUNK} pieces, and
    only as far as the file's size, which must be what its header says.

    @return: C{(fd, header, phase)} with C{fd} open read-write, or L{None}
        if there is no journal, or it is invalid (it is then logged and
        removed).
    @raise UnsafeStateFile: it is not a journal we could have written.
    """
    try:
        fd = open_state_file(journal_path, os.O_RDWR)
    except FileNotFoundError:
        return None
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
        elif os.fstat(fd).st_size != header.payload_offset + header.length:
            problem = "truncated payload"
        elif _hash_range(fd, header.payload_offset, header.length) != header.payload_hash:
            problem = "payload checksum mismatch"
    except BaseException:
        os.close(fd)
        raise
    if problem is None and header is not None:
        if header.version < VERSION:
            phase = _Phase.LEGACY
        elif os.pread(fd, PHASE_SIZE, HEADER_SIZE) == header.truncating():
            phase = _Phase.TRUNCATING
        else:
            phase = _Phase.COMMITTED
        return fd, header, phase
    os.close(fd)
    _log.warn(
        "Discarding invalid journal {path}: {problem}",
        path=display_path(journal_path),
        problem=problem,
    )
    os.unlink(journal_path)
    fsync_dir(os.path.dirname(journal_path))
    return None


def _truncated(mbox_fd: int, header: JournalHeader, phase: _Phase, size: int) -> bool | None:
    """
    Where an interrupted commit stopped, judged from the journal's phase
    and the mbox's content.

    @param size: the mbox's size now.
    @return: C{False} if the mbox was not truncated (mail beyond
        C{old_size} came after the crash), C{True} if it was and the
        payload is in place (mail beyond C{new_size} came after), L{None}
        if it is in neither state: another program rewrote it.
    """

    def cut_intact() -> bool:
        offset, length = header.cut_span
        return size >= header.old_size and _hash_range(mbox_fd, offset, length) == header.cut_hash

    def payload_in_place() -> bool:
        return (
            size >= header.new_size
            and _hash_range(mbox_fd, header.start, header.length) == header.payload_hash
        )

    if phase is _Phase.COMMITTED:
        # The truncate was never issued, so the file is as long as it was;
        # the mark may be there, half there or not yet, so it is not hashed.
        return False if cut_intact() else None
    if phase is _Phase.TRUNCATING:
        mark = header.mark
        if mark and os.pread(mbox_fd, len(mark), header.new_size) == mark:
            # Our mark is still there, so the truncate did not happen.
            return False if cut_intact() else None
        return True if payload_in_place() else None
    # A legacy journal: an untruncated file and a truncated one followed by
    # a delivery identical to the cut look the same; the first is assumed.
    if cut_intact():
        return False
    return True if payload_in_place() else None


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
    @raise UnsafeStateFile: the journal is a symlink, a FIFO, a device or
        a file of another owner (it is left in place, and the maildrop
        cannot be used until an admin looks at it), or the mbox is not a
        regular file.
    """
    try:
        os.lstat(journal_path)
    except FileNotFoundError:
        return False
    try:
        mbox_fd = open_mbox_file(mbox_path, os.O_RDWR, single_link=True)
    except FileNotFoundError:
        return False
    try:
        try:
            found = _read_journal(journal_path, os.fstat(mbox_fd))
        except UnsafeStateFile as e:
            # Not ignored: if it were a real journal, skipping it would lose
            # the commit.  The callers log this detail and refuse the maildrop.
            raise UnsafeStateFile(
                f"{e}; not a journal we wrote, so the maildrop stays unavailable "
                "until an admin removes it"
            ) from e
        if found is None:
            return False
        jfd, header, phase = found
        try:
            size = os.fstat(mbox_fd).st_size
            truncated = _truncated(mbox_fd, header, phase, size)
            if truncated is None:
                # Applying the journal now would duplicate or lose mail, so
                # set it aside for the admin.
                _set_aside(journal_path, mbox_path)
                PROCESS.inc(JOURNALS_RECOVERED, outcome="set-aside")
                return False
            _log.info("Recovering interrupted commit of {path}", path=display_path(mbox_path))
            if truncated:
                # The payload is in place and the file cut: the commit is
                # complete, and whatever follows new_size is new mail.
                _finish(mbox_fd, journal_path)
                PROCESS.inc(JOURNALS_RECOVERED, outcome="applied")
                return True
            if size > header.old_size or phase is _Phase.LEGACY:
                jfd, header = _rejournal(mbox_fd, journal_path, jfd, header, header.old_size, size)
                phase = _Phase.COMMITTED
            _apply(
                mbox_fd,
                journal_path,
                jfd,
                header,
                fault,
                decided=phase is _Phase.TRUNCATING,
            )
        finally:
            os.close(jfd)
        PROCESS.inc(JOURNALS_RECOVERED, outcome="applied")
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
        path=display_path(mbox_path),
        kept=display_path(kept),
    )


def _rejournal(
    mbox_fd: int,
    journal_path: str,
    journal_fd: int,
    header: JournalHeader,
    tail_start: int,
    size: int,
) -> tuple[int, JournalHeader]:
    """
    Replace the journal by a L{VERSION} one whose payload also holds
    C{[tail_start, size)} of the mbox, mail delivered after the crash.

    @param journal_fd: the old journal; closed here once it is replaced.
    @return: the new journal's descriptor and header.
    """
    writer = _JournalWriter(journal_path)
    try:
        _copy_range(journal_fd, header.payload_offset, header.length, writer.write)
        _copy_range(mbox_fd, tail_start, size - tail_start, writer.write)
        new_size = header.start + writer.length
        fresh = JournalHeader(
            dev=header.dev,
            ino=header.ino,
            start=header.start,
            old_size=size,
            new_size=new_size,
            cut_hash=_cut_hash(mbox_fd, new_size, size),
            payload_hash=writer.hash.digest(),
        )
        fd = writer.install(fresh)
    except BaseException:
        writer.abandon()
        raise
    os.close(journal_fd)
    return fd, fresh
