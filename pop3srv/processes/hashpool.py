# -*- test-case-name: tests.test_hashing -*-
"""
Password verification in hashing processes.

Some hash backends hold the GIL for the whole verification: passlib's
pure-Python sha512_crypt is about 2 ms of bytecode per login.  In a thread
of the server process that starves the reactor, so every other session
waits.  L{ProcessVerifier} runs L{UserFile.verify_detailed} in a few
long-lived hashing processes instead (L{pop3srv.processes.hashchild}).

The hashing processes are forks of the server process
(L{pop3srv.processes.forking}): they share its memory pages, start in a
millisecond, and already hold the user file, which they re-read when it
changes, exactly as the server's own L{UserFile} does.  Each talks AMP
(L{CheckPassword <pop3srv.processes.rpc.CheckPassword>}) on a UNIX socket
pair: only the user name and password go there, and only the
L{VerifyResult} comes back, with the log events the check produced
(rejected passwords, a hash that should be reset), re-emitted here so they
reach the server's log.  A hashing process never writes the user file: when
a password matched a deprecated hash, it offers a new hash in the
L{VerifyResult}, and the checker (L{pop3srv.auth.checker.PasslibChecker})
writes it in its thread pool with L{pop3srv.auth.editor.apply_upgrade},
which takes the same lock as C{pop3srv-passwd} and rewrites only if the old
hash is still there, so two logins upgrading the same user at once rewrite
the file once.

Each hashing process has one check at a time; the rest wait here, in
order.  A hashing process that dies, or answers with something that is not
AMP, fails the check it had and is replaced.  A user name or password too
long for AMP never reaches one: it cannot be right, so it is answered as a
mismatch here.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionClosed, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.amp import MAX_VALUE_LENGTH
from twisted.python.failure import Failure

from pop3srv.auth.userfile import UserFile, VerifyResult
from pop3srv.core.metrics import HASH_CHECK_SECONDS, HASH_QUEUE, PROCESS
from pop3srv.processes.forking import ForkedProcess
from pop3srv.processes.hashchild import serve
from pop3srv.processes.rpc import CheckPassword, HashCheckFailed, HashProcessDied, Peer, connect

__all__ = ["NICENESS", "HashCheckFailed", "HashProcessDied", "ProcessVerifier"]

#: How much lower the hashing processes' CPU priority is (see nice(2)).
NICENESS = 19
#: Seconds before a hashing process that died is replaced; doubled after
#: each death in a row (one that dies at once is not re-forked in a tight
#: loop), up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: Seconds a check may take before its hashing process is taken for hung
#: and killed (a fork can inherit a lock that a thread of the parent held).
CHECK_TIMEOUT = 60.0


class _Connection(Peer):
    """The AMP connection to one hashing process."""

    def __init__(self, on_lost: Callable[[], object]) -> None:
        super().__init__()
        self._on_lost = on_lost

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._on_lost()


class _HashProcess(ProcessProtocol):
    """
    The server's end of one hashing process: its exit and its output (which
    is only ever an error report), and the AMP connection its checks take.
    """

    def __init__(self, verifier: ProcessVerifier) -> None:
        self.verifier = verifier
        self.connection = _Connection(self._died)
        self.current: Deferred[Any] | None = None
        self.dead = False
        self._deadline: Any = None

    def send(self, username: str, password: str, d: Deferred[Any]) -> None:
        self.current = d
        self._deadline = self.verifier._reactor.callLater(CHECK_TIMEOUT, self._hung)
        try:
            call = self.connection.callRemote(CheckPassword, username=username, password=password)
        except ConnectionClosed:
            return  # it is dying: _died fails the check
        except Exception as e:
            # Refused before anything was written (AMP checks the box as it
            # encodes it): this check fails, and the process is as good as
            # before.  Only the type is logged, as the text may quote the
            # password.
            self.verifier.log.error(
                "A password check could not be sent to a hashing process ({error})",
                error=type(e).__name__,
            )
            self._stop_deadline()
            self.current = None
            d.errback(HashCheckFailed("the password check could not be sent"))
            self.verifier._idle(self)
            return
        call.addCallbacks(self._answered, self._unanswered)

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
        self.verifier.log.warn(
            "password-hashing process: {text}", text=data.decode("utf-8", "replace").strip()
        )

    def _answered(self, answer: dict[str, Any]) -> None:
        self._stop_deadline()
        # It answered: earlier deaths are no longer "in a row".
        self.verifier._deaths_in_a_row = 0
        d, self.current = self.current, None
        result, events = answer.get("result"), answer["events"]
        # A check cancelled meanwhile ignores this (Deferred.cancel's rule).
        if d is not None:
            if result is None:
                self.verifier._emit(events)
                d.errback(HashCheckFailed("the password check failed"))
            else:
                d.callback((result, events))
        self.verifier._idle(self)

    def _unanswered(self, failure: Failure) -> None:
        """The check got no answer: the process died, or broke the protocol."""
        if failure.check(ConnectionClosed) or self.dead:
            return  # _died fails the check
        self.verifier.log.failure("Unreadable answer from a password-hashing process", failure)
        self._kill()

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def processEnded(self, reason: Failure) -> None:
        self._died()

    def _died(self) -> None:
        # Its socket closing is its death, whether or not the exit status
        # has been reaped yet; whichever comes first counts.
        if self.dead:
            return
        self.dead = True
        self._stop_deadline()
        d, self.current = self.current, None
        self.verifier._lost(self)
        if d is not None:
            d.errback(HashProcessDied("the password-hashing process exited"))


class ProcessVerifier:
    """
    Verifies passwords against a user file in C{processes} hashing processes.

    Callers bound the number of calls in flight (see
    L{pop3srv.server.limits.LoginGate}); the rest wait here for a free
    hashing process.
    """

    log = Logger()

    def __init__(
        self,
        users: UserFile,
        processes: int,
        reactor: Any,
        niceness: int = NICENESS,
    ) -> None:
        """
        @param users: the user file; each hashing process inherits it as it
            is now.
        @param processes: the number of hashing processes.
        @param reactor: provides L{IReactorProcess}, L{IReactorSocket} and
            L{IReactorTime}.
        @param niceness: added to the hashing processes' nice value, so that
            the server processes come first when the CPUs are busy hashing.
        """
        self.users = users
        self.processes = processes
        self._reactor = reactor
        self._niceness = niceness
        self._pool: list[_HashProcess] = []
        self._free: deque[_HashProcess] = deque()
        self._waiting: deque[tuple[str, str, Deferred[Any]]] = deque()
        self._restarts: list[Any] = []
        self._deaths_in_a_row = 0
        self._running = False
        self._unwatch: Callable[[], None] | None = None

    @property
    def pids(self) -> list[int]:
        """The hashing processes' pids."""
        return [p.transport.pid for p in self._pool if p.transport is not None]

    def start(self) -> None:
        """Start the hashing processes."""
        self._running = True
        if self._unwatch is None:
            self._unwatch = PROCESS.watch(HASH_QUEUE, self._queue_depth)
        # Each attempt once: one that fails schedules its own retry.
        for _ in range(self.processes - len(self._pool)):
            self._spawn()

    def _spawn(self) -> None:
        if not self._running:
            return
        child = _HashProcess(self)
        users, niceness = self.users, self._niceness
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ForkedProcess(
                self._reactor,
                lambda: serve(users, niceness),
                child,
                {0: theirs.fileno(), 1: "r", 2: "r"},
            )
        except OSError:
            ours.close()
            self.log.failure("Cannot start a password-hashing process")
            self._schedule_spawn()
            return
        finally:
            theirs.close()
        if child.dead:
            ours.close()
            return  # it died (and was reaped) at once; _lost has rescheduled
        connect(self._reactor, ours, child.connection)
        self._pool.append(child)
        self._idle(child)

    def _schedule_spawn(self) -> None:
        """Start a hashing process later, waiting longer after each death in a row."""
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2**self._deaths_in_a_row)
        self._deaths_in_a_row += 1
        if not self._pool:
            # No process left to serve them: fail the waiting checks now
            # rather than hold the logins until one starts.
            waiting, self._waiting = self._waiting, deque()
            for _, _, d in waiting:
                d.errback(HashProcessDied("no password-hashing process is running"))
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(delay, self._spawn))

    def stop(self) -> None:
        """
        Stop the hashing processes (they exit when their socket closes);
        calls waiting fail.
        """
        self._running = False
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        waiting, self._waiting = self._waiting, deque()
        for _, _, d in waiting:
            d.errback(HashProcessDied("the password-hashing processes were stopped"))
        pool, self._pool = self._pool, []
        self._free.clear()
        for child in pool:
            if child.connection.transport is not None:
                child.connection.transport.loseConnection()

    def _queue_depth(self) -> list[tuple[dict[str, str], float]]:
        """For the metrics: the checks waiting for a hashing process."""
        # Cancelled checks stay in the queue until their turn: not counted.
        return [({}, sum(1 for _, _, d in self._waiting if not d.called))]

    def _idle(self, child: _HashProcess) -> None:
        """C{child} can take a call."""
        if child.dead or child not in self._pool:
            return
        while self._waiting:
            username, password, d = self._waiting.popleft()
            if not d.called:  # else cancelled while it waited: skip it
                child.send(username, password, d)
                return
        self._free.append(child)

    def _lost(self, child: _HashProcess) -> None:
        """C{child} died: replace it."""
        if child in self._pool:
            self._pool.remove(child)
        if child in self._free:
            self._free.remove(child)
        if self._running:
            self.log.error("A password-hashing process died; starting a new one")
            self._schedule_spawn()

    def verify_detailed(self, username: str, password: str) -> Deferred[VerifyResult]:
        """
        Check a password, as L{UserFile.verify_detailed}, in a hashing process.

        @return: a Deferred firing with the L{VerifyResult} (not C{ok},
            without a check, for a user name or password longer than an AMP
            value may be), or failing with L{HashProcessDied} or
            L{HashCheckFailed}.
        """
        d: Deferred[Any] = Deferred()
        if _too_long(username) or _too_long(password):
            # As UserFile.verify_detailed answers a password the scheme
            # cannot take.  No hash is spent on it: the length alone, which
            # the client knows, is what fails it.
            d.callback(VerifyResult(ok=False))
            return d
        if not self._running:
            d.errback(HashProcessDied("the password-hashing processes are not running"))
            return d
        asked = time.perf_counter()
        if self._free:
            self._free.popleft().send(username, password, d)
        else:
            self._waiting.append((username, password, d))
        d.addBoth(_timed, asked)
        return d.addCallback(self._replay)

    def _replay(self, outcome: tuple[VerifyResult, list[dict[str, Any]]]) -> VerifyResult:
        """Emit the hashing process's log events here, then return its result."""
        result, events = outcome
        self._emit(events)
        return result

    def _emit(self, events: list[dict[str, Any]]) -> None:
        """
        Log a hashing process's events here, in the server's log.  Never
        raises: it runs before the check's Deferred fires and the process is
        marked idle, so an exception here would hang the login.
        """
        for event in events:
            try:
                logger = Logger(namespace=event["namespace"])
                # Built here rather than by Logger.emit, whose own arguments
                # ("level", "format") an event's fields may also be named:
                # the legacy log API, for one, makes a "format" field.
                logged: dict[str, Any] = dict(event["fields"])
                logged.update(
                    log_logger=logger,
                    log_level=LogLevel.lookupByName(event["level"]),
                    log_namespace=logger.namespace,
                    log_source=None,
                    log_format=event["format"],
                    log_time=time.time(),
                )
                logger.observer(logged)
            except Exception:
                self.log.failure("Cannot log an event of a password-hashing process")


def _timed(result: Any, asked: float) -> Any:
    """Observe how long a check took, from the time it was C{asked}, unless cancelled."""
    if not (isinstance(result, Failure) and result.check(CancelledError)):
        PROCESS.observe(HASH_CHECK_SECONDS, time.perf_counter() - asked)
    return result


def _too_long(value: str) -> bool:
    """
    @return: whether C{value} is too long for an AMP value in UTF-8.
    """
    # Four octets per character at most: most values skip the encoding.
    return len(value) * 4 > MAX_VALUE_LENGTH and (
        len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_LENGTH
    )
