# -*- test-case-name: tests.test_userfile -*-
"""
The user file, write side: every change to a user file, made by
C{pop3srv-passwd} and by hash upgrades after login.

Every operation is one read-modify-write through L{_rewrite}: take an
exclusive lock on C{<path>.lock} (the same one for every editor, so two
never interleave), read the file, edit its lines, and replace the file
atomically if anything changed.  Edits keep every octet they do not mean to
change: comments, other users, the fields after a hash, line terminators.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from twisted.logger import Logger

from pop3srv.auth.hashpolicy import (
    check_hash,
    identify,
    is_scram,
    normalise_hash,
    upgraded_field,
)
from pop3srv.auth.identity import normalise_username, validate_label, validate_username
from pop3srv.auth.userfile import APP_TAG, NOPOP3_TAG, UserFileError, describe, parse_tags

__all__ = [
    "apply_upgrade",
    "delete_app_password",
    "delete_user",
    "replace_hash",
    "set_main_pop3",
    "set_password",
    "set_user_hash",
]

_LOCK_TIMEOUT = 10.0

#: Seconds a hash upgrade after login waits for another editor: a login
#: should not wait long for a write it can do without.
UPGRADE_LOCK_TIMEOUT = 0.5

_log = Logger()

_T = TypeVar("_T")


def _split_eol(line: bytes) -> tuple[bytes, bytes]:
    """
    @return: the line without its terminator, and the terminator.
    """
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    if line.endswith(b"\n"):
        return line[:-1], b"\n"
    return line, b""


def _user_lines(data: bytes, username: str) -> Iterator[tuple[int, bytes]]:
    """
    Find the lines of a user file that define a user.

    Matching is on the exact octets before the first colon, as in
    L{UserFile._parse}, so comments and lines with stray whitespace never
    match.

    @param data: the file contents.
    @param username: the user.
    @return: C{(index, line)} pairs into C{data.splitlines(keepends=True)}
        as split on LF only.
    """
    wanted = username.encode("utf-8") + b":"
    for index, line in enumerate(_lines(data)):
        if line.startswith(wanted):
            yield index, line


def _lines(data: bytes) -> list[bytes]:
    """
    Split on LF only, keeping terminators, as the parser does.

    @return: the lines; joining them gives back C{data}.
    """
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


@contextmanager
def _editor_lock(path: str, timeout: float | None = None) -> Iterator[None]:
    """
    Hold an exclusive C{flock} on C{<path>.lock} for a read-modify-write.

    The lock lives in a sidecar file because the user file itself is
    replaced by rename, and a lock on a replaced inode excludes nobody.

    @param path: the user file (already resolved through symlinks).
    @param timeout: seconds to wait for another editor; L{None} for
        C{_LOCK_TIMEOUT}.
    @raise UserFileError: if the lock cannot be opened or is not released
        within C{timeout}.
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UserFileError(describe(lock_path, e)) from None
    if timeout is None:
        timeout = _LOCK_TIMEOUT
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserFileError(
                        f"{lock_path}: still locked by another editor after {timeout:g} seconds"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        # Closing releases the flock.
        os.close(fd)


def _atomic_write(path: str, data: bytes, like: os.stat_result | None) -> None:
    """
    Replace C{path} with C{data} so readers see the old or the new file,
    never a mixture, and the new one survives a crash once we return.

    @param path: the file to replace (already resolved through symlinks).
    @param data: the new contents.
    @param like: stat of the file being replaced, whose mode and ownership
        the new file gets; L{None} to create it with mode 0640.
    @raise UserFileError: if any step fails; the original is then untouched.
    """
    directory = os.path.dirname(path) or "."
    try:
        fd, temp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
        )
    except OSError as e:
        raise UserFileError(describe(directory, e)) from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if like is None:
                    os.fchmod(f.fileno(), 0o640)
                else:
                    os.fchmod(f.fileno(), like.st_mode & 0o7777)
                    mine = os.fstat(f.fileno())
                    if (mine.st_uid, mine.st_gid) != (like.st_uid, like.st_gid):
                        # Fails unless we are root or the owner moving to one
                        # of our groups; better to stop than to leave the file
                        # unreadable by the server's group.
                        os.fchown(f.fileno(), like.st_uid, like.st_gid)
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            with _ignore_missing():
                os.unlink(temp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise UserFileError(describe(path, e)) from None


@contextmanager
def _ignore_missing() -> Iterator[None]:
    """Suppress C{FileNotFoundError} only."""
    try:
        yield
    except FileNotFoundError:
        pass


def _read_for_edit(path: str, create: bool) -> tuple[bytes, os.stat_result | None]:
    """
    @return: the contents and stat of C{path}, or C{(b"", None)} if it is
        missing and C{create} is set.
    @raise UserFileError: if it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError as e:
        if create:
            return b"", None
        raise UserFileError(describe(path, e)) from None
    except OSError as e:
        raise UserFileError(describe(path, e)) from None


def _rewrite(
    path: str | os.PathLike[str],
    edit: Callable[[bytes, list[bytes]], _T],
    *,
    create: bool = False,
    lock_timeout: float | None = None,
) -> _T:
    """
    The one read-modify-write: lock, read, edit, and replace the file
    atomically if the edit changed anything.

    @param path: the user file; a symlink is followed, and the file it
        names is replaced.
    @param edit: called under the lock with the file's contents and its
        lines (L{_lines}), which it changes in place; what it returns is
        returned.
    @param create: treat a missing file as empty (it is then created with
        mode 0640) rather than fail.
    @param lock_timeout: seconds to wait for another editor; L{None} for
        C{_LOCK_TIMEOUT}.
    @return: what C{edit} returned.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    target = os.path.realpath(path)
    with _editor_lock(target, lock_timeout):
        data, st = _read_for_edit(target, create)
        lines = _lines(data)
        result = edit(data, lines)
        new = b"".join(lines)
        if new != data:
            _atomic_write(target, new, st)
    return result


def _append(lines: list[bytes], new: list[bytes]) -> None:
    """
    Add lines at the end, ending the last line first if it has no newline.
    """
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    lines.extend(new)


def _remove(lines: list[bytes], doomed: list[_Line]) -> bool:
    """
    Remove the given lines.

    @return: whether there were any.
    """
    for line in doomed:
        lines[line.index] = b""
    return bool(doomed)


def set_user_hash(path: str | os.PathLike[str], username: str, hashed: str) -> bool:
    """
    Add a user or replace a user's hash, keeping every other octet.

    Comments, other users and the fields after the hash on the user's own
    line are preserved byte for byte.  Only a main-password line holding a
    hash of the same kind (scram or not) is changed, the first if there are
    several (the one the server uses); app passwords are never touched.  A
    missing file is created with mode 0640.

    @param path: the user file.
    @param username: a name that passes L{validate_username}.
    @param hashed: a hash in a form L{pop3srv.auth.userfile.UserFile}
        accepts, e.g. from L{pop3srv.auth.hashpolicy.hash_password}.
    @return: L{True} if the user was added, L{False} if changed.
    @raise ValueError: for an invalid name or hash.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    username = normalise_username(username)
    check_hash(hashed)

    def edit(data: bytes, lines: list[bytes]) -> bool:
        for line in _parsed_user_lines(data, username):
            if line.label is None and line.scram == is_scram(hashed):
                lines[line.index] = line.with_hash(hashed)
                return False
        _append(lines, [_new_line(username, hashed, b"")])
        return True

    return _rewrite(path, edit, create=True)


def delete_user(path: str | os.PathLike[str], username: str) -> bool:
    """
    Remove every line defining a user, keeping every other octet.

    Every line goes, not just the first: otherwise a duplicate further down
    would silently come into force.

    @param path: the user file.
    @param username: the user to remove.
    @return: L{True} if the user was found and removed; L{False} (and the
        file untouched) if not.
    @raise ValueError: for an invalid name.
    @raise UserFileError: if the file or its lock cannot be read or written,
        including when the file does not exist.
    """
    validate_username(username)

    def edit(data: bytes, lines: list[bytes]) -> bool:
        doomed = [index for index, _ in _user_lines(data, username)]
        for index in doomed:
            lines[index] = b""
        return bool(doomed)

    return _rewrite(path, edit)


def set_password(
    path: str | os.PathLike[str],
    username: str,
    hashes: list[str],
    label: str | None = None,
) -> bool:
    """
    Set the hashes of one password of a user (the main one, or the app
    password C{label}), replacing every hash it had.

    Give one hash, or a non-scram and a scram hash of the same password (so
    that SCRAM works and clear-text logins use the other).  Existing lines of
    that password are rewritten in place, keeping their other fields; extra
    old lines are removed; a missing second line is added right after the
    first, with the same fields.  Other lines keep every octet.

    @param path: the user file.
    @param username: a name that passes L{validate_username}.
    @param hashes: one or two hashes, of different kinds.
    @param label: an app-password label, or L{None} for the main password.
    @return: L{True} if this password was new, L{False} if changed.
    @raise ValueError: for a bad name, label or hash.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    username = normalise_username(username)
    if label is not None:
        validate_label(label)
    if not 1 <= len(hashes) <= 2 or (
        len(hashes) == 2 and is_scram(hashes[0]) == is_scram(hashes[1])
    ):
        raise ValueError("give one hash, or one scram and one other hash")
    for hashed in hashes:
        check_hash(hashed)

    def edit(data: bytes, lines: list[bytes]) -> bool:
        mine = [line for line in _parsed_user_lines(data, username) if line.label == label]
        if not mine:
            suffix = b"" if label is None else b":" + (APP_TAG + label).encode("ascii")
            _append(lines, [_new_line(username, hashed, suffix) for hashed in hashes])
            return True
        first = mine[0]
        _remove(lines, mine[1:])
        lines[first.index] = b"".join(first.with_hash(hashed) for hashed in hashes)
        return False

    return _rewrite(path, edit, create=True)


def delete_app_password(path: str | os.PathLike[str], username: str, label: str) -> bool:
    """
    Revoke an app password: remove every line of it.

    @param path: the user file.
    @param username: the user.
    @param label: the app-password label.
    @return: L{True} if it was found and removed, L{False} if not.
    @raise ValueError: for a bad name or label.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    username = normalise_username(username)
    validate_label(label)

    def edit(data: bytes, lines: list[bytes]) -> bool:
        mine = [line for line in _parsed_user_lines(data, username) if line.label == label]
        return _remove(lines, mine)

    return _rewrite(path, edit)


def set_main_pop3(path: str | os.PathLike[str], username: str, usable: bool) -> bool:
    """
    Mark a user's main password usable or not for POP3 (the C{nopop3}
    field); app passwords are not affected.

    @param path: the user file.
    @param username: the user.
    @param usable: L{False} to add C{:nopop3} to each main-password line,
        L{True} to remove it.
    @return: L{False} if the user has no main password, else L{True}.
    @raise ValueError: for a bad name.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    username = normalise_username(username)
    tag = NOPOP3_TAG.encode("ascii")

    def edit(data: bytes, lines: list[bytes]) -> bool:
        mine = [line for line in _parsed_user_lines(data, username) if line.label is None]
        for line in mine:
            fields = [f for f in line.tail.split(b":")[1:] if f.strip() != tag]
            if not usable:
                fields.append(tag)
            tail = b"".join(b":" + f for f in fields)
            name_end = line.content.index(b":")
            hashed = line.hash_field.encode("utf-8")
            lines[line.index] = line.content[: name_end + 1] + hashed + tail + line.eol
        return bool(mine)

    return _rewrite(path, edit)


def replace_hash(
    path: str | os.PathLike[str],
    username: str,
    old: str,
    new: str,
    *,
    label: str | None = None,
    lock_timeout: float | None = None,
) -> bool:
    """
    Replace one hash by another, if it is still in the file: what a hash
    upgrade after login does.  It takes the same lock as
    C{pop3srv-passwd}, re-reads the file under it, and writes only if the
    line of C{label} still holds C{old}, so a password changed meanwhile is
    never overwritten, and the same hash on a line of another label (one
    password used twice) is left as it is.  A line that had a Dovecot
    C{{...}} prefix gets the new scheme's prefix.

    @param path: the user file.
    @param username: the user.
    @param old: the hash to replace, as L{pop3srv.auth.userfile.UserFile}
        normalised it.
    @param new: the new hash.
    @param label: the app-password label of the line to change; L{None}
        for a main-password line.
    @param lock_timeout: seconds to wait for the lock; L{None} for the
        default.
    @return: whether the file was changed.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    check_hash(new)
    username = normalise_username(username)

    def edit(data: bytes, lines: list[bytes]) -> bool:
        for line in _parsed_user_lines(data, username):
            if line.label != label:
                continue
            try:
                current = normalise_hash(line.hash_field)
            except ValueError:
                continue
            if current == old:
                lines[line.index] = line.with_hash(upgraded_field(line.hash_field, new))
                return True
        return False

    return _rewrite(path, edit, lock_timeout=lock_timeout)


def apply_upgrade(
    path: str | os.PathLike[str],
    username: str,
    old: str,
    new: str,
    *,
    label: str | None = None,
    lock_timeout: float = UPGRADE_LOCK_TIMEOUT,
) -> bool:
    """
    Write a hash upgrade offered by a login (L{pop3srv.auth.userfile.VerifyResult}
    C{upgrade_hash} in place of C{matched_hash}) and log what happened.
    BLOCKING (a file rewrite): call it from a thread.

    Never raises for a file that cannot be written: the login it follows
    has succeeded already.  A reader (L{pop3srv.auth.userfile.UserFile})
    offers an upgrade once per user and hash in the process that checked
    the password, whether or not the offer is then written, so each process
    runs this at most once for each and logs at most once.  An offer that
    is dropped (this fails, or the caller never gets the result) is not
    made again by that process until it restarts; other processes, and the
    same one after a restart, still offer it at the user's next login
    there.

    @param path: the user file.
    @param username: the user.
    @param old: the hash that matched.
    @param new: its replacement.
    @param label: the app-password label that matched: the line to change
        (see L{replace_hash}), and for the log.
    @param lock_timeout: seconds to wait for another editor.
    @return: whether the file was changed (L{False} as well if C{old} is
        gone: another login upgraded it first, or C{pop3srv-passwd}
        changed the password).
    """
    path = os.fspath(path)
    username = normalise_username(username)
    try:
        done = replace_hash(path, username, old, new, label=label, lock_timeout=lock_timeout)
    except UserFileError as e:
        _log.warn(
            "{path}: could not upgrade the hash of user {username!r}: {error}",
            path=path,
            username=username,
            error=str(e),
        )
        _log.info(
            "{path}: the hash for user {username!r} uses a deprecated "
            "scheme or weaker parameters; reset it with pop3srv-passwd",
            path=path,
            username=username,
        )
        return False
    if done:
        _log.info(
            "{path}: upgraded the {old} hash of user {username!r}{label} to {new}",
            path=path,
            username=username,
            label="" if label is None else f" (app password {label!r})",
            old=identify(old),
            new=identify(new),
        )
    return done


def _new_line(username: str, hashed: str, suffix: bytes) -> bytes:
    """
    @return: a new line for C{username} with C{hashed} and the fields in
        C{suffix}.
    """
    return username.encode("utf-8") + b":" + hashed.encode("ascii") + suffix + b"\n"


@dataclass(frozen=True)
class _Line:
    """
    One line of a user file as the editors see it.

    @ivar index: its index in L{_lines}.
    @ivar content: the line without its terminator.
    @ivar eol: the terminator.
    @ivar hash_field: the hash as written (prefix included), stripped.
    @ivar label: its C{app=} label, or L{None}.
    @ivar tail: everything from the colon after the hash on (C{b""} if none).
    """

    index: int
    content: bytes
    eol: bytes
    hash_field: str
    label: str | None
    tail: bytes

    @property
    def scram(self) -> bool:
        """Whether the hash is a scram hash."""
        return is_scram(self.hash_field)

    def with_hash(self, hashed: str) -> bytes:
        """
        @return: the line with its hash replaced, all else kept.
        """
        name_end = self.content.index(b":")
        return self.content[: name_end + 1] + hashed.encode("ascii") + self.tail + self.eol


def _parsed_user_lines(data: bytes, username: str) -> list[_Line]:
    """
    The lines of a user, split into fields; a line whose tags do not parse
    counts as a main-password line, as it cannot be an app password.

    @param data: the file contents.
    @param username: the user.
    @return: the user's lines in file order.
    """
    result = []
    for index, line in _user_lines(data, username):
        content, eol = _split_eol(line)
        name_end = content.index(b":")
        hash_end = content.find(b":", name_end + 1)
        tail = content[hash_end:] if hash_end >= 0 else b""
        hash_bytes = content[name_end + 1 : hash_end if hash_end >= 0 else len(content)]
        hash_field = hash_bytes.decode("utf-8", "replace").strip()
        try:
            label, _ = parse_tags(tail.decode("utf-8", "replace").split(":")[1:])
        except ValueError:
            label = None
        result.append(_Line(index, content, eol, hash_field, label, tail))
    return result
