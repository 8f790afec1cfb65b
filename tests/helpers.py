"""
Fakes and small helpers shared by the test modules (pytest fixtures that
wrap them are in C{conftest.py}).

  - L{b64}: base64 text, as SASL exchanges it;
  - L{run_now}: a C{defer_to_thread} that runs the call at once;
  - L{result_of}, L{failure_of}: the result of an already fired Deferred,
    as C{SynchronousTestCase.successResultOf}/C{failureResultOf} give it,
    for plain pytest functions;
  - L{run_until}: iterate the real global reactor until a Deferred fires,
    for tests with real child processes and pipes;
  - L{FakeMailbox}, L{FakeRealm}, L{MESSAGES}: an IMailbox over byte strings
    answering plainly, with fired Deferreds or with Deferreds that fire
    later on a fake clock, and a realm that hands it out;
  - L{Recorder}: a client protocol that keeps everything it receives.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure
from zope.interface import implementer

MESSAGES = [b"Subject: one\n\nbody one\n", b"Subject: two\n\n.dot line\nlast line no newline"]


def b64(data: bytes | str) -> str:
    """
    @return: C{data} (UTF-8 if text) in base64, as SASL sends it.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """A C{deferToThread} stand-in: call C{f} now, return a fired Deferred."""
    return defer.maybeDeferred(f, *args, **kwargs)


def _outcome(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, f"{d!r} has not fired"
    if not isinstance(box[0], Failure):
        # Keep the Deferred's result for any later callback.
        d.addCallback(lambda _: box[0])
    return box[0]


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of C{d}, which must have fired with a success."""
    outcome = _outcome(d)
    if isinstance(outcome, Failure):
        raise AssertionError(f"{d!r} failed: {outcome.getTraceback()}")
    return outcome


def failure_of(d: defer.Deferred[Any], *expected: type[BaseException]) -> Failure:
    """The failure of C{d}, which must have fired with one of C{expected}."""
    outcome = _outcome(d)
    assert isinstance(outcome, Failure), f"{d!r} succeeded with {outcome!r}"
    if expected and not outcome.check(*expected):
        raise AssertionError(f"{d!r} failed with {outcome.type!r}, not {expected!r}")
    return outcome


def run_until(d: defer.Deferred[Any], timeout: float = 30.0) -> Any:
    """
    Iterate the global reactor (real pipes, real child processes) until
    C{d} fires; return its result or raise its failure.
    """
    from twisted.internet import reactor

    results: list[Any] = []
    d.addBoth(results.append)
    deadline = time.monotonic() + timeout
    while not results:
        assert time.monotonic() < deadline, "timed out"
        reactor.iterate(0.01)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@implementer(IMailbox)
class FakeMailbox:
    """An IMailbox over a list of byte strings, answering in one of three modes."""

    def __init__(self, messages: list[bytes], mode: str, clock: MemoryReactorClock) -> None:
        self.messages = messages
        self.deleted: set[int] = set()
        self.synced: set[int] | None = None
        self.mode = mode
        self.clock = clock
        self.sync_error: Exception | None = None
        self.closed = False

    def _answer(self, value: Any) -> Any:
        if self.mode == "plain":
            return value
        if self.mode == "fired":
            return defer.succeed(value)
        d: defer.Deferred[Any] = defer.Deferred()
        self.clock.callLater(1, d.callback, value)
        return d

    def listMessages(self, index: int | None = None) -> Any:
        sizes = [len(m.replace(b"\n", b"\r\n")) for m in self.messages]
        return self._answer(sizes if index is None else sizes[index])

    def getMessage(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.messages[index])

    def getUidl(self, index: int) -> str:
        return f"uid-{index}"

    def deleteMessage(self, index: int) -> None:
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> Any:
        if self.sync_error is not None:
            error = self.sync_error
            if self.mode == "plain":
                raise error
            if self.mode == "fired":
                return defer.fail(error)
            d: defer.Deferred[None] = defer.Deferred()
            self.clock.callLater(1, d.errback, error)
            return d
        self.synced = set(self.deleted)
        return self._answer(None)


@implementer(IRealm)
class FakeRealm:
    """Hands out one FakeMailbox, or fails as told."""

    def __init__(self, mailbox: FakeMailbox) -> None:
        self.mailbox = mailbox
        self.error: Exception | None = None
        self.logouts = 0

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any) -> Any:
        if self.error is not None:
            return defer.fail(self.error)

        def logout() -> None:
            self.logouts += 1

        return defer.succeed((IMailbox, self.mailbox, logout))


class Recorder(Protocol):
    """A client that records everything it receives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
