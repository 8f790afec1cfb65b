"""
Issue 12, items 3 and 5, at the L{LoginService} level:

  - SCRAM is offered only while some user has SCRAM secrets, and follows
    the user file when it changes (CAPA through the protocol, too);
  - attempts count when they start: parallel guesses run no more checks
    than the limits allow, and a server fault counts for nothing;
  - SASL failures on the credentials (a foreign authzid, an empty
    password, a channel binding that does not match) are audited and
    counted;
  - every failure is answered at the same time from the start of the
    attempt, whatever the user's hash costs (real time, real threads).
"""

from __future__ import annotations

import base64
import ipaddress
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import MESSAGES, FakeMailbox, FakeRealm, RunNow, b64, result_of, run_until
from passlib.hash import scram as scram_hash
from passlib.hash import sha512_crypt
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pop3srv.auth.checker import REFRESH_INTERVAL, PasslibChecker
from pop3srv.auth.credentials import ISCRAMAvailability, ISCRAMLookup, PasswordCredentials
from pop3srv.auth.userfile import UserFile, VerifyResult
from pop3srv.core import sasl
from pop3srv.core.scram import StoredScram
from pop3srv.processes.authorityrpc import AuthorityUnavailable
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import (
    AuthThrottle,
    ConnectionLimits,
    IAuthCounters,
    MemoryCounters,
    ThrottleSettings,
)
from pop3srv.server.login import (
    LoginFault,
    LoginRefused,
    LoginService,
    LoginSucceeded,
    Peer,
    ServerPolicy,
)
from pop3srv.server.protocol import POP3ServerFactory

PEER = Peer("192.0.2.9", "t-1", "192.0.2.9:40000")


def cheap(password: str) -> str:
    return str(sha512_crypt.using(rounds=1000).hash(password))


def scram_line(name: str, password: str) -> str:
    return f"{name}:{scram_hash.using(rounds=1000, algs='sha-1,sha-256').hash(password)}\n"


def audit_lines(log_events: list[LogEvent]) -> list[str]:
    """The audit lines as C{event user reason}."""
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    return [
        line.split(" session=")[0].removeprefix("pop3srv-audit event=")
        + " "
        + line.split(" user=")[1]
        for line in lines
    ]


# --- item 3: SCRAM offered only where secrets exist


def capa_sasl(factory: POP3ServerFactory) -> bytes:
    """The SASL line of CAPA in a new session."""
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"CAPA\r\n")
    lines = [line for line in transport.value().split(b"\r\n") if line.startswith(b"SASL")]
    protocol.connectionLost(None)
    return lines[0] if lines else b""


def test_capa_offers_scram_only_while_a_user_has_scram_secrets(tmp_path: Path) -> None:
    """
    No SCRAM line: CAPA lists PLAIN and LOGIN only, and AUTH SCRAM-SHA-256
    is refused before any exchange; a SCRAM line added to the file brings
    SCRAM into the next session; removing it withdraws it.
    """
    path = tmp_path / "users"
    path.write_text(f"alice:{cheap('pw')}\nbob:{cheap('pw2')}\n")
    clock = MemoryReactorClock()
    pool = RunNow()
    checker = PasslibChecker(str(path), reactor=pool, threadpool=pool, clock=clock)  # type: ignore[arg-type]
    factory = POP3ServerFactory(
        Portal(FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock)), [checker]),
        reactor=clock,
        plaintext_auth_networks=[ipaddress.ip_network("0.0.0.0/0")],
    )
    assert capa_sasl(factory) == b"SASL PLAIN LOGIN"

    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"AUTH SCRAM-SHA-256\r\n")
    assert transport.value() == b"-ERR Unrecognized authentication type.\r\n"

    with path.open("a") as f:
        f.write(scram_line("bob", "pw2"))
    clock.advance(REFRESH_INTERVAL)
    assert capa_sasl(factory) == b"SASL SCRAM-SHA-256 PLAIN LOGIN"

    path.write_text(f"alice:{cheap('pw')}\n")
    clock.advance(REFRESH_INTERVAL)
    assert capa_sasl(factory) == b"SASL PLAIN LOGIN"


def test_userfile_has_scram_counts_usable_sha256_secrets_only(tmp_path: Path) -> None:
    """
    A scram hash without a SHA-256 digest, or on a main password marked
    nopop3, serves no SCRAM login; an app password's does.
    """
    path = tmp_path / "users"
    sha1_only = scram_hash.using(rounds=1000, algs="sha-1").hash("pw")
    path.write_text(
        f"alice:{cheap('pw')}\nalice:{sha1_only}\n"
        f"bob:{scram_hash.using(rounds=1000, algs='sha-1,sha-256').hash('pw')}:nopop3\n"
    )
    users = UserFile(path)
    assert not users.has_scram
    with path.open("a") as f:
        f.write(f"bob:{scram_hash.using(rounds=1000, algs='sha-1,sha-256').hash('x')}:app=phone\n")
    # No I/O in has_scram: the answer follows the file only when it is re-read.
    assert not users.has_scram
    users.refresh()
    assert users.has_scram


class QueuedPool:
    """A thread pool that keeps the work for the test to run."""

    def __init__(self) -> None:
        self.queued: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.queued.append((on_result, f, args))

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def run_all(self) -> None:
        queued, self.queued = self.queued, []
        for on_result, f, args in queued:
            on_result(True, f(*args))


def test_scram_available_answers_from_memory_and_refreshes_in_the_pool(tmp_path: Path) -> None:
    """
    The reactor thread gets the last known answer at once; the re-read runs
    in the thread pool, one at a time, and the next answer follows it.
    """
    path = tmp_path / "users"
    path.write_text(f"alice:{cheap('pw')}\n")
    pool, clock = QueuedPool(), MemoryReactorClock()
    checker = PasslibChecker(str(path), reactor=pool, threadpool=pool, clock=clock)  # type: ignore[arg-type]
    assert ISCRAMAvailability.providedBy(checker)
    assert checker.scram_available() is False
    assert checker.scram_available() is False
    assert len(pool.queued) == 1
    path.write_text(f"alice:{cheap('pw')}\n{scram_line('alice', 'pw')}")
    assert checker.scram_available() is False
    assert len(pool.queued) == 1
    pool.run_all()
    clock.advance(REFRESH_INTERVAL)
    assert checker.scram_available() is True
    assert len(pool.queued) == 1


@implementer(ISCRAMLookup)
class ThirdPartyLookup:
    """An ISCRAMLookup from before ISCRAMAvailability existed."""

    def scram_credentials(self, username: str) -> Any:
        return defer.succeed(None)


@implementer(ISCRAMLookup, ISCRAMAvailability)
class BrokenAvailability(ThirdPartyLookup):
    def scram_available(self) -> bool:
        raise RuntimeError("bug")


class ScramPortal(Portal):
    """A portal that claims every credentials interface SCRAM needs."""

    def listCredentialsInterfaces(self) -> list[Any]:
        from pop3srv.auth.credentials import ISCRAMProof

        return [ISCRAMProof]


def test_a_lookup_without_availability_still_offers_scram(clock: MemoryReactorClock) -> None:
    """Third-party lookups keep SCRAM; a failing availability answer offers it too."""
    realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock))
    old = LoginService(ScramPortal(realm), clock, scram_lookup=ThirdPartyLookup())
    assert old.mechanisms(tls_active=False, plaintext_allowed=False) == ("SCRAM-SHA-256",)
    broken = LoginService(ScramPortal(realm), clock, scram_lookup=BrokenAvailability())
    assert broken.mechanisms(tls_active=False, plaintext_allowed=False) == ("SCRAM-SHA-256",)


# --- item 5b: attempts count when they start


class HeldVerifier:
    """A hashing stand-in whose checks stay in flight until the test ends them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred[VerifyResult]]] = []

    def __call__(self, username: str, password: str) -> defer.Deferred[VerifyResult]:
        d: defer.Deferred[VerifyResult] = defer.Deferred()
        self.calls.append((username, d))
        return d


def held_service(
    tmp_path: Path,
    clock: MemoryReactorClock,
    settings: ThrottleSettings | None = None,
    counters: IAuthCounters | None = None,
) -> tuple[LoginService, HeldVerifier]:
    path = tmp_path / "users"
    path.write_text(f"alice:{cheap('pw')}\n")
    verifier = HeldVerifier()
    checker = PasslibChecker(str(path), reactor=RunNow(), verifier=verifier)  # type: ignore[arg-type]
    realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock))
    authority = LocalAuthority(
        settings or ThrottleSettings(), ConnectionLimits(), counters, clock=clock
    )
    policy = ServerPolicy(authority=authority)
    return LoginService(Portal(realm, [checker]), clock, policy), verifier


def throttle_of(service: LoginService) -> AuthThrottle:
    """The throttle of the service's (local) authority."""
    authority = service.authority
    assert isinstance(authority, LocalAuthority)
    return authority.throttle


def failures(throttle: AuthThrottle, key: str, now: float) -> int:
    """The failures counted for C{key} in the last ten minutes."""
    counts: list[int] = result_of(throttle.counters.count([key], now, 600))
    return counts[0]


def attempt(service: LoginService, username: str) -> defer.Deferred[Any]:
    creds = PasswordCredentials(username.encode(), b"guess")
    return service.login(creds, username=username, method="password", peer=PEER)


@pytest.mark.parametrize(
    ("names", "checks"),
    [(["alice"] * 20, 5), ([f"user{i}" for i in range(20)], 10)],
    ids=["one-user", "many-users"],
)
def test_parallel_guesses_run_no_more_checks_than_the_limits(
    tmp_path: Path, clock: MemoryReactorClock, names: list[str], checks: int
) -> None:
    """
    Twenty wrong passwords sent at once from one address: only as many
    checks run as the limit allows (5 per address and user, 10 per
    address); the rest wait, and once the failures block the address (or
    pair) they are refused without one, after the failure delay.
    """
    service, verifier = held_service(tmp_path, clock)
    answers = [attempt(service, name) for name in names]
    assert len(verifier.calls) == checks
    for _, d in list(verifier.calls):
        d.callback(VerifyResult(ok=False))
    assert len(verifier.calls) == checks
    clock.advance(60)
    assert [result_of(d) for d in answers] == [
        LoginRefused("AUTH", "Invalid username or password.")
    ] * 20
    assert throttle_of(service).in_flight(PEER.host) == 0
    # The limit is reached: the next attempt is refused without a check.
    attempt(service, names[0])
    assert len(verifier.calls) == checks


def test_a_fault_or_a_success_frees_the_place_uncounted(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    A check that fails as a server fault counts for nothing and gives its
    place back; a success gives its place back and clears the pair; an
    attempt over the in-flight limit waits, uncounted, and starts when a
    place frees.
    """
    service, verifier = held_service(tmp_path, clock)
    throttle = throttle_of(service)
    pair = f"pair:{PEER.host}:alice"
    answers = [attempt(service, "alice") for _ in range(5)]
    assert len(verifier.calls) == 5
    verifier.calls[0][1].errback(RuntimeError("hashing process died"))
    assert isinstance(result_of(answers[0]), LoginFault)
    assert throttle.in_flight(PEER.host, "alice") == 4
    assert failures(throttle, pair, clock.seconds()) == 0
    attempt(service, "alice")
    assert len(verifier.calls) == 6
    waiting = attempt(service, "alice")
    assert len(verifier.calls) == 6
    assert not waiting.called
    assert failures(throttle, pair, clock.seconds()) == 0
    verifier.calls[1][1].callback(VerifyResult(ok=True))
    assert isinstance(result_of(answers[1]), LoginSucceeded)
    # The success gave its place to the waiting attempt, whose check runs
    # next, from the reactor.
    assert len(verifier.calls) == 6
    clock.advance(0)
    assert len(verifier.calls) == 7
    assert throttle.in_flight(PEER.host, "alice") == 5
    assert failures(throttle, pair, clock.seconds()) == 0


def test_parallel_right_passwords_from_one_address_all_log_in(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    Twenty logins at once from one address (a NAT gateway) with the right
    password: none is refused or counted as a failure; those over the
    in-flight limit wait for a place and then log in.
    """
    service, verifier = held_service(tmp_path, clock)
    answers = [attempt(service, f"user{i}") for i in range(20)]
    assert len(verifier.calls) == 10
    done = 0
    while done < len(verifier.calls):
        verifier.calls[done][1].callback(VerifyResult(ok=True))
        done += 1
        clock.advance(0)
    assert done == 20
    assert all(isinstance(result_of(d), LoginSucceeded) for d in answers)
    throttle = throttle_of(service)
    assert throttle.in_flight(PEER.host) == 0
    assert failures(throttle, f"addr:{PEER.host}", clock.seconds()) == 0


# --- item 5c: SASL failures on the credentials are audited and counted


def plain_failure(message: bytes) -> sasl.Failure:
    server = sasl.SASLServer(mechanisms=["PLAIN"], tls_active=True, plaintext_allowed=True)
    step = server.start("PLAIN", b64(message))
    assert isinstance(step, sasl.Failure)
    return step


def cbind_mismatch_failure() -> sasl.Failure:
    binding = sasl.ChannelBinding("tls-exporter", b"\x01" * 32)
    server = sasl.SASLServer(
        mechanisms=["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
        tls_active=True,
        plaintext_allowed=False,
        channel_bindings=[binding],
        nonce_factory=lambda: "SRV",
    )
    step = server.start("SCRAM-SHA-256-PLUS", b64("p=tls-exporter,,n=alice,r=abc"))
    assert step == sasl.Lookup("alice")
    stored = StoredScram(b"salt" * 4, 4096, b"k" * 32, b"s" * 32)
    assert isinstance(server.lookup_done(stored), sasl.Challenge)
    wrong = base64.b64encode(b"p=tls-exporter,," + b"\x02" * 32).decode()
    proof = base64.b64encode(b"\0" * 32).decode()
    step = server.respond(b64(f"c={wrong},r=abcSRV,p={proof}"))
    assert isinstance(step, sasl.Failure)
    return step


def test_sasl_credential_failures_carry_a_reason_and_the_authcid() -> None:
    """The failure steps say why, and whose login it was; exchange errors do not."""
    step = plain_failure(b"bob\0alice\0pw")
    assert (step.reason, step.username) == ("authzid-refused", "alice")
    assert plain_failure(b"\0alice\0").reason == "empty-password"
    assert plain_failure(b"\0alice\0").username == "alice"
    step = cbind_mismatch_failure()
    assert (step.reason, step.username) == ("channel-binding-mismatch", "alice")
    assert (step.code, step.text) == ("AUTH", "Authentication failed.")
    assert plain_failure(b"no nul here").reason is None
    login = sasl.SASLServer(mechanisms=["LOGIN"], tls_active=True, plaintext_allowed=True)
    login.start("LOGIN", b64("alice"))
    empty = login.respond("")
    assert isinstance(empty, sasl.Failure)
    assert (empty.reason, empty.username) == ("empty-password", "alice")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (lambda: plain_failure(b"bob\0alice\0pw"), "authzid-refused"),
        (lambda: plain_failure(b"\0alice\0"), "empty-password"),
        (cbind_mismatch_failure, "channel-binding-mismatch"),
    ],
    ids=["authzid", "empty-password", "channel-binding"],
)
def test_sasl_failures_are_audited_throttled_and_delayed(
    tmp_path: Path,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
    failure: Any,
    reason: str,
) -> None:
    """
    Each is a failed login: audited with its reason, answered after the
    failure delay with the step's text, and counted, so that five of them
    lock the pair out (a right password is then refused without a check).
    """
    service, verifier = held_service(tmp_path, clock)
    d = service.sasl_failed(failure(), peer=PEER)
    assert not d.called
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    assert result_of(d) == LoginRefused("AUTH", "Authentication failed.")
    for _ in range(4):
        service.sasl_failed(failure(), peer=PEER)
        clock.advance(60)
    assert audit_lines(log_events) == [f'login-failed "alice" reason={reason}'] * 5 + [
        'lockout "alice" reason=address+user'
    ]
    attempt(service, "alice")
    assert verifier.calls == []


# --- item 5a: the same answer time for every failure


def test_failures_wait_for_the_slowest_recent_check(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    With a failure delay shorter than a check (held here while the fake
    clock moves), every failure is answered as late after its start as the
    slowest recent failed check, however many cheap failures follow it;
    the floor is forgotten after two failure windows, and a success is not
    held back.
    """
    settings = ThrottleSettings(failure_delay=0.5, trusted=(ipaddress.ip_network("192.0.2.0/24"),))
    service, verifier = held_service(tmp_path, clock, settings)
    slow = attempt(service, "alice")
    clock.advance(3)
    verifier.calls[0][1].callback(VerifyResult(ok=False))
    clock.advance(0)
    assert isinstance(result_of(slow), LoginRefused)
    for i in range(100):
        answers: list[Any] = []
        attempt(service, f"nobody{i}").addCallback(answers.append)
        verifier.calls[-1][1].callback(VerifyResult(ok=False))
        clock.advance(2.9)
        assert answers == []
        clock.advance(0.1)
        assert [type(a) for a in answers] == [LoginRefused]
    success = attempt(service, "alice")
    verifier.calls[-1][1].callback(VerifyResult(ok=True))
    assert isinstance(result_of(success), LoginSucceeded)
    clock.advance(1200)
    answers = []
    attempt(service, "nobody").addCallback(answers.append)
    verifier.calls[-1][1].callback(VerifyResult(ok=False))
    clock.advance(0.4)
    assert answers == []
    clock.advance(0.1)
    assert [type(a) for a in answers] == [LoginRefused]


# --- item 5a in real time


def rounds_for(seconds: float) -> int:
    """sha512_crypt rounds that take about C{seconds} here."""
    probe = 50_000
    start = time.perf_counter()
    sha512_crypt.using(rounds=probe).hash("probe")
    per_round = (time.perf_counter() - start) / probe
    return max(1000, min(5_000_000, int(seconds / per_round)))


def test_unknown_and_costly_users_fail_at_the_same_time(tmp_path: Path) -> None:
    """
    A wrong password for a user whose hash costs ~150 ms, and one for an
    unknown user (checked against the cheap first hash of the file), are
    answered at the same time from the start of the attempt (medians within
    20 ms; before, they differed by the cost of the hash).  A success is not
    held back to that time.
    """
    from twisted.internet import reactor

    path = tmp_path / "users"
    costly = sha512_crypt.using(rounds=rounds_for(0.15)).hash("bob-pw")
    path.write_text(f"alice:{cheap('alice-pw')}\nbob:{costly}\n")
    pool = ThreadPool(minthreads=1, maxthreads=1)
    pool.start()
    try:
        checker = PasslibChecker(str(path), reactor=reactor, threadpool=pool)  # type: ignore[arg-type]
        realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", MemoryReactorClock()))
        settings = ThrottleSettings(failure_delay=0.0, address_limit=1000, pair_limit=1000)
        authority = LocalAuthority(settings, ConnectionLimits(), clock=reactor)
        service = LoginService(Portal(realm, [checker]), reactor, ServerPolicy(authority=authority))

        def timed(username: str, password: bytes) -> tuple[float, Any]:
            creds = PasswordCredentials(username.encode(), password)
            start = time.perf_counter()
            outcome = run_until(
                service.login(creds, username=username, method="password", peer=PEER), 15
            )
            return time.perf_counter() - start, outcome

        times: dict[str, list[float]] = {"bob": [], "nobody": []}
        for _ in range(7):
            for name in times:
                elapsed, outcome = timed(name, b"wrong")
                assert isinstance(outcome, LoginRefused)
                times[name].append(elapsed)
        bob, nobody = statistics.median(times["bob"]), statistics.median(times["nobody"])
        assert bob > 0.05, "the costly hash is too cheap to tell anything"
        assert abs(bob - nobody) < 0.02, times
        elapsed, outcome = timed("alice", b"alice-pw")
        assert isinstance(outcome, LoginSucceeded)
        assert elapsed < bob / 2
        outcome.release()
    finally:
        pool.stop()


# --- issue 14, item 4: answers within a client's patience


class StallingAuthority(LocalAuthority):
    """
    A L{LocalAuthority} whose chosen questions are held (C{stalled}, for
    the test to answer) or fail (C{broken}), as one in a lost parent may.
    """

    def __init__(
        self,
        clock: MemoryReactorClock,
        stall: str = "",
        broken: str = "",
        error: Exception | None = None,
    ) -> None:
        super().__init__(ThrottleSettings(), ConnectionLimits(), clock=clock)
        self.stall, self.broken = stall, broken
        self.error = error if error is not None else ConnectionError("the parent is gone")
        self.stalled: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []

    def _asked(self, name: str, ask: Any, *args: Any) -> defer.Deferred[Any]:
        if name == self.broken:
            # Nothing done, nothing counted: the question never arrived.
            return defer.fail(self.error)
        answer: defer.Deferred[Any] = ask(*args)
        if name != self.stall:
            return answer
        later: defer.Deferred[Any] = defer.Deferred()
        self.stalled.append((answer, later))
        return later

    def answer_stalled(self) -> None:
        stalled, self.stalled = self.stalled, []
        for answer, later in stalled:
            answer.chainDeferred(later)

    def begin_login(self, host: str, username: str) -> defer.Deferred[Any]:
        return self._asked("begin_login", super().begin_login, host, username)

    def end_login(self, ticket: Any, verdict: Any) -> defer.Deferred[Any]:
        return self._asked("end_login", super().end_login, ticket, verdict)

    def login_failed(self, host: str, username: str) -> defer.Deferred[Any]:
        return self._asked("login_failed", super().login_failed, host, username)

    def start_session(self, username: str, host: str) -> defer.Deferred[Any]:
        return self._asked("start_session", super().start_session, username, host)

    def login_succeeded(self, ticket: Any, username: str, host: str) -> defer.Deferred[Any]:
        return self._asked("login_succeeded", super().login_succeeded, ticket, username, host)


def stalling_service(
    tmp_path: Path, clock: MemoryReactorClock, **stall: Any
) -> tuple[LoginService, HeldVerifier, StallingAuthority]:
    service, verifier = held_service(tmp_path, clock)
    authority = StallingAuthority(clock, **stall)
    service.authority = authority
    return service, verifier, authority


def test_an_attempt_waiting_for_a_place_is_answered_within_the_patience(
    tmp_path: Path, clock: MemoryReactorClock, log_events: list[LogEvent]
) -> None:
    """
    Five checks for alice hold every place past the failure cap: the sixth
    attempt stops waiting when only the time of a check (at least a second)
    is left, and is answered [SYS/TEMP] without a check at 14 s, counted
    for nothing and no longer waiting; the five, failing later, are
    answered by 15 s.
    """
    service, verifier = held_service(tmp_path, clock)
    throttle = throttle_of(service)
    held = [attempt(service, "alice") for _ in range(5)]
    waiting = attempt(service, "alice")
    assert len(verifier.calls) == 5
    clock.advance(13.9)
    assert not waiting.called
    clock.advance(0.1)
    assert result_of(waiting) == LoginRefused(
        "SYS/TEMP", "Too many logins in progress, try again later."
    )
    assert audit_lines(log_events) == ['login-refused "alice" reason=attempts-in-flight']
    assert throttle._waiting == {}
    assert failures(throttle, f"pair:{PEER.host}:alice", clock.seconds()) == 0
    for _, d in verifier.calls:
        d.callback(VerifyResult(ok=False))
    clock.advance(1)
    assert [result_of(d) for d in held] == [
        LoginRefused("AUTH", "Invalid username or password.")
    ] * 5
    assert len(verifier.calls) == 5


def test_a_locked_out_attempt_is_answered_within_the_patience(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    An attempt that waits 13 s for a place, then finds the pair blocked by
    the failure it waited for, is answered 15 s after it began, not 15 s
    after the block.
    """
    settings = ThrottleSettings(failure_delay=4, pair_limit=2)
    service, verifier = held_service(tmp_path, clock, settings)
    result_of(service.authority.login_failed(PEER.host, "alice"))
    first = attempt(service, "alice")
    waiting = attempt(service, "alice")
    assert len(verifier.calls) == 1
    clock.advance(13)
    verifier.calls[0][1].callback(VerifyResult(ok=False))
    clock.advance(0)
    assert result_of(first) == LoginRefused("AUTH", "Invalid username or password.")
    assert not waiting.called
    clock.advance(1.9)
    assert not waiting.called
    clock.advance(0.1)
    assert result_of(waiting) == LoginRefused("AUTH", "Invalid username or password.")
    assert len(verifier.calls) == 1


def test_a_count_that_takes_too_long_does_not_hold_the_answer(
    tmp_path: Path, clock: MemoryReactorClock, log_events: list[LogEvent]
) -> None:
    """
    The authority does not answer a failure's count: the client is told of
    the failure at 15 s all the same; the lockout the count brings later is
    still audited.
    """
    service, _, authority = stalling_service(tmp_path, clock, stall="login_failed")
    for _ in range(4):
        result_of(authority.throttle.failed(PEER.host, "alice", 0))
    answer = service.sasl_failed(plain_failure(b"\0alice\0"), peer=PEER)
    clock.advance(14.9)
    assert not answer.called
    clock.advance(0.1)
    assert result_of(answer) == LoginRefused("AUTH", "Authentication failed.")
    authority.answer_stalled()
    assert audit_lines(log_events)[-1] == 'lockout "alice" reason=address+user'


@pytest.mark.parametrize(
    "broken", ["begin_login", "end_login", "login_failed", "start_session", "login_succeeded"]
)
def test_an_authority_fault_is_a_server_fault(
    tmp_path: Path, clock: MemoryReactorClock, log_events: list[LogEvent], broken: str
) -> None:
    """
    An authority that fails makes the login a L{LoginFault} ([SYS/TEMP],
    audited as an error), never a wrong password: nothing is counted, and
    no place or session is kept.
    """
    service, verifier, authority = stalling_service(tmp_path, clock, broken=broken)
    if broken == "login_failed":
        answer = service.sasl_failed(plain_failure(b"\0alice\0"), peer=PEER)
    else:
        answer = attempt(service, "alice")
        if verifier.calls:
            right = broken in ("start_session", "login_succeeded")
            verifier.calls[0][1].callback(VerifyResult(ok=right))
    clock.advance(15)
    assert isinstance(result_of(answer), LoginFault)
    assert audit_lines(log_events)[-1] == 'login-refused "alice" reason=error'
    assert authority.connections.sessions == 0
    assert failures(authority.throttle, f"pair:{PEER.host}:alice", clock.seconds()) == 0
    # An end that never arrived leaves the place with the authority (a
    # parent gives it back when the child's channel goes, Holdings).
    ended = broken not in ("end_login", "login_succeeded")
    assert authority.throttle.in_flight(PEER.host) == (0 if ended else 1)


def test_a_wait_for_a_place_does_not_raise_the_answer_time_of_later_failures(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    The slowest recent check sets the answer time of every failure; an
    attempt that waited 10 s for a place and then failed at once took no
    time to check, so the next failure is answered after its own delay.
    """
    settings = ThrottleSettings(failure_delay=1, address_limit=100, pair_limit=2)
    service, verifier = held_service(tmp_path, clock, settings)
    result_of(service.authority.login_failed(PEER.host, "alice"))
    first = attempt(service, "alice")
    waited = attempt(service, "alice")
    clock.advance(10)
    verifier.calls[0][1].callback(VerifyResult(ok=True))
    assert isinstance(result_of(first), LoginSucceeded)
    clock.advance(0)
    verifier.calls[1][1].callback(VerifyResult(ok=False))
    clock.advance(0)
    assert isinstance(result_of(waited), LoginRefused)
    answers: list[Any] = []
    attempt(service, "nobody").addCallback(answers.append)
    verifier.calls[2][1].callback(VerifyResult(ok=False))
    clock.advance(3.9)
    assert answers == []
    clock.advance(0.1)
    assert [type(a) for a in answers] == [LoginRefused]


def test_the_wait_for_a_place_leaves_time_for_the_slowest_recent_check(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    A failed check took 5 s: an attempt that waits for a place stops
    waiting 10 s after it began, so that a check as slow still ends within
    the 15 s cap; it is answered [SYS/TEMP] then, uncounted.
    """
    service, verifier = held_service(tmp_path, clock)
    slow = attempt(service, "alice")
    clock.advance(5)
    verifier.calls[0][1].callback(VerifyResult(ok=False))
    clock.advance(60)
    assert isinstance(result_of(slow), LoginRefused)
    # One failure counted: four checks take the pair's places, the fifth waits.
    for _ in range(4):
        attempt(service, "alice")
    waiting = attempt(service, "alice")
    assert len(verifier.calls) == 5
    clock.advance(9.9)
    assert not waiting.called
    clock.advance(0.1)
    assert result_of(waiting) == LoginRefused(
        "SYS/TEMP", "Too many logins in progress, try again later."
    )
    assert throttle_of(service)._waiting == {}
    assert failures(throttle_of(service), f"pair:{PEER.host}:alice", clock.seconds()) == 1


@implementer(IAuthCounters)
class SlowAdds(MemoryCounters):
    """Memory counters whose failures, once C{slow}, are recorded only at L{answer}."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.held: list[tuple[defer.Deferred[list[int]], defer.Deferred[list[int]]]] = []

    def add(self, keys: Any, now: float, window: float) -> defer.Deferred[list[int]]:
        counted = super().add(keys, now, window)
        if not self.slow:
            return counted
        later: defer.Deferred[list[int]] = defer.Deferred()
        self.held.append((counted, later))
        return later

    def answer(self) -> None:
        held, self.held = self.held, []
        for counted, later in held:
            counted.chainDeferred(later)


def test_a_refusal_whose_count_is_late_is_answered_as_a_refusal(
    tmp_path: Path, clock: MemoryReactorClock, log_events: list[LogEvent]
) -> None:
    """
    A blocked pair's next attempt is refused without a check; its count
    (a failure) is still running at the cap: the client is told [AUTH] at
    15 s, as the refusal it is, not [SYS/TEMP]; the address block the
    count starts later is audited.
    """
    counters = SlowAdds()
    settings = ThrottleSettings(address_limit=3, pair_limit=2)
    service, verifier = held_service(tmp_path, clock, settings, counters)
    for _ in range(2):
        result_of(service.authority.login_failed(PEER.host, "alice"))
    counters.slow = True
    refused = attempt(service, "alice")
    clock.advance(14.9)
    assert not refused.called
    clock.advance(0.1)
    assert result_of(refused) == LoginRefused("AUTH", "Invalid username or password.")
    assert verifier.calls == []
    counters.answer()
    assert audit_lines(log_events) == [
        'login-refused "alice" reason=locked-out-address+user',
        'lockout "alice" reason=address',
    ]


def test_a_session_counted_while_the_end_failed_is_given_back(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    """
    The right password; the attempt's end fails at once while the session
    count is still on its way, and then counts it: the login is a server
    fault, and the session is given back.
    """
    service, verifier, authority = stalling_service(
        tmp_path, clock, stall="start_session", broken="end_login"
    )
    answer = attempt(service, "alice")
    verifier.calls[0][1].callback(VerifyResult(ok=True))
    authority.answer_stalled()
    assert isinstance(result_of(answer), LoginFault)
    assert authority.connections.sessions == 0


def test_a_success_is_one_question(tmp_path: Path, clock: MemoryReactorClock) -> None:
    """
    The right password: the attempt's end and the session's count are one
    question to the authority (a round trip when it is remote); the login
    is answered when it is answered.
    """
    service, verifier, authority = stalling_service(tmp_path, clock, stall="login_succeeded")
    answer = attempt(service, "alice")
    verifier.calls[0][1].callback(VerifyResult(ok=True))
    assert not answer.called and len(authority.stalled) == 1
    authority.answer_stalled()
    outcome = result_of(answer)
    assert isinstance(outcome, LoginSucceeded)
    assert authority.connections.sessions == 1 and authority.attempts_in_flight == 0
    outcome.release()
    assert authority.connections.sessions == 0


def test_an_unreachable_authority_is_one_error_line(
    tmp_path: Path, clock: MemoryReactorClock, log_events: list[LogEvent]
) -> None:
    """
    A login whose authority cannot be reached (the parent is gone) is
    logged as one error line with the reason, without a traceback.
    """
    error = AuthorityUnavailable(
        "the parent server process did not answer BeginLogin: Connection was closed cleanly."
    )
    service, _, _ = stalling_service(tmp_path, clock, broken="begin_login", error=error)
    assert isinstance(result_of(attempt(service, "alice")), LoginFault)
    assert [e for e in log_events if "log_failure" in e] == []
    (line,) = [formatEvent(e) for e in log_events if e.get("log_level") == LogLevel.error]
    assert line == (
        f"Login of alice from {PEER.label} failed: the parent server process did not "
        "answer BeginLogin: Connection was closed cleanly."
    )
