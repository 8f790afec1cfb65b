# -*- test-case-name: tests.test_limits -*-
"""
Abuse limits without I/O: the failed-login throttle (delays and lockouts),
IP allow/deny rules, and connection counting.

All counters live behind L{IAuthCounters}, so they can be kept elsewhere
(e.g. in Redis, shared by several processes or hosts) by providing that
interface; L{MemoryCounters} keeps them in this process.  Time is passed in
by the caller, so tests need not sleep.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from zope.interface import Interface, implementer

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class IAuthCounters(Interface):
    """
    Windowed event counters and timed blocks, keyed by strings.

    Keys are opaque to the store; the throttle uses C{addr:<ip>},
    C{pair:<ip>:<user>} and C{user:<user>}.
    """

    def add(key: str, now: float, window: float) -> int:
        """Record an event for C{key}; return how many fell within C{window} seconds."""

    def count(key: str, now: float, window: float) -> int:
        """How many events for C{key} fell within C{window} seconds before C{now}."""

    def clear(key: str) -> None:
        """Forget the events and any block of C{key}."""

    def block(key: str, until: float) -> None:
        """Block C{key} until the time C{until}."""

    def blocked_until(key: str, now: float) -> float | None:
        """When the block on C{key} ends, or C{None} if it is not blocked at C{now}."""


@implementer(IAuthCounters)
class MemoryCounters:
    """
    L{IAuthCounters} in this process's memory.

    Each key keeps at most C{max_events} timestamps and at most C{max_keys}
    keys are kept (the least recently used go first), so an attacker who
    tries many addresses or names cannot grow memory without bound.
    """

    def __init__(self, max_events: int = 64, max_keys: int = 100_000) -> None:
        self._events: dict[str, deque[float]] = {}
        self._blocks: dict[str, float] = {}
        self._max_events = max_events
        self._max_keys = max_keys

    def _touch(self, key: str) -> deque[float]:
        events = self._events.pop(key, None)
        if events is None:
            events = deque(maxlen=self._max_events)
            while len(self._events) >= self._max_keys:
                del self._events[next(iter(self._events))]
        self._events[key] = events
        return events

    def add(self, key: str, now: float, window: float) -> int:
        events = self._touch(key)
        events.append(now)
        return self.count(key, now, window)

    def count(self, key: str, now: float, window: float) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)

    def clear(self, key: str) -> None:
        self._events.pop(key, None)
        self._blocks.pop(key, None)

    def block(self, key: str, until: float) -> None:
        while len(self._blocks) >= self._max_keys:
            del self._blocks[next(iter(self._blocks))]
        self._blocks[key] = until

    def blocked_until(self, key: str, now: float) -> float | None:
        until = self._blocks.get(key)
        if until is None:
            return None
        if until <= now:
            del self._blocks[key]
            return None
        return until


@dataclass(frozen=True)
class ThrottleSettings:
    """
    Limits on failed logins.

    @ivar failure_delay: seconds before a failed login is answered.
    @ivar max_failure_delay: the cap on the growing delay.
    @ivar address_limit: failures from one address within C{window} that
        block the address.
    @ivar pair_limit: failures for one username from one address within
        C{window} that block that pair.
    @ivar window: seconds over which failures are counted.
    @ivar lockout: seconds a block lasts.
    @ivar trusted: networks exempt from delays and blocks.
    """

    failure_delay: float = 2.0
    max_failure_delay: float = 30.0
    address_limit: int = 10
    pair_limit: int = 5
    window: float = 600.0
    lockout: float = 600.0
    trusted: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """
    A login refused without checking the password: who is blocked and until
    when.
    """

    scope: str
    until: float


@dataclass(frozen=True)
class Busy:
    """
    A login that must wait before its check starts: the checks already under
    way for this address (or address and user) would reach the limit were
    they all to fail.  It is not a refusal: parallel logins from one address
    (a NAT gateway, a client with several accounts) are legitimate, so the
    attempt waits for a place (L{AuthThrottle.wait_for_place}) and is
    admitted or refused once one frees.

    @ivar key: the counter whose attempts in flight are at the limit.
    """

    scope: str
    key: str = field(default="", compare=False)


@dataclass(frozen=True)
class FailureOutcome:
    """
    What a failed login leads to.

    @ivar delay: seconds to wait before answering.
    @ivar lockout: the block it started, if any.
    """

    delay: float
    lockout: Refusal | None = None


def normalise_address(host: str) -> str:
    """An IP address in canonical form (IPv4-mapped IPv6 as IPv4); other text as is."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the address C{host} lies in one of C{networks}."""
    try:
        address = ipaddress.ip_address(normalise_address(host))
    except ValueError:
        return False
    return any(address in network for network in networks)


class Attempt:
    """
    A login attempt admitted by L{AuthThrottle.begin}: it holds a place
    among the attempts in flight until it ends in exactly one of
    L{failed}, L{succeeded} or L{release}; later calls do nothing.
    """

    def __init__(
        self, throttle: AuthThrottle, address: str, username: str, keys: tuple[str, ...]
    ) -> None:
        self._throttle = throttle
        self._address = address
        self._username = username
        self._keys: tuple[str, ...] | None = keys

    def _end(self, verdict: Callable[[], object] | None = None) -> bool:
        """
        Give the place back, after recording C{verdict}: attempts waiting
        for a place are woken by the leaving, and must see the verdict.
        """
        keys, self._keys = self._keys, None
        if keys is None:
            return False
        try:
            if verdict is not None:
                verdict()
        finally:
            self._throttle._leave(keys)
        return True

    def failed(self, now: float) -> FailureOutcome:
        """
        The credentials were wrong: count the failure (L{AuthThrottle.failed}).

        @return: its delay and any block it starts.
        """
        outcomes: list[FailureOutcome] = []
        if not self._end(
            lambda: outcomes.append(self._throttle.failed(self._address, self._username, now))
        ):
            return self._throttle.failed(self._address, self._username, now)
        return outcomes[0]

    def succeeded(self) -> None:
        """The login succeeded (L{AuthThrottle.succeeded})."""
        self._end(lambda: self._throttle.succeeded(self._address, self._username))

    def release(self) -> None:
        """
        The attempt ended with no verdict on the credentials (a server
        fault, a refusal for another reason): it counts for nothing.
        """
        self._end()


class AuthThrottle:
    """
    Decides when a login may be tried and how long a failure waits.

    Failures from one address, and for one username from one address, lead
    to blocks.  Failures for one username from many addresses only make that
    username's failures slower: a block per username would let anyone lock a
    user out of their own mail.

    Attempts count from when they start (L{begin}): a check under way holds
    a place until it ends, so parallel guesses cannot run more checks than
    the limits allow before the first failure is recorded.  The places are
    kept in this process (they last as long as a check), the failures in
    L{IAuthCounters}.
    """

    def __init__(self, settings: ThrottleSettings, counters: IAuthCounters | None = None) -> None:
        self.settings = settings
        self.counters: IAuthCounters = counters if counters is not None else MemoryCounters()
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, list[Callable[[], None]]] = {}

    def begin(self, address: str, username: str, now: float) -> Refusal | Busy | Attempt:
        """
        Admit a login attempt, refuse it without a password check (the
        address or the pair is blocked, L{check}), or ask it to wait: the
        attempts in flight, were they all to fail, would block it.

        @return: a L{Refusal}; a L{Busy} (call L{wait_for_place}, then
            L{begin} again); or the L{Attempt} to end when the check ends.
        """
        refusal = self.check(address, username, now)
        if refusal is not None:
            return refusal
        if self._exempt(address):
            return Attempt(self, address, username, ())
        s = self.settings
        address_key, pair_key, _ = self._keys(address, username)
        for scope, key, limit in (
            ("address", address_key, s.address_limit),
            ("address+user", pair_key, s.pair_limit),
        ):
            pending = self._in_flight.get(key, 0)
            # With nothing in flight one attempt always goes, as before a
            # block: only a failure sets a block, even past the limit.
            if pending and self.counters.count(key, now, s.window) + pending >= limit:
                return Busy(scope, key)
        keys = (address_key, pair_key)
        for key in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return Attempt(self, address, username, keys)

    def in_flight(self, address: str, username: str | None = None) -> int:
        """
        @return: the attempts under way from C{address} (for C{username}
            only, if given).
        """
        address_key, pair_key, _ = self._keys(address, username or "")
        return self._in_flight.get(address_key if username is None else pair_key, 0)

    def wait_for_place(self, wake: Callable[[], None], busy: Busy | None = None) -> None:
        """
        Call C{wake} once, when the next attempt in flight ends (one of
        C{busy}'s counter, if given).

        Every attempt ends (a check has a deadline), so every waiter is
        woken; one that still finds no place simply waits again.

        @param wake: called with no arguments; it must not raise.
        @param busy: what L{begin} answered.
        """
        self._waiting.setdefault(busy.key if busy is not None else "", []).append(wake)

    def _leave(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
        woken: list[Callable[[], None]] = []
        for key in ("", *keys):
            woken.extend(self._waiting.pop(key, ()))
        for wake in woken:
            wake()

    def _exempt(self, address: str) -> bool:
        return in_networks(address, self.settings.trusted)

    @staticmethod
    def _keys(address: str, username: str) -> tuple[str, str, str]:
        address = normalise_address(address)
        return f"addr:{address}", f"pair:{address}:{username}", f"user:{username}"

    def check(self, address: str, username: str, now: float) -> Refusal | None:
        """Return a L{Refusal} if this login must not be tried, else C{None}."""
        if self._exempt(address):
            return None
        address_key, pair_key, _ = self._keys(address, username)
        for scope, key in (("address", address_key), ("address+user", pair_key)):
            until = self.counters.blocked_until(key, now)
            if until is not None:
                return Refusal(scope, until)
        return None

    def refused_delay(self, address: str, username: str, now: float) -> float:
        """The delay before answering a refused attempt (it counts as a failure)."""
        return self.failed(address, username, now).delay

    def failed(self, address: str, username: str, now: float) -> FailureOutcome:
        """Record a failed login; return its delay and any block it starts."""
        s = self.settings
        if self._exempt(address):
            return FailureOutcome(s.failure_delay)
        address_key, pair_key, user_key = self._keys(address, username)
        by_address = self.counters.add(address_key, now, s.window)
        by_pair = self.counters.add(pair_key, now, s.window)
        by_user = self.counters.add(user_key, now, s.window)
        repeats = max(by_address, by_user)
        delay = min(s.max_failure_delay, s.failure_delay * 2 ** min(repeats - 1, 16))
        lockout = None
        if by_address >= s.address_limit and self.counters.blocked_until(address_key, now) is None:
            lockout = Refusal("address", now + s.lockout)
            self.counters.block(address_key, lockout.until)
        elif by_pair >= s.pair_limit and self.counters.blocked_until(pair_key, now) is None:
            lockout = Refusal("address+user", now + s.lockout)
            self.counters.block(pair_key, lockout.until)
        return FailureOutcome(max(delay, s.failure_delay), lockout)

    def succeeded(self, address: str, username: str) -> None:
        """A login succeeded: forget the failures of this address and username pair."""
        _, pair_key, _ = self._keys(address, username)
        self.counters.clear(pair_key)


@dataclass(frozen=True)
class AccessRules:
    """
    IP rules checked before the greeting: an address in C{deny} is refused;
    if C{allow} is not empty, an address outside it is refused too.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    def permits(self, host: str) -> bool:
        """Whether a client at C{host} may connect."""
        if in_networks(host, self.deny):
            return False
        return not self.allow or in_networks(host, self.allow)


@dataclass(frozen=True)
class ConnectionLimits:
    """Caps on concurrent connections and sessions."""

    max_connections: int = 1000
    max_per_address: int = 20
    max_sessions_per_user: int = 10


class ConnectionCounter:
    """Counts open connections in total and per address, and sessions per user and address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self._by_address: dict[str, int] = {}
        self._sessions: dict[tuple[str, str], int] = {}

    def open(self, address: str) -> str | None:
        """Count a new connection; return the limit it breaks (and do not count it), or None."""
        address = normalise_address(address)
        if self.total >= self.limits.max_connections:
            return "max-connections"
        if self._by_address.get(address, 0) >= self.limits.max_per_address:
            return "max-connections-per-address"
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return None

    def close(self, address: str) -> None:
        """A counted connection ended."""
        address = normalise_address(address)
        self.total -= 1
        left = self._by_address.get(address, 1) - 1
        if left:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)

    def start_session(self, username: str, address: str) -> bool:
        """Count a logged-in session; False (not counted) if the user is at the limit."""
        key = (username, normalise_address(address))
        if self._sessions.get(key, 0) >= self.limits.max_sessions_per_user:
            return False
        self._sessions[key] = self._sessions.get(key, 0) + 1
        return True

    def end_session(self, username: str, address: str) -> None:
        """A counted session ended."""
        key = (username, normalise_address(address))
        left = self._sessions.get(key, 1) - 1
        if left:
            self._sessions[key] = left
        else:
            self._sessions.pop(key, None)


class LoginGate:
    """
    Admission to password checking: at most C{capacity} logins in flight
    (the hashing threads plus a bounded queue); past that a login is
    refused at once instead of waiting in an ever longer queue.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def try_enter(self) -> bool:
        """Take a place; False if there is none."""
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        """Give a place back."""
        self.in_flight -= 1
