"""
Tests for opening maildrops safely (issue 12, item 2): no symlink is
followed below the mailbox template's fixed prefix, state files beside the
mbox must be regular files of the server's user, nothing blocks on a FIFO,
and temporary dotlock files do not stay behind.

Real files in a temporary directory; the realm runs its blocking work at
once through L{helpers.run_now}.
"""

from __future__ import annotations

import errno
import os
import poplib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import failure_of, result_of, run_now
from livepop3 import PASSWORDS, Pop3Server, write_mbox
from twisted.logger import LogEvent, LogLevel
from twisted.mail.pop3 import IMailbox

from pop3srv.auth.realm import MboxRealm
from pop3srv.core.errors import MaildropUnavailable
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.lock import MboxFileLock, left_by_dead_local_process
from pop3srv.mbox.paths import (
    MaildropDirectory,
    UnsafeStateFile,
    display_path,
    open_directory_below,
    open_mbox_file,
    template_prefix,
)
from pop3srv.mbox.sweep import sweep_spool
from pop3srv.mbox.testing import synchronous_defer_to_thread

BOB_MAIL = [b"Subject: for bob\n\nbob's secret\n", b"Subject: again\n\nmore\n"]
ALICE_MAIL = [b"Subject: for alice\n\nhers\n", b"Subject: two\n\nalso hers\n"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under C{directory} (symlinks not followed) and its content."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    """
    C{tmp/home/{alice,bob}/Mail/inbox}, each with two messages: the layout
    of C{--mailbox /home/{user}/Mail/inbox}.
    """
    home = tmp_path / "home"
    for user, mail in (("alice", ALICE_MAIL), ("bob", BOB_MAIL)):
        (home / user / "Mail").mkdir(parents=True)
        write_mbox(home / user / "Mail" / "inbox", mail)
    return home


def home_realm(home: Path) -> MboxRealm:
    """A realm for C{home/{user}/Mail/inbox}."""
    return MboxRealm(f"{home}/{{user}}/Mail/inbox", defer_to_thread=run_now)


def login(realm: MboxRealm, user: bytes) -> tuple[Any, Any, Any]:
    """The avatar triple for C{user}."""
    return result_of(realm.requestAvatar(user, None, IMailbox))


def refused(realm: MboxRealm, user: bytes) -> UnsafeStateFile:
    """The L{UnsafeStateFile} (a L{MaildropUnavailable}, so SYS/TEMP) for C{user}."""
    failure = failure_of(realm.requestAvatar(user, None, IMailbox), MaildropUnavailable)
    assert isinstance(failure.value, UnsafeStateFile), failure.value
    assert failure.value.code == "SYS/TEMP"
    return failure.value


def test_template_prefix() -> None:
    """The trusted prefix is the directory before the first {user}."""
    assert template_prefix("/home/{user}/Mail/inbox") == "/home"
    assert template_prefix("/var/mail/{user}") == "/var/mail"
    assert template_prefix("/srv/mail-{user}/mbox") == "/srv"
    assert template_prefix("/m/{user}-{user}") == "/m"
    assert template_prefix("/{user}") == "/"


def test_symlinked_mail_directory_refused(homes: Path, log_events: list[LogEvent]) -> None:
    """
    alice makes ~/Mail a symlink to bob's Mail: her login is refused with
    SYS/TEMP (logged as a warning), nothing in bob's directory is read,
    written or created, and bob still gets his mail.
    """
    (homes / "alice" / "Mail").rename(homes / "alice" / "Mail.real")
    (homes / "alice" / "Mail").symlink_to(homes / "bob" / "Mail")
    before = snapshot(homes / "bob")
    realm = home_realm(homes)
    error = refused(realm, b"alice")
    assert f"{homes}/alice/Mail" in str(error)
    assert snapshot(homes / "bob") == before
    warnings = [e for e in log_events if e.get("log_level") == LogLevel.warn]
    assert any(f"{homes}/alice/Mail/inbox" == e.get("path") for e in warnings)
    _, mailbox, logout = login(realm, b"bob")
    try:
        assert len(mailbox.listMessages()) == len(BOB_MAIL)
    finally:
        logout()


def test_symlinked_home_refused(homes: Path) -> None:
    """The {user} component itself a symlink (~alice -> ~bob) is refused too."""
    (homes / "alice").rename(homes / "alice.real")
    (homes / "alice").symlink_to(homes / "bob")
    before = snapshot(homes / "bob")
    refused(home_realm(homes), b"alice")
    assert snapshot(homes / "bob") == before


def test_symlinks_in_the_trusted_prefix_are_followed(tmp_path: Path, homes: Path) -> None:
    """A symlink in the admin's part of the template (here /home itself) is fine."""
    (tmp_path / "home-link").symlink_to(homes)
    _, mailbox, logout = login(home_realm(tmp_path / "home-link"), b"alice")
    try:
        assert len(mailbox.listMessages()) == len(ALICE_MAIL)
        assert mailbox.path == f"{tmp_path}/home-link/alice/Mail/inbox"
    finally:
        logout()


def test_directory_swapped_after_login_is_not_followed(homes: Path) -> None:
    """
    alice logs in with a real ~/Mail, then swaps in a symlink to bob's: her
    commit still works on her own directory (index and journal included),
    and bob's directory is untouched.
    """
    realm = home_realm(homes)
    _, mailbox, logout = login(realm, b"alice")
    try:
        (homes / "alice" / "Mail").rename(homes / "alice" / "Mail.real")
        (homes / "alice" / "Mail").symlink_to(homes / "bob" / "Mail")
        before = snapshot(homes / "bob")
        mailbox.deleteMessage(0)
        result_of(mailbox.sync())
    finally:
        logout()
    assert snapshot(homes / "bob") == before
    kept = (homes / "alice" / "Mail.real" / "inbox").read_bytes()
    assert b"also hers" in kept and b"Subject: for alice" not in kept


def test_open_directory_below_refuses_escapes(tmp_path: Path) -> None:
    """A directory outside the trusted root, or reached through a symlink, is refused."""
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "link").symlink_to(tmp_path / "root" / "a")
    with pytest.raises(UnsafeStateFile, match="not below"):
        open_directory_below(str(tmp_path / "root"), str(tmp_path))
    with pytest.raises(UnsafeStateFile, match="symlink"):
        open_directory_below(str(tmp_path / "root"), str(tmp_path / "root" / "link"))
    with pytest.raises(FileNotFoundError):
        open_directory_below(str(tmp_path / "root"), str(tmp_path / "root" / "none"))
    fd = open_directory_below(str(tmp_path / "root"), str(tmp_path / "root" / "a"))
    os.close(fd)


def test_anchored_paths_show_their_names(tmp_path: Path) -> None:
    """Paths through the held directory are shown with the directory's name in logs."""
    directory = MaildropDirectory(str(tmp_path), str(tmp_path))
    try:
        anchored = directory.anchor(str(tmp_path / "inbox"))
        assert anchored.startswith("/proc/self/fd/")
        assert display_path(anchored) == str(tmp_path / "inbox")
        assert directory.anchor("/elsewhere/x") == "/elsewhere/x"
    finally:
        directory.close()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A spool C{mail/} where alice has two messages."""
    directory = tmp_path / "mail"
    directory.mkdir()
    write_mbox(directory / "alice", ALICE_MAIL)
    return directory


def spool_realm(spool: Path) -> MboxRealm:
    """A realm for C{spool/{user}}, state files beside the mboxes."""
    return MboxRealm(f"{spool}/{{user}}", defer_to_thread=run_now)


def test_planted_lock_symlink_creates_nothing(spool: Path, tmp_path: Path) -> None:
    """
    A symlink planted as alice's session lock is not followed: the
    root-run server does not create the file it names, and the login is
    refused.
    """
    target = tmp_path / "etc-nologin"
    (spool / ".alice.pop3srv-lock").symlink_to(target)
    refused(spool_realm(spool), b"alice")
    assert not target.exists()


def run_with_timeout(f: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run C{f} in a thread; fail if it has not finished within C{timeout} seconds."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(f())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked"
    return outcome[0]


@pytest.fixture
def unblock() -> Iterator[list[Path]]:
    """FIFOs to open for writing after the test, so a reader stuck on one ends."""
    fifos: list[Path] = []
    yield fifos
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


@pytest.mark.parametrize("name", [".alice.pop3srv-lock", "alice"])
def test_fifo_refused_without_blocking(spool: Path, name: str, unblock: list[Path]) -> None:
    """A FIFO as the session lock or as the mbox is refused at once, not read."""
    fifo = spool / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    unblock.append(fifo)
    result = run_with_timeout(lambda: open_maildrop(str(spool / "alice"), lock_timeout=1))
    assert isinstance(result, UnsafeStateFile), result


def test_fifo_dotlock_does_not_block(spool: Path, unblock: list[Path]) -> None:
    """A FIFO as the dotlock is waited on like any fresh lock, never read."""
    fifo = spool / "alice.lock"
    os.mkfifo(fifo)
    unblock.append(fifo)
    assert run_with_timeout(lambda: left_by_dead_local_process(str(fifo), "host")) is False
    result = run_with_timeout(
        lambda: MboxFileLock(str(spool / "alice"), timeout=0.3, poll_interval=0.02).acquire()
    )
    assert isinstance(result, MaildropUnavailable)


def test_fifo_index_refused_without_blocking(spool: Path, unblock: list[Path]) -> None:
    """
    A FIFO as the index does not block the opening thread: it is refused
    (SYS/TEMP) or ignored as no index of ours.
    """
    fifo = spool / ".alice.pop3srv-index"
    os.mkfifo(fifo)
    unblock.append(fifo)
    result = run_with_timeout(lambda: open_maildrop(str(spool / "alice"), lock_timeout=1))
    if isinstance(result, BaseException):
        assert isinstance(result, MaildropUnavailable)
    else:
        result.close()


def _device(path: Path) -> None:
    """A character device like /dev/zero at C{path}, or skip where not allowed."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        pytest.skip("cannot make or open device nodes here")
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            pytest.skip("cannot make or open device nodes here")
        raise


@pytest.mark.parametrize("name", [".alice.pop3srv-lock", "alice"])
def test_device_refused(spool: Path, name: str) -> None:
    """A /dev/zero-like device as the session lock or the mbox is refused, not read."""
    (spool / name).unlink(missing_ok=True)
    _device(spool / name)
    result = run_with_timeout(lambda: open_maildrop(str(spool / "alice"), lock_timeout=1))
    assert isinstance(result, UnsafeStateFile), result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_lock_of_another_owner_refused(spool: Path) -> None:
    """A session lock that the server's user does not own is refused."""
    lock = spool / ".alice.pop3srv-lock"
    lock.write_bytes(b"")
    os.chown(lock, 12345, 12345)
    refused(spool_realm(spool), b"alice")


def test_mbox_must_be_regular(tmp_path: Path) -> None:
    """L{open_mbox_file} refuses a directory, but takes a regular file of any owner."""
    with pytest.raises(UnsafeStateFile):
        open_mbox_file(str(tmp_path), os.O_RDONLY, single_link=True)
    (tmp_path / "box").write_bytes(b"x")
    if os.geteuid() == 0:
        os.chown(tmp_path / "box", 12345, 12345)
    os.close(open_mbox_file(str(tmp_path / "box"), os.O_RDWR, single_link=True))


COLLIDING = [".bob.pop3srv-lock", "bob.lock", ".alice", "x.pop3srv-index", "Bob.LOCK"]


@pytest.mark.parametrize("name", COLLIDING)
def test_names_colliding_with_state_files_refused(spool: Path, name: str) -> None:
    """
    A user name that could be one of our state files or a dotlock beside
    another maildrop is refused before any file is touched.
    """
    from pop3srv.core.errors import InvalidUsername

    before = sorted(os.listdir(spool))
    failure_of(spool_realm(spool).requestAvatar(name.encode(), None, IMailbox), InvalidUsername)
    assert sorted(os.listdir(spool)) == before


def test_failed_dotlock_write_leaves_no_temp(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A temporary dotlock whose write fails (a full disk) is removed: the
    lock attempt fails with SYS/TEMP and leaves nothing behind.
    """
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1].startswith(".alice.lock."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    before = sorted(os.listdir(spool))
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(MaildropUnavailable, match="No space"):
        MboxFileLock(str(spool / "alice"), timeout=0.2, poll_interval=0.02).acquire()
    monkeypatch.undo()
    assert sorted(os.listdir(spool)) == before


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def test_sweep_removes_old_dotlock_temps_and_nothing_else(spool: Path) -> None:
    """
    The start-up sweep removes old temporary dotlock files (an empty one
    from a full disk, one of a killed process) and leaves alone a young
    one, names that only look alike, a symlink, a directory and the MDA's
    dotlock.
    """
    hexa = "0123456789abcdef" * 2
    debris = [spool / f".alice.lock.{hexa}", spool / f".bob.lock.{hexa[::-1]}"]
    debris[0].write_bytes(b"")
    debris[1].write_bytes(b"12 elsewhere.example\n")
    young = spool / f".carol.lock.{hexa}"
    young.write_bytes(b"")
    lookalikes = [spool / f".alice.lock.{hexa[:31]}", spool / f"alice.lock.{hexa}"]
    lookalikes += [spool / f".alice.lock.{hexa.upper()}", spool / "alice.lock"]
    for path in lookalikes:
        path.write_bytes(b"")
    link = spool / f".dave.lock.{hexa}"
    link.symlink_to(spool / "alice")
    directory = spool / f".erin.lock.{hexa}"
    directory.mkdir()
    for path in [*debris, *lookalikes, link, directory]:
        _age(path, 3600)
    report = sweep_spool(f"{spool}/{{user}}")
    assert sorted(report.removed_temps) == sorted(str(p) for p in debris)
    assert not any(p.exists() for p in debris)
    for path in [young, *lookalikes, link, directory, spool / "alice"]:
        assert os.path.lexists(path), path
    assert (spool / "alice").read_bytes().count(b"Subject:") == len(ALICE_MAIL)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_sweep_leaves_others_temps(spool: Path) -> None:
    """An old file with a temp dotlock name that is not ours is not removed."""
    other = spool / f".alice.lock.{'a' * 32}"
    other.write_bytes(b"")
    os.chown(other, 12345, 12345)
    _age(other, 3600)
    assert sweep_spool(f"{spool}/{{user}}").removed_temps == []
    assert other.exists()


def test_open_maildrop_removes_its_old_temps(homes: Path) -> None:
    """
    With a per-user template the sweep cannot list a spool, so opening the
    maildrop removes that mbox's old temporary dotlocks (and only those).
    """
    mail = homes / "alice" / "Mail"
    mine = mail / f".inbox.lock.{'b' * 32}"
    other = mail / f".outbox.lock.{'b' * 32}"
    for path in (mine, other):
        path.write_bytes(b"")
        _age(path, 3600)
    _, _, logout = login(home_realm(homes), b"alice")
    logout()
    assert not mine.exists()
    assert other.exists()


def test_direct_open_maildrop_still_refuses_symlinked_mbox(tmp_path: Path) -> None:
    """Without a trusted root the mbox's own directory is trusted, the mbox is not."""
    write_mbox(tmp_path / "victim", BOB_MAIL)
    (tmp_path / "attacker").symlink_to(tmp_path / "victim")
    with pytest.raises(UnsafeStateFile):
        open_maildrop(
            str(tmp_path / "attacker"), defer_to_thread=synchronous_defer_to_thread, lock_timeout=1
        )


class HomesServer(Pop3Server):
    """A live server with C{--mailbox ROOT/home/{user}/Mail/inbox}."""

    def argv(self) -> list[str]:
        """The usual command line with the per-user mailbox template."""
        argv = super().argv()
        argv[argv.index("--mailbox") + 1] = f"{self.root}/home/{{user}}/Mail/inbox"
        return argv


def test_live_server_refuses_symlinked_mail_directory(
    live_server: Callable[..., Pop3Server], homes: Path
) -> None:
    """
    The real C{twistd pop3srv}: alice's ~/Mail pointing at bob's gets
    C{-ERR [SYS/TEMP]}, and bob still downloads his own mail intact.
    """
    (homes / "alice" / "Mail").rename(homes / "alice" / "Mail.real")
    (homes / "alice" / "Mail").symlink_to(homes / "bob" / "Mail")
    before = snapshot(homes / "bob")
    server = live_server(cls=HomesServer)
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_(PASSWORDS["alice"])
    client.quit()
    assert snapshot(homes / "bob") == before
    assert "symlink" in server.log_text()
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    client.user("bob")
    client.pass_(PASSWORDS["bob"])
    assert client.stat()[0] == len(BOB_MAIL)
    client.quit()


def test_hard_linked_state_file_refused(tmp_path: Path) -> None:
    """
    A state file with a second name (a hard link someone made to a file of
    the server's user) is refused, not read or written.
    """
    from pop3srv.mbox.paths import UnsafeStateFile, open_state_file

    victim = tmp_path / "victim"
    victim.write_bytes(b"server-owned data\n")
    planted = tmp_path / ".inbox.pop3srv-lock"
    os.link(victim, planted)
    with pytest.raises(UnsafeStateFile, match="2 links"):
        open_state_file(str(planted), os.O_RDWR | os.O_CREAT)
    assert victim.read_bytes() == b"server-owned data\n"


def test_hard_linked_mbox_refused(homes: Path) -> None:
    """
    bob's inbox made a second hard link to alice's (possible for a file one
    cannot read where C{fs.protected_hardlinks} is off) is refused with
    SYS/TEMP; so is alice's until the admin looks, since nothing tells
    which name is the rightful one.  Nothing but the session locks is
    written or created.
    """
    alice_inbox = homes / "alice" / "Mail" / "inbox"
    bob_inbox = homes / "bob" / "Mail" / "inbox"
    bob_inbox.unlink()
    os.link(alice_inbox, bob_inbox)
    before = snapshot(homes)
    realm = home_realm(homes)
    assert "2 links" in str(refused(realm, b"bob"))
    assert "2 links" in str(refused(realm, b"alice"))
    after = snapshot(homes)
    assert after.pop("alice/Mail/.inbox.pop3srv-lock") == b""
    assert after.pop("bob/Mail/.inbox.pop3srv-lock") == b""
    assert after == before


def test_recovery_refuses_hard_linked_mbox(tmp_path: Path) -> None:
    """Crash recovery does not apply a journal to an mbox with a second name."""
    from pop3srv.mbox.commit import recover

    write_mbox(tmp_path / "victim", ALICE_MAIL)
    os.link(tmp_path / "victim", tmp_path / "bob")
    journal = tmp_path / ".bob.pop3srv-journal"
    journal.write_bytes(b"")
    with pytest.raises(UnsafeStateFile, match="2 links"):
        recover(str(tmp_path / "bob"), str(journal))


def test_dotlock_with_two_names_is_still_read(spool: Path) -> None:
    """
    A dotlock has two names for a moment while its writer takes it, so
    reading one does not refuse a second link as an mbox open does.
    """
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temp = spool / f".alice.lock.{'c' * 32}"
    temp.write_text(f"{dead.pid} {host}\n")
    os.link(temp, spool / "alice.lock")
    assert left_by_dead_local_process(str(spool / "alice.lock"), host)


def test_dotlock_debris_looked_for_rarely_and_outside_the_lock(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Logins do not list the spool for temporary dotlocks every time: one
    process looks at most once per interval per directory, and not while
    it holds the mbox lock an MDA waits for.  In a spool such as
    C{/var/mail/{user}} a look removes every user's old debris, as the
    start-up sweep does; debris left later goes at the next look.
    """
    from pop3srv.mbox import mailbox as mailbox_module

    write_mbox(spool / "bob", BOB_MAIL)
    now = [0.0]
    schedule = mailbox_module.DebrisSchedule(interval=600, clock=lambda: now[0])
    monkeypatch.setattr(mailbox_module, "_debris_schedule", schedule)
    looks: list[bool] = []
    real = mailbox_module.remove_stale_dotlock_temps

    def counted(directory: str, max_age: float, name: str | None = None) -> list[str]:
        looks.append(any(n.endswith(".lock") for n in os.listdir(spool)))
        return real(directory, max_age, name)

    monkeypatch.setattr(mailbox_module, "remove_stale_dotlock_temps", counted)
    debris = [spool / f".alice.lock.{'d' * 32}", spool / f".bob.lock.{'e' * 32}"]
    for path in debris:
        path.write_bytes(b"")
        _age(path, 3600)
    realm = spool_realm(spool)
    for user in (b"alice", b"bob", b"alice"):
        login(realm, user)[2]()
    assert looks == [False]
    assert not any(p.exists() for p in debris)
    later = spool / f".alice.lock.{'f' * 32}"
    later.write_bytes(b"")
    _age(later, 3600)
    login(realm, b"bob")[2]()
    assert later.exists()
    now[0] = 600
    login(realm, b"bob")[2]()
    assert looks == [False, False]
    assert not later.exists()
