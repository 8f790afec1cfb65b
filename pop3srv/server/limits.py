# -*- test-case-name: tests.test_limits -*-
"""
Abuse limits: the failed-login throttle (delays and lockouts), IP
allow/deny rules, and connection counting.

The failure counts and blocks live behind L{IAuthCounters}, an
asynchronous store, so they can be kept elsewhere (in Redis, shared by
several hosts) by providing that interface; L{MemoryCounters} keeps them in
this process.  Time is passed in by the caller, so tests need not sleep.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The events a store keeps per key unless the limits need more
#: (L{events_to_keep}): enough for the failure delay to reach its cap.
DEFAULT_MAX_EVENTS = 64

_T = TypeVar("_T")


class IAuthCounters(Interface):
    """
    Windowed event counters and timed blocks, keyed by strings, kept
    wherever the implementation likes (this process, Redis).

    Keys are opaque to the store; the throttle uses C{addr:<ip>},
    C{pair:<ip>:<user>} and C{user:<user>}.  Every question takes several
    keys at once, so a store across a network answers each in one round
    trip.  Times are seconds since the epoch, as C{reactor.seconds()}.

    Every method answers with a Deferred; one that fails means the store
    could not answer (a server fault, never a decision).
    """

    def add(keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        """
        Record one event at C{now} for each key.

        @return: fires with, per key, how many of its events fell within
            C{window} seconds up to C{now} (this one included).
        """

    def count(keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        """
        @return: fires with, per key, how many events fell within C{window}
            seconds before C{now}.
        """

    def clear(keys: Sequence[str]) -> Deferred[None]:
        """Forget the events and any block of each key."""

    def block(key: str, until: float) -> Deferred[None]:
        """Block C{key} until the time C{until}."""

    def blocked_until(keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        """
        @return: fires with, per key, when its block ends, or L{None} if it
            is not blocked at C{now}.
        """


@implementer(IAuthCounters)
class MemoryCounters:
    """
    L{IAuthCounters} in this process's memory; every answer is ready at
    once.

    Each key keeps at most C{max_events} timestamps and at most C{max_keys}
    keys are kept (the least recently used go first), so an attacker who
    tries many addresses or names cannot grow memory without bound.  A
    count never goes past C{max_events}: the throttle's limits must not
    either (L{events_to_keep}).

    @ivar max_events: the timestamps kept per key; a new value applies to
        each key as it next gets an event.
    """

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, max_keys: int = 100_000) -> None:
        self._events: dict[str, deque[float]] = {}
        self._blocks: dict[str, float] = {}
        self.max_events = max_events
        self._max_keys = max_keys

    def _touch(self, key: str) -> deque[float]:
        events = self._events.pop(key, None)
        if events is None:
            events = deque(maxlen=self.max_events)
            while len(self._events) >= self._max_keys:
                del self._events[next(iter(self._events))]
        elif events.maxlen != self.max_events:
            events = deque(events, maxlen=self.max_events)
        self._events[key] = events
        return events

    def _count(self, key: str, now: float, window: float) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)

    def _blocked_until(self, key: str, now: float) -> float | None:
        until = self._blocks.get(key)
        if until is None:
            return None
        if until <= now:
            del self._blocks[key]
            return None
        return until

    def add(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        counts = []
        for key in keys:
            self._touch(key).append(now)
            counts.append(self._count(key, now, window))
        return succeed(counts)

    def count(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return succeed([self._count(key, now, window) for key in keys])

    def clear(self, keys: Sequence[str]) -> Deferred[None]:
        for key in keys:
            self._events.pop(key, None)
            self._blocks.pop(key, None)
        return succeed(None)

    def block(self, key: str, until: float) -> Deferred[None]:
        self._blocks.pop(key, None)
        while len(self._blocks) >= self._max_keys:
            del self._blocks[next(iter(self._blocks))]
        self._blocks[key] = until
        return succeed(None)

    def blocked_until(self, keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        return succeed([self._blocked_until(key, now) for key in keys])


@dataclass(frozen=True)
class ThrottleSettings:
    """
    Limits on failed logins.

    @ivar failure_delay: seconds before a failed login is answered.
    @ivar max_failure_delay: the cap on the growing delay, and on the time
        before any failed or refused login is answered (a client's
        patience).
    @ivar address_limit: failures from one address within C{window} that
        block the address.
    @ivar pair_limit: failures for one username from one address within
        C{window} that block that pair.
    @ivar window: seconds over which failures are counted.
    @ivar lockout: seconds a block lasts.
    @ivar trusted: networks exempt from delays and blocks.
    """

    failure_delay: float = 2.0
    max_failure_delay: float = 15.0
    address_limit: int = 10
    pair_limit: int = 5
    window: float = 600.0
    lockout: float = 600.0
    trusted: tuple[IPNetwork, ...] = ()


def events_to_keep(settings: ThrottleSettings) -> int:
    """
    How many events per key an L{IAuthCounters} must keep (C{max_events} of
    L{MemoryCounters} and of the Redis store) for the throttle to count up
    to C{settings}' limits: a store that keeps fewer never reaches a larger
    limit, so it would never block.

    @return: the larger limit, and at least L{DEFAULT_MAX_EVENTS}.
    """
    return max(DEFAULT_MAX_EVENTS, settings.address_limit, settings.pair_limit)


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


#: The addresses whose parse is remembered (L{normalise_address},
#: L{in_networks}): every connection's address is looked at several times
#: (its count, the throttle's keys, the trusted networks), and parsing one
#: costs more than looking it up; bounded, so that many addresses cannot
#: grow memory.
ADDRESS_CACHE_SIZE = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _parse_address(host: str) -> IPAddress | None:
    """C{host} as an IP address (IPv4-mapped IPv6 as IPv4), or L{None}."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def normalise_address(host: str) -> str:
    """An IP address in canonical form (IPv4-mapped IPv6 as IPv4); other text as is."""
    address = _parse_address(host)
    return host if address is None else str(address)


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the address C{host} lies in one of C{networks}."""
    address: IPAddress | None = None
    for network in networks:
        if address is None:
            address = _parse_address(host)
            if address is None:
                return False
        if address in network:
            return True
    return False


class Attempt:
    """
    A login attempt admitted by L{AuthThrottle.begin}: it holds a place
    among the attempts in flight until it ends in exactly one of
    L{failed}, L{succeeded} or L{release}; later calls do nothing (but
    L{failed} still counts the failure).
    """

    def __init__(
        self, throttle: AuthThrottle, address: str, username: str, keys: tuple[str, ...]
    ) -> None:
        self._throttle = throttle
        self._address = address
        self._username = username
        self._keys: tuple[str, ...] | None = keys

    @property
    def ended(self) -> bool:
        """Whether the attempt has ended (its place is given back, or soon will be)."""
        return self._keys is None

    @property
    def holds_place(self) -> bool:
        """Whether it holds places in flight (an exempt address's holds none)."""
        return bool(self._keys)

    def _end(self, verdict: Callable[[], Deferred[_T]]) -> Deferred[_T] | None:
        """
        Give the place back once C{verdict} is recorded: attempts waiting
        for a place are woken by the leaving, and must see the verdict.

        @return: the verdict's Deferred, or L{None} if the attempt had
            already ended.
        """
        keys, self._keys = self._keys, None
        if keys is None:
            return None
        try:
            recorded = verdict()
        except BaseException:
            self._throttle._leave(keys)
            raise

        def leave(result: _T | Failure) -> _T | Failure:
            # A failure that started a block refuses every attempt waiting
            # here: all are woken to learn it, not one at a time.
            blocked = isinstance(result, FailureOutcome) and result.lockout is not None
            self._throttle._leave(keys, wake_every=blocked)
            return result

        return recorded.addBoth(leave)

    def failed(self, now: float) -> Deferred[FailureOutcome]:
        """
        The credentials were wrong: count the failure (L{AuthThrottle.failed}).

        @return: fires with its delay and any block it starts.
        """
        ended = self._end(lambda: self._throttle.failed(self._address, self._username, now))
        if ended is None:
            return self._throttle.failed(self._address, self._username, now)
        return ended

    def succeeded(self) -> Deferred[None]:
        """The login succeeded (L{AuthThrottle.succeeded})."""
        ended = self._end(lambda: self._throttle.succeeded(self._address, self._username))
        return ended if ended is not None else succeed(None)

    def release(self) -> None:
        """
        The attempt ended with no verdict on the credentials (a server
        fault, a refusal for another reason): it counts for nothing.
        """
        self._end(lambda: succeed(None))


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
    kept by the throttle, in the process that holds it (they last as long
    as a check; one throttle serves every process of a server, see
    L{pop3srv.server.authority}); the failures and blocks are kept in
    L{IAuthCounters}, asked once per decision with all the keys it needs.

    A store that answers in order (this process, one Redis connection)
    keeps places and counts consistent: an attempt gives its place back
    only once its failure is recorded, so an answer to L{begin} never finds
    a place gone without the failure that ended it.

    The store must keep enough events per key to reach the limits
    (L{events_to_keep}); the one the throttle makes when it is given none
    does, and keeps more when a reload raises a limit.

    @ivar settings: the limits, read at every decision: a reload replaces
        them (L{pop3srv.server.authority.LocalAuthority.reconfigure})
        without forgetting any count.
    """

    def __init__(self, settings: ThrottleSettings, counters: IAuthCounters | None = None) -> None:
        """
        @param settings: the limits.
        @param counters: where failures and blocks are kept, keeping at
            least L{events_to_keep} events per key; if L{None}, a
            L{MemoryCounters} of the throttle's own.
        """
        self._own: MemoryCounters | None = None
        if counters is None:
            counters = self._own = MemoryCounters(max_events=events_to_keep(settings))
        self.counters: IAuthCounters = counters
        self.settings = settings
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, list[Callable[[], None]]] = {}

    @property
    def settings(self) -> ThrottleSettings:
        """The limits (see the class docstring)."""
        return self._settings

    @settings.setter
    def settings(self, settings: ThrottleSettings) -> None:
        self._settings = settings
        if self._own is not None:
            # Never fewer than before: the events kept stay countable.
            self._own.max_events = max(self._own.max_events, events_to_keep(settings))

    def begin(self, address: str, username: str, now: float) -> Deferred[Refusal | Busy | Attempt]:
        """
        Admit a login attempt, refuse it without a password check (the
        address or the pair is blocked, L{check}), or ask it to wait: the
        attempts in flight, were they all to fail, would block it.

        @return: fires with a L{Refusal}; a L{Busy} (call L{wait_for_place},
            then L{begin} again); or the L{Attempt} to end when the check
            ends.
        """
        if self._exempt(address):
            return succeed(Attempt(self, address, username, ()))
        address_key, pair_key, _ = self._keys(address, username)
        keys = (address_key, pair_key)
        asked: list[Deferred[Any]] = [self.counters.blocked_until(keys, now)]
        # Every attempt in flight holds a place on both keys: with none
        # from the address there is none for the pair, and the failure
        # counts are not needed.
        if self._in_flight.get(address_key):
            asked.append(self.counters.count(keys, now, self.settings.window))
        answers: Deferred[list[Any]] = gatherResults(asked, consumeErrors=True)
        answers.addErrback(_first_error)
        return answers.addCallback(
            lambda found: self._decide(
                address, username, now, keys, found[0], found[1] if len(found) > 1 else None
            )
        )

    def _decide(
        self,
        address: str,
        username: str,
        now: float,
        keys: tuple[str, str],
        blocks: list[float | None],
        counts: list[int] | None,
    ) -> Refusal | Busy | Attempt | Deferred[Refusal | Busy | Attempt]:
        s = self.settings
        for scope, until in zip(("address", "address+user"), blocks, strict=True):
            if until is not None:
                return Refusal(scope, until)
        if counts is None:
            if self._in_flight.get(keys[0]):
                # An attempt was admitted while the blocks were asked for
                # (a store across the network): the counts are needed
                # after all, and this time they are asked for.
                return self.begin(address, username, now)
            counts = [0, 0]
        for scope, key, failures, limit in zip(
            ("address", "address+user"), keys, counts, (s.address_limit, s.pair_limit), strict=True
        ):
            # The places are read now, when the counts have come: attempts
            # admitted meanwhile hold places too.  With nothing in flight
            # one attempt always goes, as before a block: only a failure
            # sets a block, even past the limit.
            pending = self._in_flight.get(key, 0)
            if pending and failures + pending >= limit:
                return Busy(scope, key)
        for key in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        for key, failures, limit in zip(keys, counts, (s.address_limit, s.pair_limit), strict=True):
            if key in self._waiting and failures + self._in_flight[key] < limit:
                # Room is left behind this one (a success cleared failures,
                # several places freed): the next waiter may take it.
                self.wake_next(key)
        return Attempt(self, address, username, keys)

    def in_flight(self, address: str, username: str | None = None) -> int:
        """
        @return: the attempts under way from C{address} (for C{username}
            only, if given).
        """
        address_key, pair_key, _ = self._keys(address, username or "")
        return self._in_flight.get(address_key if username is None else pair_key, 0)

    def wait_for_place(
        self, wake: Callable[[], None], busy: Busy | None = None, *, first: bool = False
    ) -> None:
        """
        Call C{wake} once, when a place may have freed on C{busy}'s counter:
        the waiters of a counter are woken one at a time, in turn, each
        when an attempt holding a place there ends, or when the attempt
        admitted before it leaves room behind (L{begin}).  So a place that
        frees wakes one waiter, not every one to find all but one place
        taken again.

        A woken waiter that does not take a place on that counter (it
        stops, it finds another counter full) must pass the place on
        (L{wake_next}), or wake them all if it is refused (L{wake_all}: a
        block refuses them all); one that finds the counter full again
        waits again, at the front (C{first}).  Every attempt ends (a check
        has a deadline), so every waiter is woken in turn.

        Without C{busy}, C{wake} is called when the next attempt of any
        counter ends.

        @param wake: called with no arguments; it must not raise.
        @param busy: what L{begin} answered.
        @param first: wait before the others (woken, and still busy).
        """
        waiters = self._waiting.setdefault(busy.key if busy is not None else "", [])
        if first:
            waiters.insert(0, wake)
        else:
            waiters.append(wake)

    def wake_next(self, key: str) -> None:
        """
        Wake the first waiter of the counter C{key} (L{Busy.key}): a place
        there may be free, which the caller, woken for it, did not take.
        """
        waiters = self._waiting.get(key)
        if not waiters:
            return
        wake = waiters.pop(0)
        if not waiters:
            del self._waiting[key]
        wake()

    def wake_all(self, key: str) -> None:
        """
        Wake every waiter of the counter C{key}: the caller, woken for it,
        found it blocked, as each of them will.
        """
        for wake in self._waiting.pop(key, ()):
            wake()

    def stop_waiting(self, wake: Callable[[], None]) -> None:
        """Forget C{wake}, given to L{wait_for_place} and not yet called."""
        for key, waiters in list(self._waiting.items()):
            if wake in waiters:
                waiters.remove(wake)
                if not waiters:
                    del self._waiting[key]
                return

    def _leave(self, keys: tuple[str, ...], *, wake_every: bool = False) -> None:
        """
        An attempt holding a place on each of C{keys} ended: give the
        places back and wake the first waiter of each key (every waiter if
        C{wake_every}), and those waiting for any place.
        """
        for key in keys:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
        woken = self._waiting.pop("", [])
        for key in keys:
            waiters = self._waiting.get(key)
            if not waiters:
                continue
            if wake_every:
                woken.extend(self._waiting.pop(key))
            else:
                woken.append(waiters.pop(0))
                if not waiters:
                    del self._waiting[key]
        for wake in woken:
            wake()

    def _exempt(self, address: str) -> bool:
        return in_networks(address, self.settings.trusted)

    @staticmethod
    def _keys(address: str, username: str) -> tuple[str, str, str]:
        address = normalise_address(address)
        return f"addr:{address}", f"pair:{address}:{username}", f"user:{username}"

    def check(self, address: str, username: str, now: float) -> Deferred[Refusal | None]:
        """Fire with a L{Refusal} if this login must not be tried, else L{None}."""
        if self._exempt(address):
            return succeed(None)
        address_key, pair_key, _ = self._keys(address, username)

        def refusal(blocks: list[float | None]) -> Refusal | None:
            for scope, until in zip(("address", "address+user"), blocks, strict=True):
                if until is not None:
                    return Refusal(scope, until)
            return None

        return self.counters.blocked_until((address_key, pair_key), now).addCallback(refusal)

    def refused_delay(self, address: str, username: str, now: float) -> Deferred[float]:
        """Fire with the delay before answering a refused attempt (it counts as a failure)."""
        return self.failed(address, username, now).addCallback(lambda outcome: outcome.delay)

    def failed(self, address: str, username: str, now: float) -> Deferred[FailureOutcome]:
        """Record a failed login; fire with its delay and any block it starts."""
        s = self.settings
        if self._exempt(address):
            return succeed(FailureOutcome(s.failure_delay))
        address_key, pair_key, user_key = self._keys(address, username)

        def decide(counts: list[int]) -> FailureOutcome | Deferred[FailureOutcome]:
            by_address, by_pair, by_user = counts
            repeats = max(by_address, by_user)
            delay = max(
                s.failure_delay,
                min(s.max_failure_delay, s.failure_delay * 2 ** min(repeats - 1, 16)),
            )
            if by_address < s.address_limit and by_pair < s.pair_limit:
                return FailureOutcome(delay)

            def lock(blocks: list[float | None]) -> FailureOutcome | Deferred[FailureOutcome]:
                address_until, pair_until = blocks
                if by_address >= s.address_limit and address_until is None:
                    lockout = Refusal("address", now + s.lockout)
                    key = address_key
                elif by_pair >= s.pair_limit and pair_until is None:
                    lockout = Refusal("address+user", now + s.lockout)
                    key = pair_key
                else:
                    return FailureOutcome(delay)
                return self.counters.block(key, lockout.until).addCallback(
                    lambda _: FailureOutcome(delay, lockout)
                )

            return self.counters.blocked_until((address_key, pair_key), now).addCallback(lock)

        return self.counters.add((address_key, pair_key, user_key), now, s.window).addCallback(
            decide
        )

    def succeeded(self, address: str, username: str) -> Deferred[None]:
        """A login succeeded: forget the failures of this address and username pair."""
        _, pair_key, _ = self._keys(address, username)
        return self.counters.clear((pair_key,))


def _first_error(failure: Failure) -> Failure:
    """The failure of the first Deferred that failed in a L{gatherResults}."""
    error = failure.value
    if isinstance(error, FirstError):
        first: Failure = error.subFailure
        return first
    return failure


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
    """
    Counts open connections in total and per address, and sessions per user and address.

    @ivar limits: the caps, read at every new connection and session: a
        reload replaces them without forgetting any count.
    """

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

    @property
    def sessions(self) -> int:
        """How many sessions are counted, in all."""
        return sum(self._sessions.values())

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
