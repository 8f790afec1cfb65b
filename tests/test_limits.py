"""Tests for L{pop3srv.server.limits}: throttle, lockouts, IP rules and counters."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from pop3srv.server.limits import (
    AccessRules,
    Attempt,
    AuthThrottle,
    Busy,
    ConnectionCounter,
    ConnectionLimits,
    LoginGate,
    MemoryCounters,
    Refusal,
    ThrottleSettings,
    in_networks,
)


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Networks from CIDR strings."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def test_failure_delay_grows_and_is_capped() -> None:
    """Repeated failures from one address wait 2, 4, 8 ... seconds, never above the cap."""
    throttle = AuthThrottle(ThrottleSettings(address_limit=100, pair_limit=100))
    delays = [throttle.failed("192.0.2.1", f"user{i}", now=i).delay for i in range(7)]
    assert delays == [2, 4, 8, 16, 30, 30, 30]


def test_unknown_and_known_users_share_the_delay() -> None:
    """The delay depends on counts, not on whether the user exists."""
    a = AuthThrottle(ThrottleSettings())
    b = AuthThrottle(ThrottleSettings())
    assert a.failed("192.0.2.1", "alice", 0).delay == b.failed("192.0.2.1", "nosuchuser", 0).delay


def test_address_lockout_and_expiry() -> None:
    """Ten failures from one address block it for the lockout period, then it is free."""
    throttle = AuthThrottle(ThrottleSettings(lockout=600))
    outcomes = [throttle.failed("192.0.2.9", f"u{i}", now=float(i)) for i in range(10)]
    assert [o.lockout for o in outcomes[:9]] == [None] * 9
    assert outcomes[9].lockout is not None and outcomes[9].lockout.scope == "address"
    refusal = throttle.check("192.0.2.9", "anyone", now=100)
    assert refusal is not None and refusal.until == 609
    assert throttle.check("192.0.2.10", "anyone", now=100) is None
    assert throttle.check("192.0.2.9", "anyone", now=610) is None


def test_pair_lockout_does_not_block_other_users_of_the_address() -> None:
    """Five failures for alice from one address block that pair only."""
    throttle = AuthThrottle(ThrottleSettings())
    for i in range(5):
        outcome = throttle.failed("198.51.100.1", "alice", now=i)
    assert outcome.lockout is not None and outcome.lockout.scope == "address+user"
    assert throttle.check("198.51.100.1", "alice", now=10) is not None
    assert throttle.check("198.51.100.1", "bob", now=10) is None
    assert throttle.check("198.51.100.2", "alice", now=10) is None


def test_spread_attack_slows_but_never_locks_out_the_user() -> None:
    """Failures for alice from 200 addresses only slow alice; her own address stays open."""
    throttle = AuthThrottle(ThrottleSettings())
    delays = []
    for i in range(200):
        outcome = throttle.failed(f"10.0.{i // 250}.{i % 250}", "alice", now=i)
        assert outcome.lockout is None
        delays.append(outcome.delay)
    assert delays[0] == 2 and delays[-1] == 30
    assert throttle.check("203.0.113.5", "alice", now=300) is None


def test_success_resets_the_pair() -> None:
    """A successful login forgets the failures of that address and username."""
    throttle = AuthThrottle(ThrottleSettings())
    for i in range(4):
        throttle.failed("192.0.2.3", "alice", now=i)
    throttle.succeeded("192.0.2.3", "alice")
    assert throttle.failed("192.0.2.3", "alice", now=5).lockout is None


def test_attempts_in_flight_count_towards_the_limits() -> None:
    """
    Attempts hold a place from their start: past the limit, counting the
    failures so far and the checks under way, an attempt must wait (it is
    not refused, nor counted); an attempt that ends without a verdict gives
    its place back uncounted and wakes the waiting ones.
    """
    throttle = AuthThrottle(ThrottleSettings(address_limit=4, pair_limit=3))
    throttle.failed("192.0.2.8", "alice", now=0)
    attempts = [throttle.begin("192.0.2.8", "alice", now=1) for _ in range(3)]
    assert [type(a) for a in attempts] == [Attempt, Attempt, Busy]
    assert attempts[2] == Busy("address+user")
    assert isinstance(throttle.begin("192.0.2.8", "bob", now=1), Attempt)
    assert throttle.begin("192.0.2.8", "carol", now=1) == Busy("address")
    woken: list[int] = []
    throttle.wait_for_place(lambda: woken.append(1))
    first, second = attempts[0], attempts[1]
    assert isinstance(first, Attempt) and isinstance(second, Attempt)
    first.release()
    assert woken == [1]
    first.release()
    assert woken == [1]
    assert throttle.in_flight("192.0.2.8", "alice") == 1
    assert throttle.counters.count("pair:192.0.2.8:alice", 1, 600) == 1
    assert second.failed(now=2).lockout is None
    assert throttle.in_flight("192.0.2.8") == 1
    assert throttle.counters.count("pair:192.0.2.8:alice", 2, 600) == 2


def test_success_ends_the_attempt_and_clears_the_pair() -> None:
    """A success gives the place back and forgets the pair's failures, once."""
    throttle = AuthThrottle(ThrottleSettings())
    throttle.failed("192.0.2.9", "alice", now=0)
    attempt = throttle.begin("192.0.2.9", "alice", now=1)
    assert isinstance(attempt, Attempt)
    attempt.succeeded()
    assert throttle.in_flight("192.0.2.9") == 0
    assert throttle.counters.count("pair:192.0.2.9:alice", 1, 600) == 0
    throttle.failed("192.0.2.9", "alice", now=2)
    attempt.succeeded()
    assert throttle.counters.count("pair:192.0.2.9:alice", 2, 600) == 1


def test_after_a_lockout_one_attempt_at_a_time_until_the_window_forgets() -> None:
    """
    A block shorter than the window: when it ends the failures still count,
    so one attempt may run (as before, its failure blocks again) but not a
    second beside it.
    """
    throttle = AuthThrottle(ThrottleSettings(pair_limit=2, lockout=10, window=600))
    throttle.failed("192.0.2.10", "alice", now=0)
    assert throttle.failed("192.0.2.10", "alice", now=1).lockout is not None
    assert isinstance(throttle.begin("192.0.2.10", "alice", now=5), Refusal)
    first = throttle.begin("192.0.2.10", "alice", now=20)
    assert isinstance(first, Attempt)
    assert isinstance(throttle.begin("192.0.2.10", "alice", now=20), Busy)
    assert first.failed(now=21).lockout is not None
    assert isinstance(throttle.begin("192.0.2.10", "alice", now=21), Refusal)


def test_trusted_attempts_hold_no_place() -> None:
    """A trusted address is never refused for attempts in flight."""
    throttle = AuthThrottle(ThrottleSettings(pair_limit=1, trusted=nets("192.0.2.0/24")))
    attempts = [throttle.begin("192.0.2.77", "alice", now=0) for _ in range(5)]
    assert all(isinstance(a, Attempt) for a in attempts)
    assert throttle.in_flight("192.0.2.77") == 0


def test_trusted_networks_are_exempt() -> None:
    """A trusted address is never blocked and waits only the base delay."""
    throttle = AuthThrottle(ThrottleSettings(trusted=nets("192.0.2.0/24")))
    for i in range(50):
        outcome = throttle.failed("192.0.2.77", "alice", now=i)
        assert outcome.lockout is None and outcome.delay == 2
    assert throttle.check("192.0.2.77", "alice", now=60) is None


def test_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    """::ffff:192.0.2.1 and 192.0.2.1 share one counter."""
    throttle = AuthThrottle(ThrottleSettings(address_limit=2))
    throttle.failed("::ffff:192.0.2.1", "a", 0)
    assert throttle.failed("192.0.2.1", "b", 1).lockout is not None


def test_memory_counters_are_bounded() -> None:
    """However many keys an attacker makes up, only max_keys are kept."""
    counters = MemoryCounters(max_events=4, max_keys=100)
    for i in range(10_000):
        counters.add(f"user:{i}", now=0, window=60)
        counters.block(f"addr:{i}", until=10)
    assert len(counters._events) <= 100 and len(counters._blocks) <= 100
    for _ in range(10):
        counters.add("k", now=1, window=60)
    assert counters.count("k", now=1, window=60) == 4


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=30))
def test_window_counts_only_recent_events(times: list[float]) -> None:
    """count() is the number of events within the window before now."""
    counters = MemoryCounters(max_events=64)
    for t in sorted(times):
        counters.add("k", now=t, window=10_000)
    now = max(times)
    assert counters.count("k", now, window=100) == sum(1 for t in times if t > now - 100)


def test_access_rules() -> None:
    """deny wins; a non-empty allow list admits only its networks; IPv6 works."""
    rules = AccessRules(allow=nets("127.0.0.0/8", "2001:db8::/32"), deny=nets("127.0.0.2/32"))
    assert rules.permits("127.0.0.1")
    assert not rules.permits("127.0.0.2")
    assert not rules.permits("192.0.2.1")
    assert rules.permits("2001:db8::5")
    assert AccessRules().permits("192.0.2.1")
    assert not in_networks("not-an-ip", nets("0.0.0.0/0"))


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
    throttle.failed("192.0.2.20", "alice", now=0)
    throttle.failed("192.0.2.21", "alice", now=0)
    ours = throttle.begin("192.0.2.20", "bob", now=1)
    theirs = throttle.begin("192.0.2.21", "bob", now=1)
    assert isinstance(ours, Attempt) and isinstance(theirs, Attempt)
    woken: list[str] = []
    for address in ("192.0.2.20", "192.0.2.21"):
        busy = throttle.begin(address, "bob", now=1)
        assert isinstance(busy, Busy)
        throttle.wait_for_place(lambda a=address: woken.append(a), busy)
    ours.release()
    assert woken == ["192.0.2.20"]
    theirs.succeeded()
    assert woken == ["192.0.2.20", "192.0.2.21"]
