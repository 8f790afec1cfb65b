"""Tests for L{pop3srv.core.wire}: framing, parsing, formatting and the encoder."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pop3srv.core import commands as c
from pop3srv.core.wire import (
    MAX_COMMAND_LINE,
    DotStuffer,
    LineBuffer,
    LineTooLong,
    TopFilter,
    format_err,
    format_multiline,
    format_ok,
    parse_command,
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split C{data} at the given offsets (clipped and sorted)."""
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def lines_of(data: bytes, cuts: list[int]) -> list[bytes | LineTooLong]:
    """Feed C{data} in pieces and collect every line."""
    buffer = LineBuffer()
    out: list[bytes | LineTooLong] = []
    for piece in split_at(data, cuts):
        buffer.feed(piece)
        while (line := buffer.next_line()) is not None:
            out.append(line)
    return out


def test_lines_whole_bytewise_and_with_trailing_data() -> None:
    """The same lines come out whole, one byte at a time, and with a partial tail."""
    data = b"USER a\r\nPASS b c\r\nSTAT\nNOOP"
    whole = lines_of(data, [])
    bytewise = lines_of(data, list(range(len(data))))
    assert whole == bytewise == [b"USER a", b"PASS b c", b"STAT"]


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_lines_do_not_depend_on_segmentation(data: bytes, cuts: list[int]) -> None:
    """However the bytes arrive, the same lines (and overflow markers) come out."""
    assert lines_of(data, cuts) == lines_of(data, [])


def test_overlong_line_is_reported_and_session_goes_on() -> None:
    """A line over 255 octets is one LineTooLong, and the next line is parsed."""
    data = b"NOOP " + b"x" * 300 + b"\r\nSTAT\r\n"
    assert lines_of(data, [10, 100]) == [LineTooLong(), b"STAT"]


def test_line_of_exactly_the_limit_is_accepted() -> None:
    """A line of 255 octets including CRLF is still a command (RFC 2449)."""
    line = b"X" * (MAX_COMMAND_LINE - 2)
    assert lines_of(line + b"\r\n", []) == [line]
    assert lines_of(line + b"Y\r\n", []) == [LineTooLong()]


def test_huge_line_without_newline_keeps_memory_bounded() -> None:
    """Megabytes without a line end never grow the buffer past the limit."""
    buffer = LineBuffer()
    for _ in range(100):
        buffer.feed(b"A" * 100_000)
        assert buffer.next_line() is None
        assert len(buffer) <= 100_000
    buffer.feed(b"\r\nNOOP\r\n")
    assert buffer.next_line() == LineTooLong()
    assert buffer.next_line() == b"NOOP"


def test_parse_each_command() -> None:
    """Every RFC 1939 and RFC 2449 command parses, keywords case-insensitively."""
    assert parse_command(b"user alice") == c.User("alice")
    assert parse_command(b"PASS se cret ") == c.Pass("se cret ")
    assert parse_command(b"APOP bob c4c9334bac560ecc979e58001b3e22fb") == c.Apop(
        "bob", "c4c9334bac560ecc979e58001b3e22fb"
    )
    assert parse_command(b"STAT") == c.Stat()
    assert parse_command(b"LIST") == c.List(None)
    assert parse_command(b"LIST 3") == c.List(3)
    assert parse_command(b"RETR 1") == c.Retr(1)
    assert parse_command(b"DELE 2") == c.Dele(2)
    assert parse_command(b"NOOP") == c.Noop()
    assert parse_command(b"RSET") == c.Rset()
    assert parse_command(b"QUIT") == c.Quit()
    assert parse_command(b"TOP 1 0") == c.Top(1, 0)
    assert parse_command(b"UIDL") == c.Uidl(None)
    assert parse_command(b"uidl 7") == c.Uidl(7)
    assert parse_command(b"CAPA") == c.Capa()
    assert parse_command(b"AUTH") == c.Auth(None, None)
    assert parse_command(b"auth plain") == c.Auth("PLAIN", None)
    assert parse_command(b"AUTH PLAIN " + b"QQ" * 60 + b"==") == c.Auth("PLAIN", "QQ" * 60 + "==")
    assert parse_command(b"UTF8") == c.Utf8()
    assert parse_command(b"AUTH a b c") == c.BadCommand(
        "AUTH takes a mechanism and an optional initial response."
    )
    assert parse_command(b"AUTH PL@IN") == c.BadCommand("Invalid SASL mechanism name.")


def test_parse_errors_have_reasons() -> None:
    """Bad input becomes BadCommand with a specific reason, never an exception."""
    cases = {
        b"RETR": "Missing message number.",
        b"RETR x": "Invalid message number.",
        b"RETR -1": "Invalid message number.",
        b"RETR +1": "Invalid message number.",
        b"RETR 99999999999": "Invalid message number.",
        b"RETR 1 2": "Noise after message number.",
        b"LIST 1 2": "Noise after message number.",
        b"STAT 1": "This command takes no arguments.",
        b"TOP 1": "TOP takes a message number and a line count.",
        b"TOP 1 x": "Invalid line count.",
        b"XYZZY": "Unknown command.",
        b"": "Unknown command.",
        b"RETR\x001": "NUL is not allowed in a command.",
        b"USER \xff": "Command is not valid UTF-8.",
        b"USER a\x01": "Control characters are not allowed in a command.",
        b"RETR  1": "Arguments are separated by a single space.",
        b"USER " + b"a" * 41: "Argument too long.",
        b"PASS": "PASS takes a password.",
        b"USER a b": "USER takes exactly one argument.",
    }
    for line, reason in cases.items():
        assert parse_command(line) == c.BadCommand(reason), line


@given(st.binary(max_size=300))
def test_parse_never_raises(line: bytes) -> None:
    """Any bytes parse to a command or a BadCommand."""
    result = parse_command(line)
    assert isinstance(
        result,
        c.BadCommand
        | c.User
        | c.Pass
        | c.Apop
        | c.Stat
        | c.List
        | c.Retr
        | c.Dele
        | c.Noop
        | c.Rset
        | c.Quit
        | c.Top
        | c.Uidl
        | c.Capa,
    )


def test_format_responses() -> None:
    """Status lines end in CRLF; codes are bracketed; multi-line ends in a dot line."""
    assert format_ok() == b"+OK\r\n"
    assert format_ok("2 320") == b"+OK 2 320\r\n"
    assert format_err("Locked.", "IN-USE") == b"-ERR [IN-USE] Locked.\r\n"
    assert format_multiline("x", ["a", ".b"]) == b"+OK x\r\na\r\n..b\r\n.\r\n"


def encode(data: bytes, cuts: list[int]) -> bytes:
    """Encode C{data} through a DotStuffer fed in pieces."""
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(piece) for piece in split_at(data, cuts)) + stuffer.finish()


def reference_encode(data: bytes) -> bytes:
    """A line-by-line reference for the wire form of a message."""
    if not data:
        return b".\r\n"
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out) + b".\r\n"


def test_stuffing_examples() -> None:
    """Leading dots are doubled, bare LF becomes CRLF, the last line is ended."""
    assert encode(b".\n..x\nok", []) == b"..\r\n...x\r\nok\r\n.\r\n"
    assert encode(b"a\r\n.b\r\n", [2, 3]) == b"a\r\n..b\r\n.\r\n"
    assert encode(b"", []) == b".\r\n"


message_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\n", b"\r\n", b"From ", b" ", b".."]), max_size=40
).map(b"".join)


@given(message_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_stuffing_matches_reference_however_split(data: bytes, cuts: list[int]) -> None:
    """The encoder's output equals the line-wise reference for any chunking."""
    assert encode(data, cuts) == reference_encode(data)


@given(message_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_no_line_is_a_lone_dot_before_the_end(data: bytes, cuts: list[int]) -> None:
    """No output line equals '.' except the terminator, and unstuffing restores the lines."""
    out = encode(data, cuts)
    lines = out.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert b"." not in lines[:-2]
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines[:-2]]
    expected = data.replace(b"\r\n", b"\n").split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert unstuffed == expected


def top(data: bytes, lines: int, cuts: list[int]) -> bytes:
    """Run TopFilter over C{data} in pieces."""
    top_filter = TopFilter(lines)
    return b"".join(top_filter.feed(piece) for piece in split_at(data, cuts))


def test_top_header_blank_line_and_n_body_lines() -> None:
    """TOP keeps the header, the separating blank line and N body lines."""
    msg = b"A: 1\nB: 2\n\nl1\nl2\nl3\n"
    assert top(msg, 0, []) == b"A: 1\nB: 2\n\n"
    assert top(msg, 2, []) == b"A: 1\nB: 2\n\nl1\nl2\n"
    assert top(msg, 9, []) == msg
    assert top(b"A: 1\r\n\r\nx\r\n", 0, [5, 6, 7]) == b"A: 1\r\n\r\n"
    assert top(b"A: 1\nno body", 3, []) == b"A: 1\nno body"


@given(message_bytes, st.integers(0, 5), st.lists(st.integers(0, 200), max_size=6))
def test_top_does_not_depend_on_segmentation(data: bytes, n: int, cuts: list[int]) -> None:
    """TOP output is the same however the message is split."""
    assert top(data, n, cuts) == top(data, n, [])


def general_encode(data: bytes, cuts: list[int]) -> bytes:
    """Encode C{data} in pieces through the general path only."""
    stuffer = DotStuffer()
    pieces = [piece for piece in split_at(data, cuts) if piece]
    return b"".join(stuffer._feed_general(piece) for piece in pieces) + stuffer.finish()


any_line_ends = st.lists(
    st.sampled_from([b"a", b".", b"..", b"\n", b"\r", b"\r\n", b"\n.", b"From "]), max_size=60
).map(b"".join)


@given(any_line_ends, st.lists(st.integers(0, 300), max_size=8))
def test_lf_only_fast_path_equals_general_path(data: bytes, cuts: list[int]) -> None:
    """
    Whichever path each chunk takes (LF-only chunks, chunks with CR, a CR
    at a chunk's end, bare CR), the output is byte for byte what the general
    path gives, for any chunking.
    """
    assert encode(data, cuts) == general_encode(data, cuts)


@given(message_bytes.map(lambda b: b.replace(b"\r", b"")), st.lists(st.integers(0, 200)))
def test_lf_only_input_whole_bytewise_and_split(data: bytes, cuts: list[int]) -> None:
    """LF-only content (the fast path throughout) encodes like the reference."""
    expected = reference_encode(data)
    assert encode(data, cuts) == expected
    assert encode(data, list(range(len(data)))) == expected
