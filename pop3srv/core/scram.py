# -*- test-case-name: tests.test_scram -*-
"""
SCRAM-SHA-256 (RFC 5802, RFC 7677): the server-side arithmetic and the
plain values it works on (L{StoredScram}, L{ScramProof}).

Nothing here does I/O or imports Twisted.  The exchange itself (who sends
what when) lives in L{pop3srv.core.sasl}; the C{twisted.cred} side (the
credentials a checker receives, the lookup interface it provides) lives in
L{pop3srv.auth.credentials}, which wraps these values.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ITERATIONS",
    "HASH_NAME",
    "ScramProof",
    "StoredScram",
    "client_key",
    "escape_saslname",
    "fake_stored",
    "make_nonce",
    "salted_password",
    "server_signature",
    "stored_from_salted",
    "unescape_saslname",
    "verify_proof",
]

#: The hash function of SCRAM-SHA-256, as C{hashlib} names it.
HASH_NAME = "sha256"

#: RFC 7677 asks for at least 4096 iterations.
DEFAULT_ITERATIONS = 4096

_DIGEST_SIZE = hashlib.sha256().digest_size


@dataclass(frozen=True)
class StoredScram:
    """
    What the server keeps for one SCRAM-SHA-256 password (RFC 5802 section
    3): never the password, nor anything a client could log in with.

    @ivar salt: the salt, raw bytes.
    @ivar iterations: the PBKDF2 iteration count.
    @ivar stored_key: C{H(HMAC(SaltedPassword, "Client Key"))}.
    @ivar server_key: C{HMAC(SaltedPassword, "Server Key")}.
    @ivar label: the app-password label this secret belongs to, or L{None}
        for the main password; for logging only.
    """

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes
    label: str | None = None

    def __repr__(self) -> str:
        """
        @return: a representation without the keys, which are password
            equivalents for an offline guesser.
        """
        return f"StoredScram(iterations={self.iterations}, label={self.label!r})"


def _hmac(key: bytes, message: bytes) -> bytes:
    """
    @return: C{HMAC-SHA-256(key, message)}.
    """
    return hmac.new(key, message, HASH_NAME).digest()


def _h(data: bytes) -> bytes:
    """
    @return: C{SHA-256(data)}.
    """
    return hashlib.sha256(data).digest()


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """
    RFC 5802's C{Hi(Normalize(password), salt, i)}, which is PBKDF2.

    @param password: the password, already normalised (SASLprep) and
        encoded as UTF-8.
    @param salt: the raw salt.
    @param iterations: the iteration count.
    @return: the 32-octet salted password.
    """
    return hashlib.pbkdf2_hmac(HASH_NAME, password, salt, iterations)


def client_key(salted: bytes) -> bytes:
    """
    @param salted: a salted password.
    @return: C{HMAC(SaltedPassword, "Client Key")}.
    """
    return _hmac(salted, b"Client Key")


def stored_from_salted(
    salt: bytes, iterations: int, salted: bytes, label: str | None = None
) -> StoredScram:
    """
    Derive what the server stores from a salted password.

    @param salt: the raw salt.
    @param iterations: the iteration count.
    @param salted: C{Hi(password, salt, iterations)}.
    @param label: see L{StoredScram.label}.
    @return: the stored keys.
    """
    return StoredScram(
        salt=salt,
        iterations=iterations,
        stored_key=_h(client_key(salted)),
        server_key=_hmac(salted, b"Server Key"),
        label=label,
    )


def fake_stored(
    secret: bytes, username: str, iterations: int, salt_length: int = 16
) -> StoredScram:
    """
    A stand-in for a user who does not exist or has no SCRAM secret.

    The salt is derived from C{secret} and the user name, so asking twice
    gives the same salt, as for a real user; the keys are derived likewise
    and match no password anyone knows.

    @param secret: a server secret the client cannot learn.
    @param username: the user name the client gave.
    @param iterations: the iteration count to claim; use the one real users
        have, or the difference gives the game away.
    @param salt_length: likewise for the salt (passlib makes 12 octets).
    @return: a plausible L{StoredScram}.
    """
    name = username.encode("utf-8", "surrogatepass")
    return StoredScram(
        salt=_hmac(secret, b"salt\0" + name)[:salt_length],
        iterations=iterations,
        stored_key=_hmac(secret, b"stored\0" + name),
        server_key=_hmac(secret, b"server\0" + name),
    )


def server_signature(stored: StoredScram, auth_message: bytes) -> bytes:
    """
    @param stored: the user's stored keys.
    @param auth_message: RFC 5802's C{AuthMessage}.
    @return: C{ServerSignature}, sent to the client as C{v=}.
    """
    return _hmac(stored.server_key, auth_message)


def verify_proof(stored: StoredScram, auth_message: bytes, proof: bytes) -> bool:
    """
    Check a client proof (RFC 5802 section 3, the server side).

    @param stored: the user's stored keys.
    @param auth_message: RFC 5802's C{AuthMessage}.
    @param proof: the decoded C{p=} attribute.
    @return: whether C{H(proof XOR ClientSignature) == StoredKey}, compared
        in constant time.
    """
    if len(proof) != _DIGEST_SIZE:
        return False
    signature = _hmac(stored.stored_key, auth_message)
    key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    return hmac.compare_digest(_h(key), stored.stored_key)


def make_nonce() -> str:
    """
    @return: a fresh server nonce: 24 printable characters (base64 of 18
        random octets), never containing C{,}.
    """
    return base64.b64encode(os.urandom(18)).decode("ascii")


def escape_saslname(name: str) -> str:
    """
    Encode a user name for C{n=} (RFC 5802: C{,} as C{=2C}, C{=} as C{=3D}).

    @param name: the user name.
    @return: the saslname.
    """
    return name.replace("=", "=3D").replace(",", "=2C")


def unescape_saslname(saslname: str) -> str:
    """
    Decode a C{n=} or C{a=} value.

    @param saslname: the value as sent.
    @return: the user name.
    @raise ValueError: if C{=} is followed by anything but C{2C} or C{3D},
        or a bare C{,} appears (RFC 5802 says the server must fail then).
    """
    out: list[str] = []
    i = 0
    while i < len(saslname):
        char = saslname[i]
        if char == ",":
            raise ValueError("unescaped ',' in saslname")
        if char == "=":
            code = saslname[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise ValueError("bad '=' escape in saslname")
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class ScramProof:
    """
    What a finished SCRAM exchange proves, as plain data: the checker looks
    the user up and calls L{check} with the keys it knows.

    @ivar auth_message: RFC 5802's C{AuthMessage}.
    @ivar proof: the decoded client proof.
    """

    auth_message: bytes = field(repr=False)
    proof: bytes = field(repr=False)

    def check(self, stored: StoredScram) -> bool:
        """
        @param stored: the user's stored keys.
        @return: whether the proof matches them (constant time).
        """
        return verify_proof(stored, self.auth_message, self.proof)
