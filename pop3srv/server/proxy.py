# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol in front of a listener: a load balancer we trust (see
L{pop3srv.core.proxyheader}) names the client it relays in a header, and
the session behind it sees that client as its peer.

L{ProxyHeaderFactory} wraps the factory a port would use (the
L{POP3ServerFactory}, or the C{TLSMemoryBIOFactory} around it on an
implicit-TLS port, whose handshake then follows the header).  A
connection from a trusted address must start with a header; one from
anywhere else goes to the wrapped factory untouched, so a header from there
is only ever ordinary data, never an address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHandshakeListener, IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from pop3srv.core.proxyheader import (
    INCOMPLETE,
    Endpoint,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
)
from pop3srv.server.limits import IPNetwork, in_networks, normalise_address
from pop3srv.server.protocol import CLOSE_GRACE


def _address(endpoint: Endpoint) -> IPv4Address | IPv6Address:
    """A Twisted TCP address for a host and port from a header."""
    host, port = endpoint
    if ipaddress.ip_address(host).version == 4:
        return IPv4Address("TCP", host, port)
    return IPv6Address("TCP", host, port)


class ProxiedTransport:
    """
    The transport a protocol behind a PROXY header sees: the connection's
    own transport, except that its peer and host are the client's and the
    address it connected to, as the header gives them.

    Everything else (writing, closing, producers, C{getHandle}, TCP
    options, the socket, C{startTLS}) is the real transport's; it also
    provides the real transport's interfaces, so a check such as
    C{ISSLTransport.providedBy} answers for the connection.
    """

    def __init__(self, transport: Any, peer: IAddress, host: IAddress) -> None:
        self._transport = transport
        self._peer = peer
        self._host = host
        directlyProvides(self, providedBy(transport))

    def getPeer(self) -> IAddress:
        """The client's address, from the header."""
        return self._peer

    def getHost(self) -> IAddress:
        """The address the client connected to, from the header."""
        return self._host

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self._transport.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def startTLS(self, contextFactory: Any, *args: Any) -> None:
        """Start TLS on the connection (C{STLS}); from then on this provides L{ISSLTransport}."""
        self._transport.startTLS(contextFactory, *args)
        directlyProvides(self, providedBy(self._transport))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # Not zope's or copy's special names: this object's own only.
            raise AttributeError(name)
        return getattr(self._transport, name)


@implementer(IHandshakeListener)
class ProxyHeaderReader(Protocol):
    """
    A connection from a trusted proxy: reads its PROXY header, then builds
    the wrapped protocol with the client's address and hands it the
    connection (on a L{ProxiedTransport}) and every byte after the header.

    It stays the connection's protocol and passes on what arrives, the end
    of the connection and, after C{STLS} (whose TLS layer wraps the
    connection's protocol, this one), the end of the handshake.

    @ivar wrapped: the protocol behind the header, once built.
    """

    _log = Logger()
    transport: Any

    def __init__(self, factory: ProxyHeaderFactory, address: IAddress) -> None:
        self.factory = factory
        self.wrapped: IProtocol | None = None
        host = normalise_address(str(getattr(address, "host", "?")))
        self._peer = f"{host}:{getattr(address, 'port', '')}"
        self._parser = ProxyHeaderParser()
        self._header_call: Any = None
        self._abort_call: Any = None
        self._closing = False
        self._lost = False

    def connectionMade(self) -> None:
        self._header_call = self.factory.reactor.callLater(
            self.factory.header_timeout, self._timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._closing:
            return
        try:
            result = self._parser.feed(data)
        except ProxyHeaderError as e:
            # Its text names the PROXY header already.
            self._refuse(str(e))
            return
        if result is INCOMPLETE:
            return
        header, rest = result
        self._cancel_header_timer()
        if header.local:
            self._health_check(header)
            return
        if header.source is None or header.destination is None:
            # Not the proxy's own connection, so perhaps a real client's,
            # relayed from where the proxy cannot say: a greeting would
            # promise it a session it does not get.
            kind = "UNKNOWN" if header.version == 1 else "UNSPEC or AF_UNIX"
            self._refuse(f"a PROXY v{header.version} {kind} header names no client to serve")
            return
        self._hand_over(header.source, header.destination, rest)

    def _hand_over(self, source: Endpoint, destination: Endpoint, rest: bytes) -> None:
        peer = _address(source)
        protocol = self.factory.wrapped_factory.buildProtocol(peer)
        if protocol is None:
            self._close()
            return
        self.wrapped = protocol
        protocol.makeConnection(ProxiedTransport(self.transport, peer, _address(destination)))
        if rest and not self._lost:
            protocol.dataReceived(rest)

    def _health_check(self, header: ProxyHeader) -> None:
        """
        A C{LOCAL} header: the proxy's own connection, a health check.  It
        gets the health reply and no session: a session must not run under
        the proxy's address, which may well be one our rules trust.
        """
        self._log.debug(
            "PROXY v{version} LOCAL from {peer}: answered as a health check",
            version=header.version,
            peer=self._peer,
        )
        if self.factory.health_reply:
            self.transport.write(self.factory.health_reply)
        self._close()

    def _timed_out(self) -> None:
        self._header_call = None
        self._refuse(f"no PROXY header within {self.factory.header_timeout:g} s")

    def _refuse(self, reason: str) -> None:
        self._cancel_header_timer()
        self._log.info(
            "Closing connection from proxy {peer}: {reason}", peer=self._peer, reason=reason
        )
        self._close()

    def _close(self) -> None:
        """Close, and abort if the peer has not let the connection go after the grace."""
        self._closing = True
        if self._lost or self._abort_call is not None:
            return
        self._abort_call = self.factory.reactor.callLater(self.factory.close_grace, self._abort)
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def _cancel_header_timer(self) -> None:
        if self._header_call is not None and self._header_call.active():
            self._header_call.cancel()
        self._header_call = None

    def handshakeCompleted(self) -> None:
        """A TLS handshake after C{STLS} is done: the wrapped protocol may want to know."""
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_header_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)


class ProxyHeaderFactory(Factory[Protocol]):
    """
    Wraps a server factory for a port that trusted proxies connect to.

    @param wrapped_factory: the factory whose protocols serve the
        connections (a L{POP3ServerFactory}, or a C{TLSMemoryBIOFactory}
        around it for implicit TLS).
    @param trusted: the proxies' networks.  A connection from one of them
        must send a PROXY header (v1 or v2) within C{header_timeout}
        seconds, or it is closed; from any other address it is passed on
        untouched.  IPv4 clients of a dual-stack socket match as IPv4.
    @param reactor: the reactor for timers.
    @param header_timeout: seconds a trusted peer has to send its header.
    @param health_reply: what a health check (a version 2 C{LOCAL} header)
        is sent before the connection is closed.  Any other header that
        names no client (a v1 C{UNKNOWN}, a v2 C{UNSPEC} or C{AF_UNIX}
        address) may be a client's, so it is closed without a word and
        logged.  The wrapped protocol is built for neither, so neither is
        counted nor audited.
    @param close_grace: seconds a closed connection gets to go before it is
        aborted.
    """

    # The wrapped factory says when it starts and stops.
    noisy = False

    def __init__(
        self,
        wrapped_factory: Factory[Any],
        trusted: Sequence[IPNetwork],
        reactor: Any,
        header_timeout: float,
        health_reply: bytes = b"",
        close_grace: float = CLOSE_GRACE,
    ) -> None:
        self.wrapped_factory = wrapped_factory
        self.trusted = tuple(trusted)
        self.reactor = reactor
        self.header_timeout = header_timeout
        self.health_reply = health_reply
        self.close_grace = close_grace

    def logPrefix(self) -> str:
        return f"{self.wrapped_factory.logPrefix()} ({type(self).__name__})"

    def doStart(self) -> None:
        self.wrapped_factory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()
        super().doStop()

    def trusts(self, address: object) -> bool:
        """Whether C{address} (a connection's peer) is one of the trusted proxies."""
        host = getattr(address, "host", None)
        return isinstance(host, str) and in_networks(host, self.trusted)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if addr is not None and self.trusts(addr):
            return ProxyHeaderReader(self, addr)
        return self.wrapped_factory.buildProtocol(addr)
