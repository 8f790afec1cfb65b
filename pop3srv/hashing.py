# -*- test-case-name: tests.test_hashing -*-
"""
Password verification in worker processes.

Some hash backends hold the GIL for the whole verification: passlib's
pure-Python sha512_crypt is about 2 ms of bytecode per login.  In a thread
of the server process that starves the reactor, so every other session
waits.  L{ProcessVerifier} runs L{UserFile.verify_detailed} in a small pool
of long-lived processes instead (L{concurrent.futures.ProcessPoolExecutor}
with the C{forkserver} start method: the workers are forked from a clean
helper process started with exec, never from the process that runs the
reactor).  The workers run at the lowest CPU priority (L{NICENESS}), so
sessions come first when hashing fills the CPUs.

Each worker opens the user file itself, by path, and re-reads it when it
changes, exactly as the server's own L{UserFile} does; only the user name
and password cross the pipe, and only the L{VerifyResult} comes back, with
the log events the verification produced (upgrade notices, rejected
passwords), which are re-emitted in the server process so they reach its
log.  A hash upgrade is done by the worker that verified the password:
L{pop3srv.userfile.replace_hash} takes the same lock as C{pop3srv-passwd}
and rewrites only if the old hash is still there, so two workers upgrading
the same user at once rewrite the file once.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from pop3srv._hashworker import init_worker, ping, verify
from pop3srv.userfile import VerifyResult

__all__ = ["NICENESS", "ProcessVerifier"]

#: How much lower the hashing processes' CPU priority is (see nice(2)).
NICENESS = 19


class ProcessVerifier:
    """
    Verifies passwords against a user file in C{workers} processes.

    Callers bound the number of calls in flight (see
    L{pop3srv.limits.LoginGate}); the executor queues the rest.  If a worker
    dies, the pool is replaced on the next call; the calls that were in it
    fail (the checker turns that into a failed login and logs it).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        workers: int,
        reactor: Any,
        upgrade: bool = True,
        start_method: str = "forkserver",
        niceness: int = NICENESS,
    ) -> None:
        """
        @param path: the user file.
        @param workers: the number of processes.
        @param reactor: an L{IReactorFromThreads} to deliver results on.
        @param upgrade: as for L{UserFile}.
        @param start_method: a L{multiprocessing} start method; never
            C{fork}, which would copy a running reactor.
        @param niceness: added to the workers' nice value, so that the
            server processes come first when the CPUs are busy hashing.
        """
        if start_method == "fork":
            raise ValueError("the fork start method would copy the reactor's state")
        self.path = os.path.abspath(path)
        self.workers = workers
        self._reactor = reactor
        self._upgrade = upgrade
        self._niceness = niceness
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Workers forked from a server that has these imported start in
            # milliseconds and share their pages.
            self._context.set_forkserver_preload(["pop3srv._hashworker"])
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=self._context,
                initializer=init_worker,
                initargs=(self.path, self._upgrade, self._niceness, os.getpid()),
            )
        return self._executor

    def start(self) -> None:
        """
        Start the worker processes now rather than at the first login.

        A worker that cannot start breaks the pool; the next verification
        then fails, is logged, and a new pool is built.
        """
        pool = self._pool()
        for _ in range(self.workers):
            pool.submit(ping)

    def stop(self) -> None:
        """Stop the workers; calls in flight fail."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _wrap(self, future: Future[Any], pool: ProcessPoolExecutor | None) -> Deferred[Any]:
        """
        A Deferred that fires in the reactor thread when C{future} is done.

        @param pool: the executor that ran it, dropped if it broke.
        """
        d: Deferred[Any] = Deferred()

        def deliver(done: Future[Any]) -> None:
            exception = done.exception()
            if exception is not None:
                if isinstance(exception, BrokenProcessPool):
                    self._reactor.callFromThread(self._replace, pool)
                self._reactor.callFromThread(d.errback, exception)
            else:
                self._reactor.callFromThread(d.callback, done.result())

        future.add_done_callback(deliver)
        return d

    def _replace(self, broken: ProcessPoolExecutor | None) -> None:
        """Drop a pool whose worker died, so the next call builds a new one."""
        # Only that pool: an earlier failure may have replaced it already.
        if broken is not None and self._executor is broken:
            self.log.error("A password-hashing worker process died; starting new ones")
            self.stop()

    def verify_detailed(self, username: str, password: str) -> Deferred[VerifyResult]:
        """
        Check a password, as L{UserFile.verify_detailed}, in a worker.

        @return: a Deferred firing with the L{VerifyResult}.
        """
        pool: ProcessPoolExecutor | None = self._pool()
        try:
            future = self._pool().submit(verify, username, password)
        except BrokenProcessPool as e:
            self.stop()
            pool = None
            future = Future()
            future.set_exception(e)
        d = self._wrap(future, pool)
        return d.addCallback(self._replay)

    def _replay(self, outcome: tuple[VerifyResult, list[dict[str, Any]]]) -> VerifyResult:
        """Emit the worker's log events here, then return its result."""
        result, events = outcome
        for event in events:
            emit: Callable[..., None] = Logger(namespace=event["namespace"]).emit
            emit(LogLevel.lookupByName(event["level"]), event["format"], **event["fields"])
        return result
