"""
Tests for L{pop3srv.mbox.commit}: in-place commits and crash recovery.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mboxchild import open_in_child
from twisted.internet.defer import Deferred

from pop3srv.core.errors import (
    CommitFailed,
    MaildropChanged,
    MaildropInUse,
    MaildropUnavailable,
)
from pop3srv.mbox import commit as commit_module
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.commit import recover
from pop3srv.mbox.mailbox import MboxMailbox
from pop3srv.mbox.paths import state_paths
from pop3srv.mbox.testing import synchronous_defer_to_thread


def _message(tag: str, size: int = 0) -> bytes:
    filler = (f"line of {tag}\n" * (size // 12 + 1))[:size] if size else ""
    return (
        f"From {tag}@example.org Thu Jan  1 00:00:00 2026\nSubject: {tag}\n\nbody {tag}\n{filler}\n"
    ).encode()


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=12).digest()


def _open(path: Path) -> MboxMailbox:
    return open_maildrop(str(path), defer_to_thread=synchronous_defer_to_thread, lock_timeout=2)


def _sync(mb: MboxMailbox) -> Any:
    results: list[Any] = []
    mb.sync().addBoth(results.append)
    assert len(results) == 1
    return results[0]


def _digests(path: Path) -> list[bytes]:
    mb = _open(path)
    try:
        return [r.digest for r in mb._index.records]
    finally:
        mb.close()


class SimulatedCrash(Exception):
    """Raised by the fault hook to stop a commit at a named point."""


@pytest.fixture
def messages() -> list[bytes]:
    """Five distinct raw messages, separator included."""
    return [_message(tag, 300 * i) for i, tag in enumerate("abcde")]


@pytest.fixture
def mbox(tmp_path: Path, messages: list[bytes]) -> Path:
    """An mbox holding C{messages}."""
    path = tmp_path / "user"
    path.write_bytes(b"".join(messages))
    return path


def test_deletions_durable_in_place(mbox: Path, messages: list[bytes]) -> None:
    """
    A commit removes exactly the deleted messages and keeps the inode,
    owner and mode; no journal or temporary file is left.
    """
    os.chmod(mbox, 0o620)
    before = mbox.stat()
    entries = set(os.listdir(mbox.parent))
    mb = _open(mbox)
    uidls = [mb.getUidl(i) for i in range(5)]
    mb.deleteMessage(0)
    mb.deleteMessage(3)
    assert _sync(mb) is None
    mb.close()
    assert mbox.read_bytes() == messages[1] + messages[2] + messages[4]
    after = mbox.stat()
    assert (after.st_ino, after.st_dev, after.st_uid, after.st_gid, after.st_mode) == (
        before.st_ino,
        before.st_dev,
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert set(os.listdir(mbox.parent)) == entries | {".user.pop3srv-index", ".user.pop3srv-lock"}
    mb = _open(mbox)
    assert mb._index.scanned_from is None
    assert [mb.getUidl(i) for i in range(3)] == [uidls[1], uidls[2], uidls[4]]
    mb.close()


def test_mailbox_state_after_sync(mbox: Path, messages: list[bytes]) -> None:
    """
    After a successful sync the session sees the new file: marks are
    cleared and messages read back correctly.
    """
    mb = _open(mbox)
    mb.deleteMessage(1)
    assert _sync(mb) is None
    assert len(mb.listMessages()) == 4  # type: ignore[arg-type]
    assert mb.getMessage(1).read().startswith(b"Subject: c\n")
    mb.close()


def test_sync_without_deletions_does_nothing(mbox: Path) -> None:
    """
    With nothing deleted, sync fires at once without locking or touching
    the file (a foreign dotlock does not delay it).
    """
    Path(str(mbox) + ".lock").write_text("1 elsewhere\n")
    mb = _open_nolock(mbox)
    before = mbox.stat()
    started = time.monotonic()
    assert _sync(mb) is None
    assert time.monotonic() - started < 0.5
    assert mbox.stat().st_mtime_ns == before.st_mtime_ns
    mb.close()


def _open_nolock(path: Path) -> MboxMailbox:
    dotlock = Path(str(path) + ".lock")
    saved = dotlock.read_bytes()
    dotlock.unlink()
    try:
        return _open(path)
    finally:
        dotlock.write_bytes(saved)


def test_append_during_session_survives(mbox: Path, messages: list[bytes]) -> None:
    """
    Mail an MTA appends between open and sync is kept after the commit,
    and indexed (only it) on the next open.
    """
    mb = _open(mbox)
    uidls = [mb.getUidl(i) for i in range(5)]
    mb.deleteMessage(1)
    with mbox.open("ab") as f:
        f.write(_message("late"))
    assert _sync(mb) is None
    mb.close()
    kept = [m for i, m in enumerate(messages) if i != 1]
    assert mbox.read_bytes() == b"".join(kept) + _message("late")
    mb = _open(mbox)
    assert mb._index.scanned_from == mb._index.records[3].start
    assert [mb.getUidl(i) for i in range(4)] == [uidls[0], *uidls[2:]]
    assert mb.getMessage(4).read() == b"Subject: late\n\nbody late\n"
    mb.close()


def test_mbox_created_during_session(tmp_path: Path) -> None:
    """
    A missing mbox is an empty maildrop; one delivered during the session
    is left alone.
    """
    path = tmp_path / "new"
    mb = _open(path)
    assert mb.listMessages() == []
    path.write_bytes(_message("x"))
    assert _sync(mb) is None
    mb.close()
    assert path.read_bytes() == _message("x")
    assert len(_digests(path)) == 1


@pytest.mark.parametrize("change", ["rewrite", "replace", "truncate"])
def test_maildrop_changed(mbox: Path, tmp_path: Path, change: str) -> None:
    """
    If another program rewrote, replaced or truncated the mbox during the
    session, sync fails with L{MaildropChanged} and leaves it untouched.
    """
    mb = _open(mbox)
    mb.deleteMessage(1)
    data = mbox.read_bytes()
    if change == "rewrite":
        data = data.replace(b"body d", b"BODY d")
        with mbox.open("r+b") as f:
            f.write(data)
    elif change == "replace":
        other = tmp_path / "other"
        other.write_bytes(data)
        os.replace(other, mbox)
    else:
        data = data[: data.index(b"From e")]
        with mbox.open("r+b") as f:
            f.truncate(len(data))
    result = _sync(mb)
    mb.close()
    assert result.check(MaildropChanged)
    assert mbox.read_bytes() == data
    assert not Path(state_paths(str(mbox)).journal).exists()


def test_failure_before_commit_point(
    mbox: Path, messages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An I/O error while writing the journal fails the sync with
    L{CommitFailed}, leaving the mbox and its directory as they were.
    """

    def broken(self: object, header: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commit_module._JournalWriter, "install", broken)
    entries = set(os.listdir(mbox.parent))
    mb = _open(mbox)
    mb.deleteMessage(0)
    result = _sync(mb)
    mb.close()
    assert result.check(CommitFailed)
    assert mbox.read_bytes() == b"".join(messages)
    assert set(os.listdir(mbox.parent)) == entries | {".user.pop3srv-index", ".user.pop3srv-lock"}


_POINTS = list(commit_module.FAULT_POINTS)


class PowerCut:
    """
    Emulates what a power cut can leave on disk: the data written to a file
    that no C{fsync}/C{fdatasync} of that file has covered yet may be lost,
    while a truncate issued after it was kept (the disk may order them so).
    Every C{os.pwrite} is recorded with the bytes it overwrote until the
    file is synced; L{cut} puts those bytes back (within the file's size
    at that moment) and keeps any truncate.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self._directory = directory
        self._undo: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: Any, offset: int) -> int:
            st = os.fstat(fd)
            old = os.pread(fd, len(data), offset)
            self._undo.setdefault((st.st_dev, st.st_ino), []).append((offset, old))
            return real_pwrite(fd, data, offset)

        def syncing(real: Callable[[int], None]) -> Callable[[int], None]:
            def sync(fd: int) -> None:
                real(fd)
                st = os.fstat(fd)
                self._undo.pop((st.st_dev, st.st_ino), None)

            return sync

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fsync", syncing(os.fsync))
        monkeypatch.setattr(os, "fdatasync", syncing(os.fdatasync))

    def cut(self) -> None:
        """
        Lose every write not yet synced.
        """
        files: dict[tuple[int, int], Path] = {}
        for entry in self._directory.iterdir():
            st = entry.lstat()
            if stat.S_ISREG(st.st_mode):
                files[(st.st_dev, st.st_ino)] = entry
        for key, undo in self._undo.items():
            path = files.get(key)
            if path is None:
                continue
            with path.open("r+b") as f:
                size = os.fstat(f.fileno()).st_size
                for offset, old in reversed(undo):
                    if offset < size:
                        f.seek(offset)
                        f.write(old[: size - offset])
        self._undo.clear()


def _crash_at(point: str, power_cut: PowerCut | None = None) -> Callable[[str], None]:
    def crash(where: str) -> None:
        if where == point:
            if power_cut is not None:
                power_cut.cut()
            raise SimulatedCrash(where)

    return crash


@pytest.mark.parametrize("point", _POINTS)
@pytest.mark.parametrize("late_mail", [False, True])
@pytest.mark.parametrize("deleted", [(0,), (1, 3), (4,), (0, 1, 2, 3, 4)])
@pytest.mark.parametrize("power", [False, True], ids=["crash", "power_cut"])
def test_crash_recovery(
    mbox: Path,
    messages: list[bytes],
    point: str,
    late_mail: bool,
    deleted: tuple[int, ...],
    power: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A commit stopped after any phase of applying its journal is finished
    by the next open, which yields exactly the new mailbox, plus any mail
    an MDA appended after the crash (before or after the truncate).

    With C{power_cut}, every write not yet synced when the commit stops is
    lost and a truncate already issued is kept: the disk may have written
    the truncate before the payload.  Nothing is lost or duplicated then
    either.
    """
    crash = _crash_at(point, PowerCut(monkeypatch, mbox.parent) if power else None)
    mb = _open(mbox)
    mb._fault = crash
    for i in deleted:
        mb.deleteMessage(i)
    assert _sync(mb).check(CommitFailed)
    mb.close()
    journal = Path(state_paths(str(mbox)).journal)
    assert journal.exists()
    expected = b"".join(m for i, m in enumerate(messages) if i not in deleted)
    if late_mail:
        with mbox.open("ab") as f:
            f.write(_message("late"))
        expected += _message("late")
    mb = _open(mbox)
    try:
        assert [r.digest for r in mb._index.records] == [
            _digest(m)
            for m in [m for i, m in enumerate(messages) if i not in deleted]
            + ([_message("late")] if late_mail else [])
        ]
    finally:
        mb.close()
    assert mbox.read_bytes() == expected
    assert not journal.exists()


@pytest.mark.parametrize("point", _POINTS[1:])
def test_crash_during_recovery(mbox: Path, messages: list[bytes], point: str) -> None:
    """
    Recovery that itself crashes (after re-journalling late mail) is
    finished by the next open.
    """

    def crash_at(name: str) -> Any:
        def crash(where: str) -> None:
            if where == name:
                raise SimulatedCrash(where)

        return crash

    mb = _open(mbox)
    mb._fault = crash_at("payload_written")
    mb.deleteMessage(0)
    assert _sync(mb).check(CommitFailed)
    mb.close()
    with mbox.open("ab") as f:
        f.write(_message("late1"))
    paths = state_paths(str(mbox))
    with pytest.raises(SimulatedCrash):
        recover(paths.mbox, paths.journal, fault=crash_at(point))
    with mbox.open("ab") as f:
        f.write(_message("late2"))
    expected = b"".join(messages[1:]) + _message("late1") + _message("late2")
    assert len(_digests(mbox)) == 6
    assert mbox.read_bytes() == expected


@pytest.mark.parametrize("kind", ["garbage", "foreign"])
def test_invalid_journal_discarded(mbox: Path, tmp_path: Path, kind: str) -> None:
    """
    A damaged journal, or one made for another file, is removed without
    touching the mbox.
    """
    journal = Path(state_paths(str(mbox)).journal)
    if kind == "garbage":
        journal.write_bytes(os.urandom(500))
    else:
        other = tmp_path / "other"
        other.write_bytes(mbox.read_bytes())
        mb = _open(other)
        mb._fault = _crash_always
        mb.deleteMessage(0)
        assert _sync(mb).check(CommitFailed)
        mb.close()
        os.replace(state_paths(str(other)).journal, journal)
    before = mbox.read_bytes()
    assert len(_digests(mbox)) == 5
    assert mbox.read_bytes() == before
    assert not journal.exists()


def _crash_always(where: str) -> None:
    raise SimulatedCrash(where)


_KILL_SCRIPT = """
import sys
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.testing import synchronous_defer_to_thread
mb = open_maildrop(sys.argv[1], defer_to_thread=synchronous_defer_to_thread)
for i in map(int, sys.argv[2].split(",")):
    mb.deleteMessage(i)
print("ready", flush=True)
result = []
mb.sync().addBoth(result.append)
print("done", result, flush=True)
"""


def test_sigkill_during_commit(tmp_path: Path) -> None:
    """
    A process committing deletions on a few-MB mbox is SIGKILLed at random
    moments; every later open sees the old or the new message list, never
    anything else.
    """
    rng = random.Random(1939)
    messages = [_message(f"m{i}", 20_000 + i) for i in range(200)]
    template = b"".join(messages)
    deleted = [0, 7, 50, 199]
    old = [_digest(m) for m in messages]
    new = [_digest(m) for i, m in enumerate(messages) if i not in deleted]
    arg = ",".join(map(str, deleted))

    def run(n: int, kill_after: float | None) -> tuple[Path, float, bool]:
        work = tmp_path / f"run{n}"
        work.mkdir()
        path = work / "mbox"
        path.write_bytes(template)
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_SCRIPT, str(path), arg],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        ready = time.monotonic()
        if kill_after is None:
            assert proc.stdout.readline().startswith("done [None]")
        else:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        elapsed = time.monotonic() - ready
        proc.stdout.close()
        journal = Path(state_paths(str(path)).journal).exists()
        return path, elapsed, journal

    path, duration, _ = run(0, None)
    assert _digests(path) == new
    outcomes = []
    for n in range(1, 11):
        path, _, journal = run(n, rng.uniform(0, duration * 1.2))
        got = _digests(path)
        assert got in (old, new)
        outcomes.append((got == new, journal))
        assert _digests(path) == got
        assert sorted(os.listdir(path.parent)) == [
            ".mbox.pop3srv-index",
            ".mbox.pop3srv-lock",
            "mbox",
        ]
    print("commit took", duration, "outcomes (new?, journal left?)", outcomes)


def test_stale_temporary_files_removed(mbox: Path) -> None:
    """
    Temporary journal and index files left by a killed process are
    removed when the maildrop is next opened.
    """
    paths = state_paths(str(mbox))
    debris = [Path(paths.journal + ".x1.tmp"), Path(paths.index + ".x2.tmp")]
    for p in debris:
        p.write_bytes(b"partial")
    _open(mbox).close()
    assert not any(p.exists() for p in debris)


def test_close_during_commit_waits(mbox: Path, messages: list[bytes]) -> None:
    """
    A close() while the commit runs in a worker is carried out when the
    commit ends, so the worker never sees its descriptor closed.
    """
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    pending: Deferred[Any] = Deferred()

    def later(f: Any, *args: Any) -> Deferred[Any]:
        calls.append((f, args))
        return pending

    mb = open_maildrop(str(mbox), defer_to_thread=later)
    mb.deleteMessage(0)
    results: list[Any] = []
    mb.sync().addBoth(results.append)
    mb.close()
    with pytest.raises(MaildropInUse):
        _open(mbox)
    f, args = calls[0]
    pending.callback(f(*args))
    assert results == [None]
    assert mbox.read_bytes() == b"".join(messages[1:])
    _open(mbox).close()


def test_recover_without_mbox(tmp_path: Path) -> None:
    """
    With no mbox file there is nothing to recover and nothing is touched.
    """
    paths = state_paths(str(tmp_path / "gone"))
    Path(paths.journal).write_bytes(b"whatever")
    assert recover(paths.mbox, paths.journal) is False
    assert Path(paths.journal).read_bytes() == b"whatever"
    assert not Path(paths.mbox).exists()


def test_apply_failure_after_commit_point(
    mbox: Path, messages: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An I/O error after the journal is durable does not fail the sync: the
    deletions are decided, and the next open applies them.
    """
    real_ftruncate = os.ftruncate

    def failing(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", failing)
    mb = _open(mbox)
    mb.deleteMessage(2)
    assert _sync(mb) is None
    assert mb.listMessages() == []
    mb.close()
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    assert _digests(mbox) == [_digest(m) for i, m in enumerate(messages) if i != 2]
    assert not Path(state_paths(str(mbox)).journal).exists()


def test_journal_set_aside_when_file_rewritten_after_crash(
    mbox: Path, messages: list[bytes]
) -> None:
    """
    After a crash past the truncate, if another program rewrites the mbox
    before the next open, the journal no longer fits: it is kept aside, not
    applied (applying it would duplicate mail).
    """

    def crash(where: str) -> None:
        if where == "truncated":
            raise SimulatedCrash(where)

    mb = _open(mbox)
    mb._fault = crash
    mb.deleteMessage(1)
    assert _sync(mb).check(CommitFailed)
    mb.close()
    rewritten = b"".join(m for i, m in enumerate(messages) if i not in (0, 1))
    with mbox.open("r+b") as f:  # an MUA deletes message 0 in place
        f.write(rewritten)
        f.truncate(len(rewritten))
    journal = Path(state_paths(str(mbox)).journal)
    assert recover(str(mbox), str(journal)) is False
    assert mbox.read_bytes() == rewritten
    assert not journal.exists()
    assert list(journal.parent.glob(journal.name + ".rejected-*"))


def test_stale_index_is_dropped_after_maildrop_changed(tmp_path: Path) -> None:
    """
    A same-length edit in the middle plus an append can fool the grown-only
    index check; the commit then refuses, and the index is dropped so that
    the next session rescans and can delete mail again.
    """
    path = tmp_path / "mb"
    body = b"y" * 8000 + b"\n\n"
    path.write_bytes(b"".join(b"From x\nSubject: %d\nStatus: O\n\n" % i + body for i in range(3)))
    _open(path).close()
    data = bytearray(path.read_bytes())
    flag = data.find(b"Subject: 1\nStatus: O") + len(b"Subject: 1\nStatus: ")
    data[flag : flag + 1] = b"R"
    path.write_bytes(bytes(data))
    with path.open("ab") as f:
        f.write(b"From z\nSubject: new\n\nhi\n\n")
    outcomes = []
    for _ in range(2):
        mb = _open(path)
        mb.deleteMessage(0)
        result = _sync(mb)
        mb.close()
        outcomes.append(result is None)
    assert outcomes[1], "the second session must be able to delete"


def test_failure_after_commit_point_says_deletions_pending(mbox: Path) -> None:
    """An error after the journal is written is not reported as 'mailbox unchanged'."""
    from pop3srv.core.errors import CommitPending

    def crash(where: str) -> None:
        if where == "payload_partial":
            raise SimulatedCrash(where)

    mb = _open(mbox)
    mb._fault = crash
    mb.deleteMessage(0)
    result = _sync(mb)
    mb.close()
    assert result.check(CommitPending)
    assert "unchanged" not in result.value.text
    assert len(_digests(mbox)) == 4  # the next open completed the commit


@pytest.mark.parametrize("power", [False, True], ids=["crash", "power_cut"])
def test_delivery_identical_to_the_cut_survives_recovery(
    mbox: Path, messages: list[bytes], power: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A crash just after the truncate, then an MDA delivers a message
    byte-identical to the one the commit cut off: the file looks as it did
    before the commit, yet recovery keeps the fresh delivery.
    """
    mb = _open(mbox)
    mb._fault = _crash_at("truncated", PowerCut(monkeypatch, mbox.parent) if power else None)
    mb.deleteMessage(4)
    assert _sync(mb).check(CommitFailed)
    mb.close()
    assert mbox.read_bytes() == b"".join(messages[:4])
    with mbox.open("ab") as f:
        f.write(messages[4])
    assert _digests(mbox) == [_digest(m) for m in messages]
    assert mbox.read_bytes() == b"".join(messages)
    assert not Path(state_paths(str(mbox)).journal).exists()


@pytest.mark.parametrize("state", ["untouched", "payload_written", "truncated"])
@pytest.mark.parametrize("late_mail", [False, True])
def test_legacy_journal_recovered(
    mbox: Path, messages: list[bytes], state: str, late_mail: bool
) -> None:
    """
    A journal in the format of earlier releases (no phase slot, no cut
    mark), left by a crash before, between or after its writes, is still
    applied by the next open, keeping mail delivered since.
    """
    old = mbox.read_bytes()
    st = mbox.stat()
    start = len(messages[0])
    payload = b"".join(messages[2:])
    new_size = start + len(payload)
    header = commit_module.JournalHeader(
        dev=st.st_dev,
        ino=st.st_ino,
        start=start,
        old_size=len(old),
        new_size=new_size,
        cut_hash=hashlib.blake2b(old[new_size:], digest_size=32).digest(),
        payload_hash=hashlib.blake2b(payload, digest_size=32).digest(),
        version=commit_module.LEGACY_VERSION,
    )
    journal = Path(state_paths(str(mbox)).journal)
    journal.write_bytes(header.encode() + payload)
    data = old
    if state != "untouched":
        data = old[:start] + payload + old[new_size:]
    if state == "truncated":
        data = data[:new_size]
    kept = [messages[0], *messages[2:]]
    if late_mail:
        data += _message("late")
        kept.append(_message("late"))
    with mbox.open("r+b") as f:  # in place: the journal names this inode
        f.write(data)
        f.truncate(len(data))
    assert _digests(mbox) == [_digest(m) for m in kept]
    assert mbox.read_bytes() == b"".join(kept)
    assert not journal.exists()


def test_journal_header_versions_round_trip() -> None:
    """
    Both journal formats decode to what was encoded; other versions and
    impossible sizes are refused.
    """
    fields: dict[str, Any] = {
        "dev": 1,
        "ino": 2,
        "start": 10,
        "old_size": 100,
        "new_size": 60,
        "cut_hash": bytes(32),
        "payload_hash": bytes(range(32)),
    }
    for version in (commit_module.VERSION, commit_module.LEGACY_VERSION):
        header = commit_module.JournalHeader(**fields, version=version)
        assert commit_module.JournalHeader.decode(header.encode()) == header
    for bad in ({"version": 3}, {"version": 0}, {"new_size": 101}):
        header = commit_module.JournalHeader(**{**fields, **bad})
        assert commit_module.JournalHeader.decode(header.encode()) is None


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "foreign_journal"])
def test_unsafe_journal_refuses_maildrop(mbox: Path, tmp_path: Path, kind: str) -> None:
    """
    A journal that is a symlink (to C{/dev/zero}, or to a real journal
    elsewhere) or a FIFO is neither followed nor read nor blocked on, nor
    ignored: the maildrop is refused as temporarily unavailable, and the
    journal and the mbox are left as they are for the admin.
    """
    journal = Path(state_paths(str(mbox)).journal)
    if kind == "dev_zero":
        journal.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(journal)
    else:
        other = tmp_path / "elsewhere" / "user"
        other.parent.mkdir()
        other.write_bytes(mbox.read_bytes())
        mb = _open(other)
        mb._fault = _crash_always
        mb.deleteMessage(0)
        assert _sync(mb).check(CommitFailed)
        mb.close()
        journal.symlink_to(state_paths(str(other)).journal)
    before = mbox.read_bytes()
    assert open_in_child(mbox) == "unavailable UnsafeStateFile"
    assert mbox.read_bytes() == before
    assert os.path.lexists(journal)
    with pytest.raises(MaildropUnavailable):
        recover(str(mbox), str(journal))
