"""
Tests for L{pop3srv.server.proxy}: the real L{POP3ServerFactory} behind
L{ProxyHeaderFactory} on a real listening socket on 127.0.0.1, with
blocking stdlib clients (C{socket}, C{ssl}) in a thread while the global
reactor is iterated (L{helpers.run_until}).

Every 127.x address is this host, so one process has a trusted proxy and
untrusted clients: the listener trusts 127.0.0.2/32 only, and clients bind
their sockets to 127.0.0.2 (the "proxy") or 127.0.0.3 (anyone else).  The
last tests check the wrapper's bookkeeping in memory (a fake clock and
C{StringTransport}).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from certs import Authority
from helpers import MESSAGES, FakeMailbox, FakeRealm, Recorder, run_until
from test_proxyheader import LOCAL, PROXY, UNIX_STREAM, UNSPEC, v1_header, v2_header
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from pop3srv.server.protocol import POP3ServerFactory
from pop3srv.server.proxy import ProxiedTransport, ProxyHeaderFactory, ProxyHeaderReader
from pop3srv.server.tls import TLSContextSource

PROXY_ADDRESS = "127.0.0.2"
STRANGER_ADDRESS = "127.0.0.3"
TRUSTED = [ipaddress.ip_network(f"{PROXY_ADDRESS}/32")]
CLIENT = ("198.51.100.7", 40007)
HEALTH_REPLY = b"+OK pop3srv ready\r\n"
# Where USER/PASS may go without TLS: the documentation networks the
# headers name, so a login works only if the header's address is used.
PLAINTEXT_NETWORKS = [
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
]

T = TypeVar("T")


# --- the server side, in this thread's reactor


@dataclass
class Listener:
    """A listening L{ProxyHeaderFactory} and the POP3 factory behind it."""

    port: int
    pop3: POP3ServerFactory
    proxy: ProxyHeaderFactory


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA file, and a certificate and key for localhost signed by it."""
    directory = tmp_path_factory.mktemp("certs")
    root = Authority.create()
    cert, key = root.issue(directory, "server", serial=4242)
    return root.write_ca(directory / "root.pem"), cert, key


@pytest.fixture
def listen(tls_files: tuple[Path, Path, Path]) -> Iterator[Callable[..., Listener]]:
    """
    C{listen(implicit_tls=False, header_timeout=5.0, interface="127.0.0.1",
    **pop3_options)}: a real listener on a free port; stopped after the test.
    """
    from twisted.internet import reactor

    ports: list[Any] = []

    def start(
        implicit_tls: bool = False,
        header_timeout: float = 5.0,
        interface: str = "127.0.0.1",
        **pop3_options: Any,
    ) -> Listener:
        _, cert, key = tls_files
        tls = TLSContextSource(str(cert), str(key))
        realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", MemoryReactorClock()))
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        pop3_options.setdefault("plaintext_auth_networks", PLAINTEXT_NETWORKS)
        pop3 = POP3ServerFactory(
            Portal(realm, [checker]), reactor=reactor, tls=tls, **pop3_options
        )
        inner: Factory[Any] = (
            TLSMemoryBIOFactory(tls, False, pop3, clock=reactor) if implicit_tls else pop3
        )
        proxy = ProxyHeaderFactory(
            inner,
            TRUSTED,
            reactor,
            header_timeout,
            health_reply=b"" if implicit_tls else HEALTH_REPLY,
        )
        port = reactor.listenTCP(0, proxy, interface=interface)
        ports.append(port)
        return Listener(port.getHost().port, pop3, proxy)

    yield start
    for port in ports:
        run_until(defer.maybeDeferred(port.stopListening), 10)
    # Let the server side of the last connections see them close.
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        reactor.iterate(0.01)


def in_thread(work: Callable[[], T], timeout: float = 30.0) -> T:
    """Run a blocking client in a thread while this thread runs the reactor."""
    from twisted.internet import reactor

    d: defer.Deferred[T] = defer.Deferred()

    def run() -> None:
        try:
            result = work()
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return run_until(d, timeout)  # type: ignore[no-any-return]


def audit_lines(log_events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]


def proxy_lines(log_events: list[LogEvent]) -> list[str]:
    """The info lines of the PROXY wrapper."""
    return [
        formatEvent(e)
        for e in log_events
        if e.get("log_namespace") == "pop3srv.server.proxy.ProxyHeaderReader"
        and e.get("log_level") == LogLevel.info
    ]


# --- the client side, in a thread


class Client:
    """A blocking POP3 client on a socket bound to a chosen source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"closed after {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def ask(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.line()

    def start_tls(self, ca: Path) -> None:
        """Handshake on the socket (implicit TLS, or after STLS's answer)."""
        assert not self._buffer
        context = ssl.create_default_context(cafile=str(ca))
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def rest_until_closed(self) -> bytes:
        """Everything the server sends until it closes (a reset counts as a close)."""
        data, self._buffer = self._buffer, b""
        try:
            while chunk := self.sock.recv(4096):
                data += chunk
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
        return data

    def log_in(self, greeting: bool = True) -> list[bytes]:
        """(The greeting,) USER, PASS, STAT and QUIT: the replies."""
        replies = [self.line()] if greeting else []
        replies += [self.ask(c) for c in (b"USER alice", b"PASS secret", b"STAT", b"QUIT")]
        assert self.rest_until_closed() == b""
        return replies

    def close(self) -> None:
        self.sock.close()


def session(port: int, source: str, work: Callable[[Client], T]) -> T:
    """Connect from C{source} and run C{work} on the client, in a thread."""

    def run() -> T:
        client = Client(port, source)
        try:
            return work(client)
        finally:
            client.close()

    return in_thread(run)


def logged_in(replies: list[bytes]) -> bool:
    return replies[0].startswith(b"+OK") and replies[3] == b"+OK 2 73\r\n"


# --- headers from the trusted proxy


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (v1_header(CLIENT, ("192.0.2.1", 110)), "198.51.100.7"),
        (v2_header(CLIENT, ("192.0.2.1", 110)), "198.51.100.7"),
        (v1_header(("2001:db8::7", 50000), ("2001:db8::1", 110)), "2001:db8::7"),
        (v2_header(("2001:db8::7", 50000), ("2001:db8::1", 110)), "2001:db8::7"),
        (v1_header(("::ffff:198.51.100.7", 50000), ("::1", 110)), "198.51.100.7"),
    ],
    ids=["v1", "v2", "v1-ipv6", "v2-ipv6", "v1-ipv4-mapped"],
)
def test_header_from_trusted_proxy_is_the_client_address(
    listen: Callable[..., Listener], log_events: list[LogEvent], header: bytes, peer: str
) -> None:
    """
    A header from the trusted proxy (with the first command in the same
    segment, as a client's first bytes may follow it at once): the session
    runs as the header's client, who may log in without TLS because its
    address, not the proxy's, is in the plaintext networks; the audit line
    names it.
    """
    listener = listen()

    def work(client: Client) -> list[bytes]:
        client.send(header)
        return client.log_in()

    replies = session(listener.port, PROXY_ADDRESS, work)
    assert logged_in(replies), replies
    lines = audit_lines(log_events)
    assert len(lines) == 1 and "event=login-ok" in lines[0], lines
    assert f" peer={peer} " in lines[0]
    assert proxy_lines(log_events) == []


def test_header_address_drives_the_plaintext_policy(listen: Callable[..., Listener]) -> None:
    """
    The proxy's own address is loopback (plaintext allowed); a client the
    header places outside the plaintext networks is refused USER without
    TLS.
    """
    listener = listen()

    def work(client: Client) -> bytes:
        client.send(v2_header(("203.0.113.9", 1234), ("192.0.2.1", 110)))
        client.line()
        return client.ask(b"USER alice")

    assert session(listener.port, PROXY_ADDRESS, work).startswith(b"-ERR [AUTH] Plaintext")


def test_trusted_address_without_header_is_closed(
    listen: Callable[..., Listener], log_events: list[LogEvent]
) -> None:
    """
    The trusted proxy's connection that starts with a command, not a
    header: nothing is answered, the connection is closed, and one line
    says who and why.  No session was begun, so nothing is audited.
    """
    listener = listen()

    def work(client: Client) -> bytes:
        client.send(b"CAPA\r\n")
        return client.rest_until_closed()

    assert session(listener.port, PROXY_ADDRESS, work) == b""
    lines = proxy_lines(log_events)
    assert len(lines) == 1, lines
    assert "127.0.0.2:" in lines[0] and "not a PROXY header" in lines[0]
    assert audit_lines(log_events) == []


def test_bad_header_from_trusted_address_is_closed(
    listen: Callable[..., Listener], log_events: list[LogEvent]
) -> None:
    """A malformed header (a port out of range) closes the connection, with the reason logged."""
    listener = listen()

    def work(client: Client) -> bytes:
        client.send(b"PROXY TCP4 198.51.100.7 192.0.2.1 65536 110\r\nCAPA\r\n")
        return client.rest_until_closed()

    assert session(listener.port, PROXY_ADDRESS, work) == b""
    (line,) = proxy_lines(log_events)
    assert "127.0.0.2:" in line and "source port '65536'" in line


def test_header_timeout_closes(listen: Callable[..., Listener], log_events: list[LogEvent]) -> None:
    """
    A trusted peer that starts a header and stops is closed after the
    header timeout, not before, with the reason logged.
    """
    listener = listen(header_timeout=0.5)

    def work(client: Client) -> tuple[bytes, float]:
        client.send(b"PROXY TCP4 198.51")
        start = time.monotonic()
        return client.rest_until_closed(), time.monotonic() - start

    data, elapsed = session(listener.port, PROXY_ADDRESS, work)
    assert data == b""
    assert 0.4 < elapsed < 5
    (line,) = proxy_lines(log_events)
    assert "127.0.0.2:" in line and "no PROXY header within 0.5 s" in line


def test_untrusted_header_is_not_honoured(
    listen: Callable[..., Listener], log_events: list[LogEvent]
) -> None:
    """
    From any other address a connection is served at once, as its own
    address: a header line is just a bad command, and the login is audited
    with the real address.
    """
    listener = listen(plaintext_auth_networks=[ipaddress.ip_network("127.0.0.0/8")])

    def work(client: Client) -> list[bytes]:
        greeting = client.line()
        refused = client.ask(v1_header(CLIENT, ("192.0.2.1", 110)).rstrip(b"\r\n"))
        return [greeting, refused, *client.log_in(greeting=False)]

    replies = session(listener.port, STRANGER_ADDRESS, work)
    assert replies[0].startswith(b"+OK POP3 server ready")
    assert replies[1].startswith(b"-ERR")
    assert logged_in(replies[:1] + replies[2:]), replies
    (line,) = audit_lines(log_events)
    assert "event=login-ok" in line and " peer=127.0.0.3 " in line


def test_local_header_is_a_health_check(
    listen: Callable[..., Listener], log_events: list[LogEvent]
) -> None:
    """
    LOCAL (HAProxy's health check): the health reply, then the close; no
    session is built, so nothing is counted or audited.
    """
    listener = listen()
    before = listener.pop3.next_session_id()

    def work(client: Client) -> bytes:
        client.send(v2_header(command=LOCAL))
        return client.rest_until_closed()

    assert session(listener.port, PROXY_ADDRESS, work) == HEALTH_REPLY
    assert listener.pop3.next_session_id() == before + 1
    assert audit_lines(log_events) == [] and proxy_lines(log_events) == []


UNIX_PATHS = b"/run/client.sock".ljust(108, b"\0") + b"/run/pop3.sock".ljust(108, b"\0")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 198.51.100.7 192.0.2.1 40007 110\r\n",
        v2_header(command=PROXY, family=UNSPEC),
        v2_header(command=PROXY, family=UNIX_STREAM, body=UNIX_PATHS),
    ],
    ids=["v1-unknown", "v1-unknown-addresses", "v2-unspec", "v2-unix"],
)
def test_a_header_naming_no_client_is_closed_without_a_word(
    listen: Callable[..., Listener], log_events: list[LogEvent], header: bytes
) -> None:
    """
    A header that relays a connection but names no client address (v1
    UNKNOWN, v2 UNSPEC or AF_UNIX) may be a real client's: it is not
    greeted as a health check would be, but closed without a word, with
    one line saying who and why; no session is built.
    """
    listener = listen()
    before = listener.pop3.next_session_id()

    def work(client: Client) -> bytes:
        client.send(header + b"CAPA\r\n")
        return client.rest_until_closed()

    assert session(listener.port, PROXY_ADDRESS, work) == b""
    assert listener.pop3.next_session_id() == before + 1
    (line,) = proxy_lines(log_events)
    assert "127.0.0.2:" in line and "header names no client to serve" in line
    assert audit_lines(log_events) == []


# --- TLS


def test_implicit_tls_reads_the_header_before_the_handshake(
    listen: Callable[..., Listener],
    log_events: list[LogEvent],
    tls_files: tuple[Path, Path, Path],
) -> None:
    """
    On an implicit-TLS listener the header comes in clear, then the TLS
    handshake (a real one, by Python's ssl module); the encrypted session
    runs as the header's client.
    """
    listener = listen(implicit_tls=True)
    ca = tls_files[0]

    def work(client: Client) -> list[bytes]:
        client.send(v2_header(CLIENT, ("192.0.2.1", 995)))
        client.start_tls(ca)
        return client.log_in()

    replies = session(listener.port, PROXY_ADDRESS, work)
    assert logged_in(replies), replies
    (line,) = audit_lines(log_events)
    assert "event=login-ok" in line and " peer=198.51.100.7 " in line


def test_implicit_tls_local_health_check(listen: Callable[..., Listener]) -> None:
    """A health check on the TLS listener: no handshake, no reply, a close."""
    listener = listen(implicit_tls=True)

    def work(client: Client) -> bytes:
        client.send(v2_header(command=LOCAL))
        return client.rest_until_closed()

    assert session(listener.port, PROXY_ADDRESS, work) == b""


def test_stls_behind_a_header(
    listen: Callable[..., Listener],
    log_events: list[LogEvent],
    tls_files: tuple[Path, Path, Path],
) -> None:
    """
    STLS on a proxied connection: the TLS layer wraps the connection's
    protocol (the header reader), which passes the end of the handshake on,
    so the session outlives the handshake timeout; a client outside the
    plaintext networks logs in once encrypted.
    """
    listener = listen(tls_handshake_timeout=0.3, plaintext_auth_networks=[])

    def work(client: Client) -> list[bytes]:
        client.send(v1_header(("203.0.113.9", 1234), ("192.0.2.1", 110)))
        client.line()
        assert client.ask(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
        client.start_tls(tls_files[0])
        time.sleep(0.8)
        replies = [client.ask(c) for c in (b"USER alice", b"PASS secret", b"STAT")]
        replies.append(client.ask(b"QUIT"))
        return replies

    replies = session(listener.port, PROXY_ADDRESS, work)
    assert replies[0].startswith(b"+OK") and replies[2] == b"+OK 2 73\r\n", replies
    (line,) = audit_lines(log_events)
    assert " peer=203.0.113.9 " in line


def test_ipv4_client_of_dual_stack_listener_is_matched_as_ipv4(
    listen: Callable[..., Listener], log_events: list[LogEvent]
) -> None:
    """
    On a dual-stack socket the proxy's address arrives as ::ffff:127.0.0.2;
    it is trusted as 127.0.0.2.
    """
    try:
        listener = listen(interface="::")
    except Exception as e:
        pytest.skip(f"no dual-stack IPv6 socket here: {e}")

    def work(client: Client) -> list[bytes]:
        client.send(v1_header(CLIENT, ("192.0.2.1", 110)))
        return client.log_in()

    replies = session(listener.port, PROXY_ADDRESS, work)
    assert logged_in(replies), replies
    (line,) = audit_lines(log_events)
    assert " peer=198.51.100.7 " in line


# --- in memory: the wrapper's bookkeeping


class Transport(StringTransport):
    """A C{StringTransport} that records producer and TLS calls."""

    def __init__(self, peer: str = PROXY_ADDRESS) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 5555))
        self.calls: list[str] = []
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def startTLS(self, context: object) -> None:
        self.calls.append("startTLS")
        directlyProvides(self, ISSLTransport)

    def getHandle(self) -> str:
        return "the socket"


def reader(
    wrapped: Factory[Any] | None = None, clock: MemoryReactorClock | None = None
) -> tuple[ProxyHeaderReader, Transport, MemoryReactorClock, Recorder]:
    """A header reader connected to a fake transport from the trusted proxy."""
    clock = clock or MemoryReactorClock()
    recorder = Recorder()
    factory = ProxyHeaderFactory(
        wrapped or Factory.forProtocol(lambda: recorder), TRUSTED, clock, 5.0, HEALTH_REPLY
    )
    transport = Transport()
    protocol = factory.buildProtocol(transport.getPeer())
    assert isinstance(protocol, ProxyHeaderReader)
    protocol.makeConnection(transport)
    return protocol, transport, clock, recorder


def test_trust_is_decided_by_the_real_peer() -> None:
    """Only the trusted network gets a header reader; IPv4-mapped matches as IPv4."""
    factory = ProxyHeaderFactory(Factory.forProtocol(Recorder), TRUSTED, MemoryReactorClock(), 5)
    assert factory.trusts(IPv4Address("TCP", "127.0.0.2", 1))
    assert factory.trusts(IPv6Address("TCP", "::ffff:127.0.0.2", 1))
    assert not factory.trusts(IPv4Address("TCP", "127.0.0.3", 1))
    assert not factory.trusts(IPv6Address("TCP", "::1", 1))
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 1)), Recorder)


def test_header_in_pieces_then_the_rest_goes_through() -> None:
    """A header split over reads; the bytes after it and later reads reach the protocol."""
    protocol, transport, clock, recorder = reader()
    header = v2_header(CLIENT, ("192.0.2.1", 110))
    for i in range(len(header) - 1):
        protocol.dataReceived(header[i : i + 1])
    assert recorder.transport is None
    protocol.dataReceived(header[-1:] + b"CAPA\r\n")
    assert recorder.received == b"CAPA\r\n"
    protocol.dataReceived(b"QUIT\r\n")
    assert recorder.received == b"CAPA\r\nQUIT\r\n"
    assert recorder.transport.getPeer() == IPv4Address("TCP", *CLIENT)
    assert recorder.transport.getHost() == IPv4Address("TCP", "192.0.2.1", 110)
    clock.advance(60)
    assert not transport.disconnecting


def test_proxied_transport_passes_everything_else_on() -> None:
    """
    The transport the protocol sees is the connection's in everything but
    its addresses: writes, producers, closing, handles, interfaces, STLS.
    """
    transport = Transport()
    directlyProvides(transport, ITCPTransport)
    proxied = ProxiedTransport(
        transport, IPv4Address("TCP", *CLIENT), IPv4Address("TCP", "192.0.2.1", 110)
    )
    assert ITCPTransport.providedBy(proxied) and not ISSLTransport.providedBy(proxied)
    proxied.write(b"a")
    proxied.writeSequence([b"b", b"c"])
    producer = object()
    proxied.registerProducer(producer, True)
    assert transport.producer is producer and transport.streaming
    proxied.pauseProducing()
    proxied.resumeProducing()
    proxied.unregisterProducer()
    assert transport.producer is None
    assert proxied.getHandle() == "the socket"
    proxied.startTLS(object())
    assert ISSLTransport.providedBy(proxied)
    assert transport.calls == ["pause", "resume", "startTLS"]
    assert transport.value() == b"abc"
    proxied.loseConnection()
    assert transport.disconnecting and not transport.aborted
    proxied.abortConnection()
    assert transport.aborted


def test_refused_connection_is_aborted_if_it_lingers() -> None:
    """A closed connection that does not go within the grace is aborted; one that goes is not."""
    protocol, transport, clock, _ = reader()
    protocol.dataReceived(b"HELO\r\n")
    assert transport.disconnecting and not transport.aborted
    clock.advance(protocol.factory.close_grace)
    assert transport.aborted

    protocol, transport, clock, _ = reader()
    clock.advance(5.0)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionError()))
    clock.advance(60)
    assert not transport.aborted and not clock.getDelayedCalls()


def test_no_protocol_from_the_wrapped_factory_closes() -> None:
    """A wrapped factory that refuses the connection (builds None): it is closed."""

    class Refusing(Factory[Any]):
        def buildProtocol(self, addr: Any) -> None:
            return None

    protocol, transport, _, _ = reader(Refusing())
    protocol.dataReceived(v1_header(CLIENT, ("192.0.2.1", 110)))
    assert transport.disconnecting and transport.value() == b""
