# -*- test-case-name: tests.test_mbox_index -*-
"""
Names of the state files pop3srv keeps for one mbox, and the only ways we
open them: without following a symlink anywhere below the admin's trusted
prefix (L{MaildropDirectory}), and refusing anything but a regular file of
the expected owner (L{open_state_file}, L{open_mbox_file}).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass, replace
from errno import ELOOP, ENOTDIR, ENXIO

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
    # The index and the journal share a directory: list it once.
    bases: dict[str, list[str]] = {}
    for target in (paths.index, paths.journal):
        directory, base = os.path.split(target)
        bases.setdefault(directory, []).append(base)
    for directory, names_of in bases.items():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".tmp") and any(name.startswith(f"{base}.") for base in names_of):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                except OSError:
                    continue
                removed.append(path)
    return removed


def open_state_file(path: str, flags: int, *, mode: int = 0o600, owner: int | None = None) -> int:
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
    return _open_checked(path, flags, mode, os.geteuid() if owner is None else owner)


def open_mbox_file(path: str, flags: int, *, single_link: bool) -> int:
    """
    Open an mbox, or a dotlock an MDA may have written, for reading or
    locking: like L{open_state_file}, but of any owner (the user's own,
    or the MDA's).

    @param path: the file.
    @param flags: C{os.O_*} flags, without C{O_CREAT}.
    @param single_link: refuse a file with more than one name.  Say so for
        an mbox: a second name is a hard link that passes another user's
        mbox off as this one.  Not for a dotlock, which has two names for
        a moment while its writer takes it.
    @return: an open descriptor, in blocking mode.
    @raise FileNotFoundError: if it does not exist.
    @raise UnsafeStateFile: if it is a symlink, a FIFO or a device, or
        anything else but a regular file, or has a second name although
        C{single_link} was asked for.
    @raise OSError: for other failures to open.
    """
    return _open_checked(path, flags, 0o600, None, single_link)


def _open_checked(
    path: str, flags: int, mode: int, owner: int | None, single_link: bool = True
) -> int:
    """
    Open C{path} without following a final symlink or blocking on a FIFO,
    and keep it only if it is a regular file of C{owner} (any owner for
    L{None}) with, if C{single_link}, one name.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == ELOOP or (e.errno == ENXIO and _is_fifo(path)):
            raise UnsafeStateFile(f"{display_path(path)}: refusing a symlink or FIFO") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateFile(f"{display_path(path)}: not a regular file")
        if owner is not None and st.st_uid != owner:
            raise UnsafeStateFile(f"{display_path(path)}: owned by uid {st.st_uid}, not {owner}")
        if single_link and st.st_nlink != 1:
            # Our state files and mboxes have one name; a second one is a
            # hard link someone made to pass another file off as this one.
            raise UnsafeStateFile(f"{display_path(path)}: has {st.st_nlink} links")
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


#: Where Linux shows this process's descriptors.  A path through
#: C{/proc/self/fd/N/} reaches the directory open as C{N} itself, whatever
#: its name or the names above it are by then.
_FD_DIR = "/proc/self/fd"

#: A temporary dotlock file of L{pop3srv.mbox.lock.MboxFileLock}: C{.NAME.lock.}
#: and a UUID4 in hex.
DOTLOCK_TEMP = re.compile(r"\.(?P<name>.+)\.lock\.[0-9a-f]{32}")


def template_prefix(template: str, field: str = "{user}") -> str:
    """
    The admin's part of a mailbox path template: the directory before the
    first C{field}, such as C{/home} for C{/home/{user}/Mail/inbox} and
    C{/var/mail} for C{/var/mail/{user}}.  Symlinks in it are the admin's
    and are followed; below it every name may be a user's choice.

    @param template: an absolute path with at least one C{field}.
    @param field: the placeholder.
    @return: a normalised absolute directory.
    """
    head = template.split(field, 1)[0]
    return os.path.normpath(os.path.dirname(head) or "/")


def display_path(path: str) -> str:
    """
    The name an admin knows for C{path}: a path through a descriptor held
    by L{MaildropDirectory} is shown with that directory's current name.

    @param path: any path.
    @return: C{path}, or its readable form.
    """
    if not path.startswith(_FD_DIR + "/"):
        return path
    number, _, rest = path[len(_FD_DIR) + 1 :].partition("/")
    try:
        directory = os.readlink(f"{_FD_DIR}/{number}")
    except OSError:
        return path
    return os.path.join(directory, rest) if rest else directory


def open_directory_below(root: str, directory: str) -> int:
    """
    Open C{directory} as an C{O_PATH} descriptor, following symlinks in
    C{root} (the admin's) but in no component below it.

    Each component is opened with C{O_PATH|O_DIRECTORY|O_NOFOLLOW} relative
    to the one before, so a component that is a symlink fails (C{ENOTDIR})
    however it is swapped meanwhile: there is nothing to race.

    @param root: a trusted directory.
    @param directory: an absolute directory at or below C{root}.
    @return: the descriptor; the caller closes it.
    @raise FileNotFoundError: a component does not exist.
    @raise UnsafeStateFile: a component below C{root} is a symlink or not a
        directory, or C{directory} is not below C{root}.
    @raise OSError: for other failures to open.
    """
    root = os.path.normpath(root)
    rel = os.path.relpath(os.path.normpath(directory), root)
    parts = [] if rel == "." else rel.split(os.sep)
    if parts[:1] == [".."]:
        raise UnsafeStateFile(f"{directory} is not below the trusted {root}")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            try:
                below = os.open(
                    part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as e:
                if e.errno not in (ENOTDIR, ELOOP):
                    raise
                where = os.path.join(root, *parts[: i + 1])
                raise UnsafeStateFile(
                    f"{where}: a symlink or not a directory, below the trusted {root}"
                ) from e
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


class MaildropDirectory:
    """
    The directory of one mbox, reached from the admin's trusted prefix
    without following a symlink below it, and held open for the session.

    Why a walk with C{openat} rather than opening by name and checking
    C{/proc/self/fd} afterwards: a check after the fact can only judge a
    file already opened or created, and cannot make a C{rename}, C{link}
    or C{unlink} safe.  The walk refuses a symlinked component before
    anything is touched, and the C{O_PATH} descriptor it leaves is then the
    base of every later name: L{anchor} turns a path in the directory into
    C{/proc/self/fd/N/NAME}, which the kernel resolves through the
    descriptor, not through the names.  So the index and journal code,
    which works with plain path strings, opens, renames and removes files
    in the directory that was checked even if a user swaps a symlink in
    afterwards.  Linux only, and C{/proc} must be mounted (checked on
    opening).

    @ivar path: the directory's name, for logs.
    """

    def __init__(self, root: str, path: str) -> None:
        """
        @param root: the trusted prefix (see L{template_prefix}).
        @param path: the mbox's directory, at or below C{root}.
        @raise FileNotFoundError: the directory does not exist.
        @raise UnsafeStateFile: a component below C{root} is a symlink.
        @raise OSError: for other failures to open.
        """
        self.path = os.path.normpath(path)
        fd = open_directory_below(root, self.path)
        if not os.path.isdir(f"{_FD_DIR}/{fd}"):
            os.close(fd)
            raise OSError(f"{_FD_DIR} is not available to reach {self.path} safely")
        self._fd: int | None = fd

    def anchor(self, path: str) -> str:
        """
        The path that reaches C{path} through the held descriptor, if
        C{path} is directly in this directory; any other path unchanged.

        @raise ValueError: after L{close}.
        """
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        directory, name = os.path.split(os.path.normpath(path))
        if directory != self.path:
            return path
        return f"{_FD_DIR}/{self._fd}/{name}"

    def anchor_paths(self, paths: StatePaths) -> StatePaths:
        """
        L{anchor} applied to every path of C{paths}.
        """
        return replace(
            paths,
            mbox=self.anchor(paths.mbox),
            index=self.anchor(paths.index),
            lock=self.anchor(paths.lock),
            journal=self.anchor(paths.journal),
        )

    def close(self) -> None:
        """
        Let go of the directory; calling it again does nothing.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def remove_stale_dotlock_temps(
    directory: str, max_age: float, name: str | None = None
) -> list[str]:
    """
    Remove temporary dotlock files (C{.NAME.lock.<32 hex>}) that a process
    left when it died or could not write them (a full disk), and that are
    older than C{max_age} seconds: only regular files of the server's own
    user, so an MDA's file or a user's is never touched.

    @param directory: where to look.
    @param max_age: seconds; a live locker keeps its temporary file for
        far less.
    @param name: only those of this mbox name, or L{None} for any.
    @return: the paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    euid = os.geteuid()
    for entry in names:
        match = DOTLOCK_TEMP.fullmatch(entry)
        if match is None or (name is not None and match["name"] != name):
            continue
        path = os.path.join(directory, entry)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != euid or now - st.st_mtime < max_age:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False
