# -*- test-case-name: tests.test_authority -*-
"""
The policy authority: the one keeper, per server, of the counts a limit
needs to hold for the whole service rather than for one process.

Failed logins, blocks, attempts in flight, open connections per address
and sessions per user all live in one L{IPolicyAuthority}.  In a single
server process that is a L{LocalAuthority} in the process itself; with
C{--workers N} the parent process runs the L{LocalAuthority} and every
child asks it over AMP (L{pop3srv.processes.authorityrpc}), as Dovecot's
server processes ask its C{anvil}.  The failure counts and blocks
themselves may live further away still, in Redis for several nodes
(L{pop3srv.server.limits.IAuthCounters}).

Every question is asynchronous, so the protocol and the login service
never know where the answer comes from.

A process that answers for others (the parent, for its children) gives
each of them its own L{Holdings}: it records what that client holds
(attempts in flight, connections, sessions) so that all of it is given back
at once (L{Holdings.release_all}) when the client goes away without giving
it back itself.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pop3srv.server.limits import (
    Attempt,
    AuthThrottle,
    Busy,
    ConnectionCounter,
    ConnectionLimits,
    FailureOutcome,
    IAuthCounters,
    Refusal,
    ThrottleSettings,
)

__all__ = [
    "AttemptTicket",
    "AuthorityUnavailable",
    "Blocked",
    "Holdings",
    "IPolicyAuthority",
    "LocalAuthority",
    "Verdict",
    "log_fault",
]

#: How a login attempt ended: wrong credentials (counted), a success
#: (forgets the pair's failures), or no verdict on the credentials (a
#: server fault, a refusal for another reason: counts for nothing).
Verdict = Literal["failed", "succeeded", "released"]


@dataclass(frozen=True)
class AttemptTicket:
    """
    A login attempt admitted by L{IPolicyAuthority.begin_login}: it holds a
    place among the attempts in flight until L{IPolicyAuthority.end_login}.

    @ivar number: names the attempt to the authority (it crosses AMP).
    """

    number: int


@dataclass(frozen=True)
class Blocked:
    """
    A login refused without a password check: the address, or the address
    and user, is blocked.

    The refusal is not counted yet: the caller counts it as a failed login
    (L{IPolicyAuthority.login_failed}), so that a blocked guesser's tries
    keep the block and the delay growing, and answers after that count's
    delay.  So the refusal is known at once, however long the count takes,
    and a block the count starts is the caller's to report.

    @ivar scope: C{address} or C{address+user}.
    """

    scope: str


class AuthorityUnavailable(Exception):
    """
    The authority could not be asked (the parent server process that keeps
    it is gone, or failed to answer): a server fault.  Its message says in
    one line which question went unanswered and why, so it is logged
    without a traceback (L{log_fault}).
    """


def log_fault(log: Logger, failure: Failure, text: str, **fields: Any) -> None:
    """
    Log a question to the authority that failed: an L{AuthorityUnavailable}
    as one error line ending with its message, anything else (a bug) with
    its traceback.

    @param text: the log format, without the cause.
    @param fields: the format's fields.
    """
    if failure.check(AuthorityUnavailable):
        log.error(text + ": {cause}", cause=failure.getErrorMessage(), **fields)
    else:
        log.failure(text, failure, **fields)


class IPolicyAuthority(Interface):
    """
    Counts and decides, for every server process of one server: the
    failed-login throttle, connection limits and sessions per user.

    Every method answers with a Deferred; none fails for a decision (a
    refusal is a value).  A Deferred that fails is a server fault (an
    authority that cannot be reached fails with L{AuthorityUnavailable}).
    """

    settings: ThrottleSettings

    def open_connection(host: str) -> Deferred[str | None]:
        """
        Count a new connection from C{host}.

        @return: fires with the limit it breaks (C{max-connections} or
            C{max-connections-per-address}; then it is not counted), or
            L{None} (counted: call L{close_connection} when it ends).
        """

    def close_connection(host: str) -> None:
        """A connection counted by L{open_connection} ended."""

    def begin_login(host: str, username: str) -> Deferred[AttemptTicket | Blocked]:
        """
        Admit a login attempt, or refuse it without a check.

        When the attempts already in flight would block this one were they
        all to fail, the answer waits until one of them ends.

        Cancelling the Deferred withdraws the request: the attempt stops
        waiting, holds no place whenever the cancel lands (a ticket the
        authority had already granted is ended as C{released}), and counts
        for nothing.

        @return: fires with an L{AttemptTicket} (end it with L{end_login})
            or a L{Blocked} (count it with L{login_failed}).
        """

    def end_login(ticket: AttemptTicket, verdict: Verdict) -> Deferred[FailureOutcome | None]:
        """
        An admitted attempt ended; later calls with the same ticket do
        nothing.

        @return: fires with the failure's delay and any block it started
            (for C{failed}), else L{None}.
        """

    def login_failed(host: str, username: str) -> Deferred[FailureOutcome]:
        """
        Count a failed login that held no ticket: a refusal (L{Blocked}),
        or a SASL exchange that failed on the client's credentials before
        any check.
        """

    def start_session(username: str, host: str) -> Deferred[bool]:
        """
        Count a logged-in session.

        @return: fires with C{False} (not counted) if the user is at the
            limit, else C{True} (call L{end_session} when it ends).
        """

    def login_succeeded(ticket: AttemptTicket, username: str, host: str) -> Deferred[bool]:
        """
        An admitted attempt succeeded: end it as C{succeeded}
        (L{end_login}) and count C{username}'s session (L{start_session}),
        in one question.

        The attempt is ended whether or not the session is counted.  A
        Deferred that fails holds nothing: a session counted while the end
        failed is given back.

        @return: fires as L{start_session}'s answer does.
        """

    def end_session(username: str, host: str) -> None:
        """A session counted by L{start_session} ended."""


_log = Logger()


@implementer(IPolicyAuthority)
class LocalAuthority:
    """
    The L{IPolicyAuthority} of a server, kept in this process: an
    L{AuthThrottle} over the given L{IAuthCounters} (failure counts and
    blocks; the places of attempts in flight stay here) and a
    L{ConnectionCounter}.

    A single server process uses it directly; the parent of several uses
    one for all of them, each child through its own L{Holdings}
    (L{holdings}).

    @ivar throttle: the failed-login throttle.
    @ivar connections: the connection and session counts.
    """

    def __init__(
        self,
        settings: ThrottleSettings,
        limits: ConnectionLimits,
        counters: IAuthCounters | None = None,
        *,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param settings: the failed-login limits.
        @param limits: the connection and session limits.
        @param counters: where failures and blocks are kept; this
            process's memory if L{None}.
        @param clock: the time of failures and blocks, and the timer that
            wakes a waiting attempt; the global reactor if L{None}.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock: IReactorTime = clock
        self.throttle = AuthThrottle(settings, counters)
        self.connections = ConnectionCounter(limits)
        self._tickets: dict[int, Attempt] = {}
        self._numbers = itertools.count(1)

    @property
    def settings(self) -> ThrottleSettings:
        """The failed-login limits."""
        return self.throttle.settings

    @property
    def limits(self) -> ConnectionLimits:
        """The connection and session limits."""
        return self.connections.limits

    def reconfigure(self, settings: ThrottleSettings, limits: ConnectionLimits) -> None:
        """
        Take new limits (a reload of the configuration) for the questions
        asked from now on.  Nothing counted is forgotten: the failures,
        blocks, attempts in flight, connections and sessions already counted
        stay, and a lower limit refuses new connections until enough of the
        open ones have ended.  A block already set keeps the end it was
        given; attempts waiting for a place are decided under the new
        limits when they are next woken.
        """
        self.throttle.settings = settings
        self.connections.limits = limits

    @property
    def attempts_in_flight(self) -> int:
        """How many tickets are out (attempts admitted and not yet ended)."""
        return len(self._tickets)

    def holdings(self) -> Holdings:
        """
        @return: a new L{Holdings}: this authority for one client, which
            can give back everything that client holds.
        """
        return Holdings(self)

    def open_connection(self, host: str) -> Deferred[str | None]:
        return succeed(self.connections.open(host))

    def close_connection(self, host: str) -> None:
        self.connections.close(host)

    def begin_login(self, host: str, username: str) -> Deferred[AttemptTicket | Blocked]:
        return _Admission(self, host, username).result

    def _ticket_for(self, attempt: Attempt) -> AttemptTicket:
        number = next(self._numbers)
        self._tickets[number] = attempt
        return AttemptTicket(number)

    def end_login(self, ticket: AttemptTicket, verdict: Verdict) -> Deferred[FailureOutcome | None]:
        attempt = self._tickets.pop(ticket.number, None)
        if attempt is None:
            return succeed(None)
        if verdict == "failed":
            failed: Deferred[Any] = attempt.failed(self.clock.seconds())
            return failed
        if verdict == "succeeded":
            return attempt.succeeded().addCallback(lambda _: None)
        attempt.release()
        if verdict != "released":
            return fail(ValueError(f"unknown verdict {verdict!r} (the attempt was released)"))
        return succeed(None)

    def login_failed(self, host: str, username: str) -> Deferred[FailureOutcome]:
        return self.throttle.failed(host, username, self.clock.seconds())

    def start_session(self, username: str, host: str) -> Deferred[bool]:
        return succeed(self.connections.start_session(username, host))

    def login_succeeded(self, ticket: AttemptTicket, username: str, host: str) -> Deferred[bool]:
        return _ended_and_started(
            self.end_login(ticket, "succeeded"),
            self.start_session(username, host),
            lambda: self.end_session(username, host),
        )

    def end_session(self, username: str, host: str) -> None:
        self.connections.end_session(username, host)


def _ended_and_started(
    ended: Deferred[Any], started: Deferred[bool], give_back: Callable[[], None]
) -> Deferred[bool]:
    """
    The answer to L{IPolicyAuthority.login_succeeded} from the answers of
    its two parts, asked at once.

    @param ended: the attempt's end.
    @param started: the session's count.
    @param give_back: ends the session, when it was counted while the end
        failed.
    @return: fires with C{started}'s answer once both are in; fails with
        the first failure, holding no session.
    """
    both: Deferred[list[tuple[bool, Any]]] = DeferredList([ended, started], consumeErrors=True)

    def answered(results: list[tuple[bool, Any]]) -> bool | Failure:
        (end_ok, end_result), (start_ok, start_result) = results
        if not start_ok:
            failure: Failure = start_result
            return failure
        if not end_ok:
            if start_result:
                give_back()
            ended_failure: Failure = end_result
            return ended_failure
        return bool(start_result)

    return both.addCallback(answered)


class _Admission:
    """
    One L{LocalAuthority.begin_login}: asks the throttle, waits for a place
    while it is busy, and turns the answer into an L{AttemptTicket} or a
    L{Blocked}.

    The throttle wakes the waiters of a counter one at a time
    (L{AuthThrottle.wait_for_place}): one woken that takes no place there
    passes it on to the next.

    @ivar result: fires with the answer; cancelling it stops the waiting.
    """

    def __init__(self, authority: LocalAuthority, host: str, username: str) -> None:
        self._authority = authority
        self._host = host
        self._username = username
        self._cancelled = False
        self._waiting = False
        # The counter it waits on (Busy.key), and the one it was woken for
        # while it asks again.
        self._busy_key: str | None = None
        self._woken_for: str | None = None
        self._retry: IDelayedCall | None = None
        self.result: Deferred[AttemptTicket | Blocked] = Deferred(self._cancel)
        self._begin()

    def _begin(self) -> None:
        self._retry = None
        throttle = self._authority.throttle
        # A throttle that raises fails this admission alone: the place it
        # was woken for still goes to the next waiter.
        asked: Deferred[Refusal | Busy | Attempt] = maybeDeferred(
            throttle.begin, self._host, self._username, self._authority.clock.seconds()
        )
        asked.addCallbacks(self._answered, self._failed)

    def _pass_on(self, *, refused: bool = False) -> None:
        """
        The place it was woken for is not taken: the next waiter may have
        it; or, if C{refused}, every waiter is woken to find the block.
        """
        woken_for, self._woken_for = self._woken_for, None
        if woken_for is None:
            return
        if refused:
            self._authority.throttle.wake_all(woken_for)
        else:
            self._authority.throttle.wake_next(woken_for)

    def _answered(self, answer: Refusal | Busy | Attempt) -> None:
        if isinstance(answer, Attempt):
            # It took the place (the throttle wakes the next one if there
            # is room behind it); one withdrawn gives it back, which wakes
            # the next one too.  An attempt that holds no place (its
            # address became trusted while it waited) takes none, so the
            # next waiter gets the place it was woken for.
            if answer.holds_place:
                self._woken_for = None
            else:
                self._pass_on()
            if self._cancelled:
                answer.release()
            else:
                self.result.callback(self._authority._ticket_for(answer))
            return
        if self._cancelled:
            self._pass_on()
            return
        if isinstance(answer, Busy):
            # Still full where it was woken: so for every waiter there, and
            # it keeps its turn.
            again = answer.key == self._woken_for
            if not again:
                self._pass_on()
            self._woken_for = None
            self._waiting = True
            self._busy_key = answer.key
            self._authority.throttle.wait_for_place(self._wake, answer, first=again)
        else:
            self._pass_on(refused=True)
            # Not counted here: the caller counts it (see Blocked), so the
            # refusal is answered before the count, which may be slow.
            self.result.callback(Blocked(answer.scope))

    def _failed(self, failure: Failure) -> None:
        self._pass_on()
        if not self._cancelled:
            self.result.errback(failure)

    def _wake(self) -> None:
        self._waiting = False
        self._woken_for = self._busy_key
        # Asked again from the reactor, not from inside the end of the
        # attempt that gave the place back: no nesting, and nothing raised
        # into its caller.
        self._retry = self._authority.clock.callLater(0, self._begin)

    def _cancel(self, result: Deferred[AttemptTicket | Blocked]) -> None:
        self._cancelled = True
        if self._waiting:
            self._waiting = False
            self._authority.throttle.stop_waiting(self._wake)
        if self._retry is not None and self._retry.active():
            # Woken, and not asking again: the place goes to the next one.
            self._retry.cancel()
            self._pass_on()
        self._retry = None


@implementer(IPolicyAuthority)
class Holdings:
    """
    A L{LocalAuthority} as seen by one client (a child process): it answers
    as the authority does, and records what the client holds (tickets of
    attempts in flight, counted connections, counted sessions) so that
    L{release_all} can give all of it back when the client goes away (a
    child that died holds nothing afterwards).

    It only gives back what this client holds: a C{close_connection},
    C{end_session} or C{end_login} for something it does not hold does
    nothing, so one client cannot give back another's counts.

    An AMP responder for one child wraps one C{Holdings} and calls
    L{release_all} from C{connectionLost}.
    """

    def __init__(self, authority: LocalAuthority) -> None:
        self.authority = authority
        self._tickets: set[int] = set()
        self._connections: Counter[str] = Counter()
        self._sessions: Counter[tuple[str, str]] = Counter()
        self._pending: set[Deferred[Any]] = set()
        self._released = False

    @property
    def settings(self) -> ThrottleSettings:
        """The authority's failed-login limits."""
        return self.authority.settings

    @property
    def held(self) -> tuple[int, int, int]:
        """What this client holds: (tickets, connections, sessions)."""
        return (
            len(self._tickets),
            sum(self._connections.values()),
            sum(self._sessions.values()),
        )

    def _track(self, asked: Deferred[Any]) -> None:
        """Keep C{asked} while unanswered, for L{release_all} to cancel."""
        if asked.called:
            return
        self._pending.add(asked)

        def answered(result: object) -> object:
            self._pending.discard(asked)
            return result

        asked.addBoth(answered)

    def open_connection(self, host: str) -> Deferred[str | None]:
        def counted(breach: str | None) -> str | None:
            if breach is None:
                if self._released:
                    self.authority.close_connection(host)
                else:
                    self._connections[host] += 1
            return breach

        asked = self.authority.open_connection(host).addCallback(counted)
        self._track(asked)
        return asked

    def close_connection(self, host: str) -> None:
        if self._connections[host] <= 0:
            return
        self._connections[host] -= 1
        if not self._connections[host]:
            del self._connections[host]
        self.authority.close_connection(host)

    def begin_login(self, host: str, username: str) -> Deferred[AttemptTicket | Blocked]:
        def admitted(answer: AttemptTicket | Blocked) -> AttemptTicket | Blocked:
            if isinstance(answer, AttemptTicket):
                if self._released:
                    self.authority.end_login(answer, "released")
                else:
                    self._tickets.add(answer.number)
            return answer

        asked: Deferred[AttemptTicket | Blocked] = self.authority.begin_login(
            host, username
        ).addCallback(admitted)
        self._track(asked)
        return asked

    def end_login(self, ticket: AttemptTicket, verdict: Verdict) -> Deferred[FailureOutcome | None]:
        if ticket.number not in self._tickets:
            return succeed(None)
        self._tickets.discard(ticket.number)
        return self.authority.end_login(ticket, verdict)

    def login_failed(self, host: str, username: str) -> Deferred[FailureOutcome]:
        return self.authority.login_failed(host, username)

    def start_session(self, username: str, host: str) -> Deferred[bool]:
        asked = self._count_session(self.authority.start_session(username, host), username, host)
        self._track(asked)
        return asked

    def _count_session(self, asked: Deferred[bool], username: str, host: str) -> Deferred[bool]:
        """
        Record the session C{asked} counts as this client's (or give it
        back, if the client is gone).
        """

        def counted(started: bool) -> bool:
            if started:
                if self._released:
                    self.authority.end_session(username, host)
                else:
                    self._sessions[(username, host)] += 1
            return started

        return asked.addCallback(counted)

    def login_succeeded(self, ticket: AttemptTicket, username: str, host: str) -> Deferred[bool]:
        if ticket.number not in self._tickets:
            # Not this client's ticket (or ended already): only the session.
            return self.start_session(username, host)
        self._tickets.discard(ticket.number)
        # Not withdrawn when the client goes, as an end_login is not: the
        # success is recorded whole (the store is not interrupted), and the
        # session it counts then is given back as it comes.
        return self._count_session(
            self.authority.login_succeeded(ticket, username, host), username, host
        )

    def end_session(self, username: str, host: str) -> None:
        key = (username, host)
        if self._sessions[key] <= 0:
            return
        self._sessions[key] -= 1
        if not self._sessions[key]:
            del self._sessions[key]
        self.authority.end_session(username, host)

    def release_all(self) -> None:
        """
        The client is gone: give back every ticket (as C{released}: no
        verdict on the credentials), connection and session it holds, and
        withdraw its unanswered questions (their Deferreds fail with
        L{CancelledError}).  Anything granted later is given back at once.
        Calling it again does nothing more.
        """
        self._released = True
        for asked in list(self._pending):
            asked.addErrback(lambda failure: failure.trap(CancelledError))
            asked.cancel()
        self._pending.clear()
        tickets, self._tickets = self._tickets, set()
        for number in tickets:
            ended = self.authority.end_login(AttemptTicket(number), "released")
            ended.addErrback(
                lambda failure: _log.failure("Releasing a login attempt failed", failure)
            )
        connections, self._connections = self._connections, Counter()
        for host, count in connections.items():
            for _ in range(count):
                self.authority.close_connection(host)
        sessions, self._sessions = self._sessions, Counter()
        for (username, host), count in sessions.items():
            for _ in range(count):
                self.authority.end_session(username, host)
