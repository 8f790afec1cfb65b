"""
Tests for L{pop3srv.server.sessions} and the protocol's use of it: the
session table (what C{pop3srv who} shows) and the summary line each session
logs when it ends.  In memory first (C{StringTransport}, a fake clock, the
fake and the real mailbox, an in-memory TLS handshake), then against a real
C{twistd pop3srv} over real sockets, with STLS and implicit TLS from
Python's ssl.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from certs import Authority
from helpers import MESSAGES, FakeMailbox, FakeRealm, Recorder, ScramClient, b64
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server, free_port
from test_protocol import SaslSession
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet import ssl as twisted_ssl
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.test import iosim
from zope.interface import implementer

from pop3srv.core.errors import CommitFailed
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import AccessRules, ConnectionLimits, ThrottleSettings
from pop3srv.server.protocol import POP3Server, POP3ServerFactory, ServerPolicy, reactor_threads
from pop3srv.server.sessions import (
    FORMAT,
    SessionFigures,
    SessionInfo,
    SessionTable,
    UidlHash,
    log_summary,
    tls_description,
)
from pop3srv.server.tls import TLSContextSource

THREE = [*MESSAGES, b"Subject: three\n\nthird\n"]
SIZES = [len(m.replace(b"\n", b"\r\n")) for m in THREE]
FIELDS = [
    "session", "user", "client", "listener", "tls", "cipher", "method", "duration",
    "messages", "octets", "retr", "retr_octets", "top", "dele", "after_messages",
    "after_octets", "end", "uidl_hash",
]  # fmt: skip
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(line: str) -> dict[str, str]:
    """The C{key=value} fields of a summary line, in order, as text."""
    assert line.startswith("pop3srv-session ")
    pairs = _PAIR.findall(line[len("pop3srv-session ") :])
    assert " ".join(f"{k}={v}" for k, v in pairs) == line[len("pop3srv-session ") :]
    return dict(pairs)


def uidl_hash(uidls: list[str]) -> str:
    """The UIDL hash, computed here from its definition."""
    return hashlib.sha256("".join(u + "\n" for u in uidls).encode()).hexdigest()[:12]


def summaries(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("session_summary")]


class Server:
    """A factory on a fake clock, over a L{FakeMailbox} with three messages."""

    def __init__(self, mode: str = "plain", **policy: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.mailbox = FakeMailbox(list(THREE), mode, self.clock)
        self.realm = FakeRealm(self.mailbox)
        self.authority = LocalAuthority(
            ThrottleSettings(),
            policy.pop("limits", ConnectionLimits()),
            clock=self.clock,
        )
        policy.setdefault("authority", self.authority)
        policy.setdefault("auth_timeout", 100_000)
        tls = policy.pop("tls", None)
        self.factory = POP3ServerFactory(
            Portal(self.realm, [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")]),
            reactor=self.clock,
            policy=ServerPolicy(**policy),
            tls=tls,
        )

    def connect(self, host: str = "127.0.0.1", port: int = 40000) -> Client:
        return Client(self, IPv4Address("TCP", host, port))


class Client:
    """One connection over a C{StringTransport}."""

    def __init__(self, server: Server, peer: Any) -> None:
        self.server = server
        self.protocol: POP3Server = server.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes, ticks: int = 5) -> bytes:
        """Send C{data}, let the fake clock run a few seconds, return the reply."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        for _ in range(ticks):
            self.server.clock.advance(1)
        return self.transport.value()

    def login(self) -> bytes:
        return self.send(b"USER alice\r\nPASS secret\r\n")

    def lost(self) -> None:
        """The transport reports the connection gone (a StringTransport never does)."""
        self.protocol.connectionLost()


@pytest.mark.parametrize("mode", ["plain", "fired", "later"])
def test_download_delete_quit_summary(log_events: list[LogEvent], mode: str) -> None:
    """
    Log in, RETR two messages, DELE one, QUIT: exactly one summary line,
    when the connection ends, with those counts, the figures at login and
    after the commit, and the UIDL hash; the table is empty afterwards.
    """
    server = Server(mode)
    start = server.clock.seconds()
    client = server.connect()
    assert client.login().endswith(b"+OK Maildrop has 3 messages (%d octets).\r\n" % sum(SIZES))
    first = client.send(b"RETR 1\r\n")
    second = client.send(b"RETR 2\r\n")
    sent = sum(len(reply) - len(reply.split(b"\r\n", 1)[0]) - 2 for reply in (first, second))
    assert client.send(b"DELE 1\r\n") == b"+OK Message 1 deleted.\r\n"
    assert client.send(b"QUIT\r\n") == b"+OK Bye, 1 messages deleted.\r\n"
    assert summaries(log_events) == []
    client.lost()
    [event] = summaries(log_events)
    assert event["log_namespace"] == "pop3srv.session"
    assert event["log_format"] == FORMAT
    fields = parse(formatEvent(event))
    assert list(fields) == FIELDS
    assert fields == {
        "session": client.protocol._session_id,
        "user": '"alice"',
        "client": "127.0.0.1:40000",
        "listener": "pop3",
        "tls": "none",
        "cipher": "none",
        "method": "password",
        "duration": f"{server.clock.seconds() - start:.3f}",
        "messages": "3",
        "octets": str(sum(SIZES)),
        "retr": "2",
        "retr_octets": str(sent),
        "top": "0",
        "dele": "1",
        "after_messages": "2",
        "after_octets": str(sum(SIZES) - SIZES[0]),
        "end": "quit",
        "uidl_hash": uidl_hash(["uid-0", "uid-1", "uid-2"]),
    }
    # The event keys, for the metrics: numbers as numbers.
    assert event["retr"] == 2 and event["retr_octets"] == sent and event["dele"] == 1
    assert event["after_messages"] == 2 and event["end"] == "quit"
    assert len(server.factory.sessions) == 0


def test_top_and_a_quit_without_deletions(log_events: list[LogEvent]) -> None:
    """TOP counts apart from RETR; a QUIT that deletes nothing still commits."""
    server = Server()
    client = server.connect()
    client.login()
    assert client.send(b"TOP 1 0\r\nTOP 3 5\r\n").startswith(b"+OK Top")
    client.send(b"QUIT\r\n")
    client.lost()
    [event] = summaries(log_events)
    assert (event["retr"], event["retr_octets"], event["top"], event["dele"]) == (0, 0, 2, 0)
    assert (event["after_messages"], event["after_octets"]) == (3, sum(SIZES))


def test_dropped_connection(log_events: list[LogEvent]) -> None:
    """
    A logged-in client that goes away: C{end=dropped}, nothing committed,
    no after-commit figures, but the login and the downloads are there.
    """
    server = Server()
    client = server.connect()
    client.login()
    client.send(b"RETR 3\r\nDELE 2\r\n")
    client.lost()
    [event] = summaries(log_events)
    fields = parse(formatEvent(event))
    assert fields["end"] == "dropped"
    assert fields["user"] == '"alice"' and fields["retr"] == "1"
    # The DELE was accepted, and then never committed.
    assert fields["dele"] == "1"
    assert fields["after_messages"] == fields["after_octets"] == "-"
    assert fields["uidl_hash"] == uidl_hash(["uid-0", "uid-1", "uid-2"])
    assert server.mailbox.deleted == set()
    assert len(server.factory.sessions) == 0


def test_dropped_before_login(log_events: list[LogEvent]) -> None:
    """Never logged in: no user, method, figures or hash."""
    server = Server()
    client = server.connect()
    client.send(b"USER alice\r\n")
    client.lost()
    [event] = summaries(log_events)
    fields = parse(formatEvent(event))
    assert fields["end"] == "dropped"
    for name in ("user", "method", "messages", "octets", "dele", "uidl_hash"):
        assert fields[name] == "-", name
    assert (fields["retr"], fields["top"]) == ("0", "0")
    assert event["user"] == "-" and event["messages"] == "-"


def test_quit_before_login_and_failed_commit(log_events: list[LogEvent]) -> None:
    """QUIT in AUTHORIZATION is C{quit}; a commit that fails is C{quit-commit-failed}."""
    server = Server()
    early = server.connect()
    assert early.send(b"QUIT\r\n") == b"+OK Bye.\r\n"
    early.lost()
    server.mailbox.sync_error = CommitFailed("disk full")
    failing = server.connect()
    failing.login()
    failing.send(b"DELE 2\r\n")
    assert failing.send(b"QUIT\r\n").startswith(b"-ERR [SYS/TEMP]")
    failing.lost()
    first, second = (parse(formatEvent(e)) for e in summaries(log_events))
    assert (first["end"], first["user"]) == ("quit", "-")
    assert (second["end"], second["dele"], second["after_messages"]) == (
        "quit-commit-failed",
        "1",
        "-",
    )


def test_a_commit_outlives_the_connection(log_events: list[LogEvent]) -> None:
    """
    A client that says QUIT and goes before the commit is done: the session
    stays in the table (in the C{update} state) until the commit ends, and
    then is summarised as the C{quit} it was, with the figures after it.
    """
    server = Server("later")
    client = server.connect()
    client.login()
    client.send(b"DELE 3\r\n")
    client.protocol.dataReceived(b"QUIT\r\n")
    [info] = server.factory.sessions.list()
    assert info.state == "update"
    client.lost()
    assert summaries(log_events) == []
    assert len(server.factory.sessions) == 1
    for _ in range(10):
        server.clock.advance(1)
    [event] = summaries(log_events)
    assert (event["end"], event["dele"], event["after_messages"]) == ("quit", 1, 2)
    assert server.mailbox.synced == {2}
    assert len(server.factory.sessions) == 0


def test_timeouts_and_limits_say_how_the_session_ended(log_events: list[LogEvent]) -> None:
    """Each way the server ends a session has its own C{end}."""
    server = Server(auth_timeout=60, max_bad_commands=3, tls=object())
    idle = server.connect()
    idle.login()
    slow = server.connect()
    bad = server.connect()
    bad.send(b"NOPE\r\nNOPE\r\nNOPE\r\n")
    handshake = server.connect()
    handshake.transport.startTLS = lambda context: None  # type: ignore[attr-defined]
    assert handshake.send(b"STLS\r\n") == b"+OK Begin TLS negotiation.\r\n"
    server.clock.advance(server.factory.idle_timeout + 1)
    for client in (idle, slow, bad, handshake):
        assert client.transport.disconnecting
        client.lost()
    ends = [(e["session"], e["end"]) for e in summaries(log_events)]
    assert sorted(ends) == sorted(
        [
            (bad.protocol._session_id, "bad-commands"),
            (handshake.protocol._session_id, "tls-handshake-timeout"),
            (slow.protocol._session_id, "auth-timeout"),
            (idle.protocol._session_id, "idle-timeout"),
        ]
    )
    assert len(server.factory.sessions) == 0


def test_shutdown(log_events: list[LogEvent]) -> None:
    """
    Sessions open when the server stops listening and then cut (the reactor
    closes them at shutdown) end as C{shutdown}; one that QUITs meanwhile
    is still a C{quit}; a factory that listens again is not shutting down.
    """
    server = Server()
    server.factory.doStart()
    idle, quitting = server.connect(), server.connect()
    idle.login()
    server.factory.doStop()
    assert server.factory.shutting_down
    quitting.send(b"QUIT\r\n")
    quitting.lost()
    idle.lost()
    assert [e["end"] for e in summaries(log_events)] == ["quit", "shutdown"]
    server.factory.doStart()
    assert not server.factory.shutting_down
    again = server.connect()
    again.lost()
    assert summaries(log_events)[-1]["end"] == "dropped"


def test_the_table_follows_the_session() -> None:
    """
    Admitted, a connection is in the table in the C{authorization} state;
    the login sets the user and C{transaction}, QUIT C{update}; the end
    removes it.
    """
    server = Server("later")
    start = server.clock.seconds()
    client = server.connect()
    [info] = server.factory.sessions.list()
    assert info == SessionInfo(
        id=client.protocol._session_id,
        user=None,
        client="127.0.0.1:40000",
        listener="pop3",
        tls=None,
        since=start,
        state="authorization",
        pid=info.pid,
    )
    assert json.loads(json.dumps(info.as_dict())) == info.as_dict()
    client.login()
    [info] = server.factory.sessions.list()
    assert (info.user, info.state) == ("alice", "transaction")
    client.protocol.dataReceived(b"QUIT\r\n")
    assert server.factory.sessions.list()[0].state == "update"
    server.clock.advance(10)
    assert len(server.factory.sessions) == 1
    client.lost()
    assert len(server.factory.sessions) == 0


def test_client_labels() -> None:
    """IPv6 clients are bracketed, UNIX socket clients are C{local}."""
    server = Server()
    Client(server, IPv6Address("TCP", "2001:db8::7", 995))
    Client(server, UNIXAddress(None))
    Client(server, IPv6Address("TCP", "::ffff:192.0.2.9", 1234))
    assert sorted(i.client for i in server.factory.sessions.list()) == sorted(
        ["[2001:db8::7]:995", "local", "192.0.2.9:1234"]
    )


class HeldAuthority(LocalAuthority):
    """A L{LocalAuthority} whose connection counts answer only when the test says."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__(ThrottleSettings(), ConnectionLimits(), clock=clock)
        self.held: list[tuple[str, defer.Deferred[str | None]]] = []

    def open_connection(self, host: str) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.Deferred()
        self.held.append((host, d))
        return d

    def answer(self) -> None:
        held, self.held = self.held, []
        for host, d in held:
            super().open_connection(host).chainDeferred(d)


def test_refused_and_abandoned_connections_are_not_sessions(
    log_events: list[LogEvent],
) -> None:
    """
    Connections refused before the greeting (IP rules, a connection limit),
    one that goes while the authority counts it, and one whose count comes
    too late, never enter the table and log no summary: they are audited.
    The one admitted session does both, and the table ends empty.
    """
    server = Server(
        access=AccessRules(deny=(ipaddress.ip_network("192.0.2.0/24"),)),
        limits=ConnectionLimits(max_per_address=1),
        auth_timeout=60,
    )
    denied = server.connect("192.0.2.1")
    admitted = server.connect("198.51.100.1")
    over = server.connect("198.51.100.1")
    assert denied.transport.value().startswith(b"-ERR [SYS/PERM]")
    assert over.transport.value().startswith(b"-ERR [SYS/TEMP] Too many connections")
    assert [i.id for i in server.factory.sessions.list()] == [admitted.protocol._session_id]
    for client in (denied, over, admitted):
        client.lost()
    held = HeldAuthority(server.clock)
    server.factory.login.authority = held
    gone = server.connect("203.0.113.1")
    gone.lost()
    late = server.connect("203.0.113.2")
    server.clock.advance(61)
    assert late.transport.value().startswith(b"-ERR [SYS/TEMP] Server busy")
    held.answer()
    late.lost()
    assert len(server.factory.sessions) == 0
    assert [e["session"] for e in summaries(log_events)] == [admitted.protocol._session_id]
    audited = {e["session"] for e in log_events if e.get("log_namespace") == "pop3srv.audit"}
    assert {denied.protocol._session_id, over.protocol._session_id} <= audited


# --- login methods, SASL, the real mailbox


def test_apop_and_sasl_plain_methods(log_events: list[LogEvent]) -> None:
    """The login method is the one that logged in."""
    server = Server()
    apop = server.connect()
    challenge = apop.transport.value().split(b" ")[-1].strip()
    digest = hashlib.md5(challenge + b"secret").hexdigest()
    assert apop.send(f"APOP alice {digest}\r\n".encode()).startswith(b"+OK Maildrop")
    apop.send(b"QUIT\r\n")
    apop.lost()
    plain = server.connect()
    reply = plain.send(b"AUTH PLAIN " + b64("\0alice\0secret").encode() + b"\r\n")
    assert reply.startswith(b"+OK Maildrop")
    plain.lost()
    assert [(e["method"], e["user"]) for e in summaries(log_events)] == [
        ("apop", '"alice"'),
        ("sasl-plain", '"alice"'),
    ]


def test_scram_logs_in_only_when_the_exchange_ends(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    """
    SCRAM: the login service has answered before the client takes the
    server's proof.  A client that cancels then is not logged in; one that
    answers is, with C{sasl-scram-sha-256}, and the UIDL hash of the real
    mailbox is the hash of what C{UIDL} lists.
    """
    session = SaslSession(tmp_path)
    try:
        for answer in ("*", ""):
            client = ScramClient("alice", "alice-pw")
            first = session.send("AUTH SCRAM-SHA-256 " + client.first())
            final = session.send(client.final(base64.b64decode(first[2:-2])))
            assert final.startswith(b"+ ")
            [info] = session.factory.sessions.list()
            assert (info.user, info.state) == (None, "authorization")
            session.send(answer)
        [info] = session.factory.sessions.list()
        assert (info.user, info.state) == ("alice", "transaction")
        listing = session.send("UIDL").split(b"\r\n")[1:-2]
        session.send("QUIT")
    finally:
        session.close()
        session.protocol.connectionLost()
    [event] = summaries(log_events)
    assert (event["method"], event["user"], event["end"]) == (
        "sasl-scram-sha-256",
        '"alice"',
        "quit",
    )
    uidls = [line.split(b" ")[1].decode() for line in listing]
    assert event["uidl_hash"] == uidl_hash(uidls)
    assert len(session.factory.sessions) == 0


class UidlMailbox(FakeMailbox):
    """A L{FakeMailbox} with chosen UIDLs that, like the mbox one, refuses deleted messages."""

    def __init__(self, uidls: list[str], clock: MemoryReactorClock) -> None:
        super().__init__(list(THREE), "plain", clock)
        self.uidls = uidls
        self.lookups = 0

    def getUidl(self, index: int) -> str:
        if index in self.deleted:
            raise ValueError(f"message {index} is deleted")
        self.lookups += 1
        return self.uidls[index]


def test_uidl_hash_across_sessions(log_events: list[LogEvent]) -> None:
    """
    The same mailbox gives the same hash whether or not the client listed
    UIDLs, and is taken before a commit deletes anything; other UIDLs give
    another hash.  Each UIDL is looked up once for the hash and the listing
    together.
    """
    server = Server()
    mailbox = UidlMailbox(["a", "b", "c"], server.clock)
    server.realm.mailbox = mailbox
    quiet = server.connect()
    quiet.login()
    quiet.send(b"DELE 1\r\nQUIT\r\n")
    assert mailbox.synced == {0}
    quiet.lost()
    assert mailbox.lookups == 3
    mailbox.lookups = 0
    mailbox.deleted = set()
    listing = server.connect()
    listing.login()
    listing.send(b"UIDL\r\nUIDL 2\r\nQUIT\r\n")
    listing.lost()
    assert mailbox.lookups == 4  # the listing's three and UIDL 2
    mailbox.uidls = ["a", "b", "c.1"]
    mailbox.deleted = set()
    changed = server.connect()
    changed.login()
    changed.lost()
    hashes = [e["uidl_hash"] for e in summaries(log_events)]
    assert hashes == [uidl_hash(["a", "b", "c"])] * 2 + [uidl_hash(["a", "b", "c.1"])]


@given(
    uidls=st.lists(st.text("0123456789abcdef.", min_size=1, max_size=8), max_size=12),
    asked=st.lists(st.integers(0, 11), max_size=20),
)
def test_uidl_hash_is_independent_of_the_lookups(uidls: list[str], asked: list[int]) -> None:
    """
    Whatever UIDLs the session asks for, in whatever order, the hash is the
    hash of the whole list, each UIDL is answered right, and no message is
    looked up more often than asked plus once.
    """
    calls: list[int] = []

    def lookup(index: int) -> bytes:
        calls.append(index)
        return uidls[index].encode()

    hasher = UidlHash(lookup, len(uidls))
    for index in asked:
        if index < len(uidls):
            assert hasher.uidl(index) == uidls[index].encode()
    assert hasher.hexdigest() == uidl_hash(uidls)
    assert hasher.hexdigest() == uidl_hash(uidls)
    for index in range(len(uidls)):
        assert calls.count(index) <= asked.count(index) + 1


def test_uidl_hash_of_an_unreadable_mailbox() -> None:
    """A UIDL that cannot be read makes the hash C{?}, and not the session's error."""

    def lookup(index: int) -> str:
        if index == 1:
            raise OSError("gone")
        return f"u{index}"

    hasher = UidlHash(lookup, 3)
    assert hasher.uidl(2) == "u2"
    assert hasher.hexdigest() == "?"
    assert hasher.uidl(0) == "u0"


def _call(f: Callable[[], Any], results: list[Any]) -> None:
    results.append(f())


class HeldThreads:
    """
    A C{defer_to_thread} that runs each function in a real thread of its
    own, but only when the test says, and notes which threads looked UIDLs
    up.
    """

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = []

    def __call__(self, f: Callable[[], Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((f, d))
        return d

    def run(self) -> None:
        held, self.held = self.held, []
        for f, d in held:
            results: list[Any] = []
            thread = threading.Thread(target=_call, args=(f, results))
            thread.start()
            thread.join(10)
            assert not thread.is_alive()
            d.callback(results[0])


class ThreadNotingMailbox(UidlMailbox):
    """A L{UidlMailbox} that notes the thread of each UIDL lookup."""

    def __init__(self, uidls: list[str], clock: MemoryReactorClock) -> None:
        super().__init__(uidls, clock)
        self.threads: set[int] = set()

    def getUidl(self, index: int) -> str:
        self.threads.add(threading.get_ident())
        return super().getUidl(index)


def large_maildrops(server: Server) -> tuple[ThreadNotingMailbox, HeldThreads]:
    """Make the server's maildrop count as large: its UIDL hash is finished in a thread."""
    mailbox = ThreadNotingMailbox(["a", "b", "c"], server.clock)
    server.realm.mailbox = mailbox
    threads = HeldThreads()
    server.factory.defer_to_thread = threads
    server.factory.uidl_hash_inline_max = 2
    return mailbox, threads


def test_a_large_maildrops_uidl_hash_is_finished_off_the_reactor_thread(
    log_events: list[LogEvent],
) -> None:
    """
    A session that never listed UIDLs and goes: the UIDLs are looked up in
    another thread, not on the reactor's; the maildrop is released and the
    summary logged, once, after that, with the hash of every UIDL.
    """
    server = Server()
    mailbox, threads = large_maildrops(server)
    client = server.connect()
    client.login()
    client.send(b"STAT\r\n")
    client.lost()
    assert (mailbox.lookups, server.realm.logouts, summaries(log_events)) == (0, 0, [])
    assert len(threads.held) == 1
    # A server stopping meanwhile waits for it.
    assert len(server.factory.commits) == 1
    threads.run()
    assert server.factory.commits == set()
    assert mailbox.lookups == 3
    assert threading.get_ident() not in mailbox.threads
    assert server.realm.logouts == 1
    [event] = summaries(log_events)
    assert (event["end"], event["uidl_hash"]) == ("dropped", uidl_hash(["a", "b", "c"]))
    client.lost()
    assert len(summaries(log_events)) == 1 and threads.held == []
    assert len(server.factory.sessions) == 0


@pytest.mark.parametrize("goes", ["after the commit", "during the hash"])
def test_a_commit_waits_for_the_uidl_hash(log_events: list[LogEvent], goes: str) -> None:
    """
    QUIT: the deletions wait for the hash (a deleted message has no UIDL
    to hash), then commit, also when the client went meanwhile; one
    summary, C{quit}, with the hash of the maildrop as it was at login.
    """
    server = Server()
    mailbox, threads = large_maildrops(server)
    client = server.connect()
    client.login()
    client.send(b"DELE 1\r\n")
    assert client.send(b"QUIT\r\n") == b""
    assert (mailbox.deleted, mailbox.synced) == (set(), None)
    if goes == "during the hash":
        client.lost()
        assert server.realm.logouts == 0
    assert len(server.factory.commits) == 2
    threads.run()
    assert server.factory.commits == set()
    assert mailbox.synced == {0}
    assert server.realm.logouts == 1
    if goes == "after the commit":
        assert client.transport.value() == b"+OK Bye, 1 messages deleted.\r\n"
        assert summaries(log_events) == []
        client.lost()
    [event] = summaries(log_events)
    assert (event["end"], event["dele"], event["after_messages"]) == ("quit", 1, 2)
    assert event["uidl_hash"] == uidl_hash(["a", "b", "c"])
    assert threading.get_ident() not in mailbox.threads


def test_small_maildrops_and_a_stopping_server_hash_at_once(log_events: list[LogEvent]) -> None:
    """
    Up to C{uidl_hash_inline_max} messages, and in a server that is
    stopping (its thread pool stops with it), the hash is finished at once:
    the summary comes with the connection's end.
    """
    server = Server()
    mailbox, threads = large_maildrops(server)
    server.factory.uidl_hash_inline_max = 3
    small = server.connect()
    small.login()
    small.lost()
    server.factory.uidl_hash_inline_max = 2
    server.factory.doStart()
    server.factory.doStop()
    stopping = server.connect()
    stopping.login()
    stopping.lost()
    assert threads.held == []
    assert [(e["end"], e["uidl_hash"]) for e in summaries(log_events)] == [
        ("dropped", uidl_hash(["a", "b", "c"])),
        ("shutdown", uidl_hash(["a", "b", "c"])),
    ]
    assert mailbox.threads == {threading.get_ident()}


@implementer(IReactorThreads)
class ThreadedClock(MemoryReactorClock):
    """A fake clock with a real thread pool, handed out when first asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: ThreadPool | None = None
        self.from_threads: list[Callable[[], object]] = []
        self.lock = threading.Lock()

    def getThreadPool(self) -> ThreadPool:
        if self.pool is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=1, name="test-uidl-hash")
            self.pool.start()
        return self.pool

    def callInThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.getThreadPool().callInThread(callable, *args, **kwargs)

    def suggestThreadPoolSize(self, size: int) -> None:
        pass

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        with self.lock:
            self.from_threads.append(lambda: callable(*args, **kwargs))

    def run_from_threads(self) -> None:
        with self.lock:
            calls, self.from_threads = self.from_threads, []
        for call in calls:
            call()


def test_the_reactors_thread_pool_by_default() -> None:
    """
    By default the work goes to the reactor's thread pool, taken only when
    first needed (a server forks its workers after making its factory);
    a reactor without threads (a fake clock) runs it at once.
    """
    clock = ThreadedClock()
    factory = POP3ServerFactory(Portal(FakeRealm(FakeMailbox([], "plain", clock))), reactor=clock)
    assert clock.pool is None
    results: list[int] = []
    factory.defer_to_thread(threading.get_ident).addCallback(results.append)
    assert clock.pool is not None
    try:
        deadline = time.monotonic() + 10
        while not results:
            assert time.monotonic() < deadline, "the thread pool did not answer"
            clock.run_from_threads()
            time.sleep(0.001)
    finally:
        clock.pool.stop()
    assert results != [threading.get_ident()]
    ran = reactor_threads(MemoryReactorClock())(threading.get_ident)
    assert ran.result == threading.get_ident()


# --- the table and the line on their own


def test_session_table() -> None:
    """add, update (frozen entries: an earlier list does not change), remove, errors."""
    table = SessionTable()
    first = SessionInfo("1-1", None, "192.0.2.1:1", "pop3", None, 20.0, "authorization", 7)
    table.add(first)
    table.add(
        SessionInfo("1-2", "bob", "192.0.2.2:2", "pop3s", "TLSv1.3 X", 10.0, "transaction", 7)
    )
    before = table.list()
    table.update("1-1", user="alice", state="transaction")
    assert before[1] is first and first.user is None
    assert [(i.id, i.user) for i in table.list()] == [("1-2", "bob"), ("1-1", "alice")]
    assert table.get("1-1") is not None and table.get("nope") is None
    with pytest.raises(ValueError):
        table.add(first)
    with pytest.raises(TypeError):
        table.update("1-1", colour="red")
    table.remove("1-1")
    with pytest.raises(KeyError):
        table.remove("1-1")
    with pytest.raises(KeyError):
        table.update("1-1", user="x")
    assert len(table) == 1


def test_the_line_cannot_be_forged(log_events: list[LogEvent]) -> None:
    """
    A user name with quotes, spaces, C{=} and a line break stays one quoted
    value; the server's own values are reduced to safe characters.
    """
    figures = SessionFigures("1-9", "192.0.2.1:5", "pop3", started=100.0)
    figures.user = 'eve" end=quit\nuser="root'
    figures.method = "sasl-x y=z"
    figures.tls = ("TLSv1.3", "A B")
    figures.end = "dropped"
    log_summary(figures, 101.23456)
    [event] = log_events
    text = formatEvent(event)
    assert "\n" not in text
    fields = parse(text)
    assert list(fields) == FIELDS
    assert json.loads(fields["user"]) == figures.user
    assert (fields["method"], fields["cipher"], fields["end"]) == ("sasl-x_y_z", "A_B", "dropped")
    assert fields["duration"] == "1.235" and event["duration"] == 1.235


def test_tls_description() -> None:
    """What pyOpenSSL says, or C{unknown} for what it cannot say."""

    class Handle:
        def get_protocol_version_name(self) -> str:
            return "TLSv1.2"

        def get_cipher_name(self) -> None:
            return None

    assert tls_description(Handle()) == ("TLSv1.2", "unknown")
    assert tls_description(None) == ("unknown", "unknown")


def test_implicit_tls_in_memory(tmp_path: Path, log_events: list[LogEvent]) -> None:
    """
    A real (in-memory) implicit-TLS handshake: the table and the summary
    show the listener C{pop3s} and the negotiated version and cipher.
    """
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "localhost", serial=8)
    source = TLSContextSource(str(cert), str(key))
    server = Server(tls=source)
    server_side = TLSMemoryBIOFactory(source, False, server.factory, clock=server.clock)
    trust = twisted_ssl.Certificate.loadPEM(authority.write_ca(tmp_path / "root.pem").read_bytes())
    recorder = Recorder()

    class ClientFactory(Factory):
        def buildProtocol(self, addr: object) -> Recorder:
            return recorder

    client_side = TLSMemoryBIOFactory(
        twisted_ssl.optionsForClientTLS("localhost", trustRoot=trust),
        True,
        ClientFactory(),
        clock=server.clock,
    )
    client, _tls_server, pump = iosim.connectedServerAndClient(
        lambda: server_side.buildProtocol(None),
        lambda: client_side.buildProtocol(None),
        clock=server.clock,
    )
    pump.flush()
    assert recorder.received.startswith(b"+OK POP3 server ready.")
    version = client.getHandle().get_protocol_version_name()
    cipher = client.getHandle().get_cipher_name()
    [info] = server.factory.sessions.list()
    assert (info.listener, info.tls) == ("pop3s", f"{version} {cipher}")
    client.write(b"QUIT\r\n")
    pump.flush()
    pump.flush()
    [event] = summaries(log_events)
    assert (event["listener"], event["tls"], event["cipher"], event["end"]) == (
        "pop3s",
        version,
        cipher,
        "quit",
    )
    assert version.startswith("TLSv1.")
    assert len(server.factory.sessions) == 0


def test_a_handshake_timeout_while_the_authority_counts(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    """
    Implicit TLS with an authority that answers late: a client that never
    finishes its handshake times out before the count comes.  The
    connection ends unadmitted, as one whose count comes after the login
    timeout: never greeted, never in the table, no summary, the late count
    given back; the audit line says C{tls-handshake-timeout}.
    """
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "localhost", serial=9)
    source = TLSContextSource(str(cert), str(key))
    server = Server(tls=source, auth_timeout=600)
    held = HeldAuthority(server.clock)
    server.factory.login.authority = held
    peer = IPv4Address("TCP", "192.0.2.9", 40000)
    tls = TLSMemoryBIOFactory(source, False, server.factory, clock=server.clock).buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    tls.makeConnection(transport)
    pop3 = tls.wrappedProtocol
    assert isinstance(pop3, POP3Server)
    server.clock.advance(server.factory.tls_handshake_timeout)
    held.answer()
    assert pop3.machine is None
    assert len(server.factory.sessions) == 0
    tls.connectionLost(Failure(ConnectionDone()))
    assert summaries(log_events) == []
    assert held.connections.total == 0
    audited = [
        (e["audit_event"], e["reason"])
        for e in log_events
        if e.get("log_namespace") == "pop3srv.audit" and e["session"] == pop3._session_id
    ]
    assert audited == [("limit-hit", "tls-handshake-timeout")]


# --- the real server over real sockets


def every_summary(srv: Pop3Server) -> list[dict[str, str]]:
    """Every summary line in the server's log so far."""
    return [
        parse(line[line.index("pop3srv-session ") :])
        for line in srv.log_text().splitlines()
        if "pop3srv-session " in line
    ]


def summary_lines(srv: Pop3Server, count: int) -> list[dict[str, str]]:
    """
    The server's summary lines of logged-in sessions (not those of the
    probes that saw whether it was up), once there are C{count} of them
    (or the time is up).
    """
    deadline = time.monotonic() + 15
    while True:
        lines = [fields for fields in every_summary(srv) if fields["user"] != "-"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


class Pop3Client:
    """A line-oriented client on a socket (or an ssl socket after STLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.greeting = self.file.readline()

    def command(self, line: str, multiline: bool = False) -> bytes:
        self.file.write(line.encode() + b"\r\n")
        self.file.flush()
        reply = self.file.readline()
        if multiline and reply.startswith(b"+OK"):
            while (line_ := self.file.readline()) != b".\r\n":
                reply += line_
            reply += b".\r\n"
        return reply

    def login(self) -> None:
        self.command("USER alice")
        assert self.command(f"PASS {PASSWORDS['alice']}").startswith(b"+OK Maildrop")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def connect(port: int) -> Pop3Client:
    return Pop3Client(socket.create_connection(("127.0.0.1", port), timeout=30))


LIVE_MESSAGES = [b"Subject: a\n\nfirst\n", b"Subject: b\n\n.second\n", b"Subject: c\n\nthird\n"]


def test_live_sessions(live_server: Callable[..., Pop3Server]) -> None:
    """
    Against the real server: a session that logs in, RETRs two messages,
    DELEs one and QUITs logs one line with those counts and the figures
    after the commit; sessions on the unchanged mailbox give the same UIDL
    hash, one after the deletion another; a dropped connection is
    C{dropped}; a session open when the server stops is C{shutdown}.
    """
    srv = live_server(mail={"alice": LIVE_MESSAGES})
    looker = connect(srv.port)
    looker.login()
    stat = looker.command("STAT").split()
    uidls = [line.split()[1].decode() for line in looker.command("UIDL", True).splitlines()[1:-1]]
    assert looker.command("QUIT").startswith(b"+OK")
    looker.close()
    worker = connect(srv.port)
    worker.login()
    retrs = [worker.command(f"RETR {n}", True) for n in (1, 3)]
    assert worker.command("DELE 2") == b"+OK Message 2 deleted.\r\n"
    assert worker.command("QUIT") == b"+OK Bye, 1 messages deleted.\r\n"
    worker.close()
    sizes = [int(line.split()[1]) for line in _list(srv.port)]
    dropper = connect(srv.port)
    dropper.login()
    dropper.sock.shutdown(socket.SHUT_RDWR)
    dropper.close()
    looked, worked, listed, dropped = summary_lines(srv, 4)
    assert (looked["end"], looked["dele"], looked["retr"]) == ("quit", "0", "0")
    assert (looked["messages"], looked["octets"]) == (stat[1].decode(), stat[2].decode())
    assert looked["uidl_hash"] == uidl_hash(uidls) == worked["uidl_hash"]
    assert worked["user"] == '"alice"' and worked["method"] == "password"
    assert worked["client"].startswith("127.0.0.1:") and worked["tls"] == "none"
    assert (worked["retr"], worked["dele"], worked["end"]) == ("2", "1", "quit")
    assert worked["retr_octets"] == str(sum(len(r) - len(r.split(b"\r\n")[0]) - 2 for r in retrs))
    assert (worked["after_messages"], worked["after_octets"]) == ("2", str(sum(sizes)))
    assert listed["end"] == "quit"
    assert dropped["end"] == "dropped" and dropped["after_messages"] == "-"
    assert dropped["uidl_hash"] == uidl_hash([uidls[0], uidls[2]]) != looked["uidl_hash"]
    assert len({s["session"] for s in (looked, worked, listed, dropped)}) == 4
    open_one = connect(srv.port)
    open_one.login()
    srv.stop()
    open_one.close()
    *earlier, stopped = summary_lines(srv, 5)
    assert (stopped["end"], stopped["user"]) == ("shutdown", '"alice"')
    assert len(earlier) == 4
    # One line per session: the probes that saw the server up included.
    sessions = [fields["session"] for fields in every_summary(srv)]
    assert len(set(sessions)) == len(sessions)


def _list(port: int) -> list[bytes]:
    """LIST over its own session (which logs a summary of its own)."""
    client = connect(port)
    client.login()
    listing = client.command("LIST", True).splitlines()[1:-1]
    client.command("QUIT")
    client.close()
    return listing


class TLSServer(Pop3Server):
    """A pop3srv process with STLS on the plain port and implicit TLS on a second one."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.tls_port = free_port()
        super().__init__(
            root,
            "--listen-tls", f"tcp:{self.tls_port}:interface=127.0.0.1",
            "--tls-cert", str(cert), "--tls-key", str(key),
        )  # fmt: skip


def test_live_tls_sessions(live_server: Callable[..., Pop3Server], tmp_path: Path) -> None:
    """
    Over STLS and implicit TLS from Python's ssl: the summary names the
    listener and the version and cipher the client negotiated.
    """
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "localhost", serial=21)
    context = ssl.create_default_context(cafile=str(authority.write_ca(tmp_path / "root.pem")))
    srv = live_server(cert, key, mail={"alice": LIVE_MESSAGES}, cls=TLSServer)
    assert isinstance(srv, TLSServer)
    plain = connect(srv.port)
    assert plain.command("STLS") == b"+OK Begin TLS negotiation.\r\n"
    wrapped = context.wrap_socket(plain.sock, server_hostname="localhost")
    stls = Pop3Client.__new__(Pop3Client)
    stls.sock, stls.file = wrapped, wrapped.makefile("rwb")
    stls.login()
    stls_tls = (wrapped.version(), wrapped.cipher()[0])  # type: ignore[index]
    stls.command("QUIT")
    stls.close()
    implicit_sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", srv.tls_port), timeout=30),
        server_hostname="localhost",
    )
    implicit = Pop3Client(implicit_sock)
    implicit.login()
    implicit_tls = (implicit_sock.version(), implicit_sock.cipher()[0])  # type: ignore[index]
    implicit.command("QUIT")
    implicit.close()
    first, second = summary_lines(srv, 2)
    assert (first["listener"], first["tls"], first["cipher"]) == ("pop3", *stls_tls)
    assert (second["listener"], second["tls"], second["cipher"]) == ("pop3s", *implicit_tls)
    assert first["end"] == second["end"] == "quit"
