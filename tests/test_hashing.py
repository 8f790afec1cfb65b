"""
Tests for L{pop3srv.hashing}: password verification in worker processes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from passlib.hash import (
    apr_md5_crypt,
    sha256_crypt,
    sha512_crypt,
)
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pop3srv import oscrypt
from pop3srv.checker import AvatarId, PasslibChecker
from pop3srv.hashing import ProcessVerifier
from pop3srv.userfile import UserFile, VerifyResult


class ThreadCallReactor:
    """Just enough reactor: C{callFromThread} queues; L{run_until} runs the queue."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append((f, args))

    def run_until(self, d: Deferred[Any], timeout: float = 30.0) -> Any:
        """Run queued calls until C{d} fires; return its result or raise its failure."""
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            assert time.monotonic() < deadline, "timed out"
            while self.calls:
                f, args = self.calls.pop(0)
                f(*args)
            time.sleep(0.005)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


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
def reactor() -> ThreadCallReactor:
    """The fake reactor results are delivered to."""
    return ThreadCallReactor()


@pytest.fixture
def verifier(tmp_path: Path, reactor: ThreadCallReactor) -> Iterator[ProcessVerifier]:
    """A started verifier with two worker processes on a fresh user file."""
    v = ProcessVerifier(str(write_users(tmp_path / "users")), 2, reactor)
    v.start()
    yield v
    v.stop()


def test_verifies_in_another_process(verifier: ProcessVerifier, reactor: ThreadCallReactor) -> None:
    """Right, wrong and unknown: the same results as UserFile, with labels."""
    check = verifier.verify_detailed
    assert reactor.run_until(check("alice", "alice-pw")) == VerifyResult(ok=True)
    assert reactor.run_until(check("alice", "nope")) == VerifyResult(ok=False)
    assert reactor.run_until(check("nobody", "alice-pw")) == VerifyResult(ok=False)
    assert reactor.run_until(check("bob", "phone-pw")) == VerifyResult(ok=True, label="phone")


def test_fork_is_refused(tmp_path: Path, reactor: ThreadCallReactor) -> None:
    """The fork start method would copy a running reactor: refused."""
    with pytest.raises(ValueError, match="fork"):
        ProcessVerifier(str(write_users(tmp_path / "users")), 1, reactor, start_method="fork")


def test_workers_reload_the_file(
    tmp_path: Path, verifier: ProcessVerifier, reactor: ThreadCallReactor
) -> None:
    """The workers read the file themselves and notice a change."""
    assert reactor.run_until(verifier.verify_detailed("alice", "alice-pw")).ok
    path = tmp_path / "users"
    write_users(path, sha512_crypt.using(rounds=1000).hash("new-pw"))
    # Make sure the change is visible even on a coarse mtime.
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    for _ in range(4):  # every worker, whichever gets the call
        assert reactor.run_until(verifier.verify_detailed("alice", "new-pw")).ok
        assert not reactor.run_until(verifier.verify_detailed("alice", "alice-pw")).ok


def test_upgrade_happens_in_the_worker_and_is_logged_here(
    tmp_path: Path, reactor: ThreadCallReactor
) -> None:
    """
    A deprecated hash is rewritten once by a worker; the worker's log event
    is re-emitted in this process; the other worker finds it done.
    """
    path = write_users(tmp_path / "users", apr_md5_crypt.hash("alice-pw"))
    v = ProcessVerifier(str(path), 2, reactor)
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        first = reactor.run_until(v.verify_detailed("alice", "alice-pw"))
        again = [reactor.run_until(v.verify_detailed("alice", "alice-pw")) for _ in range(3)]
    finally:
        globalLogPublisher.removeObserver(observer)
        v.stop()
    assert first == VerifyResult(ok=True, upgraded=True)
    assert all(r.ok and not r.upgraded for r in again)
    text = path.read_text()
    assert "$apr1$" not in text and "$argon2id$" in text
    upgraded = [formatEvent(e) for e in events if "upgraded" in formatEvent(e)]
    assert upgraded == [f"{path}: upgraded the apr_md5_crypt hash of user 'alice' to argon2"]
    assert all("alice-pw" not in formatEvent(e) for e in events)


def test_a_dead_worker_is_replaced(verifier: ProcessVerifier, reactor: ThreadCallReactor) -> None:
    """After a worker is killed, a call may fail, but the pool is rebuilt."""
    assert reactor.run_until(verifier.verify_detailed("alice", "alice-pw")).ok
    executor = verifier._executor
    assert executor is not None
    for pid in list(executor._processes):
        os.kill(pid, signal.SIGKILL)
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append(reactor.run_until(verifier.verify_detailed("alice", "alice-pw")).ok)
        except Exception:
            outcomes.append("failed")
        if outcomes[-1] is True:
            break
    assert outcomes[-1] is True, outcomes
    assert verifier._executor is not executor


def test_checker_uses_the_verifier(tmp_path: Path, reactor: ThreadCallReactor) -> None:
    """PasslibChecker with a verifier: same avatar IDs and failures."""
    path = write_users(tmp_path / "users")
    v = ProcessVerifier(str(path), 1, reactor)
    fake: Any = reactor
    checker = PasslibChecker(UserFile(path), reactor=fake, verifier=v.verify_detailed)
    try:
        avatar = reactor.run_until(checker.requestAvatarId(UsernamePassword(b"bob", b"phone-pw")))
        assert avatar == b"bob" and isinstance(avatar, AvatarId) and avatar.label == "phone"
        with pytest.raises(UnauthorizedLogin):
            reactor.run_until(checker.requestAvatarId(UsernamePassword(b"bob", b"bad")))
        with pytest.raises(UnauthorizedLogin):
            reactor.run_until(checker.requestAvatarId(UsernamePassword(b"eve", b"bad")))
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
