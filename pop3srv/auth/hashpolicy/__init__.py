# -*- test-case-name: tests.test_userfile -*-
"""
Hash policy: which password hashes a user file may hold, how a password is
normalised before hashing, how a hash is checked, and when it is due for an
upgrade.

This package is the only part of pop3srv that imports passlib, so a change
of hashing library (or a move to another passlib fork) touches nothing
else.  Its two fast paths, L{oscrypt} (SHA-crypt through the system's
libcrypt) and L{argon2check} (argon2 on one thread), live here too: they
answer for passlib when they can, and hand back to it when they cannot.

Accepted hashes: every scheme in L{ACCEPTED_SCHEMES}.  Dovecot scheme
prefixes that wrap a crypt(3) string (C{{SHA512-CRYPT}}, C{{SHA256-CRYPT}},
C{{BLF-CRYPT}}, C{{MD5-CRYPT}}, C{{ARGON2ID}}, C{{ARGON2I}}, C{{CRYPT}}) are
stripped; the LDAP forms C{{SSHA}}, C{{SSHA256}} and C{{SSHA512}} are
passlib's own and kept.  Plaintext and unknown schemes are rejected.

Passwords are normalised with SASLprep (RFC 4013, which SCRAM requires;
see L{normalise_password}).
"""

from __future__ import annotations

from passlib.context import CryptContext
from passlib.hash import scram as passlib_scram
from passlib.utils import saslprep

from pop3srv.auth.hashpolicy.argon2check import verify_argon2
from pop3srv.auth.hashpolicy.oscrypt import verify_sha_crypt
from pop3srv.core.scram import StoredScram, stored_from_salted

__all__ = [
    "ACCEPTED_SCHEMES",
    "CONTEXT",
    "DEFAULT_SCHEME",
    "HASH_SCHEMES",
    "SCRAM_SCHEME",
    "CryptContext",
    "check_hash",
    "hash_password",
    "identify",
    "is_scram",
    "make_context",
    "needs_upgrade",
    "normalise_hash",
    "normalise_password",
    "password_forms",
    "stored_from_hash",
    "upgraded_field",
    "verify_hash",
]

DEFAULT_SCHEME = "argon2"

#: passlib's SCRAM hash: the only kind that can serve SASL SCRAM-SHA-256.
SCRAM_SCHEME = "scram"

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

# The Dovecot-style prefix to keep on an upgraded line that had one.
_UPGRADE_PREFIXES = {"argon2": "{ARGON2ID}", "bcrypt": "{BLF-CRYPT}"}


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


#: The context every user file and editor uses unless given another.
CONTEXT = make_context()


def normalise_password(password: str) -> str:
    """
    Normalise a password with SASLprep (RFC 4013), as SCRAM (RFC 5802)
    requires and as passlib's scram hash does, so PLAIN, LOGIN and SCRAM
    agree on what a password is: non-ASCII spaces become spaces, soft
    hyphens and other "mapped to nothing" characters vanish, and the result
    is NFKC.  A password SASLprep refuses (control characters, unassigned
    code points) is used as given.

    This is hash policy rather than an identity rule: it decides what gets
    hashed, and it is passlib's own SASLprep, the one its scram hashes were
    made with, so the two can never disagree.

    @param password: the password as typed or sent.
    @return: the normalised password.
    """
    try:
        return str(saslprep(password))
    except (ValueError, TypeError):
        return password


def password_forms(password: str) -> list[str]:
    """
    @return: the normalised password, then the raw one if it differs: hashes
        made before normalisation hold the raw form.
    """
    prepared = normalise_password(password)
    return [prepared] if prepared == password else [prepared, password]


def is_scram(hashed: str) -> bool:
    """
    @return: whether C{hashed} is a passlib scram hash.
    """
    return hashed.startswith("$scram$")


def stored_from_hash(hashed: str, label: str | None) -> StoredScram | None:
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


def normalise_hash(field: str, context: CryptContext = CONTEXT) -> str:
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


def check_hash(hashed: str) -> None:
    """
    @raise ValueError: unless C{hashed} is accepted and can be written into
        a line of a user file.
    """
    if any(c in hashed for c in ":\r\n") or hashed != hashed.strip():
        raise ValueError("hash must not contain ':', whitespace or line breaks")
    normalise_hash(hashed, CONTEXT)


def hash_password(password: str, scheme: str | None = None) -> str:
    """
    Hash a password for storing in a user file.

    @param password: the plaintext password, normalised here with
        L{normalise_password}.
    @param scheme: a passlib scheme name from L{HASH_SCHEMES}; L{None} means
        L{DEFAULT_SCHEME} (argon2id).
    @return: the hash, in the form a user file accepts.
    @raise ValueError: if C{scheme} is not in L{HASH_SCHEMES}.
    """
    password = normalise_password(password)
    if scheme is None:
        return str(CONTEXT.hash(password))
    if scheme not in HASH_SCHEMES:
        raise ValueError(
            f"unknown or deprecated scheme {scheme!r}; choose one of: {', '.join(HASH_SCHEMES)}"
        )
    return str(CONTEXT.handler(scheme).hash(password))


def verify_hash(password: str, hashed: str, context: CryptContext = CONTEXT) -> bool:
    """
    Check a password against a hash that L{normalise_hash} accepted.

    @param password: the candidate password.
    @param hashed: the hash.
    @param context: the context to fall back to.
    @return: whether the password matches.
    @raise ValueError: or L{TypeError}, if the scheme cannot take this
        password (bcrypt, for one, refuses more than 72 octets or a NUL).
    """
    # SHA-crypt through the system's libcrypt: half the CPU of passlib's
    # pure-Python backend (see oscrypt); None means "ask passlib".
    fast = verify_sha_crypt(password, hashed)
    if fast is None and hashed.startswith("$argon2"):
        # One thread per check instead of one per lane (see argon2check);
        # None again means "ask passlib".
        fast = verify_argon2(password, hashed)
    if fast is not None:
        return fast
    return bool(context.verify(password, hashed))


def needs_upgrade(hashed: str, context: CryptContext = CONTEXT) -> bool:
    """
    Whether a hash that just matched should be replaced by a new one.

    @param hashed: the hash, as L{normalise_hash} returned it.
    @param context: the context whose policy applies.
    @return: L{True} for a deprecated scheme or weaker parameters than the
        current default; never for a scram hash, as an argon2 hash in its
        place would break SCRAM.
    """
    return not is_scram(hashed) and bool(context.needs_update(hashed))


def identify(hashed: str, context: CryptContext = CONTEXT) -> str | None:
    """
    @return: the passlib scheme name of C{hashed}, or L{None}.
    """
    scheme = context.identify(hashed)
    return None if scheme is None else str(scheme)


def upgraded_field(field: str, new: str) -> str:
    """
    The hash field to write in place of C{field} for an upgrade to C{new}:
    a field that had a Dovecot C{{...}} prefix gets the new scheme's prefix.

    @param field: the hash field as written in the line.
    @param new: the new hash, bare.
    @return: the field to write.
    """
    if field.startswith("{"):
        prefix = _UPGRADE_PREFIXES.get(str(identify(new)))
        if prefix is not None:
            return prefix + new
    return new
