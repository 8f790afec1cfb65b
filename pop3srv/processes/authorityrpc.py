# -*- test-case-name: tests.test_authority_rpc -*-
"""
The parent server process as the one policy authority of all its server
processes (C{--workers N}): L{IPolicyAuthority} over AMP.

The parent runs the L{LocalAuthority <pop3srv.server.authority.LocalAuthority>}
that counts failed logins, blocks, attempts in flight, connections per
address and sessions per user; its own sessions use it directly.  Each
child asks it through a L{RemoteAuthority}, which sends every question as
an AMP command (L{pop3srv.processes.rpc}) over the connection the child
already has to the parent (L{pop3srv.processes.supervisor}), and the
parent's L{AuthorityResponder} for that child answers it.  So a lockout
holds whichever process the kernel gives the next connection, and the
C{max_connections*} limits are totals, as Dovecot's C{anvil} makes them.

One AMP connection per child carries both conversations: the password
checks relayed to the parent's hashing pool (L{pop3srv.processes.hashrelay})
and the policy questions.  At the parent's end that is a L{WorkerConnection}
(a L{RelayServer} that also looks up the authority's responders); at the
child's end a L{RelayClient}, on which the L{RemoteAuthority} calls.

A child can die at any moment, holding connections, sessions and places
among the attempts in flight.  The responder keeps what its child holds
and gives all of it back when the connection is lost, so a dead child
leaks nothing; an answer that comes after that (a login that was waiting
for a place) is given back at once.  The responder also never ends what
its child does not hold, so one child cannot free another's places.

A question the parent cannot answer (its connection is gone, its
authority failed: logged there, and sent as the declared L{AuthorityFailed
<pop3srv.processes.rpc.AuthorityFailed>}) fails the child's Deferred with
L{AuthorityUnavailable}: the login service answers that as a server fault
(C{-ERR [SYS/TEMP]}), never as a wrong password.  The child stops soon
after it loses its parent anyway.  A question the child withdraws
(cancels) is still answered, since AMP cannot take one back: whatever
that answer grants is given back at once.  A login withdrawn while it
waits for a place is also withdrawn in the parent (L{WithdrawLogin
<pop3srv.processes.rpc.WithdrawLogin>}), so it stops waiting there and
counts for nothing, whatever the parent decides later.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.hashrelay import RelayServer
from pop3srv.processes.rpc import (
    AuthorityFailed,
    BeginLogin,
    CloseConnection,
    EndLogin,
    EndSession,
    LoginFailed,
    LoginSucceeded,
    OpenConnection,
    StartSession,
    WithdrawLogin,
)
from pop3srv.server.authority import (
    AttemptTicket,
    AuthorityUnavailable,
    Blocked,
    Holdings,
    IPolicyAuthority,
    LocalAuthority,
    Verdict,
)
from pop3srv.server.limits import FailureOutcome, Refusal, ThrottleSettings

__all__ = ["AuthorityResponder", "AuthorityUnavailable", "RemoteAuthority", "WorkerConnection"]

_log = Logger()
_T = TypeVar("_T")


def _outcome_fields(outcome: FailureOutcome) -> dict[str, Any]:
    """A L{FailureOutcome} as the answer fields of L{EndLogin} and L{LoginFailed}."""
    fields: dict[str, Any] = {"delay": outcome.delay}
    if outcome.lockout is not None:
        fields["lockout_scope"] = outcome.lockout.scope
        fields["lockout_until"] = outcome.lockout.until
    return fields


def _outcome(answer: Mapping[str, Any]) -> FailureOutcome:
    """The L{FailureOutcome} in an answer of L{EndLogin} or L{LoginFailed}."""
    scope, until = answer.get("lockout_scope"), answer.get("lockout_until")
    lockout = Refusal(scope, until) if scope is not None and until is not None else None
    return FailureOutcome(answer["delay"], lockout)


def _withdrawable(
    asked: Deferred[_T],
    give_back: Callable[[_T], object],
    withdraw: Callable[[], object] | None = None,
) -> Deferred[_T]:
    """
    A new Deferred for C{asked}'s outcome, which can be cancelled
    (L{IPolicyAuthority.begin_login} allows it).  An AMP question cannot be
    taken back, so the parent answers it anyway: what that answer grants
    (a ticket, a counted connection or session) is given back as it comes.

    C{asked} itself always ends in success, so AMP, which closes the
    connection for a failure left at the end of a question's callbacks,
    never sees one.

    @param give_back: called with the answer to a withdrawn question.
    @param withdraw: called when the question is withdrawn, to tell the
        parent.
    """
    withdrawn: list[bool] = []

    def cancel(_: Deferred[_T]) -> None:
        withdrawn.append(True)
        if withdraw is not None:
            withdraw()

    result: Deferred[_T] = Deferred(cancel)

    def answered(value: _T) -> None:
        if not withdrawn:
            result.callback(value)
            return
        try:
            give_back(value)
        except Exception:
            _log.failure("Giving back the answer to a withdrawn question failed")

    def failed(failure: Failure) -> None:
        if not withdrawn:
            result.errback(failure)

    asked.addCallbacks(answered, failed)
    return result


class AuthorityResponder(amp.CommandLocator):
    """
    The parent's answers to one child's policy questions, from the
    parent's authority through the child's own L{Holdings}, which records
    what the child holds.

    It is a responder locator, not a protocol: L{WorkerConnection} puts it
    on the child's AMP connection beside the hashing relay, and calls
    L{release_all} when that connection is lost.

    @ivar holdings: the parent's authority as this child sees it.
    """

    def __init__(self, authority: LocalAuthority) -> None:
        """
        @param authority: the parent's authority, shared by its own
            sessions and every child.
        """
        self.holdings: Holdings = authority.holdings()
        # The child's begin_login questions not yet answered, by request,
        # for WithdrawLogin.
        self._logins: dict[int, Deferred[AttemptTicket | Blocked]] = {}

    @OpenConnection.responder
    def open_connection(self, host: str) -> Deferred[dict[str, Any]]:
        return _answer(
            OpenConnection,
            lambda: self.holdings.open_connection(host),
            lambda breach: {} if breach is None else {"breach": breach},
        )

    @CloseConnection.responder
    def close_connection(self, host: str) -> dict[str, Any]:
        return _heed(CloseConnection, lambda: self.holdings.close_connection(host))

    @BeginLogin.responder
    def begin_login(self, request: int, host: str, username: str) -> Deferred[dict[str, Any]]:
        def fields(admitted: AttemptTicket | Blocked) -> dict[str, Any]:
            if isinstance(admitted, Blocked):
                return {"scope": admitted.scope}
            return {"ticket": admitted.number}

        def ask() -> Deferred[AttemptTicket | Blocked]:
            asked = self.holdings.begin_login(host, username)
            if not asked.called:
                self._logins[request] = asked

                def answered(result: object) -> object:
                    self._logins.pop(request, None)
                    return result

                asked.addBoth(answered)
            return asked

        return _answer(BeginLogin, ask, fields)

    @WithdrawLogin.responder
    def withdraw_login(self, request: int) -> dict[str, Any]:
        def withdraw() -> None:
            # Unknown once answered: the child gives back what it brings.
            asked = self._logins.pop(request, None)
            if asked is not None:
                asked.cancel()

        return _heed(WithdrawLogin, withdraw)

    @EndLogin.responder
    def end_login(self, ticket: int, verdict: str) -> Deferred[dict[str, Any]]:
        # An unknown verdict releases the attempt and fails (the authority's rule).
        return _answer(
            EndLogin,
            lambda: self.holdings.end_login(AttemptTicket(ticket), cast(Verdict, verdict)),
            lambda outcome: {} if outcome is None else _outcome_fields(outcome),
        )

    @LoginFailed.responder
    def login_failed(self, host: str, username: str) -> Deferred[dict[str, Any]]:
        return _answer(
            LoginFailed, lambda: self.holdings.login_failed(host, username), _outcome_fields
        )

    @StartSession.responder
    def start_session(self, username: str, host: str) -> Deferred[dict[str, Any]]:
        return _answer(
            StartSession,
            lambda: self.holdings.start_session(username, host),
            lambda counted: {"counted": counted},
        )

    @LoginSucceeded.responder
    def login_succeeded(self, ticket: int, username: str, host: str) -> Deferred[dict[str, Any]]:
        return _answer(
            LoginSucceeded,
            lambda: self.holdings.login_succeeded(AttemptTicket(ticket), username, host),
            lambda counted: {"counted": counted},
        )

    @EndSession.responder
    def end_session(self, username: str, host: str) -> dict[str, Any]:
        return _heed(EndSession, lambda: self.holdings.end_session(username, host))

    def release_all(self) -> None:
        """
        The child is gone: give back every connection, session and place
        it held, withdraw its questions still waiting for an answer, and
        give back anything granted later at once.
        """
        tickets, connections, sessions = self.holdings.held
        self.holdings.release_all()
        if tickets or connections or sessions:
            _log.info(
                "Gave back what a server process that went held: {connections} connections, "
                "{sessions} sessions, {tickets} login attempts",
                connections=connections,
                sessions=sessions,
                tickets=tickets,
            )


def _answer(
    command: type[amp.Command],
    ask: Callable[[], Deferred[_T]],
    fields: Callable[[_T], dict[str, Any]],
) -> Deferred[dict[str, Any]]:
    """
    The parent's answer to one question: C{ask()}'s answer as the fields of
    C{command}'s response; a failure, logged here, as the declared
    L{AuthorityFailed} (an undeclared one would close the connection).

    A question withdrawn because its child went (L{Holdings.release_all}
    cancels it) gets an empty answer that nobody reads.
    """

    def failed(failure: Failure) -> dict[str, Any] | Failure:
        if failure.check(CancelledError):
            return {}
        _log.failure(
            "The policy authority could not answer {command} for a server process",
            failure,
            command=command.__name__,
        )
        return Failure(AuthorityFailed(failure.getErrorMessage()))

    return maybeDeferred(ask).addCallbacks(fields, failed)


def _heed(command: type[amp.Command], tell: Callable[[], object]) -> dict[str, Any]:
    """
    The parent's part in a message that has no answer: an error is logged
    here, since AMP would close the connection for it.
    """
    try:
        tell()
    except Exception:
        _log.failure(
            "The policy authority failed on {command} from a server process",
            command=command.__name__,
        )
    return {}


class WorkerConnection(RelayServer):
    """
    The parent's end of one child's AMP connection: password checks for
    the parent's hashing pool (L{RelayServer}) and policy questions for
    the parent's authority (L{AuthorityResponder}).  Responders are looked
    up in the relay first, then in the authority's responder: composed
    rather than inherited, so each keeps its own constructor and state, and
    a L{RelayServer} still works alone.

    @ivar authority: the responder for the child's policy questions.
    """

    def __init__(
        self,
        verifiers: Mapping[str, Callable[[str, str], Deferred[VerifyResult]]],
        authority: LocalAuthority,
    ) -> None:
        """
        @param verifiers: as for L{RelayServer}.
        @param authority: the parent's authority, which answers the child.
        """
        super().__init__(verifiers)
        self.authority = AuthorityResponder(authority)

    def locateResponder(self, name: bytes) -> Any:
        return super().locateResponder(name) or self.authority.locateResponder(name)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.authority.release_all()


@implementer(IPolicyAuthority)
class RemoteAuthority:
    """
    A child's L{IPolicyAuthority}: every question goes to the parent's
    authority over the child's AMP connection to it.

    @ivar settings: the throttle settings, which are the parent's (a child
        is a fork with the same options).
    """

    def __init__(self, parent: amp.BoxDispatcher, settings: ThrottleSettings) -> None:
        """
        @param parent: the child's end of its connection to the parent
            (a L{RelayClient <pop3srv.processes.hashrelay.RelayClient>}).
        @param settings: the throttle settings of the parent's authority.
        """
        self._parent = parent
        self.settings = settings
        self._requests = itertools.count(1)

    def _ask(
        self,
        command: type[amp.Command],
        arguments: dict[str, Any],
        parse: Callable[[dict[str, Any]], _T],
        give_back: Callable[[_T], object] = lambda answer: None,
        withdraw: Callable[[], object] | None = None,
    ) -> Deferred[_T]:
        """
        Ask the parent.

        @param parse: turns the answer's fields into the value to fire with.
        @param give_back: called with the value of a question withdrawn
            before its answer came (L{_withdrawable}).
        @param withdraw: called when the caller withdraws the question.
        @return: fires with the parsed answer, or fails with
            L{AuthorityUnavailable}.  It is not the Deferred AMP answers
            on, so that a failure in the caller's callbacks stays the
            caller's: AMP would close the connection for it.
        """
        try:
            d: Deferred[Any] = self._parent.callRemote(command, **arguments)
        except Exception:
            d = fail()
        d.addCallback(parse).addErrback(self._unavailable, command)
        return _withdrawable(d, give_back, withdraw)

    @staticmethod
    def _unavailable(failure: Failure, command: type[amp.Command]) -> Failure:
        # A closed connection says only "Connection was closed cleanly": say
        # which question and whom it was for.
        return Failure(
            AuthorityUnavailable(
                f"the parent server process did not answer {command.__name__}: "
                f"{failure.getErrorMessage()}"
            )
        )

    def _tell(self, command: type[amp.Command], **arguments: Any) -> None:
        """
        Send a message that has no answer.  A parent that is gone has given
        back everything this child held already.
        """
        try:
            self._parent.callRemote(command, **arguments)
        except Exception:
            _log.failure(
                "Cannot tell the parent server process {command}", command=command.__name__
            )

    def open_connection(self, host: str) -> Deferred[str | None]:
        def give_back(breach: str | None) -> None:
            if breach is None:
                self.close_connection(host)

        return self._ask(OpenConnection, {"host": host}, lambda a: a.get("breach"), give_back)

    def close_connection(self, host: str) -> None:
        self._tell(CloseConnection, host=host)

    def begin_login(self, host: str, username: str) -> Deferred[AttemptTicket | Blocked]:
        request = next(self._requests)

        def admitted(answer: dict[str, Any]) -> AttemptTicket | Blocked:
            if answer.get("ticket") is not None:
                return AttemptTicket(answer["ticket"])
            if answer.get("scope") is None:
                # Only a withdrawn question gets neither, and its answer is
                # not read.
                raise ValueError("an answer with neither ticket nor block")
            return Blocked(answer["scope"])

        def give_back(answer: AttemptTicket | Blocked) -> None:
            # A block is not counted until the caller counts it: nothing
            # to give back.
            if isinstance(answer, AttemptTicket):
                released = self.end_login(answer, "released")
                released.addErrback(lambda f: f.trap(AuthorityUnavailable))

        def withdraw() -> None:
            # Else it waits for a place in the parent until one frees.
            self._tell(WithdrawLogin, request=request)

        arguments = {"request": request, "host": host, "username": username}
        return self._ask(BeginLogin, arguments, admitted, give_back, withdraw)

    def end_login(self, ticket: AttemptTicket, verdict: Verdict) -> Deferred[FailureOutcome | None]:
        return self._ask(
            EndLogin,
            {"ticket": ticket.number, "verdict": verdict},
            lambda a: None if a.get("delay") is None else _outcome(a),
        )

    def login_failed(self, host: str, username: str) -> Deferred[FailureOutcome]:
        return self._ask(LoginFailed, {"host": host, "username": username}, _outcome)

    def start_session(self, username: str, host: str) -> Deferred[bool]:
        def give_back(counted: bool) -> None:
            if counted:
                self.end_session(username, host)

        arguments = {"username": username, "host": host}
        return self._ask(StartSession, arguments, lambda a: bool(a["counted"]), give_back)

    def login_succeeded(self, ticket: AttemptTicket, username: str, host: str) -> Deferred[bool]:
        def give_back(counted: bool) -> None:
            if counted:
                self.end_session(username, host)

        arguments = {"ticket": ticket.number, "username": username, "host": host}
        return self._ask(LoginSucceeded, arguments, lambda a: bool(a["counted"]), give_back)

    def end_session(self, username: str, host: str) -> None:
        self._tell(EndSession, username=username, host=host)
