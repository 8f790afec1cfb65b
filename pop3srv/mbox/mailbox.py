# -*- test-case-name: tests.test_mbox_mailbox -*-
"""
L{MboxMailbox}: an mbox maildrop as a Twisted POP3 C{IMailbox}.

L{open_maildrop} does the blocking work of opening a session (locks,
crash recovery, index); the mailbox then answers LIST/UIDL from memory,
streams RETR from one descriptor it keeps open, and commits deletions in
a worker thread.  L{pin_uidls} gives messages the UIDLs another server
gave them, for an import.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, overload

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.core.errors import CommitFailed, CommitPending, MaildropChanged, MaildropUnavailable
from pop3srv.mbox.commit import FaultHook, commit_deletions, no_fault, recover
from pop3srv.mbox.index import (
    IndexEncodingError,
    IndexRecord,
    MboxIndex,
    RecordTable,
    empty_index,
    load_index,
    save_index,
    write_index,
)
from pop3srv.mbox.lock import LOCK_TIMEOUT, STALE_AGE, MboxFileLock, SessionLock
from pop3srv.mbox.paths import (
    MaildropDirectory,
    StatePaths,
    UnsafeStateFile,
    display_path,
    remove_stale_dotlock_temps,
    remove_stale_temps,
    state_paths,
)
from pop3srv.mbox.pins import check_uidl
from pop3srv.mbox.quoting import MboxUnquoter
from pop3srv.mbox.uidlformat import UidlFormat
from pop3srv.processes import malloc

#: Raw bytes read per pread when streaming a message.
READ_CHUNK = 64 * 1024
#: A scan of at least this many bytes is followed by L{malloc.trim}.
BIG_SCAN = 16 << 20
#: Seconds between two looks by one process for temporary dotlock files
#: left behind in one maildrop directory (see L{DebrisSchedule}).
DEBRIS_INTERVAL = 3600.0

DeferToThread = Callable[..., "Deferred[Any]"]

_log = Logger()


class DebrisSchedule:
    """
    When this process last looked for temporary dotlock files left behind
    (L{remove_stale_dotlock_temps}) in each maildrop directory.

    Such debris stays only when a process is killed in the middle of taking
    a lock, but looking for it means listing the directory, which for
    C{/var/mail/{user}} is the whole spool: so a login looks at most once
    per C{interval} per directory and process (the start-up sweep of a
    spool looks at once).  Debris is still removed, by the first login to
    its directory after it is L{STALE_AGE} old and the interval is over.
    Thread-safe: maildrops are opened in worker threads.
    """

    def __init__(
        self,
        interval: float = DEBRIS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        limit: int = 10_000,
    ) -> None:
        """
        @param interval: seconds between two looks in one directory.
        @param clock: monotonic seconds.
        @param limit: directories remembered at most; past it the oldest
            looks are forgotten (those directories are then looked at
            early, which costs only time).
        """
        self.interval = interval
        self._clock = clock
        self._limit = limit
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str | None], float] = {}

    def due(self, directory: str, name: str | None) -> bool:
        """
        Whether to look in C{directory} now; if so, the look counts as done.

        @param directory: the directory's name.
        @param name: the mbox whose debris is looked for, or L{None} for
            every mbox in the directory.
        """
        key = (directory, name)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            if len(self._last) >= self._limit:
                recent = {k: t for k, t in self._last.items() if now - t < self.interval}
                self._last = recent if len(recent) < self._limit else {}
            self._last[key] = now
            return True


_debris_schedule = DebrisSchedule()


def _remove_dotlock_debris(
    directory: MaildropDirectory, paths: StatePaths, trusted_root: str | None
) -> None:
    """
    Remove old temporary dotlock files beside the mbox, if
    L{_debris_schedule} says it is time.  No lock is needed: only files
    older than any live locker keeps one are removed.

    In a spool (the mbox's directory is the template's fixed prefix, as
    for C{/var/mail/{user}}) every mbox's debris is removed, as the
    start-up sweep does; in a directory of the user's own, only this
    mbox's, whatever else they keep there.
    """
    spool = trusted_root is not None and os.path.normpath(trusted_root) == directory.path
    name = None if spool else os.path.basename(paths.mbox)
    if not _debris_schedule.due(directory.path, name):
        return
    for debris in remove_stale_dotlock_temps(os.path.dirname(paths.mbox), STALE_AGE, name):
        _log.info("Removed a dotlock temporary file left behind: {path}",
                  path=display_path(debris))  # fmt: skip


def _default_defer_to_thread() -> DeferToThread:
    # Imported late: importing this module must not touch the reactor.
    from twisted.internet.threads import deferToThread

    return deferToThread


class _Descriptor:
    """
    The session's descriptor of the mbox, shared with message readers so
    that a reader used after L{MboxMailbox.close} fails instead of reading
    whatever file later reuses the number.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def get(self) -> int:
        if self.fd is None:
            raise ValueError("maildrop is closed")
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class MessageReader:
    """
    A read-only file-like view of one message's delivered content.

    Bytes are read lazily with C{pread} and un-quoted on the way, so a
    large message never sits in memory whole.  Line ends are as stored.
    Hidden header fields (L{pop3srv.mbox.scan.HIDDEN_HEADERS}) are skipped:
    they are whole lines, so what is left un-quotes as it would alone.
    """

    def __init__(
        self,
        descriptor: _Descriptor,
        start: int,
        end: int,
        hidden: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """
        @param start: where the content starts in the mbox.
        @param end: where it ends.
        @param hidden: ranges to skip, C{(offset, length)} from C{start},
            ascending.
        """
        self._descriptor = descriptor
        self._pos = start
        self._end = end
        # Absolute (start, stop) of the ranges still ahead, the next first.
        self._skips = [(start + offset, start + offset + length) for offset, length in hidden]
        self._skips.reverse()
        self._unquoter = MboxUnquoter()
        self._pending = b""
        # Bytes of _pending already returned: a large block is handed out in
        # smaller reads without re-copying its rest on every call.
        self._offset = 0
        self._done = start >= end
        self.closed = False

    def _fill(self) -> None:
        """
        Make C{_pending[_offset:]} non-empty unless the message is exhausted.
        """
        while self._offset >= len(self._pending) and not self._done:
            fd = self._descriptor.get()
            limit = self._end
            skips = self._skips
            while skips and skips[-1][0] <= self._pos:
                self._pos = max(self._pos, skips.pop()[1])
            if skips:
                # Read up to the next hidden range, never into it.
                limit = min(limit, skips[-1][0])
            out = b""
            if self._pos < limit:
                raw = os.pread(fd, min(READ_CHUNK, limit - self._pos), self._pos)
                if not raw:
                    raise OSError(errno.EIO, "mbox ended inside a message")
                self._pos += len(raw)
                out = self._unquoter.feed(raw)
            if self._pos >= self._end:
                out += self._unquoter.finish()
                self._done = True
            self._pending = out
            self._offset = 0

    def read(self, n: int = -1) -> bytes:
        """
        Read up to C{n} bytes (all that is left if C{n} < 0).

        @return: the next bytes; C{b""} at the end.
        """
        if self.closed:
            raise ValueError("read of closed message")
        parts: list[bytes] = []
        while n < 0 or not parts:
            self._fill()
            pending, offset = self._pending, self._offset
            if offset >= len(pending):
                break
            if n < 0 or len(pending) - offset <= n:
                # All that is left of the block: no copy if none was read.
                parts.append(pending[offset:] if offset else pending)
                self._pending, self._offset = b"", 0
            else:
                parts.append(pending[offset : offset + n])
                self._offset = offset + n
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def close(self) -> None:
        """
        Stop reading; the mailbox's descriptor stays open.
        """
        self.closed = True
        self._pending, self._offset = b"", 0

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@implementer(IMailbox)
class MboxMailbox:
    """
    One POP3 session's view of an mbox maildrop (0-based indexes).

    Deleted messages report size 0 from L{listMessages}; any other access
    to them raises L{ValueError}, and an index out of range raises
    L{IndexError}.
    """

    _log = Logger()

    def __init__(
        self,
        paths: StatePaths,
        index: MboxIndex,
        fd: int | None,
        session_lock: SessionLock,
        defer_to_thread: DeferToThread,
        lock_timeout: float = LOCK_TIMEOUT,
        *,
        directory: MaildropDirectory | None = None,
        name: str | None = None,
    ) -> None:
        """
        @param paths: the mbox and its state files, as this process reaches
            them (possibly through C{directory}).
        @param directory: the held directory the paths go through, closed
            with the mailbox.
        @param name: the mbox's path for logs, if C{paths.mbox} is not it.
        """
        self._paths = paths
        self._directory = directory
        self._name = name or paths.mbox
        self._index = index
        self._descriptor = _Descriptor(fd)
        self._session_lock = session_lock
        self._defer_to_thread = defer_to_thread
        self._lock_timeout = lock_timeout
        self._deleted: set[int] = set()
        # Test hook: see pop3srv.mbox.commit.FaultHook.
        self._fault: FaultHook = no_fault
        # While a commit runs in a worker thread its descriptor must stay
        # open (a closed number could be reused for another file), so a
        # close() meanwhile is carried out when the commit ends.
        self._committing = False
        self._close_pending = False

    @property
    def path(self) -> str:
        """
        The absolute path of the mbox.
        """
        return self._name

    def _record(self, index: int) -> IndexRecord:
        if not 0 <= index < len(self._index.records):
            raise IndexError(index)
        if index in self._deleted:
            raise ValueError(f"message {index} is deleted")
        return self._index.records[index]

    @overload
    def listMessages(self) -> list[int]: ...

    @overload
    def listMessages(self, index: int) -> int: ...

    def listMessages(self, index: int | None = None) -> list[int] | int:
        """
        The RETR octet counts: of all messages, or of one.

        @param index: a message index, or L{None} for all.
        @return: a size, or a list of them; deleted messages count 0.
        @raise IndexError: C{index} is out of range.
        """
        records = self._index.records
        if index is None:
            deleted = self._deleted
            # A no-op for a table read or scanned here; packs the lists
            # some callers build indexes from.
            sizes = RecordTable.pack(records).sizes()
            for i in deleted:
                sizes[i] = 0
            return sizes
        if not 0 <= index < len(records):
            raise IndexError(index)
        return 0 if index in self._deleted else records[index].size

    def getMessage(self, index: int) -> MessageReader:
        """
        A file-like object streaming the message's content as delivered
        (un-quoted, line ends as stored).
        """
        rec = self._record(index)
        return MessageReader(self._descriptor, rec.body_start, rec.end, rec.hidden)

    def getUidl(self, index: int) -> bytes:
        """
        The message's persistent unique id.
        """
        return self._record(index).uidl

    def deleteMessage(self, index: int) -> None:
        """
        Mark a message for deletion at L{sync}.
        """
        self._record(index)
        self._deleted.add(index)

    def undeleteMessages(self) -> None:
        """
        Forget all deletion marks.
        """
        self._deleted.clear()

    def pin_uidls(self, uidls: Mapping[int, bytes]) -> None:
        """
        Give messages these UIDLs from now on, and keep that in the index.
        This blocks; it is for tools (an import), not for a session's
        reactor thread.

        Other messages keep theirs, except that an undecided UIDL (of a
        message the server has not indexed yet, shown by a provisional
        open) that is now pinned to another message is our own again; the
        server decides it.  A pinned UIDL that a message gone from the
        file had may be pinned again: the import knows better.  Nothing is
        pinned unless all can be.

        @param uidls: message index (as L{listMessages} counts) to UIDL.
        @raise IndexError: an index is out of range.
        @raise ValueError: a message is marked deleted, a UIDL is not a
            valid one, or two messages would have the same UIDL.
        @raise MaildropUnavailable: the index cannot be written now.
        """
        if self._descriptor.fd is None or self._committing:
            raise ValueError("maildrop is closed or busy")
        for number, uidl in uidls.items():
            self._record(number)
            check_uidl(uidl)
        given = set(uidls.values())
        records = []
        for i, rec in enumerate(self._index.records):
            if i in uidls:
                rec = replace(rec, pinned=uidls[i], decided=True)
            elif not rec.decided and rec.uidl in given:
                rec = replace(rec, pinned=None)
            records.append(rec)
        holder: dict[bytes, int] = {}
        for i, rec in enumerate(records):
            if not rec.decided:
                continue
            other = holder.setdefault(rec.uidl, i)
            if other != i:
                raise ValueError(
                    f"messages {other + 1} and {i + 1} would both have the UIDL "
                    f"{rec.uidl.decode('ascii', 'replace')}"
                )
        pinned = replace(
            self._index,
            records=RecordTable.pack(records),
            retired_pins=[p for p in self._index.retired_pins if p not in given],
        )
        try:
            with MboxFileLock(self._paths.mbox, timeout=self._lock_timeout):
                write_index(self._paths.index, pinned)
        except (OSError, IndexEncodingError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise MaildropUnavailable(f"cannot write the index of {self.path}: {reason}") from e
        self._index = pinned

    def sync(self) -> Deferred[None]:
        """
        Make the deletions durable.

        @return: a L{Deferred} that fires when they are, or fails with
            L{CommitFailed} or L{MaildropChanged} (the mbox unchanged).
        """
        if not self._deleted:
            return succeed(None)
        if self._descriptor.fd is None or self._committing or self._close_pending:
            return fail(CommitFailed("maildrop is closed or busy"))
        deleted = frozenset(self._deleted)
        self._committing = True
        d = self._defer_to_thread(self._commit, deleted)
        d.addCallbacks(self._committed, self._commit_failed)
        d.addBoth(self._commit_ended)
        return d

    def _commit(self, deleted: frozenset[int]) -> MboxIndex | None:
        """
        Run in a worker thread: the blocking commit under the mbox lock.
        """
        with MboxFileLock(self._paths.mbox, timeout=self._lock_timeout):
            recover(self._paths.mbox, self._paths.journal)
            try:
                index = commit_deletions(
                    self._descriptor.get(),
                    self._paths,
                    self._index,
                    deleted,
                    fault=self._fault,
                )
            except MaildropChanged:
                # The stored index no longer describes the file, and its size,
                # mtime and probes may still match: drop it so the next open
                # rescans instead of failing every commit from now on.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._paths.index)
                raise
            except Exception as e:
                if os.path.exists(self._paths.journal):
                    # Past the commit point: "mailbox unchanged" would be untrue.
                    raise CommitPending(str(e)) from e
                raise
            if index is None:
                return None
            # The deletions are durable; if the index is not, the next open
            # rescans instead.
            save_index(self._paths.index, index)
            return index

    def _committed(self, index: MboxIndex | None) -> None:
        # None: decided but not yet applied, so no offsets can be trusted.
        self._index = empty_index() if index is None else index
        self._deleted.clear()

    def _commit_failed(self, failure: Failure) -> Failure:
        if isinstance(failure.value, CommitFailed):
            self._log.info(
                "Commit of {path} refused: {error}",
                path=self.path,
                error=failure.value,
            )
            return failure
        self._log.failure("Commit of {path} failed", failure, path=self.path)
        # The client gets the fixed text; the detail went to the log above.
        raise CommitFailed(str(failure.value)) from failure.value

    def _commit_ended(self, result: object) -> object:
        self._committing = False
        if self._close_pending:
            self.close()
        return result

    def close(self) -> None:
        """
        End the session: close the mbox and release the session lock.
        Calling it again does nothing.  During a commit this happens when
        the commit ends.
        """
        if self._committing:
            self._close_pending = True
            return
        try:
            self._descriptor.close()
        finally:
            try:
                self._session_lock.release()
            finally:
                if self._directory is not None:
                    self._directory.close()


def open_maildrop(
    path: str,
    *,
    index_dir: str | None = None,
    defer_to_thread: DeferToThread | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    trusted_root: str | None = None,
    uidl_format: UidlFormat | None = None,
    provisional: bool = False,
    reuse_xuidl: bool | None = None,
) -> MboxMailbox:
    """
    Open a maildrop for one POP3 session.  This blocks; run it in a thread.

    Reaches the mbox's directory from C{trusted_root} without following a
    symlink (L{MaildropDirectory}) and does all later file work through
    it; takes the session lock, then under the mbox lock finishes any
    interrupted commit and brings the index up to date.  A missing mbox is
    an empty maildrop.

    @param path: the mbox file.
    @param index_dir: where to keep state files, or L{None} for beside the
        mbox.  It is the admin's, so trusted as named.
    @param defer_to_thread: runs the commit off the reactor thread;
        defaults to L{twisted.internet.threads.deferToThread}.
    @param lock_timeout: seconds to wait for the mbox lock.
    @param trusted_root: the admin's part of C{path} (see
        L{pop3srv.mbox.paths.template_prefix}): symlinks in it are followed,
        none below it.  L{None} trusts the mbox's directory as named, so
        only the mbox and its state files themselves must be no symlinks.
    @param uidl_format: the UIDLs of messages indexed for the first time
        (L{pop3srv.mbox.pins}); L{None} for our own.  Messages indexed
        before keep theirs.
    @param provisional: for a tool that reads the maildrop and serves no
        client: the UIDLs this open would decide are shown but left for the
        server's next open to decide (see L{load_index}).
    @param reuse_xuidl: whether an C{X-UIDL} field gives a newly indexed
        message its UIDL; L{None} for yes unless C{uidl_format} is given
        (L{pop3srv.mbox.pins.xuidl_reused}).
    @raise MaildropInUse: another session has this maildrop.
    @raise UnsafeStateFile: a symlink below C{trusted_root}, or an mbox or
        state file that is not a regular file of the expected owner (also
        logged as a warning: it may be an attack).
    @raise MaildropUnavailable: it cannot be locked or read just now.
    """
    shown = state_paths(path, index_dir)
    try:
        return _open_maildrop(
            shown,
            index_dir,
            defer_to_thread,
            lock_timeout,
            trusted_root,
            uidl_format,
            provisional,
            reuse_xuidl,
        )
    except UnsafeStateFile as e:
        _log.warn("Refusing maildrop {path}: {error}", path=shown.mbox, error=e)
        raise


def _open_maildrop(
    shown: StatePaths,
    index_dir: str | None,
    defer_to_thread: DeferToThread | None,
    lock_timeout: float,
    trusted_root: str | None,
    uidl_format: UidlFormat | None,
    provisional: bool,
    reuse_xuidl: bool | None,
) -> MboxMailbox:
    defer_to_thread = defer_to_thread or _default_defer_to_thread()
    where = os.path.dirname(shown.mbox)
    try:
        directory = MaildropDirectory(trusted_root or where, where)
    except FileNotFoundError:
        if index_dir is None:
            raise MaildropUnavailable(f"{where} does not exist") from None
        # No directory, so no mbox: an empty maildrop, and nothing below
        # the missing name is ever opened (it may be a symlink by now).
        return MboxMailbox(
            shown, empty_index(), None, SessionLock(shown.lock), defer_to_thread, lock_timeout
        )
    except OSError as e:
        raise MaildropUnavailable(f"cannot open {where}: {e.strerror or e}") from e
    paths = directory.anchor_paths(shown)
    try:
        session = SessionLock(paths.lock)
    except BaseException:
        directory.close()
        raise
    fd: int | None = None
    try:
        # Both before the mbox lock, which an MDA waits for: the session
        # lock is all that stale index and journal temporaries need.
        remove_stale_temps(paths)
        _remove_dotlock_debris(directory, paths, trusted_root)
        with MboxFileLock(paths.mbox, timeout=lock_timeout) as lock:
            if lock.fd is None:
                index = empty_index()
            else:
                recover(paths.mbox, paths.journal)
                # A dup shares the locked open file description.
                fd = os.dup(lock.fd)
                os.set_inheritable(fd, False)
                index = load_index(
                    fd,
                    paths.index,
                    uidl_format=uidl_format,
                    provisional=provisional,
                    reuse_xuidl=reuse_xuidl,
                )
    except MaildropUnavailable:
        _cleanup(fd, session, directory)
        raise
    except OSError as e:
        _cleanup(fd, session, directory)
        # Not the exception's own text: it names the file as this process
        # reaches it, through /proc/self/fd.
        raise MaildropUnavailable(f"cannot open {shown.mbox}: {e.strerror or e}") from e
    except BaseException:
        _cleanup(fd, session, directory)
        raise
    if index.scanned_from is not None and index.size - index.scanned_from >= BIG_SCAN:
        # The scan's buffers and records are garbage now; give them back
        # rather than keep the peak of the largest scan for good.
        malloc.trim()
    return MboxMailbox(
        paths,
        index,
        fd,
        session,
        defer_to_thread,
        lock_timeout,
        directory=directory,
        name=shown.mbox,
    )


def _cleanup(fd: int | None, session: SessionLock, directory: MaildropDirectory) -> None:
    if fd is not None:
        os.close(fd)
    session.release()
    directory.close()


def pin_uidls(
    path: str,
    uidls: Mapping[int, bytes],
    *,
    index_dir: str | None = None,
    trusted_root: str | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """
    Give messages of a maildrop these UIDLs from now on, under the
    server's locks.  This blocks.

    The maildrop is opened as a session would open it (so not while a
    client has it), without deciding the UIDLs of messages the server has
    not indexed yet: those not pinned here get theirs at the server's next
    open, from its C{--uidl-format}.  Matching the messages to the UIDLs
    is the caller's work; to read the messages and pin in one session, use
    L{open_maildrop} with C{provisional=True} and L{MboxMailbox.pin_uidls}.

    @param path: the mbox file.
    @param uidls: message index (0-based, as L{MboxMailbox.listMessages}
        counts; the pseudo-message is no message) to UIDL.
    @param index_dir: as for L{open_maildrop}.
    @param trusted_root: as for L{open_maildrop}.
    @param lock_timeout: seconds to wait for the mbox lock.
    @raise MaildropInUse: a session has the maildrop.
    @raise IndexError: an index is out of range.
    @raise ValueError: a UIDL is not valid, or two messages would have the
        same one.
    """
    box = open_maildrop(
        path,
        index_dir=index_dir,
        defer_to_thread=maybeDeferred,
        lock_timeout=lock_timeout,
        trusted_root=trusted_root,
        provisional=True,
    )
    try:
        box.pin_uidls(uidls)
    finally:
        box.close()
