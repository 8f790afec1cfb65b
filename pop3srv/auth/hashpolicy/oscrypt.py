# -*- test-case-name: tests.test_hashing -*-
"""
SHA-crypt verification with the system's libcrypt (libxcrypt), when present.

passlib (libpass) verifies sha512_crypt and sha256_crypt with a pure-Python
backend: about 2 ms per login at 5000 rounds, twice what libxcrypt's C code
takes, and all of it holding the GIL.  Dovecot-style user files are mostly
SHA512-CRYPT, so this halves the CPU a login flood costs.  Called through
ctypes, the C function also runs without the GIL.

Only the C{$5$} and C{$6$} formats are handled, and only when libcrypt
gives an answer in the same setting (salt and rounds) as the stored hash;
anything else (no libcrypt, a NUL in the password, a setting libcrypt would
normalise, such as rounds below 1000) answers L{None}, and the caller falls
back to passlib.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac

__all__ = ["available", "verify_sha_crypt"]

#: libxcrypt's C{CRYPT_DATA_SIZE}: what C{crypt_rn} needs as scratch space.
_DATA_SIZE = 32768


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """
    @return: libxcrypt's C{crypt_rn}, or L{None} without libxcrypt.
    """
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        crypt_rn = lib.crypt_rn
    except (OSError, AttributeError):
        # No library, or glibc's old libcrypt without crypt_rn.
        return None
    crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    crypt_rn.restype = ctypes.c_char_p
    return crypt_rn


_crypt_rn = _load()


def available() -> bool:
    """Whether the system's libcrypt can be used."""
    return _crypt_rn is not None


def verify_sha_crypt(password: str, hashed: str) -> bool | None:
    """
    Check a password against a C{$5$} or C{$6$} hash with libcrypt.

    @param password: the candidate password.
    @param hashed: the stored hash.
    @return: whether it matches, or L{None} if libcrypt cannot tell (the
        caller then asks passlib).
    """
    if _crypt_rn is None or not hashed.startswith(("$5$", "$6$")) or "\0" in password:
        return None
    try:
        phrase = password.encode("utf-8")
        setting = hashed.encode("ascii")
    except UnicodeError:
        return None
    data = ctypes.create_string_buffer(_DATA_SIZE)
    result = _crypt_rn(phrase, setting, data, _DATA_SIZE)
    if not result or result.startswith(b"*"):
        return None
    # The same setting (salt and rounds) back, or this is not a hash that
    # libcrypt reads the way passlib does: let passlib decide.
    if result.rpartition(b"$")[0] != setting.rpartition(b"$")[0]:
        return None
    return hmac.compare_digest(result, setting)
