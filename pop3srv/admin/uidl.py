# -*- test-case-name: tests.test_uidl_admin -*-
"""
C{pop3srv uidl capture} and C{pop3srv uidl import}: carry a user's UIDLs
from the old POP3 server to pop3srv, so that no client downloads its mail
again after the switch.

C{capture} logs in to the old server over POP3 (the user's password, or a
master user's login with the user as authorization identity), and writes
what C{UIDL}, C{LIST} and C{TOP n 0} say about each message: the UIDL, the
size and a fingerprint of the header (L{header_fingerprint}).  Nothing is
deleted or retrieved; the session ends with C{QUIT}.

C{import} reads such a capture, or one written by hand from the old
server's C{UIDL} and C{LIST} output, and opens the user's mbox as the server
would: message I{n} of the capture must be message I{n} here, with the same
size and, when the capture has them, the same header fingerprint.  Only if
every message matches are the UIDLs pinned (they are served from then on,
whatever C{--uidl-format} says); any mismatch is reported, message by
message, and nothing is changed.  Messages that arrived after the capture
(at the end) keep their own UIDLs.

The capture file is text, each section as a POP3 server sends it::

    # pop3srv uidl capture of alice at old.example.org:110
    USER alice
    UIDL
    1 000000016553f100
    2 000000026553f100
    .
    LIST
    1 2310
    2 845
    .
    TOP
    1 6c1c38b5a95aa7e1d3f0b3ef21f5bb0e
    2 2b4f0d1b2d8e0b3a59b6f5e6a3c1d2e4
    .

C{USER} and C{TOP} may be left out (the import then needs
C{--no-content-check}); a C{+OK} line after a section name is skipped, so a
pasted transcript works.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pop3srv.admin.cmdline import Failed as _Failed
from pop3srv.admin.cmdline import OneLineParser as _Parser
from pop3srv.admin.cmdline import UsageError as _UsageError
from pop3srv.core.errors import MaildropUnavailable, Pop3Error

if TYPE_CHECKING:
    from pop3srv.mbox.mailbox import MboxMailbox

__all__ = [
    "Capture",
    "CapturedMessage",
    "ServedMessage",
    "capture_over_pop3",
    "format_capture",
    "header_fingerprint",
    "main",
    "match_capture",
    "parse_capture",
    "served_messages",
]

PROG = "pop3srv uidl"

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Headers that mbox servers keep for themselves and may or may not show;
#: the fingerprint leaves them out, so the servers' choices do not matter.
METADATA_HEADERS = frozenset(
    [
        b"content-length",
        b"status",
        b"x-imap",
        b"x-imapbase",
        b"x-keywords",
        b"x-status",
        b"x-uid",
    ]
)

#: Longest line accepted from the old server, and most octets in one answer.
MAX_LINE = 1 << 20
MAX_RESPONSE = 256 << 20

#: Most mismatches listed one by one; the rest are counted.
MAX_REPORTED = 20

_QUOTED_FROM = re.compile(rb"^>+From ")


# --- the content check --------------------------------------------------------


def header_fingerprint(message: bytes) -> str:
    """
    A fingerprint of a message's header that two servers agree on.

    The header ends at the first empty line.  Line ends (LF or CRLF), the
    fields of L{METADATA_HEADERS} and mboxrd quoting (C{>From }) are left
    out, since servers differ there; every other octet counts.

    @param message: the header (and any part of the body) as C{TOP n 0}
        sends it after dot-unstuffing, or as the mbox holds it.
    @return: 32 hex digits.
    """
    kept: list[bytes] = []
    skipping = False
    for raw in message.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line == b"":
            break
        if line[:1] in (b" ", b"\t"):
            # A continuation belongs to the field above: kept or left out
            # with it.
            if not skipping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].rstrip(b" \t").lower()
        skipping = name in METADATA_HEADERS
        if not skipping:
            kept.append(_QUOTED_FROM.sub(lambda m: m.group(0)[1:], line))
    return hashlib.sha256(b"\n".join(kept)).hexdigest()[:32]


# --- the capture file -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """
    What the old server said about one message.

    @ivar number: its message number there (from 1).
    @ivar uidl: its UIDL.
    @ivar size: its C{LIST} size.
    @ivar fingerprint: L{header_fingerprint} of its C{TOP n 0}, if captured.
    """

    number: int
    uidl: bytes
    size: int
    fingerprint: str | None


@dataclass(frozen=True, slots=True)
class Capture:
    """
    A user's maildrop as the old server showed it.

    @ivar user: whose it is, if the file says.
    @ivar messages: in message-number order, numbered from 1 without gaps.
    @ivar source: where it came from, for the file's first comment.
    """

    user: str | None
    messages: tuple[CapturedMessage, ...]
    source: str = ""

    @property
    def has_fingerprints(self) -> bool:
        """Whether every message has a header fingerprint."""
        return all(m.fingerprint is not None for m in self.messages)


def format_capture(capture: Capture) -> str:
    """
    The capture as the text L{parse_capture} reads.
    """
    lines = [f"# pop3srv uidl capture{' of ' + capture.source if capture.source else ''}"]
    if capture.user is not None:
        lines.append(f"USER {capture.user}")
    lines.append("UIDL")
    lines += [f"{m.number} {m.uidl.decode('ascii')}" for m in capture.messages]
    lines += [".", "LIST"]
    lines += [f"{m.number} {m.size}" for m in capture.messages]
    lines.append(".")
    if capture.messages and capture.has_fingerprints:
        lines.append("TOP")
        lines += [f"{m.number} {m.fingerprint}" for m in capture.messages]
        lines.append(".")
    return "\n".join(lines) + "\n"


_SECTIONS = ("UIDL", "LIST", "TOP")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def _valid_uidl(uidl: str) -> bool:
    # RFC 1939: 1 to 70 characters from 0x21 to 0x7E.
    return 0 < len(uidl) <= 70 and all("!" <= c <= "~" for c in uidl)


def parse_capture(text: str, name: str = "capture") -> Capture:
    """
    Read a capture file (see the module docstring).

    @param text: its content.
    @param name: its name, for errors.
    @return: the capture.
    @raise ValueError: C{name:line: reason}, for the first problem.
    """
    sections: dict[str, dict[int, str]] = {}
    user: str | None = None
    current: str | None = None
    expect_ok = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()

        def fail(reason: str, lineno: int = lineno) -> ValueError:
            return ValueError(f"{name}:{lineno}: {reason}")

        if current is None:
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            if word.upper() == "USER" and rest.strip():
                if user is not None:
                    raise fail("a second USER line")
                user = rest.strip()
                continue
            if word.upper() not in _SECTIONS or rest:
                raise fail(f"expected UIDL, LIST, TOP or USER, not {line[:40]!r}")
            current = word.upper()
            if current in sections:
                raise fail(f"a second {current} section")
            sections[current] = {}
            expect_ok = True
            continue
        if expect_ok and line.startswith("+OK"):
            expect_ok = False
            continue
        expect_ok = False
        if line == ".":
            current = None
            continue
        if line.upper() in _SECTIONS:
            raise fail(f"the {current} section has no '.' line before {line}")
        number_text, _, value = line.partition(" ")
        value = value.strip()
        if not number_text.isdigit() or not value or " " in value:
            raise fail(f"expected 'NUMBER VALUE' in the {current} section, not {line[:40]!r}")
        number = int(number_text)
        entries = sections[current]
        if number in entries:
            raise fail(f"message {number} appears twice in the {current} section")
        if current == "UIDL" and not _valid_uidl(value):
            raise fail(f"{value[:40]!r} is not a valid UIDL (1-70 printable characters)")
        if current == "LIST" and not value.isdigit():
            raise fail(f"size {value[:40]!r} is not a number")
        if current == "TOP" and not _FINGERPRINT.fullmatch(value):
            raise fail(f"{value[:40]!r} is not a header fingerprint (32 hex digits)")
        entries[number] = value
    if "UIDL" not in sections or "LIST" not in sections:
        missing = " and ".join(s for s in ("UIDL", "LIST") if s not in sections)
        raise ValueError(f"{name}: no {missing} section")
    uidls, sizes = sections["UIDL"], sections["LIST"]
    tops = sections.get("TOP")
    numbers = sorted(uidls)
    if numbers != list(range(1, len(numbers) + 1)):
        gap = next(
            n for n, want in zip(numbers, range(1, len(numbers) + 1), strict=True) if n != want
        )
        raise ValueError(
            f"{name}: the UIDL section skips to message {gap}: numbers must run from 1"
        )
    for label, other in (("LIST", sizes), ("TOP", tops)):
        if other is not None and sorted(other) != numbers:
            only = sorted(set(other) ^ set(numbers))
            raise ValueError(
                f"{name}: the UIDL and {label} sections list different messages "
                f"(message {only[0]} is in only one)"
            )
    return Capture(
        user,
        tuple(
            CapturedMessage(
                n,
                uidls[n].encode("ascii"),
                int(sizes[n]),
                tops[n] if tops is not None else None,
            )
            for n in numbers
        ),
    )


# --- capture over POP3 ------------------------------------------------------------


class CaptureError(Exception):
    """A one-line reason the old server could not be read."""


class _Pop3Client:
    """
    A small blocking POP3 client: what capture needs, with bounded lines
    and answers.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rb")

    def _readline(self) -> bytes:
        line = self._file.readline(MAX_LINE + 2)
        if not line:
            raise CaptureError("the server closed the connection")
        if not line.endswith(b"\n"):
            raise CaptureError(f"a line longer than {MAX_LINE} octets from the server")
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    def status(self) -> bytes:
        """Read one status line; C{+OK} (or a C{+} continuation) or raise."""
        line = self._readline()
        if not line.startswith(b"+"):
            raise CaptureError(f"the server said: {line.decode('utf-8', 'replace')[:200]}")
        return line

    def command(self, line: str, shown: str | None = None) -> bytes:
        """
        Send one command and read its status line.

        @param shown: the command as errors show it (without secrets).
        """
        self._sock.sendall(line.encode("utf-8") + b"\r\n")
        try:
            return self.status()
        except CaptureError as e:
            raise CaptureError(f"{shown or line}: {e}") from None

    def multiline(self, line: str) -> list[bytes]:
        """A command with a multi-line answer, dot-unstuffed."""
        self.command(line)
        lines: list[bytes] = []
        total = 0
        while True:
            got = self._readline()
            if got == b".":
                return lines
            total += len(got) + 2
            if total > MAX_RESPONSE:
                raise CaptureError(f"{line}: the answer exceeds {MAX_RESPONSE} octets")
            lines.append(got[1:] if got.startswith(b".") else got)

    def starttls(self, context: ssl.SSLContext, host: str) -> None:
        """Upgrade the connection with STLS."""
        self.command("STLS")
        self._file.close()
        self._sock = context.wrap_socket(self._sock, server_hostname=host)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@dataclass(frozen=True)
class Login:
    """
    How to log in to the old server.

    @ivar user: whose maildrop to read.
    @ivar password: the user's password, or the master user's.
    @ivar master_user: a master user allowed to read any maildrop (SASL
        PLAIN with C{user} as authorization identity, as Dovecot accepts).
    """

    user: str
    password: str
    master_user: str | None = None


def capture_over_pop3(
    host: str,
    port: int,
    login: Login,
    *,
    security: str = "none",
    context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    fingerprints: bool = True,
) -> Capture:
    """
    Read one user's UIDLs, sizes and header fingerprints from a POP3 server.

    @param security: C{"none"}, C{"tls"} (implicit, as on port 995) or
        C{"starttls"}.
    @param context: the TLS context (verifying the server) for C{tls} and
        C{starttls}.
    @param timeout: seconds each network operation may take.
    @param fingerprints: whether to ask C{TOP n 0} for each message.
    @return: the capture.
    @raise CaptureError: the server could not be reached, refused the
        login, or answered something unexpected.
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise CaptureError(f"cannot connect to {where}: {e.strerror or e}") from None
    try:
        if security == "tls":
            assert context is not None
            sock = context.wrap_socket(sock, server_hostname=host)
        client = _Pop3Client(sock, timeout)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise CaptureError(f"TLS with {where} failed: {e}") from None
    try:
        return _capture(client, where, host, login, security, context, fingerprints)
    except TimeoutError:
        raise CaptureError(f"{where} did not answer within {timeout:g} s") from None
    except ssl.SSLError as e:
        raise CaptureError(f"TLS with {where} failed: {e}") from None
    except OSError as e:
        raise CaptureError(f"connection to {where} failed: {e.strerror or e}") from None
    except CaptureError as e:
        raise CaptureError(f"{where}: {e}") from None
    finally:
        client.close()


def _capture(
    client: _Pop3Client,
    where: str,
    host: str,
    login: Login,
    security: str,
    context: ssl.SSLContext | None,
    fingerprints: bool,
) -> Capture:
    client.status()
    if security == "starttls":
        assert context is not None
        client.starttls(context, host)
    if login.master_user is None:
        client.command(f"USER {login.user}")
        client.command(f"PASS {login.password}", "PASS (password hidden)")
    else:
        token = f"{login.user}\0{login.master_user}\0{login.password}".encode()
        client.command(
            f"AUTH PLAIN {base64.b64encode(token).decode('ascii')}",
            f"AUTH PLAIN as {login.master_user} for {login.user}",
        )
    uidls = _numbered(client.multiline("UIDL"), "UIDL")
    sizes = _numbered(client.multiline("LIST"), "LIST")
    if sorted(uidls) != sorted(sizes):
        raise CaptureError("UIDL and LIST list different messages")
    messages = []
    for number in sorted(uidls):
        if not _valid_uidl(uidls[number]):
            raise CaptureError(f"message {number} has no valid UIDL: {uidls[number][:80]!r}")
        if not sizes[number].isdigit():
            raise CaptureError(f"message {number} has no size: {sizes[number][:80]!r}")
        fingerprint = None
        if fingerprints:
            header = b"\n".join(client.multiline(f"TOP {number} 0"))
            fingerprint = header_fingerprint(header)
        messages.append(
            CapturedMessage(number, uidls[number].encode("ascii"), int(sizes[number]), fingerprint)
        )
    client.command("QUIT")
    numbers = [m.number for m in messages]
    if numbers != list(range(1, len(numbers) + 1)):
        raise CaptureError("the message numbers do not run from 1 (a session that deleted?)")
    return Capture(login.user, tuple(messages), f"{login.user} at {where}")


def _numbered(lines: Iterable[bytes], what: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in lines:
        number, _, value = line.decode("utf-8", "replace").strip().partition(" ")
        if not number.isdigit():
            raise CaptureError(f"{what}: unexpected line {line[:80]!r}")
        # LIST may carry more after the size (RFC 1939 allows it).
        out[int(number)] = value.split(" ", 1)[0] if what == "LIST" else value.strip()
    return out


# --- matching and pinning ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServedMessage:
    """
    What pop3srv serves for one message.

    @ivar size: its C{LIST} size.
    @ivar fingerprint: L{header_fingerprint} of its header.
    @ivar uidl: the UIDL it serves now.
    @ivar label: a few words to tell it by in a report (Message-ID or
        Subject).
    @ivar quoted: how many of its lines pop3srv sends un-quoted (mboxrd
        C{>From }); a server that does not un-quote counts one octet more
        for each in its size.
    """

    size: int
    fingerprint: str
    uidl: bytes
    label: str
    quoted: int = 0


#: Most header octets read per message for the fingerprint.
MAX_HEADER = 1 << 20


def _label(header: bytes) -> str:
    for name in (b"message-id", b"subject"):
        found = re.search(rb"(?im)^" + name + rb"[ \t]*:[ \t]*(.*?)\r?$", header)
        if found:
            return f"{name.decode()}: {found.group(1).decode('utf-8', 'replace')[:60]}"
    return "no Message-ID or Subject"


class _Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


#: A line that pop3srv sent un-quoted: it begins with C{>}s and C{From }.
_UNQUOTED_FROM = re.compile(rb"(?m)^>*From ")
#: Octets of a line start that decide whether it is such a line.
_DECIDING = 2048


def _read_served(reader: _Readable) -> tuple[bytes, int]:
    """
    Read one message as pop3srv serves it, keeping no more than its header.

    @return: the header (up to L{MAX_HEADER} octets) and how many lines were
        un-quoted.
    """
    header = b""
    in_header = True
    quoted = 0
    # The start of the line being read (it begins a line) and whether the
    # rest of a long line, already decided, is being skipped.
    line_start = b""
    skipping = False
    while chunk := reader.read(64 * 1024):
        if in_header:
            header += chunk
            if b"\n\n" in header or b"\n\r\n" in header or len(header) >= MAX_HEADER:
                in_header = False
                header = header[:MAX_HEADER]
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            chunk = chunk[newline + 1 :]
            skipping = False
        data = line_start + chunk
        last = data.rfind(b"\n") + 1
        quoted += len(_UNQUOTED_FROM.findall(data, 0, last))
        line_start = data[last:]
        if len(line_start) > _DECIDING:
            quoted += 1 if _UNQUOTED_FROM.match(line_start) else 0
            line_start, skipping = b"", True
    if line_start and _UNQUOTED_FROM.match(line_start):
        quoted += 1
    return header, quoted


class _OpenMaildrop(Protocol):
    """What the import needs of an open L{pop3srv.mbox.mailbox.MboxMailbox}."""

    def listMessages(self) -> list[int]: ...

    def getMessage(self, index: int) -> _Readable: ...

    def getUidl(self, index: int) -> bytes: ...

    def pin_uidls(self, uidls: Mapping[int, bytes]) -> None: ...


def served_messages(mailbox: _OpenMaildrop) -> list[ServedMessage]:
    """
    What an open maildrop serves: each message read once, keeping only its
    header.
    """
    out = []
    for i, size in enumerate(mailbox.listMessages()):
        reader = mailbox.getMessage(i)
        try:
            header, quoted = _read_served(reader)
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()
        out.append(
            ServedMessage(
                size, header_fingerprint(header), mailbox.getUidl(i), _label(header), quoted
            )
        )
    return out


@dataclass(frozen=True)
class Matching:
    """
    The outcome of L{match_capture}.

    @ivar pins: 0-based message number to UIDL, if everything matched.
    @ivar problems: one line per mismatch; empty if everything matched.
    @ivar newer: how many messages here came after the captured ones.
    """

    pins: dict[int, bytes]
    problems: list[str]
    newer: int


def match_capture(
    capture: Capture, served: Sequence[ServedMessage], *, content_check: bool = True
) -> Matching:
    """
    Match a capture to the maildrop by order, size and header fingerprint.

    @param content_check: compare fingerprints (the capture must have them).
    @return: the pins if every captured message matches, else the problems.
    """
    problems: list[str] = []
    if len(served) < len(capture.messages):
        problems.append(
            f"the capture has {len(capture.messages)} messages, the maildrop only "
            f"{len(served)}: messages were deleted or the capture is of another maildrop"
        )
    seen: dict[bytes, int] = {}
    for captured in capture.messages:
        if captured.uidl in seen:
            problems.append(
                f"message {captured.number}: UIDL {captured.uidl.decode()} is also message "
                f"{seen[captured.uidl]}'s in the capture (UIDLs must be unique)"
            )
        seen.setdefault(captured.uidl, captured.number)
        if captured.number > len(served):
            continue
        here = served[captured.number - 1]
        what = []
        # The old server may count the quoting ">" of From lines (Dovecot
        # does) or not (it un-quotes, as pop3srv does).
        if captured.size not in (here.size, here.size + here.quoted):
            quoting = f" ({here.size + here.quoted} with its quoting)" if here.quoted else ""
            what.append(f"size {captured.size} in the capture, {here.size} here{quoting}")
        if content_check and captured.fingerprint != here.fingerprint:
            what.append("the headers differ")
        if what:
            problems.append(f"message {captured.number} ({here.label}): {'; '.join(what)}")
    if problems:
        return Matching({}, problems, 0)
    pins = {m.number - 1: m.uidl for m in capture.messages}
    return Matching(pins, [], len(served) - len(capture.messages))


# --- the command ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The C{pop3srv uidl} argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Carry UIDLs from the old POP3 server to pop3srv, so that no "
        "client downloads its mail again.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=_Parser
    )
    capture = commands.add_parser(
        "capture",
        help="save a user's UIDLs, sizes and header fingerprints from the old server",
        description="Log in to the old POP3 server and write what UIDL, LIST and "
        "TOP n 0 say about each of the user's messages (read only: nothing is "
        "retrieved or deleted) to --output, or stdout.",
        allow_abbrev=False,
    )
    capture.add_argument("--host", required=True, help="the old server")
    capture.add_argument("--port", type=int, help="its port [default: 110, 995 with --tls]")
    security = capture.add_mutually_exclusive_group()
    security.add_argument("--tls", action="store_true", help="implicit TLS (POP3S)")
    security.add_argument("--starttls", action="store_true", help="STLS before logging in")
    capture.add_argument(
        "--cafile", help="CA certificates to verify the server with [default: the system's]"
    )
    capture.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )
    capture.add_argument("--user", required=True, help="whose maildrop to read")
    capture.add_argument(
        "--password-file",
        metavar="FILE",
        help="a file whose first line is the password (the user's, or with "
        "--master-user the master user's); '-' for stdin [default: ask on the terminal]",
    )
    capture.add_argument(
        "--master-user",
        metavar="NAME",
        help="log in as this master user on behalf of --user (SASL PLAIN with "
        "an authorization identity, as Dovecot's master users do)",
    )
    capture.add_argument(
        "--no-headers",
        action="store_true",
        help="skip TOP n 0 (for a server without TOP); the import then matches by size alone",
    )
    capture.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per network operation"
    )
    capture.add_argument(
        "-o", "--output", metavar="FILE", help="where to write the capture [default: stdout]"
    )
    imp = commands.add_parser(
        "import",
        help="pin the captured UIDLs to the same messages of the user's mbox",
        description="Match a capture to the user's mbox by order, size and header "
        "fingerprint and, if every captured message matches, pin its UIDLs so that "
        "pop3srv serves them from then on. A mismatch is reported message by "
        "message and nothing is changed. Run it while no POP3 session has the "
        "maildrop open (before pop3srv starts serving it, or with the server stopped).",
        allow_abbrev=False,
    )
    imp.add_argument("--capture", required=True, metavar="FILE", help="the capture ('-' for stdin)")
    imp.add_argument("--user", required=True, help="whose mbox")
    imp.add_argument("-c", "--config", metavar="FILE", help="the server's TOML configuration file")
    imp.add_argument(
        "--mailbox", metavar="TEMPLATE", help="the mailbox template [default: the config's]"
    )
    imp.add_argument(
        "--index-dir", metavar="DIR", help="the index directory [default: the config's]"
    )
    imp.add_argument(
        "--no-content-check",
        action="store_true",
        help="match by order and size alone (a capture without a TOP section)",
    )
    imp.add_argument(
        "-n", "--dry-run", action="store_true", help="check and report, but pin nothing"
    )
    return parser


def _read_password(path: str | None) -> str:
    if path is None:
        if not sys.stdin.isatty():
            raise _UsageError("give --password-file (no terminal to ask on)")
        return getpass.getpass("Password: ")
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise _Failed(
            f"cannot read the password from {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    password = text.rstrip("\r\n")
    if not password:
        raise _Failed(f"{path}: the first line (the password) is empty")
    return password


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.starttls):
        if args.cafile or args.insecure:
            raise _UsageError("--cafile and --insecure go with --tls or --starttls")
        return None
    try:
        context = ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as e:
        raise _Failed(f"cannot read --cafile {args.cafile}: {e}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _capture_command(args: argparse.Namespace) -> int:
    context = _tls_context(args)
    port = args.port or (995 if args.tls else 110)
    if not 0 < port < 65536:
        raise _UsageError(f"--port {port} is not a port number")
    login = Login(args.user, _read_password(args.password_file), args.master_user)
    for what, value in (("--user", login.user), ("--master-user", login.master_user or "")):
        if not value.isprintable() or " " in value:
            raise _UsageError(f"{what} {value!r} has a space or a control character")
    if any(c in login.password for c in "\r\n\0"):
        raise _UsageError("the password has a line end or a NUL, which POP3 cannot carry")
    security = "tls" if args.tls else "starttls" if args.starttls else "none"
    try:
        capture = capture_over_pop3(
            args.host,
            port,
            login,
            security=security,
            context=context,
            timeout=args.timeout,
            fingerprints=not args.no_headers,
        )
    except CaptureError as e:
        raise _Failed(str(e)) from None
    text = format_capture(capture)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="ascii") as f:
                f.write(text)
        except OSError as e:
            raise _Failed(f"cannot write {args.output}: {e.strerror or e}") from None
    print(
        f"{args.user}: {len(capture.messages)} messages captured from {args.host}:{port}",
        file=sys.stderr,
    )
    return 0


@dataclass(frozen=True)
class Location:
    """
    Where a user's mbox is, as the server finds it.

    @ivar path: the mbox.
    @ivar index_dir: the server's index directory, L{None} for beside it.
    @ivar trusted_root: the admin's part of the mailbox template.
    """

    path: str
    index_dir: str | None
    trusted_root: str

    def open(self) -> MboxMailbox:
        """
        Open it as a POP3 session would, but provisionally: the UIDLs of
        messages the server has not indexed yet are left for it to decide.

        @raise _Failed: a session has it open, or it cannot be opened.
        """
        from twisted.internet.defer import maybeDeferred

        from pop3srv.core.errors import MaildropInUse, MaildropUnavailable
        from pop3srv.mbox.mailbox import open_maildrop

        try:
            return open_maildrop(
                self.path,
                index_dir=self.index_dir,
                trusted_root=self.trusted_root,
                defer_to_thread=maybeDeferred,
                provisional=True,
            )
        except MaildropInUse:
            raise _Failed(
                f"{self.path}: a POP3 session has the maildrop open; try again when it ends"
            ) from None
        except MaildropUnavailable as e:
            raise _Failed(str(e)) from None


def _resolve(
    user: str, config: str | None, template: str | None, index_dir: str | None
) -> Location:
    from pop3srv.app.config import ConfigError, load_config
    from pop3srv.auth.identity import normalise_username, validate_username
    from pop3srv.auth.realm import USER_FIELD, check_mailbox_template, split_mailbox_template
    from pop3srv.mbox.paths import template_prefix

    try:
        validate_username(user)
    except ValueError as e:
        raise _UsageError(f"--user {user!r}: {e}") from None
    if config is not None:
        try:
            settings, _ = load_config(config)
        except ConfigError as e:
            raise _Failed(str(e)) from None
        template = template if template is not None else settings.get("mailbox")
        index_dir = index_dir if index_dir is not None else settings.get("index_dir")
    if template is None:
        raise _UsageError("give --config or --mailbox")
    try:
        check_mailbox_template(template)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    kind, path_template = split_mailbox_template(template)
    if kind != "mbox":
        raise _Failed(
            f"{template} is a {kind}: import pins UIDLs in an mbox's index (a Maildir's "
            "UIDLs are its file names, which Dovecot's %f and Courier give already)"
        )
    name = normalise_username(user)
    return Location(
        os.path.normpath(path_template.replace(USER_FIELD, name)),
        index_dir,
        template_prefix(path_template, USER_FIELD),
    )


def _read_capture(path: str) -> Capture:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _Failed(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_capture(text, path)
    except ValueError as e:
        raise _Failed(str(e)) from None


def import_capture(
    capture: Capture,
    user: str,
    where: Location,
    *,
    content_check: bool = True,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
    complain: Callable[[str], None] = print,
) -> int:
    """
    Match C{capture} to C{user}'s maildrop and pin its UIDLs, reading and
    pinning in one session (so nothing can change in between), then check
    in a second one that they are served.

    @param say: where the outcome goes, a line at a time.
    @param complain: where a mismatch report goes, a line at a time.
    @return: the exit status: 0 if pinned (or would be, with C{dry_run}), 1
        for a mismatch (nothing changed then).
    @raise _Failed: the maildrop cannot be opened or the UIDLs not pinned.
    """
    if content_check and not capture.has_fingerprints:
        raise _Failed(
            "the capture has no TOP section (header fingerprints): capture again "
            "without --no-headers, or import with --no-content-check"
        )
    mailbox = where.open()
    try:
        try:
            served = served_messages(mailbox)
        except OSError as e:
            raise _Failed(f"{user}: cannot read {where.path}: {_reason(e)}") from None
        matching = match_capture(capture, served, content_check=content_check)
        if not matching.problems and not dry_run:
            try:
                mailbox.pin_uidls(matching.pins)
            except (ValueError, IndexError, MaildropUnavailable) as e:
                raise _Failed(f"{user}: cannot pin the UIDLs: {e}") from None
    finally:
        mailbox.close()
    if matching.problems:
        count = len(matching.problems)
        complain(
            f"pop3srv: {user}: the capture does not match {where.path}; nothing was "
            f"changed ({count} problem{'s' if count != 1 else ''}):"
        )
        for line in matching.problems[:MAX_REPORTED]:
            complain(f"  {line}")
        if count > MAX_REPORTED:
            complain(f"  ... and {count - MAX_REPORTED} more")
        return EXIT_FAILED
    newer = f", {matching.newer} newer keep their own" if matching.newer else ""
    if dry_run:
        say(
            f"{user}: all {len(matching.pins)} captured messages match{newer}; "
            "nothing pinned (--dry-run)"
        )
        return 0
    mailbox = where.open()
    try:
        wrong = [i + 1 for i, uidl in matching.pins.items() if mailbox.getUidl(i) != uidl]
    finally:
        mailbox.close()
    if wrong:
        raise _Failed(
            f"{user}: pinned, but messages {_numbers(wrong)} do not serve the captured UIDLs"
        )
    say(f"{user}: pinned {len(matching.pins)} UIDLs{newer}")
    return 0


def _reason(error: OSError) -> str:
    """
    An OS error in a few words, with the file it names unless that is a
    path through a descriptor (C{/proc/self/fd/...}), which the admin
    does not know; the message around it names the file.
    """
    reason = error.strerror or str(error)
    if error.filename is not None and not str(error.filename).startswith("/proc/"):
        reason = f"{error.filename}: {reason}"
    return reason


def _numbers(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


def _import_command(args: argparse.Namespace) -> int:
    capture = _read_capture(args.capture)
    if capture.user is not None and capture.user != args.user:
        raise _UsageError(f"the capture is of user {capture.user}, not {args.user}")
    maildrop = _resolve(args.user, args.config, args.mailbox, args.index_dir)
    return import_capture(
        capture,
        args.user,
        maildrop,
        content_check=not args.no_content_check,
        dry_run=args.dry_run,
        complain=lambda line: print(line, file=sys.stderr),
    )


def main(argv: Sequence[str]) -> int:
    """
    Run C{pop3srv uidl}.

    @param argv: the arguments after C{uidl}.
    @return: the exit status.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
        if args.command == "capture":
            return _capture_command(args)
        if args.command == "import":
            return _import_command(args)
        parser.error("a command is required: capture or import")
    except _UsageError as e:
        print(f"pop3srv: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Failed as e:
        print(f"pop3srv: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        # Whatever the steps above did not foresee: still one line.
        print(f"pop3srv: {_reason(e)}", file=sys.stderr)
        return EXIT_FAILED
    except Pop3Error as e:
        print(f"pop3srv: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pop3srv: interrupted", file=sys.stderr)
        return EXIT_FAILED
