# -*- test-case-name: tests.test_hashing -*-
"""
argon2 verification on the calling thread alone.

argon2's reference code, which argon2-cffi wraps and passlib calls, gives
each lane of a hash its own thread (4 lanes by default) and starts those
threads afresh for every slice of every pass: 48 thread starts per check at
t=3, p=4.  Each start wakes another CPU.  Under a flood of argon2 logins
those wake-ups pre-empt the server's sessions: `make bench` measured a
session's NOOP p99 at 4.6-5.9 ms with passlib's call against 0.7-1.0 ms
with this one, for 10-15% fewer argon2 logins per second.  Logins are
spread over the CPUs by the hashing pool already, so one check needs no
more than one thread.

The result is the same hash the reference code computes (the lanes are
defined by the parameters, not by the threads that fill them).  Anything
this module does not recognise (another variant, extra fields, a future
argon2-cffi whose context it cannot build) answers L{None}, and the caller
falls back to passlib.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re

from argon2.low_level import Type, core, ffi

__all__ = ["verify_argon2"]

_TYPES = {"argon2d": Type.D, "argon2i": Type.I, "argon2id": Type.ID}

# $argon2id$v=19$m=65536,t=3,p=4$<salt>$<digest>, base64 without padding.
_HASH_RE = re.compile(
    r"\$(argon2id|argon2i|argon2d)\$(?:v=(16|19)\$)?m=(\d{1,8}),t=(\d{1,6}),p=(\d{1,3})"
    r"\$([A-Za-z0-9+/]{11,})\$([A-Za-z0-9+/]{6,})"
)

# The range argon2 accepts, and a ceiling so a doctored file cannot make one
# check allocate more than 4 GiB.
_MAX_MEMORY_KIB = 4 * 1024 * 1024

_ARGON2_OK = 0


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def verify_argon2(password: str, hashed: str) -> bool | None:
    """
    Check a password against an argon2 hash in passlib's (the PHC) format.

    @param password: the candidate password; passlib hashes its UTF-8.
    @param hashed: the stored hash.
    @return: whether it matches, or L{None} if this module cannot tell.
    """
    match = _HASH_RE.fullmatch(hashed)
    if match is None:
        return None
    variant, version, memory, passes, lanes, salt64, digest64 = match.groups()
    memory_kib, time_cost, parallelism = int(memory), int(passes), int(lanes)
    if (
        not 1 <= parallelism <= 255
        or time_cost < 1
        or not 8 * parallelism <= memory_kib <= _MAX_MEMORY_KIB
    ):
        return None
    try:
        salt, digest = _b64(salt64), _b64(digest64)
        secret = password.encode("utf-8")
    except (binascii.Error, UnicodeError):
        return None
    out = ffi.new("uint8_t[]", len(digest))
    c_secret = ffi.new("uint8_t[]", secret)
    c_salt = ffi.new("uint8_t[]", salt)
    try:
        context = ffi.new(
            "argon2_context *",
            {
                "out": out,
                "outlen": len(digest),
                "pwd": c_secret,
                "pwdlen": len(secret),
                "salt": c_salt,
                "saltlen": len(salt),
                "secret": ffi.NULL,
                "secretlen": 0,
                "ad": ffi.NULL,
                "adlen": 0,
                "t_cost": time_cost,
                "m_cost": memory_kib,
                "lanes": parallelism,
                "threads": 1,
                "version": int(version or 16),
                "allocate_cbk": ffi.NULL,
                "free_cbk": ffi.NULL,
                "flags": 0,
            },
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        # argon2-cffi changed the context's layout (it says it may).
        return None
    if core(context, _TYPES[variant].value) != _ARGON2_OK:
        return None
    return hmac.compare_digest(bytes(ffi.buffer(out, len(digest))), digest)
