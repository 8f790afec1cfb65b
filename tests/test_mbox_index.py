"""
Tests for L{pop3srv.mbox.index}: persisted UIDLs and incremental reopening.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mboxchild import open_in_child

from pop3srv.mbox import index as index_module
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.index import (
    IndexRecord,
    MboxIndex,
    RecordTable,
    decode_index,
    encode_index,
    read_index,
)
from pop3srv.mbox.mailbox import MboxMailbox
from pop3srv.mbox.paths import state_paths
from pop3srv.mbox.scan import MessageRecord
from pop3srv.mbox.scan import scan_mbox as real_scan
from pop3srv.mbox.testing import synchronous_defer_to_thread


def _message(tag: str, body: str = "body") -> bytes:
    return f"From {tag}@example.org Thu Jan  1 00:00:00 2026\nSubject: {tag}\n\n{body}\n\n".encode()


def _open(path: Path) -> MboxMailbox:
    return open_maildrop(str(path), defer_to_thread=synchronous_defer_to_thread)


def _uidls(path: Path) -> list[bytes]:
    mb = _open(path)
    try:
        return [mb.getUidl(i) for i in range(len(mb.listMessages()))]  # type: ignore[arg-type]
    finally:
        mb.close()


def _loaded(path: Path) -> MboxIndex:
    mb = _open(path)
    mb.close()
    return mb._index


def _delete(path: Path, *indexes: int) -> None:
    mb = _open(path)
    try:
        for i in indexes:
            mb.deleteMessage(i)
        results: list[object] = []
        mb.sync().addBoth(results.append)
        assert results == [None]
    finally:
        mb.close()


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    """An mbox with three distinct messages."""
    path = tmp_path / "user"
    path.write_bytes(_message("a") + _message("b") + _message("c"))
    return path


def test_uidl_stable_across_reopen(mbox: Path) -> None:
    """
    The second open uses the stored index as is and gives the same UIDLs,
    which are 24 hex digits.
    """
    first = _uidls(mbox)
    assert _loaded(mbox).scanned_from is None
    assert _uidls(mbox) == first
    assert all(len(u) == 24 and int(u, 16) >= 0 for u in first)
    assert len(set(first)) == 3


def test_index_beside_mbox_or_in_index_dir(mbox: Path, tmp_path: Path) -> None:
    """
    Without C{index_dir} the index is a hidden file beside the mbox; with
    it, a file in that directory whose name carries the mbox's basename.
    """
    _uidls(mbox)
    assert (tmp_path / ".user.pop3srv-index").exists()
    state = tmp_path / "state"
    state.mkdir()
    mb = open_maildrop(str(mbox), index_dir=str(state))
    mb.close()
    paths = state_paths(str(mbox), str(state))
    assert Path(paths.index).exists()
    assert Path(paths.index).parent == state
    assert Path(paths.index).name.endswith("-user.pop3srv-index")


def test_uidl_stable_across_deletion_of_others(mbox: Path) -> None:
    """
    Committing the deletion of one message leaves the others' UIDLs alone.
    """
    before = _uidls(mbox)
    _delete(mbox, 1)
    assert _uidls(mbox) == [before[0], before[2]]
    assert _loaded(mbox).scanned_from is None


def test_append_scans_only_new_part(mbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    When the same file only grew, the scan starts at the last indexed
    message, and old UIDLs stay.
    """
    before = _uidls(mbox)
    last_start = _loaded(mbox).records[-1].start
    with mbox.open("ab") as f:
        f.write(_message("d"))
    starts: list[int] = []

    def spy(
        fileobj: BinaryIO, start: int = 0, limit: int | None = None, **kwargs: Any
    ) -> Iterator[MessageRecord]:
        starts.append(start)
        return real_scan(fileobj, start, limit, **kwargs)

    monkeypatch.setattr(index_module, "scan_mbox", spy)
    after = _uidls(mbox)
    assert starts == [last_start]
    assert after[:3] == before
    assert len(after) == 4


def test_append_after_changed_last_message_rescans(mbox: Path) -> None:
    """
    If the last indexed message changed as well as the file growing, the
    whole file is scanned again.
    """
    _uidls(mbox)
    data = mbox.read_bytes()
    mbox.write_bytes(data[:-3] + b"X\n\n" + _message("d"))
    idx = _loaded(mbox)
    assert idx.scanned_from == 0
    assert len(idx.records) == 4


def test_identical_deliveries(tmp_path: Path) -> None:
    """
    Identical messages get distinct UIDLs; deleting the first keeps the
    second's; a new identical arrival gets an ordinal never used before.
    """
    path = tmp_path / "dup"
    same = _message("same")
    path.write_bytes(_message("x") + same + same)
    uidls = _uidls(path)
    plain = uidls[1]
    assert uidls[2] == plain + b".1"
    _delete(path, 1)
    assert _uidls(path) == [uidls[0], plain + b".1"]
    with path.open("ab") as f:
        f.write(same)
    assert _uidls(path) == [uidls[0], plain + b".1", plain + b".2"]
    _delete(path, 1, 2)
    with path.open("ab") as f:
        f.write(same)
    assert _uidls(path) == [uidls[0], plain + b".3"]


def _corrupt_variants(good: bytes) -> list[bytes]:
    idx = decode_index(good)
    assert idx is not None
    wrong_version = bytearray(good)
    wrong_version[8] ^= 0xFF
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    old_version_index = index_module.VERSION
    try:
        index_module.VERSION = old_version_index + 1
        other_version = encode_index(idx)
    finally:
        index_module.VERSION = old_version_index
    return [
        os.urandom(len(good)),
        good[: len(good) // 2],
        good[:10],
        b"",
        bytes(wrong_version),
        bytes(flipped),
        other_version,
    ]


def test_damaged_index_rebuilt(mbox: Path, tmp_path: Path) -> None:
    """
    Random bytes, truncation, a flipped bit or another version: the index
    is rebuilt by a full scan with the same UIDLs, never trusted.
    """
    before = _uidls(mbox)
    index_path = tmp_path / ".user.pop3srv-index"
    good = index_path.read_bytes()
    for bad in _corrupt_variants(good):
        index_path.write_bytes(bad)
        assert read_index(str(index_path)) is None or bad == good
        idx = _loaded(mbox)
        assert idx.scanned_from == 0
        assert [r.uidl for r in idx.records] == before
        assert read_index(str(index_path)) is not None


def test_file_replaced_by_other_program(mbox: Path, tmp_path: Path) -> None:
    """
    A new inode renamed over the mbox is indexed afresh; messages whose
    bytes are unchanged keep their UIDLs.
    """
    before = _uidls(mbox)
    data = mbox.read_bytes()
    replacement = tmp_path / "new"
    replacement.write_bytes(data[: data.index(b"From c")] + _message("z"))
    os.replace(replacement, mbox)
    idx = _loaded(mbox)
    assert idx.scanned_from == 0
    uidls = [r.uidl for r in idx.records]
    assert uidls[:2] == before[:2]
    assert uidls[2] not in before


def test_file_truncated_by_other_program(mbox: Path) -> None:
    """
    A file that shrank is scanned again from the start.
    """
    before = _uidls(mbox)
    data = mbox.read_bytes()
    with mbox.open("r+b") as f:
        f.truncate(data.index(b"From b"))
    idx = _loaded(mbox)
    assert idx.scanned_from == 0
    assert [r.uidl for r in idx.records] == before[:1]


def test_same_size_and_mtime_rewrite_detected(mbox: Path) -> None:
    """
    A rewrite that keeps inode, size and mtime (as inode reuse with a
    coarse clock could) is caught by the content probes.
    """
    before = _uidls(mbox)
    st = mbox.stat()
    data = mbox.read_bytes().replace(b"Subject: c", b"Subject: C")
    with mbox.open("r+b") as f:
        f.write(data)
    os.utime(mbox, ns=(st.st_atime_ns, st.st_mtime_ns))
    idx = _loaded(mbox)
    assert idx.scanned_from == 0
    assert [r.uidl for r in idx.records][:2] == before[:2]
    assert idx.records[2].uidl != before[2]


def test_unwritable_index_is_not_fatal(mbox: Path) -> None:
    """
    If the index cannot be written (here its path is a directory) the
    maildrop still opens, from a fresh scan each time.
    """
    Path(state_paths(str(mbox)).index).mkdir()
    assert len(_uidls(mbox)) == 3
    assert _loaded(mbox).scanned_from == 0


_RECORDS = st.lists(
    st.builds(
        IndexRecord,
        st.integers(0, 2**63 - 1),
        st.integers(0, 2**63 - 1),
        st.integers(0, 2**63 - 1),
        st.integers(0, 2**63 - 1),
        st.binary(min_size=12, max_size=12),
        st.integers(0, 2**32 - 1),
        st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=3).map(
            tuple
        ),
        st.none() | st.binary(min_size=1, max_size=70),
        st.booleans(),
    ),
    max_size=20,
)


@given(_RECORDS, st.integers(-25, 25), st.integers(-25, 25))
def test_record_table_behaves_like_the_list(records: list[IndexRecord], i: int, j: int) -> None:
    """
    Packed records read back as the list they came from, however indexed,
    with their hidden ranges, pinned UIDLs and whether those are decided;
    so does an index file that holds them.
    """
    table = RecordTable.pack(records)
    assert len(table) == len(records) and list(table) == records
    assert table == records and table == RecordTable(table.data, table.extras)
    assert table.undecided == any(not r.decided for r in records)
    assert table.pinned_uidls() == {r.pinned for r in records if r.pinned is not None and r.decided}
    decoded = decode_index(encode_index(MboxIndex(1, 2, 3, 4, table, uidvalidity=5, next_uid=6)))
    assert decoded is not None and list(decoded.records) == records
    assert (decoded.uidvalidity, decoded.next_uid, decoded.prev_uid) == (5, 6, 0)
    assert RecordTable.pack(decoded.records).undecided == table.undecided
    assert table.sizes() == [r.size for r in records]
    assert table[i:j] == records[i:j]
    if -len(records) <= i < len(records):
        assert table[i] == records[i]
    else:
        with pytest.raises(IndexError):
            table[i]
    assert RecordTable.pack(table) is table


def test_a_loaded_index_holds_packed_records(tmp_path: Path) -> None:
    """Scanned, grown or read back, the records are one packed buffer."""
    mbox = tmp_path / "mbox"
    mbox.write_bytes(b"From a\n\nx\n\nFrom b\n\ny\n")
    first = _loaded(mbox)
    assert isinstance(first.records, RecordTable) and len(first.records) == 2
    with open(mbox, "ab") as f:
        f.write(b"\nFrom c\n\nz\n")
    grown = _loaded(mbox)
    assert isinstance(grown.records, RecordTable) and grown.scanned_from is not None
    assert list(grown.records)[:1] == list(first.records)[:1] and len(grown.records) == 3
    again = _loaded(mbox)
    assert again.scanned_from is None and again.records == grown.records


def test_same_size_rewrite_keeping_ends_and_mtime_detected(tmp_path: Path) -> None:
    """
    An in-place rewrite that keeps size, mtime and the first and last
    4 KiB, but shortens one message and lengthens a later one (so every
    message start between them moves), is caught by the sample of message
    starts: the file is scanned again, and only the two edited messages get
    new UIDLs.
    """
    path = tmp_path / "user"
    messages = [_message(f"m{i:02d}", "x" * 300) for i in range(40)]
    path.write_bytes(b"".join(messages))
    before = _uidls(path)
    old = path.read_bytes()
    st = path.stat()
    edited = list(messages)
    edited[15] = _message("m15", "x" * 299)
    edited[25] = _message("m25", "x" * 301)
    data = b"".join(edited)
    span = index_module.PROBE_SPAN
    assert len(data) == len(old) and data[:span] == old[:span] and data[-span:] == old[-span:]
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    idx = _loaded(path)
    assert idx.scanned_from == 0
    starts = [sum(map(len, edited[:i])) for i in range(len(edited))]
    assert [r.start for r in idx.records] == starts
    uidls = [r.uidl for r in idx.records]
    assert [u for i, u in enumerate(uidls) if i not in (15, 25)] == [
        u for i, u in enumerate(before) if i not in (15, 25)
    ]
    assert uidls[15] not in before and uidls[25] not in before


def test_trusting_an_index_reads_a_bounded_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Reopening a large mbox whose index is current reads the two probes and
    at most L{index_module.BOUNDARY_SAMPLES} message starts, not every
    message.
    """
    path = tmp_path / "user"
    path.write_bytes(b"".join(_message(f"m{i}") for i in range(3000)))
    _uidls(path)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    idx = _loaded(path)
    assert idx.scanned_from is None
    assert len(reads) <= index_module.BOUNDARY_SAMPLES + 2
    assert sum(reads) <= 2 * index_module.PROBE_SPAN + 6 * index_module.BOUNDARY_SAMPLES


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_unsafe_index_ignored_and_replaced(mbox: Path, kind: str) -> None:
    """
    An index that is a symlink to C{/dev/zero} or a FIFO is neither read
    (no memory growth: the child's address space is capped) nor waited on:
    the maildrop opens from a fresh scan, and the planted name is replaced
    by a regular index file.
    """
    index = Path(state_paths(str(mbox)).index)
    if kind == "dev_zero":
        index.symlink_to("/dev/zero")
    else:
        os.mkfifo(index)
    assert open_in_child(mbox) == "opened 3"
    assert index.is_file() and not index.is_symlink()
    assert read_index(str(index)) is not None
    assert _loaded(mbox).scanned_from is None
