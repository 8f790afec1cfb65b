"""
Tests for L{pop3srv.admin.deliver}: the quoting, the From line, the header
fields dropped and the wire size as pure functions, then the real
C{pop3srv deliver} script on real files: mbox appends under the server's
locks (20 at once, while a real POP3 session is open and commits
deletions), a full and a read-only file system, a file it may not write, a
lock that is not released, unknown users, new mboxes in shared spools read
by the server as another user, real stop signals delivered at chosen
system calls (C{strace -e inject}) before and after the commit, Maildir.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import mailbox
import os
import poplib
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server, write_mbox, write_users

from pop3srv.admin.deliver import (
    DROPPED_HEADERS,
    EX_NOUSER,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    from_line,
    maildir_name,
    mbox_entry,
    mboxrd_quote,
    split_from_line,
    strip_metadata_headers,
    wire_size,
)
from pop3srv.maildir.sizes import wire_octets
from pop3srv.mbox.lock import MboxFileLock
from pop3srv.mbox.quoting import unquote
from pop3srv.mbox.scan import scan_mbox

SCRIPT = str(Path(sys.executable).with_name("pop3srv"))
PREFIX = "pop3srv deliver: "
FROM_LINE = re.compile(
    rb"From (?P<sender>\S+) "
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"[ \d]\d \d\d:\d\d:\d\d \d{4}\n"
)


def deliver(
    *args: str | Path,
    message: bytes = b"Subject: x\n\nbody\n",
    prefix: tuple[str, ...] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed C{pop3srv deliver} with C{message} on stdin."""
    return subprocess.run(
        [*prefix, SCRIPT, "deliver", *map(str, args)],
        input=message,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The single line a failed delivery writes on stderr."""
    text = done.stderr.decode()
    assert text.startswith(PREFIX) and text.count("\n") == 1, text
    return text[len(PREFIX) :].strip()


def mbox_messages(path: Path) -> list[bytes]:
    """
    The messages of an mbox as Python's mailbox module splits them, with
    our mboxrd quoting taken off again (Python's module does not un-quote).
    """
    box = mailbox.mbox(str(path), create=False)
    try:
        return [unquote(box.get_bytes(key)) for key in box.keys()]
    finally:
        box.close()


def stored(message: bytes) -> bytes:
    """What an mbox gives back for a delivered C{message}: with a final LF."""
    return message if not message or message.endswith(b"\n") else message + b"\n"


#: The subject UW-IMAP and Dovecot give the internal-data message at the top
#: of an mbox, which the server never serves.
PSEUDO_SUBJECT = b"DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"


def tricky_message(tag: str, rng: random.Random, *, final_newline: bool = True) -> bytes:
    """
    A message with every line an mbox must quote, dot lines, 8-bit octets
    and a unique tag, in C{rng}'s own size (a few to tens of KiB).
    """
    lines = [
        f"Message-ID: <{tag}@deliver.test>".encode(),
        f"Subject: delivery {tag}".encode(),
        b"",
        b"From the very start of the body",
        b">From once quoted",
        b">>>From thrice quoted",
        b"From",
        b"..dot line",
        b".",
    ]
    for _ in range(rng.randrange(20, 400)):
        width = rng.randrange(0, 120)
        lines.append(bytes(rng.choice(b"abc >From.\xe9\xff\x80") for _ in range(width)))
    lines.append(f"end of {tag}".encode())
    body = b"\n".join(lines)
    return body + b"\n" if final_newline else body


# Pure functions.


@given(
    st.lists(
        st.sampled_from([b"From x", b">From y", b">>From ", b"From", b"xFrom ", b"", b"abc", b">"]),
        max_size=30,
    ),
    st.booleans(),
    st.integers(min_value=1, max_value=40),
)
def test_quote_round_trips_through_the_servers_unquoting(
    lines: list[bytes], final: bool, chunk: int
) -> None:
    """
    The server's un-quoting gives back exactly what was quoted, however the
    quoting is split into pieces, and no quoted line begins a message.
    """
    message = b"\n".join(lines) + (b"\n" if final else b"")
    quoted = b"".join(mboxrd_quote(message, chunk))
    assert quoted == b"".join(mboxrd_quote(message))
    assert unquote(quoted) == message
    assert not quoted.startswith(b"From ") and b"\nFrom " not in quoted


def test_from_line() -> None:
    """
    The sender and an asctime date; the null sender is MAILER-DAEMON, angle
    brackets go, and a blank or control character cannot split the line.
    """
    when = time.mktime((2024, 3, 5, 7, 8, 9, 0, 0, -1))
    assert from_line("a@example.org", when) == b"From a@example.org Tue Mar  5 07:08:09 2024\n"
    for null in (None, "", "<>", " "):
        assert from_line(null, when).startswith(b"From MAILER-DAEMON Tue Mar  5 ")
    assert from_line("<b@example.org>", when).startswith(b"From b@example.org ")
    assert from_line('"a b"@x\r\n\x00', when).startswith(b'From "a_b"@x___ Tue')
    assert from_line("b\u00e9@x", when).startswith("From b\u00e9@x ".encode())


def test_split_from_line() -> None:
    """A leading mbox From line is dropped and its sender kept; nothing else is touched."""
    assert split_from_line(b"From a@b Mon Jan  1 00:00:00 2024\nX: y\n") == (b"X: y\n", "a@b")
    assert split_from_line(b"From \n") == (b"", None)
    assert split_from_line(b"X: y\nFrom a\n") == (b"X: y\nFrom a\n", None)
    assert split_from_line(b">From a\n") == (b">From a\n", None)


def test_maildir_name() -> None:
    """Dovecot's form: seconds, M usec, P pid, Q counter, host, S= and W=; unique."""
    first = maildir_name(10, 12, 1700000000.25)
    second = maildir_name(10, 12, 1700000000.25)
    assert re.fullmatch(rf"1700000000\.M250000P{os.getpid()}Q\d+\.[^/:,]+,S=10,W=12", first)
    assert first != second


def test_wire_size_is_what_the_server_counts(tmp_path: Path) -> None:
    """
    The ,W= size is what the server's Maildir store counts as sent (its
    own reading of the file): a bare LF gains a CR, and a last line without
    an LF gains a CRLF; the name carries it.
    """
    path = tmp_path / "m"
    for message in (
        b"",
        b"x",
        b"Subject: x\n\nno final newline",
        b"Subject: y\n\nends\n",
        b"Subject: z\r\n\r\nbare\rcr",
        b"ends in CR\r",
        b"crlf\r\n",
        b"\n",
        b"\r\n\r",
    ):
        path.write_bytes(message)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert wire_size(message) == wire_octets(fd), message
        finally:
            os.close(fd)


@given(st.binary(max_size=64).map(lambda b: bytes(b"ab\r\n"[x % 4] for x in b)))
def test_wire_size_matches_the_server_for_any_line_ends(message: bytes) -> None:
    """Any mix of CR, LF and text: the same count as the server's."""
    read, write = os.pipe()
    try:
        os.write(write, message)
        os.close(write)
        write = -1
        assert wire_size(message) == wire_octets(read)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def test_strip_metadata_headers() -> None:
    """
    The metadata fields go from the header block, continuation lines and
    all, in any case and with blanks before the colon; other fields, fields
    that merely begin alike, and the body stay byte for byte.
    """
    message = (
        b"X-IMAP: 1 99\n"
        b"Received: from a\n\tby b\n"
        b"x-imapbase :  1700000000 5\n"
        b"X-UID: 7\n"
        b"Status: RO\n"
        b"X-Status: A\n"
        b"X-Keywords: $Junk\n  more\n"
        b"Content-Length: 12\n"
        b"X-UIDL: forged\n"
        b"X-IMAPx: kept\n"
        b"Statusbar: kept\n"
        b"X-UIDL-Extra: kept\n"
        b"Subject: s\n"
        b"\n"
        b"X-IMAP: 1 1\n"
        b"Status: body text\n"
    )
    assert strip_metadata_headers(message) == (
        b"Received: from a\n\tby b\n"
        b"X-IMAPx: kept\n"
        b"Statusbar: kept\n"
        b"X-UIDL-Extra: kept\n"
        b"Subject: s\n"
        b"\n"
        b"X-IMAP: 1 1\n"
        b"Status: body text\n"
    )
    crlf = b"Subject: a\r\nSTATUS: O\r\n\tx\r\n\r\nX-UID: 3\r\n"
    assert strip_metadata_headers(crlf) == b"Subject: a\r\n\r\nX-UID: 3\r\n"
    # A header block without a body, and one without a final LF.
    assert strip_metadata_headers(b"A: 1\nX-UID: 5") == b"A: 1"
    assert strip_metadata_headers(b"X-UID: 5\nA: 1") == b"A: 1"
    # No header block: an empty first line.
    for unchanged in (b"\nX-UID: 1\n", b"\r\nStatus: O\n", b"Subject: x\n\nbody\n", b""):
        assert strip_metadata_headers(unchanged) is unchanged


_FIELDS = [
    b"Subject: s",
    b"From: a@b",
    b">From x",
    b"X-IMAPx: 1",
    b"Statusbar: 1",
    b"\tcontinued",
    b" X-UID: 5",
    b"X-IMAP: 1 2",
    b"X-IMAPbase: 3 4",
    b"x-imapbase : 3 4",
    b"X-UID: 5",
    b"Status: RO",
    b"status:O",
    b"X-Status: A",
    b"X-Keywords: k",
    b"Content-Length: 10",
    b"X-UIDL: abc",
    b"X-Uidl\t: def",
    b"Subject: " + PSEUDO_SUBJECT,
]


@given(
    st.lists(st.sampled_from(_FIELDS), max_size=12),
    st.lists(st.sampled_from([*_FIELDS, b"", b"body"]), max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_the_server_finds_no_metadata_in_a_delivered_message(
    header: list[bytes], body: list[bytes], crlf: bool, has_body: bool
) -> None:
    """
    Whatever fields a sender writes, exactly the metadata fields go (a
    line-by-line reading of the header tells which), the body stays as
    sent, and the server's scanner finds nothing to hide and no metadata
    (no internal-data message, no X-UIDL) in what is delivered.
    """
    end = b"\r\n" if crlf else b"\n"
    tail = end + end.join(body) if has_body else b""
    message = (end.join(header) + end if header else b"") + tail
    expected: list[bytes] = []
    dropping = False
    for line in header:
        if line[:1] in (b" ", b"\t"):
            # A continuation line goes with its field.
            if not dropping:
                expected.append(line)
            continue
        name, colon, _ = line.partition(b":")
        dropping = bool(colon) and name.rstrip(b" \t").lower() in DROPPED_HEADERS
        if not dropping:
            expected.append(line)
    stripped = strip_metadata_headers(message)
    assert stripped == (end.join(expected) + end if expected else b"") + tail
    mbox = b"".join(mbox_entry(stripped, "s@x", 0))
    (record,) = scan_mbox(io.BytesIO(mbox))
    assert record.hidden == ()
    assert record.meta is None


# The script on real files.


def test_delivers_to_a_new_mbox(tmp_path: Path) -> None:
    """
    A missing mbox is created (0600); the message gets a From line, the
    quoting, a final LF and the blank separator; Python's mailbox reads it
    back byte for byte.
    """
    rng = random.Random(1)
    messages = [tricky_message("a", rng), tricky_message("b", rng, final_newline=False)]
    for message in messages:
        done = deliver(
            "--mailbox", f"{tmp_path}/{{user}}", "-f", "s@example.org", "alice", message=message
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == b""
    mbox = tmp_path / "alice"
    assert stat.S_IMODE(mbox.stat().st_mode) == 0o600
    data = mbox.read_bytes()
    match = FROM_LINE.match(data)
    assert match is not None and match["sender"] == b"s@example.org"
    assert data.endswith(b"end of b\n\n")
    assert mbox_messages(mbox) == [stored(m) for m in messages]


def test_procmail_from_line_is_replaced(tmp_path: Path) -> None:
    """
    A From line the message begins with (procmail pipes one) is dropped;
    its sender is used unless -f gives one.
    """
    message = b"From old@example.org Mon Jan  1 00:00:00 2024\nSubject: p\n\nbody\n"
    for extra in ((), ("-f", "")):
        done = deliver("--mailbox", f"{tmp_path}/{{user}}", *extra, "alice", message=message)
        assert done.returncode == 0, done.stderr
    data = (tmp_path / "alice").read_bytes()
    assert data.startswith(b"From old@example.org ")
    assert b"\n\nFrom MAILER-DAEMON " in data
    assert mbox_messages(tmp_path / "alice") == [b"Subject: p\n\nbody\n"] * 2


def test_existing_last_message_keeps_its_bytes(tmp_path: Path) -> None:
    """
    An mbox whose last message ends in an LF without a blank line is
    appended to as it is (its bytes, which its UIDL covers, stay); one that
    does not end in an LF gets one, so our From line begins a line.
    """
    for old, kept in (
        (b"From a x\nX: 1\n\nlast\n", b"X: 1\n\nlast\n"),
        (b"From a x\nX: 1\n\nlast", b"X: 1\n\nlast\n"),
    ):
        mbox = tmp_path / "alice"
        mbox.write_bytes(old)
        done = deliver("--mailbox", f"{tmp_path}/{{user}}", "alice")
        assert done.returncode == 0, done.stderr
        data = mbox.read_bytes()
        assert data.startswith(old)
        assert FROM_LINE.match(data, len(old) + (0 if old.endswith(b"\n") else 1))
        assert mbox_messages(mbox) == [kept, b"Subject: x\n\nbody\n"]


def test_usage_errors(tmp_path: Path) -> None:
    """A bad command line is EX_USAGE (64) with one line, and nothing is written."""
    for args in ((), ("--max-size", "0", "alice"), ("--bogus", "alice"), ("a", "b")):
        done = deliver("--mailbox", f"{tmp_path}/{{user}}", *args)
        assert done.returncode == EX_USAGE, (args, done)
        assert "see pop3srv deliver --help" in one_line(done)
    assert list(tmp_path.iterdir()) == []
    done = deliver("--help")
    assert done.returncode == 0 and b"USER" in done.stdout


def test_unknown_users(tmp_path: Path) -> None:
    """
    A name that could never name a maildrop is EX_NOUSER (67).  Any other
    is delivered to: the MTA decides who exists, and the user files are
    not read, even where --config names them, unless --check-users asks:
    then a name in none of them is 67 too.  --check-users with a checker
    whose users cannot be known defers (75), and needs --config (64).
    """
    users = tmp_path / "users"
    write_users(users)
    config = tmp_path / "pop3srv.toml"
    config.write_text(f'mailbox = "{tmp_path}/mail/{{user}}"\nauth = ["passlib:{users}"]\n')
    (tmp_path / "mail").mkdir()
    template = f"{tmp_path}/mail/{{user}}"
    for args in (
        ("--mailbox", template, "../etc"),
        ("--mailbox", template, "a/b"),
        ("--mailbox", template, ".alice"),
        ("--config", config, "--check-users", "carol"),
    ):
        done = deliver(*args)
        assert done.returncode == EX_NOUSER, (args, done)
        assert one_line(done).startswith("unknown user ")
    assert not (tmp_path / "mail" / "carol").exists()
    assert deliver("--config", config, "--check-users", "alice").returncode == 0
    assert mbox_messages(tmp_path / "mail" / "alice") == [b"Subject: x\n\nbody\n"]
    assert deliver("--config", config, "carol").returncode == 0
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["alice", "carol"]
    other = tmp_path / "other.toml"
    other.write_text(
        f'mailbox = "{tmp_path}/mail/{{user}}"\nauth = ["passlib:{users}", "memory:dave:pw"]\n'
    )
    done = deliver("--config", other, "--check-users", "dave")
    assert done.returncode == EX_TEMPFAIL
    assert one_line(done) == "--check-users knows only passlib user files, and auth names 'memory'"
    done = deliver("--mailbox", template, "--check-users", "alice")
    assert done.returncode == EX_USAGE
    assert one_line(done) == "--check-users needs --config (see pop3srv deliver --help)"
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["alice", "carol"]


def test_user_files_are_not_read_by_default(tmp_path: Path) -> None:
    """
    A user file the recipient cannot read (the hashes are no user's
    business) does not stop a delivery with --config: it is not read.  With
    --check-users it defers the mail (75), naming the file.
    """
    users = tmp_path / "users"
    users.mkdir()  # unreadable as a file, even for root
    config = tmp_path / "pop3srv.toml"
    config.write_text(f'mailbox = "{tmp_path}/{{user}}"\nauth = ["passlib:{users}"]\n')
    done = deliver("--config", config, "alice")
    assert done.returncode == 0, done.stderr
    assert mbox_messages(tmp_path / "alice") == [b"Subject: x\n\nbody\n"]
    done = deliver("--config", config, "--check-users", "alice")
    assert done.returncode == EX_TEMPFAIL
    assert str(users) in one_line(done)
    assert mbox_messages(tmp_path / "alice") == [b"Subject: x\n\nbody\n"]


def test_configuration_problems_defer(tmp_path: Path) -> None:
    """
    A configuration that cannot be read or used defers the mail (75) with
    one line naming the problem: an admin can fix it, so it is no bounce.
    """
    bad = tmp_path / "bad.toml"
    bad.write_text("mailbox = \n")
    relative = tmp_path / "relative.toml"
    relative.write_text('mailbox = "mail/{user}"\n')
    for args in (
        ("--config", tmp_path / "missing.toml", "alice"),
        ("--config", bad, "alice"),
        ("--config", relative, "alice"),
        ("--mailbox", "/var/mail/{user}/{x}", "alice"),
    ):
        done = deliver(*args)
        assert done.returncode == EX_TEMPFAIL, (args, done)
        one_line(done)


def test_too_large_is_permanent(tmp_path: Path) -> None:
    """Over --max-size: EX_UNAVAILABLE (69), and the mbox is not touched."""
    mbox = tmp_path / "alice"
    mbox.write_bytes(b"From a x\n\nold\n\n")
    done = deliver(
        "--mailbox", f"{tmp_path}/{{user}}", "--max-size", "1000", "alice", message=b"x" * 1001
    )
    assert done.returncode == EX_UNAVAILABLE
    assert "larger than the limit of 1000 octets" in one_line(done)
    assert mbox.read_bytes() == b"From a x\n\nold\n\n"
    done = deliver(
        "--mailbox", f"{tmp_path}/{{user}}", "--max-size", "1000", "alice", message=b"x" * 1000
    )
    assert done.returncode == 0


def wait_until_holding(pid: int, directory: Path) -> None:
    """
    Wait until process C{pid} holds C{directory} open: a delivery does so
    from after reading its message, with its signal handlers in place,
    until it ends.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(directory):
                    return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never opened {directory}")


def test_waits_for_the_servers_lock(tmp_path: Path) -> None:
    """
    While the lock the server takes is held, a delivery waits; it gives up
    with 75 (file untouched) at its --lock-timeout, and goes through once
    the lock is released; a stop signal while waiting is 75 too.
    """
    mbox = tmp_path / "alice"
    mbox.write_bytes(b"From a x\n\nold\n\n")
    args = ("--mailbox", f"{tmp_path}/{{user}}", "alice")
    with MboxFileLock(str(mbox)):
        started = time.monotonic()
        done = deliver("--lock-timeout", "0.5", *args)
        assert done.returncode == EX_TEMPFAIL
        assert time.monotonic() - started >= 0.5
        assert one_line(done) == f"timed out locking {mbox}"
        assert mbox.read_bytes() == b"From a x\n\nold\n\n"
        waiting = subprocess.Popen(
            [SCRIPT, "deliver", *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stopped = subprocess.Popen(
            [SCRIPT, "deliver", *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for process in (waiting, stopped):
            assert process.stdin is not None
            process.stdin.write(b"Subject: waited\n\nbody\n")
            process.stdin.close()
        for process in (waiting, stopped):
            wait_until_holding(process.pid, tmp_path)
        assert waiting.poll() is None and stopped.poll() is None
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(30) == EX_TEMPFAIL
        assert stopped.stderr is not None
        assert b"stopped by SIGTERM" in stopped.stderr.read()
        assert mbox.read_bytes() == b"From a x\n\nold\n\n"
    assert waiting.wait(30) == 0
    assert waiting.stderr is not None
    waiting.stderr.close()
    stopped.stderr.close()
    assert mbox_messages(mbox) == [b"\nold\n", b"Subject: waited\n\nbody\n"]


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at C{where} for the test; skip if we may not mount."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_file_system_leaves_the_mbox_as_it_was(tmp_path: Path) -> None:
    """
    On a full file system the append fails part-way (ENOSPC), is cut back
    and synced: exit 75, the mbox byte-identical, no dotlock left.  Then,
    with room again, the next delivery goes through.
    """
    with tmpfs(tmp_path / "fs", "64k") as fs:
        old = b"From a x\nSubject: old\n\n" + b"o" * 20000 + b"\n\n"
        mbox = fs / "alice"
        mbox.write_bytes(old)
        # Room for the dotlock's page, not for the message.
        big = b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 600
        done = deliver("--mailbox", f"{fs}/{{user}}", "alice", message=big)
        assert done.returncode == EX_TEMPFAIL, done
        assert one_line(done) == f"{mbox}: No space left on device; left as it was"
        assert mbox.read_bytes() == old
        assert sorted(p.name for p in fs.iterdir()) == ["alice"]
        done = deliver("--mailbox", f"{fs}/{{user}}", "alice")
        assert done.returncode == 0, done.stderr
        assert mbox_messages(mbox)[1:] == [b"Subject: x\n\nbody\n"]


def test_read_only_file_system(tmp_path: Path) -> None:
    """A read-only file system (EROFS): exit 75, the mbox untouched."""
    with tmpfs(tmp_path / "fs", "1m") as fs:
        old = b"From a x\n\nold\n\n"
        (fs / "alice").write_bytes(old)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        done = deliver("--mailbox", f"{fs}/{{user}}", "alice")
        assert done.returncode == EX_TEMPFAIL
        assert one_line(done) == f"cannot lock {fs}/alice: Read-only file system"
        assert (fs / "alice").read_bytes() == old


def test_mbox_it_may_not_write(tmp_path: Path) -> None:
    """
    An mbox of mode 0444, delivered to by a process without the
    capabilities that let root ignore file modes (EACCES): 75, untouched.
    """
    mbox = tmp_path / "alice"
    mbox.write_bytes(b"From a x\n\nold\n\n")
    mbox.chmod(0o444)
    no_override = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")
    done = deliver("--mailbox", f"{tmp_path}/{{user}}", "alice", prefix=no_override)
    if b"setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr!r}")
    assert done.returncode == EX_TEMPFAIL
    assert one_line(done) == f"cannot lock {mbox}: Permission denied"
    assert mbox.read_bytes() == b"From a x\n\nold\n\n"


def test_symlinks_are_refused(tmp_path: Path) -> None:
    """
    A symlinked mbox, or a symlinked directory below the template's trusted
    prefix, is refused with 75, and what it points at is not written.
    """
    victim = tmp_path / "victim"
    victim.write_bytes(b"From a x\n\nsecret\n\n")
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "alice").symlink_to(victim)
    done = deliver("--mailbox", f"{mail}/{{user}}", "alice")
    assert done.returncode == EX_TEMPFAIL
    assert "symlink" in one_line(done)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "bob").symlink_to(tmp_path)
    done = deliver("--mailbox", f"{tmp_path}/home/{{user}}/victim", "bob")
    assert done.returncode == EX_TEMPFAIL
    assert "symlink" in one_line(done)
    for target in (f"maildir:{mail}/{{user}}", f"maildir:{tmp_path}/home/{{user}}/Maildir"):
        done = deliver("--mailbox", target, "alice" if "mail/" in target else "bob")
        assert done.returncode == EX_TEMPFAIL, target
        assert "symlink" in one_line(done)
    assert victim.read_bytes() == b"From a x\n\nsecret\n\n"
    assert not (tmp_path / "Maildir").exists()


def test_metadata_headers_are_dropped(tmp_path: Path) -> None:
    """
    A sender's X-IMAP and the internal-data subject, at the top of an empty
    mbox, do not make the message pass for the internal-data message: it is
    served, without the metadata fields.  A forged X-UIDL equal to the UIDL
    of a message the client keeps does not give the new one that UIDL.  A
    Maildir gets the message without them too.
    """
    from twisted.internet.defer import maybeDeferred

    from pop3srv.mbox.mailbox import open_maildrop

    forged = (
        b"From: attacker@example.net\n"
        b"Subject: " + PSEUDO_SUBJECT + b"\n"
        b"X-IMAP: 1700000000 99\n"
        b"X-UID: 1\n"
        b"Status: RO\n"
        b"Content-Length: 5\n"
        b"\n"
        b"you will see me\n"
    )
    without = b"From: attacker@example.net\nSubject: " + PSEUDO_SUBJECT + b"\n\nyou will see me\n"
    mbox = tmp_path / "bob"

    def served() -> list[tuple[bytes, bytes]]:
        box = open_maildrop(str(mbox), trusted_root=str(tmp_path), defer_to_thread=maybeDeferred)
        try:
            found = []
            for i in range(len(box.listMessages())):
                reader = box.getMessage(i)
                found.append((box.getUidl(i), reader.read()))
                reader.close()
            return found
        finally:
            box.close()

    done = deliver("--mailbox", f"{tmp_path}/{{user}}", "-f", "a@b", "bob", message=forged)
    assert done.returncode == 0, done.stderr
    ((first_uidl, first),) = served()
    assert first == without
    second = b"X-UIDL: " + first_uidl + b"\nSubject: second\n\nsecond\n"
    done = deliver("--mailbox", f"{tmp_path}/{{user}}", "bob", message=second)
    assert done.returncode == 0, done.stderr
    assert [body for _, body in served()] == [without, b"Subject: second\n\nsecond\n"]
    uidls = [uidl for uidl, _ in served()]
    assert uidls[0] == first_uidl and uidls[1] != first_uidl
    assert b"X-IMAP" not in mbox.read_bytes() and b"X-UIDL" not in mbox.read_bytes()

    done = deliver("--mailbox", f"maildir:{tmp_path}/{{user}}", "carol", message=forged)
    assert done.returncode == 0, done.stderr
    (path,) = (tmp_path / "carol" / "new").iterdir()
    assert path.read_bytes() == without
    assert path.name.endswith(f",S={len(without)},W={wire_size(without)}")


# New mboxes in shared spools, read by the server as another user.

RECIPIENT, STRANGER, SERVER, SPOOL_GROUP = 47001, 47002, 47003, 47100

SERVE = """
import sys
from twisted.internet.defer import maybeDeferred
from pop3srv.mbox.mailbox import open_maildrop
box = open_maildrop(sys.argv[1], trusted_root=sys.argv[2], defer_to_thread=maybeDeferred)
try:
    for i in range(len(box.listMessages())):
        reader = box.getMessage(i)
        sys.stdout.buffer.write(reader.read())
        reader.close()
finally:
    box.close()
"""


def as_user(uid: int, groups: list[int]) -> list[str]:
    """
    A command prefix that runs what follows as C{uid} (its own group, and
    C{groups} besides), through util-linux's setpriv.
    """
    extra = ",".join(map(str, groups))
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        *([f"--groups={extra}"] if groups else ["--clear-groups"]),
        "--",
    ]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """
    A directory that other users may reach (pytest's own are private),
    removed afterwards; skipped unless we are root and a user of our own
    making can run this Python.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other users")
    probe = subprocess.run(
        [*as_user(SERVER, []), sys.executable, "-c", "import pop3srv"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"another user cannot run {sys.executable}: {probe.stderr!r}")
    where = Path(tempfile.mkdtemp(prefix="deliver-spool-"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where)


@pytest.mark.parametrize(
    ("spool_mode", "delivered_by", "mode", "served"),
    [
        # Debian's /var/mail: root:mail 2775; its members create mailboxes.
        (0o2775, RECIPIENT, 0o660, True),
        # A sticky spool: a member's new mbox is given the group ...
        (0o1777, RECIPIENT, 0o660, True),
        # ... a stranger's only if the spool is setgid too ...
        (0o3777, STRANGER, 0o660, True),
        # ... else it stays private, with a warning.
        (0o1777, STRANGER, 0o600, False),
    ],
)
def test_new_mbox_in_a_shared_spool(
    open_dir: Path, spool_mode: int, delivered_by: int, mode: int, served: bool
) -> None:
    """
    A new mbox in a directory its group may write to gets that group and
    mode 0660 whatever the umask (Postfix's is 077), so the server, running
    as its own user in that group, can read and rewrite it; where the
    delivering user may not give it the group, it stays 0600 and a warning
    line says what to do.
    """
    spool = open_dir / "spool"
    spool.mkdir()
    os.chown(spool, 0, SPOOL_GROUP)
    spool.chmod(spool_mode)
    groups = [SPOOL_GROUP] if delivered_by == RECIPIENT else []
    done = subprocess.run(
        [*as_user(delivered_by, groups), SCRIPT, "deliver", "--mailbox", f"{spool}/{{user}}", "u"],
        input=b"Subject: s\n\nfirst\n",
        capture_output=True,
        timeout=60,
        check=False,
        umask=0o077,
    )
    assert done.returncode == 0, done.stderr
    st = (spool / "u").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (delivered_by, mode)
    if served:
        assert done.stderr == b""
        assert st.st_gid == SPOOL_GROUP
    else:
        assert st.st_gid == delivered_by
        assert one_line(done) == (
            f"warning: new {spool}/u is mode 0600: cannot give it the group {SPOOL_GROUP} "
            "of its directory (Operation not permitted); make the directory setgid "
            "(chmod g+s) so new mailboxes get its group"
        )
    server = subprocess.run(
        [
            *as_user(SERVER, [SPOOL_GROUP]),
            sys.executable,
            "-c",
            SERVE,
            str(spool / "u"),
            str(spool),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if served:
        assert server.returncode == 0, server.stderr
        assert server.stdout == b"Subject: s\n\nfirst\n"
    else:
        assert b"Permission denied" in server.stderr


def test_debian_spool_stranger(open_dir: Path) -> None:
    """
    In Debian's layout (/var/mail root:mail 2775, mboxes USER:mail 0660) a
    recipient outside the group cannot create a missing mbox: 75, nothing
    made.  Into an mbox made for them it delivers (fcntl lock only: no
    dotlock in a directory it may not write), and the server reads it.
    """
    spool = open_dir / "spool"
    spool.mkdir()
    os.chown(spool, 0, SPOOL_GROUP)
    spool.chmod(0o2775)
    command = [*as_user(STRANGER, []), SCRIPT, "deliver", "--mailbox", f"{spool}/{{user}}", "u"]
    done = subprocess.run(
        command, input=b"Subject: s\n\nfirst\n", capture_output=True, timeout=60, check=False
    )
    assert done.returncode == EX_TEMPFAIL
    assert one_line(done) == f"{spool}/u: Permission denied"
    assert list(spool.iterdir()) == []
    (spool / "u").touch()
    os.chown(spool / "u", STRANGER, SPOOL_GROUP)
    (spool / "u").chmod(0o660)
    done = subprocess.run(
        command, input=b"Subject: s\n\nfirst\n", capture_output=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, b"")
    server = subprocess.run(
        [
            *as_user(SERVER, [SPOOL_GROUP]),
            sys.executable,
            "-c",
            SERVE,
            str(spool / "u"),
            str(spool),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (server.returncode, server.stdout) == (0, b"Subject: s\n\nfirst\n"), server.stderr


def test_new_mbox_elsewhere_is_private(open_dir: Path) -> None:
    """
    In a directory its group may not write to (a home directory, whose
    group may be every user's), a new mbox is 0600 with the creator's
    group, and no warning.
    """
    home = open_dir / "home"
    home.mkdir()
    os.chown(home, RECIPIENT, SPOOL_GROUP)
    home.chmod(0o755)
    done = subprocess.run(
        [
            *as_user(RECIPIENT, [SPOOL_GROUP]),
            SCRIPT,
            "deliver",
            "--mailbox",
            f"{home}/{{user}}",
            "mbox",
        ],
        input=b"Subject: s\n\nfirst\n",
        capture_output=True,
        timeout=60,
        check=False,
        umask=0o022,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    st = (home / "mbox").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (RECIPIENT, RECIPIENT, 0o600)


# Stop signals, sent by the kernel at chosen system calls: strace's
# syscall tampering raises a real signal in the delivery as it enters the
# call (or makes the call fail), so the moment is exact.

BIG = b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 30000
OLD_MBOX = b"From a x\nSubject: old\n\nold\n\n"


def strace_or_skip() -> str:
    """The strace binary, if it can trace here."""
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run(
        [path, "-qq", "-o", "/dev/null", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode().strip()}")
    return path


@pytest.mark.parametrize(
    ("injected", "status", "line", "delivered"),
    [
        # Before the commit: the append is cut back.
        (["pwrite64:signal=TERM:when=2"], EX_TEMPFAIL, "stopped by SIGTERM; left as it was", False),
        # A failing write (a full disk), a signal with it and another one
        # while the append is cut back: the cut-back still happens.
        (
            ["pwrite64:error=ENOSPC:signal=TERM:when=3", "ftruncate:signal=HUP"],
            EX_TEMPFAIL,
            "No space left on device; left as it was",
            False,
        ),
        # During the final fsync, and while the lock is released (the
        # dotlock's unlink; the first unlink is that of the lock's
        # temporary file): the message is durable, the delivery done.
        (["fsync:signal=TERM:when=1"], 0, None, True),
        (["/^unlink:signal=TERM:when=2"], 0, None, True),
        (["fsync:signal=INT:when=1", "/^unlink:signal=HUP:when=2"], 0, None, True),
    ],
)
def test_stop_signals_around_the_mbox_commit(
    tmp_path: Path, injected: list[str], status: int, line: str | None, delivered: bool
) -> None:
    """
    A stop signal before the final fsync has returned undoes the append
    (75, the mbox as it was); one after it changes nothing (0, the message
    there once), or the MTA would deliver it again.  No dotlock is left.
    """
    strace = strace_or_skip()
    mbox = tmp_path / "alice"
    mbox.write_bytes(OLD_MBOX)
    log = tmp_path / "strace.log"
    done = subprocess.run(
        [
            strace,
            "-qq",
            "-o",
            str(log),
            "-e",
            "trace=pwrite64,fsync,ftruncate,/^unlink",
            *(arg for spec in injected for arg in ("-e", f"inject={spec}")),
            SCRIPT,
            "deliver",
            "--mailbox",
            f"{tmp_path}/{{user}}",
            "alice",
        ],
        input=BIG,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == status, (done, log.read_text())
    if line is None:
        assert done.stderr == b""
    else:
        assert one_line(done) == f"{mbox}: {line}"
    if delivered:
        assert mbox_messages(mbox) == [b"Subject: old\n\nold\n", BIG]
    else:
        assert mbox.read_bytes() == OLD_MBOX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice", "strace.log"]


@pytest.mark.parametrize(
    ("injected", "status"),
    [
        # While the message is written to tmp/: nothing is delivered.
        ("pwrite64:signal=TERM:when=1", EX_TEMPFAIL),
        # As it is renamed into new/, and while new/ is synced: delivered.
        ("/^rename:signal=TERM", 0),
        ("fsync:signal=HUP:when=2", 0),
    ],
)
def test_stop_signals_around_the_maildir_commit(tmp_path: Path, injected: str, status: int) -> None:
    """
    A stop signal before the rename into new/ takes the file away (75); one
    during the rename or the sync of new/ leaves the message delivered (0),
    once.
    """
    strace = strace_or_skip()
    template = f"maildir:{tmp_path}/{{user}}"
    assert deliver("--mailbox", template, "alice", message=b"Subject: first\n\n1\n").returncode == 0
    done = subprocess.run(
        [
            strace,
            "-qq",
            "-o",
            str(tmp_path / "strace.log"),
            "-e",
            "trace=pwrite64,fsync,/^rename,/^unlink",
            "-e",
            f"inject={injected}",
            SCRIPT,
            "deliver",
            "--mailbox",
            template,
            "alice",
        ],
        input=BIG,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == status, done
    maildir = tmp_path / "alice"
    assert list((maildir / "tmp").iterdir()) == []
    got = sorted(p.read_bytes() for p in (maildir / "new").iterdir())
    if status == 0:
        assert done.stderr == b""
        assert got == sorted([b"Subject: first\n\n1\n", BIG])
    else:
        assert one_line(done) == f"{maildir}: stopped by SIGTERM; nothing delivered"
        assert got == [b"Subject: first\n\n1\n"]


# Maildir.


def test_maildir_delivery(tmp_path: Path) -> None:
    """
    The Maildir and any missing directory below the trusted prefix are
    made (0700); the message lands in new/ byte for byte (no From line, no
    quoting), named with S= and W=, the octets RETR sends as the server's
    Maildir store counts them (a CRLF more for a last line without an LF),
    tmp/ left empty; Python's mailbox.Maildir reads it.
    """
    rng = random.Random(2)
    messages = [tricky_message("m1", rng), tricky_message("m2", rng, final_newline=False)]
    procmail = b"From x@y Mon Jan  1 00:00:00 2024\n" + messages[0]
    for message in (messages[0], messages[1], procmail):
        done = deliver(
            "--mailbox", f"maildir:{tmp_path}/{{user}}/Maildir", "alice", message=message
        )
        assert done.returncode == 0, done.stderr
    maildir = tmp_path / "alice" / "Maildir"
    for directory in (tmp_path / "alice", maildir, *(maildir / d for d in ("tmp", "new", "cur"))):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list((maildir / "tmp").iterdir()) == []
    names = sorted((maildir / "new").iterdir(), key=lambda p: p.name.split("Q")[1])
    assert len(names) == 3
    got = {p.read_bytes() for p in names}
    assert got == {messages[0], messages[1]}
    for path in names:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert path.name.endswith(f",S={path.stat().st_size},W={wire_octets(fd)}")
        finally:
            os.close(fd)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    box = mailbox.Maildir(str(maildir), factory=None, create=False)
    assert sorted(box.get_bytes(key) for key in box.keys()) == sorted(
        [messages[0], messages[0], messages[1]]
    )


def test_maildir_full_file_system(tmp_path: Path) -> None:
    """ENOSPC while writing into tmp/: 75, and no file of it is left anywhere."""
    with tmpfs(tmp_path / "fs", "64k") as fs:
        big = b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 1000
        done = deliver("--mailbox", f"maildir:{fs}/{{user}}", "alice", message=big)
        assert done.returncode == EX_TEMPFAIL
        assert one_line(done) == f"{fs}/alice: No space left on device; nothing delivered"
        for sub in ("tmp", "new", "cur"):
            assert list((fs / "alice" / sub).iterdir()) == []


# Against the live server.


def _retr_all(srv: Pop3Server, user: str) -> tuple[list[bytes], list[bytes]]:
    """Every message of C{user} over POP3 (lines joined by LF) and its UIDL."""
    client = poplib.POP3("127.0.0.1", srv.port, timeout=60)
    try:
        client.user(user)
        client.pass_(PASSWORDS[user])
        count = client.stat()[0]
        bodies = [b"\n".join(client.retr(i + 1)[1]) + b"\n" for i in range(count)]
        uidls = [line.split()[1] for line in client.uidl()[1]]
    finally:
        client.quit()
    return bodies, uidls


def test_concurrent_deliveries_during_a_pop3_session(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    Twenty C{pop3srv deliver} processes at once, some before and some
    while a real POP3 session commits deletions at QUIT: afterwards every
    delivered message is there exactly once and byte for byte (by Python's
    mailbox module and over POP3), none interleaved with another, the
    deleted ones gone, and the kept ones keep their UIDLs.
    """
    rng = random.Random(16)
    initial = [
        f"Message-ID: <init{i}@test>\nSubject: initial {i}\n\n".encode()
        + b"line of the initial mail\n" * rng.randrange(10, 2000)
        for i in range(40)
    ]
    srv = live_server(mail={"alice": initial})
    mbox = srv.mail / "alice"
    before, before_uidls = _retr_all(srv, "alice")
    assert before == initial
    delivered = [tricky_message(f"d{i}", rng, final_newline=i % 3 != 0) for i in range(20)]
    deleted = set(range(0, 40, 4))

    session = poplib.POP3("127.0.0.1", srv.port, timeout=60)
    session.user("alice")
    session.pass_(PASSWORDS["alice"])
    assert session.stat()[0] == 40
    processes = [
        subprocess.Popen(
            [SCRIPT, "deliver", "--mailbox", f"{srv.mail}/{{user}}", "-f", f"s{i}@x", "alice"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(20)
    ]

    def feed(indexes: range) -> None:
        for i in indexes:
            stdin = processes[i].stdin
            assert stdin is not None
            stdin.write(delivered[i])
            stdin.close()

    feed(range(10))
    # Some of the first ten land while the session is open ...
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in processes[:10]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i in sorted(deleted):
        session.dele(i + 1)
    # ... and the rest race the commit.
    feeder = threading.Thread(target=feed, args=(range(10, 20),))
    feeder.start()
    assert session.quit().startswith(b"+OK")
    feeder.join()
    for i, process in enumerate(processes):
        assert process.wait(120) == 0, (i, process.stderr.read() if process.stderr else b"")
        assert process.stderr is not None
        process.stderr.close()

    kept = [m for i, m in enumerate(initial) if i not in deleted]
    found = mbox_messages(mbox)
    assert found[: len(kept)] == kept
    rest = found[len(kept) :]
    assert sorted(rest) == sorted(stored(m) for m in delivered)
    assert len(set(rest)) == 20

    after, after_uidls = _retr_all(srv, "alice")
    assert after[: len(kept)] == kept
    assert after_uidls[: len(kept)] == [u for i, u in enumerate(before_uidls) if i not in deleted]
    assert sorted(after[len(kept) :]) == sorted(stored(m) for m in delivered)


@pytest.mark.skipif(
    importlib.util.find_spec("pop3srv.maildir") is None, reason="no Maildir store yet"
)
def test_maildir_deliveries_are_served(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    Messages C{pop3srv deliver} writes into a Maildir are served byte for
    byte by the server's Maildir store, with the sizes of their names:
    each LIST size is the octets RETR sends, those without a final LF too.
    """
    # The later --mailbox wins over the one Pop3Server gives.
    srv = live_server("--mailbox", f"maildir:{tmp_path}/mail/{{user}}/Maildir")
    rng = random.Random(3)
    messages = [tricky_message(f"md{i}", rng, final_newline=i % 2 == 0) for i in range(5)]
    for message in messages:
        done = deliver(
            "--mailbox", f"maildir:{srv.mail}/{{user}}/Maildir", "alice", message=message
        )
        assert done.returncode == 0, done.stderr
    client = poplib.POP3("127.0.0.1", srv.port, timeout=60)
    try:
        client.user("alice")
        client.pass_(PASSWORDS["alice"])
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        retrieved = [client.retr(i + 1)[1] for i in range(len(sizes))]
    finally:
        client.quit()
    assert sorted(b"\n".join(lines) + b"\n" for lines in retrieved) == sorted(
        stored(m) for m in messages
    )
    # poplib takes the dot-stuffing off, which sizes do not count either.
    assert sizes == [sum(len(line) + 2 for line in lines) for lines in retrieved]


def test_write_mbox_helper_is_an_mbox(tmp_path: Path) -> None:
    """
    The helper that writes the live server's mboxes and our deliveries make
    one mbox together: what the helper wrote stays first and intact.
    """
    mbox = tmp_path / "alice"
    write_mbox(mbox, [b"Subject: a\n\nfirst\n"])
    assert deliver("--mailbox", f"{tmp_path}/{{user}}", "alice").returncode == 0
    assert mbox_messages(mbox) == [b"Subject: a\n\nfirst\n", b"Subject: x\n\nbody\n"]
