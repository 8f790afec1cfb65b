# -*- test-case-name: tests.test_userfile -*-
"""
The user file, read side: C{name:hash[:more fields]} lines, and the
L{UserFile} the server verifies passwords against.

File format, one line per password::

    # comments and blank lines are allowed
    alice:$argon2id$v=19$m=65536,t=3,p=4$...
    bob:{SHA512-CRYPT}$6$...::::::
    carol:$apr1$...

Fields after the hash are ignored, so a Dovecot passwd-file works unchanged,
except two markers pop3srv looks for in any of them:

  - C{app=LABEL}: the line is an app password of the user, not the main
    password.  A user may have any number, each with its own label
    (1-64 of C{A-Z a-z 0-9 . _ @ + -}); each logs in on its own, and the
    label is reported (L{UserFile.verify_detailed}) so the log can name it.
    C{pop3srv-passwd --app LABEL [--delete]} makes and revokes them.
  - C{nopop3}: on the main password's line(s), that password does not log
    in to POP3 (app passwords still do), for a file shared with services
    where the main password is used.

One password (the main one, or one app label) may have two lines: one with
a passlib C{$scram$} hash (with a SHA-256 digest) and one with any other
hash, of the same password.  Clear-text logins (USER/PASS, SASL PLAIN and
LOGIN) are checked against the other hash; SASL SCRAM-SHA-256 uses the scram
one.  A scram line alone serves both.  A third line of a kind already seen
is a duplicate: logged and skipped, the first one winning::

    alice:$argon2id$...:1000:1000::/home/alice::
    alice:$scram$100000$...,sha-256=...
    alice:$argon2id$...:app=phone
    alice:$scram$...:app=thunderbird

Which hashes are accepted, and how passwords are normalised and checked, is
hash policy (L{pop3srv.auth.hashpolicy}); what a user name may be is an
identity rule (L{pop3srv.auth.identity}).  User names are compared in
Unicode NFC, passwords after SASLprep (RFC 6856).

Hash upgrade: a successful check against a hash of a deprecated scheme or
weaker parameters than the current default reports it (L{VerifyResult}
C{needs_update}), with a new argon2id hash of the password that matched, so
that the caller can write it (L{pop3srv.auth.editor.apply_upgrade}, which
the checker runs in its thread pool).  Reading never writes.  Scram hashes
are never replaced.  The new hash is offered once per user and hash by each
L{UserFile} object (in practice, each process that checks the password),
as the offer is remembered when it is made, not when it is written: if the
caller drops it, that process does not offer it again until it restarts,
while other processes still do.

L{UserFile} is the read side used by the server; L{pop3srv.auth.editor} is
the write side used by C{pop3srv-passwd} and by hash upgrades.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
import weakref
from dataclasses import dataclass, field

from twisted.logger import Logger

from pop3srv.auth.hashpolicy import (
    CONTEXT,
    CryptContext,
    is_scram,
    needs_upgrade,
    normalise_hash,
    password_forms,
    stored_from_hash,
    verify_hash,
)
from pop3srv.auth.identity import normalise_username, validate_label, validate_username
from pop3srv.core.scram import DEFAULT_ITERATIONS, StoredScram, fake_stored

__all__ = [
    "APP_TAG",
    "NOPOP3_TAG",
    "UserFile",
    "UserFileError",
    "VerifyResult",
    "describe",
    "parse_tags",
]

#: A field after the hash marking an app password: C{app=LABEL}.
APP_TAG = "app="

#: A field after the hash marking the main password unusable for POP3.
NOPOP3_TAG = "nopop3"


class UserFileError(ValueError):
    """
    The user file (or its lock) cannot be read or written.

    The message is one line, C{"<path>: <reason>"}, fit for a usage error.
    """


def describe(path: str, error: OSError) -> str:
    """
    @return: C{"<path>: <strerror>"}, one line.
    """
    reason = error.strerror or str(error)
    return f"{path}: {reason}"


# For fake SCRAM answers when the file holds no scram hash to derive a
# stable secret from.
_PROCESS_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True)
class _Secret:
    """
    One password of a user: the main one or an app password.

    @ivar label: the app-password label, or L{None} for the main password.
    @ivar hashed: the hash used to verify a password sent in clear (the
        non-scram hash, or the scram one if that is all there is).
    @ivar scram: the passlib scram hash of the same password, if any.
    @ivar lineno: the line that defined it first, for messages.
    """

    label: str | None
    hashed: str
    scram: str | None
    lineno: int


@dataclass(frozen=True)
class _Snapshot:
    """
    One parse of the user file.

    @ivar key: C{(st_mtime_ns, st_size, st_ino)} of the file that was read.
    @ivar users: user name to that user's passwords usable for POP3, the
        main one first (absent if marked C{nopop3}), then app passwords in
        file order.  A user whose every password is unusable maps to C{()}.
    @ivar decoy: the hash unknown users are checked against, or L{None} for
        an empty file.
    @ivar scram_decoy: a scram hash from the file, to borrow the iteration
        count and a secret from for fake SCRAM answers; or L{None}.
    @ivar has_scram: whether some usable password has SCRAM-SHA-256 keys,
        i.e. whether a SCRAM login can succeed for anyone.
    """

    key: tuple[int, int, int]
    users: dict[str, tuple[_Secret, ...]] = field(default_factory=dict)
    decoy: str | None = None
    scram_decoy: str | None = None
    has_scram: bool = False


@dataclass(frozen=True)
class VerifyResult:
    """
    The outcome of L{UserFile.verify_detailed}: plain fields only, as it
    crosses process pipes.

    @ivar ok: whether the password is right for a usable password of the user.
    @ivar label: the app-password label that matched, L{None} for the main
        password (or no match).
    @ivar needs_update: the matching hash is of a deprecated scheme or too
        weak.
    @ivar upgrade_hash: a new hash of the password that matched, for the
        caller to write in place of C{matched_hash}
        (L{pop3srv.auth.editor.apply_upgrade}); offered once per user and
        hash by each L{UserFile} (see L{UserFile.verify_detailed}), and
        never when upgrades are turned off.
    @ivar matched_hash: the hash that matched, as parsed, when
        C{needs_update}; L{None} otherwise.
    """

    ok: bool
    label: str | None = None
    needs_update: bool = False
    upgrade_hash: str | None = None
    matched_hash: str | None = None


class _Entry:
    """Lines of one secret while parsing: the hash of each kind."""

    def __init__(self, label: str | None, lineno: int) -> None:
        self.label = label
        self.lineno = lineno
        self.plain: tuple[str, int] | None = None
        self.scram: tuple[str, int] | None = None


def parse_tags(fields: list[str]) -> tuple[str | None, bool]:
    """
    Find pop3srv's markers among the fields after the hash.

    @param fields: the fields after the hash.
    @return: the app-password label (or L{None}) and whether C{nopop3} is set.
    @raise ValueError: for a bad label, two labels, or C{nopop3} on an app
        password.
    """
    label: str | None = None
    nopop3 = False
    for item in fields:
        item = item.strip()
        if item == NOPOP3_TAG:
            nopop3 = True
        elif item.startswith(APP_TAG):
            if label is not None:
                raise ValueError("more than one app= field")
            label = item[len(APP_TAG) :]
            validate_label(label)
    if label is not None and nopop3:
        raise ValueError(f"{NOPOP3_TAG} applies to the main password only")
    return label, nopop3


#: Every UserFile, for L{_new_locks_after_fork}.
_OPEN_FILES: weakref.WeakSet[UserFile] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    """
    In a forked child (a hashing or server process), give every user file a
    new lock: a thread of the parent may have held the old one at the fork,
    and that thread does not exist in the child to release it.
    """
    for users in list(_OPEN_FILES):
        users._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_after_fork)


class UserFile:
    """
    A user file, re-read whenever it changes on disk.

    Safe to call from several threads at once: parsing is serialised by a
    lock and each lookup works on an immutable snapshot, while the expensive
    hash verification runs outside the lock.
    """

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        context: CryptContext | None = None,
        *,
        upgrade: bool = True,
    ) -> None:
        """
        Read and parse the file.

        @param path: the user file.
        @param context: the passlib context; L{pop3srv.auth.hashpolicy.CONTEXT}
            if L{None}.
        @param upgrade: after a successful verification against a deprecated
            or too weak hash, offer a new hash for the caller to write (see
            L{VerifyResult}); if L{False}, log once that it should be reset.
        @raise UserFileError: if the file cannot be read.
        """
        self.path = os.fspath(path)
        self.context = CONTEXT if context is None else context
        self.upgrade = upgrade
        self._lock = threading.Lock()
        _OPEN_FILES.add(self)
        self._last_error: str | None = None
        # (user, hash) pairs whose upgrade was offered or logged already.
        self._offered: set[tuple[str, str]] = set()
        try:
            self._snapshot = self._load()
        except OSError as e:
            raise UserFileError(describe(self.path, e)) from None

    def _load(self) -> _Snapshot:
        """
        Read and parse the file.

        @return: the new snapshot.
        @raise OSError: if the file cannot be read.
        """
        # Non-blocking, so that a FIFO put at the path fails here instead of
        # blocking the open until a writer comes, with the lock held (every
        # lookup of this process would wait behind it).
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            # The key comes from the descriptor we read, not from an earlier
            # stat() of the path, so a rename between the two cannot pair new
            # contents with an old key.
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
            if not stat.S_ISREG(st.st_mode):
                # A FIFO would give nothing or a writer's text, a device
                # such as /dev/zero an endless read.
                raise OSError(errno.EINVAL, "Not a regular file", self.path)
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
        entries: dict[str, dict[str | None, _Entry]] = {}
        nopop3: set[str] = set()
        decoy: str | None = None
        scram_decoy: str | None = None
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
            name = normalise_username(name)
            hash_field, *extra = rest.split(":")
            try:
                label, off = parse_tags(extra)
                hashed = normalise_hash(hash_field.strip(), self.context)
            except ValueError as e:
                self._skip(lineno, f"user {name!r}: {e}")
                continue
            secrets_of = entries.setdefault(name, {})
            entry = secrets_of.get(label)
            kind = "scram" if is_scram(hashed) else "plain"
            previous = None if entry is None else getattr(entry, kind)
            if previous is not None:
                if label is None:
                    what = f"duplicate user {name!r}"
                else:
                    what = f"duplicate app password {label!r} for user {name!r}"
                self._skip(lineno, f"{what} (first defined on line {previous[1]})")
                continue
            if entry is None:
                entry = secrets_of[label] = _Entry(label, lineno)
            setattr(entry, kind, (hashed, lineno))
            if off:
                nopop3.add(name)
            if kind == "plain" and decoy is None:
                decoy = hashed
            if kind == "scram" and scram_decoy is None:
                scram_decoy = hashed
        users: dict[str, tuple[_Secret, ...]] = {}
        for name, secrets_of in entries.items():
            usable = []
            for label, entry in secrets_of.items():
                if label is None and name in nopop3:
                    continue
                plain, scram_hash = entry.plain, entry.scram
                hashed = (plain or scram_hash or ("", 0))[0]
                usable.append(
                    _Secret(label, hashed, scram_hash[0] if scram_hash else None, entry.lineno)
                )
            # The main password first, then app passwords in file order.
            usable.sort(key=lambda s: (s.label is not None, s.lineno))
            users[name] = tuple(usable)
        has_scram = any(
            secret.scram is not None and stored_from_hash(secret.scram, None) is not None
            for secrets_of_user in users.values()
            for secret in secrets_of_user
        )
        return _Snapshot(key, users, decoy or scram_decoy, scram_decoy, has_scram)

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

    def __len__(self) -> int:
        """How many users the file holds now."""
        return len(self._current().users)

    def _current(self) -> _Snapshot:
        """
        Return the current snapshot, re-reading the file if it changed.

        If the file cannot be read (gone, not permitted, a directory, a FIFO
        or another file that is not a regular one) the last good snapshot
        stays in use, so logins go on as before the change rather than fail;
        the error is logged once, not on every lookup.

        @return: the snapshot to use for this lookup.
        """
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._snapshot.key:
                    self._snapshot = self._load()
            except OSError as e:
                message = describe(self.path, e)
                if message != self._last_error:
                    self.log.error(
                        "{error}; still using the user list read earlier",
                        error=message,
                    )
                    self._last_error = message
            else:
                self._last_error = None
            return self._snapshot

    @property
    def has_scram(self) -> bool:
        """
        Whether some user has a password usable for POP3 with SCRAM-SHA-256
        keys, as of the last read of the file.  No I/O at all, so the
        reactor thread may ask: the answer follows the file when a lookup,
        a verification or L{refresh} (in a thread) re-reads it.
        """
        return self._snapshot.has_scram

    def refresh(self) -> None:
        """
        Re-read the file if it changed.  BLOCKING (a C{stat}, and a read
        and parse if it changed): call it from a thread.
        """
        self._current()

    def __contains__(self, username: object) -> bool:
        """
        @param username: a user name.
        @return: whether the file currently defines that user.
        """
        if not isinstance(username, str):
            return False
        return normalise_username(username) in self._current().users

    def labels(self, username: str) -> list[str | None]:
        """
        @param username: a user name.
        @return: the user's passwords usable for POP3: L{None} for the main
            one, then each app-password label.
        """
        secrets_of = self._current().users.get(normalise_username(username), ())
        return [s.label for s in secrets_of]

    def verify(self, username: str, password: str) -> bool:
        """
        Check a password; L{verify_detailed} without the details.

        @param username: the user name as the client sent it.
        @param password: the password as the client sent it.
        @return: L{True} only if the user exists and the password matches.
        """
        return self.verify_detailed(username, password).ok

    def verify_detailed(self, username: str, password: str) -> VerifyResult:
        """
        Check a password against the user's main password (unless marked
        C{nopop3}) and then each app password.  BLOCKING: this runs a
        deliberately slow hash per password tried, so call it from a thread,
        never from the reactor thread.

        The user name is normalised to NFC and the password with SASLprep
        (L{pop3srv.auth.hashpolicy.normalise_password}); a hash made from the password as typed
        before normalisation existed still verifies.

        An unknown user costs one hash, as a wrong single password does: the
        password is verified against a real hash from the file (the first
        user's, so the scheme and cost are ones actually in use) and the
        result thrown away.  If the file holds no users, passlib's
        C{dummy_verify} is used instead.  (A user with app passwords costs
        one hash per password on a mismatch.)

        After a match against a hash of a deprecated scheme or weaker
        parameters, the result says so and carries a new hash for the
        caller to write (see L{VerifyResult}); the file is never written
        here.  The new hash comes once per user and hash in this object (in
        the process that checked the password): later matches report
        C{needs_update} without one, whether or not the first was written.
        A dropped offer (the write failed, or its caller went away) is
        therefore not repeated by this process until it restarts; other
        processes, with their own L{UserFile}, still make it.

        @param username: the user name as the client sent it.
        @param password: the password as the client sent it.
        @return: whether it matched, and which label.
        """
        snapshot = self._current()
        username = normalise_username(username)
        secrets_of = snapshot.users.get(username)
        candidates = password_forms(password)
        if not secrets_of:
            # As many hash checks as a known user with one password makes, so
            # a password whose normalised form differs does not tell them apart.
            for candidate in candidates:
                if snapshot.decoy is None:
                    self.context.dummy_verify()
                else:
                    self._checked_verify(username, candidate, snapshot.decoy)
            return VerifyResult(ok=False)
        for secret in secrets_of:
            for candidate in candidates:
                if self._checked_verify(username, candidate, secret.hashed):
                    return self._matched(username, candidate, secret)
        return VerifyResult(ok=False)

    def _matched(self, username: str, password: str, secret: _Secret) -> VerifyResult:
        """
        After a match: offer an upgrade of the hash if it is due.  Nothing
        is written here; the caller writes C{upgrade_hash} if it wants to.

        The offer (or, with upgrades off, the log line saying the hash
        should be reset) comes once per user and hash in this object, so a
        hash that cannot be replaced (a read-only file) costs one extra hash
        at its first login only.

        @param username: the normalised user name.
        @param password: the form of the password that matched.
        @param secret: the secret it matched.
        @return: the result to report.
        """
        hashed = secret.hashed
        if not needs_upgrade(hashed, self.context):
            return VerifyResult(ok=True, label=secret.label)
        new: str | None = None
        if (username, hashed) not in self._offered:
            self._offered.add((username, hashed))
            if self.upgrade:
                new = str(self.context.hash(password))
            else:
                self.log.info(
                    "{path}: the hash for user {username!r} uses a deprecated "
                    "scheme or weaker parameters; reset it with pop3srv-passwd",
                    path=self.path,
                    username=username,
                )
        return VerifyResult(
            ok=True, label=secret.label, needs_update=True, upgrade_hash=new, matched_hash=hashed
        )

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
            return verify_hash(password, hashed, self.context)
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

    def scram_lookup(self, username: str) -> StoredScram | None:
        """
        The SCRAM-SHA-256 keys of a user's first usable password that has a
        scram hash with a SHA-256 digest (the main password, unless it is
        C{nopop3}, then app passwords in file order).  Cheap: no hashing.

        @param username: the user name (normalised here).
        @return: the keys, labelled, or L{None}.
        """
        for secret in self._current().users.get(normalise_username(username), ()):
            if secret.scram is not None:
                stored = stored_from_hash(secret.scram, secret.label)
                if stored is not None:
                    return stored
        return None

    def scram_credentials(self, username: str) -> StoredScram:
        """
        Like L{scram_lookup}, but for a user with no SCRAM keys, a fake whose
        salt is stable (derived from a scram hash in the file, which the
        client cannot know, and the name) and whose iteration count is one
        actually in use, so the answer does not reveal whether the user
        exists or has a scram hash.

        @param username: the user name.
        @return: real or fake keys.
        """
        stored = self.scram_lookup(username)
        if stored is not None:
            return stored
        decoy = self._current().scram_decoy
        real = None if decoy is None else stored_from_hash(decoy, None)
        if real is None:
            return fake_stored(_PROCESS_SECRET, username, DEFAULT_ITERATIONS)
        return fake_stored(
            real.server_key, normalise_username(username), real.iterations, len(real.salt)
        )
