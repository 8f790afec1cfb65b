"""
Tests for C{--workers}: the real C{twistd pop3srv} with child server
processes on loopback (L{pop3srv.processes.supervisor}).
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livepop3 import PASSWORDS, Pop3Server, write_mbox
from twisted.application import service
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from pop3srv.app.logs import LogControl
from pop3srv.processes import supervisor as workers


def children(pid: int) -> list[int]:
    """The direct children of C{pid} that are pop3srv server processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/comm", "rb") as f:
                name = f.read().strip()
        except (OSError, IndexError, ValueError):
            continue
        # A worker is a fork of the parent, named as such.
        if ppid == pid and name == b"pop3srv-worker":
            found.append(int(entry))
    return found


def descendants(pid: int) -> set[int]:
    """Every process below C{pid} (children, hashing processes, fork servers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    for _ in range(10):  # the tree is a few levels deep
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_name(pid: int) -> str:
    """What C{ps} shows as the process's name."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def wait_for(condition: object, timeout: float = 20.0) -> bool:
    """Poll C{condition()} every 50 ms for at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def session_pids(log: str, event: str) -> set[str]:
    """The pid parts (hex) of the session ids of audit lines for C{event}."""
    return set(re.findall(rf"event={event} session=([0-9a-f]+)-\d+", log))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Pop3Server]:
    """A pop3srv with two server processes and mail for alice and bob."""
    srv = Pop3Server(tmp_path, "--workers", "2")
    for name in PASSWORDS:
        write_mbox(srv.mail / name, [b"Subject: hello\n\nmessage for %s\n" % name.encode()])
    srv.start()
    assert srv.process is not None
    # The child adopts the socket a moment after the parent listens.
    assert wait_for(lambda: len(children(srv.process.pid)) == 1)
    yield srv
    srv.stop()


def login(srv: Pop3Server, user: str) -> poplib.POP3:
    """A logged-in session."""
    client = poplib.POP3("127.0.0.1", srv.port, timeout=20)
    client.user(user)
    client.pass_(PASSWORDS[user])
    return client


def test_both_processes_serve(server: Pop3Server) -> None:
    """Sessions are served by both processes (the pid is in each session id)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        # Two at once (one per user: a maildrop takes one session).
        clients = [login(server, user) for user in PASSWORDS]
        for c, user in zip(clients, PASSWORDS, strict=True):
            body = b"Subject: hello\r\n\r\nmessage for %s\r\n" % user.encode()
            assert c.stat() == (1, len(body))
        for c in clients:
            c.quit()
        seen = session_pids(server.log_text(), "login-ok")
    assert server.process is not None
    expected = {f"{server.process.pid:x}"} | {f"{p:x}" for p in children(server.process.pid)}
    assert seen == expected
    # The child said it serves, so the parent's start-up deadline was called off.
    (child,) = children(server.process.pid)
    assert f"Server process {child} is serving" in server.log_text()
    assert "did not start serving" not in server.log_text()


def test_each_server_process_has_its_hashing_pool(server: Pop3Server) -> None:
    """By default each server process forks its own hashing processes."""
    assert server.process is not None
    parent = server.process.pid
    (child,) = children(parent)
    expected = ["pop3srv-hash"] * max(1, (os.cpu_count() or 1) // 2)

    def pools() -> list[list[str]]:
        own = descendants(parent) - {child} - descendants(child)
        return [sorted(process_name(p) for p in below) for below in (own, descendants(child))]

    # The child forks its hashing processes as it starts.
    assert wait_for(lambda: pools() == [expected, expected]), pools()


def test_one_hashing_pool_for_all_processes(tmp_path: Path) -> None:
    """
    With --hash-pool shared the hashing processes (one per CPU) are the
    parent's; the child has none and its logins are checked by them.
    """
    srv = Pop3Server(tmp_path, "--workers", "2", "--hash-pool", "shared")
    write_mbox(srv.mail / "bob", [b"Subject: hello\n\nmessage for bob\n"])
    srv.start()
    try:
        assert srv.process is not None
        parent = srv.process.pid
        assert wait_for(lambda: len(children(parent)) == 1)
        (child,) = children(parent)
        below_parent = descendants(parent) - {child}
        assert sorted(process_name(p) for p in below_parent) == ["pop3srv-hash"] * (
            os.cpu_count() or 1
        )
        assert descendants(child) == set()
        deadline = time.monotonic() + 20
        while f"{child:x}" not in session_pids(srv.log_text(), "login-ok"):
            assert time.monotonic() < deadline, "no login on the child"
            login(srv, "bob").quit()
    finally:
        srv.stop()


def test_in_use_across_processes(server: Pop3Server) -> None:
    """A maildrop locked by a session in one process is [IN-USE] in the other."""
    holder = login(server, "alice")
    # A child's log lines reach the parent's log a moment later.
    assert wait_for(lambda: session_pids(server.log_text(), "login-ok"))
    (holder_pid,) = session_pids(server.log_text(), "login-ok")
    refused_by: set[str] = set()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            client = poplib.POP3("127.0.0.1", server.port, timeout=20)
            client.user("alice")
            with pytest.raises(poplib.error_proto, match=r"IN-USE"):
                client.pass_(PASSWORDS["alice"])
            client.quit()
            refused_by = set(
                re.findall(
                    r"event=login-refused session=([0-9a-f]+)-\d+ .*reason=in-use",
                    server.log_text(),
                )
            )
            if refused_by - {holder_pid}:
                break
    finally:
        holder.quit()
    assert refused_by - {holder_pid}, "no refusal came from the other process"


def test_sigterm_stops_every_process(server: Pop3Server) -> None:
    """SIGTERM to twistd stops it and its children (and their hashing processes)."""
    assert server.process is not None
    parent = server.process.pid
    (child,) = children(parent)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(20)
    assert wait_for(lambda: not alive(child))


def test_children_exit_when_the_parent_is_killed(server: Pop3Server) -> None:
    """
    When the parent dies, even by SIGKILL, every process it started stops by
    itself: the child server and all the hashing processes.
    """
    assert server.process is not None
    (child,) = children(server.process.pid)
    # Wait until the hashing processes of both server processes are up:
    # the child server and one hashing process for each server process.
    assert wait_for(lambda: len(descendants(server.process.pid)) >= 3)  # type: ignore[union-attr]
    tree = descendants(server.process.pid)
    assert sorted(process_name(p) for p in tree) == ["pop3srv-hash"] * 2 + ["pop3srv-worker"]
    assert child in tree
    server.kill()
    assert wait_for(lambda: not any(alive(p) for p in tree)), [p for p in tree if alive(p)]


def test_a_dead_child_is_restarted(server: Pop3Server) -> None:
    """A child that dies is replaced, and the replacement serves."""
    assert server.process is not None
    parent = server.process.pid
    (child,) = children(parent)
    os.kill(child, signal.SIGKILL)
    assert wait_for(lambda: children(parent) not in ([], [child]))
    (replacement,) = children(parent)
    assert replacement != child
    assert "restarting it" in server.log_text()
    # It serves once it has started up and adopted the socket.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        login(server, "bob").quit()
        if f"{replacement:x}" in session_pids(server.log_text(), "login-ok"):
            break
        time.sleep(0.02)
    assert f"{replacement:x}" in session_pids(server.log_text(), "login-ok")


def test_one_worker_starts_no_children(tmp_path: Path) -> None:
    """--workers 1: a single process, as before."""
    srv = Pop3Server(tmp_path, "--workers", "1").start()
    try:
        assert srv.process is not None
        time.sleep(0.5)
        assert children(srv.process.pid) == []
        write_mbox(srv.mail / "bob", [b"Subject: x\n\ny\n"])
        login(srv, "bob").quit()
        assert session_pids(srv.log_text(), "login-ok") == {f"{srv.process.pid:x}"}
    finally:
        srv.stop()


def test_a_child_that_never_serves_is_killed_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A child that has not said it serves within READY_TIMEOUT (as a fork
    hung on a lock another thread held would) is killed and started again.
    """
    monkeypatch.setattr(workers, "READY_TIMEOUT", 0.5)
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.1)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    # No listening sockets, and a service that never gets built (as if
    # the fork hung on a lock).
    supervisor = workers.WorkerSupervisor(reactor, 1, [], lambda *args: time.sleep(60))
    try:
        supervisor.startService()
        first = supervisor.children[1]
        first_pid = first.transport.pid  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (first.ended.called and 1 in supervisor.children):
            reactor.iterate(0.02)  # type: ignore[attr-defined]
            reap(first, *supervisor.children.values())
        assert first.ended.called, "the hung child was not killed"
        assert supervisor.children[1] is not first
        assert not alive(first_pid)
        text = "\n".join(formatEvent(e) for e in events)
        assert f"Server process {first_pid} (worker 1) did not start serving within 0.5 s" in text
    finally:
        globalLogPublisher.removeObserver(events.append)
        stopped = supervisor.stopService()
        done: list[object] = []
        stopped.addBoth(done.append)
        deadline = time.monotonic() + 20
        while not done and time.monotonic() < deadline:
            reactor.iterate(0.02)  # type: ignore[attr-defined]
            reap(*supervisor.children.values())
    assert done, "the child did not stop"


def reap(*children: Any) -> None:
    """
    Without reactor.run() no SIGCHLD handler reaps an exited child: look
    ourselves (Twisted looks only when the child's pipes close, which may
    be a moment before it has exited).
    """
    for child in children:
        if child.transport is not None and child.transport.pid is not None:
            child.transport.reapProcess()


@pytest.mark.parametrize("level", ["warn", "error"])
def test_a_worker_that_logs_only_warnings_still_says_it_serves(
    monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    """
    A worker whose log level drops info events (C{--log-level warn}, or
    error) still tells the parent it serves: it is not killed at the
    start-up deadline, nor its successor after it.
    """
    monkeypatch.setattr(workers, "READY_TIMEOUT", 0.5)
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.1)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    supervisor = workers.WorkerSupervisor(
        reactor,
        1,
        [],
        lambda *args: service.MultiService(),
        log_observer=LogControl(level).worker_observer,
    )
    try:
        supervisor.startService()
        first = supervisor.children[1]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not first.ready:
            reactor.iterate(0.02)  # type: ignore[attr-defined]
        assert first.ready, "the worker did not say it serves"
        # Past the deadline: still the same worker.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            reactor.iterate(0.02)  # type: ignore[attr-defined]
            reap(first)
        assert supervisor.children.get(1) is first and not first.ended.called
        text = "\n".join(formatEvent(e) for e in events)
        assert "did not start serving" not in text
        # The parent's log gets the line, for its own filter to judge.
        assert f"Server process {first.transport.pid} is serving" in text  # type: ignore[union-attr]
    finally:
        globalLogPublisher.removeObserver(events.append)
        stopped = supervisor.stopService()
        done: list[object] = []
        stopped.addBoth(done.append)
        deadline = time.monotonic() + 20
        while not done and time.monotonic() < deadline:
            reactor.iterate(0.02)  # type: ignore[attr-defined]
            reap(*supervisor.children.values())
    assert done, "the child did not stop"


#: Runs C{twistd} with the workers' start-up deadline shortened to the
#: seconds in argv[1], so that a test can outlive it.
SHORT_DEADLINE_TWISTD = """\
import sys
from pop3srv.processes import supervisor
supervisor.READY_TIMEOUT = float(sys.argv.pop(1))
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


class ShortDeadlineServer(Pop3Server):
    """The real C{twistd pop3srv}, whose workers have C{deadline} seconds to serve."""

    def __init__(self, root: Path, deadline: float, *extra: str) -> None:
        super().__init__(root, *extra)
        self.deadline = deadline

    def argv(self) -> list[str]:
        _, *rest = super().argv()
        return [sys.executable, "-c", SHORT_DEADLINE_TWISTD, str(self.deadline), *rest]


def test_workers_at_a_quiet_log_level_are_not_killed(tmp_path: Path) -> None:
    """
    C{twistd pop3srv --workers 2 --log-level warn} keeps its
    worker past the start-up deadline (shortened here to 2 s from 30): the
    worker's word that it serves does not depend on its log level.
    """
    srv = ShortDeadlineServer(tmp_path, 2.0, "--workers", "2", "--log-level", "warn")
    write_mbox(srv.mail / "bob", [b"Subject: hello\n\nmessage for bob\n"])
    srv.start()
    try:
        assert srv.process is not None
        parent = srv.process.pid
        assert wait_for(lambda: len(children(parent)) == 1)
        (child,) = children(parent)
        time.sleep(3.5)
        assert children(parent) == [child]
        log = srv.log_text()
        assert "did not start serving" not in log
        assert "restarting it" not in log
        # Nothing at info passed, the worker's word included.
        assert "is serving" not in log
        login(srv, "bob").quit()
    finally:
        srv.stop()
