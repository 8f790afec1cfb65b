# -*- test-case-name: tests.test_mbox_index -*-
"""
Names of the state files pop3srv keeps for one mbox.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from dataclasses import dataclass
from errno import ELOOP, ENXIO

from pop3srv.core.errors import MaildropUnavailable


class UnsafeStateFile(MaildropUnavailable):
    """
    A state file (or the mbox) is not what we would have left there: a
    symlink, a device, a FIFO, a directory, a file of another owner, or one
    larger than we ever write.  The maildrop is refused as temporarily
    unavailable and the detail goes to the log.
    """


@dataclass(frozen=True, slots=True)
class StatePaths:
    """
    Where the state files of one mbox live.

    @ivar mbox: absolute path of the mbox.
    @ivar index: the persisted index.
    @ivar lock: the one-session-per-maildrop lock file.
    @ivar journal: the commit journal.
    """

    mbox: str
    index: str
    lock: str
    journal: str


def state_paths(mbox_path: str, index_dir: str | None = None) -> StatePaths:
    """
    Derive the state file names for C{mbox_path}.

    Beside the mbox they are hidden files named after it; in a shared
    C{index_dir} the name also carries a hash of the absolute path, so two
    mboxes with the same basename do not collide.

    @param mbox_path: the mbox file.
    @param index_dir: a directory for state files, or L{None} for "beside
        the mbox".
    @return: the paths.
    """
    mbox = os.path.abspath(mbox_path)
    directory, base = os.path.split(mbox)
    if index_dir is None:
        stem = os.path.join(directory, f".{base}")
    else:
        tag = hashlib.blake2b(os.fsencode(mbox), digest_size=10).hexdigest()
        stem = os.path.join(os.path.abspath(index_dir), f"{tag}-{base}")
    return StatePaths(
        mbox=mbox,
        index=f"{stem}.pop3srv-index",
        lock=f"{stem}.pop3srv-lock",
        journal=f"{stem}.pop3srv-journal",
    )


def fsync_dir(path: str) -> None:
    """
    Make a rename or unlink in directory C{path} durable.

    @param path: a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(paths: StatePaths) -> list[str]:
    """
    Remove temporary index and journal files a killed process left.

    Only a holder of the session lock writes them, so the caller must hold
    it; then every such file is debris.

    @return: the paths removed.
    """
    removed = []
    for target in (paths.index, paths.journal):
        directory, base = os.path.split(target)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(f"{base}.") and name.endswith(".tmp"):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                except OSError:
                    continue
                removed.append(path)
    return removed


def open_state_file(
    path: str, flags: int, *, mode: int = 0o600, owner: int | None = None
) -> int:
    """
    Open one of our state files (or the mbox) so that nobody but the
    server's own user decides what is opened.

    The last component is never followed if it is a symlink, a FIFO cannot
    block the open, and what was opened must be a regular file owned by
    C{owner} (by default the process's effective user, who created it).

    @param path: the file.
    @param flags: C{os.O_*} flags; C{O_NOFOLLOW}, C{O_NONBLOCK} and
        C{O_CLOEXEC} are added.
    @param mode: the mode of a file C{O_CREAT} makes.
    @param owner: the uid the file must belong to, or L{None} for the
        effective uid.
    @return: an open descriptor, in blocking mode.
    @raise FileNotFoundError: if it does not exist and C{O_CREAT} was not given.
    @raise UnsafeStateFile: if it is a symlink or not a regular file of C{owner}.
    @raise OSError: for other failures to open.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == ELOOP or (e.errno == ENXIO and _is_fifo(path)):
            raise UnsafeStateFile(f"{path}: refusing a symlink or FIFO") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateFile(f"{path}: not a regular file")
        expected = os.geteuid() if owner is None else owner
        if st.st_uid != expected:
            raise UnsafeStateFile(f"{path}: owned by uid {st.st_uid}, not {expected}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(fd: int, limit: int, path: str = "") -> bytes:
    """
    Read a whole small state file, refusing one larger than C{limit}.

    @param fd: an open descriptor, read from its current offset.
    @param limit: the most octets the file may hold.
    @param path: for the error message.
    @return: the contents.
    @raise UnsafeStateFile: if there are more than C{limit} octets.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise UnsafeStateFile(f"{path}: larger than {limit} octets")


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False
