"""
Tests for L{pop3srv.server.authority}: the L{LocalAuthority} (tickets,
waiting for a place, cancelling, totals) and the L{Holdings} of one client,
given back all at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from helpers import failure_of, result_of
from test_limits import LaterCounters
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from pop3srv.server.authority import (
    AttemptTicket,
    Blocked,
    Holdings,
    IPolicyAuthority,
    LocalAuthority,
)
from pop3srv.server.limits import ConnectionLimits, FailureOutcome, Refusal, ThrottleSettings

HOST = "192.0.2.60"


def authority(clock: MemoryReactorClock, counters: Any = None, **settings: Any) -> LocalAuthority:
    """A L{LocalAuthority} on C{clock} with C{settings} and small connection limits."""
    limits = ConnectionLimits(max_connections=3, max_per_address=2, max_sessions_per_user=1)
    return LocalAuthority(ThrottleSettings(**settings), limits, counters, clock=clock)


def ticket(d: defer.Deferred[Any]) -> AttemptTicket:
    """The ticket C{d} fired with."""
    answer = result_of(d)
    assert isinstance(answer, AttemptTicket), answer
    return answer


def test_both_provide_the_interface(clock: MemoryReactorClock) -> None:
    """A L{LocalAuthority} and its L{Holdings} are authorities, with its settings."""
    local = authority(clock, failure_delay=3)
    assert verifyObject(IPolicyAuthority, local)
    held = local.holdings()
    assert isinstance(held, Holdings) and verifyObject(IPolicyAuthority, held)
    assert held.settings is local.settings and local.settings.failure_delay == 3


def test_tickets_end_once(clock: MemoryReactorClock) -> None:
    """
    A ticket holds a place until it ends; its failure is counted and
    answered with the delay; a second end, or an unknown ticket, does
    nothing and fires L{None}.
    """
    local = authority(clock)
    first = ticket(local.begin_login(HOST, "alice"))
    second = ticket(local.begin_login(HOST, "alice"))
    assert first != second and local.attempts_in_flight == 2
    assert local.throttle.in_flight(HOST) == 2
    assert result_of(local.end_login(first, "failed")) == FailureOutcome(2.0)
    assert result_of(local.end_login(first, "failed")) is None
    assert result_of(local.end_login(AttemptTicket(999), "succeeded")) is None
    assert result_of(local.end_login(second, "released")) is None
    assert local.attempts_in_flight == 0 and local.throttle.in_flight(HOST) == 0
    counts = result_of(local.throttle.counters.count([f"pair:{HOST}:alice"], 0, 600))
    assert counts == [1]


def test_a_success_clears_the_pair(clock: MemoryReactorClock) -> None:
    """C{succeeded} forgets the pair's failures."""
    local = authority(clock)
    result_of(local.login_failed(HOST, "alice"))
    result_of(local.end_login(ticket(local.begin_login(HOST, "alice")), "succeeded"))
    assert result_of(local.throttle.counters.count([f"pair:{HOST}:alice"], 0, 600)) == [0]


def test_an_unknown_verdict_releases_and_fails(clock: MemoryReactorClock) -> None:
    """A verdict that is none of the three is a fault; the place goes back uncounted."""
    local = authority(clock)
    held = ticket(local.begin_login(HOST, "alice"))
    failure_of(local.end_login(held, "maybe"), ValueError)  # type: ignore[arg-type]
    assert local.attempts_in_flight == 0
    assert result_of(local.throttle.counters.count([f"pair:{HOST}:alice"], 0, 600)) == [0]


def test_login_failed_counts_and_blocks(clock: MemoryReactorClock) -> None:
    """Failures without a ticket count as any other: the pair limit blocks the pair."""
    local = authority(clock, pair_limit=2)
    assert result_of(local.login_failed(HOST, "alice")).lockout is None
    clock.advance(1)
    outcome = result_of(local.login_failed(HOST, "alice"))
    assert outcome == FailureOutcome(4.0, Refusal("address+user", 601.0))
    clock.advance(1)
    assert result_of(local.begin_login(HOST, "alice")) == Blocked("address+user")
    assert isinstance(result_of(local.begin_login(HOST, "bob")), AttemptTicket)


def test_a_busy_attempt_waits_inside_for_a_place(clock: MemoryReactorClock) -> None:
    """
    Past the limit, counting the checks under way, the answer waits; a
    place that frees admits it (from the reactor, not from inside the end
    of the other attempt).
    """
    local = authority(clock, pair_limit=2)
    result_of(local.login_failed(HOST, "alice"))
    first = ticket(local.begin_login(HOST, "alice"))
    waiting = local.begin_login(HOST, "alice")
    assert not waiting.called
    result_of(local.end_login(first, "released"))
    assert not waiting.called
    clock.advance(0)
    ticket(waiting)
    assert local.attempts_in_flight == 1


def test_a_waiting_attempt_blocked_by_the_failure_it_waited_for(
    clock: MemoryReactorClock,
) -> None:
    """
    The attempt in flight fails and blocks the pair: the waiting one is
    refused without a check, and not counted: the refusal is the caller's
    to count (L{LocalAuthority.login_failed}), so that it is answered
    before that count, however long the count takes.
    """
    local = authority(clock, pair_limit=2)
    result_of(local.login_failed(HOST, "alice"))
    first = ticket(local.begin_login(HOST, "alice"))
    waiting = local.begin_login(HOST, "alice")
    outcome = result_of(local.end_login(first, "failed"))
    assert outcome.lockout == Refusal("address+user", 600.0)
    clock.advance(0)
    assert result_of(waiting) == Blocked("address+user")
    assert local.attempts_in_flight == 0
    assert result_of(local.throttle.counters.count([f"pair:{HOST}:alice"], 0, 600)) == [2]


@pytest.mark.parametrize("woken", [False, True], ids=["waiting", "woken"])
def test_a_cancelled_attempt_stops_waiting(clock: MemoryReactorClock, woken: bool) -> None:
    """
    Cancelled while it waits for a place (or after the place freed, before
    it asked again): it fails with L{defer.CancelledError}, is never
    admitted, and holds nothing.
    """
    local = authority(clock, pair_limit=2)
    result_of(local.login_failed(HOST, "alice"))
    first = ticket(local.begin_login(HOST, "alice"))
    waiting = local.begin_login(HOST, "alice")
    if woken:
        result_of(local.end_login(first, "released"))
    waiting.cancel()
    failure_of(waiting, defer.CancelledError)
    assert local.throttle._waiting == {}
    if not woken:
        result_of(local.end_login(first, "released"))
    clock.advance(0)
    assert local.attempts_in_flight == 0 and local.throttle.in_flight(HOST) == 0


def test_an_attempt_cancelled_while_the_store_answers_holds_no_place(
    clock: MemoryReactorClock,
) -> None:
    """With a store across the network, an admission that comes after the cancel goes back."""
    counters = LaterCounters()
    local = authority(clock, counters)
    asked = local.begin_login(HOST, "alice")
    asked.cancel()
    failure_of(asked, defer.CancelledError)
    counters.answer()
    assert local.attempts_in_flight == 0 and local.throttle.in_flight(HOST) == 0


def test_a_store_fault_fails_the_question(clock: MemoryReactorClock) -> None:
    """A store that fails makes the authority's Deferred fail: a server fault, not a decision."""
    counters = LaterCounters()
    counters.broken = True
    local = authority(clock, counters)
    asked = local.begin_login(HOST, "alice")
    failed = local.login_failed(HOST, "alice")
    counters.answer()
    failure_of(asked, ConnectionError)
    failure_of(failed, ConnectionError)
    assert local.attempts_in_flight == 0


def test_connection_and_session_totals(clock: MemoryReactorClock) -> None:
    """Connections are counted in total and per address; sessions per user and address."""
    local = authority(clock)
    assert result_of(local.open_connection(HOST)) is None
    assert result_of(local.open_connection(HOST)) is None
    assert result_of(local.open_connection(HOST)) == "max-connections-per-address"
    assert result_of(local.open_connection("192.0.2.61")) is None
    assert result_of(local.open_connection("192.0.2.62")) == "max-connections"
    local.close_connection(HOST)
    assert result_of(local.open_connection("192.0.2.62")) is None
    assert local.connections.total == 3
    assert result_of(local.start_session("alice", HOST)) is True
    assert result_of(local.start_session("alice", HOST)) is False
    local.end_session("alice", HOST)
    assert result_of(local.start_session("alice", HOST)) is True
    assert local.connections.sessions == 1


def test_release_all_gives_back_what_one_client_holds(clock: MemoryReactorClock) -> None:
    """
    Two clients (child processes) of one authority: when one goes, its
    tickets, connections and sessions go back and its waiting question is
    withdrawn; the other's stay.  What it ended itself is not given back
    twice, and it cannot give back what the other holds.
    """
    local = authority(clock, pair_limit=3)
    gone, staying = local.holdings(), local.holdings()
    result_of(gone.open_connection(HOST))
    result_of(staying.open_connection(HOST))
    result_of(gone.open_connection("192.0.2.61"))
    assert result_of(gone.start_session("alice", HOST)) is True
    assert result_of(staying.start_session("bob", HOST)) is True
    result_of(local.login_failed(HOST, "carol"))
    ended = ticket(gone.begin_login(HOST, "carol"))
    result_of(gone.end_login(ended, "released"))
    kept = ticket(gone.begin_login(HOST, "carol"))
    theirs = ticket(staying.begin_login(HOST, "carol"))
    waiting = gone.begin_login(HOST, "carol")
    outcomes: list[Any] = []
    waiting.addBoth(outcomes.append)
    assert not outcomes
    # Not its own: nothing happens.
    assert result_of(gone.end_login(theirs, "failed")) is None
    gone.end_session("bob", HOST)
    staying.close_connection("192.0.2.61")
    assert gone.held == (1, 2, 1) and staying.held == (1, 1, 1)
    assert (local.attempts_in_flight, local.connections.total, local.connections.sessions) == (
        2,
        3,
        2,
    )

    gone.release_all()
    assert isinstance(outcomes[0], defer.Failure) and outcomes[0].check(defer.CancelledError)
    assert gone.held == (0, 0, 0) and staying.held == (1, 1, 1)
    assert (local.attempts_in_flight, local.connections.total, local.connections.sessions) == (
        1,
        1,
        1,
    )
    assert result_of(local.end_login(kept, "failed")) is None
    clock.advance(0)
    assert local.attempts_in_flight == 1 and local.throttle.in_flight(HOST) == 1
    # Nothing released counted as a failure.
    counts = result_of(local.throttle.counters.count([f"pair:{HOST}:carol"], 0, 600))
    assert counts == [1]
    gone.release_all()
    assert local.connections.total == 1


def test_grants_to_a_released_client_go_back_at_once(clock: MemoryReactorClock) -> None:
    """Whatever a gone client is granted later is given back, not held."""
    local = authority(clock)
    gone = local.holdings()
    gone.release_all()
    assert result_of(gone.open_connection(HOST)) is None
    assert result_of(gone.start_session("alice", HOST)) is True
    assert isinstance(result_of(gone.begin_login(HOST, "alice")), AttemptTicket)
    assert gone.held == (0, 0, 0)
    assert (local.attempts_in_flight, local.connections.total, local.connections.sessions) == (
        0,
        0,
        0,
    )


def test_a_ticket_granted_after_release_all_goes_back(clock: MemoryReactorClock) -> None:
    """
    A question the store is still answering when the client goes: the
    ticket it brings is not kept.
    """
    counters = LaterCounters()
    local = authority(clock, counters)
    gone = local.holdings()
    asked = gone.begin_login(HOST, "alice")
    asked.addErrback(lambda failure: None)
    gone.release_all()
    counters.answer()
    assert local.attempts_in_flight == 0 and local.throttle.in_flight(HOST) == 0


def test_login_succeeded_ends_the_attempt_and_counts_the_session(
    clock: MemoryReactorClock,
) -> None:
    """
    One question ends the attempt as a success (its place back, the pair's
    failures forgotten) and counts the session; at the session limit the
    attempt is ended all the same and the session is not counted.
    """
    local = authority(clock)
    result_of(local.login_failed(HOST, "alice"))
    first = ticket(local.begin_login(HOST, "alice"))
    assert result_of(local.login_succeeded(first, "alice", HOST)) is True
    assert local.attempts_in_flight == 0 and local.throttle.in_flight(HOST) == 0
    assert result_of(local.throttle.counters.count([f"pair:{HOST}:alice"], 0, 600)) == [0]
    assert local.connections.sessions == 1
    second = ticket(local.begin_login(HOST, "alice"))
    assert result_of(local.login_succeeded(second, "alice", HOST)) is False
    assert local.attempts_in_flight == 0 and local.connections.sessions == 1
    # Ended once: the same ticket again only asks for the session.
    assert result_of(local.login_succeeded(second, "alice", HOST)) is False


def test_login_succeeded_that_fails_holds_no_session(clock: MemoryReactorClock) -> None:
    """
    The store fails to forget the pair's failures: the question fails (a
    server fault) and the session it counted meanwhile is given back.
    """
    counters = LaterCounters()
    local = authority(clock, counters)
    asked = local.begin_login(HOST, "alice")
    counters.answer()
    held = ticket(asked)
    succeeded = local.login_succeeded(held, "alice", HOST)
    assert local.connections.sessions == 1
    counters.broken = True
    counters.answer()
    failure_of(succeeded, ConnectionError)
    assert local.connections.sessions == 0 and local.attempts_in_flight == 0


def test_holdings_keep_the_session_login_succeeded_counts(clock: MemoryReactorClock) -> None:
    """
    Through a client's L{Holdings}: the session is the client's (given
    back when it goes); another client's ticket is not ended, only the
    session counted.
    """
    local = authority(clock, pair_limit=3)
    one, two = local.holdings(), local.holdings()
    mine = ticket(one.begin_login(HOST, "alice"))
    theirs = ticket(two.begin_login(HOST, "bob"))
    assert result_of(one.login_succeeded(mine, "alice", HOST)) is True
    assert result_of(one.login_succeeded(theirs, "bob", HOST)) is True
    assert one.held == (0, 0, 2) and two.held == (1, 0, 0)
    assert local.attempts_in_flight == 1
    one.release_all()
    assert local.connections.sessions == 0 and local.attempts_in_flight == 1


def test_a_success_in_progress_when_its_client_goes_is_given_back(
    clock: MemoryReactorClock,
) -> None:
    """
    The store is still forgetting the pair's failures when the client
    goes: the success is recorded whole (the store's question is not
    interrupted), and the place and session are given back as it ends.
    """
    counters = LaterCounters()
    local = authority(clock, counters)
    gone = local.holdings()
    asked = gone.begin_login(HOST, "alice")
    counters.answer()
    succeeded = gone.login_succeeded(ticket(asked), "alice", HOST)
    assert not succeeded.called and counters.queued
    gone.release_all()
    assert not succeeded.called
    assert not any(later.called for _, later in counters.queued)
    counters.answer()
    assert result_of(succeeded) is True
    assert gone.held == (0, 0, 0)
    assert (local.attempts_in_flight, local.connections.sessions) == (0, 0)
    assert local.throttle.in_flight(HOST) == 0


class CountingBegins:
    """Counts the throttle's decisions (L{AuthThrottle.begin}) of an authority."""

    def __init__(self, local: LocalAuthority) -> None:
        self.calls = 0
        throttle = local.throttle
        begin = throttle.begin

        def counted(*args: Any) -> Any:
            self.calls += 1
            return begin(*args)

        throttle.begin = counted  # type: ignore[method-assign]


def test_a_freed_place_wakes_one_waiter(clock: MemoryReactorClock) -> None:
    """
    Six attempts wait for the address's places: each place that frees
    admits the one that waited longest, asking the throttle once, not
    every waiter to find all but one place taken again.
    """
    local = authority(clock, address_limit=2, pair_limit=100)
    held = [ticket(local.begin_login(HOST, f"user{i}")) for i in range(2)]
    waiting = [local.begin_login(HOST, f"waiter{i}") for i in range(6)]
    begins = CountingBegins(local)
    for i, place in enumerate(held):
        result_of(local.end_login(place, "succeeded"))
        clock.advance(0)
        assert [d.called for d in waiting] == [j <= i for j in range(6)]
    assert begins.calls == 2
    for d in waiting[:2]:
        result_of(local.end_login(ticket(d), "succeeded"))
        clock.advance(0)
    assert [d.called for d in waiting] == [True] * 4 + [False] * 2
    assert begins.calls == 4
    assert local.attempts_in_flight == 2


def test_waiters_of_an_address_trusted_meanwhile_are_all_admitted(
    clock: MemoryReactorClock,
) -> None:
    """
    A reload trusts the address whose attempts wait for a place: the first
    waiter woken holds no place, so it passes the place on, and every
    waiter is admitted (none waits for a place nobody will free).
    """
    local = authority(clock, address_limit=1, pair_limit=100)
    held = ticket(local.begin_login(HOST, "alice"))
    waiting = [local.begin_login(HOST, f"waiter{i}") for i in range(3)]
    assert not any(d.called for d in waiting)
    trusted = (ipaddress.ip_network(f"{HOST}/32"),)
    local.reconfigure(replace(local.settings, trusted=trusted), local.connections.limits)
    result_of(local.end_login(held, "succeeded"))
    for _ in range(4):
        clock.advance(0)
    assert all(isinstance(result_of(d), AttemptTicket) for d in waiting)


def test_room_left_behind_admits_the_next_waiters(clock: MemoryReactorClock) -> None:
    """
    A success forgets the pair's failures: the place it frees admits one
    waiter, which leaves room for the next, and so on up to the limit.
    """
    local = authority(clock, pair_limit=3)
    for _ in range(2):
        result_of(local.login_failed(HOST, "alice"))
    held = ticket(local.begin_login(HOST, "alice"))
    waiting = [local.begin_login(HOST, "alice") for _ in range(4)]
    assert not any(d.called for d in waiting)
    result_of(local.end_login(held, "succeeded"))
    clock.advance(0)
    assert [d.called for d in waiting] == [True, True, True, False]
    assert local.throttle.in_flight(HOST, "alice") == 3


def test_a_woken_waiter_that_is_withdrawn_passes_the_place_on(
    clock: MemoryReactorClock,
) -> None:
    """Woken, then withdrawn before it asked again: the next waiter gets the place."""
    local = authority(clock, address_limit=1)
    held = ticket(local.begin_login(HOST, "alice"))
    first, second = local.begin_login(HOST, "bob"), local.begin_login(HOST, "carol")
    result_of(local.end_login(held, "succeeded"))
    first.cancel()
    failure_of(first, defer.CancelledError)
    clock.advance(0)
    assert isinstance(result_of(second), AttemptTicket)
    assert local.attempts_in_flight == 1


def test_a_woken_waiter_that_finds_a_block_wakes_every_waiter(
    clock: MemoryReactorClock,
) -> None:
    """
    The pair is blocked while its attempts wait (a refusal counted): the
    first one woken finds the block, and every other waiter learns it at
    once rather than one place at a time.
    """
    local = authority(clock, pair_limit=3)
    result_of(local.login_failed(HOST, "alice"))
    held = [ticket(local.begin_login(HOST, "alice")) for _ in range(2)]
    waiting = [local.begin_login(HOST, "alice") for _ in range(4)]
    result_of(local.login_failed(HOST, "alice"))
    assert result_of(local.login_failed(HOST, "alice")).lockout is not None
    result_of(local.end_login(held[0], "released"))
    clock.advance(0)
    assert [result_of(d) for d in waiting] == [Blocked("address+user")] * 4
    assert local.throttle._waiting == {}


def test_a_woken_waiter_busy_elsewhere_passes_the_place_on(clock: MemoryReactorClock) -> None:
    """
    Woken for a place of the address, alice finds her own pair full: she
    waits there, and the address's place goes to the next waiter.
    """
    local = authority(clock, address_limit=3, pair_limit=2)
    result_of(local.login_failed(HOST, "alice"))
    ticket(local.begin_login(HOST, "alice"))
    bobs = ticket(local.begin_login(HOST, "bob"))
    alice, carol = local.begin_login(HOST, "alice"), local.begin_login(HOST, "carol")
    result_of(local.end_login(bobs, "succeeded"))
    clock.advance(0)
    assert not alice.called
    assert isinstance(result_of(carol), AttemptTicket)
    assert local.throttle.in_flight(HOST) == 2


def test_a_woken_waiter_whose_decision_fails_passes_the_place_on(
    clock: MemoryReactorClock,
) -> None:
    """
    The throttle fails (a bug) when the first waiter asks again: that
    attempt fails as a server fault, and the place goes to the next.
    """
    local = authority(clock, address_limit=1)
    held = ticket(local.begin_login(HOST, "alice"))
    first, second = local.begin_login(HOST, "bob"), local.begin_login(HOST, "carol")
    throttle = local.throttle
    begin = throttle.begin

    def broken_once(*args: Any) -> Any:
        throttle.begin = begin  # type: ignore[method-assign]
        raise RuntimeError("a bug in the throttle")

    throttle.begin = broken_once  # type: ignore[method-assign]
    result_of(local.end_login(held, "succeeded"))
    clock.advance(0)
    failure_of(first, RuntimeError)
    assert isinstance(result_of(second), AttemptTicket)
