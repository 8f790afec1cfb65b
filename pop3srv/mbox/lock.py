# -*- test-case-name: tests.test_mbox_lock -*-
"""
Locks: one POP3 session per maildrop, and the mbox lock MDAs honour.

L{SessionLock} is a C{flock} on a private lock file; it conflicts between
any two open file descriptions, so two sessions in one process exclude each
other too, and the kernel drops it when the process dies.

L{MboxFileLock} is what Postfix local, procmail and friends expect while a
program reads or rewrites an mbox: an fcntl write lock on the file plus a
C{<mbox>.lock} dotlock.  The fcntl lock is taken as an open-file-description
(OFD) lock, which conflicts with the classic POSIX locks MDAs use but is not
silently dropped when some other descriptor of the same file is closed in
this process.

Every file is opened without following a final symlink and without
blocking on a FIFO, and must be a regular file (L{pop3srv.mbox.paths}); the
directories above are the caller's concern (L{open_maildrop} passes paths
anchored by L{pop3srv.mbox.paths.MaildropDirectory}).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
import uuid
from types import TracebackType

from twisted.logger import Logger

from pop3srv.core.errors import MaildropInUse, MaildropUnavailable
from pop3srv.mbox.paths import (
    UnsafeStateFile,
    display_path,
    open_mbox_file,
    open_state_file,
    read_bounded,
)

_log = Logger()

#: Linux OFD lock commands (fcntl(2)); the fcntl module has them on 3.9+.
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on x86_64 and aarch64: short l_type, short l_whence,
# (pad), off_t l_start, off_t l_len, pid_t l_pid (0 for OFD locks), (pad).
_FLOCK = "hhqqi4x"

#: Default seconds to wait for the mbox lock.
LOCK_TIMEOUT = 30.0
#: Seconds between attempts.
POLL_INTERVAL = 0.05
#: A dotlock older than this (by mtime) that we cannot otherwise judge is
#: stale, as in procmail and Postfix.
STALE_AGE = 300.0
#: The most octets of a dotlock we read: C{"<pid> <hostname>\n"} fits.
DOTLOCK_READ_LIMIT = 256


class SessionLock:
    """
    The one-session-per-maildrop lock.

    @ivar path: the lock file.
    """

    def __init__(self, path: str) -> None:
        """
        Take the lock at once.

        @param path: the lock file; created if missing and never removed.
        @raise MaildropInUse: another session holds it.
        @raise UnsafeStateFile: it is a symlink (never followed, so a planted
            one cannot make us create the file it names), a FIFO, or not a
            regular file of the server's user.
        @raise MaildropUnavailable: the lock file cannot be opened.
        """
        self.path = path
        try:
            fd = open_state_file(path, os.O_RDWR | os.O_CREAT, mode=0o600)
        except OSError as e:
            raise MaildropUnavailable(
                f"cannot open lock {display_path(path)}: {e.strerror or e}"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise MaildropInUse(f"{display_path(path)} is held") from e
        except OSError as e:
            os.close(fd)
            raise MaildropUnavailable(f"cannot lock {display_path(path)}: {e.strerror or e}") from e
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """
        Whether this object still holds the lock.
        """
        return self._fd is not None

    def release(self) -> None:
        """
        Drop the lock; calling it again does nothing.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing the only descriptor of the description drops the flock.
            os.close(fd)

    def __enter__(self) -> SessionLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _ofd_lock(fd: int, lock_type: int) -> bool:
    """
    Try to set or clear an OFD lock on the whole file without waiting.

    @return: C{True} if done, C{False} if another lock conflicts.
    """
    arg = struct.pack(_FLOCK, lock_type, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, arg)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_local_process(path: str, hostname: str) -> bool:
    """
    Whether the lock file at C{path} says it was written by a process of
    this host (C{"<pid> <hostname>"}) that is no longer alive.  Anything but
    a small regular file (a symlink, a FIFO, a device) says nothing.
    """
    try:
        fd = open_mbox_file(path, os.O_RDONLY, single_link=False)
    except (OSError, UnsafeStateFile):
        return False
    try:
        fields = read_bounded(fd, DOTLOCK_READ_LIMIT, path).split()
    except (OSError, UnsafeStateFile):
        return False
    finally:
        os.close(fd)
    if len(fields) != 2 or not fields[0].isdigit():
        return False
    host = fields[1].decode("utf-8", "replace")
    return host == hostname and not _pid_alive(int(fields[0]))


class MboxFileLock:
    """
    The fcntl lock plus dotlock on an mbox, held while it is read or
    rewritten.  Use it as a context manager.

    @ivar fd: after L{acquire}, a read-write descriptor of the locked file,
        or L{None} if the mbox does not exist (then only the dotlock is
        held).  It is closed by L{release}.
    """

    _log = _log

    def __init__(
        self,
        mbox_path: str,
        *,
        timeout: float = LOCK_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
        stale_age: float = STALE_AGE,
    ) -> None:
        self.path = mbox_path
        self.dotlock_path = mbox_path + ".lock"
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.stale_age = stale_age
        self.fd: int | None = None
        self._dotlock_ino: int | None = None
        self._use_dotlock = True
        self._hostname = socket.gethostname()

    def acquire(self) -> None:
        """
        Wait up to C{timeout} seconds for both locks.

        Neither lock is held while waiting for the other, so this cannot
        deadlock with an MDA that takes them in the other order.

        @raise MaildropUnavailable: on timeout or an unexpected error.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._try_once():
                    return
            except OSError as e:
                raise MaildropUnavailable(
                    f"cannot lock {display_path(self.path)}: {e.strerror or e}"
                ) from e
            if time.monotonic() >= deadline:
                raise MaildropUnavailable(f"timed out locking {display_path(self.path)}")
            time.sleep(self.poll_interval)

    def _try_once(self) -> bool:
        if self._use_dotlock and not self._take_dotlock():
            return False
        try:
            if self._take_fcntl():
                return True
        except BaseException:
            self._drop_dotlock()
            raise
        self._drop_dotlock()
        return False

    def _take_fcntl(self) -> bool:
        # No symlink: with a template such as /home/{user}/mbox a user could
        # otherwise point their mbox at someone else's spool file, nor a
        # second hard link, which does the same where the kernel lets a user
        # link to a file they cannot read.  No FIFO or device: a read of it
        # would block a thread or never end.
        try:
            fd = open_mbox_file(self.path, os.O_RDWR, single_link=True)
        except FileNotFoundError:
            self.fd = None
            return True
        try:
            if not _ofd_lock(fd, fcntl.F_WRLCK):
                os.close(fd)
                return False
            # The file may have been replaced between open and lock.
            st, cur = os.fstat(fd), os.stat(self.path, follow_symlinks=False)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino):
            os.close(fd)
            return False
        self.fd = fd
        return True

    def _take_dotlock(self) -> bool:
        directory = os.path.dirname(self.dotlock_path) or "."
        tmp = os.path.join(
            directory,
            f".{os.path.basename(self.dotlock_path)}.{uuid.uuid4().hex}",
        )
        try:
            # O_EXCL never follows a symlink; O_NOFOLLOW says so again.
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except FileNotFoundError:
            if os.path.isdir(directory):
                raise
            # No directory, so no mbox: nothing for anyone to lock.
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self._log.warn(
                "Cannot create dotlock for {path} ({error}); using the fcntl lock only",
                path=display_path(self.path),
                error=e,
            )
            self._use_dotlock = False
            return True
        # From here on the temporary file is ours to remove on every path
        # out, a failed write (ENOSPC) included, or it stays as debris.
        try:
            try:
                os.write(fd, f"{os.getpid()} {self._hostname}\n".encode())
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.dotlock_path)
            except FileExistsError:
                pass
            # link() may report failure over NFS although it worked; the
            # link count is the reliable answer.
            st = os.stat(tmp, follow_symlinks=False)
            taken = st.st_nlink == 2
            if taken:
                self._dotlock_ino = st.st_ino
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:
                # The dotlock must not outlive a failure we report.
                self._drop_dotlock()
                raise
        if taken:
            return True
        self._break_stale_dotlock()
        return False

    def _break_stale_dotlock(self) -> None:
        try:
            st = os.stat(self.dotlock_path, follow_symlinks=False)
        except FileNotFoundError:
            return
        stale = left_by_dead_local_process(self.dotlock_path, self._hostname)
        if not stale and time.time() - st.st_mtime > self.stale_age:
            stale = True
        if not stale:
            return
        try:
            # Only remove the file we judged, not one created since.
            if os.stat(self.dotlock_path, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(self.dotlock_path)
                self._log.info("Removed stale dotlock {path}", path=display_path(self.dotlock_path))
        except FileNotFoundError:
            pass

    def _drop_dotlock(self) -> None:
        ino, self._dotlock_ino = self._dotlock_ino, None
        if ino is None:
            return
        try:
            if os.stat(self.dotlock_path, follow_symlinks=False).st_ino == ino:
                os.unlink(self.dotlock_path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """
        Drop both locks; calling it again does nothing.
        """
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                _ofd_lock(fd, fcntl.F_UNLCK)
            finally:
                os.close(fd)
        self._drop_dotlock()

    def __enter__(self) -> MboxFileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
