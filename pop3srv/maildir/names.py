# -*- test-case-name: tests.test_maildir -*-
"""
What a Maildir message's file name says: its base (the unique name), the
UIDL other POP3 servers derived from it, the sizes some writers put in it,
and when it was delivered.

A name is C{BASE[:INFO]}: the base is fixed at delivery and never changes,
the info (C{2,FLAGS}) is the reader's and changes with the flags.  Dovecot
and Courier's maildirquota put sizes in the base (C{,S=} the file's
octets, Dovecot's C{,W=} the octets with CRLF line ends); Python's
C{mailbox.Maildir} and Postfix put none.

Pure functions of bytes: no Twisted, no file access.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Between the base and the info (the Maildir specification's C{:}).
INFO_SEP = b":"
#: The info a reader gives a message it moves from C{new/} to C{cur/}.
NEW_INFO = b":2,"

_TIMESTAMP = re.compile(rb"(\d{1,19})\.")
# Microseconds as Dovecot, Postfix and Python's mailbox write them (M<usec>)
# in the part after the timestamp; its other letters (V, I, P, Q, R) carry
# hex or decimal digits, never an M.
_MICROSECONDS = re.compile(rb"[^.,:]*?M(\d{1,6})(?=[^0-9]|$)")


def base_of(name: bytes) -> bytes:
    """
    The unique part of a message's file name: all before the info.

    @param name: the file name, as stored.
    """
    return name.split(INFO_SEP, 1)[0]


def uidl_of(base: bytes) -> bytes:
    """
    The UIDL a message is served with: its base, what Dovecot's
    C{pop3_uidl_format = %f} and Courier's pop3d (its original UIDLs)
    serve, so a client that kept mail sees the same ids.  An octet a UIDL
    may not hold (RFC 1939: C{0x21} to C{0x7E}) is written C{+XX} in hex,
    as Courier does.

    @param base: the name's base (L{base_of}).
    """
    if all(0x21 <= c <= 0x7E for c in base) and base:
        return base
    return b"".join(bytes([c]) if 0x21 <= c <= 0x7E else b"+%02X" % c for c in base)


@dataclass(frozen=True, slots=True)
class NamedSizes:
    """
    The sizes a name's base states, each L{None} if absent or malformed.

    @ivar file: C{,S=}: the file's length in octets.
    @ivar wire: C{,W=}: its length with every line ended by CRLF (Dovecot's
        virtual size).
    """

    file: int | None
    wire: int | None


def sizes_of(base: bytes) -> NamedSizes:
    """
    The C{,S=} and C{,W=} fields of a base, read as Dovecot does: each
    C{,}-separated field after the first that is a letter, C{=} and digits.
    """
    found: dict[bytes, int] = {}
    for field in base.split(b",")[1:]:
        key, eq, digits = field.partition(b"=")
        if eq and key in (b"S", b"W") and digits.isdigit() and len(digits) <= 19:
            found.setdefault(key, int(digits))
    return NamedSizes(found.get(b"S"), found.get(b"W"))


def delivery_key(base: bytes) -> tuple[int, int, bytes]:
    """
    The order messages are numbered in: by the delivery time that starts
    the name (seconds, then microseconds if the name has C{M<usec>}), then
    by the base.  A name that starts with no time sorts first.
    """
    match = _TIMESTAMP.match(base)
    if match is None:
        return (0, 0, base)
    micro = _MICROSECONDS.match(base, match.end())
    return (int(match[1]), int(micro[1]) if micro is not None else 0, base)


def cur_name(name: bytes) -> bytes:
    """
    The name a message of C{new/} gets in C{cur/}: an empty info added, as
    mail readers do, unless it already has one.
    """
    return name if INFO_SEP in name else name + NEW_INFO
