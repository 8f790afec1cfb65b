"""
Tests for L{pop3srv.processes.hashpool}: password verification in hashing processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import low_level as argon2_low_level
from helpers import run_until
from hypothesis import given, settings
from hypothesis import strategies as st
from passlib.hash import (
    apr_md5_crypt,
    argon2,
    sha256_crypt,
    sha512_crypt,
)
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from pop3srv.auth.checker import AvatarId, PasslibChecker
from pop3srv.auth.hashpolicy import argon2check, oscrypt
from pop3srv.auth.userfile import UserFile, VerifyResult
from pop3srv.processes import hashpool as hashing
from pop3srv.processes.hashpool import NICENESS, HashCheckFailed, HashProcessDied, ProcessVerifier


@pytest.fixture(autouse=True)
def _processes_gone_after_each_test() -> Iterator[None]:
    """
    After a test, iterate the global reactor until the hashing processes it
    started have gone and their pipes are closed, so later tests (trial ones
    check for it) find a clean reactor.
    """
    yield
    from twisted.internet.process import ProcessReader, ProcessWriter
    from twisted.internet.unix import Server as UNIXConnection

    def pipes() -> list[Any]:
        selectables = [*reactor.getReaders(), *reactor.getWriters()]  # type: ignore[attr-defined]
        kinds = ProcessReader | ProcessWriter | UNIXConnection
        return [s for s in selectables if isinstance(s, kinds)]

    deadline = time.monotonic() + 10
    while pipes() and time.monotonic() < deadline:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    assert not pipes(), "a hashing process outlived its test"


def write_users(path: Path, alice_hash: str | None = None) -> Path:
    """A user file with alice (password C{alice-pw}) and bob (C{bob-pw}), cheap hashes."""
    cheap = sha512_crypt.using(rounds=1000)
    path.write_text(
        f"alice:{alice_hash or cheap.hash('alice-pw')}\n"
        f"bob:{{SHA512-CRYPT}}{cheap.hash('bob-pw')}::\n"
        f"bob:{cheap.hash('phone-pw')}:app=phone\n"
    )
    return path


@pytest.fixture
def verifier(tmp_path: Path) -> Iterator[ProcessVerifier]:
    """A started verifier with two hashing processes on a fresh user file."""
    v = ProcessVerifier(UserFile(write_users(tmp_path / "users")), 2, reactor)
    v.start()
    yield v
    v.stop()


def test_verifies_in_other_processes(verifier: ProcessVerifier) -> None:
    """Right, wrong and unknown: the same results as UserFile, with labels."""
    check = verifier.verify_detailed
    assert run_until(check("alice", "alice-pw")) == VerifyResult(ok=True)
    assert run_until(check("alice", "nope")) == VerifyResult(ok=False)
    assert run_until(check("nobody", "alice-pw")) == VerifyResult(ok=False)
    assert run_until(check("bob", "phone-pw")) == VerifyResult(ok=True, label="phone")
    pids = verifier.pids
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "pop3srv-hash"
        assert os.getpriority(os.PRIO_PROCESS, pid) >= NICENESS


def test_calls_beyond_the_processes_wait_their_turn(verifier: ProcessVerifier) -> None:
    """More calls than processes: each is answered, with its own result."""
    calls = [("alice", "alice-pw"), ("alice", "bad"), ("bob", "bob-pw"), ("bob", "x")] * 3
    pending = [verifier.verify_detailed(u, p) for u, p in calls]
    results = [run_until(d).ok for d in pending]
    assert results == [True, False, True, False] * 3


def test_cancelled_checks_are_skipped(tmp_path: Path) -> None:
    """
    A check cancelled while it waits (its child server process went away)
    is never hashed; the hashing process goes on with the next check.
    """
    old_hash = apr_md5_crypt.hash("alice-pw")
    path = write_users(tmp_path / "users", old_hash)
    v = ProcessVerifier(UserFile(path), 1, reactor)
    v.start()
    try:
        pids = v.pids
        running = v.verify_detailed("bob", "bob-pw")
        # A match against the old hash would upgrade it in the file.
        waiting = v.verify_detailed("alice", "alice-pw")
        after = v.verify_detailed("bob", "bad")
        waiting.cancel()
        assert run_until(running).ok
        assert run_until(after) == VerifyResult(ok=False)
        with pytest.raises(CancelledError):
            run_until(waiting)
        assert old_hash in path.read_text()
        assert v.pids == pids  # the same hashing process throughout
    finally:
        v.stop()


def test_hashing_processes_reload_the_file(tmp_path: Path, verifier: ProcessVerifier) -> None:
    """The hashing processes notice a change to the file themselves."""
    assert run_until(verifier.verify_detailed("alice", "alice-pw")).ok
    path = tmp_path / "users"
    write_users(path, sha512_crypt.using(rounds=1000).hash("new-pw"))
    # Make sure the change is visible even on a coarse mtime.
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    for _ in range(4):  # every hashing process, whichever gets the call
        assert run_until(verifier.verify_detailed("alice", "new-pw")).ok
        assert not run_until(verifier.verify_detailed("alice", "alice-pw")).ok


def test_upgrade_is_offered_by_the_hashing_process_and_written_here(tmp_path: Path) -> None:
    """
    A deprecated hash: the hashing process offers the new hash (the result's
    fields cross AMP whole), the checker here writes it once and logs it,
    and the other hashing process's offer finds it done.
    """
    old = apr_md5_crypt.hash("alice-pw")
    path = write_users(tmp_path / "users", old)
    v = ProcessVerifier(UserFile(path), 2, reactor)
    v.start()
    pool = ThreadPool(minthreads=1, maxthreads=1)
    pool.start()
    checker = PasslibChecker(
        UserFile(path), reactor=reactor, threadpool=pool, verifier=v.verify_detailed
    )
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        first = run_until(v.verify_detailed("alice", "alice-pw"))
        logins = [
            run_until(checker.requestAvatarId(UsernamePassword(b"alice", b"alice-pw")))
            for _ in range(4)
        ]
    finally:
        globalLogPublisher.removeObserver(observer)
        v.stop()
        pool.stop()
    assert first.ok and first.needs_update and first.matched_hash == old
    assert first.upgrade_hash is not None and first.upgrade_hash.startswith("$argon2id$")
    assert logins == [b"alice"] * 4
    text = path.read_text()
    assert "$apr1$" not in text and "$argon2id$" in text
    upgraded = [formatEvent(e) for e in events if "upgraded" in formatEvent(e)]
    assert upgraded == [f"{path}: upgraded the apr_md5_crypt hash of user 'alice' to argon2"]
    assert all("alice-pw" not in formatEvent(e) for e in events)


def test_a_dead_hashing_process_fails_its_call_and_is_replaced(verifier: ProcessVerifier) -> None:
    """A hashing process killed mid-check fails that check; a new one takes its place."""
    assert run_until(verifier.verify_detailed("alice", "alice-pw")).ok
    before = set(verifier.pids)
    for pid in before:
        os.kill(pid, signal.SIGSTOP)
    stuck = verifier.verify_detailed("alice", "alice-pw")
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(HashProcessDied):
        run_until(stuck)
    deadline = time.monotonic() + 20
    while len(set(verifier.pids) - before) < 2:
        assert time.monotonic() < deadline, "no replacement processes"
        reactor.iterate(0.05)
    assert run_until(verifier.verify_detailed("alice", "alice-pw")).ok


def test_stop_ends_the_processes(tmp_path: Path) -> None:
    """After stop the hashing processes exit, and new calls fail at once."""
    v = ProcessVerifier(UserFile(write_users(tmp_path / "users")), 2, reactor)
    v.start()
    assert run_until(v.verify_detailed("alice", "alice-pw")).ok
    pids = v.pids
    v.stop()
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, "hashing processes still running"
        reactor.iterate(0.05)
    with pytest.raises(HashProcessDied):
        run_until(v.verify_detailed("alice", "alice-pw"))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_lock_held_at_the_fork_does_not_hang_the_hashing_process(tmp_path: Path) -> None:
    """
    A thread of the server may hold the user file's lock (a SCRAM lookup)
    just when a hashing process is forked: it must not wait for it forever.
    """
    users = UserFile(write_users(tmp_path / "users"))
    v = ProcessVerifier(users, 1, reactor)
    held = users._lock
    held.acquire()
    try:
        v.start()
    finally:
        held.release()
    pids = v.pids
    try:
        assert run_until(v.verify_detailed("alice", "alice-pw"), timeout=10).ok
    finally:
        v.stop()
        for pid in pids:  # a hung hashing process would not see its socket close
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _misbehaving(users: UserFile) -> UserFile:
    """
    The user file, with checks of "boom" raising and of "slow" hanging, in
    the hashing processes forked from now on (they inherit this process's objects).
    """
    check = users.verify_detailed

    def verify_detailed(username: str, password: str) -> VerifyResult:
        if username == "boom":
            raise RuntimeError("broken backend")
        if username == "slow":
            time.sleep(60)
        return check(username, password)

    users.verify_detailed = verify_detailed  # type: ignore[method-assign]
    return users


def test_a_check_that_raises_fails_alone(tmp_path: Path) -> None:
    """The error is logged here and that login fails; the hashing process lives on."""
    v = ProcessVerifier(_misbehaving(UserFile(write_users(tmp_path / "users"))), 1, reactor)
    v.start()
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        pids = v.pids
        with pytest.raises(HashCheckFailed):
            run_until(v.verify_detailed("boom", "x"))
        assert run_until(v.verify_detailed("alice", "alice-pw")).ok
        assert v.pids == pids
    finally:
        globalLogPublisher.removeObserver(observer)
        v.stop()
    assert any("broken backend" in formatEvent(e) for e in events)


def test_an_oversize_password_is_a_mismatch_and_kills_nothing(
    monkeypatch: pytest.MonkeyPatch, verifier: ProcessVerifier
) -> None:
    """
    A password longer than an AMP value may be is answered as a mismatch
    without a hashing process; and should one reach the AMP call all the
    same, that check alone fails (L{HashCheckFailed}): the process that
    never saw it is not killed, and serves the next check.
    """
    pids = verifier.pids
    assert run_until(verifier.verify_detailed("alice", "x" * 70000)) == VerifyResult(ok=False)
    monkeypatch.setattr(hashing, "_too_long", lambda value: False)
    with pytest.raises(HashCheckFailed):
        run_until(verifier.verify_detailed("alice", "x" * 70000))
    assert run_until(verifier.verify_detailed("alice", "alice-pw")).ok
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:  # a killed process would be gone by now
        reactor.iterate(0.05)
    assert verifier.pids == pids and all(alive(pid) for pid in pids)


def test_events_with_emit_argument_names_are_logged(tmp_path: Path) -> None:
    """
    A hashing process's event with fields named C{format} or C{level} (as
    Logger.emit's own arguments are) is logged with them; an event that
    cannot be logged at all is reported; either way the check it came
    with is answered.
    """
    v = ProcessVerifier(UserFile(write_users(tmp_path / "users")), 1, reactor)
    child = hashing._HashProcess(v)
    clashing = {
        "namespace": "pop3srv.test",
        "level": "warn",
        "format": "legacy {format} at {level}",
        "fields": {"format": "%(x)s", "level": 30},
    }
    unloggable = {"namespace": "pop3srv.test", "level": "loud", "format": "x", "fields": {}}
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        d: Deferred[Any] = Deferred()
        child.current = d
        child._answered({"result": None, "events": [clashing, unloggable]})
        failed: list[Failure] = []
        d.addErrback(failed.append)
        ok: Deferred[Any] = Deferred()
        child.current = ok
        child._answered({"result": VerifyResult(ok=True), "events": []})
        answered: list[Any] = []
        ok.addCallback(answered.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [f.type for f in failed] == [HashCheckFailed]
    assert answered == [(VerifyResult(ok=True), [])]
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "pop3srv.test"]
    assert texts == ["legacy %(x)s at 30"]
    reported = [e for e in events if "log_failure" in e]
    assert len(reported) == 1 and "Cannot log" in formatEvent(reported[0])


def test_a_hung_check_is_killed_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hashing process that does not answer in time is killed; a new one serves."""
    monkeypatch.setattr(hashing, "CHECK_TIMEOUT", 0.5)
    v = ProcessVerifier(_misbehaving(UserFile(write_users(tmp_path / "users"))), 1, reactor)
    v.start()
    try:
        (pid,) = v.pids
        with pytest.raises(HashProcessDied):
            run_until(v.verify_detailed("slow", "x"), timeout=20)
        deadline = time.monotonic() + 20
        while not v.pids or v.pids == [pid]:
            assert time.monotonic() < deadline, "no replacement process"
            reactor.iterate(0.05)
        assert run_until(v.verify_detailed("alice", "alice-pw")).ok
    finally:
        v.stop()


@pytest.mark.parametrize(
    "answer",
    [
        # Not AMP: a box that is neither question nor answer.
        b"\x00\x04junk\x00\x04junk\x00\x00",
        # A key over AMP's 255-byte limit.
        b"\x04\x00" + b"k" * 1024,
        # An answer to a question never asked.
        b"\x00\x07_answer\x00\x0299\x00\x00",
    ],
    ids=["garbage", "oversize", "unasked"],
)
def test_a_broken_answer_fails_the_check_and_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: bytes
) -> None:
    """
    A hashing process that answers with something that is not an AMP answer
    to the check fails that check (no hang); a new process serves.
    """
    marker = tmp_path / "answered"
    real = hashing.serve

    def broken_once(users: UserFile, niceness: int, fd: int = 0) -> None:
        if marker.exists():
            return real(users, niceness, fd)
        marker.touch()
        os.read(fd, 65536)
        os.write(fd, answer)
        time.sleep(60)  # killed, not waited for

    monkeypatch.setattr(hashing, "serve", broken_once)
    v = ProcessVerifier(UserFile(write_users(tmp_path / "users")), 1, reactor)
    v.start()
    try:
        (pid,) = v.pids
        with pytest.raises(HashProcessDied):
            run_until(v.verify_detailed("alice", "alice-pw"), timeout=10)
        deadline = time.monotonic() + 20
        while not v.pids or v.pids == [pid]:
            assert time.monotonic() < deadline, "no replacement process"
            reactor.iterate(0.05)
        assert run_until(v.verify_detailed("alice", "alice-pw")).ok
        assert not alive(pid)
    finally:
        v.stop()


def alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    return os.path.exists(f"/proc/{pid}") and not _zombie(pid)


def test_a_failed_fork_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start() returns even if a fork fails; a check waits for the retry."""
    real = hashing.ForkedProcess
    attempts: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(hashing, "ForkedProcess", flaky)
    v = ProcessVerifier(UserFile(write_users(tmp_path / "users")), 1, reactor)
    v.start()
    try:
        assert v.pids == []
        assert run_until(v.verify_detailed("alice", "alice-pw")).ok
        assert len(attempts) == 2
    finally:
        v.stop()


def test_checker_uses_the_verifier(tmp_path: Path) -> None:
    """PasslibChecker with a verifier: same avatar IDs and failures."""
    path = write_users(tmp_path / "users")
    v = ProcessVerifier(UserFile(path), 1, reactor)
    v.start()
    checker = PasslibChecker(UserFile(path), reactor=reactor, verifier=v.verify_detailed)
    try:
        avatar = run_until(checker.requestAvatarId(UsernamePassword(b"bob", b"phone-pw")))
        assert avatar == b"bob" and isinstance(avatar, AvatarId) and avatar.label == "phone"
        with pytest.raises(UnauthorizedLogin):
            run_until(checker.requestAvatarId(UsernamePassword(b"bob", b"bad")))
        with pytest.raises(UnauthorizedLogin):
            run_until(checker.requestAvatarId(UsernamePassword(b"eve", b"bad")))
    finally:
        v.stop()


@pytest.mark.skipif(not oscrypt.available(), reason="no libxcrypt")
@pytest.mark.parametrize("scheme", [sha512_crypt, sha256_crypt])
@pytest.mark.parametrize("rounds", [1000, 5000, None])
@pytest.mark.parametrize("password", ["pw", "Pässwörd ☃", "x" * 300, ""])
def test_libcrypt_agrees_with_passlib(scheme: Any, rounds: int | None, password: str) -> None:
    """libcrypt's answer for SHA-crypt is passlib's, for right and wrong passwords."""
    hashed = (scheme.using(rounds=rounds) if rounds else scheme).hash(password)
    assert oscrypt.verify_sha_crypt(password, hashed) is True
    assert oscrypt.verify_sha_crypt(password + "x", hashed) is False
    assert scheme.verify(password + "x", hashed) is False


def test_libcrypt_defers_to_passlib() -> None:
    """Other schemes, NUL, and settings libcrypt would rewrite answer None."""
    assert oscrypt.verify_sha_crypt("pw", apr_md5_crypt.hash("pw")) is None
    assert oscrypt.verify_sha_crypt("p\0w", sha512_crypt.hash("pw")) is None
    # passlib accepts rounds below libcrypt's minimum of 1000 as written.
    low = "$6$rounds=10$saltsalt$" + "A" * 86
    assert oscrypt.verify_sha_crypt("pw", low) is None
    # The implicit 5000 rounds form is read the same way.
    implicit = sha512_crypt.using(rounds=5000, salt="saltsalt").hash("pw")
    implicit = implicit.replace("rounds=5000$", "")
    if oscrypt.available():
        assert oscrypt.verify_sha_crypt("pw", implicit) is True


@settings(max_examples=40, deadline=None)
@given(
    password=st.text(max_size=40),
    variant=st.sampled_from(["ID", "I", "D"]),
    lanes=st.integers(1, 4),
    passes=st.integers(1, 3),
)
def test_argon2_one_thread_agrees_with_passlib(
    password: str, variant: str, lanes: int, passes: int
) -> None:
    """The one-thread argon2 check gives passlib's answer, right or wrong."""
    scheme = argon2.using(type=variant, memory_cost=8 * lanes, rounds=passes, parallelism=lanes)
    hashed = scheme.hash(password)
    assert argon2check.verify_argon2(password, hashed) is True
    assert argon2check.verify_argon2(password + "x", hashed) is False
    assert scheme.verify(password + "x", hashed) is False


def test_argon2_one_thread_reads_version_16() -> None:
    """Hashes of argon2 1.0 (C{v=16}, or no version field) verify too."""
    raw = argon2_low_level.hash_secret(
        b"pw", b"saltsaltsalt", 1, 16, 2, 16, argon2_low_level.Type.ID, version=16
    ).decode()
    assert "$v=16$" in raw
    assert argon2check.verify_argon2("pw", raw) is True
    assert argon2check.verify_argon2("pv", raw) is False
    assert argon2check.verify_argon2("pw", raw.replace("v=16$", "")) is True


@pytest.mark.parametrize(
    "hashed",
    [
        "$argon2id$v=19$m=65536,t=3,p=4,data=YWJj$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2id$v=18$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2id$v=19$m=16,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2id$v=19$m=99999999,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2id$v=19$m=65536,t=0,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2x$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFz!GhhcG",
        "$6$saltsalt$" + "A" * 86,
    ],
)
def test_argon2_one_thread_defers_to_passlib(hashed: str) -> None:
    """Extra fields, unknown versions or variants, and silly costs answer None."""
    assert argon2check.verify_argon2("pw", hashed) is None


_ONE_THREAD_SCRIPT = """
import resource
from passlib.hash import argon2
from pop3srv.auth.hashpolicy import argon2check

hashed = argon2.using(memory_cost=16 * 1024, rounds=2, parallelism=4).hash("pw")
thread_before = resource.getrusage(resource.RUSAGE_THREAD)
process_before = resource.getrusage(resource.RUSAGE_SELF)
assert argon2check.verify_argon2("pw", hashed) is True
thread_after = resource.getrusage(resource.RUSAGE_THREAD)
process_after = resource.getrusage(resource.RUSAGE_SELF)

def cpu(after, before):
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

print(cpu(thread_after, thread_before) / cpu(process_after, process_before))
"""


def test_argon2_check_runs_on_the_calling_thread() -> None:
    """
    The lanes are filled by the thread that asked, not by threads started
    per slice: nearly all the CPU time of the check is this thread's.  (In
    a new interpreter, so no other thread of the test run adds CPU time.)
    """
    out = subprocess.run(
        [sys.executable, "-c", _ONE_THREAD_SCRIPT],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert float(out) >= 0.8


def test_user_file_checks_argon2_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UserFile sends argon2 hashes to the one-thread check, and passlib
    still answers when that check cannot."""
    path = tmp_path / "users"
    path.write_text("alice:" + argon2.using(memory_cost=64, rounds=1).hash("pw") + "\n")
    users = UserFile(str(path))
    seen = []

    def spy(password: str, hashed: str) -> bool | None:
        seen.append(hashed)
        return real(password, hashed)

    real = argon2check.verify_argon2
    monkeypatch.setattr("pop3srv.auth.hashpolicy.verify_argon2", spy)
    assert users.verify("alice", "pw") and not users.verify("alice", "pv")
    assert len(seen) == 2
    monkeypatch.setattr("pop3srv.auth.hashpolicy.verify_argon2", lambda p, h: None)
    assert users.verify("alice", "pw") and not users.verify("alice", "pv")
