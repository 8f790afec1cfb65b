# -*- test-case-name: tests.test_rediscounters -*-
"""
Failed-login counters in Redis, shared by several pop3srv nodes, with this
server's memory standing in while Redis is unreachable.

  - L{parse_counters_url} reads the C{counters} setting (C{memory} or
    C{redis://HOST:PORT/DB});
  - L{counters_for} makes the L{IAuthCounters} it names;
  - L{RedisCounters} keeps the counts in Redis, each question in one round
    trip;
  - L{FallbackCounters} asks Redis and, when it fails or is slow, answers
    from memory instead, logs the outage once and its end once, and goes
    back to Redis when it answers again;
  - L{CountersService} opens and closes the connection with the service.

A login never waits on a dead Redis for longer than
L{FallbackCounters}' timeout, and while Redis is down the failure delays and
lockouts still apply: they are counted here.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
from collections.abc import Callable, Sequence
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

from pop3srv.server.limits import IAuthCounters, MemoryCounters

__all__ = [
    "COUNTERS_FORM",
    "CountersService",
    "FallbackCounters",
    "IConnectedCounters",
    "RedisAddress",
    "RedisCounters",
    "RedisUnavailable",
    "counters_for",
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


# Records one event per key (KEYS); ARGV: the event's time, the window's
# start (events at or before it no longer count), events kept per key,
# milliseconds the key lives after its last event, the event's name (unique;
# each key's own suffix keeps a key repeated in KEYS counting twice).
_ADD = """
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[5] .. ':' .. i)
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


@implementer(IConnectedCounters)
class RedisCounters:
    """
    L{IAuthCounters} in one Redis server (or a primary with replicas; not
    Redis Cluster, as each question touches several keys at once), so
    several pop3srv nodes share their counts.

    Each question is one round trip, atomic in Redis: a script for L{add}
    and L{count}, C{SET}, C{MGET} and C{DEL} for the rest.  A key's events
    are a sorted set scored by time, trimmed to the window and to
    C{max_events} as L{MemoryCounters} does, and it expires a window after
    its last event; a block is a key holding the absolute time it ends,
    expiring then.  All live under C{prefix}, so one Redis can serve other
    things too.

    Times are the callers' C{now}, from each node's clock: the nodes must
    keep their clocks in sync (NTP), or a node that runs behind counts
    another's recent failures as older than they are.  A block's expiry is
    reckoned from this process's clock (C{reactor.seconds()}), so the
    times given must be real ones.

    There is one connection, opened on the first question (or by
    L{start}) and again on the first question after it is lost; a question
    asked while there is none waits for that attempt, which lasts at most
    C{timeout} seconds, as does each answer (then the connection is
    dropped).  A question Redis cannot answer fails with
    L{RedisUnavailable} or txredisapi's errors: callers that must not fail
    use L{FallbackCounters}.
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
        # Names each event uniquely among every node's.
        self._events = itertools.count()
        self._client = os.urandom(8).hex()
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
        if not keys:
            return succeed([])
        event = f"{now!r}:{self._client}:{next(self._events)}"
        args = [repr(now), repr(now - window), str(self._max_events), _ms(window), event]
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
            # Anything but an error reply (a timeout, a lost or garbled
            # connection) leaves the connection unfit: the next question
            # makes a new one rather than wait for this one to close.
            if not failure.check(ResponseError, CancelledError):
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
        self._protocol = result
        result.whenDisconnected().addCallback(self._lost)
        for waiter in waiting:
            waiter.callback(result)

    def _lost(self, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = None


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


@implementer(IConnectedCounters)
class FallbackCounters:
    """
    L{IAuthCounters} from C{primary} (Redis) while it answers, else from
    C{fallback} (this server's memory).

    A question C{primary} fails, or does not answer within C{timeout}
    seconds, is answered from C{fallback}, and C{primary} is taken to be
    down: one line says so, later questions go to C{fallback} at once, and
    C{probe} asks C{primary} every C{probe_interval} seconds (one probe at
    a time, each allowed C{timeout} seconds) until it answers; one line
    says so and C{primary} answers again.

    The counts made in C{fallback} during an outage still count after it,
    until they leave their window: L{add} and L{count} add them to
    C{primary}'s, L{blocked_until} takes the later of the two blocks.
    """

    _log = Logger()

    def __init__(
        self,
        primary: IAuthCounters,
        fallback: IAuthCounters,
        reactor: IReactorTime,
        *,
        name: str = "the shared counters",
        probe: Callable[[], Deferred[Any]] | None = None,
        timeout: float = 0.5,
        probe_interval: float = 1.0,
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
        self._up = True
        self._next_probe: IDelayedCall | None = None
        self._probing: Deferred[Any] | None = None
        self._stopped = False

    @property
    def up(self) -> bool:
        """Whether questions go to C{primary} (it has not failed since it last answered)."""
        return self._up

    # -- the questions -----------------------------------------------------

    def add(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return self._ask(
            lambda c: c.add(keys, now, window),
            lambda counts: self.fallback.count(keys, now, window).addCallback(_sums, counts),
        )

    def count(self, keys: Sequence[str], now: float, window: float) -> Deferred[list[int]]:
        return self._ask(
            lambda c: c.count(keys, now, window),
            lambda counts: self.fallback.count(keys, now, window).addCallback(_sums, counts),
        )

    def clear(self, keys: Sequence[str]) -> Deferred[None]:
        return self._ask(
            lambda c: c.clear(keys),
            lambda _: self.fallback.clear(keys),
        )

    def block(self, key: str, until: float) -> Deferred[None]:
        return self._ask(lambda c: c.block(key, until), succeed)

    def blocked_until(self, keys: Sequence[str], now: float) -> Deferred[list[float | None]]:
        return self._ask(
            lambda c: c.blocked_until(keys, now),
            lambda ends: self.fallback.blocked_until(keys, now).addCallback(_latest, ends),
        )

    def _ask(
        self,
        question: Callable[[IAuthCounters], Deferred[_T]],
        also_here: Callable[[_T], Deferred[_T]],
    ) -> Deferred[_T]:
        """
        Ask C{primary}, then put its answer through C{also_here} (which
        adds what C{fallback} knows); or ask C{fallback}, if C{primary} is
        down, fails or is late.
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
        self._log.warn(
            "{name} unreachable ({reason}); counting failed logins in this server until it is back",
            name=self._name,
            reason=reason,
        )
        self._schedule_probe()

    def _back(self) -> None:
        if self._up or self._stopped:
            return
        self._up = True
        self._log.info("{name} is back; failed logins are counted there again", name=self._name)

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
        if self._next_probe is not None and self._next_probe.active():
            self._next_probe.cancel()
        self._next_probe = None
        if self._probing is not None:
            self._probing.cancel()
        connected = IConnectedCounters(self.primary, None)
        if connected is not None:
            return connected.stop()
        return succeed(None)


def _sums(here: list[int], there: list[int]) -> list[int]:
    return [a + b for a, b in zip(here, there, strict=True)]


def _latest(here: list[float | None], there: list[float | None]) -> list[float | None]:
    return [
        a if b is None else b if a is None else max(a, b) for a, b in zip(here, there, strict=True)
    ]


def counters_for(setting: str, reactor: Any) -> IAuthCounters:
    """
    The counters the C{counters} setting names.

    @param setting: as L{parse_counters_url} reads it.
    @param reactor: the global reactor, in a server.
    @return: a L{MemoryCounters} for C{memory}; for a Redis URL, a
        L{FallbackCounters} over L{RedisCounters}, with a L{MemoryCounters}
        for the outages.  Give it to a L{CountersService}.
    @raise ValueError: for a setting L{parse_counters_url} refuses.
    """
    address = parse_counters_url(setting)
    if address is None:
        return MemoryCounters()
    redis = RedisCounters(address, reactor)
    return FallbackCounters(
        redis,
        MemoryCounters(),
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
