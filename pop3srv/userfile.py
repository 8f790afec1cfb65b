# -*- test-case-name: tests.test_userfile -*-
"""
The user file: C{name:hash[:more fields]} lines, verified with passlib.

This is the only module that imports passlib, so a change of hashing library
touches nothing else.

File format, one user per line::

    # comments and blank lines are allowed
    alice:$argon2id$v=19$m=65536,t=3,p=4$...
    bob:{SHA512-CRYPT}$6$...::::::
    carol:$apr1$...

Fields after the hash are ignored, so a Dovecot passwd-file works unchanged.
Dovecot scheme prefixes that wrap a crypt(3) string (C{{SHA512-CRYPT}},
C{{SHA256-CRYPT}}, C{{BLF-CRYPT}}, C{{MD5-CRYPT}}, C{{ARGON2ID}},
C{{ARGON2I}}, C{{CRYPT}}) are stripped; the LDAP forms C{{SSHA}},
C{{SSHA256}} and C{{SSHA512}} are passlib's own and kept.  Plaintext and
unknown schemes are rejected.

L{UserFile} is the read side used by the server; L{set_user_hash},
L{delete_user} and L{hash_password} are the write side used by
C{pop3srv-passwd}.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from passlib.context import CryptContext  # type: ignore[import-untyped]
from twisted.logger import Logger

__all__ = [
    "ACCEPTED_SCHEMES",
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "UserFile",
    "UserFileError",
    "delete_user",
    "hash_password",
    "make_context",
    "set_user_hash",
    "validate_username",
]

DEFAULT_SCHEME = "argon2"

#: Every passlib scheme a user file may contain, the default first.
ACCEPTED_SCHEMES: tuple[str, ...] = (
    DEFAULT_SCHEME,
    "bcrypt",
    "sha512_crypt",
    "sha256_crypt",
    "pbkdf2_sha256",
    "pbkdf2_sha512",
    "ldap_salted_sha1",
    "ldap_salted_sha256",
    "ldap_salted_sha512",
    "apr_md5_crypt",
    "md5_crypt",
)

# Accepted only so that htpasswd files can be migrated; needs_update() is
# true for them, and hash_password() refuses to make new ones.
_DEPRECATED_SCHEMES: tuple[str, ...] = ("apr_md5_crypt", "md5_crypt")

#: Schemes L{hash_password} will produce.  Salted SHA is verified for
#: migration but never produced: one fast hash per guess is no defence.
HASH_SCHEMES: tuple[str, ...] = tuple(
    s for s in ACCEPTED_SCHEMES if s not in _DEPRECATED_SCHEMES and not s.startswith("ldap_")
)

_BCRYPT_IDENTS = ("$2a$", "$2b$", "$2y$")

# Dovecot prefix -> the crypt(3) idents the bare string may start with.  The
# prefix must agree with the string, so "{SHA512-CRYPT}$1$..." is rejected
# rather than quietly verified as MD5-crypt.
_DOVECOT_CRYPT_PREFIXES: dict[str, tuple[str, ...]] = {
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
    "BLF-CRYPT": _BCRYPT_IDENTS,
    "MD5-CRYPT": ("$1$",),
    "ARGON2ID": ("$argon2id$",),
    "ARGON2I": ("$argon2i$",),
    "CRYPT": ("$1$", "$5$", "$6$", *_BCRYPT_IDENTS),
}

# Salted SHA in LDAP/Dovecot form is native to passlib; only the case of the
# prefix needs normalising, as Dovecot treats scheme names case-insensitively.
_NATIVE_PREFIXES = ("SSHA", "SSHA256", "SSHA512")

_PLAINTEXT_PREFIXES = ("PLAIN", "CLEARTEXT", "CLEAR", "PLAIN-TRUNC")

_MAX_USERNAME_OCTETS = 255

_LOCK_TIMEOUT = 10.0


class UserFileError(ValueError):
    """
    The user file (or its lock) cannot be read or written.

    The message is one line, C{"<path>: <reason>"}, fit for a usage error.
    """


def make_context() -> CryptContext:
    """
    Build the passlib context used for verifying and hashing.

    New hashes are argon2id with argon2-cffi's RFC 9106 "low memory"
    parameters (64 MiB, 3 passes, 4 lanes), which passlib also defaults to.

    @return: a new context accepting every scheme in L{ACCEPTED_SCHEMES}.
    """
    return CryptContext(
        schemes=list(ACCEPTED_SCHEMES),
        default=DEFAULT_SCHEME,
        deprecated=list(_DEPRECATED_SCHEMES),
        argon2__type="ID",
    )


_CONTEXT = make_context()


def validate_username(name: str) -> None:
    """
    Check that C{name} can be a user name here and a maildrop name later.

    The realm uses the same check, so a name that passes here can never
    escape the mail directory.

    @param name: the candidate user name.
    @raise ValueError: with a short reason if the name is empty, longer than
        255 octets as UTF-8, contains C{/}, C{:}, C{..}, NUL, whitespace or a
        control/format character, is C{.}, or starts with C{#} (it would read
        as a comment in the user file).
    """
    if not name:
        raise ValueError("user name is empty")
    try:
        octets = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("user name is not valid Unicode") from None
    if octets > _MAX_USERNAME_OCTETS:
        raise ValueError(f"user name is longer than {_MAX_USERNAME_OCTETS} octets as UTF-8")
    if name == "." or ".." in name:
        raise ValueError("user name must not be '.' or contain '..'")
    if name.startswith("#"):
        raise ValueError("user name must not start with '#'")
    for char in name:
        if char in "/:":
            raise ValueError(f"user name must not contain {char!r}")
        if char.isspace():
            raise ValueError("user name must not contain whitespace")
        # Cc covers NUL and the C0/C1 controls; Cf covers invisible format
        # characters (bidi overrides, zero-width joiners) that make two names
        # look alike in logs.
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise ValueError("user name must not contain control characters")


def _normalise_hash(field: str, context: CryptContext) -> str:
    """
    Turn the hash field of a line into a string the context can verify.

    @param field: the second field of a line, surrounding whitespace removed.
    @param context: the context that must recognise the result.
    @return: the hash, with any Dovecot crypt prefix stripped.
    @raise ValueError: with a reason (never containing the field itself,
        which might be a plaintext password) if the hash is not accepted.
    """
    if not field:
        raise ValueError("empty password hash")
    bare = field
    allowed_idents: tuple[str, ...] | None = None
    if field.startswith("{"):
        end = field.find("}")
        if end < 0:
            raise ValueError("unrecognised password hash")
        prefix = field[1:end].upper()
        if prefix in _DOVECOT_CRYPT_PREFIXES:
            bare = field[end + 1 :]
            allowed_idents = _DOVECOT_CRYPT_PREFIXES[prefix]
        elif prefix in _NATIVE_PREFIXES:
            bare = "{" + prefix + "}" + field[end + 1 :]
        elif prefix in _PLAINTEXT_PREFIXES:
            raise ValueError("plaintext passwords are not accepted")
        else:
            raise ValueError("unsupported password scheme")
        if allowed_idents is not None and not bare.startswith(allowed_idents):
            raise ValueError(f"hash does not match its {{{prefix}}} prefix")
    scheme = context.identify(bare)
    if scheme is None:
        if bare.startswith(("!", "*")):
            raise ValueError("account disabled or locked (hash starts with ! or *)")
        raise ValueError("unrecognised password hash")
    try:
        parsed = context.handler(scheme).from_string(bare)
    except (ValueError, TypeError):
        raise ValueError(f"malformed {scheme} hash") from None
    # A bare settings string ("$6$salt") parses but verifies nothing.
    if getattr(parsed, "checksum", True) is None:
        raise ValueError(f"malformed {scheme} hash")
    return bare


def hash_password(password: str, scheme: str | None = None) -> str:
    """
    Hash a password for storing in a user file.

    @param password: the plaintext password.
    @param scheme: a passlib scheme name from L{HASH_SCHEMES}; L{None} means
        L{DEFAULT_SCHEME} (argon2id).
    @return: the hash, in the form L{UserFile} accepts.
    @raise ValueError: if C{scheme} is not in L{HASH_SCHEMES}.
    """
    if scheme is None:
        return str(_CONTEXT.hash(password))
    if scheme not in HASH_SCHEMES:
        raise ValueError(
            f"unknown or deprecated scheme {scheme!r}; choose one of: {', '.join(HASH_SCHEMES)}"
        )
    return str(_CONTEXT.handler(scheme).hash(password))


@dataclass(frozen=True)
class _Snapshot:
    """
    One parse of the user file.

    @ivar key: C{(st_mtime_ns, st_size, st_ino)} of the file that was read.
    @ivar users: user name to verifiable hash.
    @ivar decoy: the hash unknown users are checked against, or L{None} for
        an empty file.
    """

    key: tuple[int, int, int]
    users: dict[str, str] = field(default_factory=dict)
    decoy: str | None = None


class UserFile:
    """
    A user file, re-read whenever it changes on disk.

    Safe to call from several threads at once: parsing is serialised by a
    lock and each lookup works on an immutable snapshot, while the expensive
    hash verification runs outside the lock.
    """

    log = Logger()

    def __init__(self, path: str | os.PathLike[str], context: CryptContext | None = None) -> None:
        """
        Read and parse the file.

        @param path: the user file.
        @param context: the passlib context; the module default if L{None}.
        @raise UserFileError: if the file cannot be read.
        """
        self.path = os.fspath(path)
        self.context = _CONTEXT if context is None else context
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._logged_updates: set[tuple[str, str]] = set()
        try:
            self._snapshot = self._load()
        except OSError as e:
            raise UserFileError(_describe(self.path, e)) from None

    def _load(self) -> _Snapshot:
        """
        Read and parse the file.

        @return: the new snapshot.
        @raise OSError: if the file cannot be read.
        """
        with open(self.path, "rb") as f:
            # The key comes from the descriptor we read, not from an earlier
            # stat() of the path, so a rename between the two cannot pair new
            # contents with an old key.
            st = os.fstat(f.fileno())
            data = f.read()
        return self._parse(data, (st.st_mtime_ns, st.st_size, st.st_ino))

    def _parse(self, data: bytes, key: tuple[int, int, int]) -> _Snapshot:
        """
        Parse file contents, logging and skipping every bad line.

        Log lines name the file and line number but never quote the line:
        a line that does not parse may be a plaintext password.

        @param data: the raw file contents.
        @param key: the stat key of the file the data came from.
        @return: the parsed snapshot.
        """
        users: dict[str, str] = {}
        first_seen: dict[str, int] = {}
        decoy: str | None = None
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError:
                self._skip(lineno, "not valid UTF-8")
                continue
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            name, colon, rest = line.partition(":")
            if not colon:
                self._skip(lineno, "no ':' separator")
                continue
            try:
                validate_username(name)
            except ValueError as e:
                self._skip(lineno, str(e))
                continue
            if name in first_seen:
                self._skip(
                    lineno,
                    f"duplicate user {name!r} (first defined on line {first_seen[name]})",
                )
                continue
            try:
                hashed = _normalise_hash(rest.partition(":")[0].strip(), self.context)
            except ValueError as e:
                self._skip(lineno, f"user {name!r}: {e}")
                continue
            first_seen[name] = lineno
            users[name] = hashed
            if decoy is None:
                decoy = hashed
        return _Snapshot(key, users, decoy)

    def _skip(self, lineno: int, reason: str) -> None:
        """
        Log a skipped line.

        @param lineno: 1-based line number.
        @param reason: why it was skipped.
        """
        self.log.warn(
            "{path}:{lineno}: skipping line: {reason}",
            path=self.path,
            lineno=lineno,
            reason=reason,
        )

    def _current(self) -> _Snapshot:
        """
        Return the current snapshot, re-reading the file if it changed.

        If the file cannot be read the last good snapshot stays in use; the
        error is logged once, not on every lookup.

        @return: the snapshot to use for this lookup.
        """
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._snapshot.key:
                    self._snapshot = self._load()
            except OSError as e:
                message = _describe(self.path, e)
                if message != self._last_error:
                    self.log.error(
                        "{error}; still using the user list read earlier",
                        error=message,
                    )
                    self._last_error = message
            else:
                self._last_error = None
            return self._snapshot

    def __contains__(self, username: object) -> bool:
        """
        @param username: a user name.
        @return: whether the file currently defines that user.
        """
        return username in self._current().users

    def verify(self, username: str, password: str) -> bool:
        """
        Check a password.  BLOCKING: this runs a deliberately slow hash, so
        call it from a thread, never from the reactor thread.

        An unknown user costs the same as a wrong password: the password is
        verified against a real hash from the file (the first user's, so the
        scheme and cost are ones actually in use) and the result thrown away.
        If the file holds no users, passlib's C{dummy_verify} is used instead.

        @param username: the user name as the client sent it.
        @param password: the password as the client sent it.
        @return: L{True} only if the user exists and the password matches.
        """
        snapshot = self._current()
        hashed = snapshot.users.get(username)
        if hashed is None:
            if snapshot.decoy is None:
                self.context.dummy_verify()
            else:
                self._checked_verify(username, password, snapshot.decoy)
            return False
        if not self._checked_verify(username, password, hashed):
            return False
        if (username, hashed) not in self._logged_updates and self.context.needs_update(hashed):
            self._logged_updates.add((username, hashed))
            self.log.info(
                "{path}: the hash for user {username!r} uses a deprecated "
                "scheme or weaker parameters; reset it with pop3srv-passwd",
                path=self.path,
                username=username,
            )
        return True

    def _checked_verify(self, username: str, password: str, hashed: str) -> bool:
        """
        Verify, treating a password the scheme cannot take as a mismatch.

        bcrypt, for one, raises rather than answers for a password longer
        than 72 octets or containing NUL.

        @param username: for the log only.
        @param password: the candidate password.
        @param hashed: a hash that parsed when the file was read.
        @return: whether the password matches.
        """
        try:
            return bool(self.context.verify(password, hashed))
        except (ValueError, TypeError) as e:
            # Only the class name: the message is library text we do not
            # control and must not risk echoing the password.
            self.log.info(
                "{path}: password for user {username!r} rejected by the hash scheme ({error})",
                path=self.path,
                username=username,
                error=type(e).__name__,
            )
            return False


def _describe(path: str, error: OSError) -> str:
    """
    @return: C{"<path>: <strerror>"}, one line.
    """
    reason = error.strerror or str(error)
    return f"{path}: {reason}"


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
        raise UserFileError(_describe(lock_path, e)) from None
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
        raise UserFileError(_describe(directory, e)) from None
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
        raise UserFileError(_describe(path, e)) from None


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
        raise UserFileError(_describe(path, e)) from None
    except OSError as e:
        raise UserFileError(_describe(path, e)) from None


def set_user_hash(path: str | os.PathLike[str], username: str, hashed: str) -> bool:
    """
    Add a user or replace a user's hash, keeping every other octet.

    Comments, other users and the fields after the hash on the user's own
    line are preserved byte for byte.  If the user appears more than once,
    the first line (the one the server uses) is changed.  A missing file is
    created with mode 0640.

    @param path: the user file.
    @param username: a name that passes L{validate_username}.
    @param hashed: a hash in a form L{UserFile} accepts, e.g. from
        L{hash_password}.
    @return: L{True} if the user was added, L{False} if changed.
    @raise ValueError: for an invalid name or hash.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    if any(c in hashed for c in ":\r\n") or hashed != hashed.strip():
        raise ValueError("hash must not contain ':', whitespace or line breaks")
    _normalise_hash(hashed, _CONTEXT)
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=True)
        lines = _lines(data)
        for index, line in _user_lines(data, username):
            content, eol = _split_eol(line)
            name_end = content.index(b":")
            hash_end = content.find(b":", name_end + 1)
            tail = content[hash_end:] if hash_end >= 0 else b""
            lines[index] = content[: name_end + 1] + hashed.encode("ascii") + tail + eol
            added = False
            break
        else:
            if lines and not lines[-1].endswith(b"\n"):
                lines[-1] += b"\n"
            lines.append(username.encode("utf-8") + b":" + hashed.encode("ascii") + b"\n")
            added = True
        _atomic_write(target, b"".join(lines), st)
    return added


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
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=False)
        doomed = {index for index, _ in _user_lines(data, username)}
        if not doomed:
            return False
        kept = [line for index, line in enumerate(_lines(data)) if index not in doomed]
        _atomic_write(target, b"".join(kept), st)
    return True
