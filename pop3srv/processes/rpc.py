# -*- test-case-name: tests.test_hashrelay,tests.test_hashing,tests.test_authority_rpc -*-
"""
What pop3srv's processes say to each other: AMP commands
(L{twisted.protocols.amp}) and the errors they declare.

Two conversations use them, each on a UNIX stream socket pair made when
the child process starts:

  - a server process and one of its hashing processes
    (L{pop3srv.processes.hashpool}, L{pop3srv.processes.hashchild}):
    L{CheckPassword};
  - a child server process and the parent server process
    (L{pop3srv.processes.supervisor}): L{RelayCheck}, a password check for
    the parent's hashing pool (L{pop3srv.processes.hashrelay}), and the
    questions of L{IPolicyAuthority
    <pop3srv.server.authority.IPolicyAuthority>}, which the parent answers
    for every server process (L{pop3srv.processes.authorityrpc}):
    L{OpenConnection}, L{CloseConnection}, L{BeginLogin},
    L{WithdrawLogin}, L{EndLogin}, L{LoginFailed}, L{StartSession},
    L{LoginSucceeded}, L{EndSession}; and the parent's own
    questions to each child, for one view of the whole server
    (L{pop3srv.app.control}): L{ListSessions}, L{GetMetrics}.

A third is an admin's command (C{pop3srv who}, C{pop3srv stats}) and the
parent server process, on the control socket (L{pop3srv.app.control}):
L{Who}, L{Stats}.

AMP matches each answer to its question and carries declared errors as
their own types, so there is no error-name table of ours, and a request id
only where a question must be named to take it back (L{BeginLogin}).
Nothing is unpickled: a L{VerifyResult} crosses as the JSON object of its
dataclass fields, so a field added to it crosses as long as its value is
plain JSON (text, numbers, booleans, null).  AMP caps one value at 64 KiB;
the answers that grow with the server (a session list, a metrics snapshot,
a report) cross in as many pieces as they need (L{LargeJSON}, L{LargeText}).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from pop3srv.auth.userfile import VerifyResult

__all__ = [
    "AuthorityFailed",
    "BeginLogin",
    "CheckPassword",
    "CloseConnection",
    "EndLogin",
    "EndSession",
    "GetMetrics",
    "HashCheckFailed",
    "HashProcessDied",
    "LargeJSON",
    "LargeText",
    "ListSessions",
    "LogEvents",
    "LoginFailed",
    "LoginSucceeded",
    "OpenConnection",
    "Peer",
    "RelayCheck",
    "ReportFailed",
    "Result",
    "StartSession",
    "Stats",
    "Who",
    "WithdrawLogin",
    "connect",
]


class HashProcessDied(Exception):
    """The process checking a password exited before answering."""


class HashCheckFailed(Exception):
    """The password check raised where it ran (which logged why)."""


class AuthorityFailed(Exception):
    """
    The parent's policy authority could not answer (the parent logged
    why).  Declared, so that it fails one question: an error AMP does not
    know of would close the whole connection, and the child with it.
    """


class ReportFailed(Exception):
    """
    A server process could not report on itself (it logged why).  Declared,
    so that the asker hears a reason rather than AMP's "unknown error".
    """


class _JSON(amp.Argument):
    """An argument that is a JSON document."""

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode()

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString)


class _Large(amp.Argument):
    """
    An argument whose encoding may pass AMP's cap on one value
    (C{amp.MAX_VALUE_LENGTH}): it crosses as the values of the keys C{NAME},
    C{NAME.1}, C{NAME.2} and so on, in order, each within the cap.  A value
    within the cap crosses as one key, as any other argument does.
    """

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        encoded = self.toStringProto(self.retrieve(objects, name.decode("ascii"), proto), proto)
        step = amp.MAX_VALUE_LENGTH
        strings[name] = encoded[:step]
        for piece, start in enumerate(range(step, len(encoded), step), 1):
            strings[b"%s.%d" % (name, piece)] = encoded[start : start + step]

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        pieces = [strings.pop(name)]
        while (key := b"%s.%d" % (name, len(pieces))) in strings:
            pieces.append(strings.pop(key))
        objects[name.decode("ascii")] = self.fromStringProto(b"".join(pieces), proto)


class LargeJSON(_Large, _JSON):
    """A JSON document of any size."""


class LargeText(_Large, amp.Unicode):
    """Text of any size."""


class Result(_JSON):
    """A L{VerifyResult}, as the JSON object of its fields."""

    def toString(self, inObject: VerifyResult) -> bytes:
        fields = {f.name: getattr(inObject, f.name) for f in dataclasses.fields(inObject)}
        return super().toString(fields)

    def fromString(self, inString: bytes) -> VerifyResult:
        fields = super().fromString(inString)
        if not isinstance(fields, dict):
            raise TypeError("a result must be a JSON object")
        known = {f.name for f in dataclasses.fields(VerifyResult)}
        return VerifyResult(**{k: v for k, v in fields.items() if k in known})


class LogEvents(_JSON):
    """
    Log events, each a plain dict (C{namespace}, C{level}, C{format},
    C{fields}), to be re-emitted by the receiver.
    """


class CheckPassword(amp.Command):
    """
    A server process asks its hashing process to check a password.

    The answer is the L{VerifyResult}, or none if the check raised (the
    error is then among the events), and the log events the check emitted.
    """

    arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode())]
    response = [(b"result", Result(optional=True)), (b"events", LogEvents())]


class RelayCheck(amp.Command):
    """
    A child server process asks the parent to check a password in the
    parent's hashing pool.  C{path} is the user file of the C{passlib}
    checker, which names the parent's verifier for it.
    """

    arguments = [
        (b"path", amp.Unicode()),
        (b"username", amp.Unicode()),
        (b"password", amp.Unicode()),
    ]
    response = [(b"result", Result())]
    errors = {HashProcessDied: b"HASH-PROCESS-DIED", HashCheckFailed: b"HASH-CHECK-FAILED"}


# The policy authority's questions.  A union answer crosses as optional
# fields, at most one group of them present; a FailureOutcome as its delay
# and, when it started a block, the block's scope and end.


class OpenConnection(amp.Command):
    """
    L{IPolicyAuthority.open_connection
    <pop3srv.server.authority.IPolicyAuthority.open_connection>}: C{breach}
    is the limit the connection breaks, absent if it was counted.
    """

    arguments = [(b"host", amp.Unicode())]
    response = [(b"breach", amp.Unicode(optional=True))]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class CloseConnection(amp.Command):
    """A connection counted by L{OpenConnection} ended (no answer)."""

    arguments = [(b"host", amp.Unicode())]
    requiresAnswer = False


class BeginLogin(amp.Command):
    """
    L{IPolicyAuthority.begin_login
    <pop3srv.server.authority.IPolicyAuthority.begin_login>}: C{request}
    names the question for a L{WithdrawLogin} (unique among the child's).
    The answer is either C{ticket} (an L{AttemptTicket
    <pop3srv.server.authority.AttemptTicket>}'s number) or C{scope} (a
    L{Blocked <pop3srv.server.authority.Blocked>}); neither for a question
    withdrawn before it was decided.
    """

    arguments = [
        (b"request", amp.Integer()),
        (b"host", amp.Unicode()),
        (b"username", amp.Unicode()),
    ]
    response = [
        (b"ticket", amp.Integer(optional=True)),
        (b"scope", amp.Unicode(optional=True)),
    ]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class WithdrawLogin(amp.Command):
    """
    The child cancelled the L{BeginLogin} named C{request} (no answer): the
    parent stops it waiting for a place, uncounted.  One already decided is
    answered as usual, and the child gives back the ticket it brings.
    """

    arguments = [(b"request", amp.Integer())]
    requiresAnswer = False


class EndLogin(amp.Command):
    """
    L{IPolicyAuthority.end_login
    <pop3srv.server.authority.IPolicyAuthority.end_login>}: C{verdict} is
    C{failed}, C{succeeded} or C{released}.  The answer is a
    L{FailureOutcome <pop3srv.server.limits.FailureOutcome>} (C{delay}, and
    C{lockout_scope} and C{lockout_until} if it started a block), or nothing.
    """

    arguments = [(b"ticket", amp.Integer()), (b"verdict", amp.Unicode())]
    response = [
        (b"delay", amp.Float(optional=True)),
        (b"lockout_scope", amp.Unicode(optional=True)),
        (b"lockout_until", amp.Float(optional=True)),
    ]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class LoginFailed(amp.Command):
    """
    L{IPolicyAuthority.login_failed
    <pop3srv.server.authority.IPolicyAuthority.login_failed>}: the answer is
    a L{FailureOutcome <pop3srv.server.limits.FailureOutcome>}, as for
    L{EndLogin}.
    """

    arguments = [(b"host", amp.Unicode()), (b"username", amp.Unicode())]
    response = [
        (b"delay", amp.Float()),
        (b"lockout_scope", amp.Unicode(optional=True)),
        (b"lockout_until", amp.Float(optional=True)),
    ]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class StartSession(amp.Command):
    """
    L{IPolicyAuthority.start_session
    <pop3srv.server.authority.IPolicyAuthority.start_session>}: C{counted}
    is false if the user is at the limit.
    """

    arguments = [(b"username", amp.Unicode()), (b"host", amp.Unicode())]
    response = [(b"counted", amp.Boolean())]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class LoginSucceeded(amp.Command):
    """
    L{IPolicyAuthority.login_succeeded
    <pop3srv.server.authority.IPolicyAuthority.login_succeeded>}: an
    L{EndLogin} of C{ticket} as C{succeeded} and a L{StartSession} in one
    question, answered as L{StartSession} is.
    """

    arguments = [
        (b"ticket", amp.Integer()),
        (b"username", amp.Unicode()),
        (b"host", amp.Unicode()),
    ]
    response = [(b"counted", amp.Boolean())]
    errors = {AuthorityFailed: b"AUTHORITY-FAILED"}


class EndSession(amp.Command):
    """A session counted by L{StartSession} ended (no answer)."""

    arguments = [(b"username", amp.Unicode()), (b"host", amp.Unicode())]
    requiresAnswer = False


# The parent's questions to each child server process, and the admin's to
# the parent on the control socket.  None takes arguments: each asks for
# everything there is.


class ListSessions(amp.Command):
    """
    The parent asks a child server process for its open sessions: a list
    of L{SessionInfo.as_dict() <pop3srv.server.sessions.SessionInfo.as_dict>}.
    """

    response = [(b"sessions", LargeJSON())]
    errors = {ReportFailed: b"REPORT-FAILED"}


class GetMetrics(amp.Command):
    """
    The parent asks a child server process for its metrics: a
    L{ProcessMetrics.snapshot()
    <pop3srv.server.metrics.ProcessMetrics.snapshot>}.
    """

    response = [(b"metrics", LargeJSON())]
    errors = {ReportFailed: b"REPORT-FAILED"}


class Who(amp.Command):
    """
    C{pop3srv who} asks the server for the sessions open in all its
    processes, as L{ListSessions} answers for one.
    """

    response = [(b"sessions", LargeJSON())]
    errors = {ReportFailed: b"REPORT-FAILED"}


class Stats(amp.Command):
    """
    C{pop3srv stats} asks the server for the metrics of all its processes,
    as the text an admin reads.
    """

    response = [(b"text", LargeText())]
    errors = {ReportFailed: b"REPORT-FAILED"}


class Peer(amp.BinaryBoxProtocol, amp.BoxDispatcher, amp.CommandLocator):
    """
    One end of an AMP connection: L{amp.AMP} without its log lines on every
    connection made and lost (the processes come and go with the server,
    and their sockets are not the admin's concern).

    Besides its own responders it answers with those of the locators given
    to L{answer_with}: what a process answers on a connection can then be
    added by the part of it that knows the answers, without subclassing.
    """

    # Bytes of a key or value not yet whole, and the box being read.
    _unparsed = b""
    _box: amp.AmpBox | None = None
    # Data that came while boxes were being delivered (see dataReceived).
    _more: list[bytes] | None = None

    def __init__(self) -> None:
        amp.BoxDispatcher.__init__(self, self)
        amp.BinaryBoxProtocol.__init__(self, self)
        self._locators: list[amp.CommandLocator] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Read the boxes in C{data}, as L{amp.BinaryBoxProtocol} does, in one
        loop: Twisted's parser makes a method call through a state table for
        every key and every value, which costs several times as much, and
        every login a server process serves crosses several boxes.

        These connections never switch protocols nor start TLS (no
        C{ProtocolSwitchCommand}, no C{StartTLS}), the only states this
        loop does not keep.
        """
        if self.innerProtocol is not None or self._keyLengthLimitExceeded:
            return
        if self._more is not None:
            # Called again by what a box it delivers sets off (a loopback):
            # read after the boxes before it.
            self._more.append(data)
            return
        self._more = []
        try:
            self._read(data)
            while self._more and not self._keyLengthLimitExceeded:
                more, self._more = self._more, []
                self._read(b"".join(more))
        finally:
            self._more = None

    def _read(self, data: bytes) -> None:
        """Deliver every box whole once C{data} is added to what came before."""
        buffer = self._unparsed + data if self._unparsed else data
        end = len(buffer)
        offset = 0
        box = self._box
        while end - offset >= 2:
            key_length = buffer[offset] << 8 | buffer[offset + 1]
            if not key_length:
                offset += 2
                self._box = None
                self.boxReceiver.ampBoxReceived(box if box is not None else amp.AmpBox())
                box = None
                continue
            if key_length > self._MAX_KEY_LENGTH:
                # As Twisted's parser does: the connection is lost with TooLong.
                self._unparsed, self._box = b"", None
                self._keyLengthLimitExceeded = True
                if self.transport is not None:
                    self.transport.loseConnection()
                return
            value_at = offset + 2 + key_length
            if end < value_at + 2:
                break
            stop = value_at + 2 + (buffer[value_at] << 8 | buffer[value_at + 1])
            if end < stop:
                break
            if box is None:
                box = self._box = amp.AmpBox()
            box[buffer[offset + 2 : value_at]] = buffer[value_at + 2 : stop]
            offset = stop
        self._unparsed = buffer[offset:] if offset < end else b""

    def answer_with(self, locator: amp.CommandLocator) -> None:
        """
        Answer the commands C{locator} has responders for, too; this peer's
        own responders and those of earlier locators come first.
        """
        self._locators.append(locator)

    def locateResponder(self, name: bytes) -> Any:
        found = super().locateResponder(name)
        for locator in self._locators:
            if found is not None:
                break
            found = locator.locateResponder(name)
        return found

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        # Answers to a peer that is gone are dropped (BoxDispatcher's rule).
        self.transport = None


def connect(reactor: Any, sock: socket.socket, protocol: Peer) -> None:
    """
    Run C{protocol} on our end of a UNIX socket pair, then close C{sock}:
    the reactor works on a duplicate (C{IReactorSocket.adoptStreamConnection}).

    @param reactor: provides C{IReactorSocket}.
    """
    reactor.adoptStreamConnection(
        sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol)
    )
    sock.close()
