# -*- test-case-name: tests.test_wire -*-
"""
The POP3 byte codec: line framing, command parsing, response formatting and
the stateful multi-line encoder.  No I/O and no Twisted imports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pop3srv.core import commands as c

# RFC 2449 section 4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255
# RFC 2449 section 4: each argument is at most 40 octets.
MAX_ARGUMENT = 40
# Ten digits hold any msn a 32-bit mailbox can have; more is noise.
_NUMBER = re.compile(r"[0-9]{1,10}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 4422 section 3.1: 1 to 20 of upper-case letters, digits, hyphen, underscore.
_MECHANISM = re.compile(r"[A-Za-z0-9_-]{1,20}")

CRLF = b"\r\n"
TERMINATOR = b".\r\n"
# A line that starts with a dot, after the first.  sre finds the LF with
# memchr and copies the literal replacement: about twice as fast as
# bytes.replace, and no slower than a separate "is there one?" search.
_DOT_AFTER_LF = re.compile(rb"\n\.")


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line longer than the limit arrived; it was discarded."""


class LineBuffer:
    """
    Splits received bytes into lines of bounded length.

    Bytes of an over-long line are dropped as they arrive, so memory stays
    bounded however much a client sends without a line end; the line is
    reported as L{LineTooLong} once its end arrives.
    """

    def __init__(self, max_line: int = MAX_COMMAND_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False
        self._scanned = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def clear(self) -> None:
        """Throw away everything buffered."""
        del self._buffer[:]
        self._scanned = 0
        self._discarding = False

    def next_line(self) -> bytes | LineTooLong | None:
        """
        Return the next complete line without its line end, a L{LineTooLong}
        marker, or C{None} if no complete line is buffered yet.
        """
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            if len(self._buffer) > self.max_line:
                self._discarding = True
                del self._buffer[:]
            self._scanned = len(self._buffer)
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        if self._discarding or end + 1 > self.max_line:
            self._discarding = False
            return LineTooLong()
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


def _parse_msn(text: str) -> int | c.BadCommand:
    if not _NUMBER.fullmatch(text):
        return c.BadCommand("Invalid message number.")
    return int(text)


def _no_args(
    factory: Callable[[], c.Command],
) -> Callable[[list[str]], c.Command | c.BadCommand]:
    def parse(args: list[str]) -> c.Command | c.BadCommand:
        if args:
            return c.BadCommand("This command takes no arguments.")
        return factory()

    return parse


def _optional_msn(
    factory: Callable[[int | None], c.Command],
) -> Callable[[list[str]], c.Command | c.BadCommand]:
    def parse(args: list[str]) -> c.Command | c.BadCommand:
        if not args:
            return factory(None)
        if len(args) > 1:
            return c.BadCommand("Noise after message number.")
        msn = _parse_msn(args[0])
        return msn if isinstance(msn, c.BadCommand) else factory(msn)

    return parse


def _required_msn(
    factory: Callable[[int], c.Command],
) -> Callable[[list[str]], c.Command | c.BadCommand]:
    def parse(args: list[str]) -> c.Command | c.BadCommand:
        if not args:
            return c.BadCommand("Missing message number.")
        if len(args) > 1:
            return c.BadCommand("Noise after message number.")
        msn = _parse_msn(args[0])
        return msn if isinstance(msn, c.BadCommand) else factory(msn)

    return parse


def _parse_user(args: list[str]) -> c.Command | c.BadCommand:
    if len(args) != 1:
        return c.BadCommand("USER takes exactly one argument.")
    return c.User(args[0])


def _parse_apop(args: list[str]) -> c.Command | c.BadCommand:
    if len(args) != 2:
        return c.BadCommand("APOP takes a name and a digest.")
    return c.Apop(args[0], args[1])


def _parse_top(args: list[str]) -> c.Command | c.BadCommand:
    if len(args) != 2:
        return c.BadCommand("TOP takes a message number and a line count.")
    msn = _parse_msn(args[0])
    if isinstance(msn, c.BadCommand):
        return msn
    if not _NUMBER.fullmatch(args[1]):
        return c.BadCommand("Invalid line count.")
    return c.Top(msn, int(args[1]))


def _parse_auth(args: list[str]) -> c.Command | c.BadCommand:
    if not args:
        return c.Auth(None, None)
    if len(args) > 2:
        return c.BadCommand("AUTH takes a mechanism and an optional initial response.")
    if not _MECHANISM.fullmatch(args[0]):
        return c.BadCommand("Invalid SASL mechanism name.")
    return c.Auth(args[0].upper(), args[1] if len(args) == 2 else None)


_PARSERS: dict[str, Callable[[list[str]], c.Command | c.BadCommand]] = {
    "USER": _parse_user,
    "APOP": _parse_apop,
    "STAT": _no_args(c.Stat),
    "LIST": _optional_msn(c.List),
    "RETR": _required_msn(c.Retr),
    "DELE": _required_msn(c.Dele),
    "NOOP": _no_args(c.Noop),
    "RSET": _no_args(c.Rset),
    "QUIT": _no_args(c.Quit),
    "TOP": _parse_top,
    "UIDL": _optional_msn(c.Uidl),
    "CAPA": _no_args(c.Capa),
    "STLS": _no_args(c.Stls),
    "AUTH": _parse_auth,
    "UTF8": _no_args(c.Utf8),
}


def parse_command(line: bytes) -> c.Command | c.BadCommand:
    """
    Parse one command line (without its line end).

    Never raises: anything malformed becomes a L{commands.BadCommand} whose
    reason is safe to show the client.
    """
    if b"\x00" in line:
        return c.BadCommand("NUL is not allowed in a command.")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return c.BadCommand("Command is not valid UTF-8.")
    keyword, _, rest = text.partition(" ")
    keyword = keyword.upper()
    if keyword == "PASS":
        # RFC 1939 section 7: a password may contain spaces, so PASS takes the
        # rest of the line verbatim.
        if not rest:
            return c.BadCommand("PASS takes a password.")
        return c.Pass(rest)
    if _CONTROL.search(text):
        return c.BadCommand("Control characters are not allowed in a command.")
    parser = _PARSERS.get(keyword)
    if parser is None:
        return c.BadCommand("Unknown command.")
    args = rest.rstrip(" ").split(" ") if rest.strip(" ") else []
    if any(not arg for arg in args):
        return c.BadCommand("Arguments are separated by a single space.")
    # An AUTH initial response is base64 and may be longer than an argument.
    checked = args[:1] if keyword == "AUTH" else args
    if any(len(arg.encode("utf-8")) > MAX_ARGUMENT for arg in checked):
        return c.BadCommand("Argument too long.")
    return parser(args)


def format_ok(text: str = "") -> bytes:
    """Format a C{+OK} status line."""
    return b"+OK " + text.encode("utf-8") + CRLF if text else b"+OK" + CRLF


def format_err(text: str, code: str | None = None) -> bytes:
    """Format a C{-ERR} status line with an optional RFC 2449 response code."""
    prefix = f"[{code}] " if code else ""
    return b"-ERR " + (prefix + text).encode("utf-8") + CRLF


def format_multiline(status: str, lines: Iterable[str]) -> bytes:
    """Format a C{+OK} status line followed by dot-stuffed lines and the terminator."""
    # Appended one line at a time: a listing of tens of thousands of lines
    # never exists as that many objects at once.
    out = bytearray(format_ok(status))
    for line in lines:
        data = line.encode("utf-8")
        if data.startswith(b"."):
            out += b"."
        out += data
        out += CRLF
    out += TERMINATOR
    return bytes(out)


class DotStuffer:
    """
    Encodes message content for a multi-line response, chunk by chunk.

    Bare LF becomes CRLF (CRLF stays CRLF), a line that starts with C{.} gets
    another C{.}, and L{finish} ends the last line if needed and adds the
    terminator.  The output is the same however the input is split, because
    whether the next byte starts a line and whether the last byte was a CR
    are carried from one chunk to the next.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        """Encode the next chunk of content."""
        if not data:
            return b""
        if not self._after_cr and b"\r" not in data:
            # Mail stored with bare LF is the common case: with no CR in play
            # one replace does the CRLF conversion (the CRLF -> LF pass of the
            # general path would only search).
            return self._feed_lf_only(data)
        return self._feed_general(data)

    def _feed_lf_only(self, data: bytes) -> bytes:
        """
        Encode a non-empty chunk that holds no CR, after one that did not
        end in CR.
        """
        if b"." in data:
            data_stuffed = _DOT_AFTER_LF.sub(b"\n..", data)
        else:
            # No dot at all (base64 attachments have none): a memchr-speed
            # check saves the per-line search.
            data_stuffed = data
        out = data_stuffed.replace(b"\n", b"\r\n")
        if self._at_line_start and data[0] == 0x2E:
            out = b"." + out
        self._at_line_start = data[-1] == 0x0A
        return out

    def _feed_general(self, data: bytes) -> bytes:
        """
        Encode a non-empty chunk of any content.
        """
        head = b""
        if self._after_cr and data[:1] == b"\n":
            head, data = b"\n", data[1:]
            self._at_line_start = True
        out = _DOT_AFTER_LF.sub(b"\n..", data.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        out = head + out
        self._after_cr = out.endswith(b"\r")
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """Return the bytes that end the response."""
        if self._at_line_start:
            return TERMINATOR
        self._at_line_start = True
        return CRLF + TERMINATOR


class TopFilter:
    """
    Passes through the header, the blank line after it, and a number of body
    lines (C{TOP}), chunk by chunk.
    """

    def __init__(self, body_lines: int) -> None:
        self._remaining = body_lines
        self._in_header = True
        self._line_has_text = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Return the part of the chunk that belongs in the response."""
        if self.done:
            return b""
        position = 0
        while position < len(data):
            end = data.find(b"\n", position)
            if data[position : end if end >= 0 else len(data)].strip(b"\r"):
                self._line_has_text = True
            if end < 0:
                return data
            if self._in_header:
                # A line holding nothing but an optional CR ends the header.
                self._in_header = self._line_has_text
            else:
                self._remaining -= 1
            self._line_has_text = False
            position = end + 1
            if not self._in_header and self._remaining <= 0:
                self.done = True
                return data[:position]
        return data
