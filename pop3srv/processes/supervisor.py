# -*- test-case-name: tests.test_workers,tests.test_workers_policy -*-
"""
Several server processes on the same listening sockets (C{--workers N}).

In pop3srv a I{worker} is a child server process, and only that: the
processes that check passwords are I{hashing processes}
(L{pop3srv.processes.hashpool}) and the threads are the I{thread pool}.

The process twistd starts binds every C{--listen} and C{--listen-tls}
endpoint (L{ListeningService}) and serves like a single-process server; it
also starts N-1 workers (L{WorkerSupervisor}), giving them the listening
sockets as inherited descriptors.  A worker builds the same service with the
C{build} function the supervisor was given (C{twistd pop3srv}'s
C{makeService}), adopting the sockets (L{AdoptedPortService},
C{IReactorSocket.adoptStreamPort}) instead of binding, so the kernel hands
each new connection to whichever process accepts first.

Every child, workers and hashing processes alike, is a fork of its parent
(L{pop3srv.processes.forking}), never a new program:
  - a fork shares the parent's memory pages, and a server process is
    mostly Python, Twisted, pyOpenSSL and cryptography, which a new
    program would import again into private memory of its own;
  - a worker uses the parent's parsed options and checkers as they are,
    so nothing is parsed twice and nothing can parse differently;
  - hashing processes must be forks anyway: they start in a millisecond
    and hold the parent's user file already.
The price is that a fork can inherit a lock another thread of the parent
held; hence the start-up deadline below, and the check deadline of the
hashing processes.

Why not L{twisted.runner.procmon.ProcessMonitor}, which restarts processes
with a back-off: it starts each process by argv with
C{IReactorProcess.spawnProcess} and no C{childFDs}, so it can neither fork
nor hand a worker its listening sockets and its connection to the parent;
its process protocol logs the child's output as text lines, where a
worker's output is its log events, to be published again here; and it has
no start-up deadline, and never gives up on a process that keeps dying.
Overriding its C{startProcess} to fix all that would leave only its
restart timing, which is the few lines of L{WorkerSupervisor.worker_ended}.

The parent:
  - is the one policy authority of all the server processes: it keeps the
    failed-login counts, blocks, attempts in flight, connections per
    address and sessions per user for its own sessions and the workers'
    (L{pop3srv.processes.authorityrpc}), so a lockout holds whichever
    process takes the next connection and the C{max_connections*} limits
    are totals; what a worker that dies held is given back;
  - keeps an AMP connection to each worker, on a UNIX socket pair
    (L{WorkerConnection <pop3srv.processes.authorityrpc.WorkerConnection>}):
    the worker's policy questions come over it, and its password checks
    with C{--hash-pool shared} (L{pop3srv.processes.hashrelay}); the
    worker stops when it closes, so workers never outlive a parent that
    was killed;
  - forwards SIGHUP, so every process re-reads the TLS certificate;
  - asks the workers, over the same connections, what their sessions and
    metrics are, for one view of the whole server
    (L{pop3srv.app.control.ServerView}, through L{WorkerSupervisor.connections},
    which no longer lists a worker that ended: the view then keeps its
    last counts);
  - re-publishes the workers' log events (sent as JSON lines on their
    standard output) in its own log, so there is one log and one audit
    trail, with each worker's session ids carrying its pid;
  - restarts a worker that dies, at most L{MAX_RESTARTS} times per slot in
    L{RESTART_WINDOW} seconds;
  - kills (and so restarts) a worker that has not said it serves within
    L{READY_TIMEOUT} seconds: a fork made while another thread of the parent
    held a lock could otherwise wait for that lock for ever;
  - on stop, sends SIGTERM to the workers and waits for them (SIGKILL after
    L{STOP_TIMEOUT} seconds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher, jsonFileLogObserver
from twisted.python.failure import Failure

from pop3srv.auth.userfile import VerifyResult
from pop3srv.processes.authorityrpc import WorkerConnection
from pop3srv.processes.forking import ForkedProcess, fresh_reactor, log_only_to, set_process_name
from pop3srv.processes.hashrelay import RelayClient, RelayServer
from pop3srv.processes.rpc import Peer, connect
from pop3srv.server.authority import LocalAuthority

__all__ = ["AdoptedPortService", "Build", "ListeningService", "WorkerSupervisor"]

#: Restarts of one worker slot allowed within L{RESTART_WINDOW} seconds.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0

#: Seconds a worker has, from its start, to say it serves (see L{READY_KEY}).
READY_TIMEOUT = 30.0

#: The key of the log event by which a worker says it serves: written
#: whatever the worker's log level, as Twisted's JSON, the format of every
#: worker event on its standard output.
READY_KEY = "pop3srv_worker_ready"

_log = Logger()
#: Seconds between a worker's death and its restart.
RESTART_DELAY = 1.0
#: Seconds stopped workers get before SIGKILL: more than a worker's time
#: to let its commits finish (C{pop3srv.app.tap.DRAIN_TIMEOUT}).
STOP_TIMEOUT = 20.0
#: The first descriptor number of inherited sockets in a worker.
FIRST_FD = 3
#: A worker's standard output is its log; cap one line so a broken worker
#: cannot grow the parent's buffer without bound.
MAX_LOG_LINE = 1 << 20

#: What builds a worker's service: called in the worker with its reactor,
#: its inherited listening sockets as C{(fd, "plain" or "tls")}, and its
#: connection to the parent (for the parent's policy authority, and its
#: hashing pool with C{--hash-pool shared}).
Build = Callable[[Any, list[tuple[int, str]], RelayClient], service.IService]

Verifiers = Mapping[str, Callable[[str, str], Deferred[VerifyResult]]]


class ListeningService(service.Service):
    """
    Listens on one endpoint, in C{privilegedStartService} (before twistd
    drops privileges), and fails start-up if it cannot.

    @ivar kind: C{"plain"} or C{"tls"}, for the workers.
    @ivar port: the L{IListeningPort} once listening.
    """

    def __init__(self, endpoint: Any, factory: Any, kind: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.kind = kind
        self.port: Any = None
        self._listening: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        super().startService()
        self.bind()

    def bind(self) -> None:
        """
        Listen now, if not yet listening: C{twistd pop3srv} binds while
        building its service, before twistd turns into a daemon, so that a
        port that cannot be bound is reported on the terminal that started
        it (a daemon's start-up errors reach it only as a traceback
        class name and a pointer to the log).

        @raise Exception: the endpoint's reason, such as
            L{CannotListenError}.
        """
        if self._listening is not None:
            return
        caught: list[Failure] = []
        late = False

        def failed(failure: Failure) -> None:
            if late:
                _log.failure("Cannot listen on {endpoint!r}", failure, endpoint=self.endpoint)
            else:
                caught.append(failure)

        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, failed)
        # Twisted's endpoints listen at once: a port that cannot be bound
        # fails start-up here, in one line (not logged while serving on).
        late = True
        if caught:
            self._listening = None
            caught[0].raiseException()

    def _listened(self, port: Any) -> None:
        self.port = port

    def stopService(self) -> Any:
        super().stopService()
        self._listening = None
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class AdoptedPortService(service.Service):
    """Serves a listening socket inherited from the parent process."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self._reactor = reactor
        self.fd = fd
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        # adoptStreamPort needs the family; the socket knows it.
        probe = socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        self.port = self._reactor.adoptStreamPort(self.fd, family, self.factory)
        # adoptStreamPort duplicated the descriptor; the original is not needed.
        os.close(self.fd)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _WorkerProtocol(ProcessProtocol):
    """
    The parent's end of one worker: its log and its exit.

    @ivar connection: the parent's end of the worker's AMP connection.
    """

    def __init__(self, supervisor: WorkerSupervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.connection: Peer | None = None
        self.ended: Deferred[None] = Deferred()
        self.ready_timer: Any = None
        self.ready = False
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.supervisor.worker_output(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self.supervisor.worker_output(self, fd, rest)
        self._buffers = {}
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """
    Starts, watches and stops the workers.

    @ivar children: the running workers' protocols, by slot.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        listeners: Sequence[ListeningService],
        build: Build,
        verifiers: Verifiers | None = None,
        authority: LocalAuthority | None = None,
        log_observer: Callable[[IO[Any]], Any] = jsonFileLogObserver,
    ) -> None:
        """
        @param reactor: provides L{IReactorProcess}, L{IReactorSocket} and
            L{IReactorTime}.
        @param count: how many workers to run.
        @param listeners: the parent's listening services, listening by the
            time this one starts.
        @param build: builds a worker's service, in the worker.
        @param verifiers: this process's password verifiers, by the path of
            their C{passlib} checker's user file, that the workers' checks
            are relayed to (L{pop3srv.processes.hashrelay}); none: workers
            verify alone.
        @param authority: this process's policy authority, which answers
            the workers' questions too (L{pop3srv.processes.authorityrpc});
            none: they have none to ask, and each keeps its own limits.
        @param log_observer: makes a worker's log observer on its standard
            output (JSON events, which this process publishes again): the
            level filter goes there, so dropped events never cross.
        """
        self._reactor = reactor
        self.count = count
        self.listeners = list(listeners)
        self.build = build
        self.verifiers = dict(verifiers or {})
        self.authority = authority
        self.log_observer = log_observer
        self.children: dict[int, _WorkerProtocol] = {}
        self._restarts: dict[int, list[float]] = {}
        self._pending: dict[int, Any] = {}
        self._ports: list[tuple[int, str]] = []
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._ports = []
        for listener in self.listeners:
            if listener.port is None:
                raise RuntimeError("a listening port was not bound before the workers started")
            self._ports.append((listener.port.fileno(), listener.kind))
        for slot in range(1, self.count + 1):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if self._stopping:
            return
        child_fds: dict[int, Any] = {1: "r", 2: "r"}
        inherited: list[tuple[int, str]] = []
        for i, (fd, kind) in enumerate(self._ports):
            child_fds[FIRST_FD + i] = fd
            inherited.append((FIRST_FD + i, kind))
        control = FIRST_FD + len(inherited)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds[control] = theirs.fileno()
        protocol = _WorkerProtocol(self, slot)
        build, log_observer = self.build, self.log_observer
        try:
            ForkedProcess(
                self._reactor,
                lambda: _run_worker(inherited, control, build, log_observer),
                protocol,
                child_fds,
            )
        except OSError:
            ours.close()
            self.log.failure("Cannot start the server process of worker {slot}", slot=slot)
            self._pending[slot] = self._reactor.callLater(RESTART_DELAY, self._spawn, slot)
            return
        finally:
            theirs.close()
        parent_end = (
            RelayServer(self.verifiers)
            if self.authority is None
            else WorkerConnection(self.verifiers, self.authority)
        )
        connect(self._reactor, ours, parent_end)
        protocol.connection = parent_end
        if protocol.ended.called:
            return  # it died (and was reaped) at once; worker_ended has rescheduled
        self.children[slot] = protocol
        pid = getattr(protocol.transport, "pid", None)
        self.log.info("Started server process {pid} (worker {slot})", pid=pid, slot=slot)
        protocol.ready_timer = self._reactor.callLater(READY_TIMEOUT, self._not_ready, protocol)

    def _not_ready(self, child: _WorkerProtocol) -> None:
        """
        A worker's time to say it serves is up.  Look once more after the
        reactor has read what is waiting (a stalled parent may not have read
        the worker's word yet); then, if it still has not, kill it.
        """
        child.ready_timer = self._reactor.callLater(0, self._kill_if_not_ready, child)

    def _kill_if_not_ready(self, child: _WorkerProtocol) -> None:
        child.ready_timer = None
        if child.ready or self._stopping or self.children.get(child.slot) is not child:
            return
        pid = getattr(child.transport, "pid", None)
        self.log.error(
            "Server process {pid} (worker {slot}) did not start serving within "
            "{timeout:g} s; killing it",
            pid=pid,
            slot=child.slot,
            timeout=READY_TIMEOUT,
        )
        if child.transport is None:
            return
        try:
            child.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def worker_output(self, child: _WorkerProtocol, fd: int, line: bytes) -> None:
        """A line from a worker: a JSON log event (stdout) or raw text (stderr)."""
        text = line.decode("utf-8", "replace").strip("\x1e\r\n ")
        if not text:
            return
        if fd == 1:
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = None
            if isinstance(event, dict):
                if event.get(READY_KEY):
                    child.ready = True
                    if child.ready_timer is not None and child.ready_timer.active():
                        child.ready_timer.cancel()
                    child.ready_timer = None
                globalLogPublisher(event)
                return
        pid = getattr(child.transport, "pid", None)
        self.log.warn("worker {slot} (pid {pid}): {text}", slot=child.slot, pid=pid, text=text)

    def worker_ended(self, child: _WorkerProtocol, reason: Failure) -> None:
        """A worker exited: restart it unless stopping or it keeps dying."""
        if child.ready_timer is not None and child.ready_timer.active():
            child.ready_timer.cancel()
        if self.children.get(child.slot) is child:
            del self.children[child.slot]
        if self._stopping:
            if not reason.check(ProcessDone):
                self.log.error(
                    "Server process of worker {slot} did not stop cleanly ({reason})",
                    slot=child.slot,
                    reason=reason.getErrorMessage(),
                )
            return
        if reason.check(ProcessDone):
            # It was stopped (SIGTERM), most likely by systemd stopping the
            # whole service, whose SIGTERM to this process is on its way.
            self.log.info(
                "Server process of worker {slot} stopped; starting it again",
                slot=child.slot,
            )
            self._pending[child.slot] = self._reactor.callLater(
                RESTART_DELAY, self._spawn, child.slot
            )
            return
        now = self._reactor.seconds()
        recent = [t for t in self._restarts.get(child.slot, []) if t > now - RESTART_WINDOW]
        if len(recent) >= MAX_RESTARTS:
            self.log.error(
                "Server process of worker {slot} exited ({reason}) {n} times within "
                "{window:g} s; not restarting it",
                slot=child.slot,
                reason=reason.getErrorMessage(),
                n=len(recent),
                window=RESTART_WINDOW,
            )
            self._restarts[child.slot] = recent
            return
        recent.append(now)
        self._restarts[child.slot] = recent
        self.log.warn(
            "Server process of worker {slot} exited ({reason}); restarting it",
            slot=child.slot,
            reason=reason.getErrorMessage(),
        )
        self._pending[child.slot] = self._reactor.callLater(RESTART_DELAY, self._spawn, child.slot)

    def connections(self) -> list[tuple[int | None, Peer]]:
        """
        @return: the parent's end of each running worker's AMP connection
            that is still open, with the worker's pid, in slot order.
        """
        found = []
        for _, child in sorted(self.children.items()):
            peer = child.connection
            if peer is not None and peer.transport is not None:
                found.append((getattr(child.transport, "pid", None), peer))
        return found

    def signal_all(self, name: str) -> None:
        """Send a signal (e.g. C{"HUP"}) to every worker."""
        for child in list(self.children.values()):
            if child.transport is None:
                continue
            try:
                child.transport.signalProcess(name)
            except ProcessExitedAlready:
                # It exited; processEnded will follow.
                continue

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        for child in self.children.values():
            if child.ready_timer is not None and child.ready_timer.active():
                child.ready_timer.cancel()
            child.ready_timer = None
        waiting = [child.ended for child in self.children.values()]
        self.signal_all("TERM")
        if not waiting:
            return succeed(None)
        kill = self._reactor.callLater(STOP_TIMEOUT, self.signal_all, "KILL")
        done: Deferred[Any] = DeferredList(waiting)

        def cancel_kill(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(cancel_kill)


def _stop_running(reactor: Any) -> None:
    """The parent is gone: stop this worker."""
    _log.error("Lost the connection to the parent server process; stopping this one")
    # A SIGTERM from the parent may have stopped it already.
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def _run_worker(
    ports: list[tuple[int, str]],
    control: int,
    build: Build,
    log_observer: Callable[[IO[Any]], Any] = jsonFileLogObserver,
) -> None:
    """Run a worker, in a fork of the parent: serve until stopped."""
    set_process_name("pop3srv-worker")
    # A fork starts ignoring SIGTERM (for the hashing processes); a worker
    # stops on it, by default until its reactor handles it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A reload (SIGHUP, passed on by the parent) must not kill a worker
    # that has not yet installed its own handler; it starts with the
    # reloaded settings anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor = fresh_reactor()
    out = os.fdopen(1, "w", encoding="utf-8", closefd=False)
    log_only_to(log_observer(out))
    try:
        # Its own stop closes the connection to the parent too: not news.
        stopping: list[bool] = []
        reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
        parent = RelayClient(on_lost=lambda: None if stopping else _stop_running(reactor))
        connect(reactor, socket.socket(fileno=control), parent)
        top = build(reactor, ports, parent)
        top.privilegedStartService()
        top.startService()
        reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
        # Whether it serves is the parent's business, not the log's: said
        # past the level filter, whatever --log-level drops (the parent's
        # own filter decides whether the line is shown).
        ready = Logger(namespace=__name__, observer=jsonFileLogObserver(out))
        reactor.callWhenRunning(
            ready.info, "Server process {pid} is serving", pid=os.getpid(), **{READY_KEY: True}
        )
        reactor.run()
    finally:
        out.flush()
