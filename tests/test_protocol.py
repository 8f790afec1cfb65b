"""
Tests for L{pop3srv.server.protocol} over C{StringTransport} and a fake clock, with
mailboxes that answer plainly, with fired Deferreds, and with Deferreds that
fire later (the IMailbox contract allows all three).
"""

from __future__ import annotations

import gc
import hashlib
import io
import weakref
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from pop3srv.core.errors import CommitFailed, MaildropInUse
from pop3srv.server.protocol import POP3Server, POP3ServerFactory, ServerPolicy

MESSAGES = [b"Subject: one\n\nbody one\n", b"Subject: two\n\n.dot line\nlast line no newline"]


@implementer(IMailbox)
class FakeMailbox:
    """An IMailbox over a list of byte strings, answering in one of three modes."""

    def __init__(self, messages: list[bytes], mode: str, clock: MemoryReactorClock) -> None:
        self.messages = messages
        self.deleted: set[int] = set()
        self.synced: set[int] | None = None
        self.mode = mode
        self.clock = clock
        self.sync_error: Exception | None = None
        self.closed = False

    def _answer(self, value: Any) -> Any:
        if self.mode == "plain":
            return value
        if self.mode == "fired":
            return defer.succeed(value)
        d: defer.Deferred[Any] = defer.Deferred()
        self.clock.callLater(1, d.callback, value)
        return d

    def listMessages(self, index: int | None = None) -> Any:
        sizes = [len(m.replace(b"\n", b"\r\n")) for m in self.messages]
        return self._answer(sizes if index is None else sizes[index])

    def getMessage(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.messages[index])

    def getUidl(self, index: int) -> str:
        return f"uid-{index}"

    def deleteMessage(self, index: int) -> None:
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> Any:
        if self.sync_error is not None:
            error = self.sync_error
            if self.mode == "plain":
                raise error
            if self.mode == "fired":
                return defer.fail(error)
            d: defer.Deferred[None] = defer.Deferred()
            self.clock.callLater(1, d.errback, error)
            return d
        self.synced = set(self.deleted)
        return self._answer(None)


@implementer(IRealm)
class FakeRealm:
    """Hands out one FakeMailbox, or fails as told."""

    def __init__(self, mailbox: FakeMailbox) -> None:
        self.mailbox = mailbox
        self.error: Exception | None = None
        self.logouts = 0

    def requestAvatar(self, avatarId: bytes, mind: object, *interfaces: Any) -> Any:
        if self.error is not None:
            return defer.fail(self.error)

        def logout() -> None:
            self.logouts += 1

        return defer.succeed((IMailbox, self.mailbox, logout))


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


def test_password_never_logged() -> None:
    """No log event mentions the password, on success or failure."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = Session()
        session.send(b"USER alice\r\nPASS wrong-pw-123\r\n")
        session.login()
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = repr(events)
    assert "wrong-pw-123" not in text and "secret" not in text
    assert "login-ok" in text


def test_replies_wait_while_the_transport_is_full() -> None:
    """When the transport pauses its producer, no further commands are answered."""
    session = Session()
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
