# -*- test-case-name: tests.test_machine -*-
"""
The POP3 session as a sans-IO state machine (RFC 1939, RFC 2449).

The machine turns received bytes into I{actions}.  Most actions are a reply
the machine composed itself; the rest ask the caller to do I/O (check a
password, stream a message, commit deletions) and report back through
L{Pop3Machine.login_succeeded}, L{Pop3Machine.login_failed} and friends.
Which command is legal in which state is written down once, in L{ALLOWED}.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pop3srv.core import commands as c
from pop3srv.core import sasl
from pop3srv.core.scram import StoredScram
from pop3srv.core.wire import (
    MAX_COMMAND_LINE,
    LineBuffer,
    LineTooLong,
    format_err,
    format_multiline,
    format_ok,
    parse_command,
)


class State(enum.Enum):
    """The states of RFC 1939 section 3, plus the end of the session."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


# RFC 1939 defines NOOP for the TRANSACTION state only, and RFC 2595 STLS
# for the AUTHORIZATION state only.
ALLOWED: dict[State, frozenset[type]] = {
    State.AUTHORIZATION: frozenset(
        {c.User, c.Pass, c.Apop, c.Quit, c.Capa, c.Stls, c.Auth, c.Utf8}
    ),
    State.TRANSACTION: frozenset(
        {c.Stat, c.List, c.Retr, c.Dele, c.Noop, c.Rset, c.Quit, c.Top, c.Uidl, c.Capa}
    ),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by L{Pop3Machine.next_action} when no complete command is buffered."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Send these bytes; nothing else to do."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """
    Check these credentials, then call L{Pop3Machine.login_succeeded} or
    L{Pop3Machine.login_failed}.  C{apop_digest} is set for APOP, else
    C{password} is.
    """

    username: str
    password: str | None = None
    apop_digest: str | None = None


@dataclass(frozen=True, slots=True)
class SendMessage:
    """
    Send C{status}, then the message at C{index} (0-based) through a
    L{wire.DotStuffer}, cut by a L{wire.TopFilter} if C{top_lines} is set.
    """

    index: int
    top_lines: int | None
    status: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """
    Delete the messages at C{deleted} (0-based indexes) from the mailbox and
    make that durable, then call L{Pop3Machine.commit_succeeded} or
    L{Pop3Machine.commit_failed} and close the connection.

    Until this action the deletion marks live in the machine alone: RFC 1939
    removes messages in the UPDATE state, so the mailbox hears of a C{DELE}
    only when the client says C{QUIT}, and a dropped connection leaves it
    untouched.
    """

    deleted: frozenset[int]


@dataclass(frozen=True, slots=True)
class StartTLS:
    """
    Send C{reply}, then start the TLS handshake and call
    L{Pop3Machine.tls_started}.  Anything the client sent after C{STLS} in
    plaintext has already been thrown away.
    """

    reply: bytes


@dataclass(frozen=True, slots=True)
class SaslLookup:
    """
    SCRAM: find C{username}'s stored SCRAM secrets and pass them (or
    C{None}) to L{Pop3Machine.sasl_lookup_done}.
    """

    username: str


@dataclass(frozen=True, slots=True)
class SaslVerify:
    """
    Log in with what the SASL exchange collected (C{request}, plain data),
    then call L{Pop3Machine.sasl_verified} or L{Pop3Machine.login_failed}.
    """

    request: sasl.Verify


@dataclass(frozen=True, slots=True)
class SaslRefused:
    """
    The SASL exchange failed on the client's credentials before any were
    checked (C{failure.reason} says why, C{failure.username} whose): count
    and audit it as a failed login, then call L{Pop3Machine.login_failed}.
    """

    failure: sasl.Failure


@dataclass(frozen=True, slots=True)
class AbortLogin:
    """
    The SASL exchange failed after the credentials were verified (the client
    rejected the server's proof): release the maildrop, then send C{reply}.
    """

    reply: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Send C{reply} and close the connection."""

    reply: bytes


Action = (
    Reply
    | Authenticate
    | SendMessage
    | Commit
    | StartTLS
    | Close
    | SaslLookup
    | SaslVerify
    | AbortLogin
    | SaslRefused
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """
    What the server offers, for the greeting and C{CAPA}.

    @ivar apop_challenge: the RFC 1939 timestamp for APOP, or C{None} when no
        checker can verify APOP digests (then APOP is not offered at all).
    @ivar expire: the RFC 2449 EXPIRE value (C{"NEVER"}, a number of days),
        or C{None} not to advertise it.
    @ivar login_delay: seconds for the RFC 2449 LOGIN-DELAY capability, or
        C{None}.
    @ivar plaintext_auth: whether USER/PASS may be used on this connection
        (it is encrypted, or the peer is on a trusted network).
    @ivar stls: whether STLS is offered (a certificate is configured and the
        connection is not encrypted yet).
    @ivar tls_active: whether the connection is encrypted.
    @ivar sasl: the SASL mechanisms this session offers (RFC 5034).
    """

    implementation: str = "pop3srv"
    apop_challenge: str | None = None
    expire: str | None = None
    login_delay: int | None = None
    plaintext_auth: bool = True
    stls: bool = False
    tls_active: bool = False
    sasl: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        """The capability lines of a C{CAPA} response."""
        lines = ["TOP"]
        if self.plaintext_auth:
            lines.append("USER")
        if self.stls:
            lines.append("STLS")
        if self.sasl:
            lines.append("SASL " + " ".join(self.sasl))
        lines += ["UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.expire is not None:
            lines.append(f"EXPIRE {self.expire}")
        if self.login_delay is not None:
            lines.append(f"LOGIN-DELAY {self.login_delay}")
        lines.append("UTF8")
        lines += list(self.extra)
        lines.append(f"IMPLEMENTATION {self.implementation}")
        return lines


AUTH_FAILED = "Invalid username or password."
PLAINTEXT_REFUSED = "Plaintext authentication is disallowed without TLS; use STLS first."


class _Maildrop:
    """
    The session's view of the maildrop: sizes, UIDLs, and the deletion
    marks, which are kept here only (the mailbox hears of them at L{Commit}).
    """

    def __init__(self, sizes: Sequence[int], uidl_of: Callable[[int], str | bytes]) -> None:
        # Packed: a session on a mailbox of tens of thousands of messages
        # holds 8 bytes a message, not an int object each.
        self.sizes = array("q", sizes)
        self.deleted: set[int] = set()
        self._uidl_of = uidl_of

    def uidl(self, index: int) -> str:
        # Asked of the mailbox each time, not cached: IMailbox promises a
        # stable UIDL, and a cache would hold one string per message for
        # the whole session.
        uidl = self._uidl_of(index)
        # Twisted's IMailbox returns bytes; accept str too.
        return uidl.decode("ascii") if isinstance(uidl, bytes) else uidl

    def live(self) -> list[int]:
        return [i for i in range(len(self.sizes)) if i not in self.deleted]

    def index_of(self, msn: int) -> int | bytes:
        """Map a client's msn to an index, or return the C{-ERR} line."""
        if msn < 1 or msn > len(self.sizes):
            return format_err("No such message.")
        index = msn - 1
        if index in self.deleted:
            return format_err(f"Message {msn} is deleted.")
        return index


class Pop3Machine:
    """
    One POP3 session, without I/O.

    Feed received bytes to L{receive_data} and take actions from
    L{next_action} until it returns L{NEED_DATA}.  While an action that asks
    for I/O is outstanding the caller must not ask for the next action:
    pipelined commands wait in the buffer and are answered in order.
    """

    def __init__(
        self,
        capabilities: Capabilities | None = None,
        max_line: int = MAX_COMMAND_LINE,
        start_sasl: Callable[[], sasl.SASLServer] | None = None,
    ) -> None:
        self.capabilities = capabilities or Capabilities()
        self.state = State.AUTHORIZATION
        self.username: str | None = None
        self.bad_commands = 0
        #: DELE commands accepted (RSET does not undo the count).
        self.deletions = 0
        self._lines = LineBuffer(max_line)
        self._user: str | None = None
        self._maildrop: _Maildrop | None = None
        self._authenticating = False
        self._starting_tls = False
        self._start_sasl = start_sasl
        self._sasl: sasl.SASLServer | None = None
        self._pending_login: tuple[str, Sequence[int], Callable[[int], str | bytes]] | None = None

    @property
    def buffered(self) -> int:
        """How many received bytes wait to be parsed."""
        return len(self._lines)

    def greeting(self) -> bytes:
        """The greeting line (with the APOP timestamp when APOP is offered)."""
        caps = self.capabilities
        text = "POP3 server ready."
        if not caps.plaintext_auth and caps.stls:
            text = "POP3 server ready; use STLS before logging in."
        return format_ok(f"{text} {caps.apop_challenge}" if caps.apop_challenge else text)

    def receive_data(self, data: bytes) -> None:
        """Buffer received bytes."""
        if self.state is not State.CLOSED:
            self._lines.feed(data)

    def next_action(self) -> Action | _NeedData:
        """Parse the next buffered command and say what to do about it."""
        if self.state in (State.UPDATE, State.CLOSED) or self._authenticating or self._starting_tls:
            return NEED_DATA
        line = self._lines.next_line()
        if line is None:
            return NEED_DATA
        if self._sasl is not None:
            if isinstance(line, LineTooLong):
                return self._sasl_step(sasl.Failure(None, "Response too long.", "over-long line"))
            return self._sasl_step(self._sasl.respond(line))
        if isinstance(line, LineTooLong):
            return self._bad("Command line too long.")
        command = parse_command(line)
        if isinstance(command, c.BadCommand):
            return self._bad(command.reason)
        if type(command) not in ALLOWED[self.state]:
            return self._bad("Command not valid in this state.")
        self.bad_commands = 0
        return self._dispatch(command)

    def _bad(self, reason: str, code: str | None = None) -> Reply:
        self.bad_commands += 1
        return Reply(format_err(reason, code))

    def _stls(self) -> Action:
        if self.capabilities.tls_active:
            return self._bad("TLS is already active.")
        if not self.capabilities.stls:
            return self._bad("STLS is not available.")
        # RFC 2595 section 4 and CVE-2011-0411: whatever followed STLS in
        # plaintext must never be executed as if it came over TLS.
        self._lines.clear()
        self._user = None
        self._starting_tls = True
        return StartTLS(format_ok("Begin TLS negotiation."))

    def _auth(self, command: c.Auth) -> Action:
        if command.mechanism is None:
            return Reply(format_multiline("Mechanisms follow.", self.capabilities.sasl))
        if self._start_sasl is None or not self.capabilities.sasl:
            return self._bad("AUTH is not available.")
        self._user = None
        self._sasl = self._start_sasl()
        # RFC 5034: continuation responses may be longer than a command line.
        self._lines.max_line = sasl.MAX_RESPONSE_OCTETS + 2
        return self._sasl_step(self._sasl.start(command.mechanism, command.initial_response))

    @property
    def sasl_mechanism(self) -> str:
        """The mechanism of the SASL exchange under way."""
        return (self._sasl.mechanism if self._sasl else None) or "?"

    def _end_sasl(self) -> None:
        self._sasl = None
        self._lines.max_line = MAX_COMMAND_LINE

    def _sasl_step(self, step: sasl.Step) -> Action:
        """Turn a step of the SASL exchange into an action."""
        if isinstance(step, sasl.Challenge):
            return Reply(b"+ " + step.text_b64.encode("ascii") + b"\r\n")
        if isinstance(step, sasl.Lookup):
            self._authenticating = True
            return SaslLookup(step.username)
        if isinstance(step, sasl.Verify):
            self._authenticating = True
            return SaslVerify(step)
        if isinstance(step, sasl.Success):
            assert self._pending_login is not None
            self._end_sasl()
            username, sizes, uidl_of = self._pending_login
            self._pending_login = None
            return Reply(self.login_succeeded(username, sizes, uidl_of))
        if step.reason is not None and self._pending_login is None:
            # Answered through login_failed once the login service has
            # counted it; the exchange stays until then, for its mechanism.
            self._authenticating = True
            return SaslRefused(step)
        self._end_sasl()
        reply = format_err(step.text, step.code)
        if self._pending_login is not None:
            self._pending_login = None
            return AbortLogin(reply)
        self.bad_commands += 1
        return Reply(reply)

    def sasl_lookup_done(self, stored: StoredScram | None) -> Action:
        """The SCRAM secrets of a L{SaslLookup} (or C{None}): the next action."""
        self._authenticating = False
        assert self._sasl is not None
        return self._sasl_step(self._sasl.lookup_done(stored))

    def sasl_verified(
        self, username: str, sizes: Sequence[int], uidl_of: Callable[[int], str | bytes]
    ) -> Action:
        """
        The credentials of a L{SaslVerify} were good and the maildrop is
        open: the next action (C{+OK}, or SCRAM's final challenge first).
        """
        self._authenticating = False
        assert self._sasl is not None
        self._pending_login = (username, sizes, uidl_of)
        return self._sasl_step(self._sasl.verified())

    def tls_started(self, capabilities: Capabilities) -> None:
        """
        The handshake has begun: forget everything from before it and offer
        the capabilities of an encrypted connection.
        """
        self._lines.clear()
        self._user = None
        self._starting_tls = False
        self.capabilities = capabilities

    def _dispatch(self, command: c.Command) -> Action:
        if isinstance(command, c.Capa):
            return Reply(format_multiline("Capability list follows.", self.capabilities.lines()))
        if isinstance(command, c.Noop):
            return Reply(format_ok())
        if isinstance(command, c.Quit):
            return self._quit()
        if self.state is State.AUTHORIZATION:
            return self._authorization(command)
        return self._transaction(command)

    def _authorization(self, command: c.Command) -> Action:
        if isinstance(command, c.Stls):
            return self._stls()
        if isinstance(command, c.Utf8):
            return Reply(format_ok("UTF8 enabled."))
        if isinstance(command, c.Auth):
            return self._auth(command)
        if isinstance(command, c.User | c.Pass) and not self.capabilities.plaintext_auth:
            self._user = None
            return self._bad(PLAINTEXT_REFUSED, "AUTH")
        if isinstance(command, c.User):
            self._user = command.name
            # The same answer for every name, so USER does not reveal which exist.
            return Reply(format_ok("Send PASS."))
        if isinstance(command, c.Pass):
            if self._user is None:
                return self._bad("Send USER first.")
            username, self._user = self._user, None
            self._authenticating = True
            return Authenticate(username, password=command.password)
        if isinstance(command, c.Apop):
            if self.capabilities.apop_challenge is None:
                return self._bad("APOP is not available.")
            self._user = None
            self._authenticating = True
            return Authenticate(command.name, apop_digest=command.digest)
        raise AssertionError(f"unhandled {command!r}")  # pragma: no cover

    def _transaction(self, command: c.Command) -> Action:
        drop = self._maildrop
        assert drop is not None
        if isinstance(command, c.Stat):
            live = drop.live()
            return Reply(format_ok(f"{len(live)} {sum(drop.sizes[i] for i in live)}"))
        if isinstance(command, c.Rset):
            drop.deleted.clear()
            return Reply(format_ok(f"Maildrop has {len(drop.sizes)} messages."))
        if isinstance(command, c.List | c.Uidl):
            describe: Callable[[int], str | int] = (
                drop.sizes.__getitem__ if isinstance(command, c.List) else drop.uidl
            )
            if command.msn is None:
                live = drop.live()
                listing = (f"{i + 1} {describe(i)}" for i in live)
                return Reply(format_multiline(f"{len(live)} messages.", listing))
            index = drop.index_of(command.msn)
            if isinstance(index, bytes):
                return Reply(index)
            return Reply(format_ok(f"{command.msn} {describe(index)}"))
        assert isinstance(command, c.Retr | c.Top | c.Dele)
        index = drop.index_of(command.msn)
        if isinstance(index, bytes):
            return Reply(index)
        if isinstance(command, c.Dele):
            drop.deleted.add(index)
            self.deletions += 1
            return Reply(format_ok(f"Message {command.msn} deleted."))
        if isinstance(command, c.Top):
            return SendMessage(index, command.lines, format_ok("Top of message follows."))
        return SendMessage(index, None, format_ok(f"{drop.sizes[index]} octets."))

    def _quit(self) -> Action:
        if self.state is State.TRANSACTION:
            assert self._maildrop is not None
            self.state = State.UPDATE
            return Commit(frozenset(self._maildrop.deleted))
        self.state = State.CLOSED
        return Close(format_ok("Bye."))

    def login_succeeded(
        self, username: str, sizes: Sequence[int], uidl_of: Callable[[int], str | bytes]
    ) -> bytes:
        """
        Enter TRANSACTION with the maildrop's message sizes (0 for a message
        the mailbox already reports deleted) and a way to look up UIDLs.
        """
        self._authenticating = False
        self.state = State.TRANSACTION
        # RFC 2595 section 4: STLS is an AUTHORIZATION command, so CAPA in
        # TRANSACTION does not offer it.
        self.capabilities = replace(self.capabilities, stls=False)
        self.username = username
        self._maildrop = _Maildrop(sizes, uidl_of)
        octets = sum(sizes)
        return format_ok(f"Maildrop has {len(sizes)} messages ({octets} octets).")

    def login_failed(self, code: str, text: str = AUTH_FAILED) -> bytes:
        """Stay in AUTHORIZATION after a failed login; return the C{-ERR} line."""
        self._authenticating = False
        self._end_sasl()
        self.bad_commands += 1
        return format_err(text, code)

    def commit_succeeded(self) -> bytes:
        """The deletions are durable; return the farewell."""
        self.state = State.CLOSED
        deleted = len(self._maildrop.deleted) if self._maildrop else 0
        return format_ok(f"Bye, {deleted} messages deleted.")

    def commit_failed(self, code: str, text: str) -> bytes:
        """The deletions could not be committed; return the C{-ERR} line."""
        self.state = State.CLOSED
        return format_err(text, code)

    def connection_lost(self) -> None:
        """The connection is gone; nothing is committed."""
        self.state = State.CLOSED
        # Let the maildrop (and, through its UIDL function, the mailbox and
        # its index) go now, not when the collector reaches the session.
        self._maildrop = None
