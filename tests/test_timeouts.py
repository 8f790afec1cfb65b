"""
Tests for how L{pop3srv.server.protocol} ends connections (issue 12, item 1):
every timeout (login, idle, TLS handshake, a stalled write) ends the
connection for certain, aborting it when the peer does not take the last
output, and accepted TCP sockets use keepalive.  Synchronous: a fake clock,
C{StringTransport} (which, like a peer that never reads, never finishes a
C{loseConnection} by itself) and an in-memory TLS layer.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import Authority
from helpers import MESSAGES, FakeMailbox, FakeRealm, Recorder
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import ConnectionLimits, ThrottleSettings
from pop3srv.server.protocol import POP3Server, POP3ServerFactory, ServerPolicy
from pop3srv.server.tls import TLSContextSource

GRACE = 3.0
STALL = 40.0
HANDSHAKE = 10.0


class NoReader(StringTransport):
    """
    A transport to a peer that takes nothing: C{loseConnection} only marks
    it as closing, and C{abortConnection} is recorded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aborted = False
        self.tls_started = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def startTLS(self, context: object) -> None:
        self.tls_started = True


class Server:
    """A factory on a fake clock with short timeouts."""

    def __init__(self, auth_timeout: float = 100_000, tls: TLSContextSource | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.mailbox = FakeMailbox(list(MESSAGES), "plain", self.clock)
        self.authority = LocalAuthority(
            ThrottleSettings(), ConnectionLimits(max_connections=1), clock=self.clock
        )
        self.connections = self.authority.connections
        self.factory = POP3ServerFactory(
            Portal(FakeRealm(self.mailbox), [InMemoryUsernamePasswordDatabaseDontUse(a=b"pw")]),
            reactor=self.clock,
            tls=tls,
            policy=ServerPolicy(auth_timeout=auth_timeout, authority=self.authority),
            tls_handshake_timeout=HANDSHAKE,
            write_stall_timeout=STALL,
            close_grace=GRACE,
        )

    def connect(self) -> tuple[POP3Server, NoReader]:
        protocol = self.factory.buildProtocol(None)
        transport = NoReader(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport


def test_login_timeout_aborts_a_peer_that_does_not_read(log_events: list[LogEvent]) -> None:
    """
    At the login timeout the server says so and closes; a peer that takes
    nothing is aborted C{close_grace} later, and its slot comes back.
    """
    server = Server(auth_timeout=5)
    protocol, transport = server.connect()
    transport.clear()
    protocol.dataReceived(b"CAPA\r\n")
    server.clock.advance(5)
    assert transport.value().endswith(b"-ERR Login timeout; closing.\r\n")
    assert transport.disconnecting and not transport.aborted
    server.clock.advance(GRACE - 0.1)
    assert not transport.aborted
    server.clock.advance(0.1)
    assert transport.aborted
    protocol.connectionLost()
    assert server.connect()[1].value().startswith(b"+OK POP3 server ready")
    assert any("did not take its last output" in str(e.get("log_format")) for e in log_events)


def test_a_peer_that_closes_in_time_is_not_aborted() -> None:
    """The abort is only for connections still open after the grace."""
    server = Server(auth_timeout=5)
    protocol, transport = server.connect()
    server.clock.advance(5)
    protocol.connectionLost()
    server.clock.advance(GRACE * 10)
    assert not transport.aborted
    assert server.clock.getDelayedCalls() == []


def test_idle_timeout_aborts_a_peer_that_does_not_read() -> None:
    """The autologout ends the connection for certain, like the login timeout."""
    server = Server()
    protocol, transport = server.connect()
    protocol.dataReceived(b"USER a\r\nPASS pw\r\n")
    server.clock.advance(600)
    assert transport.value().endswith(b"-ERR Autologout; idle for too long.\r\n")
    assert not transport.aborted
    server.clock.advance(GRACE)
    assert transport.aborted


def test_ordinary_close_waits_as_long_as_a_stalled_write() -> None:
    """
    After QUIT the last replies get the write-stall time to go out, then
    the connection is aborted too; a timeout meanwhile shortens the wait.
    """
    server = Server(auth_timeout=60)
    protocol, transport = server.connect()
    protocol.dataReceived(b"QUIT\r\n")
    assert transport.value().endswith(b"+OK Bye.\r\n") and transport.disconnecting
    server.clock.advance(STALL - 1)
    assert not transport.aborted
    server.clock.advance(1)
    assert transport.aborted
    other = Server(auth_timeout=STALL / 2)
    protocol, transport = other.connect()
    protocol.dataReceived(b"QUIT\r\n")
    transport.clear()
    other.clock.advance(STALL / 2)
    # The login timeout writes nothing after the farewell, but cuts the wait.
    assert transport.value() == b""
    assert not transport.aborted
    other.clock.advance(GRACE)
    assert transport.aborted


def test_pipelining_without_reading_is_a_stalled_write() -> None:
    """
    A logged-in client whose replies fill the transport and who takes none
    of them is closed after the write-stall timeout, and aborted after the
    grace; one that takes some in time is not.
    """
    server = Server()
    protocol, transport = server.connect()
    protocol.dataReceived(b"USER a\r\nPASS pw\r\n")
    protocol.pauseProducing()  # the transport's buffer is full
    server.clock.advance(STALL - 1)
    protocol.resumeProducing()  # the client took some
    protocol.pauseProducing()
    server.clock.advance(STALL - 1)
    assert not transport.disconnecting
    server.clock.advance(1)
    assert transport.disconnecting and not transport.aborted
    server.clock.advance(GRACE)
    assert transport.aborted


class FullAfterWrite(NoReader):
    """A transport that, once C{full}, is full after every write and never drains."""

    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_a_download_nobody_reads_is_a_stalled_write(log_events: list[LogEvent]) -> None:
    """A RETR to a client that stops reading ends after the write-stall timeout."""
    server = Server()
    server.mailbox.messages[0] = b"Subject: big\n\n" + (b"x" * 70 + b"\n") * 15_000
    protocol = server.factory.buildProtocol(None)
    transport = FullAfterWrite(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"USER a\r\nPASS pw\r\n")
    transport.full = True
    protocol.dataReceived(b"RETR 1\r\n")
    assert transport.producer is not None and transport.producer is not protocol
    server.clock.advance(STALL)
    assert transport.disconnecting and not transport.aborted
    server.clock.advance(GRACE)
    assert transport.aborted
    reasons = [e.get("reason") for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert "write-stall" in reasons


def test_stls_handshake_timeout() -> None:
    """A client that sends STLS and never completes the handshake is cut off."""
    server = Server(tls=object())  # type: ignore[arg-type]
    protocol, transport = server.connect()
    protocol.dataReceived(b"STLS\r\n")
    assert transport.tls_started
    server.clock.advance(HANDSHAKE)
    assert transport.disconnecting
    server.clock.advance(GRACE)
    assert transport.aborted
    # A completed handshake stops the timer.
    other = Server(tls=object())  # type: ignore[arg-type]
    protocol, transport = other.connect()
    protocol.dataReceived(b"STLS\r\n")
    protocol.handshakeCompleted()
    other.clock.advance(HANDSHAKE + GRACE)
    assert not transport.disconnecting


@pytest.fixture(scope="module")
def tls_source(tmp_path_factory: pytest.TempPathFactory) -> TLSContextSource:
    directory: Path = tmp_path_factory.mktemp("certs")
    cert, key = Authority.create().issue(directory, "server", serial=7)
    return TLSContextSource(str(cert), str(key))


def test_implicit_tls_handshake_timeout(tls_source: TLSContextSource) -> None:
    """
    On an implicit-TLS port (TLSMemoryBIOFactory, as tap.py builds it) the
    greeting waits for a handshake; a peer that never starts one is aborted
    after the handshake timeout and the grace, however long the login
    timeout is.
    """
    server = Server(tls=tls_source)
    wrapped = TLSMemoryBIOFactory(tls_source, False, server.factory, clock=server.clock)
    tls_protocol = wrapped.buildProtocol(None)
    transport = NoReader(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    tls_protocol.makeConnection(transport)
    assert transport.value() == b""  # the greeting waits for the handshake
    server.clock.advance(HANDSHAKE)
    assert not transport.aborted
    server.clock.advance(GRACE)
    assert transport.aborted


@pytest.fixture
def tcp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    yield sock
    sock.close()


def test_accepted_sockets_use_keepalive(tcp_socket: socket.socket) -> None:
    """
    The transport's keepalive is switched on and, where the system names
    them, the probe timings are set on the socket.
    """

    class TCPTransport(NoReader):
        socket = tcp_socket
        keepalive: bool | None = None

        def setTcpKeepAlive(self, enabled: bool) -> None:
            self.keepalive = enabled

    server = Server()
    protocol = server.factory.buildProtocol(None)
    transport = TCPTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    assert transport.keepalive is True
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert tcp_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert tcp_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert tcp_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6


def test_a_completed_implicit_tls_handshake_stops_the_timer(tmp_path: Path) -> None:
    """After a real (in-memory) handshake the session outlives the handshake timeout."""
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "localhost", serial=8)
    source = TLSContextSource(str(cert), str(key))
    server = Server(tls=source)
    server_side = TLSMemoryBIOFactory(source, False, server.factory, clock=server.clock)
    trust = ssl.Certificate.loadPEM(authority.write_ca(tmp_path / "root.pem").read_bytes())
    recorder = Recorder()

    class ClientFactory(Factory):
        def buildProtocol(self, addr: object) -> Recorder:
            return recorder

    client_side = TLSMemoryBIOFactory(
        ssl.optionsForClientTLS("localhost", trustRoot=trust),
        True,
        ClientFactory(),
        clock=server.clock,
    )
    client, tls_server, pump = iosim.connectedServerAndClient(
        lambda: server_side.buildProtocol(None),
        lambda: client_side.buildProtocol(None),
        clock=server.clock,
    )
    pump.flush()
    assert recorder.received.startswith(b"+OK POP3 server ready.")
    server.clock.advance(HANDSHAKE + GRACE + 1)
    pump.flush()
    assert not tls_server.disconnecting
    recorder.received = b""
    client.write(b"CAPA\r\n")
    pump.flush()
    assert recorder.received.startswith(b"+OK Capability list follows.")


@pytest.mark.parametrize("stall_beyond_idle", [0.0, 60.0])
def test_idle_timeout_writes_nothing_into_a_download(
    log_events: list[LogEvent], stall_beyond_idle: float
) -> None:
    """
    With the default timeouts (the write stall as long as the idle time),
    or a longer write stall, a RETR to a client that stopped reading meets
    the idle timer first: no C{-ERR} line is written into the message, the
    close is audited as the write stall it is, and the connection is
    aborted after the grace.
    """
    server = Server()
    server.factory.write_stall_timeout = server.factory.idle_timeout + stall_beyond_idle
    server.mailbox.messages[0] = b"Subject: big\n\n" + (b"x" * 70 + b"\n") * 15_000
    protocol = server.factory.buildProtocol(None)
    transport = FullAfterWrite(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"USER a\r\nPASS pw\r\n")
    transport.full = True
    protocol.dataReceived(b"RETR 1\r\n")
    sent = len(transport.value())
    server.clock.advance(server.factory.idle_timeout)
    assert transport.value()[sent:] == b""
    assert transport.disconnecting and not transport.aborted
    reasons = [e.get("reason") for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert "write-stall" in reasons
    server.clock.advance(GRACE)
    assert transport.aborted


def test_no_timer_after_the_connection_is_lost_mid_download() -> None:
    """
    A chunk of a download scheduled just before the connection is lost
    starts no idle or stall timer for the dead connection, whether the
    transport stopped the streamer first (as Twisted's do) or not.
    """
    for transport_stops_producer in (True, False):
        server = Server()
        server.mailbox.messages[0] = b"Subject: big\n\n" + (b"x" * 70 + b"\n") * 15_000
        protocol = server.factory.buildProtocol(None)
        transport = FullAfterWrite(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"USER a\r\nPASS pw\r\n")
        transport.full = True
        protocol.dataReceived(b"RETR 1\r\n")
        streamer = transport.producer
        assert streamer is not None and streamer is not protocol
        streamer.resumeProducing()  # the next chunk is scheduled
        # In the same reactor turn the peer goes away.
        if transport_stops_producer:
            streamer.stopProducing()
        protocol.connectionLost(None)
        assert server.clock.getDelayedCalls() != []
        server.clock.advance(0)  # the scheduled chunk runs
        assert server.clock.getDelayedCalls() == [], transport_stops_producer
