"""
Tests for L{pop3srv.mbox.uidlformat}: Dovecot's C{pop3_uidl_format}
language and its mbox header MD5.

The fixed examples come from Dovecot's own documentation and unit tests
(C{20-pop3.conf}, C{test-var-expand.c}); the header MD5 values were read
from a Dovecot 2.3.19 serving C{pop3_uidl_format = %m}
(C{tests/test_dovecot_migration.py} checks the same against a live one).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3srv.mbox.uidlformat import (
    DOVECOT_DEFAULT,
    KEYS,
    MAX_UIDL_LENGTH,
    UidlFormat,
    header_md5,
    is_valid_uidl,
)

_U32 = st.integers(min_value=0, max_value=2**32 - 1)
_TOKEN = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="%{}"),
    min_size=1,
    max_size=20,
)


def render(fmt: str, **variables: str | int) -> bytes:
    return UidlFormat.parse(fmt).render(variables)


# --- the documented formats -------------------------------------------------


def test_debian_default() -> None:
    """
    C{%08Xu%08Xv}: the UID then the UIDVALIDITY, each in lower-case hex
    padded to eight digits (Dovecot's X is C{%llx}).
    """
    assert DOVECOT_DEFAULT == "%08Xu%08Xv"
    assert render(DOVECOT_DEFAULT, u=1, v=1700000000) == b"000000016553f100"
    assert render(DOVECOT_DEFAULT, u=0xABCDEF12, v=3) == b"abcdef1200000003"
    assert UidlFormat.parse(DOVECOT_DEFAULT).needs == frozenset("uv")


@pytest.mark.parametrize(
    ("server", "fmt", "expected"),
    [
        ("UW ipop3d", "%08Xv%08Xu", b"4b1d8f4c0000002a"),
        ("Courier", "%v-%u", b"1260228428-42"),
        ("Cyrus <= 2.1.3", "%u", b"42"),
        ("Cyrus >= 2.1.4 and Dovecot 0.99", "%v.%u", b"1260228428.42"),
        ("tpop3d", "%Mf", hashlib.md5(b"1260228428.M1P2.host").hexdigest().encode()),
        ("Courier (file name)", "%f", b"1260228428.M1P2.host"),
        ("popa3d", "%m", b"d41d8cd98f00b204e9800998ecf8427e"),
    ],
)
def test_compatibility_formats(server: str, fmt: str, expected: bytes) -> None:
    """
    The formats Dovecot's configuration lists for UIDL compatibility with
    other servers render as those servers' UIDLs.
    """
    variables: dict[str, str | int] = {
        "u": 42,
        "v": 1260228428,
        "f": "1260228428.M1P2.host",
        "m": "d41d8cd98f00b204e9800998ecf8427e",
    }
    assert UidlFormat.parse(fmt).render(variables) == expected, server


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%v", b"value1234"),
        ("%3v", b"val"),
        ("%3.2v", b"ue"),
        ("%3.-2v", b"ue12"),
        ("%-3.2v", b"23"),
        ("%0.-1v", b"value123"),
        ("%-4.-1v", b"123"),
    ],
)
def test_dovecot_ranges(fmt: str, expected: bytes) -> None:
    """Dovecot's own offset and width examples (test-var-expand.c)."""
    assert render(fmt, v="value1234") == expected


@pytest.mark.parametrize(
    ("fmt", "value", "expected"),
    [
        ("%50Hv", "value", b"1f"),
        ("%50Hv", "value2", b"2e"),
        ("%50Nv", "value", b"25"),
        ("%50Nv", "value2", b"e"),
    ],
)
def test_dovecot_hashes(fmt: str, value: str, expected: bytes) -> None:
    """Dovecot's own H and N examples (test-var-expand.c)."""
    assert render(fmt, v=value) == expected


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%Uf", b"ABC.DEF"),
        ("%Lf", b"abc.def"),
        ("%Rf", b"feD.cbA"),
        ("%Df", b"Abc,dc=Def"),
        ("%Xf", b"0"),  # not a decimal number
        ("%%%u", b"%7"),
        ("x%u%", b"x7"),  # a % at the very end is dropped
        ("%Xu%Xm", b"70"),  # not a number: 0
        ("%05u", b"00007"),
        ("%-05u", b"00007"),  # a sign without an offset is ignored
        ("%02Xv", b"ff"),  # zero padding never truncates
        ("%1Xv", b"f"),  # a width without zero truncates
        ("%.1Xv", b"f"),
        ("%.03Xv", b"0ff"),
        ("%LXv", b"ff"),
        ("%UXv", b"ff"),  # modifiers apply left to right: U, then X
        ("%XUv", b"FF"),
    ],
)
def test_modifiers(fmt: str, expected: bytes) -> None:
    """Modifiers, widths and Dovecot's quirks."""
    assert render(fmt, u=7, v=255, f="Abc.Def", m="d41d8cd98f00b204e9800998ecf8427e") == expected


def test_hex_of_a_large_number() -> None:
    """X takes any decimal that fits 64 bits, and gives 0 beyond."""
    assert render("%Xu", u=2**64 - 1) == b"f" * 16
    assert render("%Xu", u=2**64) == b"0"


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [
        ("", "names none"),
        ("abc", "names none"),
        ("%%", "names none"),
        ("%{uid}", "takes no %{...}"),
        ("%u%{uidvalidity}", "takes no %{...}"),
        ("%u%5", "a field without a variable"),
        ("%u%LX", "a field without a variable"),
        ("%08xu", "unknown variable %x"),  # lower-case x is no modifier
        ("%q", "unknown variable %q"),
        ("%u %v", "cannot be part of a UIDL"),
        ("%u\u00e9", "cannot be part of a UIDL"),
        ("%1234567u", "too large"),
        ("%.-5Hu", "negative width"),
    ],
)
def test_refused(fmt: str, reason: str) -> None:
    """What Dovecot refuses, or what could never be a UIDL, is refused in one line."""
    with pytest.raises(ValueError, match=reason) as caught:
        UidlFormat.parse(fmt)
    assert "\n" not in str(caught.value)


def test_render_refuses_what_is_no_uidl() -> None:
    """
    A result that is empty, too long or holds a space is refused, so that
    the caller falls back to its own UIDL.
    """
    with pytest.raises(ValueError, match="not a valid UIDL"):
        render("%f", f="")
    with pytest.raises(ValueError, match="not a valid UIDL"):
        render("%f", f="a b")
    with pytest.raises(ValueError, match="not a valid UIDL"):
        render("%080u", u=1)
    with pytest.raises(ValueError, match=r"%u \(uid\) has no value"):
        render("%u%v", v=1)


def test_needs() -> None:
    """C{needs} names the values render reads, and no others."""
    assert UidlFormat.parse("%m").needs == frozenset("m")
    assert UidlFormat.parse("%g.%f").needs == frozenset("fg")
    assert UidlFormat.parse("%v-%u%%").needs == frozenset("uv")


# --- properties ---------------------------------------------------------------


@settings(max_examples=500)
@given(st.text(max_size=30))
def test_parse_any_text(text: str) -> None:
    """Any text parses, or is refused with a one-line ValueError."""
    try:
        fmt = UidlFormat.parse(text)
    except ValueError as e:
        assert "\n" not in str(e).replace("\\n", "")
        assert str(e)
    else:
        assert fmt.needs <= set(KEYS)
        assert fmt.text == text


@settings(max_examples=300)
@given(
    st.text(alphabet="%-0123456789.LUEXRHNMDTuvmfgx", max_size=16),
    _U32,
    _U32,
    st.text(alphabet="abcdef0123456789", min_size=1, max_size=32),
)
def test_render_any_format(text: str, u: int, v: int, m: str) -> None:
    """
    Whatever parses renders from its needs alone, to a valid UIDL or a
    ValueError.
    """
    try:
        fmt = UidlFormat.parse(text)
    except ValueError:
        return
    values: dict[str, str | int] = {"u": u, "v": v, "m": m, "f": m, "g": m}
    try:
        uidl = fmt.render({k: values[k] for k in fmt.needs})
    except ValueError as e:
        assert "not a valid UIDL" in str(e)
    else:
        assert is_valid_uidl(uidl)


@given(_U32, _U32)
def test_default_round_trip(u: int, v: int) -> None:
    """C{%08Xu%08Xv} of 32-bit numbers is sixteen hex digits that give them back."""
    uidl = render(DOVECOT_DEFAULT, u=u, v=v)
    assert len(uidl) == 16
    assert (int(uidl[:8], 16), int(uidl[8:], 16)) == (u, v)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=30))
def test_zero_padded_hex(u: int, width: int) -> None:
    """C{%0NXu} is the hex of u, padded to N, never cut."""
    uidl = render(f"%0{width}Xu", u=u)
    assert int(uidl, 16) == u
    assert len(uidl) == max(width, len(f"{u:x}"))
    assert uidl == uidl.lower()


@given(
    _TOKEN,
    st.integers(min_value=-25, max_value=25),
    st.integers(min_value=-25, max_value=25),
)
def test_offset_and_width(value: str, offset: int, width: int) -> None:
    """
    An offset skips (negative: keeps the last), a width cuts (negative:
    drops the last), as Python slicing would with Dovecot's edge rules.
    """
    fmt = f"%{offset}.{width}f"
    data = value.encode()
    shifted = data[offset:] if offset >= 0 else (data[offset:] if len(data) > -offset else data)
    if width == 0:
        expected = shifted
    elif width > 0:
        expected = shifted[:width]
    else:
        expected = shifted if len(shifted) + width < 0 else shifted[: len(shifted) + width]
    try:
        uidl = render(fmt, f=value)
    except ValueError:
        assert not is_valid_uidl(expected)
    else:
        assert uidl == expected


@given(_TOKEN, _TOKEN, _U32)
def test_literals_kept(before: str, after: str, u: int) -> None:
    """Text around the fields is copied as it is."""
    expected = f"{before}{u}{after}".encode()
    if len(expected) > MAX_UIDL_LENGTH:
        with pytest.raises(ValueError, match="not a valid UIDL"):
            render(f"{before}%u{after}", u=u)
    else:
        assert render(f"{before}%u{after}", u=u) == expected


@given(_TOKEN)
def test_case_and_reverse(value: str) -> None:
    """L and U are ASCII case; R twice is no change."""
    assert render("%Lf", f=value) == value.encode().lower()
    assert render("%Uf", f=value) == value.encode().upper()
    assert render("%RRf", f=value) == value.encode()
    assert render("%Mf", f=value) == hashlib.md5(value.encode()).hexdigest().encode()


# --- the header MD5 -----------------------------------------------------------

# Values read from Dovecot 2.3.19's UIDL with pop3_uidl_format = %m.
_SEEN_BY_DOVECOT = [
    (
        b"Received: from x\n\tby y; Mon\nDate: Mon, 1 Jan 2024\nMessage-ID: <1@x>\n"
        b"Subject: hi\n\nbody\n",
        "cbeea18919320ff5172de9bebfca4f80",
    ),
    (
        b"Date: Mon, 1 Jan 2024\nMessage-ID:<2@x>\nDelivered-To:\talice\nreceived : first\n"
        b"Received: second\nX-Delivery-ID: 77\n\nbody\n>From me\n",
        "a723d1a95964e561ebf307468663adbf",
    ),
    (b"Subject: only\n\nbody\n", "d41d8cd98f00b204e9800998ecf8427e"),
    (b"Date: crlf  \r\nReceived: r1\r\n  cont\r\n\r\nbody\r\n", "c99206e4eb908027cf18eec9fb3a651f"),
]


@pytest.mark.parametrize(("header", "expected"), _SEEN_BY_DOVECOT)
def test_header_md5_as_dovecot(header: bytes, expected: str) -> None:
    """The values Dovecot gave for the same messages."""
    assert header_md5(header) == expected


def test_header_md5_apop3d_rules() -> None:
    """
    The first Received (all its lines), Delivered-To and X-Delivery-ID
    always; Date and Message-ID only before any Received; values after the
    colon and one blank, without line ends.
    """

    def md5(*parts: bytes) -> str:
        return hashlib.md5(b"".join(parts)).hexdigest()

    assert header_md5(b"Date: d\nMessage-ID: <i>\nReceived: r\n") == md5(b"d", b"<i>", b"r")
    assert header_md5(b"Received: r\nDate: d\nMessage-ID: <i>\n") == md5(b"r")
    assert header_md5(b"Received: r\n  more\nReceived: s\n") == md5(b"r", b"  more")
    assert header_md5(b"Received: r\nDelivered-To: a\nX-Delivery-ID: 1\n") == md5(b"r", b"a", b"1")
    assert header_md5(b"DATE:  two blanks\n") == md5(b" two blanks")
    assert header_md5(b"Date: d\n\nReceived: in the body\n") == md5(b"d")
    assert header_md5(b"Date: d\r\n") == md5(b"d")
    assert header_md5(b"Date: d\r") == md5(b"d\r")  # no LF: the CR is content


def test_header_md5_all() -> None:
    """C{mbox_md5 = all}: every header but Dovecot's own."""
    header = b"Subject: s\nX-UID: 4\nStatus: RO\nFrom: f\n  folded\nno colon\n\nbody\n"
    expected = hashlib.md5(b"s" + b"f" + b"  folded").hexdigest()
    assert header_md5(header, backend="all") == expected
    with pytest.raises(ValueError, match="unknown mbox_md5"):
        header_md5(header, backend="some")


_HEADER_LINES = st.lists(
    st.sampled_from(
        [
            b"Received: from a by b\n",
            b"Received: from c\n\tby d\n",
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n",
            b"Message-ID: <x@y>\n",
            b"Delivered-To: alice@example.org\n",
            b"X-Delivery-ID: 1234\n",
            b"Subject: hello\n",
            b"From: someone\n",
        ]
    ),
    max_size=10,
)
_METADATA_LINES = st.lists(
    st.sampled_from(
        [
            b"X-IMAPbase: 1700000000 0000000012\n",
            b"X-UID: 12\n",
            b"Status: RO\n",
            b"X-Status: A\n",
            b"X-Keywords: $Forwarded\n",
            b"Content-Length: 42\n",
            b"X-IMAP: 1700000000 0000000012\n",
        ]
    ),
    max_size=6,
)


@settings(max_examples=300)
@given(_HEADER_LINES, _METADATA_LINES, st.randoms(use_true_random=False), st.binary(max_size=40))
def test_header_md5_ignores_metadata_and_body(
    lines: list[bytes], metadata: list[bytes], random: object, body: bytes
) -> None:
    """
    Dovecot's own headers, wherever it writes them, the line ends and the
    body leave the MD5 as it was: a rewrite by Dovecot keeps the UIDLs.
    """
    import random as random_module

    assert isinstance(random, random_module.Random)
    base = header_md5(b"".join(lines))
    mixed = list(lines)
    for line in metadata:
        mixed.insert(random.randint(0, len(mixed)), line)
    assert header_md5(b"".join(mixed)) == base
    assert header_md5(b"".join(mixed) + b"\n" + body) == base
    assert header_md5(b"".join(line.replace(b"\n", b"\r\n") for line in mixed)) == base
    assert header_md5(b"".join(lines), backend="all") == header_md5(b"".join(mixed), backend="all")
