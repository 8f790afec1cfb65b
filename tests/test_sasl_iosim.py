"""
SASL at the protocol level over C{twisted.test.iosim}: a real
L{POP3ServerFactory} with a real L{PasslibChecker} and an L{MboxRealm} on an
mbox in a temporary directory, talking to a small POP3 client of this
module (AUTH PLAIN, AUTH LOGIN and AUTH SCRAM-SHA-256, written from RFC 5034
with the SCRAM client of L{helpers}), the bytes moved by an L{IOPump}.

Synchronous (layer L1 of C{conftest}): the checker hashes through
L{helpers.RunNow} and the realm opens the mbox with L{helpers.run_now}, so
each exchange is over when the pump is flushed; time moves only when a test
advances the fake clock (the failure delay).
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import RunNow, ScramClient, b64, result_of, run_now
from passlib import hash as passlib_hash  # type: ignore[import-untyped]
from passlib.hash import sha256_crypt  # type: ignore[import-untyped]
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient

from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.realm import MboxRealm
from pop3srv.auth.userfile import UserFile
from pop3srv.processes.rpc import HashProcessDied
from pop3srv.server.limits import ThrottleSettings
from pop3srv.server.protocol import POP3Server, POP3ServerFactory, ServerPolicy

MBOX = b"From a@b Thu Jan  1 00:00:00 2026\nSubject: hi\n\nhello\n"
LOGGED_IN = b"+OK Maildrop has 1 messages (22 octets)."
WRONG = b"-ERR [AUTH] Invalid username or password."
CANCELLED = b"-ERR Authentication cancelled."


class SaslClient(LineOnlyReceiver):
    """
    A POP3 client that sends one line at a time and hands each answer to
    the Deferred of the line that asked for it.

    @ivar greeting: the server's first line, once it came.
    @ivar lost: whether the connection has closed.
    @ivar server_verified: whether the last SCRAM exchange's C{v=} proved
        that the server knows the keys.
    """

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.greeting: bytes | None = None
        self.lost = False
        self.server_verified = False
        self._waiting: deque[tuple[defer.Deferred[Any], bool]] = deque()
        self._collected: list[bytes] | None = None

    def lineReceived(self, line: bytes) -> None:
        if self.greeting is None:
            self.greeting = line
            return
        if self._collected is not None:
            if line != b".":
                self._collected.append(line[1:] if line.startswith(b".") else line)
                return
            collected, self._collected = self._collected, None
            self._waiting.popleft()[0].callback(collected)
            return
        d, multiline = self._waiting[0]
        if multiline and line.startswith(b"+OK"):
            self._collected = []
            return
        self._waiting.popleft()
        d.callback(line)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True

    def command(self, line: str, multiline: bool = False) -> defer.Deferred[Any]:
        """
        Send one line.

        @param multiline: whether a C{+OK} answer is followed by lines up
            to C{.}.
        @return: a Deferred firing with the answer line, or with the lines
            of a multi-line answer.
        """
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append((d, multiline))
        self.sendLine(line.encode("ascii"))
        return d

    def auth_plain(self, authcid: str, password: str, authzid: str = "") -> defer.Deferred[Any]:
        """
        AUTH PLAIN with an initial response.

        @return: a Deferred firing with the server's last line.
        """
        return self.command("AUTH PLAIN " + b64(f"{authzid}\0{authcid}\0{password}"))

    @defer.inlineCallbacks
    def auth_login(
        self, username: str, password: str, cancel: bool = False
    ) -> Generator[defer.Deferred[Any], Any, bytes]:
        """
        AUTH LOGIN: answer the server's prompts for the name and password,
        or cancel at the second.

        @return: a Deferred firing with the server's last line.
        """
        prompt = yield self.command("AUTH LOGIN")
        if prompt != b"+ " + base64.b64encode(b"Username:"):
            return bytes(prompt)
        prompt = yield self.command(b64(username))
        if prompt != b"+ " + base64.b64encode(b"Password:"):
            return bytes(prompt)
        return bytes((yield self.command("*" if cancel else b64(password))))

    @defer.inlineCallbacks
    def auth_scram(
        self, username: str, password: str, cancel: bool = False
    ) -> Generator[defer.Deferred[Any], Any, bytes]:
        """
        AUTH SCRAM-SHA-256 (RFC 7677): client-first, client-final, then an
        empty answer to the server's C{v=} if it proves itself; or cancel
        after the server's proof.

        @return: a Deferred firing with the server's last line.
        """
        self.server_verified = False
        client = ScramClient(username, password)
        server_first = yield self.command("AUTH SCRAM-SHA-256 " + client.first())
        if not server_first.startswith(b"+ "):
            return bytes(server_first)
        server_final = yield self.command(client.final(base64.b64decode(server_first[2:])))
        if not server_final.startswith(b"+ "):
            return bytes(server_final)
        if cancel:
            return bytes((yield self.command("*")))
        self.server_verified = client.check_server(base64.b64decode(server_final[2:]))
        return bytes((yield self.command("" if self.server_verified else "*")))


@dataclass
class Connection:
    """One client connected to the server, and what moves and watches it."""

    client: SaslClient
    server: POP3Server
    pump: IOPump
    clock: MemoryReactorClock
    checker: PasslibChecker
    events: list[LogEvent]

    def run(self, d: defer.Deferred[Any]) -> Any:
        """
        Pump until nothing moves.

        @return: what C{d} fired with; it must have fired.
        """
        self.pump.flush()
        return result_of(d)

    def audit(self) -> list[str]:
        """
        @return: the audit log so far, as C{event user reason}.
        """
        return [
            f"{e['audit_event']} {e['user']} {e['reason']}"
            for e in self.events
            if e.get("log_namespace") == "pop3srv.audit"
        ]


@pytest.fixture
def connection(tmp_path: Path, log_events: list[LogEvent]) -> Iterator[Connection]:
    """
    Alice's main password C{alice-pw} has only a scram hash (which PLAIN
    and LOGIN verify too); her app password C{phone-pw} a cheap SHA-crypt
    hash.  Her mbox holds one message.  The client connects from loopback,
    where the plaintext mechanisms are allowed without TLS.
    """
    scram_hash = passlib_hash.scram.using(rounds=1000, algs="sha-1,sha-256")
    users = tmp_path / "users"
    users.write_text(
        f"alice:{scram_hash.hash('alice-pw')}\n"
        f"alice:{sha256_crypt.using(rounds=1000).hash('phone-pw')}:app=phone\n"
    )
    (tmp_path / "alice").write_bytes(MBOX)
    run = RunNow()
    # No upgrade of the weak app-password hash: an argon2 hash would only
    # slow the test down.
    checker = PasslibChecker(
        UserFile(users, upgrade=False),
        reactor=run,  # type: ignore[arg-type]
        threadpool=run,  # type: ignore[arg-type]
    )
    clock = MemoryReactorClock()
    factory = POP3ServerFactory(
        Portal(MboxRealm(f"{tmp_path}/{{user}}", defer_to_thread=run_now), [checker]),
        reactor=clock,
        policy=ServerPolicy(auth_timeout=100_000),
    )
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    client, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(peer),
        SaslClient,
        serverTransportFactory=lambda p: FakeTransport(p, isServer=True, peerAddress=peer),
        clock=clock,
    )
    assert client.greeting is not None and client.greeting.startswith(b"+OK")
    yield Connection(client, server, pump, clock, checker, log_events)
    if not client.lost:
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
    assert client.lost


def stat_and_quit(conn: Connection) -> None:
    """
    The session is logged in to alice's maildrop: STAT, then QUIT, which
    closes the connection.
    """
    assert conn.run(conn.client.command("STAT")) == b"+OK 1 22"
    assert conn.run(conn.client.command("QUIT")).startswith(b"+OK")
    assert conn.client.lost


def test_capa_offers_the_portal_mechanisms(connection: Connection) -> None:
    """Without TLS, from loopback: SCRAM-SHA-256 (no -PLUS), PLAIN and LOGIN."""
    capabilities = connection.run(connection.client.command("CAPA", multiline=True))
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities


def test_auth_plain(connection: Connection) -> None:
    """AUTH PLAIN with the main password logs in."""
    assert connection.run(connection.client.auth_plain("alice", "alice-pw")) == LOGGED_IN
    assert connection.audit() == ['login-ok "alice" sasl-plain']
    stat_and_quit(connection)


def test_auth_plain_app_password(connection: Connection) -> None:
    """AUTH PLAIN with an app password logs in; the label is audited."""
    assert connection.run(connection.client.auth_plain("alice", "phone-pw")) == LOGGED_IN
    assert connection.audit() == ['login-ok "alice" sasl-plain+app:phone']
    stat_and_quit(connection)


def test_auth_login(connection: Connection) -> None:
    """AUTH LOGIN answers both prompts and logs in."""
    assert connection.run(connection.client.auth_login("alice", "alice-pw")) == LOGGED_IN
    assert connection.audit() == ['login-ok "alice" sasl-login']
    stat_and_quit(connection)


def test_auth_scram(connection: Connection) -> None:
    """
    SCRAM-SHA-256: the server proves it knows the keys (C{v=}), and the
    client's empty answer logs it in.
    """
    assert connection.run(connection.client.auth_scram("alice", "alice-pw")) == LOGGED_IN
    assert connection.client.server_verified
    assert connection.audit() == ['login-ok "alice" sasl-scram-sha-256']
    stat_and_quit(connection)


@pytest.mark.parametrize(
    "mechanism", ["auth_plain", "auth_login", "auth_scram"], ids=["plain", "login", "scram"]
)
def test_wrong_password_answered_after_the_delay(connection: Connection, mechanism: str) -> None:
    """
    A wrong password is answered C{-ERR [AUTH]} only once the failure delay
    has passed on the clock; the session stays in AUTHORIZATION and can
    then log in.
    """
    client = connection.client
    delay = ThrottleSettings().failure_delay
    d = getattr(client, mechanism)("alice", "wrong")
    connection.pump.flush()
    assert not d.called
    connection.clock.advance(delay - 0.1)
    connection.pump.flush()
    assert not d.called
    connection.clock.advance(0.1)
    assert connection.run(d) == WRONG
    assert connection.audit() == ['login-failed "alice" bad-credentials']
    assert connection.run(client.command("STAT")).startswith(b"-ERR")
    assert connection.run(client.auth_plain("alice", "alice-pw")) == LOGGED_IN
    stat_and_quit(connection)


def test_cancel_login(connection: Connection) -> None:
    """
    A client that answers a prompt with C{*} cancels the exchange and is not
    logged in: at LOGIN's password prompt before any check; after SCRAM's
    server proof, when the maildrop was open already, it is released, so
    the next login opens it again.
    """
    client = connection.client
    assert connection.run(client.auth_login("alice", "alice-pw", cancel=True)) == CANCELLED
    assert connection.audit() == []
    assert connection.run(client.command("STAT")).startswith(b"-ERR")
    assert connection.run(client.auth_scram("alice", "alice-pw", cancel=True)) == CANCELLED
    assert connection.run(client.command("STAT")).startswith(b"-ERR")
    assert connection.run(client.auth_scram("alice", "alice-pw")) == LOGGED_IN
    stat_and_quit(connection)


def test_dead_hashing_process_is_a_server_fault(connection: Connection) -> None:
    """
    A check that cannot be made (the hashing process died) is answered
    C{-ERR [SYS/TEMP]} at once, audited as C{error}, not as a wrong password.
    """
    connection.checker.verifier = lambda username, password: defer.fail(HashProcessDied("gone"))
    assert connection.run(connection.client.auth_plain("alice", "alice-pw")) == (
        b"-ERR [SYS/TEMP] Temporary failure, try again later."
    )
    assert connection.audit() == ['login-refused "alice" error']
    connection.checker.verifier = None
    assert connection.run(connection.client.auth_plain("alice", "alice-pw")) == LOGGED_IN
