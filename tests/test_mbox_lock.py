"""
Tests for L{pop3srv.mbox.lock}.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from pop3srv.core.errors import MaildropInUse, MaildropUnavailable
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.lock import MboxFileLock, SessionLock

_HOLD_SESSION = """
import sys
from pop3srv.mbox.lock import SessionLock
lock = SessionLock(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""

_HOLD_LOCKF = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
fcntl.lockf(f, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""

_TRY_LOCKF = """
import fcntl, sys
f = open(sys.argv[1], "r+b")
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("busy")
else:
    print("free")
"""


@pytest.fixture
def holder() -> Iterator[Any]:
    """Start a helper process that holds some lock until killed."""
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    """A small mbox file."""
    path = tmp_path / "box"
    path.write_bytes(b"From a\nhello\n\n")
    return path


def test_session_lock_conflicts_in_process(tmp_path: Path) -> None:
    """
    Two session locks on one file conflict even within one process; after
    release (which is idempotent) the lock can be taken again.
    """
    path = str(tmp_path / "lock")
    first = SessionLock(path)
    with pytest.raises(MaildropInUse):
        SessionLock(path)
    first.release()
    first.release()
    assert not first.held
    with SessionLock(path) as second:
        assert second.held
    assert not second.held


def test_session_lock_across_processes(tmp_path: Path, holder: Any) -> None:
    """
    A session lock held by another process conflicts, and is freed when
    that process dies.
    """
    path = tmp_path / "lock"
    proc = holder(_HOLD_SESSION, path)
    with pytest.raises(MaildropInUse):
        SessionLock(str(path))
    proc.kill()
    proc.wait()
    SessionLock(str(path)).release()


def test_open_maildrop_twice(mbox: Path) -> None:
    """
    A second session on the same maildrop gets L{MaildropInUse} until the
    first is closed; close is idempotent.
    """
    first = open_maildrop(str(mbox))
    with pytest.raises(MaildropInUse):
        open_maildrop(str(mbox))
    first.close()
    first.close()
    open_maildrop(str(mbox)).close()


def test_file_lock_waits_for_lockf(mbox: Path, holder: Any) -> None:
    """
    While another process holds a classic POSIX C{lockf} lock on the mbox,
    L{MboxFileLock} times out with L{MaildropUnavailable}, releasing its
    dotlock; once that process is gone it succeeds.
    """
    proc = holder(_HOLD_LOCKF, mbox)
    lock = MboxFileLock(str(mbox), timeout=0.3, poll_interval=0.02)
    started = time.monotonic()
    with pytest.raises(MaildropUnavailable):
        lock.acquire()
    assert time.monotonic() - started >= 0.3
    assert not Path(str(mbox) + ".lock").exists()
    proc.kill()
    proc.wait()
    with MboxFileLock(str(mbox), timeout=1) as held:
        assert held.fd is not None


def test_lockf_waits_for_file_lock(mbox: Path) -> None:
    """
    While L{MboxFileLock} is held, an MDA's C{lockf} attempt fails; after
    release it succeeds.
    """
    script = [sys.executable, "-c", _TRY_LOCKF, str(mbox)]
    with MboxFileLock(str(mbox)):
        out = subprocess.run(script, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "busy"
    out = subprocess.run(script, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "free"


def test_dotlock_created_and_removed(mbox: Path) -> None:
    """
    The dotlock holds C{"<pid> <hostname>\\n"} while the lock is held, and
    neither it nor any temporary file remains afterwards.
    """
    before = set(os.listdir(mbox.parent))
    dotlock = Path(str(mbox) + ".lock")
    with MboxFileLock(str(mbox)):
        assert dotlock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        assert set(os.listdir(mbox.parent)) == before | {dotlock.name}
    assert set(os.listdir(mbox.parent)) == before


def test_missing_mbox_takes_dotlock_only(tmp_path: Path) -> None:
    """
    For an mbox that does not exist only the dotlock is taken.
    """
    path = tmp_path / "none"
    with MboxFileLock(str(path)) as lock:
        assert lock.fd is None
        assert Path(str(path) + ".lock").exists()
    assert not path.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_local_dotlock_removed(mbox: Path) -> None:
    """
    A fresh dotlock written on this host by a process that is gone is
    removed at once.
    """
    dotlock = Path(str(mbox) + ".lock")
    dotlock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    started = time.monotonic()
    with MboxFileLock(str(mbox), timeout=5):
        assert dotlock.read_text().startswith(f"{os.getpid()} ")
    assert time.monotonic() - started < 2
    assert not dotlock.exists()


@pytest.mark.parametrize(
    "content",
    ["12345 some-other-host\n", f"{os.getpid()} {socket.gethostname()}\n", ""],
)
def test_fresh_foreign_dotlock_waited_on(mbox: Path, content: str) -> None:
    """
    A fresh dotlock of another host, of a live local process, or of an
    unknown format is respected until the timeout; once older than the
    stale age it is removed.
    """
    dotlock = Path(str(mbox) + ".lock")
    dotlock.write_text(content)
    with pytest.raises(MaildropUnavailable):
        MboxFileLock(str(mbox), timeout=0.2, poll_interval=0.02).acquire()
    assert dotlock.read_text() == content
    old = time.time() - 301
    os.utime(dotlock, (old, old))
    with MboxFileLock(str(mbox), timeout=1):
        assert dotlock.read_text().startswith(f"{os.getpid()} ")


def test_unwritable_directory_uses_fcntl_only(mbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    If the dotlock cannot be created (EACCES), a warning is logged and the
    fcntl lock alone is taken.
    """
    real_open = os.open

    def deny_dotlock(path: str, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if os.path.basename(path).startswith(".box.lock."):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", deny_dotlock)
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        with MboxFileLock(str(mbox)) as lock:
            assert lock.fd is not None
            assert not Path(str(mbox) + ".lock").exists()
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "dotlock" in warnings[0]["log_format"]
