# -*- test-case-name: tests.test_control -*-
"""
One view of the whole server, whatever C{--workers} is, and the control
socket through which C{pop3srv who} and C{pop3srv stats} read it.

Each server process knows only its own sessions and metrics: its
L{ProcessReport}.  The parent server process sees them all through a
L{ServerView}: its own report, and each worker's, asked over the AMP
connection the worker already has to it (L{ListSessions
<pop3srv.processes.rpc.ListSessions>}, L{GetMetrics
<pop3srv.processes.rpc.GetMetrics>}, answered in the worker by a
L{ReportResponder}).  The workers are asked together, and one that has not
answered within L{CHILD_TIMEOUT} seconds (stuck, or just restarting) is
left out of that answer, with a warning in the log, rather than holding up
the admin or the metrics scrape.

The control socket (C{--control-socket PATH}) is a UNIX socket served by
the parent only, speaking AMP: L{Who <pop3srv.processes.rpc.Who>} answers
the sessions, L{Stats <pop3srv.processes.rpc.Stats>} the metrics as text.
It is created with mode 0660 under a umask that never lets it be wider,
so only root and the members of the group the server runs as can open
it: who is logged in from where is not everyone's business.  Its
directory is the admin's to choose; the default is the runtime directory
systemd makes for the service (C{RuntimeDirectory=}), see L{control_path}.

The client side (L{who}, L{stats}) is blocking, for the C{pop3srv}
command: a plain socket that writes one AMP box and reads one back, using
the commands' own argument types; no reactor to start and stop.  Its
errors are L{ControlError}, one line each.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp, policies
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3srv.core.metrics import lasting as lasting_counts
from pop3srv.processes.rpc import (
    GetMetrics,
    ListSessions,
    Peer,
    ReportFailed,
    Stats,
    Who,
)

if TYPE_CHECKING:
    from pop3srv.server.metrics import ProcessMetrics
    from pop3srv.server.protocol import POP3ServerFactory

__all__ = [
    "CHILD_TIMEOUT",
    "ControlError",
    "ControlFactory",
    "ControlServer",
    "ControlSocket",
    "ControlSocketError",
    "ProcessReport",
    "ReportResponder",
    "ServerView",
    "control_path",
    "default_client_path",
    "format_sessions",
    "stats",
    "who",
]

_log = Logger()

#: Seconds a worker has to answer the parent's question for a view.
CHILD_TIMEOUT = 2.0
#: Seconds a control connection may sit idle before it is closed.
IDLE_TIMEOUT = 30.0
#: Seconds a control connection being closed has to send what it holds
#: before it is aborted.
ABORT_GRACE = 2.0
#: Bytes of answers a client that has stopped reading may have waiting,
#: beyond the transport's own buffer; more, and it is cut off.
MAX_UNREAD = 1 << 20
#: Questions one control connection may have open at once (the C{pop3srv}
#: command asks one per connection).
MAX_QUESTIONS = 8
#: Seconds C{pop3srv who} and C{stats} wait for the server's answer:
#: more than L{CHILD_TIMEOUT}, which bounds the server's own wait.
CLIENT_TIMEOUT = 10.0
#: The largest answer the client reads, so that whatever answers on a
#: wrong path cannot make it read without end.
MAX_ANSWER = 64 << 20
#: The mode of the control socket: root and the server's group.
SOCKET_MODE = 0o660
#: The file name of the control socket in a runtime directory.
SOCKET_NAME = "control"
#: The runtime directory looked for when systemd gives none.
RUN_DIRECTORY = "/run/pop3srv"

Sessions = list[dict[str, Any]]
Metrics = dict[str, Any]
#: How a view asks each worker: the pid and the parent's end of the
#: worker's AMP connection, for every worker running.
Children = Callable[[], Sequence[tuple[int | None, amp.BoxDispatcher]]]


@dataclass(frozen=True)
class ProcessReport:
    """
    What one server process says of itself.

    @ivar sessions: its open sessions, each a
        L{SessionInfo.as_dict() <pop3srv.server.sessions.SessionInfo.as_dict>}.
    @ivar metrics: its metrics, a
        L{ProcessMetrics.snapshot() <pop3srv.server.metrics.ProcessMetrics.snapshot>}.
    """

    sessions: Callable[[], Sessions]
    metrics: Callable[[], Metrics]

    @classmethod
    def of(cls, factory: POP3ServerFactory, metrics: ProcessMetrics) -> ProcessReport:
        """
        The report of the process serving with C{factory} and counting in
        C{metrics}.
        """
        return cls(
            sessions=lambda: [info.as_dict() for info in factory.sessions.list()],
            metrics=metrics.snapshot,
        )


class ReportResponder(amp.CommandLocator):
    """
    A worker's answers to the parent's L{ListSessions} and L{GetMetrics},
    put on its connection to the parent
    (L{Peer.answer_with <pop3srv.processes.rpc.Peer.answer_with>}).
    """

    def __init__(self, report: ProcessReport) -> None:
        self.report = report

    @ListSessions.responder
    def list_sessions(self) -> dict[str, Any]:
        return {"sessions": _reported(self.report.sessions, "its sessions")}

    @GetMetrics.responder
    def get_metrics(self) -> dict[str, Any]:
        return {"metrics": _reported(self.report.metrics, "its metrics")}


def _reported(report: Callable[[], Any], what: str) -> Any:
    """
    C{report()}; a failure logged here, as the declared L{ReportFailed}
    (which AMP passes on as such, without closing the connection).
    """
    try:
        return report()
    except Exception as e:
        _log.failure("This server process cannot report {what}", what=what)
        raise ReportFailed(f"cannot report {what}: {e}") from None


class ServerView:
    """
    The whole server as the parent server process sees it: its own
    report and each worker's, gathered when asked.

    The metrics must look like one process's to a monitor: a counter never
    goes down.  So the view keeps each worker's last snapshot and uses it
    for a worker that is late to answer (stopped, busy); and once a worker
    has ended (it is no longer among the supervisor's running workers), its
    last counters and histograms are added to a total of the workers gone
    (L{lasting <pop3srv.core.metrics.lasting>}), which every later sum
    includes.  A worker gone has no gauges: it holds no sessions.  What a
    worker counted after its last snapshot was taken dies with it.
    """

    def __init__(
        self,
        report: ProcessReport,
        reactor: Any,
        merge: Callable[[list[Metrics]], Metrics],
        children: Children = lambda: [],
        timeout: float = CHILD_TIMEOUT,
        lasting: Callable[[Metrics], Metrics] = lasting_counts,
    ) -> None:
        """
        @param report: this process's own.
        @param reactor: provides C{IReactorTime}, for the time limit.
        @param merge: makes one snapshot of the metrics of several
            processes (L{pop3srv.server.metrics.merge}).
        @param children: the workers to ask (L{WorkerSupervisor.connections
            <pop3srv.processes.supervisor.WorkerSupervisor.connections>});
            none by default, for a single process.
        @param timeout: seconds each worker has to answer.
        @param lasting: what of a snapshot is kept once its worker has
            ended (L{pop3srv.core.metrics.lasting}).
        """
        self.report = report
        self._reactor = reactor
        self._merge = merge
        self._children = children
        self.timeout = timeout
        self._lasting = lasting
        # Each worker's last snapshot (None before its first), by the
        # parent's end of its connection, which is the worker's identity:
        # a restarted worker has a new one.
        self._last: dict[amp.BoxDispatcher, Metrics | None] = {}
        # Questions each of them has not answered yet: a worker is retired
        # only once none are left, so that no late answer can count it in
        # the retired total and again as itself.
        self._asking: dict[amp.BoxDispatcher, int] = {}
        self._retired: Metrics | None = None
        self._own_last: Metrics | None = None

    def sessions(self) -> Deferred[Sessions]:
        """
        @return: fires with every process's open sessions, oldest first
            (a worker that does not answer in time left out).
        """

        def together(answers: list[Any]) -> Sessions:
            found: Sessions = [info for answer in answers for info in answer]
            found.sort(key=lambda info: (info.get("since") or 0, str(info.get("id"))))
            return found

        gathering = self._gather(
            self._children(), self.report.sessions, ListSessions, "sessions", list
        )
        return gathering.addCallback(lambda results: together(_answers(results)))

    def metrics(self) -> Deferred[Metrics]:
        """
        @return: fires with the merged metrics of every process: a worker
            that does not answer in time with its last snapshot (if it has
            answered before), those that have ended with their last counters.
        """
        children = list(self._children())
        self._retire_gone({peer for _, peer in children})
        for _, peer in children:
            self._last.setdefault(peer, None)
            self._asking[peer] = self._asking.get(peer, 0) + 1
        gathering = self._gather(children, self.report.metrics, GetMetrics, "metrics", dict)

        def together(results: list[tuple[bool, Any]]) -> Metrics:
            (own_ok, own), *answers = results
            for (_, peer), (ok, answer) in zip(children, answers, strict=True):
                self._asking[peer] -= 1
                if ok and answer is not None and peer in self._last:
                    self._last[peer] = answer
            if own_ok and own is not None:
                self._own_last = own
            # This process's own report failing is a bug (logged); its
            # counters must not drop for it either.
            found = [self._own_last] if self._own_last is not None else []
            found += [snapshot for snapshot in self._last.values() if snapshot is not None]
            if self._retired is not None:
                found.append(self._retired)
            return self._merge(found)

        return gathering.addCallback(together)

    def _retire_gone(self, running: set[amp.BoxDispatcher]) -> None:
        """
        Add the last counters of each worker that is no longer running,
        and not waited for, to the retired total; forget the rest of it.
        """
        for peer in [p for p in self._last if p not in running and not self._asking.get(p)]:
            last = self._last.pop(peer)
            self._asking.pop(peer, None)
            if last is None:
                continue
            try:
                kept = self._lasting(last)
                self._retired = (
                    kept if self._retired is None else self._merge([self._retired, kept])
                )
            except Exception:
                _log.failure("Cannot keep the counts of a server process that ended")

    def _gather(
        self,
        children: Sequence[tuple[int | None, amp.BoxDispatcher]],
        own: Callable[[], Any],
        command: type[amp.Command],
        key: str,
        kind: type,
    ) -> Deferred[list[tuple[bool, Any]]]:
        """
        This process's answer and the workers', asked all at once.

        @param children: the workers to ask, with their pids.
        @param command: what to ask.
        @param key: the field of C{command}'s answer that holds it.
        @param kind: what type a worker's answer must have.
        @return: fires with C{(True, answer)}, or C{(True, None)} for a
            process that did not answer, this process's first and then the
            workers' in the order of C{children}; never fails.
        """
        asked: list[Deferred[Any]] = [maybeDeferred(own).addErrback(self._own_failed, key)]
        for pid, peer in children:
            d = maybeDeferred(peer.callRemote, command)
            d.addTimeout(self.timeout, self._reactor)
            d.addCallback(_field, key, kind)
            d.addErrback(self._child_failed, pid, peer, command)
            asked.append(d)
        return DeferredList(asked, consumeErrors=True)

    @staticmethod
    def _own_failed(failure: Failure, what: str) -> None:
        _log.failure("This server process cannot report its {what}", failure, what=what)

    def _child_failed(
        self,
        failure: Failure,
        pid: int | None,
        peer: amp.BoxDispatcher,
        command: type[amp.Command],
    ) -> None:
        instead = (
            "using its last numbers"
            if command is GetMetrics and self._last.get(peer) is not None
            else "leaving it out"
        )
        if failure.check(defer.TimeoutError):
            _log.warn(
                "Server process {pid} did not answer {command} within {timeout:g} s; {instead}",
                pid=pid,
                command=command.__name__,
                timeout=self.timeout,
                instead=instead,
            )
        else:
            _log.warn(
                "Server process {pid} could not answer {command}: {reason}; {instead}",
                pid=pid,
                command=command.__name__,
                reason=failure.getErrorMessage() or repr(failure.value),
                instead=instead,
            )


def _answers(results: list[tuple[bool, Any]]) -> list[Any]:
    """The answers there are, of a gathering's results."""
    return [value for ok, value in results if ok and value is not None]


def _field(answer: Mapping[str, Any], key: str, kind: type) -> Any:
    """The field C{key} of an answer, which must be a C{kind}."""
    value = answer[key]
    if not isinstance(value, kind):
        raise TypeError(f"the answer's {key} is a {type(value).__name__}, not a {kind.__name__}")
    return value


@implementer(IPushProducer)
class ControlServer(Peer, policies.TimeoutMixin):
    """
    The parent's end of one connection to the control socket: answers
    L{Who} and L{Stats} from a L{ServerView}.

    Whatever the client does, the connection costs a bounded amount and
    ends:
      - one idle for L{IDLE_TIMEOUT} seconds is closed, and aborted if
        closing has not ended it L{ABORT_GRACE} seconds later (a client
        that does not read would keep unsent answers, and so the
        connection, for ever);
      - it is the transport's producer: once the client stops reading
        and the answers waiting fill the transport's buffer, the questions
        are no longer read, until the client has read them; answers still
        to come meanwhile may add L{MAX_UNREAD} bytes, and a client that
        asks more than L{MAX_QUESTIONS} at once is cut off.
    """

    # A UNIX socket's connection: ITransport plus the producer and consumer
    # methods and abortConnection (None once lost, as Peer leaves it).
    transport: Any

    def __init__(
        self, view: ServerView, render_text: Callable[[Metrics], str], reactor: Any
    ) -> None:
        """
        @param render_text: the metrics as an admin reads them
            (L{pop3srv.server.metrics.render_text}).
        @param reactor: provides C{IReactorTime}, for the idle timeout.
        """
        super().__init__()
        self.view = view
        self.render_text = render_text
        self._reactor = reactor
        self._paused = False
        self._unread = 0
        self._questions = 0
        self._abort_call: Any = None
        self._cut = False

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        # TimeoutMixin's clock, which would be the global reactor.
        return self._reactor.callLater(period, func)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self.setTimeout(IDLE_TIMEOUT)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self) -> None:
        transport = self.transport
        if transport is None:
            return
        # A paused producer would hold the close until the client reads.
        transport.unregisterProducer()
        transport.loseConnection()
        self._abort_call = self._reactor.callLater(ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        super().connectionLost(reason)

    # IPushProducer: the transport says whether the client reads its answers.

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._unread = 0
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def sendBox(self, box: amp.AmpBox) -> None:
        if self._cut:
            return
        if self._paused and self.transport is not None:
            # What serialize() will write: each key and value, each after
            # its 16-bit length, then an empty key.
            self._unread += 2 + sum(4 + len(k) + len(v) for k, v in box.items())
            if self._unread > MAX_UNREAD:
                self._cut_off("does not read its answers")
                return
        super().sendBox(box)

    def _cut_off(self, why: str) -> None:
        """Abort the connection (once), saying C{why}."""
        if self._cut:
            return
        self._cut = True
        _log.warn("A control socket client {why}; cutting it off", why=why)
        if self.transport is not None:
            self.transport.abortConnection()

    def _answering(
        self, answer: Callable[[], Deferred[dict[str, Any]]]
    ) -> Deferred[dict[str, Any]]:
        """
        C{answer()}, if the client has fewer than L{MAX_QUESTIONS} questions
        open; else the connection is cut off.
        """
        if self._cut or self._questions >= MAX_QUESTIONS:
            self._cut_off(f"asked more than {MAX_QUESTIONS} questions at once")
            return defer.fail(ReportFailed("too many questions at once"))
        self._questions += 1

        def answered(result: object) -> object:
            self._questions -= 1
            return result

        return answer().addBoth(answered)

    @Who.responder
    def who(self) -> Deferred[dict[str, Any]]:
        def answer() -> Deferred[dict[str, Any]]:
            d = self.view.sessions().addCallback(lambda sessions: {"sessions": sessions})
            return d.addErrback(_failed_answer, "the sessions")

        return self._answering(answer)

    @Stats.responder
    def stats(self) -> Deferred[dict[str, Any]]:
        def answer() -> Deferred[dict[str, Any]]:
            d = self.view.metrics().addCallback(lambda merged: {"text": self.render_text(merged)})
            return d.addErrback(_failed_answer, "the metrics")

        return self._answering(answer)


def _failed_answer(failure: Failure, what: str) -> Failure:
    """A failure to answer the admin: logged, and sent as L{ReportFailed}."""
    _log.failure("Cannot answer the control socket with {what}", failure, what=what)
    return Failure(ReportFailed(f"cannot report {what}: {failure.getErrorMessage()}"))


class ControlFactory(Factory):
    """
    Makes a L{ControlServer} per connection.  Its name is what the log
    line about the socket says (C{ControlFactory starting on PATH}).
    """

    noisy = False

    def __init__(
        self, view: ServerView, render_text: Callable[[Metrics], str], reactor: Any
    ) -> None:
        self.view = view
        self.render_text = render_text
        self._reactor = reactor

    def buildProtocol(self, addr: Any) -> ControlServer:
        server = ControlServer(self.view, self.render_text, self._reactor)
        server.factory = self
        return server


class ControlSocketError(Exception):
    """The control socket cannot be created: one line, naming its path."""


def control_path(
    value: str,
    environ: Mapping[str, str] = os.environ,
    run_directory: str = RUN_DIRECTORY,
) -> str | None:
    """
    Where the server makes its control socket, for the C{control_socket}
    setting's value.

    @param value: C{none} (no control socket); C{auto}: under systemd's
        C{RUNTIME_DIRECTORY} (the first, if it names several) if it is
        set, else in C{run_directory} if that exists and this process may
        create files there, else none, so that a server started by hand
        as any user still starts; or a path, made absolute (a daemon
        changes its directory to C{/}).
    @return: the absolute path, or L{None} for none.
    """
    if value == "none":
        return None
    if value != "auto":
        return os.path.abspath(value)
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if os.path.isdir(run_directory) and os.access(run_directory, os.W_OK | os.X_OK):
        return os.path.join(run_directory, SOCKET_NAME)
    return None


def default_client_path(environ: Mapping[str, str] = os.environ) -> str:
    """
    Where C{pop3srv who} and C{stats} look without C{--control-socket}:
    where a server with C{control_socket = "auto"} under systemd makes it.
    """
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime or RUN_DIRECTORY, SOCKET_NAME)


def _clear_stale(path: str) -> None:
    """
    Remove what an earlier server left at C{path}, if it is a socket that
    nothing answers on.

    @raise ControlSocketError: C{path} is something else, or a server
        answers on it.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlSocketError(f"control socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"control socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        pass
    except OSError as e:
        raise ControlSocketError(f"control socket {path}: {e.strerror or e}") from None
    else:
        raise ControlSocketError(
            f"control socket {path}: another process answers on it (pop3srv already running?)"
        )
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlSocketError(
            f"control socket {path}: cannot remove the stale socket: {e.strerror}"
        ) from None


class ControlSocket(service.Service):
    """
    Serves the control socket: L{bind} at once, to report a problem before
    the server turns into a daemon (as the listeners do); stopping removes
    the socket file.

    @ivar port: the listening port while it listens.
    """

    def __init__(
        self,
        path: str,
        view: ServerView,
        render_text: Callable[[Metrics], str],
        reactor: Any,
    ) -> None:
        """
        @param path: an absolute path (L{control_path}).
        @param view: what L{Who} and L{Stats} answer from.
        @param render_text: as for L{ControlServer}.
        @param reactor: provides C{IReactorUNIX} and C{IReactorTime}.
        """
        self.path = path
        self.view = view
        self._reactor = reactor
        self.factory = ControlFactory(view, render_text, reactor)
        self.port: Any = None

    def bind(self) -> None:
        """
        Listen now, if not yet listening: a stale socket file is replaced;
        the socket file is never wider than L{SOCKET_MODE}, even for a moment.

        @raise ControlSocketError: the one-line reason it cannot.
        """
        if self.port is not None:
            return
        _clear_stale(self.path)
        # bind() creates the file with the umask's mode: only then does
        # listenUNIX chmod it, so the umask makes it never wider.
        previous = os.umask(0o777 & ~SOCKET_MODE)
        try:
            self.port = self._reactor.listenUNIX(self.path, self.factory, mode=SOCKET_MODE)
        except error.CannotListenError as e:
            reason = e.socketError
            text = getattr(reason, "strerror", None) or str(reason)
            raise ControlSocketError(f"control socket {self.path}: {text}") from None
        finally:
            os.umask(previous)

    def startService(self) -> None:
        super().startService()
        self.bind()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class ControlError(Exception):
    """C{pop3srv who} or C{stats} could not get the answer: one line."""


def who(path: str, timeout: float = CLIENT_TIMEOUT) -> Sessions:
    """
    The sessions open in the server serving the control socket at C{path}.

    @return: one dict per session, as L{SessionInfo.as_dict()
        <pop3srv.server.sessions.SessionInfo.as_dict>} gives, oldest first.
    @raise ControlError: naming C{path} and why.
    """
    sessions = _ask(path, Who, timeout)["sessions"]
    if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
        raise ControlError(f"{path}: not a pop3srv control socket (a malformed answer)")
    return sessions


def stats(path: str, timeout: float = CLIENT_TIMEOUT) -> str:
    """
    The metrics of the server serving the control socket at C{path}, as text.

    @raise ControlError: naming C{path} and why.
    """
    text: str = _ask(path, Stats, timeout)["text"]
    return text


def _ask(path: str, command: type[amp.Command], timeout: float) -> dict[str, Any]:
    """
    Send C{command} on a new connection to C{path}; its parsed answer.

    @raise ControlError: naming C{path} and why.
    """
    question = command.makeArguments({}, None)
    question[amp.COMMAND] = command.commandName
    question[amp.ASK] = b"1"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            deadline = time.monotonic() + timeout
            s.connect(path)
            s.sendall(question.serialize())
            answer = _read_box(s, deadline, path)
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise ControlError(
            f"{path}: no such socket (is pop3srv running, with this --control-socket?)"
        ) from None
    except PermissionError:
        raise ControlError(
            f"{path}: permission denied (run this as root or as a member of pop3srv's group)"
        ) from None
    except ConnectionRefusedError:
        raise ControlError(f"{path}: nothing answers on it (is pop3srv running?)") from None
    except OSError as e:
        if e.errno in (errno.EPROTOTYPE, errno.ENOTSOCK):
            raise ControlError(f"{path}: not a pop3srv control socket") from None
        raise ControlError(f"{path}: {e.strerror or e}") from None
    if amp.ERROR in answer:
        code = answer.get(amp.ERROR_CODE, b"")
        description = answer.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
        if code == b"REPORT-FAILED":
            raise ControlError(f"{path}: the server could not answer: {description}")
        raise ControlError(f"{path}: not a pop3srv control socket (it answered {description!r})")
    if answer.get(amp.ANSWER) != b"1":
        raise ControlError(f"{path}: not a pop3srv control socket (an answer to nothing asked)")
    try:
        parsed: dict[str, Any] = command.parseResponse(answer, None)
    except Exception:
        raise ControlError(f"{path}: not a pop3srv control socket (a malformed answer)") from None
    return parsed


def _read_box(s: socket.socket, deadline: float, path: str) -> dict[bytes, bytes]:
    """
    Read one AMP box from C{s}: pairs of 16-bit-length-prefixed key and
    value, ended by an empty key.

    @raise ControlError: the peer closed early or does not speak AMP.
    """
    received = bytearray()
    box: dict[bytes, bytes] = {}

    def take(n: int) -> bytes:
        while len(received) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            chunk = s.recv(max(n - len(received), 1 << 16))
            if not chunk:
                raise ControlError(f"{path}: the server closed the connection without answering")
            received.extend(chunk)
        taken = bytes(received[:n])
        del received[:n]
        return taken

    size = 0
    while True:
        (length,) = struct.unpack("!H", take(2))
        if length == 0:
            return box
        if length > amp.MAX_KEY_LENGTH:
            raise ControlError(f"{path}: not a pop3srv control socket (it does not speak AMP)")
        key = take(length)
        (length,) = struct.unpack("!H", take(2))
        size += len(key) + length
        if size > MAX_ANSWER:
            raise ControlError(f"{path}: not a pop3srv control socket (an answer too large)")
        box[key] = take(length)


def format_sessions(sessions: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """
    The sessions as a table for an admin, one line each under a heading.

    @param now: the time to measure sessions' ages from; the clock's if
        L{None}.
    """
    now = time.time() if now is None else now
    heading = ("USER", "CLIENT", "LISTENER", "TLS", "SINCE", "AGE", "STATE", "PID")
    rows = [heading]
    for info in sessions:
        since = info.get("since")
        if isinstance(since, int | float):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            age = _age(max(0.0, now - since))
        else:
            started = age = "-"
        rows.append(
            (
                str(info.get("user") or "-"),
                str(info.get("client") or "-"),
                str(info.get("listener") or "-"),
                str(info.get("tls") or "-"),
                started,
                age,
                str(info.get("state") or "-"),
                str(info.get("pid") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(heading))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _age(seconds: float) -> str:
    """A duration as C{1d02h}, C{2h05m}, C{3m07s} or C{12s}."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
