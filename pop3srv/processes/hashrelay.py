# -*- test-case-name: tests.test_hashrelay -*-
"""
One hashing pool for every server process (C{--hash-pool shared}).

The parent server process runs the password-hashing processes
(L{pop3srv.processes.hashpool.ProcessVerifier}); each child server process sends its
checks to the parent over a UNIX socket pair made when the child starts, and
the parent queues them with its own.  With a pool per server process, the
kernel does not spread logins evenly between the processes, so one
process's checks queue while the other's hashing process sits idle: in
`make bench`, argon2 logins run at 10/s with a pool each and 13.6/s with
one pool.  The relay costs the parent some work per check, though: the
NOOP p99 of a session during a SHA512-CRYPT flood went from 1.2-1.9 ms to
2.5 ms, which is why it is not the default.

Frames are L{pop3srv.processes.hashchild.HEADER}-prefixed pickles, between a parent
and its child: C{(request id, user file path, username, password)} one way,
C{(request id, result or None, error text)} the other.  The path picks the
parent's verifier for that C{passlib} checker.

A child whose socket closes while it runs cannot check passwords any more;
it stops, and the parent starts it afresh with a new pair.  When a child
goes, the checks it still had waiting in the parent's pool are cancelled.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.hashchild import FrameBuffer, FrameTooLarge, frame
from pop3srv.processes.hashpool import HashCheckFailed, HashWorkerDied

__all__ = ["RelayClient", "RelayServer", "adopt"]

_ERRORS: dict[str, type[Exception]] = {
    "HashWorkerDied": HashWorkerDied,
    "HashCheckFailed": HashCheckFailed,
}

_log = Logger()


class _Framed(Protocol):
    """Length-prefixed pickles in both directions."""

    def __init__(self) -> None:
        self._frames = FrameBuffer()

    def send(self, message: Any) -> None:
        assert self.transport is not None
        self.transport.write(frame(message))

    def dataReceived(self, data: bytes) -> None:
        try:
            for body in self._frames.feed(data):
                self.message_received(pickle.loads(body))  # noqa: S301 (parent and its child)
        except FrameTooLarge:
            _log.error("Oversized frame on the hashing relay; closing it")
            assert self.transport is not None
            self.transport.loseConnection()

    def message_received(self, message: Any) -> None:
        raise NotImplementedError


class RelayServer(_Framed):
    """The parent's end of one child's socket: checks them in its pool."""

    def __init__(
        self, verifiers: Mapping[str, Callable[[str, str], Deferred[VerifyResult]]]
    ) -> None:
        """
        @param verifiers: the parent's verifiers by the path of their user file.
        """
        super().__init__()
        self.verifiers = verifiers
        self._open = True
        self._checks: dict[int, Deferred[VerifyResult]] = {}

    def message_received(self, message: Any) -> None:
        try:
            request_id, path, username, password = message
            verify = self.verifiers[path]
        except (TypeError, ValueError, KeyError):
            _log.error("Bad request on the hashing relay: {kind}", kind=type(message).__name__)
            if isinstance(message, tuple) and message and isinstance(message[0], int):
                self._answer(message[0], None, "HashCheckFailed")
            return
        try:
            d = verify(username, password)
        except Exception as e:
            _log.failure("Password check could not start", Failure(e))
            self._answer(request_id, None, "HashCheckFailed")
            return
        self._checks[request_id] = d
        d.addCallbacks(
            lambda result: self._answer(request_id, result, ""),
            lambda failure: self._answer(request_id, None, failure.type.__name__),
        )

    def _answer(self, request_id: int, result: VerifyResult | None, error: str) -> None:
        self._checks.pop(request_id, None)
        # A child that died meanwhile has nobody waiting for the answer.
        if self._open:
            self.send((request_id, result, error))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._open = False
        # Checks still queued for a hashing process would be work for nobody.
        checks, self._checks = self._checks, {}
        for d in checks.values():
            d.cancel()


class RelayClient(_Framed):
    """A child's end: sends checks to the parent and waits for the answers."""

    def __init__(self, on_lost: Callable[[], object] = lambda: None) -> None:
        """
        @param on_lost: called when the socket closes (the child then stops).
        """
        super().__init__()
        self._pending: dict[int, Deferred[VerifyResult]] = {}
        self._next_id = 0
        self._lost = False
        self._on_lost = on_lost

    def verifier(self, path: str) -> Callable[[str, str], Deferred[VerifyResult]]:
        """
        @param path: the user file of the C{passlib} checker, which names
            the parent's verifier for it.
        @return: a C{verifier} for L{pop3srv.auth.checker.PasslibChecker}.
        """

        def verify(username: str, password: str) -> Deferred[VerifyResult]:
            d: Deferred[VerifyResult] = Deferred()
            if self._lost or self.transport is None:
                d.errback(HashWorkerDied("the parent server process is gone"))
                return d
            self._next_id += 1
            self._pending[self._next_id] = d
            self.send((self._next_id, path, username, password))
            return d

        return verify

    def message_received(self, message: Any) -> None:
        request_id, result, error = message
        d = self._pending.pop(request_id, None)
        if d is None:
            return
        if result is None:
            d.errback(_ERRORS.get(error, HashCheckFailed)(f"in the parent process: {error}"))
        else:
            d.callback(result)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(HashWorkerDied("the parent server process is gone"))
        self._on_lost()


def adopt(reactor: Any, fd: int, protocol: Protocol) -> None:
    """
    Run C{protocol} on the UNIX stream socket C{fd} (which stays open: the
    reactor works on a duplicate).

    @param reactor: provides C{IReactorSocket}.
    """
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: protocol))
