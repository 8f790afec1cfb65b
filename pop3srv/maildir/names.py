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

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Between the base and the info (the Maildir specification's C{:}).
INFO_SEP = b":"
#: The info a reader gives a message it moves from C{new/} to C{cur/}.
NEW_INFO = b":2,"
#: The longest UIDL RFC 1939 allows.
MAX_UIDL = 70
# Octets of hash in a hashed UIDL: 96 bits, hex, leave room for the name.
_HASH_OCTETS = 12

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

    A base that is empty, or longer than RFC 1939's L{MAX_UIDL} octets once
    escaped, cannot be served as it is: it gets L{hashed_uidl}, stable
    from session to session.  Dovecot or Courier served such a message
    under some other id, so a client that kept it downloads it once more;
    such names are rare (no delivery agent writes them).

    @param base: the name's base (L{base_of}).
    """
    if all(0x21 <= c <= 0x7E for c in base):
        escaped = base
    else:
        escaped = b"".join(bytes([c]) if 0x21 <= c <= 0x7E else b"+%02X" % c for c in base)
    if 0 < len(escaped) <= MAX_UIDL:
        return escaped
    return hashed_uidl(base)


def hashed_uidl(base: bytes) -> bytes:
    """
    The UIDL of a base that cannot be its own (L{uidl_of}): the start of
    the escaped base, so an admin still recognises the message, then C{~}
    and a hash of the whole base as stored, which keeps bases that escape
    alike apart.  Never longer than L{MAX_UIDL}.
    """
    escaped = b"".join(bytes([c]) if 0x21 <= c <= 0x7E else b"+%02X" % c for c in base)
    digest = hashlib.blake2b(base, digest_size=_HASH_OCTETS).hexdigest().encode("ascii")
    return escaped[: MAX_UIDL - 1 - len(digest)] + b"~" + digest


def session_uidls(bases: Sequence[bytes]) -> list[bytes]:
    """
    The UIDL of each message of a session, in the order given (delivery
    order): L{uidl_of} its base, unique among them all.

    A base seen twice (a copy left in C{new/} beside the one in C{cur/}),
    or two bases that escape alike, give one UIDL to the first and a
    numbered one (C{.2}, C{.3}, ...) to each later message.  A numbered
    UIDL is never one that another message's base gives, so a message
    whose real base ends in C{.2} keeps its UIDL whatever else is there.

    @param bases: the messages' bases (L{base_of}).
    @return: one UIDL per base, each of 1 to L{MAX_UIDL} octets from
        C{0x21} to C{0x7E}, no two equal.
    """
    own = [uidl_of(base) for base in bases]
    # Every message's own UIDL is reserved before any is numbered.
    taken = set(own)
    uidls: list[bytes] = []
    first: set[bytes] = set()
    for uidl in own:
        if uidl in first:
            n = 2
            # Distinct n give distinct candidates, so this ends within
            # len(taken) + 1 tries.
            while (numbered := _numbered(uidl, n)) in taken:
                n += 1
            uidl = numbered
            taken.add(uidl)
        else:
            first.add(uidl)
        uidls.append(uidl)
    return uidls


def _numbered(uidl: bytes, n: int) -> bytes:
    suffix = b".%d" % n
    return uidl[: MAX_UIDL - len(suffix)] + suffix


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
