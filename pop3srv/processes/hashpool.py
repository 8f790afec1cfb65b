# -*- test-case-name: tests.test_hashing -*-
"""
Password verification in worker processes.

Some hash backends hold the GIL for the whole verification: passlib's
pure-Python sha512_crypt is about 2 ms of bytecode per login.  In a thread
of the server process that starves the reactor, so every other session
waits.  L{ProcessVerifier} runs L{UserFile.verify_detailed} in a few
long-lived worker processes instead (L{pop3srv.processes.hashchild}).

The workers are forks of the server process (L{pop3srv.processes.forking}): they
share its memory pages, start in a millisecond, and already hold the user
file, which they re-read when it changes, exactly as the server's own
L{UserFile} does.  Only the user name and password cross the pipe, and only
the L{VerifyResult} comes back, with the log events the check produced
(upgrade notices, rejected passwords), re-emitted here so they reach the
server's log.  A hash upgrade is done by the worker that verified the
password: L{pop3srv.auth.userfile.replace_hash} takes the same lock as
C{pop3srv-passwd} and rewrites only if the old hash is still there, so two
workers upgrading the same user at once rewrite the file once.

Each worker has one check at a time; the rest wait here, in order.  A
worker that dies fails the check it had and is replaced.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pop3srv.auth.userfile import UserFile, VerifyResult
from pop3srv.processes.forking import ForkedProcess
from pop3srv.processes.hashchild import FrameBuffer, FrameTooLarge, frame, serve

__all__ = ["NICENESS", "HashCheckFailed", "HashWorkerDied", "ProcessVerifier"]

#: How much lower the hashing processes' CPU priority is (see nice(2)).
NICENESS = 19
#: Seconds before a worker that died is replaced; doubled after each death
#: in a row (a worker that dies at once is not re-forked in a tight loop),
#: up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: Seconds a check may take before its worker is taken for hung and killed
#: (a fork can inherit a lock that a thread of the parent held).
CHECK_TIMEOUT = 60.0


class HashWorkerDied(Exception):
    """The process checking a password exited before answering."""


class HashCheckFailed(Exception):
    """The password check raised in the worker (the worker logged why)."""


class _WorkerProtocol(ProcessProtocol):
    """The server's end of one hashing process."""

    def __init__(self, verifier: ProcessVerifier) -> None:
        self.verifier = verifier
        self.current: Deferred[Any] | None = None
        self.dead = False
        self._frames = FrameBuffer()
        self._deadline: Any = None

    def send(self, username: str, password: str, d: Deferred[Any]) -> None:
        self.current = d
        self._deadline = self.verifier._reactor.callLater(CHECK_TIMEOUT, self._hung)
        assert self.transport is not None
        self.transport.write(frame((username, password)))

    def _hung(self) -> None:
        self._deadline = None
        self.verifier.log.error(
            "A password-hashing process took over {timeout:g} s; killing it",
            timeout=CHECK_TIMEOUT,
        )
        self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            if self.transport is not None:
                self.transport.signalProcess("KILL")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self.verifier.log.warn(
                "password-hashing process: {text}", text=data.decode("utf-8", "replace").strip()
            )
            return
        try:
            for body in self._frames.feed(data):
                if not self._answered(body):
                    return
        except FrameTooLarge:
            self._kill()

    def _answered(self, body: bytes) -> bool:
        """One answer from the worker; L{False} if it was unreadable (then killed)."""
        try:
            result, events = pickle.loads(body)  # noqa: S301 (our own child)
        except Exception:
            self.verifier.log.failure("Unreadable answer from a password-hashing process")
            self._kill()
            return False
        self._stop_deadline()
        # It answered: earlier deaths are no longer "in a row".
        self.verifier._deaths_in_a_row = 0
        d, self.current = self.current, None
        # A check cancelled meanwhile ignores this (Deferred.cancel's rule).
        if d is not None:
            if result is None:
                self.verifier._emit(events)
                d.errback(HashCheckFailed("the password check failed"))
            else:
                d.callback((result, events))
        self.verifier._idle(self)
        return True

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def childConnectionLost(self, childFD: int) -> None:
        # Its answers' pipe closing is its death, whether or not the exit
        # status has been reaped yet.
        if childFD == 1:
            self._died()

    def processEnded(self, reason: Failure) -> None:
        self._died()

    def _died(self) -> None:
        if self.dead:
            return
        self.dead = True
        self._stop_deadline()
        d, self.current = self.current, None
        self.verifier._lost(self)
        if d is not None:
            d.errback(HashWorkerDied("the password-hashing process exited"))


class ProcessVerifier:
    """
    Verifies passwords against a user file in C{workers} processes.

    Callers bound the number of calls in flight (see
    L{pop3srv.server.limits.LoginGate}); the rest wait here for a free worker.
    """

    log = Logger()

    def __init__(
        self,
        users: UserFile,
        workers: int,
        reactor: Any,
        niceness: int = NICENESS,
    ) -> None:
        """
        @param users: the user file; each worker inherits it as it is now.
        @param workers: the number of processes.
        @param reactor: provides L{IReactorProcess} and L{IReactorTime}.
        @param niceness: added to the workers' nice value, so that the
            server processes come first when the CPUs are busy hashing.
        """
        self.users = users
        self.workers = workers
        self._reactor = reactor
        self._niceness = niceness
        self._pool: list[_WorkerProtocol] = []
        self._free: deque[_WorkerProtocol] = deque()
        self._waiting: deque[tuple[str, str, Deferred[Any]]] = deque()
        self._restarts: list[Any] = []
        self._deaths_in_a_row = 0
        self._running = False

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids."""
        return [w.transport.pid for w in self._pool if w.transport is not None]

    def start(self) -> None:
        """Start the worker processes."""
        self._running = True
        # Each attempt once: one that fails schedules its own retry.
        for _ in range(self.workers - len(self._pool)):
            self._spawn()

    def _spawn(self) -> None:
        if not self._running:
            return
        worker = _WorkerProtocol(self)
        users, niceness = self.users, self._niceness
        try:
            ForkedProcess(
                self._reactor,
                lambda: serve(users, niceness),
                worker,
                {0: "w", 1: "r", 2: "r"},
            )
        except OSError:
            self.log.failure("Cannot start a password-hashing process")
            self._schedule_spawn()
            return
        if worker.dead:
            return  # it died (and was reaped) at once; _lost has rescheduled
        self._pool.append(worker)
        self._idle(worker)

    def _schedule_spawn(self) -> None:
        """Start a worker later, waiting longer after each death in a row."""
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2**self._deaths_in_a_row)
        self._deaths_in_a_row += 1
        if not self._pool:
            # No process left to serve them: fail the waiting checks now
            # rather than hold the logins until one starts.
            waiting, self._waiting = self._waiting, deque()
            for _, _, d in waiting:
                d.errback(HashWorkerDied("no password-hashing process is running"))
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(delay, self._spawn))

    def stop(self) -> None:
        """Stop the workers (they exit when their input closes); calls waiting fail."""
        self._running = False
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        waiting, self._waiting = self._waiting, deque()
        for _, _, d in waiting:
            d.errback(HashWorkerDied("the password-hashing processes were stopped"))
        pool, self._pool = self._pool, []
        self._free.clear()
        for worker in pool:
            if worker.transport is not None:
                worker.transport.closeStdin()

    def _idle(self, worker: _WorkerProtocol) -> None:
        """C{worker} can take a call."""
        if worker.dead or worker not in self._pool:
            return
        while self._waiting:
            username, password, d = self._waiting.popleft()
            if not d.called:  # else cancelled while it waited: skip it
                worker.send(username, password, d)
                return
        self._free.append(worker)

    def _lost(self, worker: _WorkerProtocol) -> None:
        """C{worker} died: replace it."""
        if worker in self._pool:
            self._pool.remove(worker)
        if worker in self._free:
            self._free.remove(worker)
        if self._running:
            self.log.error("A password-hashing process died; starting a new one")
            self._schedule_spawn()

    def verify_detailed(self, username: str, password: str) -> Deferred[VerifyResult]:
        """
        Check a password, as L{UserFile.verify_detailed}, in a worker.

        @return: a Deferred firing with the L{VerifyResult}.
        """
        d: Deferred[Any] = Deferred()
        if not self._running:
            d.errback(HashWorkerDied("the password-hashing processes are not running"))
            return d
        if self._free:
            self._free.popleft().send(username, password, d)
        else:
            self._waiting.append((username, password, d))
        return d.addCallback(self._replay)

    def _replay(self, outcome: tuple[VerifyResult, list[dict[str, Any]]]) -> VerifyResult:
        """Emit the worker's log events here, then return its result."""
        result, events = outcome
        self._emit(events)
        return result

    def _emit(self, events: list[dict[str, Any]]) -> None:
        """Log a worker's events here, in the server's log."""
        for event in events:
            emit: Callable[..., None] = Logger(namespace=event["namespace"]).emit
            emit(LogLevel.lookupByName(event["level"]), event["format"], **event["fields"])
