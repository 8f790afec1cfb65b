"""
Tests for L{pop3srv.processes.authorityrpc}: children's policy questions
answered by the parent's L{LocalAuthority} over real UNIX socket pairs,
and what a child that goes held given back.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.authorityrpc import (
    AuthorityUnavailable,
    RemoteAuthority,
    WorkerConnection,
)
from pop3srv.processes.hashrelay import RelayClient
from pop3srv.processes.rpc import Peer, connect
from pop3srv.server.authority import AttemptTicket, Blocked, IPolicyAuthority, LocalAuthority
from pop3srv.server.limits import (
    ConnectionLimits,
    FailureOutcome,
    IAuthCounters,
    MemoryCounters,
    Refusal,
    ThrottleSettings,
)

SETTINGS = ThrottleSettings(
    failure_delay=1.0, max_failure_delay=15.0, address_limit=10, pair_limit=3, lockout=600.0
)
LIMITS = ConnectionLimits(max_connections=5, max_per_address=2, max_sessions_per_user=1)


def run_until(d: Deferred[Any], timeout: float = 10.0) -> Any:
    """L{helpers.run_until} with this module's shorter deadline."""
    return helpers.run_until(d, timeout)


def settle(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """
    Iterate the reactor until C{condition()} holds (a message with no
    answer has crossed), for at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    return True


class Child:
    """
    One child's two ends of a socket pair: the parent's L{WorkerConnection}
    and the child's L{RelayClient} with its L{RemoteAuthority}.
    """

    def __init__(self, authority: LocalAuthority, verifiers: dict[str, Any]) -> None:
        self.parent_end = WorkerConnection(verifiers, authority)
        self.lost: list[bool] = []
        self.client = RelayClient(on_lost=lambda: self.lost.append(True))
        self.authority = RemoteAuthority(self.client, authority.settings)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connect(reactor, ours, self.parent_end)
        connect(reactor, theirs, self.client)

    def die(self) -> None:
        """The child goes (as a killed process's socket closes)."""
        if self.client.transport is not None:
            self.client.transport.loseConnection()
        assert settle(lambda: self.parent_end.transport is None and bool(self.lost))

    def lose_parent(self) -> None:
        """The parent goes."""
        if self.parent_end.transport is not None:
            self.parent_end.transport.loseConnection()
        assert settle(lambda: bool(self.lost))


@pytest.fixture
def authority() -> LocalAuthority:
    """The parent's authority, on the real reactor's clock."""
    return LocalAuthority(SETTINGS, LIMITS, clock=reactor)  # type: ignore[arg-type]


@pytest.fixture
def child_of() -> Iterator[Callable[..., Child]]:
    """Start children of an authority; every one still there goes after the test."""
    children: list[Child] = []

    def make(authority: LocalAuthority, verifiers: dict[str, Any] | None = None) -> Child:
        children.append(Child(authority, verifiers or {}))
        return children[-1]

    yield make
    for child in children:
        if child.client.transport is not None:
            child.die()


def held(authority: LocalAuthority) -> tuple[int, int, int]:
    """What is counted in C{authority}: (attempts in flight, connections, sessions)."""
    sessions = sum(authority.connections._sessions.values())
    return authority.attempts_in_flight, authority.connections.total, sessions


def test_remote_authority_provides_the_interface(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """The child's authority is an IPolicyAuthority with the parent's settings."""
    remote = child_of(authority).authority
    assert verifyObject(IPolicyAuthority, remote)
    assert remote.settings == SETTINGS


def test_connections_are_counted_for_all_children(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    The per-address limit is a total over every child and the parent's own
    connections; a close gives the place back to any of them.
    """
    one, two = child_of(authority).authority, child_of(authority).authority
    assert run_until(one.open_connection("192.0.2.1")) is None
    assert authority.connections.open("192.0.2.1") is None  # the parent's own
    assert run_until(two.open_connection("192.0.2.1")) == "max-connections-per-address"
    assert run_until(one.open_connection("192.0.2.1")) == "max-connections-per-address"
    assert run_until(two.open_connection("192.0.2.2")) is None
    one.close_connection("192.0.2.1")
    assert settle(lambda: authority.connections.total == 2)
    assert run_until(two.open_connection("192.0.2.1")) is None
    assert held(authority) == (0, 3, 0)


def test_a_ticket_and_its_failure_cross(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    begin_login grants a ticket; its failure comes back with the delay, and
    the one that reaches the pair limit with the block (scope and end); the
    next attempt, from any child, is blocked.
    """
    one, two = child_of(authority).authority, child_of(authority).authority
    outcomes: list[FailureOutcome] = []
    for remote in (one, two, one):
        ticket = run_until(remote.begin_login("192.0.2.7", "alice"))
        assert isinstance(ticket, AttemptTicket)
        assert authority.attempts_in_flight == 1
        outcomes.append(run_until(remote.end_login(ticket, "failed")))
    assert [o.lockout for o in outcomes[:2]] == [None, None]
    assert [o.delay for o in outcomes] == [1.0, 2.0, 4.0]
    lockout = outcomes[2].lockout
    assert isinstance(lockout, Refusal)
    assert lockout.scope == "address+user"
    assert lockout.until == pytest.approx(reactor.seconds() + SETTINGS.lockout, abs=5)
    for remote in (one, two):
        blocked = run_until(remote.begin_login("192.0.2.7", "alice"))
        assert blocked == Blocked("address+user")
    # Another user from that address is not blocked.
    assert isinstance(run_until(two.begin_login("192.0.2.7", "bob")), AttemptTicket)


@pytest.mark.parametrize("verdict", ["succeeded", "released"])
def test_other_verdicts_answer_nothing(
    authority: LocalAuthority, child_of: Callable[..., Child], verdict: str
) -> None:
    """A success or a release answers None and gives the place back."""
    remote = child_of(authority).authority
    ticket = run_until(remote.begin_login("192.0.2.7", "alice"))
    assert run_until(remote.end_login(ticket, verdict)) is None  # type: ignore[arg-type]
    assert authority.attempts_in_flight == 0
    # Ended once; a second end does nothing.
    assert run_until(remote.end_login(ticket, "failed")) is None


def test_a_success_forgets_the_pairs_failures(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """A success through a child clears the pair's failures in the parent."""
    remote = child_of(authority).authority
    for _ in range(SETTINGS.pair_limit - 1):
        run_until(remote.end_login(run_until(remote.begin_login("192.0.2.7", "alice")), "failed"))
    run_until(remote.end_login(run_until(remote.begin_login("192.0.2.7", "alice")), "succeeded"))
    ticket = run_until(remote.begin_login("192.0.2.7", "alice"))
    assert run_until(remote.end_login(ticket, "failed")).lockout is None


def test_a_child_cannot_end_anothers_ticket(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """A ticket number from another child is not this child's to end."""
    one, two = child_of(authority).authority, child_of(authority).authority
    ticket = run_until(one.begin_login("192.0.2.7", "alice"))
    assert run_until(two.end_login(ticket, "failed")) is None
    assert authority.attempts_in_flight == 1
    assert run_until(one.end_login(ticket, "failed")).delay == 1.0


def test_an_unknown_verdict_releases_and_fails(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """A verdict that is not one fails the question and gives the place back."""
    remote = child_of(authority).authority
    ticket = run_until(remote.begin_login("192.0.2.7", "alice"))
    with pytest.raises(AuthorityUnavailable):
        run_until(remote.end_login(ticket, "maybe"))  # type: ignore[arg-type]
    assert authority.attempts_in_flight == 0


def test_login_failed_counts_without_a_ticket(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """login_failed counts a failure and answers its outcome, block included."""
    remote = child_of(authority).authority
    outcomes = [
        run_until(remote.login_failed("192.0.2.8", "carol")) for _ in range(SETTINGS.pair_limit)
    ]
    assert outcomes[0] == FailureOutcome(1.0, None)
    assert outcomes[-1].lockout is not None
    assert outcomes[-1].lockout.scope == "address+user"
    assert isinstance(run_until(remote.begin_login("192.0.2.8", "carol")), Blocked)


def test_sessions_are_counted_for_all_children(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """max_sessions_per_user holds across children; an end frees the place."""
    one, two = child_of(authority).authority, child_of(authority).authority
    assert run_until(one.start_session("alice", "192.0.2.1")) is True
    assert run_until(two.start_session("alice", "192.0.2.1")) is False
    assert run_until(two.start_session("alice", "192.0.2.2")) is True
    # A child's end for a session it does not hold does nothing.
    two.end_session("alice", "192.0.2.1")
    one.end_session("alice", "192.0.2.1")
    assert settle(lambda: held(authority) == (0, 0, 1))
    assert run_until(two.start_session("alice", "192.0.2.1")) is True


def test_a_child_that_goes_gives_everything_back(
    authority: LocalAuthority, child_of: Callable[..., Child], log_events: list[Any]
) -> None:
    """
    A child that dies holding connections, a session and attempts in flight
    leaks none of them; the other child's holdings stay.
    """
    dying, staying = child_of(authority), child_of(authority)
    for host in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        assert run_until(dying.authority.open_connection(host)) is None
    assert run_until(dying.authority.start_session("alice", "192.0.2.1"))
    tickets = [run_until(dying.authority.begin_login("192.0.2.9", u)) for u in ("a", "b")]
    assert all(isinstance(t, AttemptTicket) for t in tickets)
    assert run_until(staying.authority.open_connection("192.0.2.1")) == (
        "max-connections-per-address"
    )
    assert run_until(staying.authority.open_connection("192.0.2.3")) is None
    assert held(authority) == (2, 4, 1)
    dying.die()
    assert held(authority) == (0, 1, 0)
    assert run_until(staying.authority.open_connection("192.0.2.1")) is None
    assert run_until(staying.authority.start_session("alice", "192.0.2.1")) is True
    text = " ".join(str(e.get("log_format")) for e in log_events)
    assert "Gave back what a server process that went held" in text
    # The dead child's attempts counted for nothing: no failure, no delay growth.
    ticket = run_until(staying.authority.begin_login("192.0.2.9", "a"))
    assert run_until(staying.authority.end_login(ticket, "failed")).delay == 1.0


def waiting_login(authority: LocalAuthority, child: Child) -> tuple[list[Any], Deferred[Any]]:
    """
    Fill the pair's places with the parent's own attempts so the next
    begin_login waits; then ask it through C{child}.

    @return: the parent's attempts (end them to free a place) and the
        child's waiting question.
    """
    own = [
        helpers.result_of(authority.begin_login("192.0.2.9", "dave"))
        for _ in range(SETTINGS.pair_limit)
    ]
    assert all(isinstance(t, AttemptTicket) for t in own)
    asked = child.authority.begin_login("192.0.2.9", "dave")
    # It reached the parent and waits there.
    assert settle(lambda: bool(child.parent_end.authority.holdings._pending))
    assert not asked.called
    return own, asked


def failures(log_events: list[Any]) -> list[str]:
    """The text of every failure logged."""
    return [formatEvent(e) for e in log_events if "log_failure" in e]


def test_a_login_waiting_in_the_parent_for_a_child_that_goes(
    authority: LocalAuthority, child_of: Callable[..., Child], log_events: list[Any]
) -> None:
    """
    A begin_login waiting for a place in the parent when its child goes
    holds no place, then or later, and its withdrawal is no error.
    """
    child = child_of(authority)
    own, asked = waiting_login(authority, child)
    asked.addErrback(lambda f: f.trap(AuthorityUnavailable))
    child.die()
    for ticket in own:
        helpers.result_of(authority.end_login(ticket, "released"))
    settle(lambda: False, timeout=0.2)  # a retry of the waiting attempt would run now
    assert held(authority) == (0, 0, 0)
    assert failures(log_events) == []


def test_a_withdrawn_login_holds_nothing(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    A begin_login the child cancels while it waits in the parent: when a
    place frees, the parent has granted it nothing, or the child gives back
    what the parent granted as the withdrawal crossed.
    """
    child = child_of(authority)
    own, asked = waiting_login(authority, child)
    asked.cancel()
    helpers.failure_of(asked, CancelledError)
    helpers.result_of(authority.end_login(own[0], "released"))
    holdings = child.parent_end.authority.holdings
    assert settle(
        lambda: not holdings._pending and authority.attempts_in_flight == SETTINGS.pair_limit - 1
    )
    assert holdings.held == (0, 0, 0)
    for ticket in own[1:]:
        helpers.result_of(authority.end_login(ticket, "released"))
    assert held(authority) == (0, 0, 0)


def test_a_withdrawn_login_stops_waiting_in_the_parent(
    authority: LocalAuthority, child_of: Callable[..., Child], log_events: list[Any]
) -> None:
    """
    A begin_login the child cancels (its deadline) while it waits in the
    parent for a place stops waiting there too: a block that starts
    meanwhile wakes nothing, and no failure is counted for it; the
    withdrawal is no error.
    """
    host, pair = "192.0.2.9", "pair:192.0.2.9:bob"
    remote = child_of(authority).authority
    for _ in range(SETTINGS.pair_limit - 1):
        run_until(authority.login_failed(host, "bob"))
    in_flight = run_until(authority.begin_login(host, "bob"))
    asked = remote.begin_login(host, "bob")
    assert settle(lambda: len(authority.throttle._waiting) == 1)
    asked.cancel()
    helpers.failure_of(asked, CancelledError)
    assert settle(lambda: authority.throttle._waiting == {})
    # The attempt in flight fails and blocks the pair: only its failure counts.
    outcome = run_until(authority.end_login(in_flight, "failed"))
    assert outcome.lockout is not None
    settle(lambda: False, timeout=0.2)  # a woken waiter would count now
    assert run_until(authority.throttle.counters.count([pair], reactor.seconds(), 600)) == [
        SETTINGS.pair_limit
    ]
    assert held(authority) == (0, 0, 0)
    assert failures(log_events) == []


def test_a_withdrawal_that_crosses_the_grant_gives_the_ticket_back() -> None:
    """
    The parent grants the ticket just as the child withdraws: the
    withdrawal finds nothing waiting, and the child gives the ticket back
    as it comes.
    """
    clock = MemoryReactorClock()
    authority = LocalAuthority(SETTINGS, LIMITS, clock=clock)
    parent_end = WorkerConnection({}, authority)
    client = RelayClient()
    remote = RemoteAuthority(client, SETTINGS)
    to_parent, to_child = StringTransport(), StringTransport()
    client.makeConnection(to_parent)
    parent_end.makeConnection(to_child)

    def deliver() -> None:
        while to_parent.value() or to_child.value():
            for src, dst in ((to_parent, parent_end), (to_child, client)):
                stream = src.value()
                src.clear()
                dst.dataReceived(stream)

    own = [
        helpers.result_of(authority.begin_login("192.0.2.9", "dave"))
        for _ in range(SETTINGS.pair_limit)
    ]
    asked = remote.begin_login("192.0.2.9", "dave")
    deliver()
    assert len(authority.throttle._waiting) == 1
    helpers.result_of(authority.end_login(own[0], "released"))
    clock.advance(0)  # the parent grants the place: the answer is on its way
    assert authority.attempts_in_flight == SETTINGS.pair_limit
    asked.cancel()
    helpers.failure_of(asked, CancelledError)
    deliver()
    assert authority.attempts_in_flight == SETTINGS.pair_limit - 1
    assert parent_end.authority.holdings.held == (0, 0, 0)
    assert authority.throttle._waiting == {}


def test_a_lost_parent_fails_every_question(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    When the parent goes, questions in flight and later ones fail with
    AuthorityUnavailable (a server fault, never a decision); those without
    an answer are dropped quietly (the parent gave everything back).
    """
    child = child_of(authority)
    own, asked = waiting_login(authority, child)
    child.lose_parent()
    with pytest.raises(AuthorityUnavailable, match="BeginLogin"):
        run_until(asked)
    remote = child.authority
    questions: list[Deferred[Any]] = [
        remote.open_connection("192.0.2.1"),
        remote.begin_login("192.0.2.1", "alice"),
        remote.end_login(AttemptTicket(1), "failed"),
        remote.login_failed("192.0.2.1", "alice"),
        remote.start_session("alice", "192.0.2.1"),
        remote.login_succeeded(AttemptTicket(1), "alice", "192.0.2.1"),
    ]
    for d in questions:
        helpers.failure_of(d, AuthorityUnavailable)
    remote.close_connection("192.0.2.1")
    remote.end_session("alice", "192.0.2.1")
    assert child.lost == [True]
    for ticket in own:
        helpers.result_of(authority.end_login(ticket, "released"))
    assert held(authority) == (0, 0, 0)


@implementer(IAuthCounters)
class BrokenCounters(MemoryCounters):
    """A counter store that cannot record failures (Redis down, say)."""

    def add(self, keys: Any, now: float, window: float) -> Deferred[list[int]]:
        return fail(ConnectionRefusedError("the store is down"))


def test_a_parent_that_cannot_answer_is_a_fault(
    child_of: Callable[..., Child], log_events: list[Any]
) -> None:
    """
    A question the parent's authority fails is AuthorityUnavailable in the
    child (a server fault), and the connection goes on.
    """
    authority = LocalAuthority(SETTINGS, LIMITS, BrokenCounters(), clock=reactor)  # type: ignore[arg-type]
    remote = child_of(authority).authority
    with pytest.raises(AuthorityUnavailable):
        run_until(remote.login_failed("192.0.2.1", "alice"))
    ticket = run_until(remote.begin_login("192.0.2.1", "alice"))
    with pytest.raises(AuthorityUnavailable):
        run_until(remote.end_login(ticket, "failed"))
    assert authority.attempts_in_flight == 0
    assert run_until(remote.open_connection("192.0.2.1")) is None
    logged = failures(log_events)
    assert len(logged) == 2
    assert "could not answer LoginFailed for a server process" in logged[0]
    assert "could not answer EndLogin for a server process" in logged[1]


def test_a_callers_error_stays_the_callers(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    An exception in the child's own callbacks on an answer does not reach
    AMP, which would close the connection (and stop the child) for it.
    """
    child = child_of(authority)

    def broken(_: object) -> None:
        raise RuntimeError("the caller's bug")

    with pytest.raises(RuntimeError):
        run_until(child.authority.open_connection("192.0.2.1").addCallback(broken))
    settle(lambda: False, timeout=0.1)
    assert child.lost == []
    assert run_until(child.authority.start_session("alice", "192.0.2.1")) is True


def test_one_connection_carries_checks_and_questions(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """The hashing relay and the authority share the child's one connection."""
    child = child_of(authority, {"/users": lambda u, p: succeed(VerifyResult(ok=u == "alice"))})
    check = child.client.verifier("/users")
    ticket = run_until(child.authority.begin_login("192.0.2.1", "alice"))
    assert run_until(check("alice", "pw")).ok
    assert run_until(child.authority.end_login(ticket, "succeeded")) is None
    assert run_until(check("eve", "pw")).ok is False


def test_the_wire_carries_typed_fields() -> None:
    """
    Over a byte stream split at every few bytes, each answer keeps its
    type: a ticket number, a block's scope and delay, a lockout's end.
    """
    authority = LocalAuthority(SETTINGS, LIMITS, clock=reactor)  # type: ignore[arg-type]
    parent_end = WorkerConnection({}, authority)
    client = RelayClient()
    remote = RemoteAuthority(client, SETTINGS)
    to_parent, to_child = StringTransport(), StringTransport()
    client.makeConnection(to_parent)
    parent_end.makeConnection(to_child)

    def exchange(d: Deferred[Any]) -> Any:
        for src, dst in ((to_parent, parent_end), (to_child, client)):
            stream = src.value()
            src.clear()
            for i in range(0, len(stream), 5):
                dst.dataReceived(stream[i : i + 5])
        return helpers.result_of(d)

    outcome = None
    for _ in range(SETTINGS.pair_limit):
        ticket = exchange(remote.begin_login("2001:db8::1", "üser"))
        assert isinstance(ticket, AttemptTicket) and isinstance(ticket.number, int)
        outcome = exchange(remote.end_login(ticket, "failed"))
    assert outcome is not None and outcome.lockout is not None
    assert isinstance(outcome.lockout.until, float)
    blocked = exchange(remote.begin_login("2001:db8::1", "üser"))
    assert blocked == Blocked("address+user")
    assert exchange(remote.start_session("üser", "2001:db8::1")) is True
    parent_end.connectionLost(Failure(ConnectionDone()))
    assert held(authority) == (0, 0, 0)


def test_a_withdrawn_count_is_given_back(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """A connection or session counted after the child cancelled its question is given back."""
    remote = child_of(authority).authority
    ticket = run_until(remote.begin_login("192.0.2.1", "carol"))
    opened, started = remote.open_connection("192.0.2.1"), remote.start_session("bob", "192.0.2.1")
    succeeded = remote.login_succeeded(ticket, "carol", "192.0.2.1")
    for d in (opened, started, succeeded):
        d.cancel()
        helpers.failure_of(d, CancelledError)
    # Both are counted in the parent, then given back by the child as the
    # answers come: else the second connection or the session breaks a limit.
    assert run_until(remote.open_connection("192.0.2.1")) is None
    assert run_until(remote.open_connection("192.0.2.1")) is None
    assert run_until(remote.start_session("bob", "192.0.2.1")) is True
    assert run_until(remote.start_session("carol", "192.0.2.1")) is True
    assert authority.attempts_in_flight == 0


def test_login_succeeded_crosses_as_one_question(
    authority: LocalAuthority, child_of: Callable[..., Child]
) -> None:
    """
    A successful login's end and its session's count are one question
    (LoginSucceeded), answered as the session's count: the ticket ends
    either way, the session limit holds across children, and a session
    a child that goes held is given back.
    """
    one, two = child_of(authority), child_of(authority)
    asked: list[bytes] = []
    locate = one.parent_end.locateResponder

    def recorded(name: bytes) -> Any:
        asked.append(name)
        return locate(name)

    one.parent_end.locateResponder = recorded  # type: ignore[method-assign]
    remote = one.authority
    assert run_until(remote.open_connection("192.0.2.1")) is None
    ticket = run_until(remote.begin_login("192.0.2.1", "alice"))
    assert run_until(remote.login_succeeded(ticket, "alice", "192.0.2.1")) is True
    assert asked == [b"OpenConnection", b"BeginLogin", b"LoginSucceeded"]
    assert held(authority) == (0, 1, 1)
    theirs = run_until(two.authority.begin_login("192.0.2.1", "alice"))
    assert run_until(two.authority.login_succeeded(theirs, "alice", "192.0.2.1")) is False
    assert held(authority) == (0, 1, 1)
    # Ended already: a second end does nothing.
    assert run_until(two.authority.end_login(theirs, "failed")) is None
    one.die()
    assert held(authority) == (0, 0, 0)


class Boxes:
    """An AMP box receiver that keeps what it is given."""

    def __init__(self) -> None:
        self.boxes: list[dict[bytes, bytes]] = []
        self.stopped: list[Failure] = []

    def startReceivingBoxes(self, sender: Any) -> None:
        pass

    def ampBoxReceived(self, box: dict[bytes, bytes]) -> None:
        assert isinstance(box, amp.AmpBox)
        self.boxes.append(dict(box))

    def stopReceivingBoxes(self, reason: Failure) -> None:
        self.stopped.append(reason)


def reading(receiver: Any) -> tuple[Peer, StringTransport]:
    """A L{Peer} that gives the boxes it reads to C{receiver}."""
    peer = Peer()
    peer.boxReceiver = receiver
    transport = StringTransport()
    peer.makeConnection(transport)
    return peer, transport


amp_boxes = st.lists(
    st.dictionaries(
        st.binary(min_size=1, max_size=255),
        st.binary(max_size=300) | st.just(b"v" * amp.MAX_VALUE_LENGTH),
        max_size=6,
    ),
    max_size=6,
)


@given(boxes=amp_boxes, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_boxes_are_read_however_the_stream_is_split(
    boxes: list[dict[bytes, bytes]], cuts: list[int]
) -> None:
    """
    The boxes AMP writes are read back whole and in order, wherever the
    byte stream is cut (empty boxes and values at AMP's cap included).
    """
    stream = b"".join(amp.AmpBox(box).serialize() for box in boxes)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    receiver = Boxes()
    peer, _ = reading(receiver)
    for start, end in itertools.pairwise(points):
        peer.dataReceived(stream[start:end])
    assert receiver.boxes == boxes
    assert peer._unparsed == b"" and peer._box is None


def test_a_key_too_long_ends_the_connection() -> None:
    """A key past AMP's 255 bytes drops the connection, as Twisted's parser does."""
    receiver = Boxes()
    peer, transport = reading(receiver)
    good = amp.AmpBox({b"k": b"v"}).serialize()
    peer.dataReceived(good + b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00")
    assert receiver.boxes == [{b"k": b"v"}]
    assert transport.disconnecting
    peer.dataReceived(good)
    assert receiver.boxes == [{b"k": b"v"}]
    peer.connectionLost(Failure(ConnectionDone()))
    assert receiver.stopped[0].check(amp.TooLong)


def test_data_that_comes_while_a_box_is_delivered_is_read_after_it() -> None:
    """
    A box whose delivery brings more data at once (a loopback) is followed
    by the rest of the first data, then by the new data, in order.
    """
    stream = [amp.AmpBox({b"n": b"%d" % i}).serialize() for i in range(4)]

    class Echo(Boxes):
        def ampBoxReceived(self, box: dict[bytes, bytes]) -> None:
            super().ampBoxReceived(box)
            if box == {b"n": b"0"}:
                peer.dataReceived(stream[2] + stream[3][:3])
                peer.dataReceived(stream[3][3:])

    receiver = Echo()
    peer, _ = reading(receiver)
    peer.dataReceived(stream[0] + stream[1])
    assert receiver.boxes == [{b"n": b"%d" % i} for i in range(4)]
