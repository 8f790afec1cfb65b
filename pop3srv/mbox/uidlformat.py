# -*- test-case-name: tests.test_uidlformat -*-
"""
Dovecot's C{pop3_uidl_format} language and the mbox header MD5, so that a
maildrop moved from Dovecot keeps the UIDLs its clients already hold.

The language is Dovecot 2.3's variable expansion (Debian's C{dovecot-pop3d}
speaks it): text with C{%} fields,
C{%[-][0]WIDTH[.[0][-]WIDTH]MODIFIERS KEY}.  The keys a UIDL format may
use are C{%v} (UIDVALIDITY), C{%u} (IMAP UID), C{%m} (the header MD5,
L{header_md5}), C{%f} (a Maildir file name), C{%g} (the message GUID; for
an mbox Dovecot gives the header MD5 here too) and C{%%}.  The modifiers,
applied left to right, are C{L} and C{U} (ASCII case), C{X} (a decimal
number in lower-case hexadecimal, anything else as C{0}: Dovecot has no
upper-case hex), C{R} (reverse), C{M} (MD5 hex), C{H} and C{N} (short
hashes), C{E} (backslash before quotes and backslashes), C{D} (dots as
C{,dc=}) and C{T} (trailing space trimmed).  After the modifiers an offset
skips characters (negative: keeps the last ones), and a width truncates
(negative: drops the last ones) or, written with a leading zero, pads with
zeros on the left and never truncates: C{%08Xu} is the UID in hex, at least
eight digits.

The quirks are Dovecot's and kept on purpose, since the point is the very
same strings: a lone C{%} at the very end is dropped, a hex of something
not a number is C{0}.  What Dovecot's configuration check refuses (an
unknown variable, a C{%{...}} long key, a field without a variable, a
format naming none of the keys) is refused here with a one-line reason, as
is text that could never be part of a UIDL (spaces, control characters).
Dovecot 2.4's new C{%{variable | filter}} language is not read (such a
format is refused).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

#: Debian's (and Dovecot 2.x's) default C{pop3_uidl_format}.
DOVECOT_DEFAULT = "%08Xu%08Xv"

#: The keys a UIDL format may name, with what they stand for.
KEYS: Mapping[str, str] = {
    "v": "uidvalidity",
    "u": "uid",
    "m": "md5",
    "f": "filename",
    "g": "guid",
}

_MODIFIERS = frozenset("LUEXRHNMDT")

#: Dovecot reads at most this many modifiers before the key.
_MAX_MODIFIERS = 10

#: More digits than this in a width or offset is a typo, not a format.
_MAX_DIGITS = 6

#: RFC 1939: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL_LENGTH = 70

_LWSP = b" \t"
_C_SPACE = b" \t\n\v\f\r"


def is_valid_uidl(uidl: bytes) -> bool:
    """
    Whether C{uidl} may be sent as a unique-id (RFC 1939 section 7).

    @param uidl: the candidate.
    @return: C{True} for 1 to L{MAX_UIDL_LENGTH} octets, each 0x21 to 0x7E.
    """
    return 0 < len(uidl) <= MAX_UIDL_LENGTH and all(0x21 <= c <= 0x7E for c in uidl)


@dataclass
class _Context:
    """
    The per-field numbers, which the C{H} and C{N} modifiers consume.
    """

    offset: int
    width: int
    zero_padding: bool


def _str_hash(data: bytes) -> int:
    # The ELF/ASU string hash Dovecot's str_hash() uses, on 32 bits.
    h = 0
    for c in data:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
            h ^= g
    return h


def _hash_text(value: int, ctx: _Context) -> bytes:
    # H and N: the width is a modulus and the offset a minimum length, both
    # used up here.
    if ctx.width != 0:
        value %= ctx.width
        ctx.width = 0
    text = b"%x" % (value & 0xFFFFFFFF)
    if len(text) < ctx.offset:
        text = b"0" * (ctx.offset - len(text)) + text
    ctx.offset = 0
    return text


def _hex(value: bytes) -> bytes:
    if value.isdigit() and value.isascii():
        number = int(value)
        if number < 1 << 64:
            return b"%x" % number
    return b"0"


def _apply_modifier(modifier: str, value: bytes, ctx: _Context) -> bytes:
    if modifier == "L":
        return value.lower()
    if modifier == "U":
        return value.upper()
    if modifier == "E":
        return value.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"'", b"\\'")
    if modifier == "X":
        return _hex(value)
    if modifier == "R":
        return value[::-1]
    if modifier == "H":
        return _hash_text(_str_hash(value), ctx)
    if modifier == "N":
        digest = hashlib.md5(value, usedforsecurity=False).digest()
        return _hash_text(int.from_bytes(digest[:8], "big"), ctx)
    if modifier == "M":
        return hashlib.md5(value, usedforsecurity=False).hexdigest().encode("ascii")
    if modifier == "D":
        return value.replace(b".", b",dc=")
    assert modifier == "T"
    return value.rstrip(_C_SPACE)


@dataclass(frozen=True, slots=True)
class _Field:
    """
    One C{%} field.

    @ivar key: the variable's key (C{%} for C{%%}).
    """

    key: str
    offset: int
    width: int
    zero_padding: bool
    modifiers: tuple[str, ...]

    def render(self, value: bytes) -> bytes:
        ctx = _Context(self.offset, self.width, self.zero_padding)
        for modifier in self.modifiers:
            value = _apply_modifier(modifier, value, ctx)
        if ctx.offset < 0:
            if len(value) > -ctx.offset:
                value = value[len(value) + ctx.offset :]
        else:
            value = value[ctx.offset :]
        if ctx.width == 0:
            return value
        if ctx.zero_padding:
            return b"0" * max(0, ctx.width - len(value)) + value
        width = ctx.width
        if width < 0:
            # Dovecot computes this in size_t: a result below zero wraps to
            # a huge length, which keeps the whole value.
            width = len(value) + width
            if width < 0:
                return value
        return value[:width]


_Piece = bytes | _Field


class _Reader:
    """
    A cursor over the format text, with the error messages in one place.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, chars: str) -> bool:
        if self.peek() != "" and self.peek() in chars:
            self.pos += 1
            return True
        return False

    def number(self) -> int:
        start = self.pos
        while self.peek() != "" and self.peek() in "0123456789":
            self.pos += 1
        digits = self.text[start : self.pos]
        if len(digits) > _MAX_DIGITS:
            raise ValueError(f"width {digits} at column {start + 1} is too large")
        return int(digits) if digits else 0

    def fail(self, reason: str) -> ValueError:
        return ValueError(f"{reason} at column {self.pos + 1} of {self.text!r}")


def _parse_field(reader: _Reader) -> _Field | None:
    """
    Read one field after its C{%}, as Dovecot 2.3's var_expand() does.

    @return: the field, or C{None} for a C{%} at the very end (dropped).
    """
    if reader.peek() == "":
        return None
    sign = -1 if reader.take("-") else 1
    zero_padding = reader.take("0")
    width = reader.number()
    offset = 0
    if reader.take("."):
        offset = sign * width
        sign = 1
        zero_padding = reader.take("0")
        if reader.take("-"):
            sign = -1
        width = sign * reader.number()
    modifiers: list[str] = []
    while len(modifiers) < _MAX_MODIFIERS and reader.peek() != "" and reader.peek() in _MODIFIERS:
        modifiers.append(reader.peek())
        reader.pos += 1
    key = reader.peek()
    if key == "":
        raise reader.fail("a field without a variable")
    if key == "{":
        raise reader.fail("Dovecot's pop3_uidl_format takes no %{...} (use %v %u %m %f %g)")
    if key != "%" and key not in KEYS:
        raise reader.fail(f"unknown variable %{key} (known: %v %u %m %f %g %%)")
    reader.pos += 1
    if ("H" in modifiers or "N" in modifiers) and width < 0:
        raise reader.fail("a negative width with the H or N modifier is not supported")
    return _Field(key, offset, width, zero_padding, tuple(modifiers))


@dataclass(frozen=True, slots=True)
class UidlFormat:
    """
    A parsed C{pop3_uidl_format}.

    @ivar text: the format as written.
    @ivar needs: the keys (C{v}, C{u}, C{m}, C{f}, C{g}) whose values
        L{render} needs.
    """

    text: str
    _pieces: tuple[_Piece, ...] = field(repr=False)
    needs: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> UidlFormat:
        """
        Read a format.

        @param text: the format, e.g. L{DOVECOT_DEFAULT}.
        @return: the format.
        @raise ValueError: with a one-line reason, for a format Dovecot
            refuses or one that could never give a valid UIDL.
        """
        reader = _Reader(text)
        pieces: list[_Piece] = []
        literal: list[str] = []
        while reader.pos < len(text):
            char = text[reader.pos]
            if char != "%":
                if not (0x21 <= ord(char) <= 0x7E):
                    raise reader.fail(f"{char!r} cannot be part of a UIDL")
                literal.append(char)
                reader.pos += 1
                continue
            reader.pos += 1
            parsed = _parse_field(reader)
            if parsed is None:
                break
            if literal:
                pieces.append("".join(literal).encode("ascii"))
                literal = []
            pieces.append(parsed)
        if literal:
            pieces.append("".join(literal).encode("ascii"))
        needs = frozenset(p.key for p in pieces if isinstance(p, _Field) and p.key in KEYS)
        if not needs:
            raise ValueError(f"{text!r} names none of %v %u %m %f %g")
        return cls(text, tuple(pieces), needs)

    def render(self, variables: Mapping[str, str | int]) -> bytes:
        """
        The UIDL for one message.

        @param variables: a value for each key in L{needs} (others are
            ignored): integers as they are, C{m} as L{header_md5} gives it.
        @return: the UIDL, exactly as Dovecot would send it.
        @raise ValueError: if a needed value is missing or the result is not
            a valid UIDL (L{is_valid_uidl}), so that the caller uses its own.
        """
        out: list[bytes] = []
        for piece in self._pieces:
            if isinstance(piece, bytes):
                out.append(piece)
                continue
            if piece.key == "%":
                value = b"%"
            else:
                try:
                    given = variables[piece.key]
                except KeyError:
                    raise ValueError(f"%{piece.key} ({KEYS[piece.key]}) has no value") from None
                value = (
                    b"%d" % given
                    if isinstance(given, int)
                    else given.encode("utf-8", "surrogateescape")
                )
            out.append(piece.render(value))
        uidl = b"".join(out)
        if not is_valid_uidl(uidl):
            raise ValueError(f"{self.text!r} gives {uidl!r}, which is not a valid UIDL")
        return uidl


#: Headers Dovecot's mbox code owns (its metadata and C{Content-Length}); it
#: never hashes them, so rewriting them keeps the MD5.
MBOX_METADATA_HEADERS = frozenset(
    [b"content-length", b"status", b"x-imap", b"x-imapbase", b"x-keywords", b"x-status", b"x-uid"]
)


@dataclass(frozen=True, slots=True)
class _HeaderLine:
    """
    One physical header line as Dovecot's header parser sees it.

    @ivar name: the header's name (for a continuation line, the name of the
        header it continues).
    @ivar value: what is hashed: after the colon less one space or tab on a
        first line, the whole line on a continuation line, without the line
        end.
    @ivar continues: whether the next line continues this header.
    """

    name: bytes
    value: bytes
    continues: bool


def header_md5(header: bytes, *, backend: str = "apop3d") -> str:
    """
    The header MD5 Dovecot computes for an mbox message (C{%m}), in hex.

    With Dovecot's default C{mbox_md5 = apop3d} (popa3d's way), the MD5
    covers the values of C{Delivered-To} and C{X-Delivery-ID}, and of the
    first C{Received}; C{Date} and C{Message-ID} only when they come before
    any C{Received}.  With C{mbox_md5 = all} it covers the value of every
    header except Dovecot's own (L{MBOX_METADATA_HEADERS}).  A value is
    taken from after the colon and one space or tab, line by line
    (continuation lines whole), without line ends; names match in any case.

    @param header: the message's header as stored in the mbox, after the
        C{From } line; anything from the first empty line on is ignored.
    @param backend: C{"apop3d"} or C{"all"}, as Dovecot's C{mbox_md5}.
    @return: 32 lower-case hex digits.
    @raise ValueError: for an unknown backend.
    """
    if backend not in ("apop3d", "all"):
        raise ValueError(f"unknown mbox_md5 backend {backend!r} (apop3d or all)")
    md5 = hashlib.md5(usedforsecurity=False)
    seen_received = False
    for line in _header_lines(header):
        # Dovecot compares names with strcasecmp(), which stops at a NUL.
        name = line.name.split(b"\0", 1)[0].lower()
        if name in MBOX_METADATA_HEADERS:
            continue
        if backend == "all":
            md5.update(line.value)
        elif name in (b"delivered-to", b"x-delivery-id"):
            md5.update(line.value)
        elif name in (b"date", b"message-id"):
            if not seen_received:
                md5.update(line.value)
        elif name == b"received" and not seen_received:
            md5.update(line.value)
            if not line.continues:
                seen_received = True
    return md5.hexdigest()


def _header_lines(header: bytes) -> Iterator[_HeaderLine]:
    """
    The physical lines of a header up to its end, as Dovecot splits them:
    only LF ends a line, and the CR right before it is not content.
    """
    name = b""
    lines = header.split(b"\n")
    # A trailing LF leaves an empty last element that is no line.
    ends = [True] * (len(lines) - 1) + [False]
    if lines[-1] == b"":
        lines.pop()
        ends.pop()
    for index, (content, ended) in enumerate(zip(lines, ends, strict=True)):
        if ended and content.endswith(b"\r"):
            content = content[:-1]
        continued = index > 0 and content[:1] in (b" ", b"\t")
        if not continued and content == b"" and ended:
            return
        following = lines[index + 1] if ended and index + 1 < len(lines) else b""
        continues = following[:1] in (b" ", b"\t")
        if continued:
            yield _HeaderLine(name, content, continues)
            continue
        colon = content.find(b":")
        if colon < 0:
            name, value = content, b""
        else:
            name = content[:colon].rstrip(_LWSP)
            value = content[colon + 1 :]
            if value[:1] in (b" ", b"\t"):
                value = value[1:]
        yield _HeaderLine(name, value, continues)
