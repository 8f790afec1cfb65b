"""
Abuse resistance at the protocol level (StringTransport and a fake clock):
failure delay, lockout and expiry, limits, IP rules, bad commands, login
timeout, and the audit log.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from helpers import MESSAGES, FakeMailbox, FakeRealm
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent

from pop3srv.server.authority import AuthorityUnavailable, LocalAuthority
from pop3srv.server.limits import (
    AccessRules,
    ConnectionLimits,
    LoginGate,
    ThrottleSettings,
)
from pop3srv.server.protocol import POP3ServerFactory, ServerPolicy

AUTH_ERR = b"-ERR [AUTH] Invalid username or password.\r\n"


class CountingChecker(InMemoryUsernamePasswordDatabaseDontUse):
    """An in-memory checker that counts how often it is asked."""

    calls = 0

    def requestAvatarId(self, credentials: Any) -> Any:
        self.calls += 1
        return super().requestAvatarId(credentials)


class Server:
    """
    A factory with a policy (its authority made of C{settings} and
    C{limits}), a fake clock, and connections from chosen addresses.
    """

    def __init__(
        self,
        settings: ThrottleSettings | None = None,
        limits: ConnectionLimits | None = None,
        **policy: Any,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.authority = LocalAuthority(
            settings or ThrottleSettings(), limits or ConnectionLimits(), clock=self.clock
        )
        policy.setdefault("authority", self.authority)
        self.checker = CountingChecker(alice=b"secret", bob=b"pw")
        realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", self.clock))
        # These tests move the clock by minutes; only the login-timeout test keeps 60 s.
        policy.setdefault("auth_timeout", 100_000)
        self.factory = POP3ServerFactory(
            Portal(realm, [self.checker]),
            reactor=self.clock,
            plaintext_auth_networks=[ipaddress.ip_network("0.0.0.0/0")],
            policy=ServerPolicy(**policy),
        )

    def connect(self, host: str = "127.0.0.1") -> Connection:
        return Connection(self, host)


class Connection:
    """One client connection over a StringTransport."""

    def __init__(self, server: Server, host: str) -> None:
        self.server = server
        self.protocol = server.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Send C{data} and return what is written at once (no clock movement)."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value()

    def wait(self, seconds: float) -> bytes:
        """Let C{seconds} pass and return what was written meanwhile."""
        self.transport.clear()
        self.server.clock.advance(seconds)
        return self.transport.value()


def test_failure_answered_after_delay_without_blocking_others() -> None:
    """A wrong password is answered after 2 s; another session is served meanwhile."""
    server = Server()
    guesser, honest = server.connect("192.0.2.1"), server.connect("127.0.0.1")
    assert guesser.send(b"USER alice\r\nPASS nope\r\n") == b"+OK Send PASS.\r\n"
    assert honest.send(b"CAPA\r\n").startswith(b"+OK Capability list follows.")
    assert guesser.wait(1.9) == b""
    assert guesser.wait(0.1) == AUTH_ERR


def test_lockout_refuses_without_checking_and_expires() -> None:
    """After 5 failures the pair is blocked: no password check until the lockout ends."""
    server = Server()
    client = server.connect("192.0.2.5")
    for _ in range(5):
        client.send(b"USER alice\r\nPASS nope\r\n")
        client.wait(60)
    assert server.checker.calls == 5
    client.send(b"USER alice\r\nPASS secret\r\n")
    assert client.wait(60) == AUTH_ERR
    assert server.checker.calls == 5
    other = server.connect("192.0.2.5")
    assert b"+OK Maildrop" in other.send(b"USER bob\r\nPASS pw\r\n")
    client.wait(600)
    assert b"+OK Maildrop" in client.send(b"USER alice\r\nPASS secret\r\n")
    assert server.checker.calls == 7


def test_hashing_queue_full_is_sys_temp() -> None:
    """With no room at the login gate, a login is refused at once with [SYS/TEMP]."""
    server = Server(login_gate=LoginGate(0))
    client = server.connect()
    assert client.send(b"USER alice\r\nPASS secret\r\n").endswith(
        b"-ERR [SYS/TEMP] Server busy, try again later.\r\n"
    )
    assert server.checker.calls == 0


def test_connection_limits() -> None:
    """Per-address and total limits refuse with [SYS/TEMP] and close; closing frees a place."""
    server = Server(limits=ConnectionLimits(max_connections=3, max_per_address=2))
    first, _ = server.connect("192.0.2.1"), server.connect("192.0.2.1")
    third = server.connect("192.0.2.1")
    assert third.transport.value() == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    assert third.transport.disconnecting
    third.protocol.connectionLost()
    server.connect("192.0.2.2")
    assert server.connect("192.0.2.3").transport.disconnecting
    first.protocol.connectionLost()
    assert not server.connect("192.0.2.3").transport.disconnecting


def test_sessions_per_user_limit() -> None:
    """A user past the session limit from one address gets [SYS/TEMP]."""
    server = Server(limits=ConnectionLimits(max_sessions_per_user=1))
    first = server.connect()
    first.send(b"USER alice\r\nPASS secret\r\n")
    second = server.connect()
    assert second.send(b"USER alice\r\nPASS secret\r\n").endswith(
        b"-ERR [SYS/TEMP] Too many sessions for this user.\r\n"
    )
    first.protocol.connectionLost()
    third = server.connect()
    assert b"+OK Maildrop" in third.send(b"USER alice\r\nPASS secret\r\n")


def test_bad_commands_close_the_connection() -> None:
    """The tenth consecutive bad command is the last."""
    server = Server()
    client = server.connect()
    out = client.send(b"BAD\r\n" * 9)
    assert out.count(b"-ERR Unknown command.") == 9 and not client.transport.disconnecting
    out = client.send(b"BAD\r\nNOOP\r\n")
    assert out.endswith(b"-ERR Unknown command.\r\n-ERR Too many bad commands; closing.\r\n")
    assert client.transport.disconnecting


def test_denied_address_gets_no_greeting() -> None:
    """A denied address is refused before the greeting; an allowed one is greeted."""
    rules = AccessRules(allow=(ipaddress.ip_network("127.0.0.0/8"),),
                        deny=(ipaddress.ip_network("127.0.0.2/32"),))  # fmt: skip
    server = Server(access=rules)
    denied = server.connect("127.0.0.2")
    assert denied.transport.value() == b"-ERR [SYS/PERM] Access denied.\r\n"
    assert denied.transport.disconnecting
    assert server.connect("127.0.0.1").transport.value().startswith(b"+OK POP3 server ready")


def test_login_timeout_for_unauthenticated_connections() -> None:
    """A client that has not logged in 60 s after connecting is disconnected."""
    server = Server(auth_timeout=60)
    client = server.connect()
    client.send(b"NOOP\r\n")
    assert client.wait(59) == b""
    assert client.wait(1) == b"-ERR Login timeout; closing.\r\n"
    logged_in = server.connect()
    logged_in.send(b"USER alice\r\nPASS secret\r\n")
    assert logged_in.wait(120) == b""


def test_audit_lines_and_no_password(log_events: list[LogEvent]) -> None:
    """Failures, lockouts, refusals and successes each log one stable audit line."""
    server = Server(settings=ThrottleSettings(pair_limit=2))
    client = server.connect("192.0.2.44")
    for _ in range(3):
        client.send('USER "evil\u00e9\r\nPASS hunter2-secret\r\n'.encode())
        client.wait(60)
    client.send(b"USER alice\r\nPASS secret\r\n")
    client.wait(60)
    server.connect("192.0.2.45").send(b"USER bob\r\nPASS pw\r\n")
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    shapes = [line.split(" session=")[0] + " " + line.split(" user=")[1] for line in lines]
    assert shapes == [
        'pop3srv-audit event=login-failed "\\"evil\\u00e9" reason=bad-credentials',
        'pop3srv-audit event=login-failed "\\"evil\\u00e9" reason=bad-credentials',
        'pop3srv-audit event=lockout "\\"evil\\u00e9" reason=address+user',
        'pop3srv-audit event=login-refused "\\"evil\\u00e9" reason=locked-out-address+user',
        'pop3srv-audit event=login-ok "alice" reason=password',
        'pop3srv-audit event=login-ok "bob" reason=password',
    ]
    assert all(" peer=192.0.2.4" in line for line in lines)
    assert "hunter2" not in repr(log_events) and "secret" not in repr(log_events)


# --- admission waits for the authority (issue 14, item 1)


class HeldAuthority(LocalAuthority):
    """
    A L{LocalAuthority} whose connection counts answer only when the test
    says (as one in another process may), or fail.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__(ThrottleSettings(), ConnectionLimits(max_per_address=1), clock=clock)
        self.held: list[tuple[str, defer.Deferred[str | None]]] = []

    def open_connection(self, host: str) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.Deferred()
        self.held.append((host, d))
        return d

    def answer(self, fault: bool = False, error: Exception | None = None) -> None:
        held, self.held = self.held, []
        for host, d in held:
            if fault:
                d.errback(error if error is not None else ConnectionError("the parent is gone"))
            else:
                super().open_connection(host).chainDeferred(d)


def held_server(**policy: Any) -> tuple[Server, HeldAuthority]:
    clock_server = Server(**policy)
    held = HeldAuthority(clock_server.clock)
    clock_server.factory.login.authority = held
    return clock_server, held


def test_the_greeting_waits_for_the_count_and_early_input_is_kept() -> None:
    """
    No greeting until the authority has counted the connection; commands
    sent meanwhile are answered after it, in order.
    """
    server, held = held_server()
    client = server.connect("192.0.2.70")
    assert client.transport.value() == b""
    assert client.send(b"USER alice\r\n") == b""
    assert client.send(b"PASS secret\r\nSTAT\r\n") == b""
    client.transport.clear()
    held.answer()
    out = client.transport.value()
    assert out.startswith(b"+OK POP3 server ready")
    assert out.split(b"\r\n")[1:] == [
        b"+OK Send PASS.",
        b"+OK Maildrop has 2 messages (73 octets).",
        b"+OK 2 73",
        b"",
    ]
    assert held.connections.total == 1


def test_early_input_past_the_bound_pauses_reading() -> None:
    """Input before the greeting is kept only up to a bound; past it the transport pauses."""
    server, held = held_server()
    client = server.connect("192.0.2.71")
    client.send(b"USER alice\r\n" * 6_000)
    assert client.transport.producerState == "paused"
    held.answer()
    assert client.transport.producerState == "producing"
    assert client.transport.value().count(b"+OK Send PASS.\r\n") == 6_000


def test_a_connection_lost_while_counted_gives_the_count_back() -> None:
    """Gone before the authority answered: the count it brings later is given back."""
    server, held = held_server()
    client = server.connect("192.0.2.72")
    client.protocol.connectionLost()
    held.answer()
    assert held.connections.total == 0
    again = server.connect("192.0.2.72")
    held.answer()
    assert again.transport.value().startswith(b"+OK POP3 server ready")


def test_an_authority_that_fails_is_a_temporary_refusal(log_events: list[LogEvent]) -> None:
    """A count that fails is a server fault: [SYS/TEMP], audited as an error, closed."""
    server, held = held_server()
    client = server.connect("192.0.2.73")
    held.answer(fault=True)
    assert client.transport.value() == b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n"
    assert client.transport.disconnecting
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert len(lines) == 1 and "event=connection-refused" in lines[0] and "reason=error" in lines[0]
    client.protocol.connectionLost()
    assert held.connections.total == 0


def test_an_unreachable_authority_is_one_error_line(log_events: list[LogEvent]) -> None:
    """
    With the parent gone, each new connection is refused with one error
    line that says why, not a traceback.
    """
    server, held = held_server()
    client = server.connect("192.0.2.76")
    error = AuthorityUnavailable(
        "the parent server process did not answer OpenConnection: Connection was closed cleanly."
    )
    held.answer(fault=True, error=error)
    assert client.transport.value() == b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n"
    assert [e for e in log_events if "log_failure" in e] == []
    (line,) = [formatEvent(e) for e in log_events if e.get("log_level") == LogLevel.error]
    assert line == (
        "Counting the connection of 192.0.2.76:40000 failed: the parent server process did "
        "not answer OpenConnection: Connection was closed cleanly."
    )


def test_an_authority_that_does_not_answer_ends_at_the_login_timeout() -> None:
    """
    The login timeout runs from the connect, so an unanswered count ends
    the connection; a count that comes after that goes back.
    """
    server, held = held_server(auth_timeout=60)
    client = server.connect("192.0.2.74")
    assert client.wait(59.9) == b""
    assert client.wait(0.1) == b"-ERR [SYS/TEMP] Server busy, try again later.\r\n"
    assert client.transport.disconnecting
    held.answer()
    assert client.transport.value() == b"-ERR [SYS/TEMP] Server busy, try again later.\r\n"
    assert held.connections.total == 0
    client.protocol.connectionLost()
    assert held.connections.total == 0


def test_a_refused_count_is_answered_even_late() -> None:
    """A limit the late answer breaks is refused as at once."""
    server, held = held_server()
    first, second = server.connect("192.0.2.75"), server.connect("192.0.2.75")
    held.answer()
    assert first.transport.value().startswith(b"+OK POP3 server ready")
    assert second.transport.value() == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    first.protocol.connectionLost()
    second.protocol.connectionLost()
    assert held.connections.total == 0
