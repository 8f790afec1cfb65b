"""
Tests for mbox files other mail servers wrote to: their metadata headers
hidden (L{pop3srv.mbox.scan}), the UW-IMAP/Dovecot pseudo-message never
served, and UIDLs taken over from them and kept (L{pop3srv.mbox.pins},
L{pop3srv.mbox.index}, L{pop3srv.mbox.mailbox.pin_uidls}).

The mbox files are written by hand the way those servers write them:
Dovecot adds C{X-IMAPbase} to the first message and C{X-UID}, C{Status},
C{X-Status}, C{X-Keywords} (padded) and C{Content-Length} at the end of
every header; UW-IMAP keeps its data in a first "FOLDER INTERNAL DATA"
message with C{X-IMAP}, and C{Status}, C{X-Status}, C{X-Keywords} and
C{X-UID} in every other.
"""

from __future__ import annotations

import hashlib
import io
import poplib
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server, write_users
from twisted.mail.pop3 import IMailbox

from pop3srv.app.tap import Options
from pop3srv.core.errors import MaildropInUse
from pop3srv.mbox import index as index_module
from pop3srv.mbox import mailbox as mailbox_module
from pop3srv.mbox import open_maildrop
from pop3srv.mbox import scan as scan_module
from pop3srv.mbox.index import RecordTable, read_index
from pop3srv.mbox.mailbox import MboxMailbox, pin_uidls
from pop3srv.mbox.paths import state_paths
from pop3srv.mbox.pins import looks_own, own_uidl
from pop3srv.mbox.scan import HIDDEN_HEADERS, MessageDigest, scan_mbox
from pop3srv.mbox.testing import reference_split, reference_unquote, synchronous_defer_to_thread
from pop3srv.mbox.uidlformat import DOVECOT_DEFAULT, UidlFormat

UIDVALIDITY = 1767225600
DOVECOT = UidlFormat.parse(DOVECOT_DEFAULT)

PSEUDO = (
    b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\n"
    b"Date: 01 Jan 2026 00:00:00 +0000\n"
    b"From: Mail System Internal Data <MAILER-DAEMON@mail.example.org>\n"
    b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
    b"Message-ID: <1767225600@mail.example.org>\n"
    b"X-IMAP: 1767225600 0000000004 $Junk NonJunk\n"
    b"Status: RO\n"
    b"\n"
    b"This text is part of the internal format of your mail folder, and is not\n"
    b"a real message.  It is created automatically by the mail system software.\n"
    b"If deleted, important folder data will be lost, and it will be re-created\n"
    b"with the data reset to initial values.\n"
    b"\n"
)


def _visible_header(n: int) -> bytes:
    return (
        b"Return-Path: <sender@example.org>\n"
        b"Received: from mx.example.org (mx.example.org [192.0.2.1])\n"
        b"\tby mail.example.org with ESMTP id %d; Thu, 1 Jan 2026 00:00:00 +0000\n"
        b"Date: Thu, 01 Jan 2026 00:00:%02d +0000\n"
        b"From: Sender <sender@example.org>\n"
        b"To: alice@example.org\n"
        b"Subject: message %d\n"
        b"Message-ID: <%d@example.org>\n" % (n, n, n, n)
    )


def _body(n: int) -> bytes:
    return b"Hello %d.\n>From the quoted line\n.a line with a dot\n" % (n,)


def dovecot_message(uid: int, *, first: bool = False, uid_last: int = 3) -> tuple[bytes, bytes]:
    """
    One message as Dovecot's mbox code leaves it.

    @return: the stored message (From_ line to separator) and what a client
        must be sent (without the dot-stuffing).
    """
    body = _body(uid)
    meta = b""
    if first:
        meta += b"X-IMAPbase: %d %010d $Junk\n" % (UIDVALIDITY, uid_last)
    meta += (
        b"X-UID: %d\nStatus: RO\nX-Status: A\nX-Keywords: $Junk" % (uid,)
        + b" " * 40
        + b"\nContent-Length: %d\n" % (len(body),)
    )
    stored = (
        b"From sender@example.org  Thu Jan  1 00:00:00 2026\n"
        + _visible_header(uid)
        + meta
        + b"\n"
        + body
        + b"\n"
    )
    return stored, _visible_header(uid) + b"\n" + reference_unquote(body)


def uw_message(uid: int) -> tuple[bytes, bytes]:
    """One message as UW-IMAP leaves it (its data in the pseudo-message)."""
    body = _body(uid)
    stored = (
        b"From sender@example.org Thu Jan  1 00:00:00 2026\n"
        + _visible_header(uid)[:-1]
        + b"\nStatus: RO\nX-Status: \nX-Keywords: $Junk\nX-UID: %d\n\n" % (uid,)
        + body
        + b"\n"
    )
    return stored, _visible_header(uid) + b"\n" + reference_unquote(body)


def plain_message(tag: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    """A message no other server touched, with header lines C{extra}."""
    header = b"Subject: %s\nMessage-ID: <%s@example.org>\n" % (tag, tag) + extra
    body = b"body of %s\n" % (tag,)
    return b"From x@example.org Thu Jan  1 00:00:00 2026\n" + header + b"\n" + body + b"\n", (
        header + b"\n" + body
    )


def wire_size(text: bytes) -> int:
    """Octets RETR sends for C{text} before the terminating dot."""
    if not text:
        return 0
    wire = re.sub(rb"(?<!\r)\n", b"\r\n", text)
    return len(wire) + (0 if wire.endswith(b"\n") else 2)


def dovecot_uidl(uid: int) -> bytes:
    """What Dovecot answers with C{pop3_uidl_format = %08Xu%08Xv}."""
    return b"%08x%08x" % (uid, UIDVALIDITY)


def _open(
    path: Path,
    fmt: UidlFormat | None = DOVECOT,
    *,
    provisional: bool = False,
    reuse_xuidl: bool | None = None,
) -> MboxMailbox:
    return open_maildrop(
        str(path),
        defer_to_thread=synchronous_defer_to_thread,
        uidl_format=fmt,
        provisional=provisional,
        **({} if reuse_xuidl is None else {"reuse_xuidl": reuse_xuidl}),
    )


def _contents(box: MboxMailbox) -> list[bytes]:
    sizes = box.listMessages()
    assert isinstance(sizes, list)
    return [box.getMessage(i).read() for i in range(len(sizes))]


def _uidls(
    path: Path, fmt: UidlFormat | None = DOVECOT, *, reuse_xuidl: bool | None = None
) -> list[bytes]:
    box = _open(path, fmt, reuse_xuidl=reuse_xuidl)
    try:
        return [box.getUidl(i) for i in range(len(box.listMessages()))]
    finally:
        box.close()


def _delete(path: Path, *numbers: int, fmt: UidlFormat | None = DOVECOT) -> None:
    box = _open(path, fmt)
    try:
        for i in numbers:
            box.deleteMessage(i)
        results: list[object] = []
        box.sync().addBoth(results.append)
        assert results == [None]
    finally:
        box.close()


@pytest.fixture
def dovecot_mbox(tmp_path: Path) -> tuple[Path, list[bytes], list[bytes]]:
    """An mbox Dovecot wrote to: three messages, UIDs 1 to 3."""
    pairs = [dovecot_message(1, first=True), dovecot_message(2), dovecot_message(3)]
    path = tmp_path / "alice"
    path.write_bytes(b"".join(stored for stored, _ in pairs))
    return path, [stored for stored, _ in pairs], [sent for _, sent in pairs]


@pytest.fixture
def uw_mbox(tmp_path: Path) -> tuple[Path, list[bytes], list[bytes]]:
    """An mbox UW-IMAP wrote to: the pseudo-message, then UIDs 1 to 3."""
    pairs = [uw_message(1), uw_message(2), uw_message(3)]
    path = tmp_path / "alice"
    path.write_bytes(PSEUDO + b"".join(stored for stored, _ in pairs))
    return path, [stored for stored, _ in pairs], [sent for _, sent in pairs]


def test_dovecot_mbox_served_as_dovecot_serves_it(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    RETR leaves out X-IMAPbase, X-UID, Status, X-Status, X-Keywords and
    Content-Length; LIST counts exactly what RETR sends; with
    C{%08Xu%08Xv} the UIDLs are Dovecot's.  Reading changes nothing on disk.
    """
    path, _, sent = dovecot_mbox
    before = path.read_bytes()
    box = _open(path)
    try:
        assert _contents(box) == sent
        assert box.listMessages() == [wire_size(text) for text in sent]
        assert [box.getUidl(i) for i in range(3)] == [dovecot_uidl(u) for u in (1, 2, 3)]
        # A small read size crosses the hidden ranges at every offset.
        reader = box.getMessage(0)
        assert b"".join(iter(lambda: reader.read(3), b"")) == sent[0]
    finally:
        box.close()
    assert path.read_bytes() == before


def test_pseudo_message_never_served_and_kept(
    uw_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    The FOLDER INTERNAL DATA message is not listed or counted; a commit
    that deletes other messages keeps it, and the file is the old one
    less the deleted messages, byte for byte.
    """
    path, stored, sent = uw_mbox
    box = _open(path)
    try:
        assert len(box.listMessages()) == 3
        assert _contents(box) == sent
        assert [box.getUidl(i) for i in range(3)] == [dovecot_uidl(u) for u in (1, 2, 3)]
        with pytest.raises(IndexError):
            box.getMessage(3)
    finally:
        box.close()
    _delete(path, 0, 2)
    assert path.read_bytes() == PSEUDO + stored[1]
    assert _uidls(path) == [dovecot_uidl(2)]
    _delete(path, 0)
    assert path.read_bytes() == PSEUDO
    assert _uidls(path) == []


def test_commit_deletes_only_what_was_deleted(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    Deleting the first message (the one with X-IMAPbase) removes exactly
    its bytes; the others keep their UIDLs, though the file no longer
    says its UIDVALIDITY.
    """
    path, stored, _ = dovecot_mbox
    _delete(path, 0)
    assert path.read_bytes() == stored[1] + stored[2]
    assert _uidls(path) == [dovecot_uidl(2), dovecot_uidl(3)]
    assert _uidls(path, None) == [dovecot_uidl(2), dovecot_uidl(3)]


def _session(srv: Pop3Server) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    client.user("alice")
    client.pass_(PASSWORDS["alice"])
    return client


def test_live_server(tmp_path: Path, uw_mbox: tuple[Path, list[bytes], list[bytes]]) -> None:
    """
    Over the real server with C{--uidl-format %08Xu%08Xv}: STAT, LIST,
    UIDL, RETR and TOP as Dovecot would answer them; DELE and QUIT remove
    just that message and keep the pseudo-message; the other UIDLs stay.
    """
    _, stored, sent = uw_mbox
    srv = Pop3Server(tmp_path, "--uidl-format", DOVECOT_DEFAULT)
    (srv.mail / "alice").write_bytes(PSEUDO + b"".join(stored))
    srv.start()
    try:
        client = _session(srv)
        count, total = client.stat()
        assert (count, total) == (3, sum(wire_size(text) for text in sent))
        _, listing, _ = client.list()
        sizes = [int(line.split()[1]) for line in listing]
        assert sizes == [wire_size(text) for text in sent]
        _, uidls, _ = client.uidl()
        assert [line.split()[1] for line in uidls] == [dovecot_uidl(u) for u in (1, 2, 3)]
        for i, text in enumerate(sent):
            _, lines, _ = client.retr(i + 1)
            assert b"".join(line + b"\n" for line in lines) == text
            # poplib counts each line's CRLF and undoes the dot-stuffing.
            assert sum(len(line) + 2 for line in lines) == sizes[i]
        _, top, _ = client.top(2, 0)
        assert b"".join(line + b"\n" for line in top) == _visible_header(2) + b"\n"
        client.dele(2)
        client.quit()
        assert (srv.mail / "alice").read_bytes() == PSEUDO + stored[0] + stored[2]
        client = _session(srv)
        _, uidls, _ = client.uidl()
        assert [line.split()[1] for line in uidls] == [dovecot_uidl(1), dovecot_uidl(3)]
        client.quit()
    finally:
        srv.stop()


def test_bad_uidl_format_is_one_line_error(tmp_path: Path) -> None:
    """A format Dovecot would refuse stops the server with one line."""
    users = tmp_path / "users"
    write_users(users)
    with pytest.raises(SystemExit, match=r": --uidl-format: uidl_format: unknown variable %q"):
        Options().parseOptions(["--uidl-format", "%q", "--auth", f"passlib:{users}"])
    options = Options()
    options.parseOptions(["--uidl-format", DOVECOT_DEFAULT, "--auth", f"passlib:{users}"])
    assert options["uidl_format"] == DOVECOT_DEFAULT


def test_x_uidl_reused(tmp_path: Path) -> None:
    """
    An X-UIDL (qpopper, Dovecot's pop3_reuse_xuidl) is the UIDL when reused:
    by default without a format, and with one if asked; one that is not a
    valid UIDL, or that an earlier message has, is passed over.
    """
    path = tmp_path / "qpopper"
    messages = [
        plain_message(b"a", b"X-UIDL: 3b5d1a2e0000001d\n"),
        plain_message(b"b", b"X-UIDL: has spaces in it\n"),
        plain_message(b"c", b"X-UIDL: 3b5d1a2e0000001d\n"),
        plain_message(b"d", b"X-UIDL:\t 88ab\r\n"),
    ]
    path.write_bytes(b"".join(stored for stored, _ in messages))
    for fmt, reuse in ((None, None), (None, True), (DOVECOT, True)):
        Path(state_paths(str(path)).index).unlink(missing_ok=True)
        uidls = _uidls(path, fmt, reuse_xuidl=reuse)
        assert uidls[0] == b"3b5d1a2e0000001d"
        assert uidls[3] == b"88ab"
        # Our own for the others (no X-UID, so the format cannot apply).
        box = _open(path, fmt, reuse_xuidl=reuse)
        try:
            records = box._index.records
            assert uidls[1] == own_uidl(records[1].digest, 0)
            assert uidls[2] == own_uidl(records[2].digest, 0)
            # X-UIDL is not hidden: Dovecot sends it too.
            assert _contents(box) == [sent for _, sent in messages]
        finally:
            box.close()


def test_messages_without_the_headers_get_our_own(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    A message delivered after the move, with no X-UID, gets our own UIDL
    and keeps it; so does one whose X-UID a sender forged (above the next
    free UID, or not above the one before).
    """
    path, _, _ = dovecot_mbox
    first = _uidls(path)
    new, _ = plain_message(b"new")
    forged_high, _ = plain_message(b"high", b"X-UID: 1000\n")
    forged_low, _ = plain_message(b"low", b"X-UID: 2\n")
    with path.open("ab") as f:
        f.write(new + forged_high + forged_low)
    uidls = _uidls(path)
    assert uidls[:3] == first
    for uidl in uidls[3:]:
        assert re.fullmatch(rb"[0-9a-f]{24}", uidl)
    assert _uidls(path) == uidls
    assert len(set(uidls)) == len(uidls)


def test_next_uid_from_dovecot_is_believed(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    A message Dovecot appended with the next free UID (its deliver agent
    while both servers run) gets Dovecot's UIDL, even when only the
    appended part is scanned.
    """
    path, _, _ = dovecot_mbox
    _uidls(path)
    stored, _ = dovecot_message(4)
    with path.open("ab") as f:
        f.write(stored)
    box = _open(path)
    try:
        assert box._index.scanned_from is not None and box._index.scanned_from > 0
        assert box.getUidl(3) == dovecot_uidl(4)
    finally:
        box.close()


def test_served_uidl_never_changes(
    tmp_path: Path, dovecot_mbox: tuple[Path, list[bytes], list[bytes]]
) -> None:
    """
    Once a session has shown a UIDL, a later format says nothing about
    that message: our own stay ours after C{--uidl-format} is set, and
    Dovecot's stay Dovecot's after it is changed or removed, through
    commits and a full rescan after another program's rewrite.
    """
    path, stored, _ = dovecot_mbox
    own = _uidls(path, None)
    assert _uidls(path, DOVECOT) == own
    stored4, _ = dovecot_message(4)
    with path.open("ab") as f:
        f.write(stored4)
    uidls = _uidls(path, DOVECOT)
    assert uidls == [*own, dovecot_uidl(4)]
    assert _uidls(path, UidlFormat.parse("%u")) == uidls
    assert _uidls(path, None) == uidls

    other = tmp_path / "other"
    other.write_bytes(b"".join(stored) + stored4)
    served = _uidls(other, DOVECOT)
    assert served == [dovecot_uidl(u) for u in (1, 2, 3, 4)]
    _delete(other, 1, fmt=None)
    assert _uidls(other, None) == [served[0], *served[2:]]
    # Another program removes message 3 (the index no longer fits): a
    # full rescan finds the others again by their digests.
    other.write_bytes(stored[0] + stored4)
    assert _uidls(other, UidlFormat.parse("x%um")) == [served[0], served[3]]


def _legacy_index(path: Path) -> bytes:
    """The index an earlier pop3srv (index version 1) wrote for C{path}."""
    data = path.read_bytes()
    st = path.stat()
    records = b""
    for start, body_start, end, nxt in reference_split(data):
        digest = hashlib.blake2b(data[start:nxt], digest_size=12).digest()
        records += struct.pack("<QQQQ12sI", start, body_start, end, end - body_start, digest, 0)
    head = hashlib.blake2b(data[:4096], digest_size=16).digest()
    tail = hashlib.blake2b(data[-4096:], digest_size=16).digest()
    body = (
        struct.pack(
            "<8sIIQQQq16s16sQQ",
            b"P3MBXIDX",
            1,
            0,
            st.st_dev,
            st.st_ino,
            len(data),
            st.st_mtime_ns,
            head,
            tail,
            len(records) // 48,
            0,
        )
        + records
    )
    return body + hashlib.blake2b(body, digest_size=16).digest()


def test_index_of_earlier_version_keeps_its_uidls(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    An index an earlier pop3srv wrote is rebuilt (sizes now leave the
    hidden headers out) and the UIDLs it served are kept, whatever the
    format now says; a message it did not know gets the format's.
    """
    path, _, sent = dovecot_mbox
    Path(state_paths(str(path)).index).write_bytes(_legacy_index(path))
    legacy = read_index(state_paths(str(path)).index)
    assert legacy is not None and legacy.legacy
    stored4, sent4 = dovecot_message(4)
    with path.open("ab") as f:
        f.write(stored4)
    box = _open(path)
    try:
        assert box._index.scanned_from == 0
        uidls = [box.getUidl(i) for i in range(4)]
        assert uidls[:3] == [own_uidl(r.digest, 0) for r in legacy.records]
        assert uidls[3] == dovecot_uidl(4)
        assert box.listMessages() == [wire_size(text) for text in [*sent, sent4]]
    finally:
        box.close()
    index = read_index(state_paths(str(path)).index)
    assert index is not None and not index.legacy


def _v2_index(path: Path, pins: dict[int, bytes], uid_state: tuple[int, int, int]) -> bytes:
    """
    The index pop3srv's previous release (index version 2) wrote for
    C{path}: digests of every byte of a message, hidden ranges and pinned
    UIDLs in extras of its own layout.
    """
    data = path.read_bytes()
    st = path.stat()
    records = extras = b""
    messages = [r for r in scan_mbox(io.BytesIO(data), raw_digest=True) if not _pseudo(r)]
    for n, r in enumerate(messages):
        ref = 0
        if r.hidden or n in pins:
            ref = len(extras) + 1
            extras += struct.pack("<BH", 1 if n in pins else 0, len(r.hidden))
            extras += b"".join(struct.pack("<II", *h) for h in r.hidden)
            if n in pins:
                extras += bytes([len(pins[n])]) + pins[n]
        assert r.raw_digest is not None
        fields = (r.start, r.body_start, r.end, r.size, r.raw_digest, 0, ref)
        records += struct.pack("<QQQQ12sIQ", *fields)
    head = hashlib.blake2b(data[:4096], digest_size=16).digest()
    tail = hashlib.blake2b(data[-4096:], digest_size=16).digest()
    header = struct.pack(
        "<8sIIQQQq16s16sQQIIIQ",
        b"P3MBXIDX", 2, 0, st.st_dev, st.st_ino, len(data), st.st_mtime_ns, head, tail,
        len(messages), 0, *uid_state, len(extras),
    )  # fmt: skip
    body = header + records + extras
    return body + hashlib.blake2b(body, digest_size=16).digest()


def _pseudo(record: scan_module.MessageRecord) -> bool:
    return record.meta is not None and record.meta.pseudo


def test_index_of_version_2_keeps_its_uidls(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    An index of the previous release (digests of every byte) is rescanned
    once, and every UIDL it served is kept: our own of messages with
    hidden headers (kept as strings: their digests are not what they were)
    and of those without (the same digest, nothing to keep), and pinned
    ones.  From then on a metadata rewrite changes none of them.
    """
    path, _, _ = dovecot_mbox
    plain, _ = plain_message(b"plain")
    with path.open("ab") as f:
        f.write(plain)
    raw = [r.raw_digest or b"" for r in scan_mbox(io.BytesIO(path.read_bytes()), raw_digest=True)]
    assert all(raw)
    index_path = Path(state_paths(str(path)).index)
    index_path.write_bytes(_v2_index(path, {1: dovecot_uidl(2)}, (UIDVALIDITY, 4, 3)))
    legacy = read_index(str(index_path))
    assert legacy is not None and legacy.legacy
    served = [own_uidl(raw[0], 0), dovecot_uidl(2), own_uidl(raw[2], 0), own_uidl(raw[3], 0)]
    assert _uidls(path) == served
    index = _open_index(path)
    assert not index.legacy and index.next_uid == 5
    # The plain message's UIDL is its digest's still: nothing pinned.
    assert RecordTable.pack(index.records)[3].pinned is None
    _rewrite(path, b"X-UID: 1\nStatus: RO\n", b"X-UID: 1\nStatus: O\n")
    _rewrite(path, b"X-UID: 3\nStatus: RO\n", b"X-UID: 3\n")
    assert _uidls(path) == served
    stored5, _ = dovecot_message(5)
    with path.open("ab") as f:
        f.write(stored5)
    assert _uidls(path) == [*served, dovecot_uidl(5)]


def test_index_of_version_2_then_copies(tmp_path: Path) -> None:
    """
    Two new messages that differ only in hidden headers (a copy Dovecot
    touched, one it did not) get different UIDLs in the rescan that
    replaces an index of the previous release.
    """
    path = tmp_path / "mbox"
    old, _ = plain_message(b"old")
    path.write_bytes(old)
    Path(state_paths(str(path)).index).write_bytes(_v2_index(path, {}, (0, 1, 0)))
    copy, _ = plain_message(b"copy")
    touched = copy.replace(b"\n\n", b"\nStatus: RO\n\n", 1)
    with path.open("ab") as f:
        f.write(touched + copy)
    uidls = _uidls(path, None)
    assert len(set(uidls)) == 3
    assert uidls[2] == own_uidl(hashlib.blake2b(copy, digest_size=12).digest(), 1)


def test_pin_uidls(tmp_path: Path, dovecot_mbox: tuple[Path, list[bytes], list[bytes]]) -> None:
    """
    Pinned UIDLs are served from then on, through format changes, commits
    and rescans; messages not pinned get the server's format at its next
    open (pinning decides nothing else); bad pins change nothing.
    """
    path, stored, _ = dovecot_mbox
    pin_uidls(str(path), {0: b"imported-1", 2: b"imported-3"})
    index = read_index(state_paths(str(path)).index)
    assert index is not None and RecordTable.pack(index.records).undecided
    assert _uidls(path) == [b"imported-1", dovecot_uidl(2), b"imported-3"]
    assert _uidls(path, None) == [b"imported-1", dovecot_uidl(2), b"imported-3"]

    with pytest.raises(ValueError, match="messages 1 and 2 would both have the UIDL imported-1"):
        pin_uidls(str(path), {1: b"imported-1"})
    with pytest.raises(ValueError, match="not a valid UIDL"):
        pin_uidls(str(path), {1: b"two words"})
    with pytest.raises(IndexError):
        pin_uidls(str(path), {3: b"x"})
    assert _uidls(path) == [b"imported-1", dovecot_uidl(2), b"imported-3"]

    box = _open(path)
    try:
        with pytest.raises(MaildropInUse):
            pin_uidls(str(path), {1: b"x"})
    finally:
        box.close()

    _delete(path, 1)
    assert _uidls(path) == [b"imported-1", b"imported-3"]
    assert RecordTable.pack(_open_index(path).records).pinned_uidls() == {
        b"imported-1",
        b"imported-3",
    }
    # Another program's rewrite: the pins follow their messages.
    path.write_bytes(stored[2] + stored[0])
    assert _uidls(path, None) == [b"imported-3", b"imported-1"]


def _open_index(path: Path) -> index_module.MboxIndex:
    index = read_index(state_paths(str(path)).index)
    assert index is not None
    return index


def test_pins_in_one_session(dovecot_mbox: tuple[Path, list[bytes], list[bytes]]) -> None:
    """
    A tool can read the messages and pin in one session: a provisional
    open shows what the format would give without deciding it.
    """
    path, _, sent = dovecot_mbox
    box = _open(path, UidlFormat.parse("%u"), provisional=True)
    try:
        assert [box.getUidl(i) for i in range(3)] == [b"1", b"2", b"3"]
        assert _contents(box) == sent
        box.pin_uidls({1: b"kept-2"})
        assert box.getUidl(1) == b"kept-2"
    finally:
        box.close()
    assert _uidls(path) == [dovecot_uidl(1), b"kept-2", dovecot_uidl(3)]


def test_pins_of_gone_messages_are_retired(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    The records hold the UIDLs of the messages in the file; those of the
    messages deleted are kept apart, retired.
    """
    path, _, _ = dovecot_mbox
    assert len(_uidls(path)) == 3
    _delete(path, 0, 1)
    index = _open_index(path)
    table = RecordTable.pack(index.records)
    assert table.pinned_uidls() == {dovecot_uidl(3)}
    assert dovecot_uidl(1) not in table.extras and dovecot_uidl(2) not in table.extras
    assert index.retired_pins == [dovecot_uidl(1), dovecot_uidl(2)]


def test_header_beyond_the_read_bound_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Lines of a header beyond L{scan.MAX_HEADER} are sent as they are, and
    the size still counts what is sent.
    """
    monkeypatch.setattr(scan_module, "MAX_HEADER", 64)
    header = b"Status: RO\n" + b"X-Filler: " + b"y" * 60 + b"\nStatus: O\n"
    path = tmp_path / "long"
    data = b"From a\n" + header + b"\nbody\n"
    path.write_bytes(data)
    # The same whether the header arrives whole or in pieces.
    whole = list(scan_mbox(io.BytesIO(data)))
    for chunk_size in (1, 5, 63, 64, 65, 100):
        assert list(scan_mbox(io.BytesIO(data), chunk_size=chunk_size)) == whole
    box = _open(path)
    try:
        (text,) = _contents(box)
        assert text == header[len(b"Status: RO\n") :] + b"\nbody\n"
        assert box.listMessages() == [wire_size(text)]
    finally:
        box.close()
    # A header that ends at the bound, or just past it, reads the same in
    # chunks of any size, after another message or not.
    for length in range(56, 72):
        field = b"Status: " + b"o" * (length - len(b"Status: \n")) + b"\n"
        alone = b"From a\n" + field + b"\nbody\n"
        for mbox in (alone, alone + b"From b\n" + field + b"\nb\n"):
            whole = list(scan_mbox(io.BytesIO(mbox)))
            for chunk_size in range(1, 12):
                assert list(scan_mbox(io.BytesIO(mbox), chunk_size=chunk_size)) == whole


# --- property: RETR is the message less its metadata fields ----------------

_NAMES = st.sampled_from(
    [
        b"X-IMAPbase",
        b"x-imap",
        b"X-UID",
        b"x-uidl",
        b"Status",
        b"STATUS",
        b"X-Status",
        b"X-Keywords",
        b"Content-Length",
        b"Subject",
        b"X-UIDx",
        b"X-Statuses",
        b"Status-Line",
        b">From",
    ]
)
_VALUES = st.sampled_from([b"", b" RO", b" 12", b" 1767225600 0000000004", b"\t$Junk  ", b" a:b"])
_EOLS = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def _header_line(draw: st.DrawFn) -> bytes:
    name = draw(_NAMES)
    # X-IMAP with a valid value would make a first message the pseudo-
    # message, which the reference below does not model.
    value = b" junk" if name.lower() == b"x-imap" else draw(_VALUES)
    line = name + draw(st.sampled_from([b"", b" ", b"\t "])) + b":" + value + draw(_EOLS)
    for _ in range(draw(st.integers(0, 2))):
        line += draw(st.sampled_from([b" ", b"\t"])) + b"continued" + draw(_EOLS)
    return line


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    header = b"".join(draw(st.lists(_header_line(), max_size=8)))
    if draw(st.booleans()):
        # No empty line: the whole message is its header.
        return header
    lines = st.sampled_from([b"Status: RO\n", b">From x\n", b"body\r\n", b"\n"])
    body = b"".join(draw(st.lists(lines, max_size=5)))
    return header + draw(_EOLS) + body


def reference_visible(content: bytes) -> bytes:
    """
    What a client gets of a stored message content, the obvious way: the
    header lines (up to the first empty line) of a hidden field and their
    continuation lines dropped, then mboxrd un-quoting.
    """
    return reference_unquote(reference_unhidden(content))


def reference_unhidden(content: bytes) -> bytes:
    """C{content} less its hidden fields, still quoted."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+", content)
    out = []
    in_header = True
    hiding = False
    for line in lines:
        if in_header and line in (b"\n", b"\r\n"):
            in_header = False
        if in_header:
            if line[:1] in (b" ", b"\t"):
                if hiding:
                    continue
            else:
                name = line.split(b":", 1)[0].rstrip(b" \t").lower() if b":" in line else None
                hiding = name in HIDDEN_HEADERS
                if hiding:
                    continue
        out.append(line)
    return b"".join(out)


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(_message(), min_size=1, max_size=4),
    st.integers(1, 40),
    st.integers(1, 9),
    st.integers(1, 7),
)
def test_retr_is_the_message_less_its_metadata(
    tmp_path: Path, messages: list[bytes], chunk_size: int, read_chunk: int, read_size: int
) -> None:
    """
    For random headers with hidden and ordinary fields (any case, blanks
    before the colon, continuation lines, CRLF or LF, no empty line at
    all), RETR sends the message less those fields and LIST counts it
    exactly; scanning in chunks of any size finds the same.  The digest is
    of the message's bytes less those fields, however they are fed; the
    raw digest of all of them.
    """
    data = b"".join(b"From a@example.org Thu Jan  1 00:00:00 2026\n" + m for m in messages)
    split = reference_split(data)
    expected = [reference_visible(data[begin:end]) for _, begin, end, _ in split]
    whole = list(scan_mbox(io.BytesIO(data)))
    assert list(scan_mbox(io.BytesIO(data), chunk_size=chunk_size)) == whole
    raw = list(scan_mbox(io.BytesIO(data), chunk_size=chunk_size, raw_digest=True))
    for record, rawer, (start, begin, _, nxt) in zip(whole, raw, split, strict=True):
        unhidden = data[start:begin] + reference_unhidden(data[begin:nxt])
        assert record.digest == hashlib.blake2b(unhidden, digest_size=12).digest()
        assert rawer.raw_digest == hashlib.blake2b(data[start:nxt], digest_size=12).digest()
        assert rawer.digest == record.digest
        fed = MessageDigest(record.start, record.body_start, record.hidden)
        for at in range(start, nxt, read_size):
            fed.update(data[at : min(at + read_size, nxt)])
        assert fed.digest() == record.digest
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    path = work / "mbox"
    path.write_bytes(data)
    saved = mailbox_module.READ_CHUNK
    mailbox_module.READ_CHUNK = read_chunk
    try:
        box = _open(path, None)
        try:
            got = []
            for i in range(len(expected)):
                reader = box.getMessage(i)
                got.append(b"".join(iter(lambda r=reader: r.read(read_size), b"")))  # type: ignore[misc]
            assert got == expected
            assert box.listMessages() == [wire_size(text) for text in expected]
        finally:
            box.close()
    finally:
        mailbox_module.READ_CHUNK = saved
    assert path.read_bytes() == data


def test_scanner_reads_uw_and_dovecot_metadata() -> None:
    """The values a UIDL is made of, as the scanner reports them."""
    stored1, _ = dovecot_message(1, first=True)
    stored2, _ = dovecot_message(2)
    records = list(scan_mbox(io.BytesIO(PSEUDO + stored1 + stored2)))
    pseudo, first, second = (r.meta for r in records)
    assert pseudo is not None and pseudo.pseudo and pseudo.uidvalidity == UIDVALIDITY
    assert pseudo.uid_last == 4
    # X-IMAPbase counts only in the file's first message.
    assert first is not None and first.uidvalidity == 0 and first.uids == (1,)
    assert second is not None and second.uids == (2,) and not second.pseudo
    for eol in (b"\n", b"\r\n"):
        records = list(scan_mbox(io.BytesIO(stored1.replace(b"\n", eol))))
        (only,) = (r.meta for r in records)
        assert only is not None
        assert (only.uidvalidity, only.uid_last, only.uids) == (UIDVALIDITY, 3, (1,))
    # Broken values are not believed: UIDVALIDITY 0, a tab where Dovecot
    # wants a space (and the X-UID after it then counts for nothing), an
    # X-UID with more than digits.
    for broken in (b"X-IMAPbase: 0 0000000003", b"X-IMAPbase: 1767225600\t0000000003"):
        (record,) = scan_mbox(
            io.BytesIO(stored1.replace(b"X-IMAPbase: 1767225600 0000000003", broken))
        )
        assert record.meta is None
    (record,) = scan_mbox(io.BytesIO(stored2.replace(b"X-UID: 2", b"X-UID: 2a")))
    assert record.meta is None


def _iter_uidls(box: MboxMailbox) -> Iterator[bytes]:
    for i in range(len(box.listMessages())):
        yield box.getUidl(i)


def test_header_md5_format(tmp_path: Path) -> None:
    """C{%m} is Dovecot's header MD5, computed only when a format needs it."""
    from pop3srv.mbox.uidlformat import header_md5

    stored, _ = plain_message(b"m")
    path = tmp_path / "md5"
    path.write_bytes(stored)
    header = stored.split(b"\n", 1)[1].split(b"\n\n", 1)[0] + b"\n"
    box = _open(path, UidlFormat.parse("%m"))
    try:
        assert list(_iter_uidls(box)) == [header_md5(header).encode()]
    finally:
        box.close()


def test_imported_uidl_shaped_like_our_own(tmp_path: Path) -> None:
    """
    If an import pinned a UIDL that is our own UIDL of a message that
    arrives later, that message gets another of ours: UIDLs stay unique.
    """
    first, _ = plain_message(b"first")
    later, _ = plain_message(b"later")
    path = tmp_path / "mbox"
    path.write_bytes(first)
    later_own = own_uidl(hashlib.blake2b(later, digest_size=12).digest(), 0)
    pin_uidls(str(path), {0: later_own})
    with path.open("ab") as f:
        f.write(later)
    uidls = _uidls(path)
    assert uidls == [later_own, later_own + b".1"]
    assert _uidls(path, None) == uidls


# --- what senders and other programs can do to the file --------------------------


def _served(path: Path, fmt: UidlFormat | None = DOVECOT) -> list[tuple[bytes, int, bytes]]:
    """Each message's UIDL, LIST size and text, as a session sees them."""
    box = _open(path, fmt)
    try:
        sizes = box.listMessages()
        return [(box.getUidl(i), size, box.getMessage(i).read()) for i, size in enumerate(sizes)]
    finally:
        box.close()


def test_a_header_of_many_hidden_runs_is_sent_as_it_is(tmp_path: Path) -> None:
    """
    One inbound message whose header has 70000 Status lines between other
    lines (more separate hidden runs than any mail store writes) is sent as
    it is, and the maildrop opens, again and again, from a stored index:
    one message never makes the others unreachable.
    """
    good, good_text = plain_message(b"good")
    evil_text = b"From: x@example.net\nSubject: hi\n" + b"Status:\na\n" * 70000 + b"\nbody\n"
    path = tmp_path / "bob"
    path.write_bytes(good + b"From x Thu Jan  1 00:00:00 2026\n" + evil_text + b"\n" + good)
    texts = [good_text, evil_text, good_text]
    for _ in range(2):
        served = _served(path, None)
        assert [text for _, _, text in served] == texts
        assert [size for _, size, _ in served] == [wire_size(t) for t in texts]
    index = read_index(state_paths(str(path)).index)
    assert index is not None and len(index.records) == 3
    # Up to the limit, the runs are hidden.
    limit = scan_module.MAX_HIDDEN_RUNS
    for runs, hidden in ((limit, limit), (limit + 1, 0)):
        header = b"Subject: s\n" + b"Status: O\nX-Other: a\n" * runs + b"\nbody\n"
        (record,) = scan_mbox(io.BytesIO(b"From x\n" + header))
        assert len(record.hidden) == hidden


def test_uids_past_32_bits(tmp_path: Path) -> None:
    """
    An X-IMAPbase whose next UID would not fit in 32 bits (a sender can
    write one into the first message of an empty file): no message has a
    UID, so all get our own UIDLs, and the index is stored as usual.
    """
    first, _ = plain_message(b"a", b"X-IMAPbase: 5 4294967295\nX-UID: 4294967295\n")
    second, _ = plain_message(b"b", b"X-UID: 1\n")
    path = tmp_path / "bob"
    path.write_bytes(first + second)
    for _ in range(2):
        uidls = _uidls(path)
        assert len(uidls) == 2 and all(looks_own(u) for u in uidls)
    index = read_index(state_paths(str(path)).index)
    assert index is not None and index.next_uid == 1 << 32
    third, _ = plain_message(b"c", b"X-UID: 4294967295\n")
    with path.open("ab") as f:
        f.write(third)
    assert _uidls(path)[:2] == uidls
    assert looks_own(_uidls(path)[2])


def test_an_index_that_cannot_be_stored_is_no_failure(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    log_events: list[dict[str, object]],
) -> None:
    """
    If an index cannot be encoded, the maildrop is served all the same
    (rescanned at each open) and the reason is logged once.
    """
    path, _, sent = dovecot_mbox
    monkeypatch.setattr(index_module, "VERSION", 1 << 40)
    for _ in range(3):
        box = _open(path)
        try:
            assert _contents(box) == sent
            assert box._index.scanned_from == 0
        finally:
            box.close()
    assert not Path(state_paths(str(path)).index).exists()
    told = [e for e in log_events if "Cannot store the index" in str(e.get("log_format"))]
    assert len(told) == 1


def _rewrite(path: Path, old: bytes, new: bytes) -> None:
    """Another program's rewrite of the file (a new inode, as Dovecot's)."""
    data = path.read_bytes()
    assert old in data
    path.unlink()
    path.write_bytes(data.replace(old, new, 1))


def test_metadata_rewrites_keep_the_uidls(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    Dovecot or a mail reader rewriting its headers (Status O to RO, X-UID
    added, X-IMAPbase's next UID raised, keywords) changes no UIDL: not
    those of the format, and not our own either.
    """
    path, _, _ = dovecot_mbox
    uidls = _uidls(path)
    for old, new in [
        (b"X-UID: 2\nStatus: RO\n", b"X-UID: 2\nStatus: O\n"),
        (b"X-IMAPbase: %d 0000000003" % UIDVALIDITY, b"X-IMAPbase: %d 0000000009" % UIDVALIDITY),
        (b"X-Keywords: $Junk", b"X-Keywords: $Junk NonJunk"),
    ]:
        _rewrite(path, old, new)
        assert _uidls(path) == uidls

    own = path.with_name("own")
    messages = [plain_message(b"one")[0], plain_message(b"two")[0]]
    own.write_bytes(b"".join(messages))
    served = _uidls(own, None)
    # Dovecot (or mutt) writes its headers into both messages.
    own.unlink()
    own.write_bytes(
        b"".join(
            m.replace(b"\n\n", b"\nStatus: RO\nX-UID: %d\nContent-Length: 12\n\n" % n, 1)
            for n, m in enumerate(messages, 1)
        )
    )
    assert _uidls(own, DOVECOT) == served


def test_a_rewritten_message_keeps_its_pinned_uidl(tmp_path: Path) -> None:
    """
    A message whose bytes another program changed beyond its metadata (a
    header added by a filter) is new by its digest, but the UIDL its
    format or X-UIDL gives is the one it had: it keeps it.  A new message
    that claims the UIDL of one still in the file does not get it.
    """
    path = tmp_path / "mbox"
    first, _ = dovecot_message(1, first=True)
    second, _ = dovecot_message(2)
    path.write_bytes(first + second)
    uidls = _uidls(path)
    assert uidls == [dovecot_uidl(1), dovecot_uidl(2)]
    _rewrite(path, b"Subject: message 2\n", b"Subject: message 2\nX-Spam-Flag: NO\n")
    assert _uidls(path) == uidls

    qpopper = tmp_path / "qpopper"
    kept, _ = plain_message(b"kept", b"X-UIDL: kept-1\n")
    qpopper.write_bytes(kept)
    assert _uidls(qpopper, None) == [b"kept-1"]
    forged, _ = plain_message(b"forged", b"X-UIDL: kept-1\n")
    qpopper.unlink()
    qpopper.write_bytes(forged + kept)
    uidls = _uidls(qpopper, None)
    assert uidls[1] == b"kept-1" and looks_own(uidls[0])
    # The forged one's UIDL is decided for good.
    assert _uidls(qpopper, None) == uidls


def test_reuse_of_x_uidl_as_configured(tmp_path: Path) -> None:
    """
    By default an X-UIDL gives the UIDL only without a format (qpopper);
    with one, as Dovecot's pop3_reuse_xuidl = no, the format's UIDL is
    served; either can be asked for.
    """
    path = tmp_path / "mbox"
    first, _ = dovecot_message(1, first=True)
    path.write_bytes(first.replace(b"X-UID: 1\n", b"X-UID: 1\nX-UIDL: qp-1\n"))
    cases: list[tuple[UidlFormat | None, bool | None, bytes | None]] = [
        (DOVECOT, None, dovecot_uidl(1)),
        (DOVECOT, False, dovecot_uidl(1)),
        (DOVECOT, True, b"qp-1"),
        (None, None, b"qp-1"),
        (None, True, b"qp-1"),
        (None, False, None),
    ]
    for fmt, reuse, expected in cases:
        Path(state_paths(str(path)).index).unlink(missing_ok=True)
        (uidl,) = _uidls(path, fmt, reuse_xuidl=reuse)
        assert uidl == expected if expected is not None else looks_own(uidl)


def test_reuse_xuidl_setting(tmp_path: Path) -> None:
    """--reuse-xuidl takes auto, yes or no, and reaches the maildrop."""
    from pop3srv.auth.realm import MboxRealm

    users = tmp_path / "users"
    write_users(users)
    with pytest.raises(SystemExit, match=r"reuse_xuidl must be one of auto, yes, no"):
        Options().parseOptions(["--reuse-xuidl", "maybe", "--auth", f"passlib:{users}"])
    options = Options()
    options.parseOptions(["--auth", f"passlib:{users}"])
    assert options["reuse_xuidl"] == "auto"
    (tmp_path / "mail").mkdir()
    stored, _ = dovecot_message(1, first=True)
    (tmp_path / "mail" / "alice").write_bytes(
        stored.replace(b"X-UID: 1\n", b"X-UID: 1\nX-UIDL: qp-1\n")
    )
    for reuse, expected in ((True, b"qp-1"), (None, b"x1")):
        for name in (tmp_path / "mail").glob(".alice.*"):
            name.unlink()
        realm = MboxRealm(
            f"{tmp_path}/mail/{{user}}",
            defer_to_thread=synchronous_defer_to_thread,
            uidl_format="x%u",
            reuse_xuidl=reuse,
        )
        results: list[tuple[object, MboxMailbox, object]] = []
        realm.requestAvatar(b"alice", None, IMailbox).addCallback(results.append)
        ((_, box, _),) = results
        try:
            assert box.getUidl(0) == expected
        finally:
            box.close()


def test_x_imap_without_the_signature_is_mail(tmp_path: Path) -> None:
    """
    Only the first message with X-IMAP and UW's and Dovecot's subject is
    their internal-data message: one that a sender gave an X-IMAP field
    (the first delivery to an empty file) is mail, served (less the field)
    and counted; its X-IMAP gives no UIDVALIDITY.
    """
    evil = b"From: attacker@example.net\nSubject: hello\nX-IMAP: 1 99\n\nyou will never see me\n"
    real, real_text = plain_message(b"real")
    path = tmp_path / "bob"
    path.write_bytes(b"From a@b Thu Jan  1 00:00:00 2026\n" + evil + b"\n" + real)
    served = _served(path, UidlFormat.parse("%v-%u"))
    assert [text for _, _, text in served] == [
        evil.replace(b"X-IMAP: 1 99\n", b""),
        real_text,
    ]
    assert all(looks_own(uidl) for uidl, _, _ in served)
    # With the subject, it is theirs.
    pseudo = PSEUDO.replace(b"X-IMAP: 1767225600 0000000004", b"X-IMAP: 1 99")
    uw, uw_text = uw_message(100)
    other = tmp_path / "uw"
    other.write_bytes(pseudo + uw)
    assert _served(other, UidlFormat.parse("%v-%u")) == [(b"1-100", wire_size(uw_text), uw_text)]
    records = list(scan_mbox(io.BytesIO(PSEUDO.replace(b"Subject: DON'T", b"Subject: Do"))))
    assert records[0].meta is None or not records[0].meta.pseudo


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_a_final_newline_added_keeps_the_uidl(tmp_path: Path, eol: bytes) -> None:
    """
    The last message lacks its final newline (another MDA, an editor);
    a delivery adds it before the next message, or a blank line after a
    message that had one: what the last message sends is the same, and so
    is its UIDL, own or pinned, through the next commit.
    """

    def listed(path: Path) -> list[tuple[bytes, int]]:
        return [(uidl, size) for uidl, size, _ in _served(path, None)]

    path = tmp_path / "mbox"
    one = b"From a Thu Jan  1 00:00:00 2026" + eol + b"Subject: 1" + eol + eol + b"one" + eol + eol
    two = b"From a Thu Jan  1 00:00:00 2026" + eol + b"Subject: 2" + eol + eol + b"two"
    three = b"From b Thu Jan  1 00:00:00 2026" + eol + b"Subject: 3" + eol + eol + b"three" + eol
    path.write_bytes(one + two)
    before = listed(path)
    with path.open("ab") as f:
        f.write(eol + three)
    box = _open(path, None)
    try:
        assert box._index.scanned_from == len(one)
        assert box.getMessage(1).read() == b"Subject: 2" + eol + eol + b"two" + eol
    finally:
        box.close()
    assert listed(path)[:2] == before
    _delete(path, 0, fmt=None)
    assert listed(path)[0] == before[1]

    pinned = tmp_path / "pinned"
    pinned.write_bytes(one + two.replace(b"Subject: 2", b"Subject: 2" + eol + b"X-UIDL: two"))
    uidls = listed(pinned)
    assert uidls[1][0] == b"two"
    with pinned.open("ab") as f:
        f.write(eol + eol + three)
    assert listed(pinned)[:2] == uidls
    # A blank line after a message that ends with a newline is a separator.
    ends = tmp_path / "ends"
    ends.write_bytes(one + two + eol)
    uidls = listed(ends)
    with ends.open("ab") as f:
        f.write(eol + three)
    assert listed(ends)[:2] == uidls


def test_a_grown_last_message_is_not_the_same(tmp_path: Path) -> None:
    """More text after the last message's end is a change: a rescan."""
    path = tmp_path / "mbox"
    one, _ = plain_message(b"one")
    path.write_bytes(one + b"From a\nSubject: 2\n\ntwo")
    uidls = _uidls(path, None)
    with path.open("ab") as f:
        f.write(b" and more\n")
    box = _open(path, None)
    try:
        assert box._index.scanned_from == 0
        assert box.getUidl(0) == uidls[0] and box.getUidl(1) != uidls[1]
    finally:
        box.close()


def test_pinned_uidls_of_deleted_messages_are_never_given_again(tmp_path: Path) -> None:
    """
    A message with X-UIDL abc is deleted; a different message with X-UIDL
    abc arriving later gets our own (a client that kept abc would never
    fetch it); so does one after another program removed the first.
    """
    path = tmp_path / "mbox"
    first, _ = plain_message(b"one", b"X-UIDL: abc\n")
    second, _ = plain_message(b"two")
    path.write_bytes(first + second)
    assert _uidls(path, None)[0] == b"abc"
    _delete(path, 0, fmt=None)
    newer, _ = plain_message(b"NEW, a different message", b"X-UIDL: abc\n")
    with path.open("ab") as f:
        f.write(newer)
    uidls = _uidls(path, None)
    assert b"abc" not in uidls and all(looks_own(u) for u in uidls)

    other = tmp_path / "other"
    other.write_bytes(first + second)
    assert _uidls(other, None)[0] == b"abc"
    other.unlink()
    other.write_bytes(second)
    _uidls(other, None)
    with other.open("ab") as f:
        f.write(newer)
    assert b"abc" not in _uidls(other, None)


def test_pinning_ignores_undecided_uidls(
    dovecot_mbox: tuple[Path, list[bytes], list[bytes]],
) -> None:
    """
    An import may pin a UIDL that a message the server has not indexed
    yet shows provisionally: that one gets another when the server
    decides.
    """
    path, _, _ = dovecot_mbox
    box = _open(path, UidlFormat.parse("%u"), provisional=True)
    try:
        assert [box.getUidl(i) for i in range(3)] == [b"1", b"2", b"3"]
        box.pin_uidls({0: b"2"})
    finally:
        box.close()
    uidls = _uidls(path, UidlFormat.parse("%u"))
    assert uidls[0] == b"2" and uidls[2] == b"3"
    assert looks_own(uidls[1])


def test_live_server_serves_a_maildrop_with_a_hostile_message(tmp_path: Path) -> None:
    """
    Over the real server: a maildrop holding a message whose header has
    70000 Status lines opens at every login (no [SYS/TEMP] from then on).
    """
    srv = Pop3Server(tmp_path)
    good, _ = plain_message(b"good")
    evil = b"From x Thu Jan  1 00:00:00 2026\nSubject: hi\n" + b"Status:\na\n" * 70000 + b"\nb\n\n"
    (srv.mail / "alice").write_bytes(good + evil + good)
    srv.start()
    try:
        for _ in range(2):
            client = _session(srv)
            assert client.stat()[0] == 3
            client.quit()
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_text()
