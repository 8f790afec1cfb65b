# -*- test-case-name: tests.test_rediscounters -*-
"""
Failed-login counters in Redis, shared by several pop3srv nodes, with this
server's memory standing in while Redis is unreachable.

  - L{parse_counters_url} reads the C{counters} setting (C{memory} or
    C{redis://HOST:PORT/DB});
  - L{counters_for} makes the L{IAuthCounters} it names;
  - L{RedisCounters} keeps the counts in Redis, each question in one round
    trip;
  - L{NamedMemoryCounters} keeps them in memory while Redis is down, each
    event under the name Redis was (or would have been) given;
  - L{FallbackCounters} asks Redis and, when it fails or is slow, answers
    from memory instead, logs the outage once and its end once (once a
    minute at most for a Redis that comes and goes), and when Redis
    answers again merges into it what memory counted meanwhile, each
    event once however late Redis heard of it, and goes back to it;
  - L{CountersService} opens and closes the connection with the service.

A login never waits on a dead Redis for longer than
L{FallbackCounters}' timeout, and while Redis is down the failure delays and
lockouts still apply: they are counted here.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import itertools
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.server.limits import DEFAULT_MAX_EVENTS, IAuthCounters, MemoryCounters

__all__ = [
    "COUNTERS_FORM",
    "CountersCopy",
    "CountersService",
    "FallbackCounters",
    "IConnectedCounters",
    "INamedEventCounters",
    "KeyEvents",
    "NamedMemoryCounters",
    "RedisAddress",
    "RedisCounters",
    "RedisUnavailable",
    "counters_for",
    "event_member",
    "parse_counters_url",
]

_T = TypeVar("_T")

#: The forms the C{counters} setting takes, as error messages name them.
COUNTERS_FORM = "memory or redis://HOST[:PORT][/DB]"

DEFAULT_PORT = 6379

_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


@dataclass(frozen=True)
class RedisAddress:
    """
    Where a Redis server is.

    @ivar host: an IP address (IPv6 without brackets) or a DNS name.
    @ivar port: its TCP port.
    @ivar db: the database number (C{SELECT}).
    """

    host: str
    port: int = DEFAULT_PORT
    db: int = 0

    @property
    def hostport(self) -> str:
        """C{HOST:PORT}, an IPv6 address in brackets, as logs show it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The C{redis://HOST:PORT/DB} form, which L{parse_counters_url} reads back."""
        return f"redis://{self.hostport}/{self.db}"


def parse_counters_url(text: str) -> RedisAddress | None:
    """
    Read the C{counters} setting.

    @param text: C{memory}, or C{redis://HOST:PORT/DB} where HOST is a DNS
        name, an IPv4 address or an IPv6 address in brackets, PORT is 6379
        if left out and DB is 0 if left out.
    @return: L{None} for C{memory}, else where Redis is.
    @raise ValueError: for anything else, in one line naming the expected
        form.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"expected {COUNTERS_FORM}, not {text!r}: {why}")

    if text == "memory":
        return None
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "redis":
        raise bad("not memory or a redis:// URL")
    authority, slash, db_text = rest.partition("/")
    port_text: str | None = None
    if "@" in authority:
        raise bad("a user or password is not supported")
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket or after[:1] not in ("", ":"):
            raise bad("an IPv6 address goes in brackets, then :PORT")
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise bad("the address in brackets is not an IPv6 address") from None
        if after:
            port_text = after[1:]
    elif authority.count(":") > 1:
        raise bad("an IPv6 address goes in brackets ([::1]:6379)")
    else:
        host, colon, port_text_ = authority.partition(":")
        port_text = port_text_ if colon else None
        if not host:
            raise bad("no host")
        if not (_is_ipv4(host) or _DNS_NAME.fullmatch(host)):
            raise bad("the host is not a name, an IPv4 address or an IPv6 address in brackets")
    port = DEFAULT_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise bad("the port must be a number from 1 to 65535")
        port = int(port_text)
    db = 0
    if slash and db_text:
        if not (db_text.isascii() and db_text.isdigit() and len(db_text) <= 9):
            raise bad("the database must be a number (0, 1, ...)")
        db = int(db_text)
    return RedisAddress(host.lower(), port, db)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


class RedisUnavailable(Exception):
    """Redis could not be asked: no connection, or it was lost."""


class IConnectedCounters(IAuthCounters):
    """Counters that hold a connection, opened and closed with the service."""

    def start() -> None:
        """Get ready to answer (connect, check); may be called before any question."""

    def stop() -> Deferred[None]:
        """Close the connection; later questions fail.  Fires once closed."""


@dataclass(frozen=True)
class KeyEvents:
    """
    The events of one key, copied out of a store.

    @ivar key: the key, as given to L{IAuthCounters.add}.
    @ivar window: the window of the key's latest C{add}: how long its
        events count.
    @ivar events: the time and member name (L{event_member}) of each
        event, oldest first.
    """

    key: str
    window: float
    events: tuple[tuple[float, str], ...]


@dataclass(frozen=True)
class CountersCopy:
    """
    Events and blocks copied out of one store, to be merged into another
    (L{INamedEventCounters.merge}).

    @ivar events: each key's events.
    @ivar blocks: each blocked key and when its block ends.
    """

    events: tuple[KeyEvents, ...] = ()
    blocks: tuple[tuple[str, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.events or self.blocks)

    def parts(self, size: int) -> Iterator[CountersCopy]:
        """
        This copy in parts of about C{size} events and blocks each (a key's
        events are never split), so that no one merge holds Redis long.
        """
        events: list[KeyEvents] = []
        blocks: list[tuple[str, float]] = []
        held = 0
        for item in self.events:
            events.append(item)
            held += len(item.events)
            if held >= size:
                yield CountersCopy(tuple(events))
                events, held = [], 0
        for block in self.blocks:
            blocks.append(block)
            held += 1
            if held >= size:
                yield CountersCopy(tuple(events), tuple(blocks))
                events, blocks, held = [], [], 0
        if events or blocks:
            yield CountersCopy(tuple(events), tuple(blocks))


def event_member(event: str, index: int) -> str:
    """
    The name under which key number C{index} (from 1) of an
    L{INamedEventCounters.add_named} holds the event C{event}: its own
    suffix keeps a key given twice counting twice.
    """
    return f"{event}:{index}"


class INamedEventCounters(IAuthCounters):
    """
    Counters whose events have names, chosen by whoever records them, so
    that one event recorded in two stores (asked of Redis, which answered
    too late, and counted in memory meanwhile) is counted once when the
    two are brought together.
    """

    def add_named(
        event: str, keys: Sequence[str], now: float, window: float
    ) -> Deferred[list[int]]:
        """
        L{IAuthCounters.add} of the event named C{event} (unique among every
        node's events); a key that already holds it does not count it again.
        """

    def merge(copy: CountersCopy) -> Deferred[None]:
        """
        Add the events of C{copy} that are not here already, and each block
        of it that ends later than the one here, if any.  Events already out
        of their window and blocks already over may be left out.
        """


# Records one event per key (KEYS); ARGV: the event's time, the window's
# start (events at or before it no longer count), events kept per key,
# milliseconds the key lives after its last event, then each key's member
# for the event (event_member: one already there is not added again).
_ADD = """
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[4 + i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
  redis.call('ZREMRANGEBYRANK', key, 0, -1 - tonumber(ARGV[3]))
  redis.call('PEXPIRE', key, ARGV[4])
  counts[i] = redis.call('ZCARD', key)
end
return counts
"""

# Per key (KEYS), the events after the window's start (ARGV[1]).
_COUNT = """
local counts = {}
for i, key in ipairs(KEYS) do
  counts[i] = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf')
end
return counts
"""

# Merges a CountersCopy.  KEYS: the event keys, then the block keys.  ARGV:
# how many event keys there are, events kept per key; then for each event
# key its window's start, the milliseconds it lives at least, its number of
# events and each one's time and member; then for each block key the
# block's end and the milliseconds it lives.  A member already there stays
# as it is; a block is kept if it ends as late or later.
_MERGE = """
local event_keys = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local a = 3
for i = 1, event_keys do
  local key = KEYS[i]
  local start, lives, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  for _ = 1, n do
    redis.call('ZADD', key, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', start)
  redis.call('ZREMRANGEBYRANK', key, 0, -1 - keep)
  if redis.call('PTTL', key) < lives then
    redis.call('PEXPIRE', key, lives)
  end
end
for i = event_keys + 1, #KEYS do
  local ends = redis.call('GET', KEYS[i])
  if not ends or tonumber(ends) < tonumber(ARGV[a]) then
    redis.call('SET', KEYS[i], ARGV[a], 'PX', ARGV[a + 1])
  end
  a = a + 2
end
return 0
"""

#: Seconds a connection to Redis sits idle before the kernel checks that
#: the other end is still there, seconds between checks, and the checks
#: that may go unanswered before the connection is dropped (on systems
#: that name these options; others keep their own).
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


class _ClientFactory(Factory):
    """
    Builds one txredisapi protocol for L{RedisCounters}, which does its own
    connecting: txredisapi's connection pools queue a command for as long
    as they are reconnecting, with no limit on the wait.
    """

    # Read by txredisapi's protocol when SELECT fails.
    isLazy = False
    # Not a line per connection in the log.
    noisy = False

    def __init__(self, db: int, timeout: float, reactor: Any) -> None:
        self._db = db
        self._timeout = timeout
        self._reactor = reactor
        self.error: str | None = None

    def buildProtocol(self, addr: Any) -> Any:
        import txredisapi

        protocol = txredisapi.RedisProtocol(
            charset="utf-8", replyTimeout=self._timeout, dbid=self._db or None
        )
        # Its timers would run on the global reactor, whatever ours is.
        protocol.callLater = self._reactor.callLater
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        """Called by the protocol after a failed SELECT: nothing retries here anyway."""

    def connectionError(self, why: str) -> None:
        """Called by the protocol after a failed SELECT, before it disconnects."""
        self.error = why


@implementer(IConnectedCounters, INamedEventCounters)
class RedisCounters:
    """
    L{IAuthCounters} in one Redis server (or a primary with replicas; not
    Redis Cluster, as each question touches several keys at once), so
    several pop3srv nodes share their counts.

    Each question is one round trip, atomic in Redis: a script for L{add},
    L{count} and L{merge}, C{SET}, C{MGET} and C{DEL} for the rest.  A
    key's events are a sorted set of their names (L{event_member}) scored
    by time, trimmed to the window and to C{max_events} as
    L{MemoryCounters} does, and it expires a window after its last event;
    a block is a key holding the absolute time it ends, expiring then.  All
    live under C{prefix}, so one Redis can serve other things too.

    Times are the callers' C{now}, from each node's clock: the nodes must
    keep their clocks in sync (NTP), or a node that runs behind counts
    another's recent failures as older than they are.  A block's expiry is
    reckoned from this process's clock (C{reactor.seconds()}), so the
    times given must be real ones.

    There is one connection, opened on the first question (or by
    L{start}) and again on the first question after it is lost; a question
    asked while there is none waits for that attempt, which lasts at most
    C{timeout} seconds, as does each answer.  A question that fails other
    than by an error reply from Redis (no answer in time, a lost
    connection, or given up by the caller: cancelled) drops the
    connection, so the next question makes a new one rather than queue
    behind a stalled one; TCP keepalive finds a Redis host that vanishes
    while the connection is idle.  A question Redis cannot answer fails
    with L{RedisUnavailable} or txredisapi's errors: callers that must not
    fail use L{FallbackCounters}.
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        prefix: str = "pop3srv:",
        max_events: int = 64,
        timeout: float = 2.0,
    ) -> None:
        """
        @param reactor: an C{IReactorTCP} and C{IReactorTime}; the global
            reactor in a server.
        @param prefix: put before every key.
        @param max_events: events kept per key.
        @param timeout: seconds a connection attempt, and each answer, may take.
        """
        self.address = address
        self._reactor = reactor
        self._prefix = prefix
        self._max_events = max_events
        self._timeout = timeout
        self._names = _EventNames()
        self._protocol: Any = None
        #: Those waiting for the connection being made, if one is.
        self._waiting: list[Deferred[Any]] | None = None
        self._attempt: Deferred[Any] | None = None
        self._stopped = False

    def _key(self, kind: str, key: str) -> bytes:
        # Keys are bytes so no user name, however odd, fails to encode.
        return f"{self._prefix}{kind}:{key}".encode("utf-8", "surrogateescape")

    # -- the questions -----------------------------------------------------

    def add(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return self.add_named(self._names.next(), keys, now, window)

    def add_named(
        self, event: str, keys: Sequence[str], now: float, window: float
    ) -> Deferred[list[int]]:
        if not keys:
            return succeed([])
        members = [event_member(event, i) for i in range(1, len(keys) + 1)]
        args = [repr(now), repr(now - window), str(self._max_events), _ms(window), *members]
        keys_ = [self._key("events", k) for k in keys]
        return self._ask(lambda redis: redis.eval(_ADD, keys_, args)).addCallback(_ints)

    def count(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        if not keys:
            return succeed([])
        keys_ = [self._key("events", k) for k in keys]
        return self._ask(lambda redis: redis.eval(_COUNT, keys_, [repr(now - window)])).addCallback(
            _ints
        )

    def clear(self, keys: Sequence[str]) -> Deferred[None]:
        if not keys:
            return succeed(None)
        names = [self._key(kind, k) for k in keys for kind in ("events", "block")]
        return self._ask(lambda redis: redis.execute_command("DEL", *names)).addCallback(
            lambda _: None
        )

    def block(self, key: str, until: float) -> Deferred[None]:
        # The block ends by its time, which blocked_until compares; the
        # expiry only rids Redis of it, so it is reckoned from our clock.
        lasts = max(1, math.ceil((until - self._reactor.seconds()) * 1000))
        name = self._key("block", key)
        return self._ask(
            lambda redis: redis.execute_command("SET", name, repr(until), "PX", str(lasts))
        ).addCallback(lambda _: None)

    def blocked_until(self, keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        if not keys:
            return succeed([])
        names = [self._key("block", k) for k in keys]

        def still(values: list[Any]) -> list[float | None]:
            ends = [None if v is None else float(v) for v in values]
            return [end if end is not None and end > now else None for end in ends]

        return self._ask(lambda redis: redis.execute_command("MGET", *names)).addCallback(still)

    def merge(self, copy: CountersCopy) -> Deferred[None]:
        # Our clock, as for a block's expiry: what has left its window by
        # now is left out, and a key lives a window after its last event.
        now = self._reactor.seconds()
        event_keys: list[bytes] = []
        event_args: list[str] = []
        for item in copy.events:
            live = [(t, m) for t, m in item.events if t > now - item.window]
            if not live:
                continue
            last = max(t for t, _ in live)
            event_keys.append(self._key("events", item.key))
            event_args += [repr(now - item.window), _ms(last + item.window - now), str(len(live))]
            for time, member in live:
                event_args += [repr(time), member]
        block_keys: list[bytes] = []
        block_args: list[str] = []
        for key, until in copy.blocks:
            if until > now:
                block_keys.append(self._key("block", key))
                block_args += [repr(until), _ms(until - now)]
        if not event_keys and not block_keys:
            return succeed(None)
        keys = event_keys + block_keys
        args = [str(len(event_keys)), str(self._max_events), *event_args, *block_args]
        return self._ask(lambda redis: redis.eval(_MERGE, keys, args)).addCallback(lambda _: None)

    def probe(self) -> Deferred[None]:
        """
        Ask Redis what L{add} asks, of a key of its own: fires when Redis
        takes writes and runs scripts again, not merely when it answers
        C{PING} (a Redis out of memory, or a read-only replica, does that).
        """
        return self.add(["probe"], self._reactor.seconds(), 1.0).addCallback(lambda _: None)

    # -- the connection ----------------------------------------------------

    def start(self) -> None:
        if self._protocol is None and self._waiting is None and not self._stopped:
            self._waiting = []
            self._connect()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        if self._attempt is not None:
            self._attempt.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return succeed(None)
        closed: Deferred[None] = protocol.whenDisconnected().addCallback(lambda _: None)
        protocol.transport.loseConnection()
        # Nothing to flush that matters more than stopping on time.
        abort = self._reactor.callLater(self._timeout, protocol.transport.abortConnection)
        return closed.addBoth(_cancelling(abort))

    def _ask(self, question: Callable[[Any], Deferred[_T]]) -> Deferred[_T]:
        """Put C{question} to the connection, once there is one."""
        if self._stopped:
            return fail(RedisUnavailable("the connection to Redis is closed"))
        if self._protocol is not None:
            return self._put(self._protocol, question)
        # Cancelling a waiter leaves the attempt to the others.
        waiter: Deferred[Any] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
        else:
            self._waiting = [waiter]
            self._connect()
        return waiter.addCallback(self._put, question)

    def _put(self, protocol: Any, question: Callable[[Any], Deferred[_T]]) -> Deferred[_T]:
        from txredisapi import ResponseError

        def failed(failure: Failure) -> Failure:
            # Only an error reply leaves the connection as good as it was.
            # A question given up on (cancelled) is no longer watched by
            # txredisapi's reply timeout: kept, a stalled connection would
            # never be dropped and every later question would queue on it.
            # A timeout, or a lost or garbled connection, is no better.
            if not failure.check(ResponseError):
                self._lost(protocol)
                protocol.transport.abortConnection()
            return failure

        return maybeDeferred(question, protocol).addErrback(failed)

    def _connect(self) -> None:
        factory = _ClientFactory(self.address.db, self._timeout, self._reactor)
        attempt = self._attempt = self._endpoint().connect(factory)
        attempt.addCallback(_when_ready, factory)
        timer = self._reactor.callLater(self._timeout, attempt.cancel)
        attempt.addBoth(_cancelling(timer))
        attempt.addBoth(self._connected)

    def _endpoint(self) -> Any:
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
        )

        host, port = self.address.host, self.address.port
        # An address needs no resolver thread; a name does.
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        endpoint = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
        return endpoint(self._reactor, host, port, timeout=self._timeout)

    def _connected(self, result: Any) -> None:
        self._attempt = None
        waiting, self._waiting = self._waiting or [], None
        if self._stopped:
            if not isinstance(result, Failure):
                result.transport.abortConnection()
            result = Failure(RedisUnavailable("the connection to Redis is closed"))
        if isinstance(result, Failure):
            if result.check(CancelledError, ConnectingCancelledError):
                result = Failure(RedisUnavailable(f"no connection within {self._timeout:g} s"))
            for waiter in waiting:
                waiter.errback(result)
            return
        _keep_alive(result.transport)
        self._protocol = result
        result.whenDisconnected().addCallback(self._lost)
        for waiter in waiting:
            waiter.callback(result)

    def _lost(self, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = None


def _keep_alive(transport: Any) -> None:
    """
    Turn on TCP keepalive for C{transport}, checking sooner than the
    system's default, so a Redis host that vanishes (powered off, cut off
    without a reset) while no login asks anything is found out then, not
    by the next login.
    """
    transport.setTcpKeepAlive(True)
    handle = transport.getHandle()
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        # Finer tuning only: the connection is as usable without it.
        with contextlib.suppress(OSError):
            if option is not None:
                handle.setsockopt(socket.IPPROTO_TCP, option, value)


def _when_ready(protocol: Any, factory: _ClientFactory) -> Deferred[Any]:
    """
    Fires with C{protocol} once it may be used (after its C{SELECT}), or
    fails if its connection is lost first; cancelling drops the connection.
    """
    ready: Deferred[Any] = Deferred(lambda _: protocol.transport.abortConnection())

    def lost(_: object) -> None:
        if not ready.called:
            ready.errback(RedisUnavailable(factory.error or "the connection was lost"))

    def connected(_: object) -> None:
        if not ready.called:
            ready.callback(protocol)

    protocol.whenDisconnected().addCallback(lost)
    protocol.whenConnected().addCallback(connected)
    return ready


def _cancelling(call: IDelayedCall) -> Callable[[_T], _T]:
    """A callback that cancels C{call}, if still pending, and passes the result on."""

    def cancel(result: _T) -> _T:
        if call.active():
            call.cancel()
        return result

    return cancel


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def _ints(values: list[Any]) -> list[int]:
    return [int(v) for v in values]


class _EventNames:
    """Names for events, unique among every node's: this process's own prefix, then a count."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}:{next(self._count)}"


@dataclass
class _KeyEventsHere:
    """One key's events in L{NamedMemoryCounters}."""

    window: float
    #: Time and member of each, oldest first.
    events: list[tuple[float, str]]


@implementer(INamedEventCounters)
class NamedMemoryCounters:
    """
    L{INamedEventCounters} in this process's memory, every answer ready at
    once: what L{FallbackCounters} counts while Redis is down.

    As L{MemoryCounters}, each key keeps at most C{max_events} events and
    at most C{max_keys} keys, and as many blocks, are kept (the least
    recently used go first), so an attacker who tries many addresses or
    names cannot grow memory without bound.  Unlike it, each event keeps
    its name, and L{take_events} hands the events over to be merged into
    another store.
    """

    def __init__(self, max_events: int = 64, max_keys: int = 100_000) -> None:
        self._events: dict[str, _KeyEventsHere] = {}
        self._blocks: dict[str, float] = {}
        self._max_events = max_events
        self._max_keys = max_keys
        self._names = _EventNames()

    def _record(self, key: str, time: float, member: str, window: float) -> _KeyEventsHere:
        here = self._events.pop(key, None)
        if here is None:
            here = _KeyEventsHere(window, [])
            while len(self._events) >= self._max_keys:
                del self._events[next(iter(self._events))]
        self._events[key] = here
        here.window = window
        if all(m != member for _, m in here.events):
            bisect.insort(here.events, (time, member))
            # As Redis does: the latest events stay.
            del here.events[: -self._max_events]
        return here

    def _count(self, key: str, now: float, window: float) -> int:
        here = self._events.get(key)
        if here is None:
            return 0
        return sum(1 for t, _ in here.events if t > now - window)

    def _blocked_until(self, key: str, now: float) -> float | None:
        until = self._blocks.get(key)
        if until is None:
            return None
        if until <= now:
            del self._blocks[key]
            return None
        return until

    def _block(self, key: str, until: float) -> None:
        self._blocks.pop(key, None)
        while len(self._blocks) >= self._max_keys:
            del self._blocks[next(iter(self._blocks))]
        self._blocks[key] = until

    def add(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return self.add_named(self._names.next(), keys, now, window)

    def add_named(
        self, event: str, keys: Sequence[str], now: float, window: float
    ) -> Deferred[list[int]]:
        counts = []
        for i, key in enumerate(keys, 1):
            here = self._record(key, now, event_member(event, i), window)
            here.events[:] = [(t, m) for t, m in here.events if t > now - window]
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
        self._block(key, until)
        return succeed(None)

    def blocked_until(self, keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        return succeed([self._blocked_until(key, now) for key in keys])

    def merge(self, copy: CountersCopy) -> Deferred[None]:
        for item in copy.events:
            for time, member in item.events:
                self._record(item.key, time, member, item.window)
        for key, until in copy.blocks:
            if until > self._blocks.get(key, until - 1):
                self._block(key, until)
        return succeed(None)

    def take_events(self, now: float) -> CountersCopy:
        """
        Hand over the events (forgetting them here) and a copy of the blocks
        (kept here) still in force at C{now}.
        """
        events = tuple(
            KeyEvents(key, here.window, live)
            for key, here in self._events.items()
            if (live := tuple((t, m) for t, m in here.events if t > now - here.window))
        )
        self._events.clear()
        blocks = tuple((key, until) for key, until in self._blocks.items() if until > now)
        return CountersCopy(events, blocks)


#: Events and blocks merged into Redis by one script run when it is back.
_MERGE_PART = 512

_DOWN = "{name} unreachable ({reason}); counting failed logins in this server until it is back"
_BACK = "{name} is back; failed logins are counted there again"


@implementer(IConnectedCounters)
class FallbackCounters:
    """
    L{IAuthCounters} from C{primary} (Redis) while it answers, else from
    C{fallback} (this server's memory).

    A question C{primary} fails, or does not answer within C{timeout}
    seconds, is answered from C{fallback}, and C{primary} is taken to be
    down: later questions go to C{fallback} at once, and C{probe} asks
    C{primary} every C{probe_interval} seconds (one probe at a time, each
    allowed C{timeout} seconds) until it answers; then C{primary} answers
    again.

    Each event is named here, and C{fallback} records it under the name
    C{primary} was given: C{primary} may still record an event it did not
    answer for in time (Redis runs the script once it reads it), and the
    two must not count it twice.  When C{primary} is back, the events
    C{fallback} counted meanwhile are merged into it (those it already has
    count once) and C{fallback} forgets them: C{primary}'s counts are the
    only ones again.  A part not merged goes back to C{fallback}, and
    C{primary} is taken to be down again.

    Blocks are kept in C{fallback} as well, so a lockout this server set
    holds here through an outage; L{blocked_until} takes the later of the
    two, and C{primary} gets C{fallback}'s blocks when it is back.

    One line says C{primary} is down and one that it is back.  Should it go
    down again within C{quiet_period} seconds of the last line saying it
    was down (or summing up), the swing is logged at debug level only, and
    one line at the end of that period says how many there were and
    whether C{primary} is up.
    """

    _log = Logger()

    def __init__(
        self,
        primary: INamedEventCounters,
        fallback: NamedMemoryCounters,
        reactor: IReactorTime,
        *,
        name: str = "the shared counters",
        probe: Callable[[], Deferred[Any]] | None = None,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
        quiet_period: float = 60.0,
    ) -> None:
        """
        @param name: what the log lines call C{primary} (C{Redis at HOST:PORT}).
        @param probe: asks C{primary} whether it is back (by default, a
            L{IAuthCounters.count} of the key C{probe}).
        """
        self.primary = primary
        self.fallback = fallback
        self._reactor = reactor
        self._name = name
        self._probe = probe or (lambda: primary.count(["probe"], reactor.seconds(), 1.0))
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._quiet_period = quiet_period
        self._names = _EventNames()
        self._up = True
        self._next_probe: IDelayedCall | None = None
        self._probing: Deferred[Any] | None = None
        self._stopped = False
        # Outage lines: until when another outage is logged at debug level
        # only, how many were, when the line saying so is due, why
        # primary last went down and whether that was logged above debug.
        self._quiet_until = -math.inf
        self._swings = 0
        self._summary: IDelayedCall | None = None
        self._reason_now = ""
        self._outage_told = False

    @property
    def up(self) -> bool:
        """Whether questions go to C{primary} (it has not failed since it last answered)."""
        return self._up

    # -- the questions -----------------------------------------------------

    def add(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        event = self._names.next()
        return self._ask(lambda c: c.add_named(event, keys, now, window))

    def count(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return self._ask(lambda c: c.count(keys, now, window))

    def clear(self, keys: Sequence[str]) -> Deferred[None]:
        return self._ask(lambda c: c.clear(keys), lambda _: self.fallback.clear(keys))

    def block(self, key: str, until: float) -> Deferred[None]:
        return self._ask(lambda c: c.block(key, until), lambda _: self.fallback.block(key, until))

    def blocked_until(self, keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        return self._ask(
            lambda c: c.blocked_until(keys, now),
            lambda ends: self.fallback.blocked_until(keys, now).addCallback(_latest, ends),
        )

    def _ask(
        self,
        question: Callable[[INamedEventCounters], Deferred[_T]],
        also_here: Callable[[_T], Deferred[_T]] = succeed,
    ) -> Deferred[_T]:
        """
        Ask C{primary}, then put its answer through C{also_here} (which
        brings C{fallback} in); or ask C{fallback}, if C{primary} is down,
        fails or is late.
        """
        if not self._up:
            return question(self.fallback)
        answer: Deferred[_T] = Deferred()
        asked = maybeDeferred(question, self.primary)

        def late() -> None:
            self._down(self._reason(Failure(CancelledError())))
            question(self.fallback).chainDeferred(answer)
            asked.cancel()

        timer = self._reactor.callLater(self._timeout, late)

        def answered(result: _T | Failure) -> None:
            if answer.called or not timer.active():
                # Too late: the fallback has answered.
                return
            timer.cancel()
            if isinstance(result, Failure):
                self._down(self._reason(result))
                question(self.fallback).chainDeferred(answer)
            else:
                maybeDeferred(also_here, result).chainDeferred(answer)

        asked.addBoth(answered)
        return answer

    # -- outage and recovery -----------------------------------------------

    def _reason(self, failure: Failure) -> str:
        if failure.check(CancelledError):
            return f"no answer within {self._timeout:g} s"
        return failure.getErrorMessage() or repr(failure.value)

    def _down(self, reason: str) -> None:
        if not self._up or self._stopped:
            return
        self._up = False
        self._reason_now = reason
        if self._reactor.seconds() < self._quiet_until:
            self._swings += 1
            self._outage_told = False
            self._log.debug(_DOWN + " (again)", name=self._name, reason=reason)
            if self._summary is None:
                self._summary = self._reactor.callLater(
                    self._quiet_until - self._reactor.seconds(), self._summarise
                )
        else:
            self._tell_down("")
        self._schedule_probe()

    def _tell_down(self, swings: str) -> None:
        self._outage_told = True
        self._quiet_until = self._reactor.seconds() + self._quiet_period
        self._log.warn(_DOWN + "{swings}", name=self._name, reason=self._reason_now, swings=swings)

    def _back(self) -> None:
        if self._up or self._stopped:
            return
        self._up = True
        if self._outage_told:
            self._log.info(_BACK, name=self._name)
        else:
            self._log.debug(_BACK + " (again)", name=self._name)
        self._hand_over()

    def _summarise(self) -> None:
        """Say how many outages were logged at debug level only, and how things stand."""
        self._summary = None
        swings, self._swings = self._swings, 0
        if self._stopped or not swings:
            return
        outages = "outage" if swings == 1 else "outages"
        count = f" ({swings} {outages} in the last {self._quiet_period:g} s)"
        if self._up:
            self._quiet_until = self._reactor.seconds() + self._quiet_period
            self._log.info(_BACK + "{swings}", name=self._name, swings=count)
        else:
            self._tell_down(count)

    def _hand_over(self) -> None:
        """
        Merge into C{primary}, now back, what C{fallback} counted while it
        was down.  The parts are sent at once, ahead of any later question
        on the same connection, so Redis counts them before it answers one.
        """
        for part in self.fallback.take_events(self._reactor.seconds()).parts(_MERGE_PART):
            maybeDeferred(self.primary.merge, part).addErrback(self._not_merged, part)

    def _not_merged(self, failure: Failure, part: CountersCopy) -> None:
        # Whatever of it did reach primary is counted once when it is
        # merged again, next time primary is back.
        self.fallback.merge(part)
        self._down(self._reason(failure))

    def _schedule_probe(self) -> None:
        if self._stopped or self._next_probe is not None or self._probing is not None:
            return
        self._next_probe = self._reactor.callLater(self._probe_interval, self._probe_now)

    def _probe_now(self) -> None:
        """Probe C{primary}, unless a probe is under way: up if it answers, else down."""
        if self._next_probe is not None and self._next_probe.active():
            self._next_probe.cancel()
        self._next_probe = None
        if self._stopped or self._probing is not None:
            return
        probing = self._probing = maybeDeferred(self._probe)
        timer = self._reactor.callLater(self._timeout, probing.cancel)

        def ended(result: object) -> None:
            if timer.active():
                timer.cancel()
            self._probing = None
            if not isinstance(result, Failure):
                self._back()
            elif self._up:
                self._down(self._reason(result))
            else:
                self._schedule_probe()

        probing.addBoth(ended)

    def start(self) -> None:
        """
        Ask C{primary} at once (opening its connection), so an outage at
        start-up is logged then, not at the first login.
        """
        connected = IConnectedCounters(self.primary, None)
        if connected is not None:
            connected.start()
        self._probe_now()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        for call in (self._next_probe, self._summary):
            if call is not None and call.active():
                call.cancel()
        self._next_probe = self._summary = None
        if self._probing is not None:
            self._probing.cancel()
        connected = IConnectedCounters(self.primary, None)
        if connected is not None:
            return connected.stop()
        return succeed(None)


def _latest(here: list[float | None], there: list[float | None]) -> list[float | None]:
    return [
        a if b is None else b if a is None else max(a, b) for a, b in zip(here, there, strict=True)
    ]


def counters_for(
    setting: str, reactor: Any, max_events: int = DEFAULT_MAX_EVENTS
) -> IAuthCounters:
    """
    The counters the C{counters} setting names.

    @param setting: as L{parse_counters_url} reads it.
    @param reactor: the global reactor, in a server.
    @param max_events: events kept per key, at least the largest failure
        limit (L{pop3srv.server.limits.events_to_keep}).
    @return: a L{MemoryCounters} for C{memory}; for a Redis URL, a
        L{FallbackCounters} over L{RedisCounters}, with a
        L{NamedMemoryCounters} for the outages.  Give it to a
        L{CountersService}.
    @raise ValueError: for a setting L{parse_counters_url} refuses.
    """
    address = parse_counters_url(setting)
    if address is None:
        return MemoryCounters(max_events=max_events)
    redis = RedisCounters(address, reactor, max_events=max_events)
    return FallbackCounters(
        redis,
        NamedMemoryCounters(max_events=max_events),
        reactor,
        name=f"Redis at {address.hostport}",
        probe=redis.probe,
    )


class CountersService(Service):
    """
    Connects the counters (L{IConnectedCounters}) when the service starts
    and disconnects them when it stops; does nothing for others.
    """

    def __init__(self, counters: IAuthCounters) -> None:
        self.counters = counters

    def startService(self) -> None:
        super().startService()
        connected = IConnectedCounters(self.counters, None)
        if connected is not None:
            connected.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        connected = IConnectedCounters(self.counters, None)
        return connected.stop() if connected is not None else None
