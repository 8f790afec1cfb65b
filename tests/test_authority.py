"""
Tests for L{pop3srv.server.authority}: the L{LocalAuthority} (tickets,
waiting for a place, cancelling, totals) and the L{Holdings} of one client,
given back all at once.
"""

from __future__ import annotations

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
