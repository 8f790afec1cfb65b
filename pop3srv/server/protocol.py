# -*- test-case-name: tests.test_protocol -*-
"""
The Twisted glue around L{pop3srv.core.machine}: feeds received bytes to the
machine, performs the I/O its actions ask for (a login through the
L{pop3srv.server.login.LoginService}, the L{twisted.mail.pop3.IMailbox}
calls, streaming), and writes the replies.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.cred import credentials
from twisted.cred.portal import Portal
from twisted.internet import defer, interfaces
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorThreads, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.auth.credentials import APOPCredentials, PasswordCredentials, credentials_for
from pop3srv.core import machine as m
from pop3srv.core import sasl, scram
from pop3srv.core.errors import Pop3Error
from pop3srv.core.wire import DotStuffer, TopFilter
from pop3srv.server.audit import audit
from pop3srv.server.authority import log_fault
from pop3srv.server.limits import IPNetwork, in_networks, normalise_address
from pop3srv.server.login import (
    LoginFault,
    LoginOutcome,
    LoginService,
    LoginSucceeded,
    Peer,
    ServerPolicy,
    escape_for_log,
)
from pop3srv.server.sessions import (
    SessionFigures,
    SessionInfo,
    SessionTable,
    UidlHash,
    log_summary,
    tls_description,
)
from pop3srv.server.tls import bindings_from_tls_connection

# Kept importable from here, where they used to live.
__all__ = [
    "APOPCredentials",
    "POP3Server",
    "POP3ServerFactory",
    "ServerPolicy",
    "escape_for_log",
    "peer_in_networks",
]

# RFC 1939 section 3: the autologout timer must be at least 10 minutes.
MIN_IDLE_TIMEOUT = 600
CHUNK_SIZE = 64 * 1024
# Pipelined input beyond this waits in the kernel, not in our memory.
MAX_PENDING_INPUT = 64 * 1024
# After a timeout the peer has had its chance: what is still buffered for it
# gets this long to go out before the connection is cut.
CLOSE_GRACE = 5.0
# A handshake takes a round trip or two; a peer that has not finished in
# this time is not going to.
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 30.0
# As long as RFC 1939's autologout: a client that takes none of its replies
# for that long is as gone as a silent one.
DEFAULT_WRITE_STALL_TIMEOUT = float(MIN_IDLE_TIMEOUT)
# TCP keepalive for peers that vanish without a FIN (a laptop closed, a NAT
# entry dropped): first probe after 60 s of silence, then every 10 s, and the
# kernel drops the connection after 6 unanswered probes.
KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))
# The UIDL hash of a session's end looks up what no listing asked for, at
# about a microsecond and a half a message for an mbox: up to this many
# messages that is a millisecond or two, less than a thread hand-over's
# bother; beyond it, a thread does it (see POP3Server._finish_uidl_hash).
UIDL_HASH_INLINE_MAX = 1000

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
    return isinstance(host, str) and in_networks(host, networks)


def _client_label(peer: object, host: str) -> str:
    """
    A client's address for the session table and summary: C{host:port},
    C{[host]:port} for IPv6, the host alone where there is no port.
    """
    port = getattr(peer, "port", None)
    if not isinstance(port, int):
        return host
    if isinstance(peer, IPv6Address) and ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _ignore_octets(octets: int) -> None:
    """What a TOP response's octets count for: nothing."""


def _socket_of(transport: Any) -> socket.socket | None:
    """
    The TCP socket under a transport, if there is one: C{tcp.Connection}
    keeps it as C{socket} (a C{startTLS} does not change that), and a
    L{TLSMemoryBIOProtocol} passes attribute look-ups to its transport.
    """
    sock = getattr(transport, "socket", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        return sock
    return None


class _Readable(TypingProtocol):
    def read(self, size: int = -1, /) -> bytes: ...


#: Runs a function in a thread: fires with its result.
DeferToThread = Callable[[Callable[[], Any]], defer.Deferred[Any]]


def reactor_threads(reactor: Any) -> DeferToThread:
    """
    Run functions in C{reactor}'s thread pool (taken when first needed:
    a server forks its workers after building its factory), or at once in
    this thread for a reactor without threads (the fake clocks of unit
    tests).
    """
    if not IReactorThreads.providedBy(reactor):
        return defer.maybeDeferred

    def run(f: Callable[[], Any]) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    return run


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
        on_progress: Callable[[], None] = lambda: None,
        on_pause: Callable[[], None] = lambda: None,
        on_sent: Callable[[int], None] = lambda octets: None,
    ) -> None:
        self._on_progress = on_progress
        self._on_pause = on_pause
        self._on_sent = on_sent
        self._transport = transport
        self._source = source
        self._top = TopFilter(top_lines) if top_lines is not None else None
        self._encoder = DotStuffer()
        self._call_later = call_later
        self._paused = False
        self._stopped = False
        self._scheduled = False
        self._pending: list[bytes] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def send_if_small(self) -> bool:
        """
        Send the whole message now if it fits in one chunk.

        Most mail is small, and for it the producer hand-over, the Deferred
        and the idle-timer reset of L{start} cost more than the copying.  If
        the message is bigger, what was read is kept for L{start}.

        @return: whether the message was sent (and the source closed).
        """
        try:
            first = self._source.read(CHUNK_SIZE)
            rest = self._source.read(CHUNK_SIZE) if first else b""
            if rest:
                self._pending = [first, rest]
                return False
            # The whole message: the last chunk, whatever TOP says.
            out, _ = self._encode(first)
            self._write_last(out)
        except BaseException:
            self._close_source()
            raise
        self._stopped = True
        self._close_source()
        return True

    def _close_source(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def _read(self) -> bytes:
        return self._pending.pop(0) if self._pending else self._source.read(CHUNK_SIZE)

    def _encode(self, data: bytes) -> tuple[bytes, bool]:
        """
        Encode one chunk read from the source.

        @return: the bytes to send, and whether nothing more is wanted
            (the source ended, or TOP has its lines).
        """
        if self._top is not None:
            data = self._top.feed(data) if data else b""
            finished = self._top.done or not data
        else:
            finished = not data
        return self._encoder.feed(data), finished

    def _write(self, out: bytes) -> None:
        self._transport.write(out)
        self._on_sent(len(out))

    def _write_last(self, out: bytes) -> None:
        # Two writes, not a concatenation: the transport joins its buffer
        # once anyway, so a whole message is not copied twice.
        if out:
            self._write(out)
        self._write(self._encoder.finish())

    def start(self) -> defer.Deferred[None]:
        self._transport.registerProducer(self, True)
        # Start at once: a small message is then sent in the same reactor
        # turn as its status line; a large one stops when the transport
        # pauses us.
        self._pump()
        return self.done

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._call_later(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        if self._stopped:
            # Scheduled before the connection was lost: nothing to send, and
            # no timer to start for a connection that is gone.
            return
        # A slow reader is not an idle client: sending counts as activity.
        self._on_progress()
        try:
            while not self._paused and not self._stopped:
                out, finished = self._encode(self._read())
                if finished:
                    self._write_last(out)
                    self._finish(None)
                    return
                if out:
                    self._write(out)
        except Exception:
            self._finish(Failure())

    def _finish(self, result: Failure | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._close_source()
        self._transport.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def pauseProducing(self) -> None:
        self._paused = True
        self._on_pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._stopped:
            self._schedule()

    def stopProducing(self) -> None:
        self._finish(Failure(ConnectionLost("connection lost while streaming")))


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class POP3Server(Protocol):
    """
    One POP3 connection.

    It is the push producer of its own replies: when the transport's buffer
    is full (a client that pipelines commands but does not read), it stops
    taking commands until the buffer drains, so replies cannot pile up in
    memory.  While a message streams, the streamer is the producer instead.

    Every way it ends a connection goes through L{_close}, which cuts the
    connection if the peer has not taken the last output after a grace
    period: a timeout must free the connection's slot even from a peer that
    never reads and never finishes a TLS handshake.

    Once admitted (greeted), a connection is a session: it is in the
    factory's L{SessionTable} until it ends, and then logs one summary line
    (L{pop3srv.server.sessions}) whose C{end} says how it ended:
      - C{quit}: the client said C{QUIT} (and the commit, if any, succeeded);
      - C{quit-commit-failed}: it said C{QUIT} and the commit failed;
      - C{dropped}: the client closed the connection, or it broke;
      - C{idle-timeout}, C{auth-timeout}, C{tls-handshake-timeout},
        C{write-stall}, C{bad-commands}: the server closed it for that
        reason (the names of the audit log's C{limit-hit} reasons);
      - C{error}: a server fault ended it (a message that could not be read
        mid-response, an unexpected error);
      - C{shutdown}: the server stopped listening (it is stopping) and the
        connection ended without any of the above.
    A session that is committing when the connection goes waits for the
    commit before it is summarised (the client said C{QUIT}); one whose
    UIDL hash is being finished in a thread (a large maildrop) waits for
    that.  A connection the authority has not admitted yet when a timeout
    ends it is not a session: it is audited, and logs no summary.
    """

    _log = Logger()
    # A TCP, UNIX or TLS transport: ITransport plus the producer, TLS and
    # TCP-option methods, which no single interface describes.
    transport: Any

    def __init__(self, factory: POP3ServerFactory) -> None:
        self.factory = factory
        self.machine: m.Pop3Machine | None = None
        self._session: LoginSucceeded | None = None
        self._busy = False
        self._running = False
        self._input_paused = False
        self._output_paused = False
        self._producing = False
        self._idle_call: Any = None
        self._auth_deadline: Any = None
        self._handshake_call: Any = None
        self._stall_call: Any = None
        self._abort_call: Any = None
        self._lost = False
        self._peer = "?"
        self._host = "?"
        self._session_id = "-"
        self._counted = False
        self._admitting = False
        self._admission_abandoned = False
        self._early_input: list[bytes] = []
        self._early_size = 0
        self._login_peer: Peer | None = None
        self._apop_challenge: str | None = None
        # The session's summary: set once it is admitted.
        self._figures: SessionFigures | None = None
        self._listener = "pop3"
        self._client = "?"
        self._connected_at = 0.0
        self._tls: tuple[str, str] | None = None
        # The machine state the session table shows.
        self._state_seen: m.State | None = None
        # A login the outcome of which is in but that the machine has not
        # finished (a SASL exchange's last step): user, method, sizes.
        self._login_pending: tuple[str, str, Sequence[int]] | None = None
        self._login_method = "-"
        self._uidls: UidlHash | None = None
        # How many messages the maildrop had at login: what the UIDL hash
        # may still have to look up.
        self._uidl_messages = 0
        # The UIDL hash is being finished off the reactor thread.
        self._hashing = False
        self._committing = False

    @property
    def mailbox(self) -> Any:
        """The logged-in session's L{IMailbox}, or L{None}."""
        return self._session.mailbox if self._session is not None else None

    # --- connection lifecycle

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        # An IPv4 client of a dual-stack socket (systemd's BindIPv6Only=both)
        # is logged, counted and matched by its IPv4 address.
        self._host = normalise_address(str(getattr(peer, "host", "local")))
        self._peer = f"{self._host}:{getattr(peer, 'port', '')}"
        self._session_id = self.factory.next_session_tag()
        self._connected_at = self.factory.reactor.seconds()
        self._client = _client_label(peer, self._host)
        policy = self.factory.policy
        if ISSLTransport.providedBy(self.transport):
            self._listener = "pop3s"
            # Implicit TLS: our first line waits for a handshake that a
            # silent peer never starts.
            self._handshake_call = self.factory.reactor.callLater(
                self.factory.tls_handshake_timeout, self._handshake_timed_out
            )
        if isinstance(peer, UNIXAddress):
            self._host = self._client = "local"
        elif not policy.access.permits(self._host):
            self._audit("connection-refused", "ip-rules")
            self.transport.write(b"-ERR [SYS/PERM] Access denied.\r\n")
            self._close(self.factory.close_grace)
            return
        # The login deadline runs from the connect: it also ends a wait for
        # an authority that does not answer.
        self._auth_deadline = self.factory.reactor.callLater(
            policy.auth_timeout, self._auth_timed_out
        )
        # The greeting waits for the authority's count (in another process
        # with --workers); what the client sends meanwhile is kept.
        self._admitting = True
        asked = self.factory.login.authority.open_connection(self._host)
        asked.addCallbacks(self._admitted, self._admission_failed)

    def _admitted(self, breach: str | None) -> None:
        """The authority answered the connection's count: greet, or refuse."""
        self._admitting = False
        if self._admission_abandoned:
            # Closed already (it waited too long); a count that came late
            # goes back.
            if breach is None:
                self.factory.login.authority.close_connection(self._host)
            return
        if breach is not None:
            self._audit("limit-hit", breach)
            if not self._lost:
                self.transport.write(b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")
                self._close(self.factory.close_grace)
            return
        if self._lost:
            # Gone while it waited: the count it was just given goes back.
            self.factory.login.authority.close_connection(self._host)
            return
        self._counted = True
        self._greet()

    def _admission_failed(self, failure: Failure) -> None:
        """The authority could not count the connection: a server fault."""
        self._admitting = False
        if self._admission_abandoned:
            log_fault(
                self._log, failure, "Counting the connection of {peer} failed late", peer=self._peer
            )
            return
        log_fault(self._log, failure, "Counting the connection of {peer} failed", peer=self._peer)
        self._audit("connection-refused", "error")
        if not self._lost:
            self.transport.write(b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n")
            self._close(self.factory.close_grace)

    def _greet(self) -> None:
        """Start the session of an admitted connection, and take what it sent so far."""
        self._login_peer = Peer(self._host, self._session_id, self._peer)
        self._figures = SessionFigures(
            session=self._session_id,
            client=self._client,
            listener=self._listener,
            started=self._connected_at,
            tls=self._tls,
        )
        self._state_seen = m.State.AUTHORIZATION
        self.factory.sessions.add(
            SessionInfo(
                id=self._session_id,
                user=None,
                client=self._client,
                listener=self._listener,
                tls=" ".join(self._tls) if self._tls is not None else None,
                since=self._connected_at,
                state="authorization",
                pid=os.getpid(),
            )
        )
        self._set_socket_options()
        self.transport.registerProducer(self, True)
        self._producing = True
        if self.factory.login.apop_available():
            self._apop_challenge = (
                f"<{os.getpid()}.{self.factory.next_session_id()}@{socket.gethostname()}>"
            )
        self.machine = m.Pop3Machine(self._capabilities(), start_sasl=self._start_sasl)
        self.transport.write(self.machine.greeting())
        self._reset_idle_timer()
        early, self._early_input, self._early_size = self._early_input, [], 0
        if early:
            self.dataReceived(b"".join(early))

    def _audit(self, event: str, reason: str, user: str | None = None) -> None:
        audit(event, session=self._session_id, peer=self._host, reason=reason, user=user)

    def _abandon_admission(self) -> bool:
        """
        A timeout ends a connection the authority has not counted yet: it
        is never greeted, never a session, and the count the authority
        gives it later goes back (see L{_admitted}).

        @return: whether the admission was pending (and is now abandoned).
        """
        if not self._admitting:
            return False
        self._admitting = False
        self._admission_abandoned = True
        return True

    def _auth_timed_out(self) -> None:
        self._auth_deadline = None
        self._audit("limit-hit", "auth-timeout")
        if self._abandon_admission():
            # Never greeted: the authority did not answer in time.
            self.transport.write(b"-ERR [SYS/TEMP] Server busy, try again later.\r\n")
            self._close(self.factory.close_grace)
            return
        self._ending("auth-timeout")
        self._close_with(b"-ERR Login timeout; closing.\r\n", self.factory.close_grace)

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        self._audit("limit-hit", "tls-handshake-timeout")
        # The handshake of implicit TLS runs while the authority counts the
        # connection: if that count is still to come, the connection ends
        # unadmitted (audited above) rather than greeted on its way out.
        self._abandon_admission()
        self._ending("tls-handshake-timeout")
        self._close_with(b"", self.factory.close_grace)

    def handshakeCompleted(self) -> None:
        """The TLS handshake (implicit TLS or after C{STLS}) is done."""
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        handle = getattr(self.transport, "getHandle", None)
        self._tls = tls_description(handle() if handle is not None else None)
        if self._figures is not None and not self._lost:
            self._figures.tls = self._tls
            self.factory.sessions.update(self._session_id, tls=" ".join(self._tls))

    # --- the session's table entry and summary

    def _ending(self, reason: str) -> None:
        """Say how the session ends, unless that is said already."""
        if self._figures is not None and self._figures.end is None:
            self._figures.end = reason

    def _note_state(self) -> None:
        """
        Bring the session table up to the machine's state, and note a login
        the moment the machine completes it (for SASL, that can be a step
        after the login service's answer).
        """
        machine = self.machine
        if machine is None or machine.state is self._state_seen or self._figures is None:
            return
        state = self._state_seen = machine.state
        if state is m.State.TRANSACTION and self._login_pending is not None:
            username, method, sizes = self._login_pending
            self._login_pending = None
            figures = self._figures
            figures.user = username
            figures.method = method
            figures.messages = len(sizes)
            figures.octets = sum(sizes)
            self.factory.sessions.update(self._session_id, user=username, state="transaction")
        elif state is m.State.UPDATE:
            self.factory.sessions.update(self._session_id, state="update")

    def _end_session(self) -> None:
        """
        Leave the session table and log the summary, once: when the
        connection is gone and neither a commit nor the UIDL hash is in
        progress.
        """
        figures = self._figures
        if figures is None or self._committing or self._hashing:
            return
        self._figures = None
        self.factory.sessions.remove(self._session_id)
        if figures.user is not None and self.machine is not None:
            figures.dele = self.machine.deletions
        if figures.end is None:
            figures.end = "shutdown" if self.factory.shutting_down else "dropped"
        log_summary(figures, self.factory.reactor.seconds())

    def _close_with(self, line: bytes, grace: float) -> None:
        """
        Stop taking commands, send C{line} (if any, and only between
        replies: not while a message streams) and L{_close}.
        """
        if self.machine is not None:
            self.machine.connection_lost()
        if line and self._abort_call is None and self._producing:
            self.transport.write(line)
        self._close(grace)

    def _close(self, grace: float) -> None:
        """
        End the connection: after the pending output, and for certain.

        C{loseConnection} waits until the peer has taken everything
        buffered, which a peer that does not read, or that never finishes a
        TLS handshake, never does; so if the connection is still open
        C{grace} seconds later it is aborted.  The producer role is given up
        first: a transport (TLS in particular) waits for its producer to
        unregister before it closes.
        """
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        if self._lost:
            return
        reactor = self.factory.reactor
        if self._abort_call is None:
            self._abort_call = reactor.callLater(grace, self._abort)
        elif self._abort_call.getTime() > reactor.seconds() + grace:
            # A timeout while closing: the shorter grace wins.
            self._abort_call.reset(grace)
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        self._log.info("{peer} did not take its last output in time; aborting", peer=self._peer)
        self.transport.abortConnection()

    def _capabilities(self, tls_active: bool | None = None) -> m.Capabilities:
        if tls_active is None:
            tls_active = ISSLTransport.providedBy(self.transport)
        return self.factory.capabilities(self._apop_challenge, tls_active, self.transport.getPeer())

    def _set_socket_options(self) -> None:
        """No Nagle delay for replies, and TCP keepalive (see L{KEEPALIVE_OPTIONS})."""
        for name in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(self.transport, name, None)
            if setter is not None:
                try:
                    setter(True)
                except OSError:
                    pass
        sock = _socket_of(self.transport)
        if sock is None:
            return
        for option, value in KEEPALIVE_OPTIONS:
            # Linux names; other systems may lack some and keep their defaults.
            number = getattr(socket, option, None)
            if number is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, number, value)
                except OSError:
                    pass

    def dataReceived(self, data: bytes) -> None:
        if self._admitting:
            # Pipelined before the greeting: kept for the machine, within
            # the same bound as input the machine has not taken.
            self._early_input.append(data)
            self._early_size += len(data)
            if self._early_size > MAX_PENDING_INPUT and not self._input_paused:
                self._input_paused = True
                self.transport.pauseProducing()
            return
        if self.machine is None or self.machine.state is m.State.CLOSED:
            return
        self._reset_idle_timer()
        self.machine.receive_data(data)
        if self.machine.buffered > MAX_PENDING_INPUT and not self._input_paused:
            self._input_paused = True
            self.transport.pauseProducing()
        self._run()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        timers = (
            self._idle_call,
            self._auth_deadline,
            self._handshake_call,
            self._stall_call,
            self._abort_call,
        )
        for call in timers:
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._auth_deadline = self._handshake_call = None
        self._stall_call = self._abort_call = None
        if self._counted:
            self._counted = False
            self.factory.login.authority.close_connection(self._host)
        if self.machine is not None:
            self.machine.connection_lost()
        if self._committing:
            # The commit releases the mailbox and ends the session when it
            # is done: until its deletions are in, the mailbox stays open.
            return
        # A dropped connection commits nothing: the mailbox is released as is.
        self._release_mailbox().addCallback(lambda _: self._end_session())

    def _release_mailbox(self) -> defer.Deferred[None]:
        """
        Log out and end the session count, if logged in: once the UIDL hash
        is finished (L{_finish_uidl_hash}), which needs the mailbox.

        @return: fires when that is done; never fails.
        """
        self._login_pending = None
        session, self._session = self._session, None
        hashed = self._finish_uidl_hash()
        if session is None:
            return hashed

        def release(_: object) -> None:
            session.release()

        def failed(failure: Failure) -> None:
            self._log.failure("Releasing the maildrop of {peer} failed", failure, peer=self._peer)

        return hashed.addCallback(release).addErrback(failed)

    def _finish_uidl_hash(self) -> defer.Deferred[None]:
        """
        Finish the UIDL hash of a logged-in session, while the mailbox is
        still as it was at login, and put it in the session's figures.

        What no UIDL listing asked for is looked up now, one C{getUidl} a
        message.  For a large maildrop that is too long to keep the reactor
        from every other session, so it runs in a thread (the lookups read
        the mailbox's index in memory, and nothing changes the mailbox
        until the returned L{Deferred} fires: a commit's deletions and the
        release wait for it, and L{_end_session} waits through
        C{_hashing}).  A server that is stopping does it at once instead:
        its thread pool stops with the reactor, and the summary must not be
        lost.

        @return: fires when the hash is in the figures; never fails.
        """
        uidls, self._uidls = self._uidls, None
        if uidls is None:
            return defer.succeed(None)
        factory = self.factory
        if self._uidl_messages <= factory.uidl_hash_inline_max or factory.shutting_down:
            self._note_uidl_hash(uidls.hexdigest())
            return defer.succeed(None)
        self._hashing = True

        def hashed(digest: str) -> None:
            self._hashing = False
            self._note_uidl_hash(digest)

        def failed(failure: Failure) -> None:
            # hexdigest answers "?" for a lookup that fails; this is the
            # thread hand-over itself failing.
            self._hashing = False
            self._log.failure("Hashing the UIDLs of {peer} failed", failure, peer=self._peer)
            self._note_uidl_hash("?")

        d: defer.Deferred[None] = factory.defer_to_thread(uidls.hexdigest).addCallbacks(
            hashed, failed
        )
        # A server that stops meanwhile waits for it, as for a commit: the
        # summary and the release come after it.
        factory.commits.add(d)

        def finished(result: None) -> None:
            factory.commits.discard(d)

        d.addBoth(finished)
        return d

    def _note_uidl_hash(self, digest: str) -> None:
        """Put the UIDL hash in the figures of a session that logged in."""
        if self._figures is not None and self._figures.user is not None:
            self._figures.uidl_hash = digest

    def _reset_idle_timer(self) -> None:
        if self._lost:
            return
        timeout = self.factory.idle_timeout
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.reactor.callLater(timeout, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._idle_call = None
        if self._stall_call is not None:
            # Our output is blocked as well: the peer is not reading, which
            # is the write-stall timeout's case (and its audit), whichever
            # of the two timers happens to fire first.
            self._stall_call.cancel()
            self._write_stalled()
            return
        self._log.info("Session of {peer} timed out", peer=self._peer)
        self._ending("idle-timeout")
        if self._abort_call is None and self._producing:
            # Only between replies: while a message streams (the streamer
            # is the producer) a line would land inside the message.
            self.transport.write(b"-ERR Autologout; idle for too long.\r\n")
        self._close(self.factory.close_grace)

    def _output_blocked(self) -> None:
        """The transport's buffer is full: start the write-stall timer."""
        if self._stall_call is None and not self._lost:
            self._stall_call = self.factory.reactor.callLater(
                self.factory.write_stall_timeout, self._write_stalled
            )

    def _output_moved(self) -> None:
        """The transport took output: the write is not stalled."""
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None

    def _stream_progress(self) -> None:
        self._output_moved()
        self._reset_idle_timer()

    def _write_stalled(self) -> None:
        self._stall_call = None
        self._audit("limit-hit", "write-stall")
        self._ending("write-stall")
        # Nothing more is written: the peer is not taking what is there.
        self._close_with(b"", self.factory.close_grace)

    # --- running actions

    def _run(self) -> None:
        """Take actions from the machine until it needs data or I/O is pending."""
        if self._running or self.machine is None:
            return
        self._running = True
        try:
            while not self._busy and not self._output_paused:
                if self.machine.bad_commands >= self.factory.policy.max_bad_commands:
                    self._audit("limit-hit", "bad-commands", self.machine.username)
                    self._ending("bad-commands")
                    self._close_with(
                        b"-ERR Too many bad commands; closing.\r\n",
                        self.factory.write_stall_timeout,
                    )
                    break
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

    def _disconnect(self) -> None:
        """
        Close after the pending replies, at an end the client asked for or
        caused: it gets as long as a stalled write would to take them.
        """
        self._close(self.factory.write_stall_timeout)

    def pauseProducing(self) -> None:
        self._output_paused = True
        self._output_blocked()

    def resumeProducing(self) -> None:
        self._output_paused = False
        self._output_moved()
        if not self._busy:
            self._run()

    def stopProducing(self) -> None:
        self._output_paused = True

    def _action_done(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self._log.failure("Unexpected error in session of {peer}", result, peer=self._peer)
            self._ending("error")
            self.transport.write(b"-ERR [SYS/TEMP] Internal error.\r\n")
            self._disconnect()
            return
        if self.machine is not None and self.machine.state is not m.State.CLOSED:
            self._run()

    def _perform(self, action: m.Action) -> defer.Deferred[None] | None:
        result = self._perform_action(action)
        self._note_state()
        return result

    def _perform_action(self, action: m.Action) -> defer.Deferred[None] | None:
        if isinstance(action, m.Reply):
            self.transport.write(action.data)
        elif isinstance(action, m.Close):
            self._ending("quit")
            self.transport.write(action.reply)
            self._disconnect()
        elif isinstance(action, m.Authenticate):
            return self._authenticate(action)
        elif isinstance(action, m.SendMessage):
            return self._send_message(action)
        elif isinstance(action, m.Commit):
            return self._commit(action.deleted)
        elif isinstance(action, m.SaslLookup):
            return self._sasl_lookup(action)
        elif isinstance(action, m.SaslVerify):
            request = action.request
            return self._login(
                credentials_for(request),
                request.username,
                method=f"sasl-{request.mechanism.lower()}",
                sasl_exchange=True,
            )
        elif isinstance(action, m.SaslRefused):
            assert self._login_peer is not None and self.machine is not None
            refused = self.factory.login.sasl_failed(
                action.failure,
                peer=self._login_peer,
                method=f"sasl-{self.machine.sasl_mechanism.lower()}",
            )
            return refused.addCallback(self._render_login, False)
        elif isinstance(action, m.AbortLogin):
            # Not logged in after all: no user, no UIDL hash.
            self._uidls = None
            self._release_mailbox()
            self.transport.write(action.reply)
        elif isinstance(action, m.StartTLS):
            self.transport.write(action.reply)
            # Started first: the handshake may complete inside startTLS.
            self._handshake_call = self.factory.reactor.callLater(
                self.factory.tls_handshake_timeout, self._handshake_timed_out
            )
            self.transport.startTLS(self.factory.tls)
            assert self.machine is not None
            self.machine.tls_started(self._capabilities(tls_active=True))
            self._log.debug("STLS started for {peer}", peer=self._peer)
        return None

    # --- authentication

    def _authenticate(self, action: m.Authenticate) -> defer.Deferred[None]:
        assert self.machine is not None
        if action.apop_digest is not None:
            apop = APOPCredentials(
                (self.machine.capabilities.apop_challenge or "").encode(),
                action.username.encode("utf-8"),
                action.apop_digest,
            )
            return self._login(apop, action.username, method="apop")
        assert action.password is not None
        password = PasswordCredentials(
            action.username.encode("utf-8"), action.password.encode("utf-8")
        )
        return self._login(password, action.username, method="password")

    def _login(
        self,
        creds: credentials.ICredentials,
        username: str,
        *,
        method: str,
        sasl_exchange: bool = False,
    ) -> defer.Deferred[None]:
        """
        Log in through the factory's L{LoginService} and render its outcome;
        after a SASL exchange (C{sasl_exchange}) the machine finishes it.
        """
        assert self._login_peer is not None
        self._login_method = method
        d = self.factory.login.login(creds, username=username, method=method, peer=self._login_peer)
        return d.addCallback(self._render_login, sasl_exchange)

    def _render_login(self, outcome: LoginOutcome, sasl_exchange: bool) -> None:
        machine = self.machine
        if not isinstance(outcome, LoginSucceeded):
            if machine is not None and machine.state is m.State.AUTHORIZATION:
                self.transport.write(machine.login_failed(outcome.code, outcome.text))
            return
        if machine is None or machine.state is m.State.CLOSED:
            outcome.release()
            return
        self._session = outcome
        if self._auth_deadline is not None and self._auth_deadline.active():
            self._auth_deadline.cancel()
        self._auth_deadline = None
        self._login_pending = (outcome.username, self._login_method, outcome.sizes)
        self._uidls = UidlHash(outcome.mailbox.getUidl, len(outcome.sizes))
        self._uidl_messages = len(outcome.sizes)
        uidl_of = self._uidls.uidl
        if sasl_exchange:
            self._perform(machine.sasl_verified(outcome.username, outcome.sizes, uidl_of))
        else:
            self.transport.write(machine.login_succeeded(outcome.username, outcome.sizes, uidl_of))
            self._note_state()
        self._reset_idle_timer()

    def _sasl_lookup(self, action: m.SaslLookup) -> defer.Deferred[None]:
        """Fetch the SCRAM keys, then let the exchange go on (or fail)."""

        def found(stored: scram.StoredScram | LoginFault | None) -> None:
            machine = self.machine
            if machine is None or machine.state is not m.State.AUTHORIZATION:
                return
            if isinstance(stored, LoginFault):
                self.transport.write(machine.login_failed(stored.code, stored.text))
            else:
                self._perform(machine.sasl_lookup_done(stored))

        return self.factory.login.lookup(action.username).addCallback(found)

    def _start_sasl(self) -> sasl.SASLServer:
        """A SASL exchange for this session's mechanisms and TLS channel bindings."""
        assert self.machine is not None
        caps = self.machine.capabilities
        bindings: list[sasl.ChannelBinding] = []
        if caps.tls_active:
            handle = getattr(self.transport, "getHandle", None)
            if handle is not None:
                bindings = bindings_from_tls_connection(handle())
        return sasl.SASLServer(
            mechanisms=caps.sasl,
            tls_active=caps.tls_active,
            plaintext_allowed=caps.plaintext_auth,
            channel_bindings=bindings,
            authorize=self.factory.login.authorize,
        )

    # --- transaction

    def _send_message(self, action: m.SendMessage) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.mailbox.getMessage, action.index)

        def stream(source: _Readable) -> defer.Deferred[None] | None:
            self.transport.write(action.status)
            figures = self._figures
            on_sent: Callable[[int], None] = _ignore_octets
            if figures is not None:
                if action.top_lines is None:
                    figures.retr += 1
                    on_sent = figures.add_retr_octets
                else:
                    figures.top += 1
            streamer = _MessageStreamer(
                self.transport,
                source,
                action.top_lines,
                self.factory.reactor.callLater,
                self._stream_progress,
                self._output_blocked,
                on_sent,
            )
            try:
                if streamer.send_if_small():
                    return None
            except Exception:
                self._stream_failed(action.index, Failure())
                return None
            self._producing = False
            self.transport.unregisterProducer()
            done = streamer.start()
            done.addBoth(self._streamed, action.index)
            return done

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

    def _streamed(self, result: object, index: int) -> None:
        """Take back the producer role after a message was sent."""
        self._output_paused = False
        if isinstance(result, Failure):
            if not result.check(ConnectionLost):
                self._stream_failed(index, result)
            # else the client went away mid-message; nothing to report
            return
        if self.machine is not None and self.machine.state is not m.State.CLOSED:
            self.transport.registerProducer(self, True)
            self._producing = True

    def _stream_failed(self, index: int, failure: Failure) -> None:
        """
        Reading a message failed after its C{+OK}: the response cannot be
        ended honestly, since a C{.} would pass off the part sent as the
        whole message and an C{-ERR} would be read as one of its lines, so
        the connection is closed with the response unfinished.  The
        client sees a broken download; the fault is logged once, as an
        error (it is the mailbox's, not a bug of the server).
        """
        self._log.failure(
            "Reading message {index} for {peer} failed mid-response; closing the connection",
            failure,
            level=LogLevel.error,
            index=index,
            peer=self._peer,
        )
        self._ending("error")
        self._close_with(b"", self.factory.close_grace)

    def _commit(self, deleted: frozenset[int]) -> defer.Deferred[None]:
        """
        The UPDATE state: tell the mailbox which messages are deleted, one
        after another (an L{IMailbox} may answer each with a L{Deferred}),
        then make that durable with C{sync}.  Any failure on the way is a
        failed commit.
        """
        mailbox = self.mailbox
        sizes = self._session.sizes if self._session is not None else ()
        left = (len(sizes) - len(deleted), sum(sizes) - sum(sizes[i] for i in deleted))
        self._committing = True

        def delete(_: object, index: int) -> defer.Deferred[object]:
            return defer.maybeDeferred(mailbox.deleteMessage, index)

        # The UIDL hash first: it needs the mailbox as it was at login, and
        # the deletions change it.  (Chained, not extended: the hash's own
        # Deferred leaves the commits when it fires.)
        d: defer.Deferred[Any] = defer.succeed(None)
        d.addCallback(lambda _: self._finish_uidl_hash())
        for index in sorted(deleted):
            d.addCallback(delete, index)
        d.addCallback(lambda _: defer.maybeDeferred(mailbox.sync))

        def committed(_: object) -> None:
            assert self.machine is not None
            if self._figures is not None:
                self._figures.after_messages, self._figures.after_octets = left
            self._ending("quit")
            self.transport.write(self.machine.commit_succeeded())

        def failed(failure: Failure) -> None:
            assert self.machine is not None
            self._ending("quit-commit-failed")
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
            self._disconnect()

        d.addCallbacks(committed, failed)
        d.addBoth(close)
        # A stopping server waits for the commits in progress (see commits).
        commits = self.factory.commits
        commits.add(d)

        def finished(result: object) -> object:
            commits.discard(d)
            self._committing = False
            if self._lost:
                self._end_session()
            return result

        d.addBoth(finished)
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
    @param policy: abuse limits; the documented defaults if C{None}.
    @param login: the login service; if C{None}, one for C{portal} and
        C{policy} (L{LoginService.for_portal}).
    @param tls_handshake_timeout: seconds a client has to complete a TLS
        handshake, on an implicit-TLS port or after C{STLS}.
    @param write_stall_timeout: seconds the server's output may stay
        blocked on a client that takes none of it before the connection
        is closed; also how long the last replies of an ordinary close
        may take to go out.
    @param close_grace: seconds that what is buffered for a client gets to
        go out after a timeout, before the connection is aborted.
    @param sessions: the table of this process's open sessions; a new one
        if L{None}.
    @param defer_to_thread: runs the end of a large maildrop's UIDL hash
        off the reactor thread; if L{None}, L{reactor_threads}.
    @param uidl_hash_inline_max: up to this many messages at login, the
        UIDL hash is finished on the reactor thread.

    @ivar sessions: the L{SessionTable} its sessions enter and leave.
    @ivar defer_to_thread: as given.
    @ivar uidl_hash_inline_max: as given.
    @ivar shutting_down: whether the server has stopped listening (set when
        the last port using this factory stops, as a stopping server's
        ports do first; cleared when one starts again): a session lost
        after that without another reason ends as C{shutdown}.
    """

    protocol = POP3Server

    def __init__(
        self,
        portal: Portal,
        idle_timeout: float = MIN_IDLE_TIMEOUT,
        reactor: Any = None,
        implementation: str = "pop3srv",
        tls: Any = None,
        plaintext_auth_networks: Iterable[IPNetwork] = LOOPBACK_NETWORKS,
        policy: ServerPolicy | None = None,
        login: LoginService | None = None,
        tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        write_stall_timeout: float = DEFAULT_WRITE_STALL_TIMEOUT,
        close_grace: float = CLOSE_GRACE,
        sessions: SessionTable | None = None,
        defer_to_thread: DeferToThread | None = None,
        uidl_hash_inline_max: int = UIDL_HASH_INLINE_MAX,
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
        self.tls_handshake_timeout = tls_handshake_timeout
        self.write_stall_timeout = write_stall_timeout
        self.close_grace = close_grace
        if login is None:
            login = LoginService.for_portal(portal, reactor, policy)
        self.login = login
        self.policy = login.policy
        #: The commits in progress, and the UIDL hashes finishing in a
        #: thread: a server that stops waits for them.
        self.commits: set[defer.Deferred[None]] = set()
        self.sessions = sessions if sessions is not None else SessionTable()
        self.defer_to_thread = (
            defer_to_thread if defer_to_thread is not None else reactor_threads(reactor)
        )
        self.uidl_hash_inline_max = uidl_hash_inline_max
        self.shutting_down = False
        self._session_counter = 0
        self._tag_prefix = f"{os.getpid():x}"

    def buildProtocol(self, addr: Any) -> POP3Server:
        return POP3Server(self)

    def startFactory(self) -> None:
        self.shutting_down = False

    def stopFactory(self) -> None:
        # Twisted calls this when the last port that uses the factory
        # (directly or through a TLS or PROXY wrapper) stops listening:
        # the first thing a stopping server does (pop3srv.app.tap).
        self.shutting_down = True

    def next_session_id(self) -> int:
        """A number unique to this factory, for APOP timestamps."""
        self._session_counter += 1
        return self._session_counter

    def next_session_tag(self) -> str:
        """A session id for log lines, unique on this host while the process lives."""
        return f"{self._tag_prefix}-{self.next_session_id()}"

    def apop_available(self) -> bool:
        """Whether some checker can verify an APOP digest."""
        return self.login.apop_available()

    def capabilities(
        self, apop_challenge: str | None, tls_active: bool, peer: object
    ) -> m.Capabilities:
        """The capabilities a session offers, given its encryption and peer."""
        plaintext = tls_active or peer_in_networks(peer, self.plaintext_auth_networks)
        return m.Capabilities(
            implementation=self.implementation,
            apop_challenge=apop_challenge,
            plaintext_auth=plaintext,
            stls=self.tls is not None and not tls_active,
            tls_active=tls_active,
            sasl=self.login.mechanisms(tls_active=tls_active, plaintext_allowed=plaintext),
        )
