"""
Tests for L{pop3srv.mbox.mailbox.MboxMailbox} and L{open_maildrop}.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.mail.pop3 import IMailbox
from zope.interface.verify import verifyObject  # type: ignore[import-untyped]

from pop3srv.core.errors import CommitFailed, MaildropUnavailable
from pop3srv.mbox import MboxMailbox, open_maildrop
from pop3srv.mbox.testing import synchronous_defer_to_thread


def _open(path: Path, **kwargs: Any) -> MboxMailbox:
    kwargs.setdefault("defer_to_thread", synchronous_defer_to_thread)
    return open_maildrop(str(path), **kwargs)


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    """Three messages, one with mboxrd quoting and one stored with CRLF."""
    path = tmp_path / "box"
    path.write_bytes(
        b"From a Thu Jan  1 00:00:00 2026\nSubject: one\n\n>From here\n>>From there\n\n"
        b"From b Thu Jan  1 00:00:00 2026\r\nSubject: two\r\n\r\nline\r\n\r\n"
        b"From c Thu Jan  1 00:00:00 2026\nSubject: three\n\nno newline"
    )
    return path


@pytest.fixture
def box(mbox: Path) -> Iterator[MboxMailbox]:
    """An open session on C{mbox}."""
    mb = _open(mbox)
    yield mb
    mb.close()


def test_provides_imailbox(box: MboxMailbox) -> None:
    """
    L{MboxMailbox} provides Twisted's POP3 C{IMailbox}.
    """
    assert verifyObject(IMailbox, box)


def test_messages_and_sizes(box: MboxMailbox) -> None:
    """
    Messages read back un-quoted with line ends as stored; LIST sizes are
    the CRLF octets RETR sends.
    """
    contents = [box.getMessage(i).read() for i in range(3)]
    assert contents == [
        b"Subject: one\n\nFrom here\n>From there\n",
        b"Subject: two\r\n\r\nline\r\n",
        b"Subject: three\n\nno newline",
    ]
    assert box.listMessages() == [len(c.replace(b"\n", b"\r\n")) for c in contents[:1]] + [
        len(contents[1]),
        len(b"Subject: three\r\n\r\nno newline\r\n"),
    ]
    assert box.listMessages(2) == box.listMessages()[2]  # type: ignore[index]


def test_index_errors(box: MboxMailbox) -> None:
    """
    Out-of-range indexes raise L{IndexError}.
    """
    for call in (box.listMessages, box.getMessage, box.getUidl, box.deleteMessage):
        with pytest.raises(IndexError):
            call(3)
        with pytest.raises(IndexError):
            call(-1)


def test_deleted_messages(box: MboxMailbox) -> None:
    """
    A deleted message lists as size 0 and any other access raises
    L{ValueError}, until L{undeleteMessages}.
    """
    uidl = box.getUidl(1)
    box.deleteMessage(1)
    assert box.listMessages(1) == 0
    assert box.listMessages()[1] == 0  # type: ignore[index]
    for call in (box.getMessage, box.getUidl, box.deleteMessage):
        with pytest.raises(ValueError):
            call(1)
    box.undeleteMessages()
    assert box.getUidl(1) == uidl
    assert box.listMessages(1) != 0


def test_reader(box: MboxMailbox) -> None:
    """
    Readers stream in pieces of the requested size, give C{b""} at the end,
    and refuse reads once closed or once the mailbox is closed.
    """
    reader = box.getMessage(0)
    pieces = []
    while piece := reader.read(5):
        assert len(piece) <= 5
        pieces.append(piece)
    assert b"".join(pieces) == b"Subject: one\n\nFrom here\n>From there\n"
    assert reader.read() == b""
    with box.getMessage(0) as other:
        assert other.read(0) == b""
    with pytest.raises(ValueError):
        other.read(1)
    late = box.getMessage(1)
    box.close()
    with pytest.raises(ValueError):
        late.read(1)


def test_large_message_streams_in_bounded_memory(tmp_path: Path) -> None:
    """
    A 24 MB message is read in 64 KiB pieces without being held whole.
    """
    path = tmp_path / "big"
    line = b">From quoted line " + b"x" * 100 + b"\n"
    count = (24 << 20) // len(line)
    with path.open("wb") as f:
        f.write(b"From big\n")
        for _ in range(count // 1000):
            f.write(line * 1000)
        f.write(b"\n")
    expected = hashlib.sha256((line[1:] * 1000) * (count // 1000)).hexdigest()
    mb = _open(path)
    try:
        tracemalloc.start()
        try:
            reader = mb.getMessage(0)
            digest = hashlib.sha256()
            while piece := reader.read(65536):
                digest.update(piece)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert digest.hexdigest() == expected
        assert peak < 2 << 20
        assert mb.listMessages(0) == (len(line) - 1 + 1) * (count // 1000) * 1000
    finally:
        mb.close()


def test_missing_mbox_is_empty(tmp_path: Path) -> None:
    """
    A maildrop whose file does not exist is empty, and is not created.
    """
    path = tmp_path / "nobody"
    mb = _open(path)
    assert mb.listMessages() == []
    mb.close()
    assert not path.exists()


def test_unreadable_mbox(tmp_path: Path) -> None:
    """
    An mbox that cannot be opened gives L{MaildropUnavailable}, and the
    session lock is not left held.
    """
    path = tmp_path / "dir"
    path.mkdir()
    with pytest.raises(MaildropUnavailable):
        _open(path)
    path.rmdir()
    _open(path).close()


_HOLD_LOCKF = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
fcntl.lockf(f, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_mbox_locked_by_mda(mbox: Path) -> None:
    """
    While an MDA holds the mbox lock, opening times out with
    L{MaildropUnavailable} and sync fails with L{CommitFailed}, leaving the
    file as it was.
    """
    mb = _open(mbox, lock_timeout=0.2)
    mb.deleteMessage(0)
    before = mbox.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCKF, str(mbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        results: list[Any] = []
        mb.sync().addBoth(results.append)
        assert results[0].check(CommitFailed)
        mb.close()
        with pytest.raises(MaildropUnavailable):
            _open(mbox, lock_timeout=0.2)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        assert proc.stdin is not None
        proc.stdin.close()
    assert mbox.read_bytes() == before
    _open(mbox).close()


def test_unexpected_error_becomes_commit_failed(mbox: Path) -> None:
    """
    An unexpected exception from the worker reaches the caller as
    L{CommitFailed}, whose text is safe for a client.
    """

    def broken(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(RuntimeError("secret /path detail"))

    mb = _open(mbox, defer_to_thread=broken)
    mb.deleteMessage(0)
    results: list[Any] = []
    mb.sync().addBoth(results.append)
    mb.close()
    assert results[0].check(CommitFailed)
    assert "secret" not in results[0].value.text


def test_default_defer_to_thread(mbox: Path) -> None:
    """
    Without C{defer_to_thread} the mailbox uses Twisted's C{deferToThread}.
    """
    from twisted.internet.threads import deferToThread

    mb = open_maildrop(str(mbox))
    try:
        assert mb._defer_to_thread is deferToThread
    finally:
        mb.close()


def test_missing_directory_with_index_dir(tmp_path: Path) -> None:
    """
    With state files in C{index_dir}, an mbox whose directory does not
    exist is an empty maildrop too.
    """
    mb = _open(tmp_path / "no-such-dir" / "user", index_dir=str(tmp_path))
    assert mb.listMessages() == []
    mb.close()


def test_symlinked_mbox_is_refused(tmp_path: Path) -> None:
    """An mbox path that is a symlink is not followed: the maildrop is unavailable."""
    from pop3srv.core.errors import MaildropUnavailable
    from pop3srv.mbox import open_maildrop
    from pop3srv.mbox.testing import synchronous_defer_to_thread

    victim = tmp_path / "victim"
    victim.write_bytes(b"From a\nSubject: secret\n\nx\n")
    link = tmp_path / "attacker"
    link.symlink_to(victim)
    with pytest.raises(MaildropUnavailable):
        open_maildrop(str(link), defer_to_thread=synchronous_defer_to_thread, lock_timeout=1)
    assert victim.read_bytes() == b"From a\nSubject: secret\n\nx\n"
