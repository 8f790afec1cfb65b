"""
Fakes and small helpers shared by the test modules (pytest fixtures that
wrap them are in C{conftest.py}).

  - L{b64}: base64 text, as SASL exchanges it;
  - L{run_now}: a C{defer_to_thread} that runs the call at once;
  - L{RunNow}: a thread pool and reactor for C{deferToThreadPool} (as
    L{pop3srv.auth.checker.PasslibChecker} takes them) that run the work
    at once in the calling thread;
  - L{result_of}, L{failure_of}: the result of an already fired Deferred,
    as C{SynchronousTestCase.successResultOf}/C{failureResultOf} give it,
    for plain pytest functions;
  - L{run_until}: iterate the real global reactor until a Deferred fires,
    for tests with real child processes and pipes;
  - L{FakeMailbox}, L{FakeRealm}, L{MESSAGES}: an IMailbox over byte strings
    answering plainly, with fired Deferreds or with Deferreds that fire
    later on a fake clock, and a realm that hands it out;
  - L{Recorder}: a client protocol that keeps everything it receives;
  - L{ScramClient}: a SCRAM-SHA-256 client written from RFC 5802,
    independent of L{pop3srv.core.scram}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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


class RunNow:
    """
    A thread pool and a reactor for C{deferToThreadPool}, in one: the work
    runs at once in the calling thread, so each Deferred has fired when the
    call returns.

    @ivar calls: how many calls were handed to the "thread pool".
    """

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        """Call C{f} and pass the outcome to C{on_result}, as L{ThreadPool} does."""
        self.calls += 1
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Call C{f} now."""
        f(*args, **kw)


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

    def deleteMessage(self, index: int) -> Any:
        self.deleted.add(index)
        return self._answer(None)

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


class ScramClient:
    """
    A SCRAM-SHA-256 client written from RFC 5802 section 3, independent of
    L{pop3srv.core.scram}.
    """

    def __init__(
        self,
        user: str,
        password: str,
        gs2_flag: str = "n",
        cbind_data: bytes = b"",
        authzid: str = "",
        nonce: str = "fyko+d2lbbFgONRv9qkxdawL",
    ) -> None:
        authz = f"a={authzid.replace('=', '=3D').replace(',', '=2C')}" if authzid else ""
        self.gs2_header = f"{gs2_flag},{authz},"
        self.cbind_data = cbind_data
        self.password = password
        self.nonce = nonce
        name = user.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={name},r={nonce}"
        self.auth_message = b""
        self.salted = b""

    def first(self) -> str:
        """
        @return: client-first-message, base64.
        """
        return b64(self.gs2_header + self.first_bare)

    def final(self, server_first: bytes) -> str:
        """
        @return: client-final-message, base64.
        """
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salt = base64.b64decode(attrs["s"])
        self.salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, int(attrs["i"]))
        cbind = base64.b64encode(self.gs2_header.encode() + self.cbind_data).decode()
        without_proof = f"c={cbind},r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        client_key = hmac.new(self.salted, b"Client Key", "sha256").digest()
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored_key, self.auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return b64(f"{without_proof},p={base64.b64encode(proof).decode()}")

    def check_server(self, server_final: bytes) -> bool:
        """
        @return: whether the server's C{v=} proves it knows our keys.
        """
        server_key = hmac.new(self.salted, b"Server Key", "sha256").digest()
        expected = hmac.new(server_key, self.auth_message, "sha256").digest()
        return server_final == b"v=" + base64.b64encode(expected)
