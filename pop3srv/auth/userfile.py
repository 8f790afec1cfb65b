# -*- test-case-name: tests.test_userfile -*-
"""
The user file: C{name:hash[:more fields]} lines, verified with passlib.

This is the only module that imports passlib, so a change of hashing library
touches nothing else.

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

Dovecot scheme prefixes that wrap a crypt(3) string (C{{SHA512-CRYPT}},
C{{SHA256-CRYPT}}, C{{BLF-CRYPT}}, C{{MD5-CRYPT}}, C{{ARGON2ID}},
C{{ARGON2I}}, C{{CRYPT}}) are stripped; the LDAP forms C{{SSHA}},
C{{SSHA256}} and C{{SSHA512}} are passlib's own and kept.  Plaintext and
unknown schemes are rejected.

Normalisation (RFC 6856): user names are compared in Unicode NFC, passwords
after SASLprep (RFC 4013, which SCRAM requires; see L{normalise_password}).

Hash upgrade: after a successful login against a hash of a deprecated scheme
or weaker parameters than the current default, the line is rewritten with a
new argon2id hash (L{replace_hash}), atomically and under the same lock as
C{pop3srv-passwd}, and the event is logged.  Scram hashes are never
replaced.  If the file or its directory is not writable by the server, the
login still succeeds and the need is logged once.

L{UserFile} is the read side used by the server; L{set_password},
L{set_user_hash}, L{delete_app_password}, L{set_main_pop3}, L{delete_user}
and L{hash_password} are the write side used by C{pop3srv-passwd}.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
import threading
import time
import unicodedata
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from passlib.context import CryptContext
from passlib.hash import scram as passlib_scram
from passlib.utils import saslprep
from twisted.logger import Logger

from pop3srv.auth.argon2check import verify_argon2
from pop3srv.auth.oscrypt import verify_sha_crypt
from pop3srv.core.scram import DEFAULT_ITERATIONS, StoredScram, fake_stored, stored_from_salted

__all__ = [
    "ACCEPTED_SCHEMES",
    "APP_TAG",
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "NOPOP3_TAG",
    "SCRAM_SCHEME",
    "UserFile",
    "UserFileError",
    "VerifyResult",
    "delete_app_password",
    "delete_user",
    "hash_password",
    "make_context",
    "normalise_password",
    "normalise_username",
    "replace_hash",
    "set_main_pop3",
    "set_password",
    "set_user_hash",
    "validate_label",
    "validate_username",
]

DEFAULT_SCHEME = "argon2"

#: passlib's SCRAM hash: the only kind that can serve SASL SCRAM-SHA-256.
SCRAM_SCHEME = "scram"

#: A field after the hash marking an app password: C{app=LABEL}.
APP_TAG = "app="

#: A field after the hash marking the main password unusable for POP3.
NOPOP3_TAG = "nopop3"

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

#: Every passlib scheme a user file may contain, the default first.
ACCEPTED_SCHEMES: tuple[str, ...] = (
    DEFAULT_SCHEME,
    "bcrypt",
    "sha512_crypt",
    "sha256_crypt",
    "pbkdf2_sha256",
    "pbkdf2_sha512",
    SCRAM_SCHEME,
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
        # SHA-1 because passlib insists on it; SHA-256 for SCRAM-SHA-256.
        scram__algs="sha-1,sha-256",
    )


_CONTEXT = make_context()

# For fake SCRAM answers when the file holds no scram hash to derive a
# stable secret from.
_PROCESS_SECRET = secrets.token_bytes(32)


def normalise_username(name: str) -> str:
    """
    Normalise a user name (RFC 6856 asks for one rule): Unicode NFC, so a
    name typed with combining accents finds the precomposed one in the file.
    Nothing else: SASLprep's mappings only touch characters that
    L{validate_username} refuses anyway.

    @param name: the name as sent or as written in the file.
    @return: its NFC form.
    """
    return unicodedata.normalize("NFC", name)


def normalise_password(password: str) -> str:
    """
    Normalise a password with SASLprep (RFC 4013), as SCRAM (RFC 5802)
    requires and as passlib's scram hash does, so PLAIN, LOGIN and SCRAM
    agree on what a password is: non-ASCII spaces become spaces, soft
    hyphens and other "mapped to nothing" characters vanish, and the result
    is NFKC.  A password SASLprep refuses (control characters, unassigned
    code points) is used as given.

    @param password: the password as typed or sent.
    @return: the normalised password.
    """
    try:
        return str(saslprep(password))
    except (ValueError, TypeError):
        return password


def _password_forms(password: str) -> list[str]:
    """
    @return: the normalised password, then the raw one if it differs: hashes
        made before normalisation hold the raw form.
    """
    prepared = normalise_password(password)
    return [prepared] if prepared == password else [prepared, password]


def validate_label(label: str) -> None:
    """
    Check an app-password label.

    @param label: the candidate.
    @raise ValueError: unless it is 1-64 of C{A-Z a-z 0-9 . _ @ + -},
        starting with a letter or digit.
    """
    if not _LABEL_RE.fullmatch(label):
        raise ValueError(
            "app password label must be 1-64 letters, digits or . _ @ + -, "
            "starting with a letter or digit"
        )


def _is_scram(hashed: str) -> bool:
    """
    @return: whether C{hashed} is a passlib scram hash.
    """
    return hashed.startswith("$scram$")


def _stored_from_hash(hashed: str, label: str | None) -> StoredScram | None:
    """
    @param hashed: a passlib scram hash.
    @param label: see L{StoredScram.label}.
    @return: its SCRAM-SHA-256 keys, or L{None} if it has no SHA-256 digest.
    """
    try:
        salt, rounds, salted = passlib_scram.extract_digest_info(hashed, "sha-256")
    except (KeyError, ValueError):
        return None
    return stored_from_salted(bytes(salt), int(rounds), bytes(salted), label)


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

    @param password: the plaintext password, normalised here with
        L{normalise_password}.
    @param scheme: a passlib scheme name from L{HASH_SCHEMES}; L{None} means
        L{DEFAULT_SCHEME} (argon2id).
    @return: the hash, in the form L{UserFile} accepts.
    @raise ValueError: if C{scheme} is not in L{HASH_SCHEMES}.
    """
    password = normalise_password(password)
    if scheme is None:
        return str(_CONTEXT.hash(password))
    if scheme not in HASH_SCHEMES:
        raise ValueError(
            f"unknown or deprecated scheme {scheme!r}; choose one of: {', '.join(HASH_SCHEMES)}"
        )
    return str(_CONTEXT.handler(scheme).hash(password))


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
    """

    key: tuple[int, int, int]
    users: dict[str, tuple[_Secret, ...]] = field(default_factory=dict)
    decoy: str | None = None
    scram_decoy: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    """
    The outcome of L{UserFile.verify_detailed}.

    @ivar ok: whether the password is right for a usable password of the user.
    @ivar label: the app-password label that matched, L{None} for the main
        password (or no match).
    @ivar needs_update: the matching hash is of a deprecated scheme or too
        weak, and was not (or could not be) rewritten.
    @ivar upgraded: the matching hash was rewritten in the file with the
        current default scheme.
    """

    ok: bool
    label: str | None = None
    needs_update: bool = False
    upgraded: bool = False


class _Entry:
    """Lines of one secret while parsing: the hash of each kind."""

    def __init__(self, label: str | None, lineno: int) -> None:
        self.label = label
        self.lineno = lineno
        self.plain: tuple[str, int] | None = None
        self.scram: tuple[str, int] | None = None


def _parse_tags(fields: list[str]) -> tuple[str | None, bool]:
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
        @param context: the passlib context; the module default if L{None}.
        @param upgrade: after a successful verification against a deprecated
            or too weak hash, rewrite the file with a new hash.
        @raise UserFileError: if the file cannot be read.
        """
        self.path = os.fspath(path)
        self.context = _CONTEXT if context is None else context
        self.upgrade = upgrade
        self._lock = threading.Lock()
        _OPEN_FILES.add(self)
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
                label, off = _parse_tags(extra)
                hashed = _normalise_hash(hash_field.strip(), self.context)
            except ValueError as e:
                self._skip(lineno, f"user {name!r}: {e}")
                continue
            secrets_of = entries.setdefault(name, {})
            entry = secrets_of.get(label)
            kind = "scram" if _is_scram(hashed) else "plain"
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
        return _Snapshot(key, users, decoy or scram_decoy, scram_decoy)

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
        (L{normalise_password}); a hash made from the password as typed
        before normalisation existed still verifies.

        An unknown user costs one hash, as a wrong single password does: the
        password is verified against a real hash from the file (the first
        user's, so the scheme and cost are ones actually in use) and the
        result thrown away.  If the file holds no users, passlib's
        C{dummy_verify} is used instead.  (A user with app passwords costs
        one hash per password on a mismatch.)

        After a match against a hash of a deprecated scheme or weaker
        parameters, the file is rewritten with a new hash (see
        L{replace_hash}), unless C{upgrade} was turned off.

        @param username: the user name as the client sent it.
        @param password: the password as the client sent it.
        @return: whether it matched, and which label.
        """
        snapshot = self._current()
        username = normalise_username(username)
        secrets_of = snapshot.users.get(username)
        candidates = _password_forms(password)
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
        After a match: upgrade the hash if it is due.

        @param username: the normalised user name.
        @param password: the form of the password that matched.
        @param secret: the secret it matched.
        @return: the result to report.
        """
        hashed = secret.hashed
        if _is_scram(hashed) or not self.context.needs_update(hashed):
            # A scram hash is never replaced: an argon2 one would break SCRAM.
            return VerifyResult(ok=True, label=secret.label)
        if self.upgrade and (username, hashed) not in self._logged_updates:
            new = str(self.context.hash(password))
            try:
                done = replace_hash(self.path, username, hashed, new, lock_timeout=0.5)
            except UserFileError as e:
                done = None
                self.log.warn(
                    "{path}: could not upgrade the hash of user {username!r}: {error}",
                    path=self.path,
                    username=username,
                    error=str(e),
                )
            if done:
                self.log.info(
                    "{path}: upgraded the {old} hash of user {username!r}{label} to {new}",
                    path=self.path,
                    username=username,
                    label="" if secret.label is None else f" (app password {secret.label!r})",
                    old=self.context.identify(hashed),
                    new=self.context.identify(new),
                )
                self._logged_updates.add((username, hashed))
                return VerifyResult(ok=True, label=secret.label, upgraded=True)
            if done is False:
                # The hash is no longer in the file: another login upgraded
                # it first, or pop3srv-passwd changed the password.
                self._logged_updates.add((username, hashed))
                return VerifyResult(ok=True, label=secret.label)
        if (username, hashed) not in self._logged_updates:
            self._logged_updates.add((username, hashed))
            self.log.info(
                "{path}: the hash for user {username!r} uses a deprecated "
                "scheme or weaker parameters; reset it with pop3srv-passwd",
                path=self.path,
                username=username,
            )
        return VerifyResult(ok=True, label=secret.label, needs_update=True)

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
        # SHA-crypt through the system's libcrypt: half the CPU of passlib's
        # pure-Python backend (see pop3srv.auth.oscrypt); None means "ask passlib".
        fast = verify_sha_crypt(password, hashed)
        if fast is None and hashed.startswith("$argon2"):
            # One thread per check instead of one per lane (see
            # pop3srv.auth.argon2check); None again means "ask passlib".
            fast = verify_argon2(password, hashed)
        if fast is not None:
            return fast
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
                stored = _stored_from_hash(secret.scram, secret.label)
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
        real = None if decoy is None else _stored_from_hash(decoy, None)
        if real is None:
            return fake_stored(_PROCESS_SECRET, username, DEFAULT_ITERATIONS)
        return fake_stored(
            real.server_key, normalise_username(username), real.iterations, len(real.salt)
        )


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
    line are preserved byte for byte.  Only a main-password line holding a
    hash of the same kind (scram or not) is changed, the first if there are
    several (the one the server uses); app passwords are never touched.  A
    missing file is created with mode 0640.

    @param path: the user file.
    @param username: a name that passes L{validate_username}.
    @param hashed: a hash in a form L{UserFile} accepts, e.g. from
        L{hash_password}.
    @return: L{True} if the user was added, L{False} if changed.
    @raise ValueError: for an invalid name or hash.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    validate_username(username)
    username = normalise_username(username)
    _check_hash(hashed)
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=True)
        lines = _lines(data)
        for line in _parsed_user_lines(data, username):
            if line.label is None and line.scram == _is_scram(hashed):
                lines[line.index] = line.with_hash(hashed)
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
        return _is_scram(self.hash_field)

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
            label, _ = _parse_tags(tail.decode("utf-8", "replace").split(":")[1:])
        except ValueError:
            label = None
        result.append(_Line(index, content, eol, hash_field, label, tail))
    return result


def _check_hash(hashed: str) -> None:
    """
    @raise ValueError: unless C{hashed} can be written into a line.
    """
    if any(c in hashed for c in ":\r\n") or hashed != hashed.strip():
        raise ValueError("hash must not contain ':', whitespace or line breaks")
    _normalise_hash(hashed, _CONTEXT)


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
        len(hashes) == 2 and _is_scram(hashes[0]) == _is_scram(hashes[1])
    ):
        raise ValueError("give one hash, or one scram and one other hash")
    for hashed in hashes:
        _check_hash(hashed)
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=True)
        lines = _lines(data)
        mine = [line for line in _parsed_user_lines(data, username) if line.label == label]
        if mine:
            first = mine[0]
            new = [first.with_hash(hashed) for hashed in hashes]
            lines[first.index] = b"".join(new)
            for line in mine[1:]:
                lines[line.index] = b""
        else:
            if lines and not lines[-1].endswith(b"\n"):
                lines[-1] += b"\n"
            suffix = b"" if label is None else b":" + (APP_TAG + label).encode("ascii")
            for hashed in hashes:
                lines.append(
                    username.encode("utf-8") + b":" + hashed.encode("ascii") + suffix + b"\n"
                )
        _atomic_write(target, b"".join(lines), st)
    return not mine


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
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=False)
        doomed = {line.index for line in _parsed_user_lines(data, username) if line.label == label}
        if not doomed:
            return False
        kept = [line for index, line in enumerate(_lines(data)) if index not in doomed]
        _atomic_write(target, b"".join(kept), st)
    return True


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
    target = os.path.realpath(path)
    with _editor_lock(target):
        data, st = _read_for_edit(target, create=False)
        lines = _lines(data)
        mine = [line for line in _parsed_user_lines(data, username) if line.label is None]
        if not mine:
            return False
        tag = NOPOP3_TAG.encode("ascii")
        for line in mine:
            fields = [f for f in line.tail.split(b":")[1:] if f.strip() != tag]
            if not usable:
                fields.append(tag)
            tail = b"".join(b":" + f for f in fields)
            name_end = line.content.index(b":")
            hashed = line.hash_field.encode("utf-8")
            lines[line.index] = line.content[: name_end + 1] + hashed + tail + line.eol
        new = b"".join(lines)
        if new != data:
            _atomic_write(target, new, st)
    return True


# The Dovecot-style prefix to keep on an upgraded line that had one.
_UPGRADE_PREFIXES = {"argon2": "{ARGON2ID}", "bcrypt": "{BLF-CRYPT}"}


def replace_hash(
    path: str | os.PathLike[str],
    username: str,
    old: str,
    new: str,
    *,
    lock_timeout: float | None = None,
) -> bool:
    """
    Replace one hash by another, if it is still in the file: what a hash
    upgrade after login does.  It takes the same lock as
    C{pop3srv-passwd}, re-reads the file under it, and writes only if the
    line still holds C{old}, so a password changed meanwhile is never
    overwritten.  A line that had a Dovecot C{{...}} prefix gets the new
    scheme's prefix.

    @param path: the user file.
    @param username: the user.
    @param old: the hash to replace, as L{UserFile} normalised it.
    @param new: the new hash.
    @param lock_timeout: seconds to wait for the lock; L{None} for the
        default.
    @return: whether the file was changed.
    @raise UserFileError: if the file or its lock cannot be read or written.
    """
    _check_hash(new)
    target = os.path.realpath(path)
    with _editor_lock(target, lock_timeout):
        data, st = _read_for_edit(target, create=False)
        lines = _lines(data)
        for line in _parsed_user_lines(data, normalise_username(username)):
            try:
                current = _normalise_hash(line.hash_field, _CONTEXT)
            except ValueError:
                continue
            if current != old:
                continue
            written = new
            if line.hash_field.startswith("{"):
                prefix = _UPGRADE_PREFIXES.get(str(_CONTEXT.identify(new)))
                if prefix is not None:
                    written = prefix + new
            lines[line.index] = line.with_hash(written)
            _atomic_write(target, b"".join(lines), st)
            return True
    return False
