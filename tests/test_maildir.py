"""
Tests for L{pop3srv.maildir}: Maildir maildrops (issue 16, item 5).

Real Maildirs in a temporary directory, written by Python's
C{mailbox.Maildir} and by hand (with C{,S=}, C{,W=} and C{:2,S}); the
mailbox directly (blocking work at once through L{helpers.run_now}), the
realm, and the real C{twistd pop3srv --mailbox maildir:...} over sockets,
byte for byte.
"""

from __future__ import annotations

import hashlib
import mailbox
import os
import poplib
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import failure_of, result_of, run_now
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, LogLevel
from twisted.mail.pop3 import IMailbox
from zope.interface.verify import verifyObject

from pop3srv.app.tap import Options
from pop3srv.auth.realm import MboxRealm
from pop3srv.core.errors import CommitFailed, MaildropInUse, MaildropUnavailable
from pop3srv.core.wire import DotStuffer
from pop3srv.maildir import MaildirMailbox, open_maildir
from pop3srv.maildir import mailbox as maildir_mailbox
from pop3srv.maildir import sizes as maildir_sizes
from pop3srv.maildir.mailbox import PartialCommit, maildir_state_paths
from pop3srv.maildir.names import (
    base_of,
    cur_name,
    delivery_key,
    hashed_uidl,
    session_uidls,
    sizes_of,
    uidl_of,
)
from pop3srv.maildir.sizes import SizeCache, parse_cache, render_cache, wire_octets
from pop3srv.mbox.paths import UnsafeStateFile

# What Python's mailbox.Maildir delivers (into new/, named by the time now).
PY_MESSAGES = [
    b"From: a@example.org\nSubject: plain\n\nHello.\n",
    b"Subject: tricky\n\n.starts with a dot\n..two dots\n.\nFrom the start\n"
    b"last line without newline",
    b"Subject: crlf\r\n\r\nstored with CRLF\r\nand a bare LF\nend\r\n",
    b"Subject: eight bit\n\n\xe9t\xe9 \xff\xfe\n",
    b"Subject: empty body\n\n",
]
# Written by hand, older than the ones above: (folder, name, content).
OLD = b"Subject: old, in cur with S= and seen\n\nfirst delivered\n"
OLDER_W = b"Subject: oldest, Dovecot's S= and W=\n\n.dot\nline\n"
HAND_NEW = b"Subject: by hand in new\n\nno info yet\n"


def on_the_wire(content: bytes) -> bytes:
    """
    What RETR sends for C{content} before the terminating dot, written out
    independently of the server's encoder: CRLF line ends, a final line
    end, a dot doubled at the start of a line.
    """
    if not content:
        return b""
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        line = line.removesuffix(b"\r")
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out)


def pop3_size(content: bytes) -> int:
    """The size LIST gives: the wire form without dot-stuffing."""
    return len(on_the_wire(content)) - sum(
        1 for line in on_the_wire(content).split(b"\r\n") if line.startswith(b"..")
    )


def hand_names() -> list[tuple[str, str, bytes]]:
    """The hand-written messages: folder, file name, content."""
    w = pop3_size(OLDER_W)
    return [
        ("cur", f"1500000000.M1P10Q1.oldhost,S={len(OLDER_W)},W={w}:2,S", OLDER_W),
        ("cur", f"1600000000.M20P11Q1.oldhost,S={len(OLD)}:2,RS", OLD),
        ("new", "1600000000.M300P12Q1.oldhost", HAND_NEW),
    ]


def make_maildir(path: Path, with_python: bool = True) -> list[bytes]:
    """
    A Maildir at C{path}: the hand-written messages, then PY_MESSAGES by
    Python's mailbox module, plus a message in tmp/ and dot files that are
    no mail.  Returns the contents in delivery order.
    """
    box = mailbox.Maildir(str(path), create=True)
    contents = []
    for folder, name, content in hand_names():
        (path / folder / name).write_bytes(content)
        contents.append(content)
    if with_python:
        for message in PY_MESSAGES:
            box.add(message)
            contents.append(message)
            # Distinct delivery times, so the order is the order written.
            time.sleep(0.002)
    (path / "tmp" / "1700000000.M1P1Q1.half-written").write_bytes(b"Subject: not yet\n")
    (path / "cur" / ".hidden").write_bytes(b"not mail")
    return contents


@pytest.fixture
def maildir(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """alice's Maildir under C{tmp/home}, and its messages in order."""
    path = tmp_path / "home" / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    return path, make_maildir(path)


def open_box(path: Path, **kwargs: Any) -> MaildirMailbox:
    """Open the Maildir at C{path}, trusting its grandparent (the homes)."""
    kwargs.setdefault("trusted_root", str(path.parent.parent))
    kwargs.setdefault("defer_to_thread", run_now)
    return open_maildir(str(path), **kwargs)


@pytest.fixture
def box(maildir: tuple[Path, list[bytes]]) -> Iterator[MaildirMailbox]:
    mb = open_box(maildir[0])
    yield mb
    mb.close()


def reader_of(mb: MaildirMailbox, index: int) -> maildir_mailbox.MessageFile:
    """The reader getMessage gives, at once or (a moved message) through a Deferred."""
    reader = mb.getMessage(index)
    return result_of(reader) if isinstance(reader, Deferred) else reader


def read_all(mb: MaildirMailbox, index: int) -> bytes:
    with reader_of(mb, index) as reader:
        return reader.read()


# --- names ---------------------------------------------------------------------


def test_names() -> None:
    """Base, sizes, delivery order and the cur/ name, as Dovecot and Courier read them."""
    name = b"1500000000.M123P4Q5.host,S=100,W=104:2,RS"
    assert base_of(name) == b"1500000000.M123P4Q5.host,S=100,W=104"
    assert base_of(b"1500000000.M1.host") == b"1500000000.M1.host"
    assert sizes_of(base_of(name)) == maildir_sizes_named(100, 104)
    assert sizes_of(b"1.M1.h,S=12") == maildir_sizes_named(12, None)
    assert sizes_of(b"1.M1.h,S=x,W=") == maildir_sizes_named(None, None)
    assert sizes_of(b"1.M1.host") == maildir_sizes_named(None, None)
    assert cur_name(b"1.M1.h") == b"1.M1.h:2,"
    assert cur_name(b"1.M1.h:2,S") == b"1.M1.h:2,S"
    # Seconds, then microseconds (M<usec>, also after Postfix's V and I),
    # then the name; a name with no time first.
    ordered = [
        b"nonsense",
        b"1500000000.M9P1Q1.b",
        b"1500000000.M10P1Q1.a",
        b"1500000000.V803I2aM99.a",
        b"1500000001.M1P1Q1.a",
    ]
    assert sorted(reversed(ordered), key=delivery_key) == ordered


def maildir_sizes_named(file: int | None, wire: int | None) -> Any:
    from pop3srv.maildir.names import NamedSizes

    return NamedSizes(file, wire)


def test_uidl_is_the_base_with_courier_escapes() -> None:
    """
    The UIDL is the base as stored (Dovecot's %f, Courier's pop3d), an
    octet a UIDL may not hold written +XX.
    """
    assert uidl_of(b"1500000000.M1P1Q1.host,S=12") == b"1500000000.M1P1Q1.host,S=12"
    assert uidl_of(b"1.M1.h\\057x") == b"1.M1.h\\057x"
    assert uidl_of(b"1.M1.my host\xe9") == b"1.M1.my+20host+E9"


def valid_uidl(uidl: bytes) -> bool:
    """RFC 1939: 1 to 70 octets, each 0x21 to 0x7E."""
    return 1 <= len(uidl) <= 70 and all(0x21 <= c <= 0x7E for c in uidl)


@given(st.binary(max_size=120))
def test_uidl_is_always_valid(base: bytes) -> None:
    """
    Any base gives a UIDL of printable ASCII without spaces, at most 70
    octets (RFC 1939): the base itself when it can be, else a hash, the
    same every time.
    """
    uidl = uidl_of(base)
    assert valid_uidl(uidl)
    assert uidl_of(bytes(base)) == uidl


def test_empty_or_long_base_gets_a_hashed_uidl() -> None:
    """
    A file named only by its info (C{:2,S}, an empty base) and a base of
    more than 70 octets once escaped get a stable hashed UIDL, starting
    with the name so an admin recognises it; distinct bases stay distinct.
    """
    assert uidl_of(b"") == hashed_uidl(b"")
    assert valid_uidl(uidl_of(b""))
    long = b"1700000000.M1P1." + b"h" * 80
    assert uidl_of(long) == hashed_uidl(long)
    assert len(uidl_of(long)) == 70 and uidl_of(long).startswith(b"1700000000.M1P1.hhh")
    assert uidl_of(long) != uidl_of(long + b"h")
    # 70 octets once escaped is served as it is; 71 is not.
    assert uidl_of(b"h" * 70) == b"h" * 70
    assert uidl_of(b"h" * 64 + b"\xe9\xe9") == b"h" * 64 + b"+E9+E9"
    assert uidl_of(b"h" * 65 + b"\xe9\xe9") == hashed_uidl(b"h" * 65 + b"\xe9\xe9")
    # Bases that escape alike to a long UIDL hash apart.
    assert uidl_of(b"h" * 70 + b" ") != uidl_of(b"h" * 70 + b"+20")


# Bases that collide once escaped, or end in what a numbered UIDL adds.
_CLASHING_BASES = st.sampled_from(
    [b"X", b"X.2", b"X.3", b"X.2.2", b"", b"a b", b"a+20", b"h" * 70, b"h" * 68 + b".2",
     b"h" * 69 + b"\xe9"]
)  # fmt: skip


@given(st.lists(_CLASHING_BASES, max_size=12))
def test_session_uidls_are_unique_and_keep_every_first_base(bases: list[bytes]) -> None:
    """
    Every UIDL of a session is valid and different; the first message with
    a base has the UIDL of that base, and no later copy takes the UIDL
    another base gives, whatever the order.
    """
    uidls = session_uidls(bases)
    assert len(uidls) == len(bases) and len(set(uidls)) == len(uidls)
    assert all(valid_uidl(u) for u in uidls)
    own = [uidl_of(b) for b in bases]
    for i, (mine, served) in enumerate(zip(own, uidls, strict=True)):
        if mine not in own[:i]:
            assert served == mine
        else:
            assert served not in own


def test_duplicate_base_never_takes_a_real_bases_uidl() -> None:
    """
    A base there twice gives its copy C{.3} when a real message's base is
    C{X.2}: that message keeps its own UIDL.
    """
    assert session_uidls([b"X", b"X", b"X.2"]) == [b"X", b"X.3", b"X.2"]
    assert session_uidls([b"X", b"X.2", b"X"]) == [b"X", b"X.2", b"X.3"]


# --- sizes ---------------------------------------------------------------------


def wire_of(tmp_path: Path, content: bytes) -> int:
    path = tmp_path / "m"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        return wire_octets(fd)
    finally:
        os.close(fd)


@given(st.binary(max_size=300).map(lambda b: b.replace(b".", b"x")))
def test_wire_octets_is_what_the_encoder_sends(tmp_path_factory: Any, content: bytes) -> None:
    """
    The size counted from a file is the octets the protocol's encoder
    sends for it, less the terminator (no dots here: stuffing is not
    counted).
    """
    stuffer = DotStuffer()
    sent = stuffer.feed(content) + stuffer.finish()
    assert wire_of(tmp_path_factory.mktemp("w"), content) == len(sent) - len(b".\r\n")


def test_wire_octets_across_reads(tmp_path: Path) -> None:
    """A CR LF split between two reads counts once; CRLF files keep their size."""
    content = b"x" * (maildir_sizes.READ_CHUNK - 1) + b"\r\n" + b"y\n"
    assert wire_of(tmp_path, content) == len(content) + 1
    assert wire_of(tmp_path, b"a\r\nb\r\n") == 6
    assert wire_of(tmp_path, b"") == 0
    assert wire_of(tmp_path, b"no end") == 8


def test_size_cache_round_trip(tmp_path: Path) -> None:
    """The cache keeps the sizes used; a damaged or foreign file is empty."""
    entries = {(b"1.M1.h", 5, 100, 123456789): 104, (b"2.M2.h", 6, 7, 8): 9}
    assert parse_cache(render_cache(entries.items())) == entries
    assert parse_cache(b"something else\n1 2 3 4 x\n") == {}
    assert parse_cache(render_cache(entries.items()) + b"bad line\n1 2 x 4 y\n") == entries
    path = str(tmp_path / "sizes")
    cache = SizeCache.load(path)
    cache.put((b"1.M1.h", 5, 100, 123456789), 104)
    cache.store(path)
    again = SizeCache.load(path)
    assert again.get((b"1.M1.h", 5, 100, 123456789)) == 104
    assert again.get((b"1.M1.h", 5, 100, 1)) is None
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# --- the mailbox ---------------------------------------------------------------


def test_provides_imailbox(box: MaildirMailbox) -> None:
    assert verifyObject(IMailbox, box)


def test_messages_in_delivery_order_byte_exact(
    maildir: tuple[Path, list[bytes]], box: MaildirMailbox
) -> None:
    """
    Every message of cur/ and new/ (not tmp/, not dot files), by delivery
    time, its content as stored and its size what RETR sends.
    """
    _, contents = maildir
    assert len(box.listMessages()) == len(contents)
    for i, content in enumerate(contents):
        assert read_all(box, i) == content
        assert box.listMessages(i) == pop3_size(content)
    assert box.listMessages() == [pop3_size(c) for c in contents]


def test_uidls_are_the_bases(maildir: tuple[Path, list[bytes]], box: MaildirMailbox) -> None:
    """The UIDLs are the names' bases, S= and W= included, the info not."""
    path, _ = maildir
    hand = [name.split(":")[0].encode() for _, name, _ in hand_names()]
    uidls = [box.getUidl(i) for i in range(len(box.listMessages()))]
    assert uidls[:3] == hand
    # Python's mailbox module keys its messages by the same base.
    keys = set(mailbox.Maildir(str(path), create=False).keys()) - {".hidden"}
    assert sorted(u.decode() for u in uidls) == sorted(keys)
    assert len(set(uidls)) == len(uidls)


def test_new_mail_moved_to_cur(maildir: tuple[Path, list[bytes]], box: MaildirMailbox) -> None:
    """
    Opening the session moves new/ to cur/ with an empty info, as mail
    readers do; tmp/ is left alone, and Python's mailbox still reads it all.
    """
    path, contents = maildir
    assert os.listdir(path / "new") == []
    names = os.listdir(path / "cur")
    assert "1600000000.M300P12Q1.oldhost:2," in names
    assert f"1600000000.M20P11Q1.oldhost,S={len(OLD)}:2,RS" in names
    assert os.listdir(path / "tmp") == ["1700000000.M1P1Q1.half-written"]
    kept = mailbox.Maildir(str(path), create=False)
    keys = [key for key in kept.keys() if key != ".hidden"]
    assert sorted(kept.get_bytes(key) for key in keys) == sorted(contents)


def test_new_mail_that_cannot_be_moved_is_served_from_new(
    maildir: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A Maildir where nothing can be moved (read-only to the server) is
    served from new/ as it is, and its deletions still work.
    """
    path, contents = maildir

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    mb = open_box(path)
    try:
        assert [read_all(mb, i) for i in range(len(contents))] == contents
        mb.deleteMessage(2)  # HAND_NEW, still in new/
        result_of(mb.sync())
    finally:
        mb.close()
    assert len(os.listdir(path / "new")) == len(PY_MESSAGES)


def test_name_taken_in_cur_leaves_both(tmp_path: Path) -> None:
    """
    A message of new/ whose cur/ name is taken is not moved over it: both
    are served, the later with a suffixed UIDL, so UIDLs stay unique.
    """
    path = tmp_path / "home" / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    mailbox.Maildir(str(path), create=True)
    (path / "cur" / "1.M1.h:2,").write_bytes(b"in cur\n")
    (path / "new" / "1.M1.h").write_bytes(b"in new\n")
    mb = open_box(path)
    try:
        assert [read_all(mb, 0), read_all(mb, 1)] == [b"in cur\n", b"in new\n"]
        assert [mb.getUidl(0), mb.getUidl(1)] == [b"1.M1.h", b"1.M1.h.2"]
    finally:
        mb.close()
    assert os.listdir(path / "new") == ["1.M1.h"]


def test_delete_unlinks_at_sync_and_reopen_keeps_uidls(
    maildir: tuple[Path, list[bytes]],
) -> None:
    """
    DELE marks; only sync unlinks; the next session shows the rest with
    the same UIDLs, renumbered.
    """
    path, contents = maildir
    mb = open_box(path)
    uidls = [mb.getUidl(i) for i in range(len(contents))]
    mb.deleteMessage(0)
    mb.deleteMessage(4)
    assert mb.listMessages(0) == 0
    with pytest.raises(ValueError):
        mb.getMessage(0)
    with pytest.raises(ValueError):
        mb.getUidl(4)
    assert len(os.listdir(path / "cur")) == len(contents) + 1  # and .hidden
    result_of(mb.sync())
    mb.close()
    assert len(os.listdir(path / "cur")) == len(contents) - 2 + 1
    again = open_box(path)
    try:
        kept = [i for i in range(len(contents)) if i not in (0, 4)]
        assert [again.getUidl(i) for i in range(len(kept))] == [uidls[i] for i in kept]
        assert [read_all(again, i) for i in range(len(kept))] == [contents[i] for i in kept]
    finally:
        again.close()


def test_index_errors(box: MaildirMailbox) -> None:
    count = len(box.listMessages())
    for call in (box.listMessages, box.getMessage, box.getUidl, box.deleteMessage):
        with pytest.raises(IndexError):
            call(count)
        with pytest.raises(IndexError):
            call(-1)


def test_second_session_is_in_use(maildir: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    """One session per Maildir, also with the lock in an index directory."""
    path, _ = maildir
    first = open_box(path)
    try:
        with pytest.raises(MaildropInUse):
            open_box(path)
    finally:
        first.close()
    open_box(path).close()
    index = tmp_path / "index"
    index.mkdir()
    first = open_box(path, index_dir=str(index))
    try:
        with pytest.raises(MaildropInUse):
            open_box(path, index_dir=str(index))
    finally:
        first.close()
    assert any(n.endswith(".pop3srv-lock") for n in os.listdir(index))
    assert any(n.endswith(".pop3srv-sizes") for n in os.listdir(index))


def test_missing_maildir_is_empty(tmp_path: Path) -> None:
    """A Maildir not made yet is an empty maildrop, and is not created."""
    (tmp_path / "home" / "carol").mkdir(parents=True)
    mb = open_box(tmp_path / "home" / "carol" / "Maildir")
    try:
        assert mb.listMessages() == []
        result_of(mb.sync())
    finally:
        mb.close()
    assert not (tmp_path / "home" / "carol" / "Maildir").exists()
    # Neither is a missing home; with an index_dir the lock is still taken.
    index = tmp_path / "index"
    index.mkdir()
    mb = open_box(tmp_path / "home" / "dave" / "Maildir", index_dir=str(index))
    try:
        assert mb.listMessages() == []
        with pytest.raises(MaildropInUse):
            open_box(tmp_path / "home" / "dave" / "Maildir", index_dir=str(index))
    finally:
        mb.close()


def test_missing_cur_or_new(tmp_path: Path) -> None:
    """A Maildir with new/ only is served from new/; with cur/ only, from cur/."""
    path = tmp_path / "home" / "alice" / "Maildir"
    (path / "new").mkdir(parents=True)
    (path / "new" / "1.M1.h").write_bytes(b"a\n")
    mb = open_box(path)
    try:
        assert read_all(mb, 0) == b"a\n"
        mb.deleteMessage(0)
        result_of(mb.sync())
    finally:
        mb.close()
    assert os.listdir(path / "new") == []


def test_named_sizes(tmp_path: Path) -> None:
    """
    W= is taken as the size (Dovecot's virtual size) when S= is absent or
    matches the file; a name whose S= does not match is counted instead.
    """
    path = tmp_path / "home" / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    mailbox.Maildir(str(path), create=True)
    (path / "cur" / "1.M1.a,W=999:2,").write_bytes(b"x\n")
    (path / "cur" / "2.M1.b,S=2,W=998:2,").write_bytes(b"y\n")
    (path / "cur" / "3.M1.c,S=50,W=997:2,").write_bytes(b"z\n")
    (path / "cur" / "4.M1.d,S=77:2,").write_bytes(b"w\n")
    mb = open_box(path)
    try:
        assert mb.listMessages() == [999, 998, 3, 3]
    finally:
        mb.close()


def test_sizes_are_cached(
    maildir: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The second session reads no message file to size it: the first one's
    counts are in the cache, which drops the messages deleted since.
    """
    path, contents = maildir
    open_box(path).close()
    counted: list[int] = []
    real = maildir_mailbox.wire_octets
    monkeypatch.setattr(maildir_mailbox, "wire_octets", lambda fd: counted.append(fd) or real(fd))
    mb = open_box(path)
    try:
        assert counted == []
        assert mb.listMessages() == [pop3_size(c) for c in contents]
        mb.deleteMessage(3)
        result_of(mb.sync())
    finally:
        mb.close()
    mb = open_box(path)
    mb.close()
    cached = parse_cache((path / "pop3srv-sizes").read_bytes())
    # The W= message is never counted; the one deleted is dropped.
    assert len(cached) == len(contents) - 2
    assert counted == []


def test_message_renamed_or_removed_by_another_reader(
    maildir: tuple[Path, list[bytes]],
) -> None:
    """
    An IMAP server changes a message's flags (a rename) during the session:
    RETR and DELE find it by its base.  One it deleted is an error to
    RETR and counts as deleted at QUIT.
    """
    path, contents = maildir
    mb = open_box(path)
    try:
        name = next(n for n in os.listdir(path / "cur") if n.startswith("1600000000.M300"))
        os.rename(path / "cur" / name, path / "cur" / (name + "S"))
        assert read_all(mb, 2) == contents[2]
        victim = next(n for n in os.listdir(path / "cur") if n.startswith("1500000000"))
        os.unlink(path / "cur" / victim)
        gone = mb.getMessage(0)
        assert isinstance(gone, Deferred)
        failure_of(gone, FileNotFoundError)
        mb.deleteMessage(0)
        mb.deleteMessage(2)
        result_of(mb.sync())
    finally:
        mb.close()
    left = os.listdir(path / "cur")
    assert not [n for n in left if n.startswith(("1500000000", "1600000000.M300"))]
    assert len(left) == len(contents) - 2 + 1  # and .hidden


class Worker:
    """
    A C{deferToThread} stand-in that holds each call until L{run}, so a
    test sees what happened before the work and what after.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((d, lambda: f(*args, **kwargs)))
        return d

    def run(self) -> None:
        """Do the oldest call held, firing its Deferred."""
        d, work = self.queue.pop(0)
        try:
            result = work()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every directory listing made from now on (the descriptor listed)."""
    real = os.scandir
    made: list[int] = []

    def counting(path: Any = ".") -> Any:
        made.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return made


def reflagged_maildir(tmp_path: Path, count: int) -> tuple[Path, list[bytes]]:
    """alice's Maildir with C{count} messages in new/, and their contents."""
    path = tmp_path / "home" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (path / folder).mkdir(parents=True)
    contents = []
    for i in range(count):
        content = b"Subject: %d\n\nbody %d\n" % (i, i)
        (path / "new" / f"{1700000000 + i}.M{i}P1.host,S={len(content)}").write_bytes(content)
        contents.append(content)
    return path, contents


def flag_all_seen(path: Path) -> None:
    """What an IMAP server does to flag every message seen: a rename each."""
    for name in os.listdir(path / "cur"):
        os.rename(path / "cur" / name, path / "cur" / (name + "S"))


def test_renamed_messages_found_with_one_listing_in_a_worker_thread(
    tmp_path: Path, listings: list[int]
) -> None:
    """
    Another reader re-flags every message after the session opened: the
    first RETR lists the Maildir once, in the worker thread (the caller
    gets a Deferred, nothing listed before the worker runs), and every
    other message is then served at once from where that listing found it.
    """
    path, contents = reflagged_maildir(tmp_path, 40)
    worker = Worker()
    mb = open_box(path, defer_to_thread=worker)
    try:
        flag_all_seen(path)
        listings.clear()
        pending = mb.getMessage(0)
        assert isinstance(pending, Deferred)
        assert not pending.called and listings == []
        worker.run()
        assert worker.queue == []
        with result_of(pending) as reader:
            assert reader.read() == contents[0]
        # cur/ and new/, each once (twice only if a message were missing).
        assert len(listings) == 2
        for i in range(1, len(contents)):
            reader = mb.getMessage(i)
            assert isinstance(reader, maildir_mailbox.MessageFile)
            with reader:
                assert reader.read() == contents[i]
        assert len(listings) == 2 and worker.queue == []
    finally:
        mb.close()


def test_renamed_messages_deleted_with_one_listing(tmp_path: Path, listings: list[int]) -> None:
    """
    DELE of every re-flagged message: the commit lists the Maildir once
    for all of them, and removes every file.
    """
    path, contents = reflagged_maildir(tmp_path, 40)
    mb = open_box(path)
    try:
        flag_all_seen(path)
        listings.clear()
        for i in range(len(contents)):
            mb.deleteMessage(i)
        result_of(mb.sync())
        assert len(listings) == 2
    finally:
        mb.close()
    assert [n for n in os.listdir(path / "cur") if not n.startswith(".")] == []


def test_message_renamed_after_the_listing_is_looked_for_again(tmp_path: Path) -> None:
    """
    A listing that found a message does not keep RETR from finding it
    after one more rename; one deleted is refused at once thereafter.
    """
    path, contents = reflagged_maildir(tmp_path, 3)
    mb = open_box(path)
    try:
        flag_all_seen(path)
        assert read_all(mb, 0) == contents[0]
        flag_all_seen(path)
        assert read_all(mb, 1) == contents[1]
        (victim,) = (path / "cur").glob("1700000002.*")
        victim.unlink()
        failure_of(reader_of_deferred(mb, 2), FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            mb.getMessage(2)
    finally:
        mb.close()


def reader_of_deferred(mb: MaildirMailbox, index: int) -> Deferred[Any]:
    """getMessage of a message not where it was listed: a Deferred."""
    pending = mb.getMessage(index)
    assert isinstance(pending, Deferred)
    return pending


def test_close_during_a_listing_waits_for_it(tmp_path: Path) -> None:
    """
    The session ends while a listing runs in the worker thread: the folders
    stay open until it ends (a closed descriptor's number could be another
    file's by then), then the mailbox closes and the RETR waiting fails.
    """
    path, _ = reflagged_maildir(tmp_path, 2)
    worker = Worker()
    mb = open_box(path, defer_to_thread=worker)
    flag_all_seen(path)
    pending = reader_of_deferred(mb, 0)
    mb.close()
    folder_fds = [f.fd for f in mb._folders.values()]
    assert None not in folder_fds
    worker.run()
    assert [f.fd for f in mb._folders.values()] == [None, None]
    failure_of(pending, ValueError)
    # The session lock went with it: a new session opens.
    open_box(path).close()


def test_listing_that_fails_is_a_failed_retr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Maildir that cannot be listed again fails that RETR with the OSError."""
    path, contents = reflagged_maildir(tmp_path, 2)
    mb = open_box(path)
    try:
        flag_all_seen(path)

        def refused(self: Any) -> list[str]:
            raise PermissionError(13, "Permission denied")

        with monkeypatch.context() as patch:
            patch.setattr(maildir_mailbox._Folder, "names", refused)
            failure_of(reader_of_deferred(mb, 0), PermissionError)
        assert read_all(mb, 0) == contents[0]
    finally:
        mb.close()


def test_duplicated_base_keeps_each_copy_its_own(tmp_path: Path) -> None:
    """
    The same base twice (a copy left in new/ beside the one in cur/) and a
    real base ending in C{.2}: every UIDL unique, the real one its own.
    When another reader deletes one copy, RETR and DELE of it never reach
    the other copy's file.
    """
    path = tmp_path / "home" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (path / folder).mkdir(parents=True)
    (path / "cur" / "1700000000.M1P1.h:2,S").write_bytes(b"Subject: seen copy\n\n")
    (path / "new" / "1700000000.M1P1.h").write_bytes(b"Subject: new copy\n\n")
    (path / "cur" / "1700000000.M1P1.h.2:2,").write_bytes(b"Subject: real .2\n\n")
    mb = open_box(path)
    try:
        uidls = [mb.getUidl(i) for i in range(3)]
        contents = [read_all(mb, i) for i in range(3)]
        assert len(set(uidls)) == 3
        real = contents.index(b"Subject: real .2\n\n")
        assert uidls[real] == b"1700000000.M1P1.h.2"
        copies = [i for i in range(3) if i != real]
        assert {uidls[i] for i in copies} == {b"1700000000.M1P1.h", b"1700000000.M1P1.h.3"}
        # Another reader deletes the second copy's file.
        second = copies[1]
        (path / mb._messages[second].folder / mb._messages[second].name).unlink()
        failure_of(reader_of_deferred(mb, second), FileNotFoundError)
        mb.deleteMessage(second)
        result_of(mb.sync())
    finally:
        mb.close()
    left = sorted(p.read_bytes() for p in (path / "cur").iterdir())
    assert left == sorted([contents[copies[0]], b"Subject: real .2\n\n"])


def test_unusable_names_get_valid_stable_uidls(tmp_path: Path) -> None:
    """
    A file named only C{:2,S} and one whose base is over 70 octets are
    served with valid UIDLs, the same in the next session.
    """
    path = tmp_path / "home" / "alice" / "Maildir"
    for folder in ("cur", "new", "tmp"):
        (path / folder).mkdir(parents=True)
    (path / "cur" / ":2,S").write_bytes(b"Subject: a\n\nx\n")
    (path / "cur" / ("1700000000.M1P1." + "h" * 80 + ":2,")).write_bytes(b"Subject: b\n\nx\n")
    sessions = []
    for _ in range(2):
        mb = open_box(path)
        try:
            sessions.append([mb.getUidl(i) for i in range(len(mb.listMessages()))])
        finally:
            mb.close()
    assert len(sessions[0]) == 2 and sessions[0] == sessions[1]
    assert all(valid_uidl(u) for u in sessions[0])


def test_commit_failure_is_reported(
    maildir: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An unlink that fails is a failed commit: CommitFailed if nothing was
    removed, PartialCommit (an honest text) if some were.
    """
    path, _ = maildir
    real = maildir_mailbox._Folder.unlink
    calls: list[str] = []

    def flaky(self: Any, name: str) -> bool:
        calls.append(name)
        if len(calls) >= fail_from:
            raise PermissionError(13, "Permission denied")
        return real(self, name)

    monkeypatch.setattr(maildir_mailbox._Folder, "unlink", flaky)
    fail_from = 1
    mb = open_box(path)
    try:
        mb.deleteMessage(0)
        failure = failure_of(mb.sync(), CommitFailed)
        assert not isinstance(failure.value, PartialCommit)
    finally:
        mb.close()
    calls.clear()
    fail_from = 2
    mb = open_box(path)
    try:
        mb.deleteMessage(0)
        mb.deleteMessage(1)
        failure = failure_of(mb.sync(), PartialCommit)
        assert failure.value.code == "SYS/TEMP"
    finally:
        mb.close()


def test_reader_after_close_fails(box: MaildirMailbox) -> None:
    """A reader left open when the session ends is closed with it."""
    reader = box.getMessage(0)
    box.close()
    with pytest.raises(ValueError):
        reader.read(1)
    with pytest.raises(ValueError):
        box.getMessage(1)


def test_large_message_streams_in_bounded_memory(tmp_path: Path) -> None:
    """
    A 20 MB message is sized at open and read in pieces without being held
    whole.
    """
    path = tmp_path / "home" / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    mailbox.Maildir(str(path), create=True)
    line = b"x" * 99 + b"\n"
    count = (20 << 20) // len(line)
    with (path / "new" / "1.M1.big").open("wb") as f:
        for _ in range(count // 1000):
            f.write(line * 1000)
    expected = hashlib.sha256(line * (count // 1000 * 1000)).hexdigest()
    tracemalloc.start()
    try:
        mb = open_box(path)
        try:
            reader = mb.getMessage(0)
            digest = hashlib.sha256()
            while piece := reader.read(65536):
                digest.update(piece)
            peak = tracemalloc.get_traced_memory()[1]
            assert mb.listMessages(0) == (len(line) + 1) * (count // 1000 * 1000)
        finally:
            mb.close()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == expected
    assert peak < 2 << 20


# --- safety --------------------------------------------------------------------


def refused(path: Path, **kwargs: Any) -> UnsafeStateFile:
    with pytest.raises(UnsafeStateFile) as caught:
        open_box(path, **kwargs)
    assert caught.value.code == "SYS/TEMP"
    return caught.value


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under C{directory} (symlinks not followed) and its content."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    """C{tmp/home/{alice,bob}/Maildir}, both with mail, bob's opened once."""
    home = tmp_path / "home"
    for user in ("alice", "bob"):
        (home / user).mkdir(parents=True)
        make_maildir(home / user / "Maildir", with_python=False)
    open_box(home / "bob" / "Maildir").close()
    return home


def test_symlinked_cur_refused(homes: Path, log_events: list[LogEvent]) -> None:
    """
    alice makes her cur/ a symlink to bob's: her maildrop is refused
    (SYS/TEMP, a warning in the log) and nothing of bob's is touched.
    """
    cur = homes / "alice" / "Maildir" / "cur"
    cur.rename(cur.with_name("cur.real"))
    cur.symlink_to(homes / "bob" / "Maildir" / "cur")
    before = snapshot(homes / "bob")
    error = refused(homes / "alice" / "Maildir")
    assert "cur" in str(error)
    assert snapshot(homes / "bob") == before
    warnings = [e for e in log_events if e.get("log_level") == LogLevel.warn]
    assert any(e.get("path") == f"{homes}/alice/Maildir" for e in warnings)


def test_symlinked_new_refused(homes: Path) -> None:
    new = homes / "alice" / "Maildir" / "new"
    new.rename(new.with_name("new.real"))
    new.symlink_to(homes / "bob" / "Maildir" / "new")
    refused(homes / "alice" / "Maildir")


def test_symlinked_maildir_or_home_refused(homes: Path) -> None:
    """~/Maildir or the home itself a symlink to bob's is refused too."""
    maildir = homes / "alice" / "Maildir"
    maildir.rename(maildir.with_name("Maildir.real"))
    maildir.symlink_to(homes / "bob" / "Maildir")
    before = snapshot(homes / "bob")
    refused(maildir)
    (homes / "alice").rename(homes / "alice.real")
    (homes / "alice").symlink_to(homes / "bob")
    refused(maildir)
    assert snapshot(homes / "bob") == before


@pytest.mark.parametrize("folder", ["cur", "new"])
def test_symlinked_message_refused(homes: Path, folder: str) -> None:
    """A message file that is a symlink (to bob's message) refuses the maildrop."""
    bobs = next((homes / "bob" / "Maildir" / "cur").glob("1500000000*"))
    (homes / "alice" / "Maildir" / folder / "1700000000.M1P1Q1.x").symlink_to(bobs)
    before = snapshot(homes / "bob")
    error = refused(homes / "alice" / "Maildir")
    assert "symlink" in str(error)
    assert snapshot(homes / "bob") == before


def test_message_swapped_for_symlink_after_open_is_not_read(homes: Path) -> None:
    """
    A message replaced by a symlink to bob's after LIST is not read, and
    its DELE removes the symlink only.
    """
    path = homes / "alice" / "Maildir"
    mb = open_box(path)
    try:
        name = next((path / "cur").glob("1500000000*"))
        name.unlink()
        name.symlink_to(next((homes / "bob" / "Maildir" / "cur").glob("1500000000*")))
        before = snapshot(homes / "bob")
        with pytest.raises(UnsafeStateFile):
            mb.getMessage(0)
        mb.deleteMessage(0)
        result_of(mb.sync())
    finally:
        mb.close()
    assert not name.is_symlink()
    assert snapshot(homes / "bob") == before


def test_cur_swapped_after_open_is_not_followed(homes: Path) -> None:
    """
    alice swaps her cur/ for a symlink to bob's after logging in: RETR
    and DELE still work on her own directory, bob's is untouched.
    """
    path = homes / "alice" / "Maildir"
    mb = open_box(path)
    try:
        (path / "cur").rename(path / "cur.real")
        (path / "cur").symlink_to(homes / "bob" / "Maildir" / "cur")
        before = snapshot(homes / "bob")
        assert read_all(mb, 0) == OLDER_W
        mb.deleteMessage(0)
        mb.deleteMessage(1)
        result_of(mb.sync())
    finally:
        mb.close()
    assert snapshot(homes / "bob") == before
    assert len(os.listdir(path / "cur.real")) == 2  # the moved one and .hidden


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_hard_link_to_another_users_message_refused(homes: Path) -> None:
    """
    A second name of a file of another owner (a hard link alice made to
    bob's message) is refused; one of the Maildir owner's own (Dovecot's
    copy between folders) is served.
    """
    bobs = next((homes / "bob" / "Maildir" / "cur").glob("1500000000*"))
    os.chown(bobs, 4242, 4242)
    target = homes / "alice" / "Maildir" / "cur" / "1700000000.M1P1Q1.x:2,"
    os.link(bobs, target)
    error = refused(homes / "alice" / "Maildir")
    assert "links" in str(error)
    target.unlink()
    own = next((homes / "alice" / "Maildir" / "cur").glob("1500000000*"))
    os.link(own, homes / "alice" / "copy-in-another-folder")
    mb = open_box(homes / "alice" / "Maildir")
    try:
        assert read_all(mb, 0) == OLDER_W
    finally:
        mb.close()


def test_planted_state_file_refused(homes: Path) -> None:
    """A lock file or size cache that is a symlink is refused, never followed."""
    path = homes / "alice" / "Maildir"
    (path / "pop3srv-lock").symlink_to(homes / "bob" / "Maildir" / "pop3srv-lock")
    refused(path)
    (path / "pop3srv-lock").unlink()
    (path / "pop3srv-sizes").symlink_to(homes / "bob" / "Maildir" / "pop3srv-sizes")
    before = snapshot(homes / "bob")
    refused(path)
    assert snapshot(homes / "bob") == before


# --- the realm -----------------------------------------------------------------


def test_realm_serves_maildir(maildir: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    """C{maildir:} in the template gives Maildirs; a plain path stays mbox."""
    path, contents = maildir
    realm = MboxRealm(f"maildir:{tmp_path}/home/{{user}}/Maildir", defer_to_thread=run_now)
    assert realm.kind == "maildir"
    assert realm.trusted_root == f"{tmp_path}/home"
    assert realm.mailbox_path("alice") == str(path)
    interface, mb, logout = result_of(realm.requestAvatar(b"alice", None, IMailbox))
    try:
        assert interface is IMailbox
        assert isinstance(mb, MaildirMailbox)
        assert read_all(mb, 0) == contents[0]
        failure_of(realm.requestAvatar(b"alice", None, IMailbox), MaildropInUse)
    finally:
        logout()
    _, empty, logout = result_of(realm.requestAvatar(b"carol", None, IMailbox))
    assert empty.listMessages() == []
    logout()
    assert MboxRealm(f"{tmp_path}/{{user}}", defer_to_thread=run_now).kind == "mbox"


def test_realm_refuses_symlinked_maildir(maildir: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    path, _ = maildir
    (tmp_path / "home" / "mallory").mkdir()
    (tmp_path / "home" / "mallory" / "Maildir").symlink_to(path)
    realm = MboxRealm(f"maildir:{tmp_path}/home/{{user}}/Maildir", defer_to_thread=run_now)
    failure = failure_of(realm.requestAvatar(b"mallory", None, IMailbox), MaildropUnavailable)
    assert isinstance(failure.value, UnsafeStateFile)


def test_uidl_format_refused_for_maildir(tmp_path: Path) -> None:
    """
    --uidl-format with a Maildir template is refused, not silently
    ignored: by the realm, and by the server at start-up in one line.
    """
    template = f"maildir:{tmp_path}/home/{{user}}/Maildir"
    with pytest.raises(ValueError, match=r"^--uidl-format applies to mbox; a Maildir's UIDLs"):
        MboxRealm(template, uidl_format="%f", defer_to_thread=run_now)
    assert MboxRealm(template, defer_to_thread=run_now).uidl_format is None
    users = tmp_path / "users"
    users.write_text("alice:$6$x$y\n")
    with pytest.raises(SystemExit) as stopped:
        Options().parseOptions(
            ["--mailbox", template, "--uidl-format", "%08Xu%08Xv", "--auth", f"passlib:{users}"]
        )
    message = str(stopped.value)
    assert "\n" not in message.strip()
    assert "--uidl-format: --uidl-format applies to mbox" in message
    assert f"(--mailbox) is {template}" in message


def test_state_paths(tmp_path: Path) -> None:
    """Inside the Maildir, or in an index directory by a hash of the path."""
    inside = maildir_state_paths("/home/a/Maildir")
    assert (inside.lock, inside.sizes) == (
        "/home/a/Maildir/pop3srv-lock",
        "/home/a/Maildir/pop3srv-sizes",
    )
    a = maildir_state_paths("/home/a/Maildir", str(tmp_path))
    b = maildir_state_paths("/home/b/Maildir", str(tmp_path))
    assert a.lock != b.lock and os.path.dirname(a.lock) == str(tmp_path)


# --- the real server -----------------------------------------------------------


class Raw:
    """A byte-exact POP3 client on a socket."""

    def __init__(self, srv: Pop3Server, user: str = "alice") -> None:
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        self.f = self.sock.makefile("rwb")
        assert self.f.readline().startswith(b"+OK")
        assert self.command(f"USER {user}").startswith(b"+OK")
        self.login = self.command(f"PASS {PASSWORDS[user]}")

    def command(self, line: str) -> bytes:
        self.f.write(line.encode() + b"\r\n")
        self.f.flush()
        return self.f.readline()

    def multi(self, line: str) -> tuple[bytes, bytes]:
        """The status line and the raw body before the terminating dot."""
        status = self.command(line)
        assert status.startswith(b"+OK"), status
        body = []
        while (chunk := self.f.readline()) != b".\r\n":
            assert chunk, "connection closed mid-response"
            body.append(chunk)
        return status, b"".join(body)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def start_maildir_server(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> tuple[Pop3Server, Path, list[bytes]]:
    """A server for C{maildir:tmp/home/{user}/Maildir} with alice's Maildir made."""
    home = tmp_path / "home"
    path = home / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    contents = make_maildir(path)
    srv = live_server("--mailbox", f"maildir:{home}/{{user}}/Maildir")
    return srv, path, contents


def test_live_list_uidl_retr_dele_reconnect(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    Over the real server: LIST and UIDL as the Maildir says, RETR byte for
    byte (CRLF, dot-stuffed), new mail moved to cur/; DELE and QUIT unlink;
    a new session shows the rest with the same UIDLs.
    """
    srv, path, contents = start_maildir_server(live_server, tmp_path)
    client = Raw(srv)
    try:
        assert client.login.startswith(b"+OK"), client.login
        _, listing = client.multi("LIST")
        assert listing == b"".join(
            b"%d %d\r\n" % (i + 1, pop3_size(c)) for i, c in enumerate(contents)
        )
        _, uidl_listing = client.multi("UIDL")
        uidls = [line.split(b" ")[1] for line in uidl_listing.splitlines()]
        assert uidls[0] == hand_names()[0][1].split(":")[0].encode()
        for i, content in enumerate(contents):
            status, body = client.multi(f"RETR {i + 1}")
            assert status.startswith(b"+OK %d octets" % pop3_size(content))
            assert body == on_the_wire(content)
        _, top = client.multi("TOP 2 0")
        assert top == on_the_wire(OLD.split(b"\n\n")[0] + b"\n\n")
        assert os.listdir(path / "new") == []
        assert client.command("DELE 1").startswith(b"+OK")
        assert client.command("DELE 5").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    finally:
        client.close()
    assert len([n for n in os.listdir(path / "cur") if not n.startswith(".")]) == len(contents) - 2
    client = Raw(srv)
    try:
        _, uidl_listing = client.multi("UIDL")
        kept = [u for i, u in enumerate(uidls) if i not in (0, 4)]
        assert [line.split(b" ")[1] for line in uidl_listing.splitlines()] == kept
        status, body = client.multi("RETR 4")
        assert body == on_the_wire(contents[5])
        assert client.command("QUIT").startswith(b"+OK")
    finally:
        client.close()


def test_live_retr_and_dele_after_another_reader_reflagged_all(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    Over the real server, an IMAP server re-flags every message after the
    login: RETR finds each byte for byte (the Maildir listed again in a
    worker thread), DELE and QUIT remove them all.
    """
    srv, path, contents = start_maildir_server(live_server, tmp_path)
    client = Raw(srv)
    try:
        assert client.login.startswith(b"+OK"), client.login
        for name in os.listdir(path / "cur"):
            if not name.startswith("."):
                os.rename(path / "cur" / name, path / "cur" / (name + "F"))
        for i, content in enumerate(contents):
            _, body = client.multi(f"RETR {i + 1}")
            assert body == on_the_wire(content)
            assert client.command(f"DELE {i + 1}").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    finally:
        client.close()
    assert os.listdir(path / "cur") == [".hidden"]


def test_live_poplib_and_in_use(live_server: Callable[..., Pop3Server], tmp_path: Path) -> None:
    """
    poplib downloads everything; a second session meanwhile gets
    -ERR [IN-USE]; a user with no Maildir has an empty maildrop.
    """
    srv, _, contents = start_maildir_server(live_server, tmp_path)
    client = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    client.user("alice")
    client.pass_(PASSWORDS["alice"])
    try:
        assert client.stat() == (len(contents), sum(pop3_size(c) for c in contents))
        for i, content in enumerate(contents):
            sent = on_the_wire(content).split(b"\r\n")[:-1]
            unstuffed = [line[1:] if line.startswith(b"..") else line for line in sent]
            assert client.retr(i + 1)[1] == unstuffed
        second = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        try:
            second.user("alice")
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                second.pass_(PASSWORDS["alice"])
        finally:
            second.close()
    finally:
        client.quit()
    bob = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    bob.user("bob")
    bob.pass_(PASSWORDS["bob"])
    assert bob.stat() == (0, 0)
    bob.quit()


def test_live_symlinked_cur_refused(live_server: Callable[..., Pop3Server], tmp_path: Path) -> None:
    """
    bob's cur/ is a symlink to alice's: his login is answered
    -ERR [SYS/TEMP], and alice's mail is neither read to him nor changed.
    """
    srv, path, _ = start_maildir_server(live_server, tmp_path)
    bob = tmp_path / "home" / "bob" / "Maildir"
    for folder in ("new", "tmp"):
        (bob / folder).mkdir(parents=True)
    (bob / "cur").symlink_to(path / "cur")
    before = snapshot(path)
    client = Raw(srv, "bob")
    try:
        assert client.login.startswith(b"-ERR [SYS/TEMP]"), client.login
    finally:
        client.close()
    assert snapshot(path) == before
    assert "Refusing maildrop" in srv.log_text()


def peak_rss_kib(pid: int) -> int:
    """The most resident memory a process has had, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_live_large_message_streams_in_bounded_memory(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    A 20 MB message is sized and sent byte-exact while the server's peak
    memory grows by far less than the message.
    """
    home = tmp_path / "home"
    path = home / "alice" / "Maildir"
    path.parent.mkdir(parents=True)
    mailbox.Maildir(str(path), create=True)
    line = b"y" * 99 + b"\n"
    copies = (20 << 20) // len(line) // 1000
    with (path / "new" / "1700000000.M1P1Q1.big").open("wb") as f:
        for _ in range(copies):
            f.write(line * 1000)
    srv = live_server("--mailbox", f"maildir:{home}/{{user}}/Maildir")
    assert srv.process is not None
    before = peak_rss_kib(srv.process.pid)
    client = Raw(srv)
    try:
        assert client.login.startswith(b"+OK")
        wire_line = line.replace(b"\n", b"\r\n")
        assert client.command("LIST 1") == b"+OK 1 %d\r\n" % (len(wire_line) * copies * 1000)
        status = client.command("RETR 1")
        assert status.startswith(b"+OK")
        digest, total = hashlib.sha256(), 0
        while (chunk := client.f.readline()) != b".\r\n":
            assert chunk
            digest.update(chunk)
            total += len(chunk)
        assert total == len(wire_line) * copies * 1000
        assert digest.hexdigest() == hashlib.sha256(wire_line * 1000 * copies).hexdigest()
        client.command("QUIT")
    finally:
        client.close()
    grown = peak_rss_kib(srv.process.pid) - before
    assert grown < 8_000, f"server peak memory grew by {grown} KiB"
