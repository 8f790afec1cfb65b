"""
Tests for L{pop3srv.auth.checker} and the C{passlib} strcred plugin.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeRealm, RunNow, ScramClient
from passlib import hash as passlib_hash  # type: ignore[import-untyped]
from passlib.hash import sha256_crypt  # type: ignore[import-untyped]
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pop3srv.auth.checker import (
    FAILURE_MESSAGE,
    MAX_CREDENTIAL_BYTES,
    REFRESH_INTERVAL,
    AvatarId,
    CheckerFault,
    PasslibChecker,
)
from pop3srv.auth.credentials import (
    IAuthorizer,
    ISCRAMLookup,
    ISCRAMProof,
    PasswordCredentials,
    SCRAMCredentials,
    credentials_for,
)
from pop3srv.auth.userfile import UserFile, UserFileError, VerifyResult
from pop3srv.core import sasl
from pop3srv.processes.rpc import HashProcessDied
from pop3srv.server.login import LoginFault, LoginRefused, LoginService, LoginSucceeded, Peer

PASSWORD = "s3cret-Pässword-7731"


def make_users(tmp: Path) -> UserFile:
    """
    @return: a user file with alice (password L{PASSWORD}) and bob.
    """
    cheap = sha256_crypt.using(rounds=1000)
    path = tmp / "users"
    path.write_text(f"alice:{cheap.hash(PASSWORD)}\nbob:{cheap.hash('bob-pw')}\n")
    return UserFile(path)


def temp_dir(case: SynchronousTestCase) -> Path:
    """
    A fresh directory removed at cleanup; trial's C{mktemp} would put it
    under the current directory, which under pytest is the checkout.
    """
    path = tempfile.mkdtemp(prefix="pop3srv-test-checker-")
    case.addCleanup(shutil.rmtree, path)
    return Path(path)


class PasslibCheckerTests(SynchronousTestCase):
    """
    L{PasslibChecker} with an injected synchronous thread pool, so each
    Deferred has fired by the time C{requestAvatarId} returns.
    """

    def setUp(self) -> None:
        """
        A checker over a fresh user file, collecting log events.
        """
        self.pool = RunNow()
        self.users = make_users(temp_dir(self))
        self.checker = PasslibChecker(self.users, reactor=RunNow(), threadpool=self.pool)  # type: ignore[arg-type]
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def check(self, username: bytes | str, password: bytes | str) -> Deferred[bytes]:
        """
        @return: the checker's answer for these credentials.
        """
        return self.checker.requestAvatarId(UsernamePassword(username, password))  # type: ignore[arg-type]

    def assertNoPasswordLogged(self) -> None:
        """
        No log event, in any field, contains the password in any encoding.
        """
        for event in self.events:
            text = repr(event)
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(repr(PASSWORD.encode("utf-8"))[2:-1], text)

    def test_interfaces(self) -> None:
        """
        The checker provides L{ICredentialsChecker} for L{IUsernamePassword}
        and L{ISCRAMProof}, and L{ISCRAMLookup}.
        """
        self.assertTrue(ICredentialsChecker.providedBy(self.checker))
        self.assertTrue(ISCRAMLookup.providedBy(self.checker))
        self.assertEqual(PasslibChecker.credentialInterfaces, (IUsernamePassword, ISCRAMProof))

    def test_success_returns_bytes_avatar_id(self) -> None:
        """
        Right UTF-8 bytes credentials give the username as bytes, and the
        verification ran in the thread pool.
        """
        result = self.successResultOf(self.check(b"alice", PASSWORD.encode("utf-8")))
        self.assertEqual(result, b"alice")
        self.assertIsInstance(result, bytes)
        self.assertEqual(self.pool.calls, 1)
        self.assertNoPasswordLogged()

    def test_text_credentials(self) -> None:
        """
        Credentials given as text work too.
        """
        self.assertEqual(self.successResultOf(self.check("alice", PASSWORD)), b"alice")

    def test_same_failure_for_unknown_user_and_wrong_password(self) -> None:
        """
        A wrong password and an unknown user fail identically: same
        exception type, same message.
        """
        wrong = self.failureResultOf(self.check(b"alice", b"nope"), UnauthorizedLogin)
        unknown = self.failureResultOf(
            self.check(b"mallory", PASSWORD.encode("utf-8")), UnauthorizedLogin
        )
        self.assertEqual(str(wrong.value), FAILURE_MESSAGE)
        self.assertEqual(str(unknown.value), FAILURE_MESSAGE)
        self.assertEqual(wrong.value.args, unknown.value.args)
        # Both went through the (slow) verification, not a shortcut.
        self.assertEqual(self.pool.calls, 2)
        self.assertNoPasswordLogged()

    def test_other_users_password_fails(self) -> None:
        """
        Bob's password does not log Alice in.
        """
        failure = self.failureResultOf(self.check(b"alice", b"bob-pw"), UnauthorizedLogin)
        self.assertEqual(str(failure.value), FAILURE_MESSAGE)

    def test_invalid_utf8_is_unauthorized(self) -> None:
        """
        A username or password that is not UTF-8 fails with the same message,
        and the password bytes are not logged.
        """
        for username, password in [(b"al\xffice", b"x"), (b"alice", b"\xff" + PASSWORD.encode())]:
            failure = self.failureResultOf(self.check(username, password), UnauthorizedLogin)
            self.assertEqual(str(failure.value), FAILURE_MESSAGE)
        self.assertNoPasswordLogged()

    def test_unexpected_error_is_logged_and_a_fault(self) -> None:
        """
        An unexpected exception in verification is logged as a failure
        (without the password), once, and fails the check as a server
        fault (L{CheckerFault}, caused by it), never as L{UnauthorizedLogin}.
        """

        def broken(username: str, password: str) -> VerifyResult:
            raise RuntimeError("disk on fire")

        self.users.verify_detailed = broken  # type: ignore[method-assign]
        failure = self.failureResultOf(self.check(b"alice", PASSWORD.encode()))
        self.assertFalse(failure.check(UnauthorizedLogin))
        self.assertTrue(failure.check(CheckerFault))
        self.assertIsInstance(failure.value.__cause__, RuntimeError)
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "disk on fire")
        critical = [e for e in self.events if e.get("log_failure") is not None]
        self.assertEqual(len(critical), 1)
        self.assertEqual(critical[0]["username"], "alice")
        self.assertNoPasswordLogged()

    def test_oversize_credentials_fail_unchecked(self) -> None:
        """
        A user name or password longer than L{MAX_CREDENTIAL_BYTES} octets
        of UTF-8 fails as a wrong password without reaching the verifier
        (an AMP hop could not carry it); one of exactly that length is
        checked.
        """
        seen: list[int] = []

        def verifier(username: str, password: str) -> Deferred[VerifyResult]:
            seen.append(len(password.encode()))
            return succeed(VerifyResult(ok=False))

        self.checker.verifier = verifier
        limit = MAX_CREDENTIAL_BYTES
        for username, password in [
            ("alice", "x" * (limit + 1)),
            ("alice", "\u00e9" * (limit // 2 + 1)),
            ("a" * (limit + 1), "x"),
        ]:
            failure = self.failureResultOf(self.check(username, password), UnauthorizedLogin)
            self.assertEqual(str(failure.value), FAILURE_MESSAGE)
        self.assertEqual(seen, [])
        self.failureResultOf(self.check("alice", "x" * limit), UnauthorizedLogin)
        self.assertEqual(seen, [limit])


class LabelAndScramTests(SynchronousTestCase):
    """
    App-password labels and SCRAM through L{PasslibChecker}, with the
    synchronous pool.
    """

    def setUp(self) -> None:
        """
        Alice has a main password (argon2 and scram lines) and two app
        passwords; carol's main password is not usable for POP3.
        """
        path = temp_dir(self) / "users"
        cheap = sha256_crypt.using(rounds=1000)
        scram_hash = passlib_hash.scram.using(rounds=1000, algs="sha-1,sha-256")
        path.write_text(
            f"alice:{cheap.hash(PASSWORD)}\n"
            f"alice:{scram_hash.hash(PASSWORD)}\n"
            f"alice:{cheap.hash('phone-pw')}:app=phone\n"
            f"alice:{scram_hash.hash('tablet-pw')}:app=tablet\n"
            f"carol:{scram_hash.hash(PASSWORD)}:nopop3\n"
            f"carol:{scram_hash.hash('carol-app')}:app=mail\n"
        )
        self.checker = PasslibChecker(UserFile(path), reactor=RunNow(), threadpool=RunNow())  # type: ignore[arg-type]
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_label_reported(self) -> None:
        """
        An app password logs in as the user; the label is on the avatar ID
        (the one way it travels: the credentials are left as they were) and
        in the log.
        """
        creds = PasswordCredentials(b"alice", b"phone-pw")
        avatar_id = self.successResultOf(self.checker.requestAvatarId(creds))
        self.assertEqual(avatar_id, b"alice")
        self.assertIsInstance(avatar_id, AvatarId)
        self.assertEqual(avatar_id.label, "phone")  # type: ignore[attr-defined]
        self.assertEqual(vars(creds), vars(PasswordCredentials(b"alice", b"phone-pw")))
        logged = [e for e in self.events if e.get("label") == "phone"]
        self.assertEqual(len(logged), 1)
        self.assertNotIn("phone-pw", repr(self.events))
        main = self.successResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"alice", PASSWORD.encode()))
        )
        self.assertIsNone(main.label)  # type: ignore[attr-defined]

    def test_avatar_id_is_normalised(self) -> None:
        """
        A user name sent decomposed (NFD) logs in as the NFC name of the
        file, so the realm finds the same maildrop.
        """
        path = temp_dir(self) / "users"
        path.write_text(f"alic\u00e9:{sha256_crypt.using(rounds=1000).hash('x')}\n")
        checker = PasslibChecker(UserFile(path), reactor=RunNow(), threadpool=RunNow())  # type: ignore[arg-type]
        creds = UsernamePassword("alic" + "e\u0301", b"x")  # type: ignore[arg-type]
        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(creds)), "alic\u00e9".encode()
        )

    def test_main_password_not_for_pop3(self) -> None:
        """
        Carol's main password is refused; her app password works.
        """
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"carol", PASSWORD.encode())),
            UnauthorizedLogin,
        )
        self.assertEqual(
            self.successResultOf(
                self.checker.requestAvatarId(UsernamePassword(b"carol", b"carol-app"))
            ).label,  # type: ignore[attr-defined]
            "mail",
        )

    def scram_login(self, user: str, password: str) -> tuple[SCRAMCredentials, Deferred[bytes]]:
        """
        Run a SCRAM exchange against the checker's lookup, with a client
        from RFC 5802, and hand the credentials to the checker.
        """
        server = sasl.SASLServer(
            mechanisms=[sasl.SCRAM_SHA_256], tls_active=False, plaintext_allowed=False
        )
        client = ScramClient(user, password)
        step = server.start(sasl.SCRAM_SHA_256, client.first())
        assert isinstance(step, sasl.Lookup)
        stored = self.successResultOf(self.checker.scram_credentials(step.username))
        challenge = server.lookup_done(stored)
        assert isinstance(challenge, sasl.Challenge)
        verify = server.respond(client.final(challenge.payload))
        assert isinstance(verify, sasl.Verify)
        creds = credentials_for(verify)
        assert isinstance(creds, SCRAMCredentials)
        return creds, self.checker.requestAvatarId(creds)

    def test_scram_main_password(self) -> None:
        """
        SCRAM with the main password logs alice in, with no label.
        """
        _, d = self.scram_login("alice", PASSWORD)
        avatar_id = self.successResultOf(d)
        self.assertEqual(avatar_id, b"alice")
        self.assertIsNone(avatar_id.label)  # type: ignore[attr-defined]

    def test_scram_app_password(self) -> None:
        """
        When the main password is not for POP3, SCRAM serves the first app
        password with a scram hash, and reports its label.
        """
        _, d = self.scram_login("carol", "carol-app")
        avatar_id = self.successResultOf(d)
        self.assertEqual(avatar_id, b"carol")
        self.assertEqual(avatar_id.label, "mail")  # type: ignore[attr-defined]

    def test_scram_wrong_password_and_unknown_user(self) -> None:
        """
        A wrong password, and an unknown user (served a fake salt), both fail
        with the one message.
        """
        for user, password in [("alice", "wrong"), ("mallory", PASSWORD), ("carol", PASSWORD)]:
            _, d = self.scram_login(user, password)
            failure = self.failureResultOf(d, UnauthorizedLogin)
            self.assertEqual(str(failure.value), FAILURE_MESSAGE)

    def test_scram_lookup_error(self) -> None:
        """
        An unexpected error while checking a proof is logged and fails the
        check as a server fault, not as L{UnauthorizedLogin}.
        """

        def broken(username: str) -> None:
            raise RuntimeError("disk on fire")

        self.checker.users.scram_lookup = broken  # type: ignore[method-assign]
        d = self.checker.requestAvatarId(SCRAMCredentials(b"alice", b"m", b"p"))
        failure = self.failureResultOf(d, CheckerFault)
        self.assertFalse(failure.check(UnauthorizedLogin))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def authorized_checker(self, rule: Callable[[str, str], bool]) -> PasslibChecker:
        """
        @return: a checker over the same file with C{rule} as its authorizer.
        """

        @implementer(IAuthorizer)
        class Rule:
            def authorize(self, authcid: str, authzid: str) -> bool:
                return rule(authcid, authzid)

        return PasslibChecker(
            self.checker.users,
            reactor=RunNow(),  # type: ignore[arg-type]
            threadpool=RunNow(),  # type: ignore[arg-type]
            authorizer=Rule(),
        )

    def test_authzid_resolved_by_the_checker(self) -> None:
        """
        An authzid the authorizer allows becomes the avatar ID (NFC), after
        the authcid's password checked out; the label still travels on it.
        """
        checker = self.authorized_checker(lambda c, z: (c, z) == ("alice", "b\u00f6b"))
        self.assertTrue(IAuthorizer.providedBy(checker))
        creds = PasswordCredentials(b"alice", PASSWORD.encode(), authzid="bo\u0308b")
        avatar_id = self.successResultOf(checker.requestAvatarId(creds))
        self.assertEqual(avatar_id, "b\u00f6b".encode())
        self.assertIsNone(avatar_id.label)  # type: ignore[attr-defined]
        wrong = PasswordCredentials(b"alice", b"nope", authzid="b\u00f6b")
        self.failureResultOf(checker.requestAvatarId(wrong), UnauthorizedLogin)

    def test_authzid_refused_without_rule(self) -> None:
        """
        Without an authorizer, a rule that says no, or a rule that raises,
        an authzid that differs from the authcid fails like a wrong password;
        one equal to the authcid is no authzid at all.
        """
        creds = PasswordCredentials(b"alice", PASSWORD.encode(), authzid="bob")
        failure = self.failureResultOf(self.checker.requestAvatarId(creds), UnauthorizedLogin)
        self.assertEqual(str(failure.value), FAILURE_MESSAGE)
        self.assertFalse(self.checker.authorize("alice", "bob"))
        no = self.authorized_checker(lambda c, z: False)
        self.failureResultOf(no.requestAvatarId(creds), UnauthorizedLogin)

        def broken(authcid: str, authzid: str) -> bool:
            raise RuntimeError("rule on fire")

        self.failureResultOf(
            self.authorized_checker(broken).requestAvatarId(creds), UnauthorizedLogin
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        same = PasswordCredentials(b"alice", PASSWORD.encode(), authzid="alice")
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(same)), b"alice")

    def test_scram_authzid(self) -> None:
        """
        A SCRAM proof with an allowed authzid logs in as the authzid.
        """
        checker = self.authorized_checker(lambda c, z: c == "alice")
        server = sasl.SASLServer(
            mechanisms=[sasl.SCRAM_SHA_256],
            tls_active=False,
            plaintext_allowed=False,
            authorize=checker.authorize,
        )
        client = ScramClient("alice", PASSWORD, authzid="bob")
        step = server.start(sasl.SCRAM_SHA_256, client.first())
        assert isinstance(step, sasl.Lookup)
        challenge = server.lookup_done(self.successResultOf(checker.scram_credentials("alice")))
        assert isinstance(challenge, sasl.Challenge)
        verify = server.respond(client.final(challenge.payload))
        assert isinstance(verify, sasl.Verify) and verify.authzid == "bob"
        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(credentials_for(verify))), b"bob"
        )


class RealThreadPoolTests(TestCase):
    """
    L{PasslibChecker} with a real L{ThreadPool} and the global reactor;
    trial's C{TestCase} spins the reactor until the Deferred fires.
    """

    def setUp(self) -> None:
        """
        Start a private thread pool, stopped again at cleanup.
        """
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-checker")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.users = make_users(temp_dir(self))

    def test_verifies_in_pool_thread(self) -> Deferred[None]:
        """
        The verification runs in a pool thread, not the reactor thread, and
        the result arrives back as the username bytes.
        """
        import threading

        from twisted.internet import reactor

        threads: list[str] = []
        real_verify = self.users.verify_detailed

        def recording_verify(username: str, password: str) -> VerifyResult:
            threads.append(threading.current_thread().name)
            return real_verify(username, password)

        self.users.verify_detailed = recording_verify  # type: ignore[method-assign]
        checker = PasslibChecker(self.users, reactor=reactor, threadpool=self.pool)
        d = checker.requestAvatarId(UsernamePassword(b"alice", PASSWORD.encode()))

        def check(avatar_id: bytes) -> None:
            self.assertEqual(avatar_id, b"alice")
            self.assertEqual(len(threads), 1)
            self.assertNotEqual(threads[0], threading.current_thread().name)

        return d.addCallback(check)

    def test_wrong_password_in_pool(self) -> Deferred[None]:
        """
        A wrong password fails with L{UnauthorizedLogin} through the pool.
        """
        from twisted.internet import reactor

        checker = PasslibChecker(self.users, reactor=reactor, threadpool=self.pool)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
        return self.assertFailure(d, UnauthorizedLogin).addCallback(
            lambda e: self.assertEqual(str(e), FAILURE_MESSAGE)
        )

    def test_defaults_to_reactor_thread_pool(self) -> Deferred[None]:
        """
        With nothing injected, the global reactor and its thread pool are
        used.
        """
        checker = PasslibChecker(self.users)
        d = checker.requestAvatarId(UsernamePassword(b"bob", b"bob-pw"))
        return d.addCallback(self.assertEqual, b"bob")


def test_import_does_not_touch_reactor() -> None:
    """
    Importing the checker and the plugin installs no reactor and (for the
    plugin) loads neither pop3srv nor passlib.
    """
    code = (
        "import sys\n"
        "import twisted.plugins.pop3srv_cred\n"
        "assert 'pop3srv.auth.checker' not in sys.modules\n"
        "assert 'passlib' not in sys.modules\n"
        "import pop3srv.auth.checker\n"
        "assert 'twisted.internet.reactor' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def plugin() -> Any:
    """
    @return: the C{passlib} checker factory, found by plugin scan.
    """
    found = [p for p in getPlugins(strcred.ICheckerFactory) if p.authType == "passlib"]
    assert len(found) == 1
    return found[0]


def test_plugin_is_found() -> None:
    """
    Twisted's plugin scan finds the C{passlib} checker factory in the
    repository's C{twisted/plugins} (on the path via the compat-mode
    editable install), with help text and argument format.
    """
    factory = plugin()
    assert factory.credentialInterfaces == (IUsernamePassword, ISCRAMProof)
    assert factory.argStringFormat == "A path to a user file of name:hash lines"
    assert factory.authHelp.count("\n") > 5
    for word in ("argon2", "bcrypt", "{SSHA}", "{SHA512-CRYPT}", "{PLAIN}", "name:hash"):
        assert word in factory.authHelp


def test_make_checker_from_string(tmp_path: Path) -> None:
    """
    C{strcred.makeChecker("passlib:PATH")} builds a working L{PasslibChecker}.
    """
    users = make_users(tmp_path)
    checker = strcred.makeChecker(f"passlib:{users.path}")
    assert isinstance(checker, PasslibChecker)
    checker._reactor = RunNow()
    checker._threadpool = RunNow()  # type: ignore[assignment]
    d = checker.requestAvatarId(UsernamePassword(b"alice", PASSWORD.encode()))
    results: list[object] = []
    d.addBoth(results.append)
    assert results == [b"alice"]


def test_plugin_missing_file(tmp_path: Path) -> None:
    """
    A missing file, or no path at all, is a one-line L{UserFileError}.
    """
    missing = tmp_path / "missing"
    with pytest.raises(UserFileError) as info:
        strcred.makeChecker(f"passlib:{missing}")
    assert str(info.value) == f"{missing}: No such file or directory"
    with pytest.raises(UserFileError, match="requires a user file path"):
        plugin().generateChecker("")


def test_scram_available_rereads_at_most_once_per_interval(tmp_path: Path) -> None:
    """
    L{PasslibChecker.scram_available}, asked once per connection, starts a
    re-read of the user file at most once every L{REFRESH_INTERVAL}
    seconds, however many connections come; a SCRAM line added shows at
    the first re-read after the interval, and a clock set back does not
    stop re-reads.
    """
    cheap = sha256_crypt.using(rounds=1000)
    path = tmp_path / "users"
    path.write_text(f"alice:{cheap.hash(PASSWORD)}\n")
    run, clock = RunNow(), MemoryReactorClock()
    checker = PasslibChecker(
        UserFile(path),
        reactor=run,  # type: ignore[arg-type]
        threadpool=run,  # type: ignore[arg-type]
        clock=clock,
    )
    assert checker.scram_available() is False
    assert run.calls == 1
    scram = passlib_hash.scram.using(rounds=1000, algs="sha-1,sha-256").hash(PASSWORD)
    path.write_text(f"alice:{cheap.hash(PASSWORD)}\nalice:{scram}\n")
    clock.advance(REFRESH_INTERVAL / 2)
    for _ in range(100):
        assert checker.scram_available() is False
    assert run.calls == 1
    clock.advance(REFRESH_INTERVAL / 2)
    # RunNow re-reads before the answer, so this one already follows the file.
    assert checker.scram_available() is True
    assert run.calls == 2
    clock.rightNow -= 10
    checker.scram_available()
    assert run.calls == 3


# --- a server fault through the login service


def fault_service(
    tmp_path: Path, clock: MemoryReactorClock, realm: FakeRealm
) -> tuple[LoginService, PasslibChecker]:
    """
    A login service over a L{PasslibChecker} of alice (password
    L{PASSWORD}) whose verifier fails as a dead hashing process does.
    """
    run = RunNow()
    checker = PasslibChecker(
        make_users(tmp_path),
        reactor=run,  # type: ignore[arg-type]
        threadpool=run,  # type: ignore[arg-type]
        verifier=lambda username, password: fail(HashProcessDied("gone")),
    )
    return LoginService.for_portal(Portal(realm, [checker]), clock), checker


def attempt(service: LoginService, clock: MemoryReactorClock, password: str) -> Any:
    """
    Log alice in from one address, let the failure delay pass.

    @return: the outcome.
    """
    creds = PasswordCredentials(b"alice", password.encode())
    peer = Peer("192.0.2.7", "s1", "192.0.2.7:4000")
    outcome: list[Any] = []
    service.login(creds, username="alice", method="password", peer=peer).addBoth(outcome.append)
    clock.advance(30)
    [result] = outcome
    return result


def audit_lines(events: list[LogEvent]) -> list[tuple[str, str]]:
    """
    @return: the audit log's (event, reason) pairs.
    """
    return [
        (e["audit_event"], e["reason"]) for e in events if e.get("log_namespace") == "pop3srv.audit"
    ]


def test_dead_hashing_process_is_a_fault_and_never_locks_out(
    tmp_path: Path, clock: MemoryReactorClock, fake_realm: FakeRealm, log_events: list[LogEvent]
) -> None:
    """
    A verifier that fails as a dead hashing process does is a server fault
    through the login service: L{LoginFault} (C{-ERR [SYS/TEMP]}), audited
    as C{error}, never counted as a wrong password, so twenty of them lock
    no one out and the right password then logs in.
    """
    service, checker = fault_service(tmp_path, clock, fake_realm)
    outcomes = [attempt(service, clock, PASSWORD) for _ in range(20)]
    assert all(isinstance(o, LoginFault) for o in outcomes), outcomes
    assert audit_lines(log_events) == [("login-refused", "error")] * 20
    logged = [e["log_failure"] for e in log_events if "log_failure" in e]
    assert sum(1 for f in logged if f.check(HashProcessDied)) == 20
    checker.verifier = None  # the hashing process is back: the file checks in the pool
    ok = attempt(service, clock, PASSWORD)
    assert isinstance(ok, LoginSucceeded)
    ok.release()
    assert audit_lines(log_events)[-1] == ("login-ok", "password")


def test_wrong_passwords_do_lock_out(
    tmp_path: Path, clock: MemoryReactorClock, fake_realm: FakeRealm, log_events: list[LogEvent]
) -> None:
    """
    The control for the test above: twenty wrong passwords, in the same
    setting, do lock alice out, so the right password is then refused.
    """
    service, checker = fault_service(tmp_path, clock, fake_realm)
    checker.verifier = None
    outcomes = [attempt(service, clock, "wrong") for _ in range(20)]
    assert all(isinstance(o, LoginRefused) and o.code == "AUTH" for o in outcomes)
    assert any(event == "lockout" for event, _ in audit_lines(log_events))
    assert isinstance(attempt(service, clock, PASSWORD), LoginRefused)
