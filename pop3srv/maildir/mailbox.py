# -*- test-case-name: tests.test_maildir -*-
"""
L{MaildirMailbox}: a Maildir as a Twisted POP3 C{IMailbox}.

L{open_maildir} does the blocking work of opening a session: it reaches
the Maildir without following a symlink below the template's trusted
prefix, takes the session lock, moves new mail from C{new/} to C{cur/} as
mail readers do, and lists the messages with their sizes.  The mailbox then
answers LIST/UIDL from memory, streams RETR from the message's file, and
unlinks the deleted messages at QUIT in a worker thread.

Every file is reached through a descriptor of its directory held since
the walk, and opened without following a symlink: a user who swaps
C{cur/} or a message for a symlink to another user's mail gets their
maildrop refused, not the other user's mail.  Other readers (an IMAP
server, a local mail reader) may rename a message to change its flags, or
delete it, during the session: the first RETR that misses a message's name
lists C{cur/} and C{new/} once, in a worker thread, and finds every
message again by its base.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.core.errors import CommitFailed, MaildropUnavailable
from pop3srv.maildir.names import (
    base_of,
    cur_name,
    delivery_key,
    session_uidls,
    sizes_of,
    uidl_of,
)
from pop3srv.maildir.sizes import CacheKey, SizeCache, remove_stale_temps, wire_octets
from pop3srv.mbox.lock import SessionLock
from pop3srv.mbox.paths import (
    MaildropDirectory,
    UnsafeStateFile,
    display_path,
    open_mbox_file,
)

#: The subdirectories messages live in; C{tmp/} holds deliveries not yet
#: made and is never read.
CUR, NEW = "cur", "new"
#: State file names inside the Maildir (without C{index_dir}).
LOCK_NAME = "pop3srv-lock"
SIZES_NAME = "pop3srv-sizes"

DeferToThread = Callable[..., "Deferred[Any]"]
#: Where a message's file is: its folder (L{CUR} or L{NEW}) and name.
Location = tuple[str, str]

_log = Logger()
_FD_DIR = "/proc/self/fd"


class PartialCommit(CommitFailed):
    """
    Some of the deleted messages were removed and some could not be.
    """

    text = "Some deletions could not be made; try again later."


@dataclass(frozen=True, slots=True)
class MaildirStatePaths:
    """
    Where pop3srv keeps its files for one Maildir.

    @ivar maildir: the Maildir's absolute path.
    @ivar lock: the one-session-per-maildrop lock file.
    @ivar sizes: the L{SizeCache}.
    """

    maildir: str
    lock: str
    sizes: str


def maildir_state_paths(maildir: str, index_dir: str | None = None) -> MaildirStatePaths:
    """
    The state file names of C{maildir}: inside it, or in a shared
    C{index_dir} named after a hash of its absolute path, so two Maildirs
    with the same last component do not collide.
    """
    maildir = os.path.abspath(maildir)
    if index_dir is None:
        return MaildirStatePaths(
            maildir, os.path.join(maildir, LOCK_NAME), os.path.join(maildir, SIZES_NAME)
        )
    tag = hashlib.blake2b(os.fsencode(maildir), digest_size=10).hexdigest()
    stem = os.path.join(os.path.abspath(index_dir), f"{tag}-{os.path.basename(maildir)}")
    return MaildirStatePaths(maildir, f"{stem}.pop3srv-lock", f"{stem}.pop3srv-sizes")


@dataclass(slots=True)
class MaildirMessage:
    """
    One message of the session.

    @ivar folder: the subdirectory it is in (L{CUR} or L{NEW}).
    @ivar name: its file name there; changes if another reader renames it.
    @ivar base: the name's base (L{pop3srv.maildir.names.base_of}).
    @ivar uidl: its UIDL, unique in the session.
    @ivar size: the octets RETR sends.
    @ivar removed: whether a listing of the Maildir during the session
        found it no more (another reader deleted it).
    """

    folder: str
    name: str
    base: bytes
    uidl: bytes
    size: int
    removed: bool = False


class _Folder:
    """
    A subdirectory of the Maildir, open for the session.

    @ivar fd: a read-only descriptor of it.
    @ivar owner: its owner, the only one whose files may have more than
        one name here.
    """

    def __init__(self, fd: int, shown: str) -> None:
        self.fd: int | None = fd
        self.shown = shown
        self.owner = os.fstat(fd).st_uid

    def path(self, name: str) -> str:
        """
        A path to C{name} in this directory that the kernel resolves
        through the held descriptor, whatever the names above are now.
        """
        if self.fd is None:
            raise ValueError(f"{self.shown} is closed")
        return f"{_FD_DIR}/{self.fd}/{name}"

    def entries(self) -> Iterator[tuple[str, os.stat_result]]:
        """
        The message files in it, as (name, lstat); dot files skipped, and
        files removed while listing.

        @raise UnsafeStateFile: one is a symlink, not a regular file, or
            another user's file linked here.
        """
        if self.fd is None:
            raise ValueError(f"{self.shown} is closed")
        with os.scandir(self.fd) as listing:
            for entry in listing:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                self.check(entry.name, st)
                yield entry.name, st

    def check(self, name: str, st: os.stat_result) -> None:
        """
        Refuse a message file that is not a regular file, or that has a
        second name and belongs to someone else than the directory's owner:
        a hard link a user made to pass another user's message off as
        theirs.  (A second name of the owner's own is a copy to another
        folder, which Dovecot makes with a hard link.)

        @raise UnsafeStateFile: it is refused.
        """
        where = os.path.join(self.shown, name)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeStateFile(f"{where}: refusing a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateFile(f"{where}: not a regular file")
        if st.st_nlink > 1 and st.st_uid != self.owner:
            raise UnsafeStateFile(
                f"{where}: has {st.st_nlink} links and belongs to uid {st.st_uid},"
                f" not the directory's {self.owner}"
            )

    def open(self, name: str) -> int:
        """
        Open a message file for reading, without following a symlink.

        @raise FileNotFoundError: it is not there (any more).
        @raise UnsafeStateFile: it is refused (L{check}).
        """
        fd = open_mbox_file(self.path(name), os.O_RDONLY, single_link=False)
        try:
            self.check(name, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def names(self) -> list[str]:
        """
        The names in it now, dot files skipped; nothing is checked or
        opened.
        """
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.shown} is closed")
        with os.scandir(self.fd) as listing:
            return [entry.name for entry in listing if not entry.name.startswith(".")]

    def unlink(self, name: str) -> bool:
        """
        Remove the name C{name} (a symlink is removed, not followed).

        @return: whether it was there to remove.
        """
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.shown} is closed")
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class MessageFile:
    """
    A read-only file-like view of one message file: its bytes as stored
    (line ends as stored), read in pieces so a large message never sits in
    memory whole.
    """

    def __init__(self, fd: int, on_close: Callable[[MessageFile], None]) -> None:
        self._fd: int | None = fd
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self._fd is None

    def read(self, n: int = -1) -> bytes:
        """
        Read up to C{n} bytes (all that is left if C{n} < 0).

        @return: the next bytes; C{b""} at the end.
        """
        if self._fd is None:
            raise ValueError("read of closed message")
        if n >= 0:
            return os.read(self._fd, n)
        parts = []
        while chunk := os.read(self._fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """
        Close the file; calling it again does nothing.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            self._on_close(self)

    def __enter__(self) -> MessageFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _NoLock:
    """
    The session lock of a Maildir that does not exist and has no
    C{index_dir} to lock in: there is nothing to protect.
    """

    def release(self) -> None:
        pass


def _default_defer_to_thread() -> DeferToThread:
    # Imported late: importing this module must not touch the reactor.
    from twisted.internet.threads import deferToThread

    return deferToThread


def locate_messages(
    listed: Sequence[tuple[str, str, bytes]], folders: Mapping[str, _Folder]
) -> list[Location | None]:
    """
    Where each message of the session is now, after other readers renamed
    (flag changes), moved or deleted some: C{cur/} and C{new/} are listed
    once and every message found by its base.  This blocks; run it in a
    worker thread.

    A message whose listed name is still there keeps it, so a base that
    is there twice (a copy in C{new/} beside the one in C{cur/}) never
    gives one message the other's file.  If some message is not found the
    folders are listed once more before it counts as removed: a directory
    listing may miss a name renamed while it runs.

    @param listed: each message's folder, name and base as last known, in
        session order.
    @param folders: the open folders, by name.
    @return: per message, its folder and name now, or L{None} if it is
        gone.
    @raise OSError: a folder cannot be listed.
    """
    found = _assign(listed, _list_folders(folders))
    if None in found:
        found = _assign(listed, _list_folders(folders))
    return found


def _list_folders(folders: Mapping[str, _Folder]) -> dict[str, list[str]]:
    # new/ first: a message another reader moves to cur/ meanwhile is then
    # seen in one of the two.
    names = {}
    for folder_name in (NEW, CUR):
        folder = folders.get(folder_name)
        if folder is not None:
            names[folder_name] = folder.names()
    return names


def _assign(
    listed: Sequence[tuple[str, str, bytes]], names: Mapping[str, list[str]]
) -> list[Location | None]:
    present = {(folder_name, name) for folder_name, found in names.items() for name in found}
    kept = {(folder_name, name) for folder_name, name, _ in listed} & present
    # The names no message has, by base, cur/ before new/ (where a reader
    # puts a message it has seen).
    spare: dict[bytes, list[Location]] = {}
    for folder_name in (CUR, NEW):
        for name in names.get(folder_name, ()):
            if (folder_name, name) not in kept:
                spare.setdefault(base_of(os.fsencode(name)), []).append((folder_name, name))
    out: list[Location | None] = []
    for folder_name, name, base in listed:
        if (folder_name, name) in kept:
            out.append((folder_name, name))
            continue
        candidates = spare.get(base)
        out.append(candidates.pop(0) if candidates else None)
    return out


@implementer(IMailbox)
class MaildirMailbox:
    """
    One POP3 session's view of a Maildir (0-based indexes).

    Deleted messages report size 0 from L{listMessages}; any other access
    to them raises L{ValueError}, and an index out of range raises
    L{IndexError}.
    """

    _log = Logger()

    def __init__(
        self,
        messages: list[MaildirMessage],
        folders: dict[str, _Folder],
        session_lock: SessionLock | _NoLock,
        defer_to_thread: DeferToThread,
        *,
        directory: MaildropDirectory | None = None,
        name: str = "",
    ) -> None:
        """
        @param messages: in the order they are numbered.
        @param folders: the open subdirectories, by name.
        @param directory: the held Maildir, closed with the mailbox.
        @param name: the Maildir's path, for logs.
        """
        self._messages = messages
        self._folders = folders
        self._session_lock = session_lock
        self._defer_to_thread = defer_to_thread
        self._directory = directory
        self._name = name
        self._deleted: set[int] = set()
        self._readers: set[MessageFile] = set()
        # While a commit or a listing runs in a worker thread the
        # directories must stay open (a closed number could be reused for
        # another file), so a close() meanwhile is carried out when the
        # last of them ends.
        self._in_threads = 0
        self._committing = False
        self._close_pending = False
        self._closed = False
        # The getMessage calls waiting for the listing in progress.
        self._awaiting_listing: list[Deferred[None]] = []

    @property
    def path(self) -> str:
        """
        The absolute path of the Maildir.
        """
        return self._name

    def _message(self, index: int) -> MaildirMessage:
        if not 0 <= index < len(self._messages):
            raise IndexError(index)
        if index in self._deleted:
            raise ValueError(f"message {index} is deleted")
        return self._messages[index]

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
        if index is None:
            return [0 if i in self._deleted else m.size for i, m in enumerate(self._messages)]
        if not 0 <= index < len(self._messages):
            raise IndexError(index)
        return 0 if index in self._deleted else self._messages[index].size

    def getMessage(self, index: int) -> MessageFile | Deferred[MessageFile]:
        """
        A file-like object streaming the message's content as stored.

        If its file is no longer under the name it was listed with
        (another reader changed its flags), the Maildir is listed again in
        a worker thread and every message found by its base
        (L{locate_messages}), so a Maildir whose flags all changed costs
        one listing, not one per message, and never blocks the caller.

        @return: the reader, or a L{Deferred} firing with it once the
            message is found again.
        @raise FileNotFoundError: another program deleted it meanwhile
            (or the L{Deferred} fails with it).
        @raise UnsafeStateFile: its file was replaced by a symlink or by
            another user's file.
        """
        message = self._message(index)
        if self._closed or self._close_pending:
            raise ValueError("maildrop is closed")
        if message.removed:
            raise self._removed(message)
        try:
            return self._reader(message)
        except FileNotFoundError:
            pass
        return self._locate().addCallback(lambda _: self._reader_located(index))

    def _reader_located(self, index: int) -> MessageFile:
        """
        The reader of a message after L{_locate} has looked for it.
        """
        message = self._message(index)
        if self._closed or self._close_pending:
            raise ValueError("maildrop is closed")
        if message.removed:
            raise self._removed(message)
        # If it was renamed once more since, the next RETR looks again.
        return self._reader(message)

    def _reader(self, message: MaildirMessage) -> MessageFile:
        """
        Open the message's file under the name last known.

        @raise FileNotFoundError: it is not there.
        """
        try:
            fd = self._folders[message.folder].open(message.name)
        except UnsafeStateFile as e:
            _log.warn("Refusing a message of {path}: {error}", path=self._name, error=e)
            raise
        reader = MessageFile(fd, self._readers.discard)
        self._readers.add(reader)
        return reader

    def _removed(self, message: MaildirMessage) -> FileNotFoundError:
        return FileNotFoundError(
            errno.ENOENT, f"message {message.uidl.decode('ascii')} of {self._name} was removed"
        )

    def _listed(self) -> list[tuple[str, str, bytes]]:
        """
        Each message's last known folder, name and base, for
        L{locate_messages} in a worker thread.
        """
        return [(m.folder, m.name, m.base) for m in self._messages]

    def _locate(self) -> Deferred[None]:
        """
        Find every message again (L{locate_messages}) in a worker thread,
        and note where each is.  Calls while a listing runs wait for it.

        @return: a L{Deferred} that fires when the messages are found, or
            fails with the L{OSError} that kept the Maildir from being
            listed.
        """
        found: Deferred[None] = Deferred()
        self._awaiting_listing.append(found)
        if len(self._awaiting_listing) == 1:
            self._in_threads += 1
            listing = self._defer_to_thread(locate_messages, self._listed(), self._folders)
            listing.addBoth(self._located)
        return found

    def _located(self, result: list[Location | None] | Failure) -> None:
        if not isinstance(result, Failure):
            for message, where in zip(self._messages, result, strict=True):
                if where is None:
                    message.removed = True
                else:
                    message.folder, message.name = where
        waiting, self._awaiting_listing = self._awaiting_listing, []
        self._thread_ended()
        for found in waiting:
            if isinstance(result, Failure):
                found.errback(result)
            else:
                found.callback(None)

    def _thread_ended(self) -> None:
        self._in_threads -= 1
        if self._close_pending and not self._in_threads:
            self.close()

    def getUidl(self, index: int) -> bytes:
        """
        The message's persistent unique id: the base of its file name.
        """
        return self._message(index).uidl

    def deleteMessage(self, index: int) -> None:
        """
        Mark a message for deletion at L{sync}.
        """
        self._message(index)
        self._deleted.add(index)

    def undeleteMessages(self) -> None:
        """
        Forget all deletion marks.
        """
        self._deleted.clear()

    def sync(self) -> Deferred[None]:
        """
        Remove the deleted messages' files.

        @return: a L{Deferred} that fires when they are gone, or fails
            with L{CommitFailed} (none removed) or L{PartialCommit}.
        """
        if not self._deleted:
            return succeed(None)
        if self._closed or self._committing or self._close_pending:
            return fail(CommitFailed("maildrop is closed or busy"))
        deleted = sorted(self._deleted)
        self._committing = True
        self._in_threads += 1
        d = self._defer_to_thread(self._commit, deleted, self._listed())
        d.addCallbacks(self._committed, self._commit_failed)
        d.addBoth(self._commit_ended)
        return d

    def _commit(self, deleted: list[int], listed: list[tuple[str, str, bytes]]) -> None:
        """
        Run in a worker thread: unlink each deleted message, then make the
        unlinks durable.  One already gone (another reader deleted it)
        counts as done.

        Each file is removed by the exact name last known; if some are not
        there (another reader renamed them), the Maildir is listed once
        and those are found by their base (L{locate_messages}), never
        taking another message's file.

        @param deleted: the indexes of the messages to remove.
        @param listed: every message's folder, name and base as last
            known (L{_listed}).
        """
        done = 0
        touched: set[str] = set()
        missed: list[int] = []
        try:
            for index in deleted:
                folder_name, name, _ = listed[index]
                if self._folders[folder_name].unlink(name):
                    touched.add(folder_name)
                    done += 1
                else:
                    missed.append(index)
            if missed:
                found = locate_messages(listed, self._folders)
                for index in missed:
                    where = found[index]
                    if where is not None and self._folders[where[0]].unlink(where[1]):
                        touched.add(where[0])
                    done += 1
            for folder_name in touched:
                fd = self._folders[folder_name].fd
                if fd is not None:
                    os.fsync(fd)
        except OSError as e:
            detail = f"removing messages of {self._name}: {e}"
            raise (PartialCommit(detail) if done else CommitFailed(detail)) from e

    def _committed(self, _: None) -> None:
        self._deleted.clear()

    def _commit_failed(self, failure: Failure) -> Failure:
        if isinstance(failure.value, CommitFailed):
            self._log.warn("Commit of {path} failed: {error}", path=self._name, error=failure.value)
            return failure
        self._log.failure("Commit of {path} failed", failure, path=self._name)
        raise CommitFailed(str(failure.value)) from failure.value

    def _commit_ended(self, result: object) -> object:
        self._committing = False
        self._thread_ended()
        return result

    def close(self) -> None:
        """
        End the session: close the Maildir and release the session lock.
        Calling it again does nothing.  While a commit or a listing of the
        Maildir runs in a worker thread, this happens when it ends.
        """
        if self._in_threads:
            self._close_pending = True
            return
        self._closed = True
        try:
            for reader in list(self._readers):
                reader.close()
            for folder in self._folders.values():
                folder.close()
        finally:
            try:
                self._session_lock.release()
            finally:
                if self._directory is not None:
                    self._directory.close()


def open_maildir(
    path: str,
    *,
    index_dir: str | None = None,
    defer_to_thread: DeferToThread | None = None,
    trusted_root: str | None = None,
) -> MaildirMailbox:
    """
    Open a Maildir for one POP3 session.  This blocks; run it in a thread.

    Reaches the Maildir from C{trusted_root} without following a symlink,
    takes the session lock, moves the messages of C{new/} to C{cur/} and
    lists C{cur/} (and what could not be moved).  A missing Maildir is an
    empty maildrop.

    @param path: the Maildir (the directory holding C{cur/}, C{new/} and
        C{tmp/}).
    @param index_dir: where to keep the session lock and the size cache,
        or L{None} for inside the Maildir.  It is the admin's, so trusted
        as named.
    @param defer_to_thread: runs the commit off the reactor thread;
        defaults to L{twisted.internet.threads.deferToThread}.
    @param trusted_root: the admin's part of C{path} (see
        L{pop3srv.mbox.paths.template_prefix}): symlinks in it are followed,
        none below it.  L{None} trusts the Maildir as named.
    @raise MaildropInUse: another session has this maildrop.
    @raise UnsafeStateFile: a symlink below C{trusted_root} or in the
        Maildir, a message that is not a regular file or is another user's
        file linked in, or a state file that is not the server's (also
        logged as a warning: it may be an attack).
    @raise MaildropUnavailable: it cannot be locked or read just now.
    """
    shown = maildir_state_paths(path, index_dir)
    try:
        return _open_maildir(shown, index_dir, defer_to_thread or _default_defer_to_thread(),
                             trusted_root)  # fmt: skip
    except UnsafeStateFile as e:
        _log.warn("Refusing maildrop {path}: {error}", path=shown.maildir, error=e)
        raise


def _open_maildir(
    shown: MaildirStatePaths,
    index_dir: str | None,
    defer_to_thread: DeferToThread,
    trusted_root: str | None,
) -> MaildirMailbox:
    maildir = shown.maildir
    try:
        directory = MaildropDirectory(trusted_root or maildir, maildir)
    except FileNotFoundError:
        # Nothing delivered yet.  With an index_dir the lock still keeps a
        # second session out; without one there is nowhere to take it,
        # and nothing a second session could disturb.
        lock = SessionLock(shown.lock) if index_dir is not None else _NoLock()
        return MaildirMailbox([], {}, lock, defer_to_thread, name=maildir)
    except OSError as e:
        raise MaildropUnavailable(f"cannot open {maildir}: {e}") from e
    folders: dict[str, _Folder] = {}
    session: SessionLock | None = None
    try:
        lock_path, sizes_path = (
            (directory.anchor(shown.lock), directory.anchor(shown.sizes))
            if index_dir is None
            else (shown.lock, shown.sizes)
        )
        session = SessionLock(lock_path)
        for folder_name in (CUR, NEW):
            folder = _open_folder(directory, maildir, folder_name)
            if folder is not None:
                folders[folder_name] = folder
        remove_stale_temps(sizes_path)
        _move_new_mail(folders, maildir)
        messages = _list_messages(folders, sizes_path)
    except BaseException as e:
        for folder in folders.values():
            folder.close()
        if session is not None:
            session.release()
        directory.close()
        if isinstance(e, OSError) and not isinstance(e, MaildropUnavailable):
            raise MaildropUnavailable(f"cannot read {maildir}: {e}") from e
        raise
    return MaildirMailbox(
        messages, folders, session, defer_to_thread, directory=directory, name=maildir
    )


def _open_folder(directory: MaildropDirectory, maildir: str, name: str) -> _Folder | None:
    """
    Open C{cur/} or C{new/} through the held Maildir, refusing a symlink.

    @return: the folder, or L{None} if it does not exist.
    """
    shown = os.path.join(maildir, name)
    try:
        fd = os.open(
            directory.anchor(shown), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStateFile(f"{shown}: a symlink or not a directory") from e
        raise
    try:
        return _Folder(fd, shown)
    except BaseException:
        os.close(fd)
        raise


def _move_new_mail(folders: dict[str, _Folder], maildir: str) -> None:
    """
    Move the messages of C{new/} to C{cur/} with an empty info, as mail
    readers do once they have seen them.  A message another reader moved
    or deleted meanwhile is left to them; one whose name is taken in
    C{cur/}, or that cannot be moved (a read-only Maildir), is served from
    C{new/}.
    """
    new, cur = folders.get(NEW), folders.get(CUR)
    if new is None or cur is None or new.fd is None or cur.fd is None:
        return
    logged = False
    for name, _ in list(new.entries()):
        target = os.fsdecode(cur_name(os.fsencode(name)))
        try:
            if _exists(target, cur.fd):
                # rename() would silently replace the message of that name.
                continue
            # rename() moves a name, never what it points to; entries()
            # has refused symlinks anyway.
            os.rename(name, target, src_dir_fd=new.fd, dst_dir_fd=cur.fd)
        except FileNotFoundError:
            continue
        except OSError as e:
            # Moving is a courtesy to other readers: a message that cannot
            # be moved (a read-only Maildir, a name too long for the info)
            # is served from new/.
            if not logged:
                _log.info(
                    "Cannot move new mail of {path} to cur/ ({error}); serving it from new/",
                    path=maildir,
                    error=e,
                )
                logged = True


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _list_messages(folders: dict[str, _Folder], sizes_path: str) -> list[MaildirMessage]:
    """
    The messages of C{cur/} and C{new/}, numbered by delivery time, with
    UIDLs unique in the session and their RETR sizes.
    """
    cache = SizeCache.load(sizes_path)
    found: list[tuple[tuple[int, int, bytes], str, str, bytes, int]] = []
    for folder_name in (CUR, NEW):
        folder = folders.get(folder_name)
        if folder is None:
            continue
        for name, st in list(folder.entries()):
            raw = os.fsencode(name)
            base = base_of(raw)
            size = _wire_size(folder, name, base, st, cache)
            if size is None:
                continue
            found.append((delivery_key(base), folder_name, name, base, size))
    found.sort(key=lambda item: (item[0], item[1]))
    try:
        cache.store(sizes_path)
    except OSError as e:
        _log.warn("Cannot write size cache {path}: {error}", path=display_path(sizes_path),
                  error=e)  # fmt: skip
    uidls = session_uidls([base for _, _, _, base, _ in found])
    return [
        MaildirMessage(folder_name, name, base, uidl, size)
        for (_, folder_name, name, base, size), uidl in zip(found, uidls, strict=True)
    ]


def _wire_size(
    folder: _Folder, name: str, base: bytes, st: os.stat_result, cache: SizeCache
) -> int | None:
    """
    The octets RETR will send for a message: C{,W=} from its name when the
    name's C{,S=} (if any) matches the file, else a cached count, else a
    count read from the file now.

    @return: the size, or L{None} if the file was removed meanwhile.
    """
    named = sizes_of(base)
    if named.wire is not None and named.file in (None, st.st_size):
        return named.wire
    key: CacheKey = (uidl_of(base), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = cache.get(key)
    if cached is not None:
        return cached
    try:
        fd = folder.open(name)
    except FileNotFoundError:
        return None
    try:
        opened = os.fstat(fd)
        size = wire_octets(fd)
    finally:
        os.close(fd)
    if (opened.st_ino, opened.st_size, opened.st_mtime_ns) == key[1:]:
        cache.put(key, size)
    return size
