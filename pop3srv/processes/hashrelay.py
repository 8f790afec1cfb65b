# -*- test-case-name: tests.test_hashrelay,tests.test_authority_rpc -*-
"""
One hashing pool for every server process (C{--hash-pool shared}).

The parent server process runs the password-hashing processes
(L{pop3srv.processes.hashpool.ProcessVerifier}); each child server process
sends its checks to the parent as L{RelayCheck
<pop3srv.processes.rpc.RelayCheck>} over the AMP connection it has to the
parent (L{pop3srv.processes.supervisor}), and the parent queues them with
its own.  With a pool per server process, the kernel does not spread logins
evenly between the processes, so one process's checks queue while the
other's hashing process sits idle; one pool evens that out.  The relay costs
the parent some work per check, though, which the parent's own sessions
feel during a login flood: that is why it is not the default.

The path in a check picks the parent's verifier for that C{passlib}
checker.  A dead hashing process stays L{HashProcessDied} across the relay;
any other failure is L{HashCheckFailed}.

The same connection carries the child's policy questions to the parent's
authority (L{pop3srv.processes.authorityrpc}, whose C{WorkerConnection} is
the parent's end of both).  A child whose connection closes while it runs
cannot check passwords or ask its policy any more; it stops, and the parent
starts it afresh with a new connection.
When a child goes, the checks it still had waiting in the parent's pool are
cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.rpc import HashCheckFailed, HashProcessDied, Peer, RelayCheck

__all__ = ["RelayClient", "RelayServer"]

_log = Logger()


class RelayServer(Peer):
    """The parent's end of one child's connection: checks them in its pool."""

    def __init__(
        self, verifiers: Mapping[str, Callable[[str, str], Deferred[VerifyResult]]]
    ) -> None:
        """
        @param verifiers: the parent's verifiers by the path of their user
            file; empty if the children have pools of their own.
        """
        super().__init__()
        self.verifiers = verifiers
        self._open = True
        self._checks: set[Deferred[VerifyResult]] = set()

    @RelayCheck.responder
    def relay_check(self, path: str, username: str, password: str) -> Deferred[dict[str, Any]]:
        verify = self.verifiers.get(path)
        if verify is None:
            _log.error("A check on the hashing relay for an unknown user file: {path}", path=path)
            raise HashCheckFailed("no verifier for that user file")
        try:
            d = verify(username, password)
        except Exception as e:
            _log.failure("Password check could not start", Failure(e))
            raise HashCheckFailed("the password check could not start") from None
        self._checks.add(d)

        def answered(result: VerifyResult) -> dict[str, Any]:
            self._checks.discard(d)
            return {"result": result}

        def failed(failure: Failure) -> Failure:
            self._checks.discard(d)
            if failure.check(HashProcessDied):
                return Failure(HashProcessDied(failure.getErrorMessage()))
            return Failure(HashCheckFailed(failure.getErrorMessage()))

        return d.addCallbacks(answered, failed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._open = False
        # Checks still queued for a hashing process would be work for nobody.
        checks, self._checks = self._checks, set()
        for d in checks:
            d.cancel()


class RelayClient(Peer):
    """A child's end: sends checks to the parent and waits for the answers."""

    def __init__(self, on_lost: Callable[[], object] = lambda: None) -> None:
        """
        @param on_lost: called when the connection closes (the child then stops).
        """
        super().__init__()
        self._lost = False
        self._on_lost = on_lost

    def verifier(self, path: str) -> Callable[[str, str], Deferred[VerifyResult]]:
        """
        @param path: the user file of the C{passlib} checker, which names
            the parent's verifier for it.
        @return: a C{verifier} for L{pop3srv.auth.checker.PasslibChecker}.
        """

        def verify(username: str, password: str) -> Deferred[VerifyResult]:
            d: Deferred[Any]
            if self._lost or self.transport is None:
                d = Deferred()
                d.errback(HashProcessDied("the parent server process is gone"))
                return d
            try:
                d = self.callRemote(RelayCheck, path=path, username=username, password=password)
            except Exception:
                d = Deferred()
                d.errback()
            return d.addCallbacks(lambda answer: answer["result"], self._translate)

        return verify

    def _translate(self, failure: Failure) -> Failure:
        """Declared errors as they are; a lost parent is a dead hashing process."""
        if failure.check(HashProcessDied, HashCheckFailed):
            return failure
        if self._lost:
            return Failure(HashProcessDied("the parent server process is gone"))
        _log.failure("A check on the hashing relay failed", failure)
        return Failure(HashCheckFailed("the relayed password check failed"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        # Fails the checks in flight (through _translate).
        super().connectionLost(reason)
        self._on_lost()
