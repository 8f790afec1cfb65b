# -*- test-case-name: tests.test_proxyheader -*-
"""
The PROXY protocol header a load balancer (HAProxy and others) puts in
front of a connection to name the client it relays: version 1 (one text
line) and version 2 (binary), as haproxy's C{doc/proxy-protocol.txt}
specifies them.  No I/O and no Twisted imports.

The parser is strict, as the specification asks: anything that does not
match the format exactly is an error, found as early as the bytes allow
(a stray first byte ends it at once; a version 2 header is judged on its
fixed part before its addresses arrive), and it never takes a byte past
the header.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

#: What every version 1 header starts with.
V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included (the specification's worst
#: case: C{UNKNOWN} followed by two full IPv6 addresses and ports).
MAX_V1_LENGTH = 107
#: What every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The signature, the version and command, the family and the length.
V2_FIXED_LENGTH = 16
#: The most a version 2 header may carry after its fixed part.  Addresses
#: and the TLVs HAProxy sends (ALPN, SNI, a unique id, TLS details) fit many
#: times over; a header asking for more is not from a proxy we know.
MAX_V2_BODY = 4096

_V1_PROTOCOLS = ("TCP4", "TCP6", "UNKNOWN")
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
# Printable US-ASCII: the only bytes a version 1 line may hold before CRLF.
_V1_TEXT = re.compile(rb"[\x20-\x7e]*")

_LOCAL, _PROXY = 0x0, 0x1
# The family/transport bytes the specification lists, each with the length
# of its address block.  Any other byte is invalid.
_V2_ADDRESS_LENGTHS = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # UNIX stream
    0x32: 216,  # UNIX datagram
}
_DATAGRAM = 0x2

#: A host (an IP address in canonical text form) and a port.
Endpoint = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why, on one line."""


class Incomplete(enum.Enum):
    """The type of L{INCOMPLETE}."""

    INCOMPLETE = "INCOMPLETE"


INCOMPLETE = Incomplete.INCOMPLETE
"""What is there so far is the start of a valid header: more bytes are needed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar version: 1 (text) or 2 (binary).
    @ivar local: a version 2 C{LOCAL} command: the proxy opened the
        connection itself (a health check); it relays no client.
    @ivar source: the client's address and port, or L{None} if the header
        names none (C{LOCAL}, a version 1 C{UNKNOWN}, a version 2 C{UNSPEC}
        or C{AF_UNIX} family).
    @ivar destination: the address and port the client connected to, or
        L{None} with C{source}.
    """

    version: int
    local: bool
    source: Endpoint | None
    destination: Endpoint | None


def parse(data: bytes) -> tuple[ProxyHeader, int] | Incomplete:
    """
    Parse a PROXY header at the start of C{data}.

    @return: the header and how many bytes of C{data} it took; or
        L{INCOMPLETE} if C{data} is a valid beginning of a header.
    @raise ProxyHeaderError: if C{data} cannot begin a valid header.
    """
    if not data:
        return INCOMPLETE
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError(f"not a PROXY header: it starts with {data[:8]!r}")


class ProxyHeaderParser:
    """
    Reads a PROXY header from bytes as they arrive, in any pieces.

    Feed it until it returns the header or raises; it holds at most one
    header's worth of bytes, and hands back what followed the header in
    the last piece untouched.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._decided = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | Incomplete:
        """
        Take the next bytes received.

        @return: the header and the bytes after it (which belong to the
            protocol behind the header); or L{INCOMPLETE}.
        @raise ProxyHeaderError: if the bytes so far cannot begin a valid
            header.  The parser is then spent, as after a header.
        @raise RuntimeError: if it is fed after it returned a header or
            raised.
        """
        if self._decided:
            raise RuntimeError("the PROXY header was already read")
        buffer = self._buffer + data
        try:
            result = parse(buffer)
        except ProxyHeaderError:
            self._decided = True
            self._buffer = b""
            raise
        if result is INCOMPLETE:
            self._buffer = buffer
            return INCOMPLETE
        self._decided = True
        self._buffer = b""
        header, used = result
        return header, buffer[used:]


# --- version 1


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | Incomplete:
    seen = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(seen):
        raise ProxyHeaderError(f"not a PROXY header: it starts with {data[:8]!r}")
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        _check_partial_v1(data[:MAX_V1_LENGTH])
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line without CRLF in {MAX_V1_LENGTH} bytes")
        return INCOMPLETE
    line = data[:end]
    if _V1_TEXT.fullmatch(line) is None:
        raise ProxyHeaderError("PROXY v1 line holds a byte that is not printable ASCII")
    return _v1_fields(line.decode("ascii")), end + 2


def _check_partial_v1(window: bytes) -> None:
    """
    Reject a line without its CRLF yet as soon as it cannot become valid:
    a byte outside printable ASCII (a CR is allowed only as the last byte
    so far) or an unknown protocol word.
    """
    body = window[:-1] if window.endswith(b"\r") else window
    if _V1_TEXT.fullmatch(body) is None:
        raise ProxyHeaderError(
            "PROXY v1 line holds a byte that is not printable ASCII, or a CR without LF"
        )
    if len(body) <= len(V1_PREFIX):
        return
    word, space, _ = body[len(V1_PREFIX) :].partition(b" ")
    text = word.decode("ascii")
    if space or len(body) < len(window):
        known = text in _V1_PROTOCOLS
    else:
        known = any(p.startswith(text) for p in _V1_PROTOCOLS)
    if not known:
        raise ProxyHeaderError(f"PROXY v1 protocol {text[:16]!r} is not TCP4, TCP6 or UNKNOWN")


def _v1_fields(line: str) -> ProxyHeader:
    """The header of a complete version 1 line (without its CRLF)."""
    fields = line.split(" ")
    protocol = fields[1] if len(fields) > 1 else ""
    if protocol == "UNKNOWN":
        # The specification: whatever follows UNKNOWN is to be ignored.
        return ProxyHeader(1, False, None, None)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol {protocol[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError(
            f"PROXY v1 {protocol} line has {len(fields) - 2} fields after the protocol, not 4"
            " (or not single spaces between them)"
        )
    _, _, source, destination, source_port, destination_port = fields
    return ProxyHeader(
        1,
        False,
        (_v1_address(protocol, source, "source"), _v1_port(source_port, "source")),
        (
            _v1_address(protocol, destination, "destination"),
            _v1_port(destination_port, "destination"),
        ),
    )


def _v1_address(protocol: str, text: str, role: str) -> str:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        if protocol == "TCP4":
            # ipaddress refuses leading zeros, as the specification does.
            address = ipaddress.IPv4Address(text)
        else:
            if "%" in text:
                raise ValueError("a scope id")
            address = ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(
            f"PROXY v1 {role} address {text[:48]!r} is not an {_family_name(protocol)} address"
        ) from None
    return str(address)


def _v1_port(text: str, role: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 {role} port {text[:16]!r} is not a number 0-65535")
    return int(text)


def _family_name(protocol: str) -> str:
    return "IPv4" if protocol == "TCP4" else "IPv6"


# --- version 2


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | Incomplete:
    seen = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(seen):
        raise ProxyHeaderError(f"not a PROXY header: it starts with {data[:8]!r}")
    if len(data) <= len(V2_SIGNATURE):
        return INCOMPLETE
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 signature with version {version}, not 2")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    if len(data) <= 13:
        return INCOMPLETE
    family = data[13]
    if family not in _V2_ADDRESS_LENGTHS:
        raise ProxyHeaderError(f"PROXY v2 family and transport byte 0x{family:02x} is invalid")
    if command == _PROXY and family & 0x0F == _DATAGRAM:
        raise ProxyHeaderError("PROXY v2 header relays a datagram connection, not a stream")
    if len(data) < V2_FIXED_LENGTH:
        return INCOMPLETE
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_BODY:
        raise ProxyHeaderError(
            f"PROXY v2 header of {length} bytes is over the {MAX_V2_BODY} allowed"
        )
    needed = _V2_ADDRESS_LENGTHS[family]
    if command == _PROXY and length < needed:
        raise ProxyHeaderError(
            f"PROXY v2 header of {length} bytes is shorter than its {needed}-byte addresses"
        )
    end = V2_FIXED_LENGTH + length
    if len(data) < end:
        return INCOMPLETE
    if command == _LOCAL:
        # The specification: the receiver ignores the family and addresses.
        return ProxyHeader(2, True, None, None), end
    body = data[V2_FIXED_LENGTH:end]
    if family == 0x11:
        source, destination = _v2_addresses(body, 4, ipaddress.IPv4Address)
    elif family == 0x21:
        source, destination = _v2_addresses(body, 16, ipaddress.IPv6Address)
    else:
        # UNSPEC or a UNIX socket: no client address to take.
        return ProxyHeader(2, False, None, None), end
    return ProxyHeader(2, False, source, destination), end


def _v2_addresses(
    body: bytes,
    size: int,
    kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address],
) -> tuple[Endpoint, Endpoint]:
    """The source and destination of an address block of C{size}-byte addresses."""
    ports = body[2 * size : 2 * size + 4]
    return (
        (str(kind(body[:size])), int.from_bytes(ports[:2], "big")),
        (str(kind(body[size : 2 * size])), int.from_bytes(ports[2:], "big")),
    )
