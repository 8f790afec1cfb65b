"""Tests for L{pop3srv.server.limits}: throttle, lockouts, IP rules and counters."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from helpers import failure_of, result_of
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3srv.server.limits import (
    AccessRules,
    Attempt,
    AuthThrottle,
    Busy,
    ConnectionCounter,
    ConnectionLimits,
    FailureOutcome,
    IAuthCounters,
    LoginGate,
    MemoryCounters,
    Refusal,
    ThrottleSettings,
    events_to_keep,
    in_networks,
    normalise_address,
)


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Networks from CIDR strings."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def failed(throttle: AuthThrottle, address: str, user: str, now: float) -> FailureOutcome:
    """L{AuthThrottle.failed}, whose answer is there at once (memory counters)."""
    outcome: FailureOutcome = result_of(throttle.failed(address, user, now))
    return outcome


def begin(throttle: AuthThrottle, address: str, user: str, now: float) -> Refusal | Busy | Attempt:
    """L{AuthThrottle.begin}, answered at once."""
    answer: Refusal | Busy | Attempt = result_of(throttle.begin(address, user, now))
    return answer


def check(throttle: AuthThrottle, address: str, user: str, now: float) -> Refusal | None:
    """L{AuthThrottle.check}, answered at once."""
    refusal: Refusal | None = result_of(throttle.check(address, user, now))
    return refusal


def count(counters: IAuthCounters, key: str, now: float, window: float = 600) -> int:
    """One key's count."""
    counts: list[int] = result_of(counters.count([key], now, window))
    return counts[0]


def test_failure_delay_grows_and_is_capped() -> None:
    """Repeated failures from one address wait 2, 4, 8 ... seconds, never above the cap."""
    throttle = AuthThrottle(ThrottleSettings(address_limit=100, pair_limit=100))
    delays = [failed(throttle, "192.0.2.1", f"user{i}", now=i).delay for i in range(7)]
    assert delays == [2, 4, 8, 15, 15, 15, 15]


def test_unknown_and_known_users_share_the_delay() -> None:
    """The delay depends on counts, not on whether the user exists."""
    a = AuthThrottle(ThrottleSettings())
    b = AuthThrottle(ThrottleSettings())
    assert failed(a, "192.0.2.1", "alice", 0).delay == failed(b, "192.0.2.1", "nosuchuser", 0).delay


def test_address_lockout_and_expiry() -> None:
    """Ten failures from one address block it for the lockout period, then it is free."""
    throttle = AuthThrottle(ThrottleSettings(lockout=600))
    outcomes = [failed(throttle, "192.0.2.9", f"u{i}", now=float(i)) for i in range(10)]
    assert [o.lockout for o in outcomes[:9]] == [None] * 9
    assert outcomes[9].lockout is not None and outcomes[9].lockout.scope == "address"
    refusal = check(throttle, "192.0.2.9", "anyone", now=100)
    assert refusal is not None and refusal.until == 609
    assert check(throttle, "192.0.2.10", "anyone", now=100) is None
    assert check(throttle, "192.0.2.9", "anyone", now=610) is None


def test_pair_lockout_does_not_block_other_users_of_the_address() -> None:
    """Five failures for alice from one address block that pair only."""
    throttle = AuthThrottle(ThrottleSettings())
    for i in range(5):
        outcome = failed(throttle, "198.51.100.1", "alice", now=i)
    assert outcome.lockout is not None and outcome.lockout.scope == "address+user"
    assert check(throttle, "198.51.100.1", "alice", now=10) is not None
    assert check(throttle, "198.51.100.1", "bob", now=10) is None
    assert check(throttle, "198.51.100.2", "alice", now=10) is None


def test_a_second_block_of_the_address_is_not_started_while_one_holds() -> None:
    """
    Failures past the address limit while the address is blocked start no
    new address block; the pair limit may still block the pair.
    """
    throttle = AuthThrottle(ThrottleSettings(address_limit=2, pair_limit=3, lockout=600))
    failed(throttle, "192.0.2.40", "alice", 0)
    first = failed(throttle, "192.0.2.40", "alice", 1).lockout
    assert first == Refusal("address", 601)
    assert failed(throttle, "192.0.2.40", "alice", 2).lockout == Refusal("address+user", 602)
    assert failed(throttle, "192.0.2.40", "alice", 3).lockout is None


def test_spread_attack_slows_but_never_locks_out_the_user() -> None:
    """Failures for alice from 200 addresses only slow alice; her own address stays open."""
    throttle = AuthThrottle(ThrottleSettings())
    delays = []
    for i in range(200):
        outcome = failed(throttle, f"10.0.{i // 250}.{i % 250}", "alice", now=i)
        assert outcome.lockout is None
        delays.append(outcome.delay)
    assert delays[0] == 2 and delays[-1] == 15
    assert check(throttle, "203.0.113.5", "alice", now=300) is None


def test_success_resets_the_pair() -> None:
    """A successful login forgets the failures of that address and username."""
    throttle = AuthThrottle(ThrottleSettings())
    for i in range(4):
        failed(throttle, "192.0.2.3", "alice", now=i)
    result_of(throttle.succeeded("192.0.2.3", "alice"))
    assert failed(throttle, "192.0.2.3", "alice", now=5).lockout is None


def test_attempts_in_flight_count_towards_the_limits() -> None:
    """
    Attempts hold a place from their start: past the limit, counting the
    failures so far and the checks under way, an attempt must wait (it is
    not refused, nor counted); an attempt that ends without a verdict gives
    its place back uncounted and wakes the waiting ones.
    """
    throttle = AuthThrottle(ThrottleSettings(address_limit=4, pair_limit=3))
    failed(throttle, "192.0.2.8", "alice", now=0)
    attempts = [begin(throttle, "192.0.2.8", "alice", now=1) for _ in range(3)]
    assert [type(a) for a in attempts] == [Attempt, Attempt, Busy]
    assert attempts[2] == Busy("address+user")
    assert isinstance(begin(throttle, "192.0.2.8", "bob", now=1), Attempt)
    assert begin(throttle, "192.0.2.8", "carol", now=1) == Busy("address")
    woken: list[int] = []
    throttle.wait_for_place(lambda: woken.append(1))
    first, second = attempts[0], attempts[1]
    assert isinstance(first, Attempt) and isinstance(second, Attempt)
    first.release()
    assert woken == [1] and first.ended
    first.release()
    assert woken == [1]
    assert throttle.in_flight("192.0.2.8", "alice") == 1
    assert count(throttle.counters, "pair:192.0.2.8:alice", 1) == 1
    assert result_of(second.failed(now=2)).lockout is None
    assert throttle.in_flight("192.0.2.8") == 1
    assert count(throttle.counters, "pair:192.0.2.8:alice", 2) == 2


def test_a_waiter_that_stops_waiting_is_not_woken() -> None:
    """L{AuthThrottle.stop_waiting} forgets a waiter."""
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2))
    failed(throttle, "192.0.2.30", "alice", now=0)
    held = begin(throttle, "192.0.2.30", "alice", now=1)
    busy = begin(throttle, "192.0.2.30", "alice", now=1)
    assert isinstance(held, Attempt) and isinstance(busy, Busy)
    woken: list[str] = []

    def gone() -> None:
        woken.append("gone")

    throttle.wait_for_place(gone, busy)
    throttle.wait_for_place(lambda: woken.append("kept"), busy)
    throttle.stop_waiting(gone)
    throttle.stop_waiting(gone)
    held.release()
    assert woken == ["kept"]


def test_waiters_of_a_counter_are_woken_one_at_a_time() -> None:
    """
    A place that frees wakes the first waiter of its counter only; one put
    back at the front is woken first; L{AuthThrottle.wake_next} passes a
    place on, L{AuthThrottle.wake_all} wakes the rest.
    """
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2))
    failed(throttle, "192.0.2.31", "alice", now=0)
    held = begin(throttle, "192.0.2.31", "alice", now=1)
    busy = begin(throttle, "192.0.2.31", "alice", now=1)
    assert isinstance(held, Attempt) and isinstance(busy, Busy)
    woken: list[str] = []
    for name in ("a", "b", "c"):
        throttle.wait_for_place(lambda n=name: woken.append(n), busy)
    throttle.wait_for_place(lambda: woken.append("again"), busy, first=True)
    held.release()
    assert woken == ["again"]
    throttle.wake_next(busy.key)
    assert woken == ["again", "a"]
    throttle.wake_all(busy.key)
    assert woken == ["again", "a", "b", "c"]
    throttle.wake_next(busy.key)
    assert throttle._waiting == {}


def test_a_failure_that_blocks_wakes_every_waiter() -> None:
    """The failure that blocks the pair wakes all its waiters: each is refused now."""
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2))
    failed(throttle, "192.0.2.32", "alice", now=0)
    held = begin(throttle, "192.0.2.32", "alice", now=1)
    busy = begin(throttle, "192.0.2.32", "alice", now=1)
    assert isinstance(held, Attempt) and isinstance(busy, Busy)
    woken: list[int] = []
    for i in range(3):
        throttle.wait_for_place(lambda i=i: woken.append(i), busy)
    assert result_of(held.failed(now=2)).lockout is not None
    assert woken == [0, 1, 2]
    assert begin(throttle, "192.0.2.32", "alice", now=2) == Refusal("address+user", 602)


def test_success_ends_the_attempt_and_clears_the_pair() -> None:
    """A success gives the place back and forgets the pair's failures, once."""
    throttle = AuthThrottle(ThrottleSettings())
    failed(throttle, "192.0.2.9", "alice", now=0)
    attempt = begin(throttle, "192.0.2.9", "alice", now=1)
    assert isinstance(attempt, Attempt)
    result_of(attempt.succeeded())
    assert throttle.in_flight("192.0.2.9") == 0
    assert count(throttle.counters, "pair:192.0.2.9:alice", 1) == 0
    failed(throttle, "192.0.2.9", "alice", now=2)
    result_of(attempt.succeeded())
    assert count(throttle.counters, "pair:192.0.2.9:alice", 2) == 1


def test_after_a_lockout_one_attempt_at_a_time_until_the_window_forgets() -> None:
    """
    A block shorter than the window: when it ends the failures still count,
    so one attempt may run (as before, its failure blocks again) but not a
    second beside it.
    """
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2, lockout=10, window=600))
    failed(throttle, "192.0.2.10", "alice", now=0)
    assert failed(throttle, "192.0.2.10", "alice", now=1).lockout is not None
    assert isinstance(begin(throttle, "192.0.2.10", "alice", now=5), Refusal)
    first = begin(throttle, "192.0.2.10", "alice", now=20)
    assert isinstance(first, Attempt)
    assert isinstance(begin(throttle, "192.0.2.10", "alice", now=20), Busy)
    assert result_of(first.failed(now=21)).lockout is not None
    assert isinstance(begin(throttle, "192.0.2.10", "alice", now=21), Refusal)


def test_trusted_attempts_hold_no_place() -> None:
    """A trusted address is never refused for attempts in flight."""
    throttle = AuthThrottle(ThrottleSettings(pair_limit=1, trusted=nets("192.0.2.0/24")))
    attempts = [begin(throttle, "192.0.2.77", "alice", now=0) for _ in range(5)]
    assert all(isinstance(a, Attempt) for a in attempts)
    assert throttle.in_flight("192.0.2.77") == 0


def test_trusted_networks_are_exempt() -> None:
    """A trusted address is never blocked and waits only the base delay."""
    throttle = AuthThrottle(ThrottleSettings(trusted=nets("192.0.2.0/24")))
    for i in range(50):
        outcome = failed(throttle, "192.0.2.77", "alice", now=i)
        assert outcome.lockout is None and outcome.delay == 2
    assert check(throttle, "192.0.2.77", "alice", now=60) is None


def test_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    """::ffff:192.0.2.1 and 192.0.2.1 share one counter."""
    throttle = AuthThrottle(ThrottleSettings(address_limit=2))
    failed(throttle, "::ffff:192.0.2.1", "a", 0)
    assert failed(throttle, "192.0.2.1", "b", 1).lockout is not None


def test_memory_counters_provide_the_interface_and_answer_per_key() -> None:
    """Every question takes several keys and answers for each, in order."""
    counters = MemoryCounters()
    assert verifyObject(IAuthCounters, counters)
    assert result_of(counters.add(["a", "b"], now=1, window=60)) == [1, 1]
    assert result_of(counters.add(["a", "c"], now=2, window=60)) == [2, 1]
    assert result_of(counters.count(["c", "a", "b", "z"], now=2, window=60)) == [1, 2, 1, 0]
    assert result_of(counters.count(["a"], now=61.5, window=60)) == [1]
    result_of(counters.block("a", until=100))
    assert result_of(counters.blocked_until(["a", "b"], now=50)) == [100, None]
    assert result_of(counters.blocked_until(["a"], now=100)) == [None]
    result_of(counters.block("b", until=100))
    result_of(counters.clear(["a", "b"]))
    assert result_of(counters.count(["a", "b", "c"], now=2, window=60)) == [0, 0, 1]
    assert result_of(counters.blocked_until(["b"], now=50)) == [None]


def test_memory_counters_are_bounded() -> None:
    """However many keys an attacker makes up, only max_keys are kept."""
    counters = MemoryCounters(max_events=4, max_keys=100)
    for i in range(10_000):
        counters.add([f"user:{i}"], now=0, window=60)
        counters.block(f"addr:{i}", until=10)
    assert len(counters._events) <= 100 and len(counters._blocks) <= 100
    for _ in range(10):
        counters.add(["k"], now=1, window=60)
    assert count(counters, "k", now=1, window=60) == 4


def block_of_address(throttle: AuthThrottle, failures: int) -> int | None:
    """
    Count C{failures} failures from one address, each for another user (so
    no pair is blocked first).

    @return: which failure blocked the address, or L{None}.
    """
    for i in range(1, failures + 1):
        outcome = failed(throttle, "192.0.2.70", f"user{i}", now=i)
        if outcome.lockout is not None:
            assert outcome.lockout.scope == "address"
            return i
    return None


def test_limits_above_the_default_events_kept_still_block() -> None:
    """
    An address limit of 100, more events than a store keeps by default:
    the throttle's own store keeps enough for the 100th failure to block
    the address, and keeps more when a reload raises the limit.
    """
    settings = ThrottleSettings(address_limit=100, pair_limit=3)
    assert events_to_keep(settings) == 100
    assert events_to_keep(ThrottleSettings()) == 64
    throttle = AuthThrottle(settings)
    assert block_of_address(throttle, 150) == 100
    raised = AuthThrottle(ThrottleSettings(address_limit=5))
    raised.settings = ThrottleSettings(address_limit=120)
    assert block_of_address(raised, 150) == 120


def test_memory_counters_keep_more_events_once_told() -> None:
    """A larger C{max_events} applies to a key's events from its next one."""
    counters = MemoryCounters(max_events=3)
    for t in range(5):
        counters.add(["k"], now=t, window=60)
    assert count(counters, "k", now=5) == 3
    counters.max_events = 10
    for t in range(5, 12):
        counters.add(["k"], now=t, window=60)
    assert count(counters, "k", now=12) == 10


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=30))
def test_window_counts_only_recent_events(times: list[float]) -> None:
    """count() is the number of events within the window before now."""
    counters = MemoryCounters(max_events=64)
    for t in sorted(times):
        counters.add(["k"], now=t, window=10_000)
    now = max(times)
    assert count(counters, "k", now, window=100) == sum(1 for t in times if t > now - 100)


@implementer(IAuthCounters)
class LaterCounters:
    """
    L{MemoryCounters} behind a network: each answer waits until L{answer}
    (in the order asked, as one Redis connection answers); C{calls} records
    the questions, C{broken} makes every later answer fail.
    """

    def __init__(self) -> None:
        self.inner = MemoryCounters()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.queued: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []
        self.broken = False

    def _later(self, name: str, keys: Sequence[str], *args: Any) -> defer.Deferred[Any]:
        self.calls.append((name, tuple(keys)))
        inner = getattr(self.inner, name)(keys if name != "block" else keys[0], *args)
        later: defer.Deferred[Any] = defer.Deferred()
        self.queued.append((inner, later))
        return later

    def answer(self) -> None:
        """Answer every question asked so far (and those asked meanwhile)."""
        while self.queued:
            inner, later = self.queued.pop(0)
            if self.broken:
                later.errback(ConnectionError("the store is gone"))
            else:
                inner.chainDeferred(later)

    def add(self, keys: Sequence[str], now: float, window: float) -> defer.Deferred[list[int]]:
        return self._later("add", keys, now, window)

    def count(self, keys: Sequence[str], now: float, window: float) -> defer.Deferred[list[int]]:
        return self._later("count", keys, now, window)

    def clear(self, keys: Sequence[str]) -> defer.Deferred[None]:
        return self._later("clear", keys)

    def block(self, key: str, until: float) -> defer.Deferred[None]:
        return self._later("block", [key], until)

    def blocked_until(self, keys: Sequence[str], now: float) -> defer.Deferred[list[float | None]]:
        return self._later("blocked_until", keys, now)


def test_each_decision_asks_the_store_once_per_kind_of_question() -> None:
    """
    A failure records its three keys in one C{add} (and asks about blocks
    only when a limit is reached, for both keys at once); an attempt asks
    about both keys' blocks at once, and for counts only while attempts
    from the address are in flight.
    """
    counters = LaterCounters()
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2), counters)
    outcome = throttle.failed("192.0.2.50", "alice", 0)
    counters.answer()
    assert result_of(outcome) == FailureOutcome(2.0)
    assert counters.calls == [
        ("add", ("addr:192.0.2.50", "pair:192.0.2.50:alice", "user:alice")),
    ]
    counters.calls.clear()
    first = throttle.begin("192.0.2.50", "alice", 1)
    counters.answer()
    attempt = result_of(first)
    assert isinstance(attempt, Attempt)
    assert counters.calls == [("blocked_until", ("addr:192.0.2.50", "pair:192.0.2.50:alice"))]
    counters.calls.clear()
    second = throttle.begin("192.0.2.50", "alice", 1)
    counters.answer()
    assert result_of(second) == Busy("address+user")
    assert [name for name, _ in counters.calls] == ["blocked_until", "count"]
    counters.calls.clear()
    ended = attempt.failed(2)
    # The place is held until the failure is recorded.
    assert throttle.in_flight("192.0.2.50") == 1
    counters.answer()
    assert result_of(ended).lockout == Refusal("address+user", 602)
    assert throttle.in_flight("192.0.2.50") == 0
    assert [name for name, _ in counters.calls] == ["add", "blocked_until", "block"]


def test_an_attempt_admitted_while_another_asks_is_counted() -> None:
    """
    Two attempts asked for at once, before the store answers: the second
    finds the first's place when its answer comes, and asks for the counts
    before it is admitted.
    """
    counters = LaterCounters()
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2), counters)
    failure = throttle.failed("192.0.2.51", "alice", 0)
    counters.answer()
    result_of(failure)
    one = throttle.begin("192.0.2.51", "alice", 1)
    two = throttle.begin("192.0.2.51", "alice", 1)
    counters.answer()
    assert isinstance(result_of(one), Attempt)
    assert result_of(two) == Busy("address+user")


def test_a_store_that_fails_fails_the_decision_and_frees_the_place() -> None:
    """A store error is the Deferred's failure; the attempt's place goes back all the same."""
    counters = LaterCounters()
    throttle = AuthThrottle(ThrottleSettings(), counters)
    asked = throttle.begin("192.0.2.52", "alice", 1)
    counters.answer()
    attempt = result_of(asked)
    assert isinstance(attempt, Attempt)
    counters.broken = True
    ended = attempt.failed(2)
    counters.answer()
    failure_of(ended, ConnectionError)
    assert throttle.in_flight("192.0.2.52") == 0
    asked = throttle.begin("192.0.2.52", "alice", 3)
    counters.answer()
    failure_of(asked, ConnectionError)


def test_access_rules() -> None:
    """deny wins; a non-empty allow list admits only its networks; IPv6 works."""
    rules = AccessRules(allow=nets("127.0.0.0/8", "2001:db8::/32"), deny=nets("127.0.0.2/32"))
    assert rules.permits("127.0.0.1")
    assert not rules.permits("127.0.0.2")
    assert not rules.permits("192.0.2.1")
    assert rules.permits("2001:db8::5")
    assert AccessRules().permits("192.0.2.1")
    assert not in_networks("not-an-ip", nets("0.0.0.0/0"))


@given(
    st.ip_addresses().map(str)
    | st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    | st.ip_addresses(v=6).map(lambda a: f"{a}%eth0")
    | st.text(max_size=20)
)
def test_remembered_addresses_read_as_parsed_ones(host: str) -> None:
    """
    The parse kept for an address (L{normalise_address}, L{in_networks})
    answers as a fresh one: IPv4-mapped IPv6 as IPv4, a zone dropped,
    other text as is and in no network.
    """
    try:
        fresh: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            host.split("%", 1)[0]
        )
    except ValueError:
        fresh = None
    if isinstance(fresh, ipaddress.IPv6Address) and fresh.ipv4_mapped is not None:
        fresh = fresh.ipv4_mapped
    networks = nets("0.0.0.0/0", "::/0")
    for _ in range(2):
        assert normalise_address(host) == (host if fresh is None else str(fresh))
        assert in_networks(host, networks) is (fresh is not None)
        assert in_networks(host, ()) is False


def test_connection_counter() -> None:
    """Totals and per-address counts open and close; sessions per user and address."""
    counter = ConnectionCounter(ConnectionLimits(max_connections=3, max_per_address=2,
                                                 max_sessions_per_user=1))  # fmt: skip
    assert counter.open("192.0.2.1") is None
    assert counter.open("192.0.2.1") is None
    assert counter.open("192.0.2.1") == "max-connections-per-address"
    assert counter.open("192.0.2.2") is None
    assert counter.open("192.0.2.3") == "max-connections"
    counter.close("192.0.2.1")
    assert counter.open("192.0.2.3") is None
    assert counter.start_session("alice", "192.0.2.1")
    assert not counter.start_session("alice", "192.0.2.1")
    assert counter.start_session("alice", "192.0.2.2")
    assert counter.sessions == 2
    counter.end_session("alice", "192.0.2.1")
    assert counter.start_session("alice", "192.0.2.1")


def test_login_gate() -> None:
    """The gate admits up to its capacity."""
    gate = LoginGate(2)
    assert gate.try_enter() and gate.try_enter() and not gate.try_enter()
    gate.leave()
    assert gate.try_enter()


def test_only_waiters_for_the_freed_counter_are_woken() -> None:
    """
    An attempt that ends wakes the attempts waiting on its own counters,
    not those waiting for another address.
    """
    throttle = AuthThrottle(ThrottleSettings(pair_limit=1))
    failed(throttle, "192.0.2.20", "alice", now=0)
    failed(throttle, "192.0.2.21", "alice", now=0)
    ours = begin(throttle, "192.0.2.20", "bob", now=1)
    theirs = begin(throttle, "192.0.2.21", "bob", now=1)
    assert isinstance(ours, Attempt) and isinstance(theirs, Attempt)
    woken: list[str] = []
    for address in ("192.0.2.20", "192.0.2.21"):
        busy = begin(throttle, address, "bob", now=1)
        assert isinstance(busy, Busy)
        throttle.wait_for_place(lambda a=address: woken.append(a), busy)
    ours.release()
    assert woken == ["192.0.2.20"]
    theirs.succeeded()
    assert woken == ["192.0.2.20", "192.0.2.21"]
