"""
Tests for L{pop3srv.processes.hashrelay}: a child server process's password checks
sent over a real UNIX socket pair to verifiers in the parent.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import helpers
import pytest
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.testing import StringTransport

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.hashrelay import RelayClient, RelayServer
from pop3srv.processes.rpc import HashCheckFailed, HashProcessDied, connect


def run_until(d: Deferred[Any], timeout: float = 10.0) -> Any:
    """L{helpers.run_until} with this module's shorter deadline."""
    return helpers.run_until(d, timeout)


class Relay:
    """A RelayServer and a RelayClient on the two ends of a socket pair."""

    def __init__(self, verifiers: dict[str, Any]) -> None:
        self.server = RelayServer(verifiers)
        self.lost: list[bool] = []
        self.client = RelayClient(on_lost=lambda: self.lost.append(True))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connect(reactor, ours, self.server)
        connect(reactor, theirs, self.client)

    def close(self) -> None:
        for protocol in (self.server, self.client):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self.client._lost:
            reactor.iterate(0.01)  # type: ignore[attr-defined]


@pytest.fixture
def relay_to() -> Iterator[Any]:
    relays: list[Relay] = []

    def make(*verifiers: Any) -> Relay:
        relays.append(Relay({f"/users/{i}": v for i, v in enumerate(verifiers)}))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def test_a_check_comes_back_with_its_result(relay_to: Any) -> None:
    """The child gets the parent verifier's VerifyResult, label included."""
    asked: list[tuple[str, str]] = []

    def verify(username: str, password: str) -> Deferred[VerifyResult]:
        asked.append((username, password))
        return succeed(VerifyResult(ok=username == "alice", label="phone"))

    relay = relay_to(verify)
    check = relay.client.verifier("/users/0")
    assert run_until(check("alice", "pä ss")) == VerifyResult(ok=True, label="phone")
    assert run_until(check("eve", "x")).ok is False
    assert asked == [("alice", "pä ss"), ("eve", "x")]


def test_answers_find_their_checks_in_any_order(relay_to: Any) -> None:
    """Checks answered out of order each get their own answer."""
    pending: dict[str, Deferred[VerifyResult]] = {}

    def verify(username: str, password: str) -> Deferred[VerifyResult]:
        pending[username] = Deferred()
        return pending[username]

    relay = relay_to(verify)
    check = relay.client.verifier("/users/0")
    first, second = check("first", "pw"), check("second", "pw")
    deadline = time.monotonic() + 5
    while len(pending) < 2 and time.monotonic() < deadline:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    pending["second"].callback(VerifyResult(ok=True, label="2"))
    pending["first"].callback(VerifyResult(ok=False))
    assert run_until(second) == VerifyResult(ok=True, label="2")
    assert run_until(first) == VerifyResult(ok=False)


def test_the_user_file_picks_the_verifier(relay_to: Any) -> None:
    """Each passlib checker (user file) has its own verifier; an unknown one fails."""
    relay = relay_to(
        lambda u, p: succeed(VerifyResult(ok=True, label="one")),
        lambda u, p: succeed(VerifyResult(ok=True, label="two")),
    )
    assert run_until(relay.client.verifier("/users/1")("a", "b")).label == "two"
    assert run_until(relay.client.verifier("/users/0")("a", "b")).label == "one"
    with pytest.raises(HashCheckFailed):
        run_until(relay.client.verifier("/users/2")("a", "b"))


def test_failures_cross_as_their_kind(relay_to: Any) -> None:
    """A dead hashing process stays HashProcessDied; anything else is HashCheckFailed."""
    relay = relay_to(
        lambda u, p: fail(HashProcessDied("gone")),
        lambda u, p: fail(ValueError("boom")),
    )
    with pytest.raises(HashProcessDied):
        run_until(relay.client.verifier("/users/0")("a", "b"))
    with pytest.raises(HashCheckFailed):
        run_until(relay.client.verifier("/users/1")("a", "b"))


def test_waiting_checks_fail_when_the_parent_goes(relay_to: Any) -> None:
    """The socket closing fails the checks in flight, and later ones at once."""
    relay = relay_to(lambda u, p: Deferred())
    waiting = relay.client.verifier("/users/0")("alice", "pw")
    reactor.iterate(0.05)  # type: ignore[attr-defined]
    assert relay.server.transport is not None
    relay.server.transport.loseConnection()
    with pytest.raises(HashProcessDied):
        run_until(waiting)
    with pytest.raises(HashProcessDied):
        run_until(relay.client.verifier("/users/0")("alice", "pw"))
    # The child is told, so it can stop and be restarted.
    assert relay.lost == [True]


def test_a_gone_childs_checks_are_cancelled(relay_to: Any) -> None:
    """
    When a child goes, its checks still in the parent are cancelled (no
    hashing for nobody), and nothing is written for them.
    """
    late: Deferred[VerifyResult] = Deferred()
    asked: list[str] = []

    def verify(username: str, password: str) -> Deferred[VerifyResult]:
        asked.append(username)
        return late

    relay = relay_to(verify)
    relay.client.verifier("/users/0")("alice", "pw").addErrback(lambda f: None)
    deadline = time.monotonic() + 5
    while not asked and time.monotonic() < deadline:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    assert relay.client.transport is not None
    relay.client.transport.loseConnection()
    deadline = time.monotonic() + 5
    while relay.server._open and time.monotonic() < deadline:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    assert not relay.server._open
    assert late.called  # cancelled
    late.addErrback(lambda f: f.trap(CancelledError))


def test_a_bad_request_fails_alone(relay_to: Any) -> None:
    """A verifier that raises at once fails that check; the relay goes on."""

    def broken(username: str, password: str) -> Deferred[VerifyResult]:
        raise RuntimeError("no")

    relay = relay_to(broken, lambda u, p: succeed(VerifyResult(ok=True)))
    with pytest.raises(HashCheckFailed):
        run_until(relay.client.verifier("/users/0")("a", "b"))
    assert run_until(relay.client.verifier("/users/1")("a", "b")).ok
    assert relay.lost == []


def test_messages_split_and_join_as_they_arrive() -> None:
    """
    Checks and answers split across reads, and several in one read, come
    out whole and in order.
    """
    asked: list[tuple[str, str]] = []

    def verify(username: str, password: str) -> Deferred[VerifyResult]:
        asked.append((username, password))
        return succeed(VerifyResult(ok=True, label=username))

    client, server = RelayClient(), RelayServer({"/users/0": verify})
    to_server, to_client = StringTransport(), StringTransport()
    client.makeConnection(to_server)
    server.makeConnection(to_client)
    check = client.verifier("/users/0")
    pending = [check("a", "1"), check("b" * 1000, "2"), check("c", "")]
    stream = to_server.value()
    for i in range(0, len(stream), 7):
        server.dataReceived(stream[i : i + 7])
    assert asked == [("a", "1"), ("b" * 1000, "2"), ("c", "")]
    answers = to_client.value()
    for i in range(0, len(answers), 7):
        client.dataReceived(answers[i : i + 7])
    assert [run_until(d).label for d in pending] == ["a", "b" * 1000, "c"]


@pytest.mark.parametrize(
    "message",
    [
        # A key over AMP's 255-byte limit.
        b"\x04\x00" + b"k" * 1024,
        # Not AMP: a box that is neither question nor answer.
        b"\x00\x04junk\x00\x04junk\x00\x00",
    ],
    ids=["oversize", "garbage"],
)
def test_a_broken_message_closes_the_relay(relay_to: Any, message: bytes) -> None:
    """
    An oversized or unreadable message from the parent fails the check in
    flight (no hang) and closes the relay, so the child stops.
    """
    relay = relay_to(lambda u, p: Deferred())
    waiting = relay.client.verifier("/users/0")("alice", "pw")
    reactor.iterate(0.05)  # type: ignore[attr-defined]
    assert relay.server.transport is not None
    relay.server.transport.write(message)
    with pytest.raises(HashProcessDied):
        run_until(waiting)
    assert relay.lost == [True]
