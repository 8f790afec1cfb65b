"""
Tests for L{pop3srv.server.protocol} over C{StringTransport} and a fake clock, with
mailboxes that answer plainly, with fired Deferreds, and with Deferreds that
fire later (the IMailbox contract allows all three).
"""

from __future__ import annotations

import base64
import errno
import gc
import hashlib
import io
import ipaddress
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MESSAGES, FakeMailbox, FakeRealm, RunNow, ScramClient, b64, run_now
from passlib import hash as passlib_hash  # type: ignore[import-untyped]
from passlib.hash import sha256_crypt  # type: ignore[import-untyped]
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.credentials import IAuthorizer
from pop3srv.auth.realm import MboxRealm
from pop3srv.auth.userfile import UserFile
from pop3srv.core.errors import CommitFailed, MaildropInUse
from pop3srv.server.protocol import POP3Server, POP3ServerFactory, ServerPolicy


class Session:
    """A server protocol wired to a StringTransport, a fake clock and a fake realm."""

    def __init__(self, mode: str = "plain") -> None:
        self.clock = MemoryReactorClock()
        self.mailbox = FakeMailbox(list(MESSAGES), mode, self.clock)
        self.realm = FakeRealm(self.mailbox)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        # A long login deadline: these tests advance the clock generously.
        self.factory = POP3ServerFactory(
            Portal(self.realm, [checker]),
            reactor=self.clock,
            policy=ServerPolicy(auth_timeout=100_000),
        )
        self.protocol: POP3Server = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Send C{data}, let timers run, and return what the server wrote."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        for _ in range(20):
            self.clock.advance(1)
        return self.transport.value()

    def login(self) -> bytes:
        return self.send(b"USER alice\r\nPASS secret\r\n")


MODES = ["plain", "fired", "later"]


def test_greeting_offers_apop_only_when_a_checker_can_verify_it() -> None:
    """The in-memory checker verifies APOP, so the greeting has a timestamp."""
    session = Session()
    assert session.transport.value().startswith(b"+OK POP3 server ready. <")


@pytest.mark.parametrize("mode", MODES)
def test_full_session(mode: str) -> None:
    """Login, STAT, LIST, UIDL, RETR, TOP, DELE, QUIT commit, for each mailbox mode."""
    session = Session(mode)
    assert session.login() == b"+OK Send PASS.\r\n+OK Maildrop has 2 messages (73 octets).\r\n"
    assert session.send(b"STAT\r\n") == b"+OK 2 73\r\n"
    assert session.send(b"LIST\r\n") == b"+OK 2 messages.\r\n1 26\r\n2 47\r\n.\r\n"
    assert session.send(b"UIDL\r\n") == b"+OK 2 messages.\r\n1 uid-0\r\n2 uid-1\r\n.\r\n"
    assert session.send(b"RETR 2\r\n") == (
        b"+OK 47 octets.\r\nSubject: two\r\n\r\n..dot line\r\nlast line no newline\r\n.\r\n"
    )
    assert session.send(b"TOP 1 0\r\n") == (
        b"+OK Top of message follows.\r\nSubject: one\r\n\r\n.\r\n"
    )
    assert session.send(b"DELE 1\r\n") == b"+OK Message 1 deleted.\r\n"
    assert session.send(b"QUIT\r\n") == b"+OK Bye, 1 messages deleted.\r\n"
    assert session.mailbox.synced == {0}
    assert session.transport.disconnecting
    session.protocol.connectionLost()
    assert session.realm.logouts == 1


@pytest.mark.parametrize("mode", MODES)
def test_mailbox_hears_of_deletions_only_at_quit(mode: str) -> None:
    """
    RFC 1939 deletes in the UPDATE state: DELE and RSET leave the mailbox
    alone, QUIT deletes exactly the messages still marked and then syncs,
    and a dropped connection never tells the mailbox anything.
    """
    session = Session(mode)
    session.login()
    assert session.send(b"DELE 1\r\nDELE 2\r\nRSET\r\nDELE 2\r\n") == (
        b"+OK Message 1 deleted.\r\n+OK Message 2 deleted.\r\n"
        b"+OK Maildrop has 2 messages.\r\n+OK Message 2 deleted.\r\n"
    )
    assert session.mailbox.deleted == set()
    assert session.send(b"QUIT\r\n") == b"+OK Bye, 1 messages deleted.\r\n"
    assert session.mailbox.deleted == session.mailbox.synced == {1}
    dropped = Session(mode)
    dropped.login()
    dropped.send(b"DELE 1\r\n")
    dropped.protocol.connectionLost()
    assert dropped.mailbox.deleted == set() and dropped.mailbox.synced is None


def test_failed_delete_at_commit_is_a_failed_commit(log_events: list[LogEvent]) -> None:
    """
    A mailbox that refuses a deletion at QUIT is not synced: the client gets
    -ERR [SYS/TEMP] and the connection closes.
    """
    session = Session()
    session.login()

    def refuse(index: int) -> None:
        raise OSError("disk on fire")

    session.mailbox.deleteMessage = refuse  # type: ignore[method-assign]
    session.send(b"DELE 1\r\n")
    assert session.send(b"QUIT\r\n") == b"-ERR [SYS/TEMP] Could not commit deletions.\r\n"
    assert session.mailbox.synced is None
    assert session.transport.disconnecting
    assert [e["log_failure"].type for e in log_events if "log_failure" in e] == [OSError]


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_burst_answered_in_order(mode: str) -> None:
    """Commands sent in one segment, or a byte at a time, get answers in order."""
    burst = b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nNOOP\r\nQUIT\r\n"
    whole = Session(mode)
    expected = whole.send(burst)
    assert expected.endswith(b"+OK\r\n+OK Bye, 0 messages deleted.\r\n")
    bytewise = Session(mode)
    out = b"".join(bytewise.send(burst[i : i + 1]) for i in range(len(burst)))
    assert out == expected


def test_wrong_password_and_unknown_user_look_the_same() -> None:
    """Both failures give the same [AUTH] line and the session goes on."""
    session = Session()
    wrong = session.send(b"USER alice\r\nPASS nope\r\n")
    unknown = session.send(b"USER mallory\r\nPASS nope\r\n")
    assert wrong == unknown == b"+OK Send PASS.\r\n-ERR [AUTH] Invalid username or password.\r\n"
    assert session.login().endswith(b"(73 octets).\r\n")


def test_apop_login() -> None:
    """APOP with the right digest of the greeting's timestamp logs in."""
    session = Session()
    greeting = session.transport.value()
    challenge = greeting[greeting.index(b"<") : greeting.index(b">") + 1]
    digest = hashlib.md5(challenge + b"secret").hexdigest().encode()
    assert session.send(b"APOP alice " + digest + b"\r\n").startswith(b"+OK Maildrop has 2")


def test_in_use_maildrop() -> None:
    """A realm failing with MaildropInUse gives -ERR [IN-USE]."""
    session = Session()
    session.realm.error = MaildropInUse("held by pid 1")
    assert session.login().endswith(b"-ERR [IN-USE] Mailbox is locked by another session.\r\n")


@pytest.mark.parametrize("mode", MODES)
def test_failed_commit_reports_sys_temp(mode: str) -> None:
    """A commit failure is -ERR [SYS/TEMP] and the connection closes."""
    session = Session(mode)
    session.login()
    session.mailbox.sync_error = CommitFailed("disk full")
    session.send(b"DELE 1\r\n")
    assert session.send(b"QUIT\r\n") == (
        b"-ERR [SYS/TEMP] Could not commit deletions; mailbox unchanged, try again later.\r\n"
    )
    assert session.transport.disconnecting


def test_dropped_connection_commits_nothing() -> None:
    """Losing the connection in TRANSACTION releases the mailbox without sync."""
    session = Session()
    session.login()
    session.send(b"DELE 1\r\n")
    session.protocol.connectionLost()
    assert session.mailbox.synced is None
    assert session.realm.logouts == 1


def test_a_closed_session_lets_go_of_its_mailbox() -> None:
    """
    Once the connection is lost, nothing the session keeps refers to the
    mailbox, so its index is freed at once, not whenever the cyclic
    collector gets to the session.
    """
    gc.disable()
    try:
        session = Session()
        session.login()
        session.send(b"UIDL\r\nLIST\r\n")
        mailbox = weakref.ref(session.mailbox)
        session.realm.mailbox = None  # type: ignore[assignment]
        del session.mailbox
        session.protocol.connectionLost()
        assert mailbox() is None
    finally:
        gc.enable()


def test_bad_input_gets_err_and_session_goes_on() -> None:
    """Garbage, NUL, bad UTF-8, over-long and out-of-range input all get -ERR."""
    session = Session()
    session.login()
    out = session.send(
        b"FOO\r\nRETR \x00\r\nUSER \xff\r\n" + b"N" * 1000 + b"\r\nRETR 9\r\nRETR x\r\nNOOP\r\n"
    )
    assert out.split(b"\r\n")[:-1] == [
        b"-ERR Unknown command.",
        b"-ERR NUL is not allowed in a command.",
        b"-ERR Command is not valid UTF-8.",
        b"-ERR Command line too long.",
        b"-ERR No such message.",
        b"-ERR Invalid message number.",
        b"+OK",
    ]


def test_idle_timeout() -> None:
    """After the idle timeout the server says so and closes."""
    session = Session()
    session.login()  # advances the clock 20 s after the last data
    session.clock.advance(570)
    assert not session.transport.disconnecting
    session.protocol.dataReceived(b"NOOP\r\n")
    session.clock.advance(599)
    assert not session.transport.disconnecting
    session.clock.advance(2)
    assert session.transport.disconnecting
    assert session.transport.value().endswith(b"-ERR Autologout; idle for too long.\r\n")


def test_flood_of_pipelined_input_pauses_reading() -> None:
    """While a command is pending, buffered input beyond a bound pauses the transport."""
    session = Session("later")
    session.protocol.dataReceived(b"USER alice\r\nPASS secret\r\n" + b"NOOP\r\n" * 20000)
    assert session.transport.producerState == "paused"
    for _ in range(5):
        session.clock.advance(1)
    assert session.transport.producerState == "producing"


def test_password_never_logged(log_events: list[LogEvent]) -> None:
    """No log event mentions the password, on success or failure."""
    session = Session()
    session.send(b"USER alice\r\nPASS wrong-pw-123\r\n")
    session.login()
    text = repr(log_events)
    assert "wrong-pw-123" not in text and "secret" not in text
    assert "login-ok" in text


def test_replies_wait_while_the_transport_is_full() -> None:
    """When the transport pauses its producer, no further commands are answered."""
    session = Session()
    session.login()
    session.transport.clear()
    session.protocol.pauseProducing()
    session.protocol.dataReceived(b"NOOP\r\n" * 5)
    assert session.transport.value() == b""
    session.protocol.resumeProducing()
    assert session.transport.value() == b"+OK\r\n" * 5


class BackpressureTransport(StringTransport):
    """A transport that is "full" after every write, as to a client that reads slowly."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_slow_download_is_not_idle() -> None:
    """A RETR to a slow reader keeps the session alive while it makes progress."""
    session = Session()
    session.mailbox.messages[0] = b"Subject: big\n\n" + (b"x" * 70 + b"\n") * 15_000
    session.login()
    transport = BackpressureTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    session.protocol.transport = transport
    transport.registerProducer(session.protocol, True)
    session.protocol.dataReceived(b"RETR 1\r\n")
    for _ in range(12):
        # Each minute the client reads one chunk.
        session.clock.advance(60)
        transport.producer.resumeProducing()
        session.clock.advance(0)
    assert b"Autologout" not in transport.value()
    assert not transport.disconnecting
    assert transport.producer is not None  # still streaming after 12 minutes


# --- SASL at the protocol level: the real checker and realm, no processes


class SaslSession:
    """
    A server with a L{PasslibChecker} and an L{MboxRealm} over temporary
    files, run synchronously, with the audit log collected.
    """

    def __init__(self, tmp: Path, rule: Callable[[str, str], bool] | None = None) -> None:
        cheap = sha256_crypt.using(rounds=1000)
        scram_hash = passlib_hash.scram.using(rounds=1000, algs="sha-1,sha-256")
        users = tmp / "users"
        users.write_text(
            f"alice:{scram_hash.hash('alice-pw')}\n"
            f"alice:{cheap.hash('phone-pw')}:app=phone\n"
            f"admin:{cheap.hash('admin-pw')}\n"
        )
        (tmp / "alice").write_bytes(b"From a@b Thu Jan  1 00:00:00 2026\nSubject: hi\n\nhello\n")
        authorizer = None
        if rule is not None:

            @implementer(IAuthorizer)
            class Rule:
                def authorize(self, authcid: str, authzid: str) -> bool:
                    return rule(authcid, authzid)

            authorizer = Rule()
        self.checker = PasslibChecker(
            UserFile(users),
            reactor=RunNow(),  # type: ignore[arg-type]
            threadpool=RunNow(),  # type: ignore[arg-type]
            authorizer=authorizer,
        )
        self.clock = MemoryReactorClock()
        realm = MboxRealm(f"{tmp}/{{user}}", defer_to_thread=run_now)
        self.factory = POP3ServerFactory(
            Portal(realm, [self.checker]),
            reactor=self.clock,
            policy=ServerPolicy(auth_timeout=100_000),
        )
        self.protocol: POP3Server = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.audit: list[str] = []
        observer = self.audit_observer
        globalLogPublisher.addObserver(observer)
        self.protocol.makeConnection(self.transport)
        self.close = lambda: globalLogPublisher.removeObserver(observer)

    def audit_observer(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "pop3srv.audit":
            self.audit.append(f"{event['audit_event']} {event['user']} {event['reason']}")

    def send(self, line: bytes | str) -> bytes:
        """Send one line, let timers run, and return what the server wrote."""
        if isinstance(line, str):
            line = line.encode("ascii")
        self.transport.clear()
        self.protocol.dataReceived(line + b"\r\n")
        self.clock.advance(30)
        return self.transport.value()


@pytest.fixture
def sasl_session(tmp_path: Path) -> Iterator[SaslSession]:
    session = SaslSession(tmp_path)
    yield session
    session.close()
    session.protocol.connectionLost()


def plain(authzid: str, authcid: str, password: str) -> str:
    return b64(f"{authzid}\0{authcid}\0{password}")


def test_sasl_offered_from_the_portal(sasl_session: SaslSession) -> None:
    """
    CAPA lists what C{portal.listCredentialsInterfaces()} and the SCRAM
    lookup allow: SCRAM-SHA-256 (no -PLUS without TLS), PLAIN and LOGIN.
    """
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN\r\n" in sasl_session.send("CAPA")


def test_sasl_plain_app_password(sasl_session: SaslSession) -> None:
    """
    AUTH PLAIN with an app password logs in; the label comes back on the
    realm's logout (the checker's avatar ID) into the audit line.
    """
    assert sasl_session.send("AUTH PLAIN " + plain("", "alice", "phone-pw")) == (
        b"+OK Maildrop has 1 messages (22 octets).\r\n"
    )
    assert sasl_session.audit == ['login-ok "alice" sasl-plain+app:phone']
    assert sasl_session.send("STAT") == b"+OK 1 22\r\n"


def test_sasl_plain_wrong_password(sasl_session: SaslSession) -> None:
    """A wrong PLAIN password is -ERR [AUTH] after the delay, and audited."""
    assert sasl_session.send("AUTH PLAIN " + plain("", "alice", "nope")) == (
        b"-ERR [AUTH] Invalid username or password.\r\n"
    )
    assert sasl_session.audit == ['login-failed "alice" bad-credentials']
    # The session goes on (NOOP would be refused: a TRANSACTION command).
    assert sasl_session.send("CAPA").startswith(b"+OK Capability list follows.\r\n")


def test_sasl_login(sasl_session: SaslSession) -> None:
    """AUTH LOGIN prompts for the name and password, then logs in."""
    assert sasl_session.send("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert sasl_session.send(base64.b64encode(b"alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert sasl_session.send(base64.b64encode(b"alice-pw")).startswith(b"+OK Maildrop has 1")
    assert sasl_session.audit == ['login-ok "alice" sasl-login']


def test_sasl_scram(sasl_session: SaslSession) -> None:
    """
    SCRAM-SHA-256: the keys are looked up before the proof, the server
    proves itself with C{v=}, and the client's empty answer logs it in.
    """
    client = ScramClient("alice", "alice-pw")
    first = sasl_session.send("AUTH SCRAM-SHA-256 " + client.first())
    assert first.startswith(b"+ ") and first.endswith(b"\r\n")
    final = sasl_session.send(client.final(base64.b64decode(first[2:-2])))
    assert final.startswith(b"+ ")
    assert client.check_server(base64.b64decode(final[2:-2]))
    assert sasl_session.send("").startswith(b"+OK Maildrop has 1 messages")
    assert sasl_session.audit == ['login-ok "alice" sasl-scram-sha-256']


def test_sasl_scram_wrong_password_and_cancel(sasl_session: SaslSession) -> None:
    """
    A wrong SCRAM password is -ERR [AUTH]; a client that cancels after the
    server's proof is not logged in and its maildrop is released.
    """
    client = ScramClient("alice", "wrong")
    first = sasl_session.send("AUTH SCRAM-SHA-256 " + client.first())
    assert sasl_session.send(client.final(base64.b64decode(first[2:-2]))) == (
        b"-ERR [AUTH] Invalid username or password.\r\n"
    )
    client = ScramClient("alice", "alice-pw")
    first = sasl_session.send("AUTH SCRAM-SHA-256 " + client.first())
    assert sasl_session.send(client.final(base64.b64decode(first[2:-2]))).startswith(b"+ ")
    assert sasl_session.send("*") == b"-ERR Authentication cancelled.\r\n"
    # Released: the same maildrop can be logged into again at once.
    assert sasl_session.send("AUTH PLAIN " + plain("", "alice", "alice-pw")).startswith(b"+OK")


def test_sasl_scram_lookup_fault(sasl_session: SaslSession) -> None:
    """A failing SCRAM lookup is a server fault: -ERR [SYS/TEMP], not [AUTH]."""

    def broken(username: str) -> defer.Deferred[None]:
        return defer.fail(RuntimeError("disk on fire"))

    sasl_session.checker.scram_credentials = broken  # type: ignore[method-assign]
    assert sasl_session.send("AUTH SCRAM-SHA-256 " + ScramClient("alice", "x").first()) == (
        b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n"
    )
    assert sasl_session.audit == []


def test_sasl_authzid(tmp_path: Path) -> None:
    """
    Without a rule an authzid is refused at once; with one, the checker
    resolves it as the avatar ID and the realm opens that maildrop.
    """
    session = SaslSession(tmp_path)
    try:
        assert session.send("AUTH PLAIN " + plain("alice", "admin", "admin-pw")) == (
            b"-ERR [AUTH] Authentication failed.\r\n"
        )
    finally:
        session.close()
    session = SaslSession(tmp_path, rule=lambda c, z: (c, z) == ("admin", "alice"))
    try:
        assert session.send("AUTH PLAIN " + plain("alice", "admin", "admin-pw")) == (
            b"+OK Maildrop has 1 messages (22 octets).\r\n"
        )
        assert session.audit == ['login-ok "alice" sasl-plain']
    finally:
        session.close()
        session.protocol.connectionLost()


def test_listing_failure_is_a_server_fault() -> None:
    """
    A maildrop that opens but cannot be listed is -ERR [SYS/TEMP], not a
    wrong password: the avatar is logged out again and the session is not
    counted, so the next attempt can succeed.
    """
    session = Session()
    mailbox = session.mailbox
    real = mailbox.listMessages

    def broken(index: int | None = None) -> Any:
        raise OSError("disk on fire")

    mailbox.listMessages = broken  # type: ignore[method-assign]
    assert session.login().endswith(b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n")
    assert session.realm.logouts == 1
    mailbox.listMessages = real  # type: ignore[method-assign]
    assert session.login().endswith(b"+OK Maildrop has 2 messages (73 octets).\r\n")


class FailingRead(io.BytesIO):
    """A message file whose reads fail once C{good} bytes have been read."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() >= self.good:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(size)


@pytest.mark.parametrize(
    ("size", "good"),
    [
        # Fails while the first chunks are read, before streaming starts.
        (100 * 1024, 64 * 1024),
        # Fails in the middle of streaming a big message.
        (1024 * 1024, 300 * 1024),
    ],
)
def test_read_failure_after_ok_closes_without_a_false_end(
    size: int, good: int, log_events: list[LogEvent]
) -> None:
    """
    A message that cannot be read after its +OK was sent: the connection
    closes with the response unfinished (no "." that would pass off a part
    as the whole, no -ERR inside the response), the commands after it are
    not run, and the fault is logged once, as an error (not critical).
    """
    session = Session()
    message = b"Subject: big\n\n" + b"x" * (size - 15) + b"\n"
    session.mailbox.getMessage = lambda index: FailingRead(message, good)  # type: ignore[method-assign]
    session.login()
    out = session.send(b"RETR 1\r\nSTAT\r\n")
    assert out.startswith(b"+OK")
    assert b"\r\n.\r\n" not in out and b"-ERR" not in out and b"+OK 2 73" not in out
    assert session.transport.disconnecting
    failures = [e for e in log_events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(OSError)
    assert failures[0]["log_level"] == LogLevel.error
    assert not [e for e in log_events if e.get("log_level") == LogLevel.critical]


def test_the_factory_knows_the_commits_in_progress() -> None:
    """
    A commit that has not finished is in the factory's C{commits} (what a
    stopping server waits for) until it ends.
    """
    session = Session("later")
    session.login()
    session.send(b"DELE 1\r\n")
    session.transport.clear()
    session.protocol.dataReceived(b"QUIT\r\n")
    assert len(session.factory.commits) == 1
    for _ in range(5):
        session.clock.advance(1)
    assert session.transport.value() == b"+OK Bye, 1 messages deleted.\r\n"
    assert session.factory.commits == set()


def test_ipv4_mapped_peer_is_audited_as_ipv4(log_events: list[LogEvent]) -> None:
    """
    A client reaching a dual-stack socket as ::ffff:192.0.2.44 is audited
    (and so counted and matched by fail2ban) as 192.0.2.44.
    """
    session = Session()
    factory = POP3ServerFactory(
        Portal(session.realm, [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")]),
        reactor=session.clock,
        plaintext_auth_networks=[ipaddress.ip_network("192.0.2.0/24")],
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv6Address("TCP", "::ffff:192.0.2.44", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"USER alice\r\nPASS wrong\r\n")
    session.clock.advance(60)
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert any("peer=192.0.2.44 " in line for line in lines), lines
    assert not any("::ffff:" in line for line in lines), lines
