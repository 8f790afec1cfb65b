# -*- test-case-name: tests.test_workers -*-
"""
Several server processes on the same listening sockets (C{--workers N}).

The process twistd starts binds every C{--listen} and C{--listen-tls}
endpoint and serves like a single-process server; it also starts N-1
children (L{WorkerSupervisor}), giving them the listening sockets as
inherited descriptors.  A child is a fork of the running parent
(L{pop3srv.processes.forking}: it shares the parent's memory pages and uses its parsed
options) that builds a new reactor; with a reactor a fork cannot rebuild it
is a new Python process running L{child_main} with the parent's pop3srv
arguments.  Either way it builds the same service with L{makeService
<pop3srv.app.tap.makeService>}, adopting the sockets
(C{IReactorSocket.adoptStreamPort}) instead of binding, so the kernel hands
each new connection to whichever process accepts first.

The parent:
  - forwards SIGHUP, so every process re-reads the TLS certificate;
  - re-publishes the children's log events (sent as JSON lines on their
    standard output) in its own log, so there is one log and one audit
    trail, with each child's session ids carrying its pid;
  - restarts a child that dies, at most L{MAX_RESTARTS} times per slot in
    L{RESTART_WINDOW} seconds;
  - kills (and so restarts) a child that has not said it serves within
    L{READY_TIMEOUT} seconds: a fork made while another thread of the parent
    held a lock could otherwise wait for that lock for ever;
  - on stop, sends SIGTERM to the children and waits for them (SIGKILL after
    L{STOP_TIMEOUT} seconds).

A child stops when its standard input (a pipe from the parent) closes, so
children never outlive a parent that was killed.

Limits are per process: see the README ("Several processes").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready, ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from pop3srv.processes.forking import (
    ForkedProcess,
    can_fork_reactor,
    fresh_reactor,
    log_only_to,
    set_process_name,
)
from pop3srv.processes.hashrelay import RelayServer, adopt

__all__ = ["AdoptedPortService", "WorkerSupervisor", "child_main"]

#: Restarts of one child slot allowed within L{RESTART_WINDOW} seconds.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0

#: Seconds a child has, from its start, to say it serves (see L{READY_KEY}).
READY_TIMEOUT = 30.0

#: The key of the log event by which a child says it serves.
READY_KEY = "pop3srv_worker_ready"

_log = Logger()
#: Seconds between a child's death and its restart.
RESTART_DELAY = 1.0
#: Seconds stopped children get before SIGKILL.
STOP_TIMEOUT = 10.0
#: The first descriptor number of inherited listening sockets in a child.
FIRST_FD = 3
#: A child's standard output is its log; cap one line so a broken child
#: cannot grow the parent's buffer without bound.
MAX_LOG_LINE = 1 << 20


#: What a child runs (C{-c}, not C{-m}, so this module is imported once).
_CHILD_CODE = "from pop3srv.processes.supervisor import child_main; child_main()"


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


def _keep(result: Any, into: list[Any]) -> Any:
    """A callback that records the result and passes it on."""
    into.append(result)
    return result


class _ChildProtocol(ProcessProtocol):
    """The parent's end of one child: its log and its exit."""

    def __init__(self, supervisor: WorkerSupervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
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
            self.supervisor.child_output(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self.supervisor.child_output(self, fd, rest)
        self._buffers = {}
        self.supervisor.child_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """
    Starts, watches and stops the child server processes.

    @ivar children: the running children's protocols, by slot.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        args: Sequence[str],
        listeners: Sequence[tuple[Any, str]],
        executable: str = sys.executable,
        options: Any = None,
        verifiers: Mapping[str, Callable[[str, str], Deferred[Any]]] | None = None,
    ) -> None:
        """
        @param reactor: provides L{IReactorProcess} and L{IReactorTime}.
        @param count: how many children to run.
        @param args: the pop3srv arguments the children parse.
        @param listeners: the parent's listening services, each a
            L{StreamServerEndpointService} that has bound its port, with its
            kind: C{"plain"} or C{"tls"}.
        @param executable: the Python to run the children with.
        @param options: the parsed L{pop3srv.app.tap.Options}.  With them, and a
            reactor a fork can rebuild, children are forks of this process
            (L{pop3srv.processes.forking}) that share its memory and use these options;
            otherwise they are new Python processes that parse C{args}.
        @param verifiers: this process's password verifiers, by the path of
            their C{passlib} checker's user file, that the children's checks
            are relayed to (L{pop3srv.processes.hashrelay}); none: children verify alone.
        """
        self._reactor = reactor
        self.count = count
        self.args = list(args)
        self.options = options
        self.fork = options is not None and can_fork_reactor(reactor)
        self.listeners = list(listeners)
        self.executable = executable
        self.verifiers = dict(verifiers or {})
        self.children: dict[int, _ChildProtocol] = {}
        self._restarts: dict[int, list[float]] = {}
        self._pending: dict[int, Any] = {}
        self._ports: list[tuple[int, str]] = []
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._ports = []
        for server, kind in self.listeners:
            # The endpoint service bound in privilegedStartService, so its
            # Deferred has fired; take the port without consuming the result.
            found: list[Any] = []
            server._waitingForPort.addCallback(_keep, found)
            if not found:
                raise RuntimeError("a listening port was not bound before the workers started")
            self._ports.append((found[0].fileno(), kind))
        for slot in range(1, self.count + 1):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if self._stopping:
            return
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        inherited: list[tuple[int, str]] = []
        for i, (fd, kind) in enumerate(self._ports):
            child_fds[FIRST_FD + i] = fd
            inherited.append((FIRST_FD + i, kind))
        relay: tuple[socket.socket, socket.socket] | None = None
        if self.verifiers:
            relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds[FIRST_FD + len(inherited)] = relay[1].fileno()
            inherited.append((FIRST_FD + len(inherited), "hash"))
        spec = [list(pair) for pair in inherited]
        protocol = _ChildProtocol(self, slot)
        if self.fork:
            options = self.options
            ForkedProcess(
                self._reactor, lambda: _forked_child(inherited, options), protocol, child_fds
            )
        else:
            argv = [self.executable, "-c", _CHILD_CODE, json.dumps(spec), *self.args]
            self._reactor.spawnProcess(
                protocol, self.executable, argv, env=dict(os.environ), childFDs=child_fds
            )
        if relay is not None:
            ours, theirs = relay
            adopt(self._reactor, ours.fileno(), RelayServer(self.verifiers))
            ours.close()
            theirs.close()
        self.children[slot] = protocol
        pid = getattr(protocol.transport, "pid", None)
        self.log.info("Started server process {pid} (worker {slot})", pid=pid, slot=slot)
        protocol.ready_timer = self._reactor.callLater(READY_TIMEOUT, self._not_ready, protocol)

    def _not_ready(self, child: _ChildProtocol) -> None:
        """
        A child's time to say it serves is up.  Look once more after the
        reactor has read what is waiting (a stalled parent may not have read
        the child's word yet); then, if it still has not, kill it.
        """
        child.ready_timer = self._reactor.callLater(0, self._kill_if_not_ready, child)

    def _kill_if_not_ready(self, child: _ChildProtocol) -> None:
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

    def child_output(self, child: _ChildProtocol, fd: int, line: bytes) -> None:
        """A line from a child: a JSON log event (stdout) or raw text (stderr)."""
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

    def child_ended(self, child: _ChildProtocol, reason: Failure) -> None:
        """A child exited: restart it unless stopping or it keeps dying."""
        if child.ready_timer is not None and child.ready_timer.active():
            child.ready_timer.cancel()
        if self.children.get(child.slot) is child:
            del self.children[child.slot]
        if self._stopping:
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

    def signal_all(self, name: str) -> None:
        """Send a signal (e.g. C{"HUP"}) to every child."""
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


class _ParentPipe(abstract.FileDescriptor):
    """A child's standard input: when the parent's end closes, stop."""

    def __init__(self, reactor: Any, fd: int, on_close: Any) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._on_close = on_close
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        self._on_close()


def _serve(reactor: Any, inherited: list[tuple[int, str]], options: Any) -> None:
    """Build a child's service on its inherited sockets and run it."""
    from pop3srv.app.tap import makeService

    top = makeService(options, reactor, inherited=inherited)

    def stop() -> None:
        # The relay to the parent's hashing pool closing may have stopped it.
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    _ParentPipe(reactor, 0, stop).startReading()
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.callWhenRunning(
        _log.info, "Server process {pid} is serving", pid=os.getpid(), **{READY_KEY: True}
    )
    reactor.run()


def _forked_child(inherited: list[tuple[int, str]], options: Any) -> None:
    """Run a child server process that is a fork of the parent."""
    from twisted.logger import jsonFileLogObserver

    set_process_name("pop3srv-worker")
    reactor = fresh_reactor()
    out = os.fdopen(1, "w", encoding="utf-8", closefd=False)
    log_only_to(jsonFileLogObserver(out))
    try:
        _serve(reactor, inherited, options)
    finally:
        out.flush()


def child_main(argv: Sequence[str] | None = None) -> None:
    """
    Run one child server process: C{python -c _CHILD_CODE SPEC ARGS...}.

    @param argv: the JSON list of C{[fd, kind]} of the inherited listening
        sockets, then the pop3srv arguments; C{sys.argv[1:]} if L{None}.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    spec = [(int(fd), str(kind)) for fd, kind in json.loads(args[0])]
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    out = os.fdopen(1, "w", encoding="utf-8", closefd=False)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out)], redirectStandardIO=False)

    from pop3srv.app.tap import Options

    options = Options()
    options.parseOptions(args[1:])
    _serve(reactor, spec, options)
