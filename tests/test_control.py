"""
Tests for L{pop3srv.app.control}: the parent's view of every server
process (over real UNIX socket pairs), the control socket and its blocking
client (a real UNIX socket in a temporary directory), and C{pop3srv who}
and C{pop3srv stats} against a real C{twistd pop3srv --workers 2}.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_until
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.protocols import amp

from pop3srv.app import control
from pop3srv.app.control import (
    ControlError,
    ControlServer,
    ControlSocket,
    ControlSocketError,
    ProcessReport,
    ReportResponder,
    ServerView,
)
from pop3srv.core.metrics import (
    HASH_CHECK_SECONDS,
    LOGINS,
    PROCESSES,
    SESSIONS_OPEN,
    ProcessMetrics,
    merge,
)
from pop3srv.processes.authorityrpc import WorkerConnection
from pop3srv.processes.hashrelay import RelayClient
from pop3srv.processes.rpc import (
    GetMetrics,
    LargeJSON,
    LargeText,
    ListSessions,
    Peer,
    Who,
    connect,
)
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import ConnectionLimits, ThrottleSettings


def session(n: int, pid: int = 100, since: float = 1000.0) -> dict[str, Any]:
    """A session as a process reports it."""
    return {
        "id": f"{pid:x}-{n}",
        "user": f"user{n}",
        "client": f"192.0.2.{n}",
        "listener": "pop3",
        "tls": None,
        "since": since + n,
        "state": "transaction",
        "pid": pid,
    }


def add_counts(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """A stand-in for the metrics' merge: counters summed, and who was merged."""
    return {
        "logins": sum(s["logins"] for s in snapshots),
        "pids": sorted(s["pid"] for s in snapshots),
    }


class Stuck(amp.CommandLocator):
    """A worker that never answers (its reactor stalled, say)."""

    @ListSessions.responder
    def list_sessions(self) -> Deferred[dict[str, Any]]:
        return Deferred()


class Worker:
    """
    One worker's two ends of a socket pair: the parent's end (a L{Peer},
    or the L{WorkerConnection} C{twistd pop3srv} uses) and the worker's
    L{RelayClient}, answering with C{locator} as a worker built by
    C{makeService} does.
    """

    def __init__(self, pid: int, locator: amp.CommandLocator | None, parent_end: Peer) -> None:
        self.pid = pid
        self.parent_end = parent_end
        self.client = RelayClient()
        if locator is not None:
            self.client.answer_with(locator)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connect(reactor, ours, self.parent_end)
        connect(reactor, theirs, self.client)

    def close(self) -> None:
        for end in (self.client, self.parent_end):
            if end.transport is not None:
                end.transport.loseConnection()


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Start workers; every one is closed after the test."""
    started: list[Worker] = []

    def start(
        pid: int, locator: amp.CommandLocator | None, parent_end: Peer | None = None
    ) -> Worker:
        started.append(Worker(pid, locator, parent_end if parent_end is not None else Peer()))
        return started[-1]

    yield start
    for worker in started:
        worker.close()
    deadline = time.monotonic() + 5
    while any(w.client.transport or w.parent_end.transport for w in started):
        assert time.monotonic() < deadline
        reactor.iterate(0.01)  # type: ignore[attr-defined]


def report_of(pid: int, sessions: list[dict[str, Any]], logins: int) -> ProcessReport:
    return ProcessReport(
        sessions=lambda: list(sessions), metrics=lambda: {"logins": logins, "pid": pid}
    )


def view_of(report: ProcessReport, *children: Worker, timeout: float = 2.0) -> ServerView:
    return ServerView(
        report,
        reactor,
        merge=add_counts,
        children=lambda: [(w.pid, w.parent_end) for w in children],
        timeout=timeout,
    )


def texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


# The view over every process.


def test_sessions_of_every_process(workers: Callable[..., Worker]) -> None:
    """
    The view's sessions are its own and every worker's, oldest first,
    asked over the worker's real connection, including through the
    L{WorkerConnection} C{twistd pop3srv} puts at the parent's end.
    """
    authority = LocalAuthority(
        ThrottleSettings(),
        ConnectionLimits(max_connections=5, max_per_address=5, max_sessions_per_user=5),
        clock=reactor,  # type: ignore[arg-type]
    )
    one = workers(201, ReportResponder(report_of(201, [session(2, 201)], 0)))
    two = workers(
        202,
        ReportResponder(report_of(202, [session(1, 202), session(5, 202)], 0)),
        WorkerConnection({}, authority),
    )
    view = view_of(report_of(100, [session(3)], 0), one, two)
    found = run_until(view.sessions(), 10)
    assert [s["id"] for s in found] == ["ca-1", "c9-2", "64-3", "ca-5"]
    assert found[1] == session(2, 201)


def test_metrics_merged_over_every_process(workers: Callable[..., Worker]) -> None:
    """The view's metrics are the merge of its own snapshot and each worker's."""
    one = workers(201, ReportResponder(report_of(201, [], 4)))
    two = workers(202, ReportResponder(report_of(202, [], 5)))
    view = view_of(report_of(100, [], 3), one, two)
    assert run_until(view.metrics(), 10) == {"logins": 12, "pids": [100, 201, 202]}


def test_a_single_process(workers: Callable[..., Worker]) -> None:
    """Without workers the view is the process's own report."""
    view = ServerView(report_of(100, [session(1)], 7), reactor, merge=add_counts)
    assert run_until(view.sessions(), 10) == [session(1)]
    assert run_until(view.metrics(), 10) == {"logins": 7, "pids": [100]}


def test_large_answers_cross(workers: Callable[..., Worker]) -> None:
    """
    A session list far beyond AMP's cap on one value (64 KiB) crosses
    whole, in pieces.
    """
    many = [dict(session(n, 201), client="2001:db8::" + "f" * 200) for n in range(2000)]
    assert len(json.dumps(many)) > 4 * amp.MAX_VALUE_LENGTH
    one = workers(201, ReportResponder(report_of(201, many, 0)))
    view = view_of(report_of(100, [], 0), one)
    assert run_until(view.sessions(), 20) == many


def test_a_worker_that_does_not_answer_is_left_out(
    workers: Callable[..., Worker], log_events: list[LogEvent]
) -> None:
    """
    A worker that has not answered within the view's time limit is left
    out, with a warning naming it; the others' answers come all the same.
    """
    stuck = workers(666, Stuck())
    fine = workers(201, ReportResponder(report_of(201, [session(1, 201)], 0)))
    view = view_of(report_of(100, [session(2)], 0), stuck, fine, timeout=0.3)
    started = time.monotonic()
    found = run_until(view.sessions(), 10)
    assert time.monotonic() - started < 5
    assert [s["pid"] for s in found] == [201, 100]
    assert any(
        "Server process 666 did not answer ListSessions within 0.3 s; leaving it out" in t
        for t in texts(log_events)
    )


def test_a_worker_that_cannot_answer_is_left_out(
    workers: Callable[..., Worker], log_events: list[LogEvent]
) -> None:
    """
    A worker whose report fails says so (logged there, declared on the
    wire), one that does not know the question (no responder) answers an
    error, one whose connection is gone cannot be asked: each is left out
    with a warning, and the connections stay up.
    """

    def broken() -> list[dict[str, Any]]:
        raise OSError("the session table is gone")

    failing = workers(301, ReportResponder(ProcessReport(broken, dict)))
    unknowing = workers(302, None)
    gone = workers(303, ReportResponder(report_of(303, [session(1, 303)], 0)))
    gone.close()
    settle(lambda: gone.parent_end.transport is None)
    view = view_of(report_of(100, [session(2)], 0), failing, unknowing, gone)
    assert run_until(view.sessions(), 10) == [session(2)]
    logged = "\n".join(texts(log_events))
    assert "This server process cannot report its sessions" in logged
    assert "Server process 301 could not answer ListSessions: cannot report its sessions" in logged
    assert "Server process 302 could not answer ListSessions" in logged
    assert "Server process 303 could not answer ListSessions" in logged
    assert failing.client.transport is not None and unknowing.client.transport is not None


def settle(condition: Callable[[], bool]) -> None:
    """Iterate the global reactor until C{condition()} holds."""
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        reactor.iterate(0.01)  # type: ignore[attr-defined]


def test_own_report_failing_is_left_out(log_events: list[LogEvent]) -> None:
    """The parent's own report failing leaves the parent out, logged; no failure."""

    def broken() -> dict[str, Any]:
        raise KeyError("gauge")

    view = ServerView(ProcessReport(lambda: [], broken), reactor, merge=add_counts)
    assert run_until(view.metrics(), 10) == {"logins": 0, "pids": []}
    assert any("This server process cannot report its metrics" in t for t in texts(log_events))


class Counting(amp.CommandLocator):
    """
    A worker's metrics report, over its real connection, that can be made
    to hold its answers (as a stopped or busy worker does): then each
    question waits in L{held} until the test answers it.
    """

    def __init__(self, metrics: ProcessMetrics) -> None:
        self.metrics = metrics
        self.holding = False
        self.held: list[Deferred[dict[str, Any]]] = []

    @GetMetrics.responder
    def get_metrics(self) -> dict[str, Any] | Deferred[dict[str, Any]]:
        if not self.holding:
            return {"metrics": self.metrics.snapshot()}
        self.held.append(Deferred())
        return self.held[-1]


def process_with(logins: int, sessions_open: int = 0) -> ProcessMetrics:
    """A process's metrics after C{logins} logins, with C{sessions_open} sessions open."""
    numbers = ProcessMetrics()
    if logins:
        numbers.inc(LOGINS, logins, result="ok", method="password")
    numbers.observe(HASH_CHECK_SECONDS, 0.01)
    if sessions_open:
        numbers.set(SESSIONS_OPEN, sessions_open, listener="pop3", tls="no")
    return numbers


def figures(view: ServerView) -> tuple[float, float, float, float]:
    """The view's logins, password checks, sessions open and processes, merged."""
    merged = run_until(view.metrics(), 10)["metrics"]

    def total(name: str, field: str | None = None) -> float:
        samples = merged[name]["samples"] if name in merged else []
        return sum(value[field] if field else value for _, value in samples)

    return (
        total(LOGINS.name),
        total(HASH_CHECK_SECONDS.name, "count"),
        total(SESSIONS_OPEN.name),
        total(PROCESSES.name),
    )


def test_counters_never_go_down_when_a_worker_is_late_or_ends(
    workers: Callable[..., Worker], log_events: list[LogEvent]
) -> None:
    """
    A worker late to answer counts with its last snapshot; a worker that
    ended keeps its counters and histograms in every later sum, but not
    its gauges; a worker that takes its place adds its own.
    """
    parent = process_with(1)
    slow, ending = Counting(process_with(3, sessions_open=2)), Counting(process_with(4, 1))
    one, two = workers(201, slow), workers(202, ending)
    running = [one, two]
    view = ServerView(
        ProcessReport(lambda: [], parent.snapshot),
        reactor,
        merge=merge,
        children=lambda: [(w.pid, w.parent_end) for w in running],
        timeout=0.3,
    )
    assert figures(view) == (8, 3, 3, 3)
    slow.holding = True
    assert figures(view) == (8, 3, 3, 3)
    assert any(
        "Server process 201 did not answer GetMetrics within 0.3 s; using its last numbers" in t
        for t in texts(log_events)
    )
    # The supervisor no longer lists a worker that ended.
    running.remove(two)
    two.close()
    assert figures(view) == (8, 3, 2, 2)
    assert figures(view) == (8, 3, 2, 2)
    replacement = workers(203, Counting(process_with(0)))
    running.append(replacement)
    assert figures(view) == (8, 4, 2, 3)
    ending.metrics.inc(LOGINS, 10, result="ok", method="password")
    assert figures(view) == (8, 4, 2, 3)


def test_a_worker_asked_while_it_ends_counts_once(workers: Callable[..., Worker]) -> None:
    """
    A worker that ends while a question to it is still open is kept as
    it is until the answer is in (its fresher numbers then), and only then
    retired: counted once, and never less than before.
    """
    parent = process_with(1)
    worker = Counting(process_with(2))
    one = workers(201, worker)
    running = [one]
    view = ServerView(
        ProcessReport(lambda: [], parent.snapshot),
        reactor,
        merge=merge,
        children=lambda: [(w.pid, w.parent_end) for w in running],
        timeout=5,
    )
    assert figures(view)[0] == 3
    worker.holding = True
    asked = view.metrics()
    settle(lambda: bool(worker.held))
    running.clear()
    assert figures(view)[0] == 3
    worker.metrics.inc(LOGINS, 5, result="ok", method="password")
    worker.held[0].callback({"metrics": worker.metrics.snapshot()})
    merged = run_until(asked, 10)["metrics"]
    assert sum(v for _, v in merged[LOGINS.name]["samples"]) == 8
    assert figures(view)[0] == 8
    assert figures(view)[0] == 8


@given(
    prefix=st.text(max_size=50),
    repeat=st.integers(min_value=0, max_value=3 * amp.MAX_VALUE_LENGTH // 2 + 3),
)
def test_large_arguments_round_trip(prefix: str, repeat: int) -> None:
    """
    Text and JSON of any size cross the wire encoding within AMP's caps,
    two-byte characters split between pieces included, and come back equal.
    """
    text = prefix + "é" * repeat
    for argument, value in ((LargeText(), text), (LargeJSON(), {"t": text, "n": [repeat]})):
        box = amp.AmpBox()
        argument.toBox(b"v", box, {"v": value}, None)
        assert all(len(piece) <= amp.MAX_VALUE_LENGTH for piece in box.values())
        (parsed,) = amp.parseString(box.serialize())
        objects: dict[str, Any] = {}
        argument.fromBox(b"v", parsed, objects, None)
        assert objects == {"v": value}
        assert parsed == {}, "every piece taken"


# The control socket.


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """
    A directory for sockets: short (a UNIX socket's path has about 100
    bytes), and open to other users for the permission test.
    """
    path = Path(tempfile.mkdtemp(prefix="pop3ctl-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def render(merged: dict[str, Any]) -> str:
    return f"logins {merged['logins']}\nprocesses {len(merged['pids'])}\n"


@pytest.fixture
def serving(short_dir: Path) -> Iterator[ControlSocket]:
    """A control socket over a view of one process with two sessions."""
    view = ServerView(report_of(100, [session(1), session(2)], 9), reactor, merge=add_counts)
    sock = ControlSocket(str(short_dir / "control"), view, render, reactor)
    sock.startService()
    yield sock
    stop(sock)


def stop(service: ControlSocket) -> None:
    """Stop serving the control socket, and wait until it is closed."""
    run_until(maybeDeferred(service.stopService))


def blocking(f: Callable[..., Any], *args: Any) -> Any:
    """
    Call the blocking client C{f(*args)} in a thread while the global
    reactor serves; its result, or raise its exception.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = f(*args)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while thread.is_alive():
        assert time.monotonic() < deadline, "the client did not return"
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_who_and_stats(serving: ControlSocket) -> None:
    """The client reads the view's sessions and the rendered metrics."""
    assert blocking(control.who, serving.path) == [session(1), session(2)]
    assert blocking(control.stats, serving.path) == "logins 9\nprocesses 1\n"


def test_socket_mode_and_removal(short_dir: Path) -> None:
    """
    The socket is mode 0660 even under a umask that would make it wider,
    because bind() itself runs under a umask that gives no more; the umask
    is the process's again afterwards; stopping removes the socket file.
    """
    seen: list[int] = []

    class Probe:
        """The reactor, noting the umask in force when it binds."""

        def listenUNIX(self, *args: Any, **kwargs: Any) -> Any:
            current = os.umask(0)
            os.umask(current)
            seen.append(current)
            return reactor.listenUNIX(*args, **kwargs)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> Any:
            return getattr(reactor, name)

    view = ServerView(report_of(100, [], 0), reactor, merge=add_counts)
    path = short_dir / "control"
    previous = os.umask(0)
    try:
        sock = ControlSocket(str(path), view, render, Probe())
        sock.bind()
        assert os.umask(0) == 0
    finally:
        os.umask(previous)
    assert seen == [0o117]
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    stop(sock)
    assert not path.exists()


def _connect_as(uid: int, gid: int, path: str) -> str:
    """
    In a fork that runs as C{uid}:C{gid} with no other group, ask C{who};
    what it got: C{"ok N"} or the error's text.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the fork
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                text = f"ok {len(control.who(path, timeout=5))}"
            except ControlError as e:
                text = str(e)
            os.write(write, text.encode())
        finally:
            os._exit(0)
    os.close(write)
    result = b""
    # The server answers in this process: serve while the fork asks.
    deadline = time.monotonic() + 20
    while True:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline
    with os.fdopen(read, "rb") as f:
        result = f.read()
    return result.decode()


def test_only_root_and_the_group_may_ask(serving: ControlSocket) -> None:
    """
    A user outside the socket's group is refused with a one-line error; a
    member of it gets the answer.
    """
    if os.getuid() != 0:
        os.chmod(serving.path, 0)
        with pytest.raises(ControlError) as caught:
            blocking(control.who, serving.path)
        assert str(caught.value) == (
            f"{serving.path}: permission denied "
            "(run this as root or as a member of pop3srv's group)"
        )
        return
    os.chown(serving.path, 0, 4242)
    refused = _connect_as(65534, 65534, serving.path)
    assert refused == (
        f"{serving.path}: permission denied (run this as root or as a member of pop3srv's group)"
    )
    assert _connect_as(65534, 4242, serving.path) == "ok 2"


def test_stale_socket_replaced(short_dir: Path) -> None:
    """A socket file nothing answers on (a server killed) is replaced."""
    path = short_dir / "control"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()
    view = ServerView(report_of(100, [session(1)], 0), reactor, merge=add_counts)
    sock = ControlSocket(str(path), view, render, reactor)
    sock.bind()
    try:
        assert blocking(control.who, str(path)) == [session(1)]
    finally:
        stop(sock)


def test_what_is_not_replaced(short_dir: Path, serving: ControlSocket) -> None:
    """
    A file that is not a socket, or a socket something answers on (a
    server already running), is left alone: start-up fails in one line.
    """
    view = ServerView(report_of(100, [], 0), reactor, merge=add_counts)
    other = short_dir / "file"
    other.write_text("keep me")
    with pytest.raises(ControlSocketError) as caught:
        ControlSocket(str(other), view, render, reactor).bind()
    assert str(caught.value) == f"control socket {other}: exists and is not a socket"
    assert other.read_text() == "keep me"
    with pytest.raises(ControlSocketError) as caught:
        ControlSocket(serving.path, view, render, reactor).bind()
    assert str(caught.value) == (
        f"control socket {serving.path}: another process answers on it (pop3srv already running?)"
    )
    assert blocking(control.stats, serving.path) == "logins 9\nprocesses 1\n"
    missing = short_dir / "no" / "control"
    with pytest.raises(ControlSocketError) as caught:
        ControlSocket(str(missing), view, render, reactor).bind()
    assert str(caught.value) == f"control socket {missing}: No such file or directory"


def test_client_errors(short_dir: Path) -> None:
    """Every way the client cannot get an answer is one line naming the path."""
    missing = str(short_dir / "missing")
    with pytest.raises(
        ControlError, match=r"^/tmp/.*/missing: no such socket \(is pop3srv running"
    ):
        control.who(missing)

    stale = short_dir / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ControlError, match=r": nothing answers on it \(is pop3srv running\?\)$"):
        control.stats(str(stale))

    plain = short_dir / "plain"
    plain.write_text("")
    with pytest.raises(ControlError, match=r"plain: nothing answers on it"):
        control.who(str(plain))


def _fake_server(path: Path, answer: Callable[[socket.socket], object]) -> threading.Thread:
    """A server on C{path} that is not pop3srv: C{answer(connection)} once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                answer(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"+OK POP3 server ready\r\n", "not a pop3srv control socket (it does not speak AMP)"),
        (b"", "the server closed the connection without answering"),
        (b"\x00\x04_ans", "the server closed the connection without answering"),
        (
            amp.AmpBox(
                _error=b"1",
                _error_code=b"UNHANDLED",
                _error_description=b"Unhandled Command: 'Who'",
            ).serialize(),
            "not a pop3srv control socket (it answered \"Unhandled Command: 'Who'\")",
        ),
        (amp.AmpBox(_answer=b"1").serialize(), "not a pop3srv control socket (a malformed answer)"),
        (
            amp.AmpBox(_answer=b"1", sessions=b'{"a": 1}').serialize(),
            "not a pop3srv control socket (a malformed answer)",
        ),
        (
            amp.AmpBox(_answer=b"1", sessions=b"[nonsense").serialize(),
            "not a pop3srv control socket (a malformed answer)",
        ),
        (
            amp.AmpBox(_answer=b"7", sessions=b"[]").serialize(),
            "not a pop3srv control socket (an answer to nothing asked)",
        ),
    ],
)
def test_not_pop3srv(short_dir: Path, reply: bytes, error: str) -> None:
    """Whatever else answers on the path is named as not pop3srv, in one line."""
    path = short_dir / "other"

    def answer(connection: socket.socket) -> None:
        connection.recv(1000)
        connection.sendall(reply)

    thread = _fake_server(path, answer)
    with pytest.raises(ControlError) as caught:
        control.who(str(path), timeout=5)
    assert str(caught.value) == f"{path}: {error}"
    thread.join(5)


def test_no_answer_in_time(short_dir: Path) -> None:
    """A server that does not answer: the client gives up after its time limit."""
    path = short_dir / "silent"
    release = threading.Event()
    thread = _fake_server(path, lambda connection: release.wait(10))
    started = time.monotonic()
    with pytest.raises(ControlError) as caught:
        control.who(str(path), timeout=0.5)
    assert time.monotonic() - started < 3
    assert str(caught.value) == f"{path}: no answer within 0.5 s"
    release.set()
    thread.join(5)


def test_server_failure_is_said(short_dir: Path, log_events: list[LogEvent]) -> None:
    """A failure rendering the answer reaches the admin as one line, and the log."""

    def broken(merged: dict[str, Any]) -> str:
        raise ValueError("no such metric family")

    view = ServerView(report_of(100, [], 0), reactor, merge=add_counts)
    sock = ControlSocket(str(short_dir / "control"), view, broken, reactor)
    sock.bind()
    try:
        with pytest.raises(ControlError) as caught:
            blocking(control.stats, sock.path)
    finally:
        stop(sock)
    assert str(caught.value) == (
        f"{sock.path}: the server could not answer: "
        "cannot report the metrics: no such metric family"
    )
    assert any("Cannot answer the control socket with the metrics" in t for t in texts(log_events))


def test_idle_connection_closed() -> None:
    """
    A control connection that says nothing is closed after the idle
    timeout, and aborted if closing has not ended it after a grace (its
    client does not read what is left to send, say).
    """
    clock = MemoryReactorClock()
    view = ServerView(report_of(100, [], 0), clock, merge=add_counts)
    server = ControlServer(view, render, clock)
    transport = StringTransport()
    server.makeConnection(transport)
    clock.advance(control.IDLE_TIMEOUT - 1)
    server.dataReceived(b"\x00")
    clock.advance(control.IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    assert transport.producer is None, "a paused producer would hold the close"
    clock.advance(control.ABORT_GRACE - 0.1)
    assert not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected, "not aborted"


def test_a_closed_connection_is_not_aborted() -> None:
    """A connection that closed within the grace is left alone."""
    clock = MemoryReactorClock()
    server = ControlServer(ServerView(report_of(100, [], 0), clock, add_counts), render, clock)
    transport = StringTransport()
    server.makeConnection(transport)
    clock.advance(control.IDLE_TIMEOUT)
    server.connectionLost()
    assert clock.getDelayedCalls() == []


def questions(command: type[amp.Command], count: int) -> bytes:
    """C{count} AMP boxes asking C{command}, as a client would send them."""
    boxes = []
    for n in range(count):
        box = command.makeArguments({}, None)
        box[amp.COMMAND] = command.commandName
        box[amp.ASK] = str(n + 1).encode()
        boxes.append(box.serialize())
    return b"".join(boxes)


def read_to_the_end(client: socket.socket) -> int:
    """Read C{client} until the server ends the connection; the bytes read."""
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := client.recv(1 << 16):
            received += len(chunk)
    return received


def test_a_client_that_does_not_read_is_cut_off(
    short_dir: Path, log_events: list[LogEvent]
) -> None:
    """
    A client that asks and asks and never reads: once its answers fill
    the connection, the server stops reading it and holds at most
    L{control.MAX_UNREAD} bytes more, then cuts it off.
    """
    big = [dict(session(n), client="2001:db8::" + "f" * 200) for n in range(500)]
    view = ServerView(report_of(100, big, 0), reactor, merge=add_counts)
    sock = ControlSocket(str(short_dir / "control"), view, render, reactor)
    sock.startService()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(sock.path)
        asked = questions(Who, 40)
        assert len(asked) < 4096
        client.sendall(asked)
        settle(lambda: any("does not read its answers" in t for t in texts(log_events)))
        # What reached the client before the cut, then the end.
        client.settimeout(10)
        one_answer = len(json.dumps(big))
        assert blocking(read_to_the_end, client) < 40 * one_answer / 2
    finally:
        client.close()
        stop(sock)


def test_a_client_that_asks_too_much_at_once_is_cut_off(
    workers: Callable[..., Worker], short_dir: Path, log_events: list[LogEvent]
) -> None:
    """More than L{control.MAX_QUESTIONS} questions open at once: cut off."""
    stuck = workers(666, Stuck())
    view = view_of(report_of(100, [], 0), stuck, timeout=30)
    sock = ControlSocket(str(short_dir / "control"), view, render, reactor)
    sock.startService()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(sock.path)
        client.sendall(questions(Who, control.MAX_QUESTIONS + 1))
        settle(
            lambda: any(
                f"asked more than {control.MAX_QUESTIONS} questions at once" in t
                for t in texts(log_events)
            )
        )
        client.settimeout(10)
        assert blocking(read_to_the_end, client) == 0
    finally:
        client.close()
        stop(sock)


# Where the socket is.


def test_control_path(tmp_path: Path) -> None:
    """none, auto (systemd's directory, else a writable /run/pop3srv), or a path."""
    run = tmp_path / "run"
    assert control.control_path("none", {}) is None
    assert (
        control.control_path("auto", {"RUNTIME_DIRECTORY": "/run/a:/run/b"}, str(run))
        == "/run/a/control"
    )
    assert control.control_path("auto", {}, str(run)) is None
    run.mkdir()
    assert control.control_path("auto", {}, str(run)) == f"{run}/control"
    if os.getuid() != 0:  # root may write anywhere
        run.chmod(0o500)
        assert control.control_path("auto", {}, str(run)) is None
    assert control.control_path("ctl.sock", {}) == os.path.abspath("ctl.sock")
    assert control.default_client_path({}) == "/run/pop3srv/control"
    assert control.default_client_path({"RUNTIME_DIRECTORY": "/run/x"}) == "/run/x/control"


def test_format_sessions() -> None:
    """The table C{pop3srv who} prints: a heading and one aligned line per session."""
    sessions = [
        dict(session(1), since=time.mktime((2025, 1, 2, 3, 4, 5, 0, 0, -1))),
        dict(
            session(22, pid=4321),
            user=None,
            client="2001:db8::1",
            listener="pop3s",
            tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
            state="authorization",
            since=time.mktime((2025, 1, 2, 4, 0, 0, 0, 0, -1)),
        ),
    ]
    now = time.mktime((2025, 1, 2, 5, 0, 0, 0, 0, -1))
    assert control.format_sessions(sessions, now).splitlines() == [
        "USER   CLIENT       LISTENER  TLS                             SINCE                "
        "AGE    STATE          PID",
        "user1  192.0.2.1    pop3      -                               2025-01-02 03:04:05  "
        "1h55m  transaction    100",
        "-      2001:db8::1  pop3s     TLSv1.3 TLS_AES_256_GCM_SHA384  2025-01-02 04:00:00  "
        "1h00m  authorization  4321",
    ]


# Against the real server.


def _login(port: int, user: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user(user)
    client.pass_(PASSWORDS[user])
    return client


def _client_of(client: poplib.POP3) -> str:
    """The session's client address as the server names it."""
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def _logins(text: str, result: str) -> int:
    """The logins with C{result} in a C{pop3srv stats} text, over every method."""
    pattern = rf'^pop3srv_logins_total\{{result="{result}",method="[^"]*"\}} (\d+)$'
    return sum(int(n) for n in re.findall(pattern, text, re.MULTILINE))


def test_who_and_stats_across_workers(
    short_dir: Path, live_server: Callable[..., Pop3Server]
) -> None:
    """
    With --workers 2, C{who} lists the sessions of both server processes in
    one list, with their user, client, listener, TLS, start and state; and
    C{stats} counts the logins of both.
    """
    path = str(short_dir / "control")
    started = time.time()
    srv = live_server(
        "--workers",
        "2",
        "--control-socket",
        path,
        mail={user: [b"Subject: hi\n\nhello\n"] for user in PASSWORDS},
    )
    assert srv.process is not None
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    logins = 0
    alice = _login(srv.port, "alice")
    logins += 1
    bob: poplib.POP3 | None = None
    try:
        # The kernel gives each connection to either process: log bob in
        # again until his session is in the other one.
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if bob is not None:
                bob.quit()
            bob = _login(srv.port, "bob")
            logins += 1
            sessions = control.who(path)
            pids = {s["user"]: s["pid"] for s in sessions}
            if len(set(pids.values())) == 2:
                break
        assert bob is not None
        assert pids.keys() == {"alice", "bob"}
        assert len(set(pids.values())) == 2, "both sessions always landed in one process"
        assert srv.process.pid in pids.values()
        by_user = {s["user"]: s for s in sessions}
        for user, client in (("alice", alice), ("bob", bob)):
            info = by_user[user]
            assert info["client"] == _client_of(client)
            assert info["listener"] == "pop3"
            assert info["tls"] is None
            assert info["state"] == "transaction"
            assert started - 1 <= info["since"] <= time.time()
            assert info["id"].startswith(f"{info['pid']:x}-")
        assert len(sessions) == 2
        table = control.format_sessions(sessions).splitlines()
        assert table[0].split() == [
            "USER",
            "CLIENT",
            "LISTENER",
            "TLS",
            "SINCE",
            "AGE",
            "STATE",
            "PID",
        ]
        assert sorted(line.split()[0] for line in table[1:]) == ["alice", "bob"]

        with pytest.raises(poplib.error_proto):
            _login_wrong(srv.port)
        # A child's counts are its own: stats adds up both processes.
        deadline = time.monotonic() + 10
        while True:
            text = control.stats(path)
            if _logins(text, "ok") == logins and _logins(text, "failed") == 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert re.search(r"^pop3srv_processes 2$", text, re.MULTILINE), text
    finally:
        alice.quit()
        if bob is not None:
            bob.quit()
    deadline = time.monotonic() + 10
    while control.who(path):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    srv.stop()
    assert not os.path.exists(path), "the socket is removed when the server stops"


def _login_wrong(port: int) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user("alice")
        client.pass_("not alice's password")
    finally:
        client.close()


def test_no_control_socket(live_server: Callable[..., Pop3Server], short_dir: Path) -> None:
    """--control-socket none makes no socket; a bad path stops start-up in one line."""
    srv = live_server("--control-socket", "none")
    assert srv.process is not None
    srv.stop()
    bad = short_dir / "missing" / "control"
    with pytest.raises(RuntimeError, match=rf"control socket {bad}: No such file or directory"):
        live_server("--control-socket", str(bad))
