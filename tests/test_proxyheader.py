"""
Tests for L{pop3srv.core.proxyheader}: the examples and limits of haproxy's
C{proxy-protocol.txt}, strict rejection of everything else, and properties
over random headers and random bytes.

The headers are built here from the specification with C{socket} and
C{struct} (L{v1_header}, L{v2_header}), not by the code under test;
C{test_proxy} sends them over real sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3srv.core.proxyheader import (
    INCOMPLETE,
    MAX_V1_LENGTH,
    MAX_V2_BODY,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    parse,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
LOCAL, PROXY = 0x20, 0x21
TCP4, TCP6, UNSPEC, UNIX_STREAM = 0x11, 0x21, 0x00, 0x31


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A version 1 line for a TCP connection from C{source} to C{destination}."""
    family = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return (
        f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
    )


def v2_header(
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    *,
    command: int = PROXY,
    family: int | None = None,
    body: bytes | None = None,
    tlvs: bytes = b"",
) -> bytes:
    """
    A version 2 header: PROXY with the addresses of C{source} and
    C{destination} (TCP over their family), or the given C{command},
    C{family} byte and address C{body}; then C{tlvs}.
    """
    if source is not None and destination is not None:
        version = ipaddress.ip_address(source[0]).version
        af = socket.AF_INET if version == 4 else socket.AF_INET6
        family = TCP4 if version == 4 else TCP6
        body = (
            socket.inet_pton(af, source[0])
            + socket.inet_pton(af, destination[0])
            + struct.pack("!HH", source[1], destination[1])
        )
    body = (body or b"") + tlvs
    return SIGNATURE + struct.pack("!BBH", command, family or UNSPEC, len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value entry."""
    return struct.pack("!BH", kind, len(value)) + value


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[ProxyHeader, bytes] | str:
    """
    Feed C{data} to a parser split at C{cuts}; the header and the rest, or
    C{"incomplete"}, or C{"error"}.  Only L{ProxyHeaderError} may escape
    the parser, and it is fed nothing after it decided.
    """
    parser = ProxyHeaderParser()
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    for index, piece in enumerate(pieces):
        try:
            result = parser.feed(piece)
        except ProxyHeaderError:
            return "error"
        if result is not INCOMPLETE:
            header, rest = result
            return header, rest + b"".join(pieces[index + 1 :])
    return "incomplete"


def addr(address: IPAddress) -> str:
    """An address as the parser reports it: canonical text."""
    return str(address)


# --- the specification's examples and limits


def test_v1_example_from_the_specification() -> None:
    """Section 2.1's example: the header, then the HTTP request left untouched."""
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    header, rest = ProxyHeaderParser().feed(data)  # type: ignore[misc]
    assert header == ProxyHeader(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert rest == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        b"PROXY TCP6 " + b":".join([b"ffff"] * 8) * 1 + b" " + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
    ],
    ids=["tcp4-longest", "tcp6-longest", "unknown-short", "unknown-worst-case"],
)
def test_v1_lengths_the_specification_names(line: bytes) -> None:
    """The longest lines of each kind (56, 104, 15 and 107 bytes) are read whole."""
    assert len(line) in (56, 104, 15, MAX_V1_LENGTH)
    result = parse(line + b"rest")
    assert result is not INCOMPLETE
    assert result[1] == len(line)


def test_v1_unknown_names_no_client() -> None:
    """UNKNOWN: whatever follows it is ignored, and no address is taken."""
    assert parse(b"PROXY UNKNOWN\r\n") == (ProxyHeader(1, False, None, None), 15)
    assert parse(b"PROXY UNKNOWN 1.2.3.4 whatever\r\n") == (ProxyHeader(1, False, None, None), 32)


def test_v1_tcp6_addresses_in_canonical_form() -> None:
    """IPv6 text in any valid form comes out canonical; IPv4-mapped is kept as IPv6."""
    header, _ = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::ffff:198.51.100.7 1 2\r\n")  # type: ignore[misc]
    assert header.source == ("2001:db8::7", 1)
    assert header.destination == (str(ipaddress.ip_address("::ffff:198.51.100.7")), 2)


def test_v2_example_from_haproxy() -> None:
    """A header as HAProxy sends it (TCP over IPv4, no TLV), then the client's bytes."""
    data = bytes.fromhex(
        "0d0a0d0a000d0a515549540a" "21" "11" "000c" "ac130001" "ac130003" "a652" "0050"
    )
    assert data == v2_header(("172.19.0.1", 42578), ("172.19.0.3", 80))
    header, rest = ProxyHeaderParser().feed(data + b"CAPA\r\n")  # type: ignore[misc]
    assert header == ProxyHeader(2, False, ("172.19.0.1", 42578), ("172.19.0.3", 80))
    assert rest == b"CAPA\r\n"


def test_v2_ipv6_and_tlvs_skipped() -> None:
    """TCP over IPv6, with TLVs (ALPN, authority, NOOP) that are skipped."""
    tlvs = tlv(0x01, b"pop3") + tlv(0x02, b"mail.example.org") + tlv(0x04, b"\0" * 5)
    data = v2_header(("2001:db8::7", 50000), ("2001:db8::1", 995), tlvs=tlvs)
    assert parse(data + b"\x16\x03\x01") == (
        ProxyHeader(2, False, ("2001:db8::7", 50000), ("2001:db8::1", 995)),
        len(data),
    )


@pytest.mark.parametrize("family", [UNSPEC, TCP4, 0x12, TCP6, 0x22, UNIX_STREAM, 0x32])
def test_v2_local_ignores_family_and_addresses(family: int) -> None:
    """
    LOCAL (a health check): accepted with any valid family, the address
    block skipped by its length and not read.
    """
    data = v2_header(command=LOCAL, family=family, body=b"\x01" * 40)
    assert parse(data + b"x") == (ProxyHeader(2, True, None, None), len(data))
    assert parse(v2_header(command=LOCAL)) == (ProxyHeader(2, True, None, None), 16)


@pytest.mark.parametrize(
    ("family", "body"), [(UNSPEC, b""), (UNSPEC, b"junk"), (UNIX_STREAM, b"/run/x\0" * 31)]
)
def test_v2_proxy_without_an_inet_address_names_no_client(family: int, body: bytes) -> None:
    """PROXY over UNSPEC or a UNIX socket: no client address, like LOCAL."""
    data = v2_header(family=family, body=body.ljust(216 if family else 0, b"\0"))
    assert parse(data) == (ProxyHeader(2, False, None, None), len(data))


# --- strict: every deviation is an error, found as early as it can be


def test_garbage_first_byte_is_refused_at_once() -> None:
    """A client's command (not a header) is refused on its first byte."""
    with pytest.raises(ProxyHeaderError, match="not a PROXY header"):
        ProxyHeaderParser().feed(b"U")
    with pytest.raises(ProxyHeaderError, match="not a PROXY header"):
        parse(b"\x16\x03\x01\x02\x00")  # a TLS ClientHello


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n", "source address"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.256 56324 443\r\n", "destination address"),
        (b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n", "not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0443\r\n", "destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 443\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "fields"),
        (b"PROXY TCP4\r\n", "fields"),
        (b"PROXY \r\n", "protocol"),
        (b"PROXY UNKNOWNX\r\n", "protocol"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "printable"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", "CR without LF"),
        (b"PROXY TCP4 1.2.3.\xc4 5.6.7.8 1 2\r\n", "printable"),
        (b"PROXY\r\n", "not a PROXY header"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
    ],
)
def test_v1_deviations_are_refused(data: bytes, reason: str) -> None:
    """Each deviation from the version 1 format is an error that says what is wrong."""
    with pytest.raises(ProxyHeaderError, match=reason) as caught:
        parse(data)
    assert "\n" not in str(caught.value)


def test_v1_unknown_protocol_refused_before_the_line_ends() -> None:
    """A protocol word that none of TCP4, TCP6, UNKNOWN starts with needs no CRLF to be refused."""
    assert parse(b"PROXY UNKNO") is INCOMPLETE
    with pytest.raises(ProxyHeaderError, match="protocol 'TCP5'"):
        parse(b"PROXY TCP5")
    with pytest.raises(ProxyHeaderError, match="protocol 'TCP'"):
        parse(b"PROXY TCP ")


def test_v1_line_without_crlf_in_107_bytes() -> None:
    """106 bytes without CRLF may still become a line; 107 cannot."""
    start = b"PROXY UNKNOWN " + b"f" * 200
    assert parse(start[:106]) is INCOMPLETE
    assert parse(start[:105] + b"\r") is INCOMPLETE
    with pytest.raises(ProxyHeaderError, match="without CRLF in 107 bytes"):
        parse(start[:107])
    with pytest.raises(ProxyHeaderError, match="without CRLF in 107 bytes"):
        parse(start[:106] + b"\r\n")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (SIGNATURE + b"\x11", "version 1, not 2"),
        (SIGNATURE + b"\x22", "command 2"),
        (SIGNATURE + b"\x2f", "command 15"),
        (SIGNATURE + b"\x21\x13", "byte 0x13 is invalid"),
        (SIGNATURE + b"\x21\x41", "byte 0x41 is invalid"),
        (SIGNATURE + b"\x21\x10", "byte 0x10 is invalid"),
        (SIGNATURE + b"\x20\x01", "byte 0x01 is invalid"),
        (SIGNATURE + b"\x21\x12", "datagram"),
        (SIGNATURE + b"\x21\x22", "datagram"),
        (SIGNATURE + b"\x21\x32", "datagram"),
        (SIGNATURE + b"\x21\x11\x00\x0b", "shorter than its 12-byte addresses"),
        (SIGNATURE + b"\x21\x21\x00\x23", "shorter than its 36-byte addresses"),
        (SIGNATURE + b"\x21\x31\x00\xd7", "shorter than its 216-byte addresses"),
        (SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_BODY + 1), "over the"),
        (SIGNATURE + b"\x20\x00\xff\xff", "over the"),
        (SIGNATURE[:5] + b"\x0a", "not a PROXY header"),
        (b"\r\n\r\nQUIT", "not a PROXY header"),
    ],
)
def test_v2_deviations_are_refused_within_16_bytes(data: bytes, reason: str) -> None:
    """
    The fixed part decides: a bad version, command, family or length is an
    error before any address arrives (these inputs are 16 bytes or fewer).
    """
    assert len(data) <= 16
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(data)


def test_parser_is_spent_after_deciding() -> None:
    """After a header or an error, feeding more is a mistake of the caller."""
    parser = ProxyHeaderParser()
    parser.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError):
        parser.feed(b"x")
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"GET")
    with pytest.raises(RuntimeError):
        parser.feed(b"PROXY UNKNOWN\r\n")


# --- properties

ports = st.integers(0, 65535)
endpoints4 = st.tuples(st.ip_addresses(v=4), ports)
endpoints6 = st.tuples(st.ip_addresses(v=6), ports)
connections = st.one_of(st.tuples(endpoints4, endpoints4), st.tuples(endpoints6, endpoints6))
cuts = st.lists(st.integers(0, 300), max_size=12)


def as_text(endpoint: tuple[IPAddress, int]) -> tuple[str, int]:
    return addr(endpoint[0]), endpoint[1]


@given(connections, st.binary(max_size=64), cuts)
def test_v1_round_trip_in_any_pieces(
    connection: tuple[tuple[IPAddress, int], tuple[IPAddress, int]], after: bytes, split: list[int]
) -> None:
    """Any TCP4/TCP6 line parses to its addresses and ports however it is split, rest left."""
    source, destination = as_text(connection[0]), as_text(connection[1])
    data = v1_header(source, destination)
    assert feed_in_pieces(data + after, split) == (
        ProxyHeader(1, False, source, destination),
        after,
    )


@given(
    connections,
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(max_size=64),
    cuts,
)
def test_v2_round_trip_in_any_pieces(
    connection: tuple[tuple[IPAddress, int], tuple[IPAddress, int]],
    entries: list[tuple[int, bytes]],
    after: bytes,
    split: list[int],
) -> None:
    """Any TCP header, with any TLVs, parses to its addresses however it is split."""
    source, destination = as_text(connection[0]), as_text(connection[1])
    data = v2_header(source, destination, tlvs=b"".join(tlv(k, v) for k, v in entries))
    assert feed_in_pieces(data + after, split) == (
        ProxyHeader(2, False, source, destination),
        after,
    )


@given(
    st.sampled_from([UNSPEC, TCP4, 0x12, TCP6, 0x22, UNIX_STREAM, 0x32]),
    st.binary(max_size=300),
    st.binary(max_size=32),
    cuts,
)
def test_v2_local_round_trip(family: int, body: bytes, after: bytes, split: list[int]) -> None:
    """LOCAL with any family and block is a health check, and takes exactly its length."""
    data = v2_header(command=LOCAL, family=family, body=body)
    assert feed_in_pieces(data + after, split) == (ProxyHeader(2, True, None, None), after)


@given(connections, st.sampled_from([1, 2]))
def test_every_proper_prefix_is_incomplete(
    connection: tuple[tuple[IPAddress, int], tuple[IPAddress, int]], version: int
) -> None:
    """A valid header cut short is never an error and never a header: it waits."""
    source, destination = as_text(connection[0]), as_text(connection[1])
    data = (v1_header if version == 1 else v2_header)(source, destination)
    for end in range(len(data)):
        assert parse(data[:end]) is INCOMPLETE


garbage = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY UNKNOWN" + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.integers(0x20, 0x21), st.sampled_from(sorted({0, 0x11, 0x21, 0x31, 0x12})))
    .flatmap(
        lambda cf: st.binary(max_size=300).map(
            lambda b: V2_SIGNATURE + bytes(cf) + struct.pack("!H", len(b) // 2) + b
        )
    ),
)


@given(garbage, cuts)
def test_random_bytes_decide_the_same_in_any_pieces(data: bytes, split: list[int]) -> None:
    """
    On any bytes the parser raises only L{ProxyHeaderError}, decides the
    same however they are split, and a header it finds is a prefix of the
    data with the rest left exactly as it came.
    """
    whole = feed_in_pieces(data, [])
    assert feed_in_pieces(data, split) == whole
    assert feed_in_pieces(data, list(range(len(data)))) == whole
    try:
        result = parse(data)
    except ProxyHeaderError:
        assert whole == "error"
        return
    if result is INCOMPLETE:
        assert whole == "incomplete"
        return
    header, used = result
    assert whole == (header, data[used:])
    # A header never runs past its own limit.
    assert used <= (MAX_V1_LENGTH if data[:1] == b"P" else 16 + MAX_V2_BODY)


@given(garbage)
def test_incomplete_only_below_the_limits(data: bytes) -> None:
    """
    The parser waits only while a header could still fit: under 107 bytes
    for version 1, under 16 bytes or the announced length for version 2.
    """
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if result is not INCOMPLETE:
        return
    if data.startswith(b"P"):
        assert len(data) < MAX_V1_LENGTH
    elif len(data) >= 16:
        assert len(data) < 16 + struct.unpack("!H", data[14:16])[0] <= 16 + MAX_V2_BODY
