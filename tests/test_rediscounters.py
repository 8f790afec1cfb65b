"""
Tests for L{pop3srv.server.rediscounters}: failed-login counters in Redis,
shared by several nodes, with this server's memory standing in while Redis
is unreachable.

  - the C{counters} setting's parser (L0, with Hypothesis);
  - L{FallbackCounters} over a primary that answers, fails or hangs as
    told, on a fake clock (L1): when it falls back, what it logs, how it
    probes;
  - the same behaviour asked of L{MemoryCounters} and of L{RedisCounters}
    over a real C{redis-server} (L{neighbours.RedisServer}), then what only
    Redis does: sharing between clients, atomic adds, expiry, timeouts;
  - L{FallbackCounters} over a real Redis that is stopped, frozen and
    started again mid-run, and over a peer that takes the connection and
    never answers.

Tests with a real Redis use the global reactor through L{run_until} and
real time with windows of a fraction of a second; each is skipped, with
the reason, where C{redis-server} is not installed.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import failure_of, result_of, run_until
from hypothesis import given
from hypothesis import strategies as st
from neighbours import RedisServer, free_port
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3srv.server.limits import IAuthCounters, MemoryCounters
from pop3srv.server.rediscounters import (
    CountersCopy,
    CountersService,
    FallbackCounters,
    IConnectedCounters,
    INamedEventCounters,
    KeyEvents,
    NamedMemoryCounters,
    RedisAddress,
    RedisCounters,
    RedisUnavailable,
    counters_for,
    event_member,
    parse_counters_url,
)

#: Bounds every wait on the real reactor.
WAIT = 10.0


def reactor() -> Any:
    """The global reactor (imported late: importing it installs it)."""
    from twisted.internet import reactor

    return reactor


def ask(d: defer.Deferred[Any]) -> Any:
    """The result of C{d}, running the real reactor (at most L{WAIT} s)."""
    return run_until(d, WAIT)


def sleep(seconds: float) -> None:
    """Let C{seconds} of real time pass with the reactor running."""
    run_until(task.deferLater(reactor(), seconds, lambda: None), seconds + WAIT)


def lines(events: list[LogEvent], pattern: str) -> list[str]:
    """The logged lines matching C{pattern}."""
    return [text for e in events if re.search(pattern, text := formatEvent(e))]


@pytest.fixture(autouse=True)
def leaves_no_timer() -> Iterator[None]:
    """No test leaves a timer of its own on the global reactor (a probe, a timeout)."""
    before = set(reactor().getDelayedCalls())
    yield
    run_until(task.deferLater(reactor(), 0, lambda: None))
    left = [c for c in reactor().getDelayedCalls() if c not in before and c.active()]
    assert not left, left


# --- the setting -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("memory", None),
        ("redis://127.0.0.1", RedisAddress("127.0.0.1", 6379, 0)),
        ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, 2)),
        ("redis://redis.example.org:7000/", RedisAddress("redis.example.org", 7000, 0)),
        ("REDIS://Redis.Example.ORG/15", RedisAddress("redis.example.org", 6379, 15)),
        ("redis://[::1]:6379/1", RedisAddress("::1", 6379, 1)),
        ("redis://[2001:DB8::7]/0", RedisAddress("2001:db8::7", 6379, 0)),
        ("redis://localhost", RedisAddress("localhost", 6379, 0)),
    ],
)
def test_parse_counters_url(text: str, expected: RedisAddress | None) -> None:
    """C{memory}, or a Redis URL whose port and database may be left out."""
    assert parse_counters_url(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not memory or a redis:// URL"),
        ("Memory", "not memory or a redis:// URL"),
        ("rediss://127.0.0.1", "not memory or a redis:// URL"),
        ("127.0.0.1:6379", "not memory or a redis:// URL"),
        ("redis://", "no host"),
        ("redis://:6379/0", "no host"),
        ("redis://::1/0", "goes in brackets"),
        ("redis://[::1/0", "goes in brackets"),
        ("redis://[::1]x/0", "goes in brackets"),
        ("redis://[::1]:0/0", "port must be"),
        ("redis://[1.2.3.4]/0", "not an IPv6 address"),
        ("redis://user:pw@host/0", "user or password is not supported"),
        ("redis://host?db=1", "not a name"),
        ("redis://a b/0", "not a name"),
        ("redis://host:0/0", "port must be a number from 1 to 65535"),
        ("redis://host:65536/0", "port must be a number from 1 to 65535"),
        ("redis://host:/0", "port must be a number from 1 to 65535"),
        ("redis://host:x/0", "port must be a number from 1 to 65535"),
        ("redis://host/x", "database must be a number"),
        ("redis://host/-1", "database must be a number"),
        ("redis://host/0?timeout=1", "database must be a number"),
        ("redis://host/0/1", "database must be a number"),
        ("redis://host/\u0661", "database must be a number"),
    ],
)
def test_parse_counters_url_refuses(text: str, why: str) -> None:
    """Anything else is refused in one line naming the expected form and what is wrong."""
    with pytest.raises(ValueError, match=r"^expected memory or redis://HOST") as e:
        parse_counters_url(text)
    message = str(e.value)
    assert why in message and "\n" not in message and repr(text) in message


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)


@given(_hosts, st.integers(1, 65535), st.integers(0, 10**6))
def test_parse_counters_url_reads_back_what_it_names(host: str, port: int, db: int) -> None:
    """An address's URL parses back to the same address."""
    address = RedisAddress(host, port, db)
    assert parse_counters_url(address.url) == address


@given(st.text(max_size=40) | st.text(max_size=30).map(lambda t: "redis://" + t))
def test_parse_counters_url_fails_only_with_value_error(text: str) -> None:
    """Whatever the text, the answer is an address, None, or a one-line ValueError."""
    try:
        parse_counters_url(text)
    except ValueError as e:
        assert "\n" not in str(e).replace(repr(text), "")


def test_counters_for() -> None:
    """C{memory} gives this process's counters; a URL, Redis with the fallback."""
    assert isinstance(counters_for("memory", MemoryReactorClock()), MemoryCounters)
    counters = counters_for("redis://[::1]:7000/3", MemoryReactorClock())
    assert isinstance(counters, FallbackCounters)
    verifyObject(IConnectedCounters, counters)
    assert isinstance(counters.primary, RedisCounters)
    assert counters.primary.address == RedisAddress("::1", 7000, 3)
    assert isinstance(counters.fallback, NamedMemoryCounters)
    with pytest.raises(ValueError, match="expected memory or redis://"):
        counters_for("redis://host:99999", MemoryReactorClock())


# --- FallbackCounters on a fake clock --------------------------------------------


@implementer(INamedEventCounters)
class Switchable:
    """
    L{NamedMemoryCounters} that answer, fail or never answer, as C{mode}
    says; counts the questions that reach it and keeps the unanswered ones
    (C{hanging}), and what they asked, which L{thaw} does late, as a
    frozen Redis does when it runs again.

    @ivar refuse_merges: whether L{merge} fails whatever the mode.
    """

    def __init__(self) -> None:
        self.store = NamedMemoryCounters()
        self.mode = "answer"
        self.refuse_merges = False
        self.asked = 0
        self.hanging: list[defer.Deferred[Any]] = []
        self._held: list[Callable[[], defer.Deferred[Any]]] = []

    def _answer(self, call: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        self.asked += 1
        if self.mode == "fail":
            return defer.fail(ConnectionRefusedError("no one there"))
        if self.mode == "hang":
            d: defer.Deferred[Any] = defer.Deferred()
            self.hanging.append(d)
            self._held.append(call)
            return d
        return call()

    def thaw(self) -> None:
        """Do what the unanswered questions asked (their askers have given up)."""
        held, self._held = self._held, []
        for call in held:
            call()

    def add(self, keys: Sequence[str], now: float, window: float) -> defer.Deferred[list[int]]:
        return self._answer(lambda: self.store.add(keys, now, window))

    def add_named(
        self, event: str, keys: Sequence[str], now: float, window: float
    ) -> defer.Deferred[list[int]]:
        return self._answer(lambda: self.store.add_named(event, keys, now, window))

    def merge(self, copy: CountersCopy) -> defer.Deferred[None]:
        if self.refuse_merges:
            self.asked += 1
            return defer.fail(ConnectionRefusedError("merge refused"))
        return self._answer(lambda: self.store.merge(copy))

    def count(self, keys: Sequence[str], now: float, window: float) -> defer.Deferred[list[int]]:
        return self._answer(lambda: self.store.count(keys, now, window))

    def clear(self, keys: Sequence[str]) -> defer.Deferred[None]:
        return self._answer(lambda: self.store.clear(keys))

    def block(self, key: str, until: float) -> defer.Deferred[None]:
        return self._answer(lambda: self.store.block(key, until))

    def blocked_until(self, keys: Sequence[str], now: float) -> defer.Deferred[list[float | None]]:
        return self._answer(lambda: self.store.blocked_until(keys, now))


@pytest.fixture
def switchable() -> Switchable:
    return Switchable()


@pytest.fixture
def fallback(switchable: Switchable, clock: MemoryReactorClock) -> FallbackCounters:
    return FallbackCounters(
        switchable, NamedMemoryCounters(), clock, name="Shared", timeout=0.5, probe_interval=1.0
    )


OUTAGE = r"^Shared unreachable \(.+\); counting failed logins in this server until it is back$"
BACK = r"^Shared is back; failed logins are counted there again$"


def test_fallback_provides_the_interfaces(fallback: FallbackCounters) -> None:
    verifyObject(IAuthCounters, fallback)
    verifyObject(IConnectedCounters, fallback)
    verifyObject(INamedEventCounters, fallback.fallback)


def test_fallback_asks_the_primary_while_it_answers(
    fallback: FallbackCounters, switchable: Switchable, log_events: list[LogEvent]
) -> None:
    """Every question goes to the primary; nothing is logged."""
    assert result_of(fallback.add(["a", "b"], 10, 60)) == [1, 1]
    assert result_of(fallback.block("a", 100)) is None
    assert result_of(fallback.blocked_until(["a", "b"], 10)) == [100, None]
    assert result_of(fallback.clear(["b"])) is None
    assert result_of(fallback.count(["a", "b"], 10, 60)) == [1, 0]
    assert switchable.asked == 5
    assert result_of(switchable.store.count(["a"], 10, 60)) == [1]
    assert result_of(fallback.fallback.count(["a"], 10, 60)) == [0]
    assert fallback.up and not lines(log_events, "unreachable")


def test_fallback_answers_at_once_when_the_primary_fails(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    A failure is answered from memory at once and logged once, with its
    reason; later questions do not reach the primary.
    """
    switchable.mode = "fail"
    assert result_of(fallback.add(["a"], 10, 60)) == [1]
    assert not fallback.up
    (line,) = lines(log_events, OUTAGE)
    assert "no one there" in line
    assert [e["log_level"] for e in log_events] == [LogLevel.warn]
    for n in range(2, 6):
        assert result_of(fallback.add(["a"], 10 + n, 60)) == [n]
    assert result_of(fallback.block("a", 100)) is None
    assert result_of(fallback.blocked_until(["a"], 20)) == [100]
    assert switchable.asked == 1
    assert len(lines(log_events, OUTAGE)) == 1


def test_fallback_answers_in_time_when_the_primary_hangs(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    A question the primary does not answer within the timeout is answered
    from memory then, and the question to the primary is cancelled; the
    questions asked meanwhile log nothing more.
    """
    switchable.mode = "hang"
    first = fallback.add(["a"], 10, 60)
    second = fallback.count(["a"], 10, 60)
    clock.advance(0.49)
    assert not first.called and not second.called
    clock.advance(0.01)
    assert result_of(first) == [1]
    assert result_of(second) == [1]
    assert len(switchable.hanging) == 2
    assert all(d.called for d in switchable.hanging), "cancelled"
    (line,) = lines(log_events, OUTAGE)
    assert "no answer within 0.5 s" in line


def test_fallback_probes_until_the_primary_answers(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    While down, one probe at a time, each bounded by the timeout, every
    probe interval; when one succeeds, one line, the failures and blocks
    counted meanwhile are merged into the primary, and questions go to it
    again.
    """
    switchable.mode = "fail"
    result_of(fallback.add(["a"], 10, 60))
    result_of(fallback.block("b", 100))
    assert switchable.asked == 1
    clock.advance(1.0)
    assert switchable.asked == 2, "one probe after the interval"
    switchable.mode = "hang"
    clock.advance(1.0)
    assert switchable.asked == 3
    clock.advance(0.4)
    assert switchable.asked == 3 and len(switchable.hanging) == 1
    clock.advance(0.1)
    assert switchable.hanging[0].called, "the probe was cancelled at the timeout"
    assert not fallback.up
    clock.advance(0.9)
    assert switchable.asked == 3, "the next probe waits for the interval"
    switchable.mode = "answer"
    clock.advance(0.1)
    assert switchable.asked == 5 and fallback.up, "the probe, then the merge"
    assert len(lines(log_events, BACK)) == 1 and len(lines(log_events, OUTAGE)) == 1
    assert result_of(switchable.store.count(["a"], 11, 60)) == [1], "merged"
    assert result_of(switchable.store.blocked_until(["b"], 20)) == [100], "merged"
    assert result_of(fallback.fallback.count(["a"], 11, 60)) == [0], "not counted here again"
    assert result_of(fallback.add(["a"], 11, 60)) == [2], "1 from the outage, 1 now"
    assert result_of(fallback.blocked_until(["b", "c"], 20)) == [100, None]
    clock.advance(10)
    assert switchable.asked == 7, "no probes while up"
    assert not clock.getDelayedCalls()


def test_fallback_clear_forgets_both(fallback: FallbackCounters, switchable: Switchable) -> None:
    """A success forgets the failures counted during an outage too."""
    switchable.mode = "fail"
    result_of(fallback.add(["a"], 10, 60))
    switchable.mode = "answer"
    fallback._back()
    result_of(fallback.add(["a"], 11, 60))
    assert result_of(fallback.count(["a"], 11, 60)) == [2]
    result_of(fallback.clear(["a"]))
    assert result_of(fallback.count(["a"], 11, 60)) == [0]


def test_a_block_holds_here_through_an_outage(
    fallback: FallbackCounters, switchable: Switchable
) -> None:
    """
    A block set while the primary answers is kept here too: this server
    still refuses the key while the primary is down.
    """
    assert result_of(fallback.block("a", 100)) is None
    switchable.mode = "fail"
    assert result_of(fallback.blocked_until(["a", "b"], 20)) == [100, None]
    assert not fallback.up
    assert result_of(fallback.blocked_until(["a"], 100)) == [None]


def test_an_event_recorded_late_counts_once(
    fallback: FallbackCounters, switchable: Switchable, clock: MemoryReactorClock
) -> None:
    """
    A failure the primary answers too late for is counted here, and by the
    primary too when it runs again; once the primary is back, it counts
    there once, and here no more.
    """
    switchable.mode = "hang"
    failed = fallback.add(["a", "b"], 10, 60)
    clock.advance(0.5)
    assert result_of(failed) == [1, 1]
    switchable.thaw()
    assert result_of(switchable.store.count(["a", "b"], 10, 60)) == [1, 1], "recorded late"
    switchable.mode = "answer"
    clock.advance(1.0)
    assert fallback.up
    assert result_of(fallback.count(["a", "b"], 10, 60)) == [1, 1]
    assert result_of(switchable.store.count(["a", "b"], 10, 60)) == [1, 1]
    assert result_of(fallback.fallback.count(["a", "b"], 10, 60)) == [0, 0]


def test_a_part_not_merged_stays_here(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    A merge the primary fails takes it down again, and what it held is
    counted here until the primary is back again and takes it.
    """
    switchable.mode = "fail"
    result_of(fallback.add(["a"], 10, 60))
    switchable.mode = "answer"
    switchable.refuse_merges = True
    clock.advance(1.0)
    assert not fallback.up, "down again: the merge failed"
    assert result_of(fallback.count(["a"], 10, 60)) == [1]
    assert result_of(switchable.store.count(["a"], 10, 60)) == [0]
    switchable.refuse_merges = False
    clock.advance(1.0)
    assert fallback.up
    assert result_of(switchable.store.count(["a"], 10, 60)) == [1]
    assert result_of(fallback.count(["a"], 10, 60)) == [1]
    result_of(fallback.stop())
    assert not clock.getDelayedCalls()


def test_flapping_is_told_once_a_period(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    A primary that goes down and comes back again and again: the first
    outage and its end are told as usual, the swings that follow within a
    minute of that outage line only at debug level, and one line at the
    end of that minute says how many there were and that the primary is
    up (or down, as it may be); a new outage after a quiet minute is told
    at once again.
    """

    def told() -> list[str]:
        return [formatEvent(e) for e in log_events if e["log_level"] > LogLevel.debug]

    for _ in range(10):
        switchable.mode = "fail"
        result_of(fallback.count(["a"], 0, 60))
        assert not fallback.up
        switchable.mode = "answer"
        clock.advance(1.0)
        assert fallback.up
        clock.advance(2.0)
    assert len(told()) == 2
    assert re.search(OUTAGE, told()[0]) and re.search(BACK, told()[1])
    assert len(lines(log_events, r"\(again\)$")) == 18
    clock.advance(60 - clock.seconds())
    assert told()[2:] == [
        "Shared is back; failed logins are counted there again (9 outages in the last 60 s)"
    ]

    switchable.mode = "fail"
    result_of(fallback.count(["a"], 0, 60))
    clock.advance(60 - 1.0)
    assert len(told()) == 3, "down again within the minute"
    clock.advance(1.0)
    assert len(told()) == 4
    assert re.fullmatch(
        r"Shared unreachable \(.*no one there.*\); counting failed logins in this server"
        r" until it is back \(1 outage in the last 60 s\)",
        told()[3],
    )
    switchable.mode = "answer"
    clock.advance(1.0)
    assert fallback.up and re.search(BACK, told()[4])

    clock.advance(120 + 60 - clock.seconds())
    switchable.mode = "fail"
    result_of(fallback.count(["a"], 0, 60))
    assert len(told()) == 6 and re.search(OUTAGE, told()[5]), "a quiet minute: told at once"
    result_of(fallback.stop())
    assert not clock.getDelayedCalls()


def test_take_events(clock: MemoryReactorClock) -> None:
    """
    The memory standing in for Redis hands over its events still in their
    window, with their names, and forgets them; it keeps its blocks.
    """
    memory = NamedMemoryCounters()
    result_of(memory.add_named("e1", ["a", "b"], 10, 60))
    result_of(memory.add_named("e2", ["a"], 20, 5))
    result_of(memory.add_named("e3", ["c"], 0, 5))
    result_of(memory.block("a", 100))
    result_of(memory.block("b", 20))
    copy = memory.take_events(21)
    assert sorted(copy.events, key=lambda k: k.key) == [
        KeyEvents("a", 5, ((20, event_member("e2", 1)),)),
        KeyEvents("b", 60, ((10, event_member("e1", 2)),)),
    ]
    assert copy.blocks == (("a", 100),)
    assert result_of(memory.count(["a", "b", "c"], 21, 60)) == [0, 0, 0]
    assert result_of(memory.blocked_until(["a"], 21)) == [100]
    assert not memory.take_events(21).events


def test_copy_parts() -> None:
    """A copy comes in parts of about the size asked, a key's events never split."""
    events = tuple(KeyEvents(f"k{i}", 60, tuple((t, f"e{t}") for t in range(3))) for i in range(5))
    blocks = tuple((f"b{i}", 100.0) for i in range(4))
    copy = CountersCopy(events, blocks)
    parts = list(copy.parts(4))
    assert [sum(len(k.events) for k in p.events) + len(p.blocks) for p in parts] == [6, 6, 4, 3]
    assert sum((p.events for p in parts), ()) == events
    assert sum((p.blocks for p in parts), ()) == blocks
    assert list(CountersCopy().parts(4)) == [] and not CountersCopy()


def test_fallback_start_and_stop(
    fallback: FallbackCounters,
    switchable: Switchable,
    clock: MemoryReactorClock,
    log_events: list[LogEvent],
) -> None:
    """
    L{FallbackCounters.start} probes at once, so an outage is logged at
    start-up; L{FallbackCounters.stop} leaves no timer and no probe behind.
    """
    switchable.mode = "hang"
    fallback.start()
    assert switchable.asked == 1
    clock.advance(0.5)
    (line,) = lines(log_events, OUTAGE)
    assert "no answer within 0.5 s" in line
    clock.advance(1.0)
    assert switchable.asked == 2
    result_of(fallback.stop())
    assert all(d.called for d in switchable.hanging)
    assert not clock.getDelayedCalls()
    clock.advance(5)
    assert switchable.asked == 2
    assert len(log_events) == 1


# --- the same behaviour from memory and from Redis ---------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the module's tests (each uses keys of its own)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


class RedisMaker:
    """
    Makes L{RedisCounters} on a Redis, all with one fresh key L{prefix};
    L{stop_all} stops every one made.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.prefix = f"test-{uuid.uuid4().hex}:"
        self.made: list[RedisCounters] = []

    def __call__(self, server: RedisServer | None = None, **kwargs: Any) -> RedisCounters:
        """L{RedisCounters} on C{server} (by default the module's), with C{kwargs}."""
        kwargs.setdefault("prefix", self.prefix)
        address = parse_counters_url((server or self.server).url)
        assert address is not None
        counters = RedisCounters(address, reactor(), **kwargs)
        self.made.append(counters)
        return counters

    def stop_all(self) -> None:
        for counters in self.made:
            ask(counters.stop())


@pytest.fixture
def make_redis(redis_server: RedisServer) -> Iterator[RedisMaker]:
    """A L{RedisMaker} on the module's Redis; what it made is stopped after the test."""
    maker = RedisMaker(redis_server)
    yield maker
    maker.stop_all()


@pytest.fixture(params=["memory", "named", "redis"])
def counters(request: pytest.FixtureRequest) -> IAuthCounters:
    """
    The same questions asked of this process's memory (as counters for one
    server, and as those standing in for Redis) and of Redis.
    """
    if request.param == "memory":
        return MemoryCounters(max_events=5)
    if request.param == "named":
        return NamedMemoryCounters(max_events=5)
    make = request.getfixturevalue("make_redis")
    redis: RedisCounters = make(max_events=5)
    return redis


@pytest.fixture(params=["named", "redis"])
def named(request: pytest.FixtureRequest) -> INamedEventCounters:
    """Counters whose events have names, in memory and in Redis."""
    if request.param == "named":
        return NamedMemoryCounters(max_events=5)
    make = request.getfixturevalue("make_redis")
    redis: RedisCounters = make(max_events=5)
    return redis


@pytest.fixture
def now() -> float:
    """The real time (a block's expiry in Redis is reckoned from it)."""
    return float(reactor().seconds())


def test_counters_provide_the_interface(counters: IAuthCounters) -> None:
    verifyObject(IAuthCounters, counters)


def test_add_counts_the_events_within_the_window(counters: IAuthCounters, now: float) -> None:
    """Each key counts its own events, of the last C{window} seconds."""
    assert ask(counters.add(["a"], now, 10)) == [1]
    assert ask(counters.add(["a"], now + 1, 10)) == [2]
    assert ask(counters.add(["a", "b"], now + 2, 10)) == [3, 1]
    assert ask(counters.count(["a", "b", "c"], now + 2, 10)) == [3, 1, 0]
    assert ask(counters.count(["a", "b"], now + 2.5, 2)) == [2, 1]
    assert ask(counters.count(["a"], now + 11.5, 10)) == [1]
    assert ask(counters.add(["a"], now + 11.9, 10)) == [2]


def test_an_event_at_the_window_start_is_out(counters: IAuthCounters, now: float) -> None:
    """An event exactly C{window} seconds old no longer counts."""
    ask(counters.add(["a"], now, 10))
    assert ask(counters.count(["a"], now + 9.999, 10)) == [1]
    assert ask(counters.count(["a"], now + 10, 10)) == [0]


def test_a_key_given_twice_counts_twice(counters: IAuthCounters, now: float) -> None:
    assert ask(counters.add(["a", "a", "b"], now, 10)) == [1, 2, 1]


def test_count_records_nothing(counters: IAuthCounters, now: float) -> None:
    assert ask(counters.count(["a"], now, 10)) == [0]
    assert ask(counters.add(["a"], now, 10)) == [1]


def test_events_per_key_are_capped(counters: IAuthCounters, now: float) -> None:
    """A key keeps its latest C{max_events} events, no more."""
    answers = [ask(counters.add(["a"], now + i, 100))[0] for i in range(8)]
    assert answers == [1, 2, 3, 4, 5, 5, 5, 5]
    assert ask(counters.count(["a"], now + 8, 100)) == [5]
    assert ask(counters.count(["a"], now + 8, 5.5)) == [5]
    assert ask(counters.count(["a"], now + 8, 4.5)) == [4]


def test_block_and_blocked_until(counters: IAuthCounters, now: float) -> None:
    """A block holds until its time, exactly; a new block replaces the old."""
    assert ask(counters.blocked_until(["a"], now)) == [None]
    assert ask(counters.block("a", now + 60.125)) is None
    assert ask(counters.blocked_until(["a", "b"], now)) == [now + 60.125, None]
    assert ask(counters.blocked_until(["a"], now + 60.124)) == [now + 60.125]
    assert ask(counters.blocked_until(["a"], now + 60.125)) == [None]
    ask(counters.block("a", now + 30))
    assert ask(counters.blocked_until(["a"], now)) == [now + 30]


def test_clear_forgets_events_and_block(counters: IAuthCounters, now: float) -> None:
    ask(counters.add(["a", "b"], now, 10))
    ask(counters.block("a", now + 60))
    ask(counters.block("b", now + 60))
    assert ask(counters.clear(["a", "c"])) is None
    assert ask(counters.count(["a", "b"], now, 10)) == [0, 1]
    assert ask(counters.blocked_until(["a", "b"], now)) == [None, now + 60]


def test_no_keys(counters: IAuthCounters, now: float) -> None:
    assert ask(counters.add([], now, 10)) == []
    assert ask(counters.count([], now, 10)) == []
    assert ask(counters.blocked_until([], now)) == []
    assert ask(counters.clear([])) is None


def test_any_text_is_a_key(counters: IAuthCounters, now: float) -> None:
    """User names with spaces, colons, non-ASCII or undecodable bytes are keys like any."""
    keys = ["user:J\u00f6rg M\u00fcller", "pair:::1:a:b", "user:\udcff", "user:\udcfe", "user:*"]
    assert ask(counters.add(keys, now, 10)) == [1] * len(keys)
    assert ask(counters.add(keys[:1], now, 10)) == [2]
    assert ask(counters.count(keys, now, 10)) == [2, 1, 1, 1, 1]
    ask(counters.block(keys[2], now + 5))
    assert ask(counters.blocked_until(keys, now)) == [None, None, now + 5, None, None]


def test_an_event_named_twice_counts_once(named: INamedEventCounters, now: float) -> None:
    """The same event recorded again changes nothing; a key given twice counts twice."""
    assert ask(named.add_named("e1", ["a", "b"], now, 10)) == [1, 1]
    assert ask(named.add_named("e1", ["a", "b"], now, 10)) == [1, 1]
    assert ask(named.add_named("e2", ["a", "a"], now + 1, 10)) == [2, 3]
    assert ask(named.add(["a"], now + 1, 10)) == [4]
    assert ask(named.count(["a", "b"], now + 1, 10)) == [4, 1]


def test_merge_adds_what_is_not_there(named: INamedEventCounters, now: float) -> None:
    """
    A merge adds the events not there already, up to the cap per key, and
    the blocks that end later; merging again changes nothing.
    """
    ask(named.add_named("e1", ["a"], now, 10))
    ask(named.block("x", now + 30))
    ask(named.block("y", now + 30))
    copy = CountersCopy(
        (
            KeyEvents("a", 10, ((now, event_member("e1", 1)), (now + 1, event_member("e2", 1)))),
            KeyEvents("b", 10, tuple((now + t, event_member(f"b{t}", 1)) for t in range(8))),
            KeyEvents("c", 10, ((now - 20, event_member("old", 1)),)),
        ),
        (("x", now + 20), ("y", now + 40), ("z", now + 50), ("w", now - 1)),
    )
    for _ in range(2):
        assert ask(named.merge(copy)) is None
        assert ask(named.count(["a", "b", "c"], now + 8, 10)) == [2, 5, 0]
        assert ask(named.blocked_until(["x", "y", "z", "w"], now + 1)) == [
            now + 30,
            now + 40,
            now + 50,
            None,
        ]
    assert ask(named.merge(CountersCopy())) is None


# --- what only Redis does ----------------------------------------------------------


def test_two_clients_share_counts(make_redis: RedisMaker, now: float) -> None:
    """Two nodes' counters (two connections) see each other's events and blocks."""
    one, two = make_redis(), make_redis()
    assert ask(one.add(["a"], now, 10)) == [1]
    assert ask(two.add(["a"], now + 1, 10)) == [2]
    assert ask(one.count(["a"], now + 1, 10)) == [2]
    ask(two.block("a", now + 60))
    assert ask(one.blocked_until(["a"], now)) == [now + 60]
    ask(one.clear(["a"]))
    assert ask(two.count(["a"], now + 1, 10)) == [0]
    assert ask(two.blocked_until(["a"], now)) == [None]


def test_adds_are_atomic(make_redis: RedisMaker, now: float) -> None:
    """
    Adds from two clients at once each see all the events before theirs:
    the answers are 1 to N, each once.
    """
    one, two = make_redis(), make_redis()
    ask(one.count(["a"], now, 10))
    ask(two.count(["a"], now, 10))
    pending = [(one, two)[i % 2].add(["a", "b"], now, 10) for i in range(40)]
    answers = ask(defer.gatherResults(pending))
    assert sorted(a for a, _ in answers) == list(range(1, 41))
    assert sorted(b for _, b in answers) == list(range(1, 41))


def test_keys_live_under_the_prefix_and_expire(
    make_redis: RedisMaker, redis_server: RedisServer
) -> None:
    """
    Every key starts with the prefix; events expire a window after the
    last, a block when it ends.
    """
    counters = make_redis()
    prefix = make_redis.prefix
    now = reactor().seconds()
    ask(counters.add(["a"], now, 0.3))
    ask(counters.block("a", now + 0.3))
    assert sorted(redis_server.command("KEYS", prefix + "*")) == [
        prefix + "block:a",
        prefix + "events:a",
    ]
    for key in ("block:a", "events:a"):
        assert 0 < redis_server.command("PTTL", prefix + key) <= 300
    assert float(redis_server.command("GET", prefix + "block:a")) == now + 0.3
    sleep(0.4)
    assert redis_server.command("KEYS", prefix + "*") == []


def test_a_block_already_over_expires_at_once(
    make_redis: RedisMaker, redis_server: RedisServer, now: float
) -> None:
    counters = make_redis()
    ask(counters.block("a", now - 10))
    sleep(0.01)
    assert redis_server.command("EXISTS", make_redis.prefix + "block:a") == 0


def test_database_is_selected(
    make_redis: RedisMaker, redis_server: RedisServer, now: float
) -> None:
    address = RedisAddress("127.0.0.1", redis_server.port, 3)
    counters = RedisCounters(address, reactor(), prefix="test-db:")
    try:
        ask(counters.add(["a"], now, 10))
        assert redis_server.command("EXISTS", "test-db:events:a", db=3) == 1
        assert redis_server.command("EXISTS", "test-db:events:a") == 0
        ask(counters.clear(["a"]))
    finally:
        ask(counters.stop())


def test_a_database_redis_does_not_have_fails(redis_server: RedisServer, now: float) -> None:
    """A C{SELECT} Redis refuses fails the question, saying why, and holds nothing."""
    counters = RedisCounters(RedisAddress("127.0.0.1", redis_server.port, 999), reactor())
    with pytest.raises(RedisUnavailable, match="dbid=999"):
        ask(counters.add(["a"], now, 10))
    ask(counters.stop())


def test_no_redis_fails_fast(now: float) -> None:
    """With nothing at the address, a question fails as soon as the connection is refused."""
    counters = RedisCounters(RedisAddress("127.0.0.1", free_port()), reactor())
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        ask(counters.count(["a"], now, 10))
    assert time.monotonic() - started < 1.0
    ask(counters.stop())


def test_stop_closes_the_connection(
    make_redis: RedisMaker, redis_server: RedisServer, now: float
) -> None:
    """After L{RedisCounters.stop}, Redis has no connection from us and questions fail."""
    before = len(redis_server.command("CLIENT", "LIST").splitlines())
    counters = make_redis()
    ask(counters.add(["a"], now, 10))
    assert len(redis_server.command("CLIENT", "LIST").splitlines()) == before + 1
    ask(counters.stop())
    assert len(redis_server.command("CLIENT", "LIST").splitlines()) == before
    with pytest.raises(RedisUnavailable, match="closed"):
        ask(counters.add(["a"], now, 10))


def test_stop_while_connecting(redis_server: RedisServer, now: float) -> None:
    counters = RedisCounters(RedisAddress("127.0.0.1", redis_server.port), reactor())
    asked = counters.add(["a"], now, 10)
    ask(counters.stop())
    with pytest.raises(RedisUnavailable, match="closed"):
        ask(asked)


def test_merged_keys_expire(make_redis: RedisMaker, redis_server: RedisServer, now: float) -> None:
    """Merged events live a window after the last, a merged block until it ends."""
    counters = make_redis()
    copy = CountersCopy(
        (KeyEvents("a", 10, ((now - 5, "e1:1"), (now - 2, "e2:1"))),), (("a", now + 20),)
    )
    ask(counters.merge(copy))
    prefix = make_redis.prefix
    assert 7000 < redis_server.command("PTTL", prefix + "events:a") <= 8000
    assert 19000 < redis_server.command("PTTL", prefix + "block:a") <= 20000


def test_keepalive_is_on(make_redis: RedisMaker, now: float) -> None:
    """The connection has TCP keepalive, checking within a minute where the system lets us say."""
    counters = make_redis()
    ask(counters.count(["a"], now, 10))
    handle = counters._protocol.transport.getHandle()
    assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 60


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop, freeze and start again."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_reconnects_after_a_restart(
    make_redis: RedisMaker, own_redis: RedisServer, now: float
) -> None:
    """A lost connection is made again by the next question."""
    counters = make_redis(own_redis)
    assert ask(counters.add(["a"], now, 10)) == [1]
    own_redis.stop()
    with pytest.raises(Exception):  # noqa: B017 (lost or refused, as the kernel tells it)
        ask(counters.add(["a"], now, 10))
    own_redis.start()
    assert ask(counters.add(["a"], now, 10)) == [1], "a restarted Redis starts empty"


def test_a_frozen_redis_times_out(
    make_redis: RedisMaker, own_redis: RedisServer, now: float
) -> None:
    """No answer within the timeout fails the question and drops the connection."""
    counters = make_redis(own_redis, timeout=0.3)
    ask(counters.count(["a"], now, 10))
    own_redis.pause()
    try:
        started = time.monotonic()
        with pytest.raises(Exception, match=r"Not received Redis response in 0\.3 seconds"):
            ask(counters.count(["a"], now, 10))
        assert time.monotonic() - started < 1.0
    finally:
        own_redis.resume()
    assert ask(counters.count(["a"], now, 10)) == [0]


# --- FallbackCounters over a real Redis --------------------------------------------


@pytest.fixture
def shared(make_redis: RedisMaker, own_redis: RedisServer) -> Iterator[FallbackCounters]:
    """L{FallbackCounters} over L{own_redis}, as L{counters_for} makes them, but quicker."""
    redis = make_redis(own_redis)
    counters = FallbackCounters(
        redis,
        NamedMemoryCounters(),
        reactor(),
        name=f"Redis at 127.0.0.1:{own_redis.port}",
        probe=redis.probe,
        timeout=0.5,
        probe_interval=0.2,
    )
    yield counters
    ask(counters.stop())


def wait_for_line(events: list[LogEvent], pattern: str) -> None:
    deadline = time.monotonic() + WAIT
    while not lines(events, pattern):
        assert time.monotonic() < deadline, f"no line like {pattern!r}"
        sleep(0.05)


def test_redis_stopped_and_started_again(
    shared: FallbackCounters,
    own_redis: RedisServer,
    make_redis: RedisMaker,
    log_events: list[LogEvent],
) -> None:
    """
    Redis stopped mid-run: questions are answered from memory, at once
    after the first, and the outage is logged once.  Redis started again:
    its return is logged once, the failures and the block counted
    meanwhile are merged into it (empty, as a restarted Redis without
    persistence is), where every node sees them, and the counts go to
    Redis again.
    """
    prefix = make_redis.prefix
    key = prefix + "events:pair:192.0.2.1:alice"
    now = reactor().seconds()
    assert ask(shared.add(["pair:192.0.2.1:alice"], now, 60)) == [1]
    assert own_redis.command("ZCARD", key) == 1

    own_redis.stop()
    started = time.monotonic()
    assert ask(shared.add(["pair:192.0.2.1:alice"], now, 60)) == [1]
    assert time.monotonic() - started < 0.6
    assert not shared.up
    for n in range(2, 6):
        d = shared.add(["pair:192.0.2.1:alice"], now + n, 60)
        assert d.called, "answered without waiting on Redis"
        assert result_of(d) == [n]
    ask(shared.block("addr:192.0.2.1", now + 60))
    sleep(0.5)
    outage = f"^Redis at 127.0.0.1:{own_redis.port} unreachable \\(.+\\); counting failed logins"
    assert len(lines(log_events, outage)) == 1
    assert not lines(log_events, "is back;")

    own_redis.start()
    back = f"^Redis at 127.0.0.1:{own_redis.port} is back; failed logins are counted there again$"
    wait_for_line(log_events, back)
    assert shared.up
    assert ask(shared.add(["pair:192.0.2.1:alice"], now + 6, 60)) == [6]
    assert own_redis.command("ZCARD", key) == 6, "the outage's five, merged, and one"
    assert float(own_redis.command("GET", prefix + "block:addr:192.0.2.1")) == now + 60
    assert ask(shared.blocked_until(["addr:192.0.2.1"], now + 6)) == [now + 60]
    other_node = make_redis(own_redis)
    assert ask(other_node.count(["pair:192.0.2.1:alice"], now + 6, 60)) == [6]
    assert ask(other_node.blocked_until(["addr:192.0.2.1"], now + 6)) == [now + 60]
    sleep(0.5)
    assert len(lines(log_events, outage)) == 1
    assert len(lines(log_events, back)) == 1
    assert {e["log_level"] for e in log_events} == {LogLevel.warn, LogLevel.info}


def test_redis_frozen_and_thawed(
    shared: FallbackCounters, own_redis: RedisServer, log_events: list[LogEvent]
) -> None:
    """
    A Redis that holds the connection and answers nothing delays a
    question by the timeout only.
    """
    now = reactor().seconds()
    ask(shared.count(["a"], now, 60))
    own_redis.pause()
    try:
        started = time.monotonic()
        assert ask(shared.add(["a"], now, 60)) == [1]
        assert 0.5 <= time.monotonic() - started < 1.0
        (line,) = lines(log_events, "unreachable")
        assert "no answer within 0.5 s" in line
        assert result_of(shared.add(["a"], now, 60)) == [2]
        sleep(1.5)
    finally:
        own_redis.resume()
    wait_for_line(log_events, "is back;")
    assert len(lines(log_events, "unreachable")) == 1


class SilentPeer(Protocol):
    """Takes a connection, reads what comes and never answers."""

    factory: SilentPeers

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.factory.open.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open.remove(self)


class SilentPeers(Factory):
    """
    Makes L{SilentPeer}s on L{port}: a Redis host that holds connections
    and answers nothing (frozen, or gone without a reset on a network that
    drops packets).

    @ivar accepted: connections taken.
    @ivar open: those still open.
    @ivar received: bytes read on all of them.
    """

    protocol = SilentPeer

    def __init__(self) -> None:
        self.accepted = 0
        self.open: list[SilentPeer] = []
        self.received = 0
        self.port = reactor().listenTCP(0, self, interface="127.0.0.1")
        self.number: int = self.port.getHost().port


@pytest.fixture
def silent_peers() -> Iterator[SilentPeers]:
    peers = SilentPeers()
    yield peers
    ask(defer.maybeDeferred(peers.port.stopListening))
    for peer in list(peers.open):
        peer.transport.abortConnection()
    wait_for(lambda: not peers.open)


def wait_for(condition: Callable[[], object]) -> None:
    """Run the reactor until C{condition} holds (at most L{WAIT} s)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        sleep(0.02)


def test_a_question_given_up_on_drops_the_connection(silent_peers: SilentPeers, now: float) -> None:
    """
    A question cancelled while Redis has not answered drops its
    connection: the next one goes out on a new connection, not behind it.
    """
    counters = RedisCounters(RedisAddress("127.0.0.1", silent_peers.number), reactor())
    try:
        asked = counters.count(["a"], now, 10)
        wait_for(lambda: silent_peers.received)
        assert silent_peers.accepted == 1
        asked.cancel()
        failure_of(asked, defer.CancelledError)
        wait_for(lambda: not silent_peers.open)
        again = counters.count(["a"], now, 10)
        wait_for(lambda: silent_peers.accepted == 2)
        again.cancel()
        failure_of(again, defer.CancelledError)
    finally:
        ask(counters.stop())


def test_a_silent_redis_is_left_for_a_new_one(
    silent_peers: SilentPeers, tmp_path: Path, log_events: list[LogEvent]
) -> None:
    """
    Over a peer that takes connections and never answers, each probe
    given up on drops its connection and the next makes a new one; so once
    a real Redis serves that port (the silent connection left as it is),
    the counters are back on it.
    """
    redis = RedisCounters(RedisAddress("127.0.0.1", silent_peers.number), reactor())
    counters = FallbackCounters(
        redis, NamedMemoryCounters(), reactor(), probe=redis.probe, timeout=0.2, probe_interval=0.1
    )
    counters.start()
    try:
        sleep(1.5)
        assert not counters.up
        assert silent_peers.accepted >= 3, "a new connection for each probe"
        assert len(silent_peers.open) <= 1, "each one given up on was dropped"
        ask(defer.maybeDeferred(silent_peers.port.stopListening))
        with RedisServer(tmp_path / "redis", port=silent_peers.number):
            wait_for_line(log_events, "is back;")
            assert ask(counters.add(["a"], reactor().seconds(), 60)) == [1]
    finally:
        ask(counters.stop())


def test_a_failure_during_a_freeze_counts_once(
    shared: FallbackCounters,
    own_redis: RedisServer,
    make_redis: RedisMaker,
    log_events: list[LogEvent],
) -> None:
    """
    A failure asked of a frozen Redis is counted here, and by Redis if it
    runs the script once it thaws; once Redis is back the failure counts
    once, there, and no more here.
    """
    key = "pair:192.0.2.1:alice"
    now = reactor().seconds()
    assert ask(shared.count([key], now, 600)) == [0]
    own_redis.pause()
    try:
        assert ask(shared.add([key], now + 1, 600)) == [1]
        assert not shared.up
        sleep(0.5)
    finally:
        own_redis.resume()
    wait_for_line(log_events, "is back;")
    assert ask(shared.count([key], now + 2, 600)) == [1]
    assert own_redis.command("ZCARD", make_redis.prefix + "events:" + key) == 1
    assert ask(shared.fallback.count([key], now + 2, 600)) == [0]


def test_redis_down_at_start(
    make_redis: RedisMaker, tmp_path: Path, log_events: list[LogEvent]
) -> None:
    """
    Started with Redis down, the service logs the outage at once and
    counts here; once Redis is there, it counts there.
    """
    server = RedisServer(tmp_path / "later")
    redis = make_redis(server, timeout=0.5)
    counters = FallbackCounters(
        redis, NamedMemoryCounters(), reactor(), probe=redis.probe, timeout=0.5, probe_interval=0.2
    )
    service = CountersService(counters)
    service.startService()
    wait_for_line(log_events, "unreachable")
    d = counters.add(["a"], reactor().seconds(), 60)
    assert d.called and result_of(d) == [1]
    with server:
        wait_for_line(log_events, "is back;")
        assert ask(counters.add(["a"], reactor().seconds(), 60)) == [2]
        ask(defer.maybeDeferred(service.stopService))
        assert len(server.command("CLIENT", "LIST").splitlines()) == 1
    assert len(lines(log_events, "unreachable|is back;")) == 2


def test_counters_service_over_redis(redis_server: RedisServer) -> None:
    """The service opens the connection at start and closes it at stop."""
    before = len(redis_server.command("CLIENT", "LIST").splitlines())
    counters = counters_for(redis_server.url, reactor())
    service = CountersService(counters)
    service.startService()
    deadline = time.monotonic() + WAIT
    while len(redis_server.command("CLIENT", "LIST").splitlines()) == before:
        assert time.monotonic() < deadline
        sleep(0.02)
    ask(defer.maybeDeferred(service.stopService))
    assert len(redis_server.command("CLIENT", "LIST").splitlines()) == before


def test_counters_service_over_memory() -> None:
    service = CountersService(MemoryCounters())
    service.startService()
    assert service.stopService() is None
