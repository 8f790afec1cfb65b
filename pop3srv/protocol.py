# -*- test-case-name: tests.test_protocol -*-
"""
The Twisted glue around L{pop3srv.machine}: feeds received bytes to the
machine, performs the I/O its actions ask for (cred login, the
L{twisted.mail.pop3.IMailbox} calls, streaming), and writes the replies.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.cred import credentials, error
from twisted.cred.portal import Portal
from twisted.internet import defer, interfaces
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv import machine as m
from pop3srv.errors import Pop3Error
from pop3srv.wire import DotStuffer, TopFilter

# RFC 1939 section 3: the autologout timer must be at least 10 minutes.
MIN_IDLE_TIMEOUT = 600
CHUNK_SIZE = 64 * 1024
# Pipelined input beyond this waits in the kernel, not in our memory.
MAX_PENDING_INPUT = 64 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def peer_in_networks(peer: object, networks: Iterable[IPNetwork]) -> bool:
    """
    Whether a transport's peer address lies in one of C{networks}.  A UNIX
    socket peer is local, so it counts as inside; an unknown kind does not.
    """
    if isinstance(peer, UNIXAddress):
        return True
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class _Readable(TypingProtocol):
    def read(self, size: int = -1, /) -> bytes: ...


@implementer(credentials.IUsernameHashedPassword)
class APOPCredentials:
    """
    APOP credentials (RFC 1939 section 7): the MD5 digest of the greeting's
    timestamp followed by the password.  Twisted's own class compares a str
    digest with bytes, so it never matches on Python 3.
    """

    def __init__(self, challenge: bytes, username: bytes, digest: str) -> None:
        self.challenge = challenge
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, password: bytes) -> bool:
        expected = hashlib.md5(self.challenge + password).hexdigest()
        return hmac.compare_digest(expected, self.digest)


def escape_for_log(text: str) -> str:
    """Make client-supplied text safe for a single log line."""
    return text.encode("unicode_escape").decode("ascii")[:300]


@implementer(interfaces.IPushProducer)
class _MessageStreamer:
    """
    Streams one message to the transport as a push producer, so at most a
    chunk or two sits in memory however big the message is.
    """

    def __init__(
        self,
        transport: Any,
        source: _Readable,
        top_lines: int | None,
        call_later: Callable[..., Any],
    ) -> None:
        self._transport = transport
        self._source = source
        self._top = TopFilter(top_lines) if top_lines is not None else None
        self._encoder = DotStuffer()
        self._call_later = call_later
        self._paused = False
        self._stopped = False
        self._scheduled = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        self._transport.registerProducer(self, True)
        self._schedule()
        return self.done

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._call_later(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        try:
            while not self._paused and not self._stopped:
                data = self._source.read(CHUNK_SIZE)
                if self._top is not None:
                    data = self._top.feed(data) if data else b""
                    finished = self._top.done or not data
                else:
                    finished = not data
                out = self._encoder.feed(data)
                if finished:
                    self._transport.write(out + self._encoder.finish())
                    self._finish(None)
                    return
                if out:
                    self._transport.write(out)
        except Exception:
            self._finish(Failure())

    def _finish(self, result: Failure | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
        self._transport.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._stopped:
            self._schedule()

    def stopProducing(self) -> None:
        self._finish(Failure(ConnectionLost("connection lost while streaming")))


class POP3Server(Protocol):
    """One POP3 connection."""

    _log = Logger()

    def __init__(self, factory: POP3ServerFactory) -> None:
        self.factory = factory
        self.machine: m.Pop3Machine | None = None
        self.mailbox: Any = None
        self._logout: Callable[[], None] | None = None
        self._busy = False
        self._running = False
        self._input_paused = False
        self._idle_call: Any = None
        self._peer = "?"
        self._apop_challenge: str | None = None

    # --- connection lifecycle

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self._set_nodelay()
        if self.factory.apop_available():
            self._apop_challenge = (
                f"<{os.getpid()}.{self.factory.next_session_id()}@{socket.gethostname()}>"
            )
        self.machine = m.Pop3Machine(self._capabilities())
        self.transport.write(self.machine.greeting())
        self._reset_idle_timer()

    def _capabilities(self, tls_active: bool | None = None) -> m.Capabilities:
        if tls_active is None:
            tls_active = ISSLTransport.providedBy(self.transport)
        return self.factory.capabilities(self._apop_challenge, tls_active, self.transport.getPeer())

    def _set_nodelay(self) -> None:
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        assert self.machine is not None
        self._reset_idle_timer()
        self.machine.receive_data(data)
        if self.machine.buffered > MAX_PENDING_INPUT and not self._input_paused:
            self._input_paused = True
            self.transport.pauseProducing()
        self._run()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self.machine is not None:
            self.machine.connection_lost()
        # A dropped connection commits nothing: the mailbox is released as is.
        self._release_mailbox()

    def _release_mailbox(self) -> None:
        logout, self._logout, self.mailbox = self._logout, None, None
        if logout is not None:
            try:
                logout()
            except Exception:
                self._log.failure("Releasing the mailbox of {peer} failed", peer=self._peer)

    def _reset_idle_timer(self) -> None:
        timeout = self.factory.idle_timeout
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.reactor.callLater(timeout, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._idle_call = None
        self._log.info("Session of {peer} timed out", peer=self._peer)
        self.transport.write(b"-ERR Autologout; idle for too long.\r\n")
        self.transport.loseConnection()

    # --- running actions

    def _run(self) -> None:
        """Take actions from the machine until it needs data or I/O is pending."""
        if self._running or self.machine is None:
            return
        self._running = True
        try:
            while not self._busy:
                action = self.machine.next_action()
                if action is m.NEED_DATA:
                    break
                assert not isinstance(action, m._NeedData)
                result = self._perform(action)
                if result is not None:
                    self._busy = True
                    result.addBoth(self._action_done)
        finally:
            self._running = False
        if self._input_paused and self.machine.buffered <= MAX_PENDING_INPUT // 2:
            self._input_paused = False
            self.transport.resumeProducing()

    def _action_done(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self._log.failure("Unexpected error in session of {peer}", result, peer=self._peer)
            self.transport.write(b"-ERR [SYS/TEMP] Internal error.\r\n")
            self.transport.loseConnection()
            return
        if self.machine is not None and self.machine.state is not m.State.CLOSED:
            self._run()

    def _perform(self, action: m.Action) -> defer.Deferred[None] | None:
        if isinstance(action, m.Reply):
            self.transport.write(action.data)
        elif isinstance(action, m.Close):
            self.transport.write(action.reply)
            self.transport.loseConnection()
        elif isinstance(action, m.Authenticate):
            return self._authenticate(action)
        elif isinstance(action, m.SendMessage):
            return self._send_message(action)
        elif isinstance(action, m.MarkDeleted):
            self.mailbox.deleteMessage(action.index)
            self.transport.write(action.reply)
        elif isinstance(action, m.UnmarkDeleted):
            self.mailbox.undeleteMessages()
            self.transport.write(action.reply)
        elif isinstance(action, m.Commit):
            return self._commit()
        elif isinstance(action, m.StartTLS):
            self.transport.write(action.reply)
            self.transport.startTLS(self.factory.tls)
            assert self.machine is not None
            self.machine.tls_started(self._capabilities(tls_active=True))
            self._log.debug("STLS started for {peer}", peer=self._peer)
        return None

    # --- authentication

    def _authenticate(self, action: m.Authenticate) -> defer.Deferred[None]:
        creds: credentials.ICredentials
        if action.apop_digest is not None:
            challenge = self.machine.capabilities.apop_challenge if self.machine else None
            creds = APOPCredentials(
                (challenge or "").encode(),
                action.username.encode("utf-8"),
                action.apop_digest,
            )
        else:
            assert action.password is not None
            creds = credentials.UsernamePassword(
                action.username.encode("utf-8"), action.password.encode("utf-8")
            )
        d = self.factory.portal.login(creds, None, IMailbox)
        d.addCallback(self._logged_in, action.username)
        d.addErrback(self._login_failed, action.username)
        return d

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]], username: str) -> Any:
        _, mailbox, logout = result
        if self.machine is None or self.machine.state is m.State.CLOSED:
            logout()
            return None
        self.mailbox, self._logout = mailbox, logout
        d = defer.maybeDeferred(mailbox.listMessages)
        d.addCallback(self._entered_transaction, username)
        return d

    def _entered_transaction(self, sizes: Sequence[int], username: str) -> None:
        assert self.machine is not None
        self._log.info(
            "Login succeeded for {user} from {peer}",
            user=escape_for_log(username),
            peer=self._peer,
        )
        if self.machine.state is m.State.CLOSED:
            self._release_mailbox()
            return
        self.transport.write(self.machine.login_succeeded(username, sizes, self.mailbox.getUidl))

    def _login_failed(self, failure: Failure, username: str) -> None:
        self._release_mailbox()
        if self.machine is None or self.machine.state is m.State.CLOSED:
            return
        if failure.check(error.UnauthorizedLogin, error.UnhandledCredentials):
            self._log.info(
                "Login failed for {user} from {peer}: bad credentials",
                user=escape_for_log(username),
                peer=self._peer,
            )
            self.transport.write(self.machine.login_failed("AUTH"))
            return
        if failure.check(Pop3Error):
            exc = failure.value
            assert isinstance(exc, Pop3Error)
            self._log.info(
                "Login of {user} from {peer} refused: {detail}",
                user=escape_for_log(username),
                peer=self._peer,
                detail=exc.detail or exc.text,
            )
            self.transport.write(self.machine.login_failed(exc.code or "SYS/TEMP", exc.text))
            return
        self._log.failure(
            "Login of {user} from {peer} failed",
            failure,
            user=escape_for_log(username),
            peer=self._peer,
        )
        self.transport.write(
            self.machine.login_failed("SYS/TEMP", "Temporary failure, try again later.")
        )

    # --- transaction

    def _send_message(self, action: m.SendMessage) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.mailbox.getMessage, action.index)

        def stream(source: _Readable) -> defer.Deferred[None]:
            self.transport.write(action.status)
            streamer = _MessageStreamer(
                self.transport, source, action.top_lines, self.factory.reactor.callLater
            )
            return streamer.start()

        def unreadable(failure: Failure) -> None:
            failure.trap(IndexError, ValueError, OSError, Pop3Error)
            self._log.failure(
                "Reading message {index} for {peer} failed",
                failure,
                index=action.index,
                peer=self._peer,
            )
            self.transport.write(b"-ERR [SYS/TEMP] Cannot read that message now.\r\n")

        d.addCallbacks(stream, unreadable)
        return d

    def _commit(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.mailbox.sync)

        def committed(_: object) -> None:
            assert self.machine is not None
            self.transport.write(self.machine.commit_succeeded())

        def failed(failure: Failure) -> None:
            assert self.machine is not None
            if failure.check(Pop3Error):
                exc = failure.value
                assert isinstance(exc, Pop3Error)
                self._log.error(
                    "Commit for {peer} failed: {detail}",
                    peer=self._peer,
                    detail=exc.detail or exc.text,
                )
                self.transport.write(self.machine.commit_failed(exc.code or "SYS/TEMP", exc.text))
            else:
                self._log.failure("Commit for {peer} failed", failure, peer=self._peer)
                self.transport.write(
                    self.machine.commit_failed("SYS/TEMP", "Could not commit deletions.")
                )

        def close(_: object) -> None:
            self._release_mailbox()
            self.transport.loseConnection()

        d.addCallbacks(committed, failed)
        d.addBoth(close)
        return d


class POP3ServerFactory(Factory):
    """
    Builds L{POP3Server} connections that log in through C{portal}.

    @param portal: a L{Portal} whose realm gives
        L{twisted.mail.pop3.IMailbox} avatars.
    @param idle_timeout: seconds of client silence before autologout.
    @param reactor: the reactor for timers; the global one if C{None}.
    @param tls: the certificate source for STLS; C{None} offers no STLS.
    @param plaintext_auth_networks: peers allowed to log in with USER/PASS
        without TLS (loopback by default).
    """

    protocol = POP3Server  # type: ignore[assignment]

    def __init__(
        self,
        portal: Portal,
        idle_timeout: float = MIN_IDLE_TIMEOUT,
        reactor: Any = None,
        implementation: str = "pop3srv",
        tls: Any = None,
        plaintext_auth_networks: Iterable[IPNetwork] = LOOPBACK_NETWORKS,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.portal = portal
        self.idle_timeout = idle_timeout
        self.reactor = reactor
        self.implementation = implementation
        self.tls = tls
        self.plaintext_auth_networks = tuple(plaintext_auth_networks)
        self._session_counter = 0

    def buildProtocol(self, addr: Any) -> POP3Server:
        return POP3Server(self)

    def next_session_id(self) -> int:
        """A number unique to this factory, for APOP timestamps."""
        self._session_counter += 1
        return self._session_counter

    def apop_available(self) -> bool:
        """Whether some checker can verify an APOP digest."""
        return credentials.IUsernameHashedPassword in self.portal.listCredentialsInterfaces()

    def capabilities(
        self, apop_challenge: str | None, tls_active: bool, peer: object
    ) -> m.Capabilities:
        """The capabilities a session offers, given its encryption and peer."""
        return m.Capabilities(
            implementation=self.implementation,
            apop_challenge=apop_challenge,
            plaintext_auth=tls_active or peer_in_networks(peer, self.plaintext_auth_networks),
            stls=self.tls is not None and not tls_active,
            tls_active=tls_active,
        )
