"""
Tests for starting and stopping the real C{twistd pop3srv}: start-up
errors in one line (also as a daemon), listeners sized for bursts and on
IPv4 and IPv6, and a stop that ends every process cleanly.
"""

from __future__ import annotations

import os
import poplib
import resource
import selectors
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from livepop3 import PASSWORDS, TWISTD, Pop3Server, write_mbox
from test_workers import alive, children, descendants, wait_for
from twisted.internet.testing import MemoryReactor

from pop3srv.app import tap
from pop3srv.app.config import MIN_BACKLOG, listen_backlog, with_backlog
from pop3srv.app.tap import Options, makeService


def run_twistd(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, *argv], capture_output=True, text=True, timeout=timeout)


def test_daemon_with_a_busy_port_exits_at_once_with_one_line(tmp_path: Path) -> None:
    """
    Without -n, twistd becomes a daemon before the services start: a port
    in use must still end start-up in one line on stderr, non-zero, fast.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_twistd(
            f"--pidfile={tmp_path}/pid",
            f"--logfile={tmp_path}/log",
            "pop3srv",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--auth",
            "memory:a:b",
            "--workers",
            "1",
            timeout=15,
        )
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith(f"twistd pop3srv: Couldn't listen on 127.0.0.1:{port}")
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "pid").exists()


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("tcp:99999", "port 99999 is out of range (0 to 65535)"),
        ("unix:/missing/dir/pop3.sock", "directory /missing/dir does not exist"),
        ("tcp:110:interface=::", "tcp6:110:interface=2001\\:db8\\:\\:1"),
        ("tcp", "expected e.g. tcp:110"),
    ],
)
def test_every_endpoint_mistake_is_one_line(endpoint: str, message: str) -> None:
    """A bad --listen is one line naming it, with the right form where it is syntax."""
    result = run_twistd("--nodaemon", "--pidfile=", "pop3srv", "--listen", endpoint,
                        "--auth", "memory:a:b")  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.startswith(f"twistd pop3srv: --listen: bad endpoint {endpoint!r}: "), output
    assert message in output
    assert output.count("\n") == 1, output


def test_the_ipv6_form_of_the_readme_parses() -> None:
    """tcp6 with an escaped :: is an IPv6 endpoint on every address."""
    options = Options()
    options.parseOptions(["--auth", "memory:a:b", "--listen", "tcp6:110:interface=\\:\\:"])
    assert options["listen"] == ["tcp6:110:interface=\\:\\:"]


def test_listeners_get_a_burst_sized_backlog(tmp_path: Path) -> None:
    """Every listener without a backlog= gets at least 511 (or somaxconn)."""
    assert listen_backlog(str(tmp_path / "missing")) == MIN_BACKLOG == 511
    (tmp_path / "somaxconn").write_text("4096\n")
    assert listen_backlog(str(tmp_path / "somaxconn")) == 4096
    assert with_backlog("tcp:1:backlog=7", 600) == "tcp:1:backlog=7"
    assert with_backlog("systemd:domain=INET:index=0", 600) == "systemd:domain=INET:index=0"
    options = Options()
    options.parseOptions(["--auth", "memory:a:b", "--workers", "1",
                          "--listen", "tcp:1110:interface=127.0.0.1",
                          "--listen", "tcp:1111:interface=127.0.0.1:backlog=64"])  # fmt: skip
    reactor = MemoryReactor()
    makeService(options, reactor=reactor)
    backlogs = [backlog for _, _, backlog, _ in reactor.tcpServers]
    assert backlogs == [listen_backlog(), 64]
    assert backlogs[0] >= 511


def test_default_port_serves_ipv4_and_ipv6(tmp_path: Path) -> None:
    """tcp:PORT with no interface takes IPv4 and IPv6 clients, each seen as itself."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 on this host")
    srv = Pop3Server(tmp_path)
    port = srv.port
    srv.argv = lambda: [  # type: ignore[method-assign]
        TWISTD, "--nodaemon", "--pidfile=", f"--logfile={srv.log}", "pop3srv",
        "--listen", f"tcp:{port}", "--auth", f"passlib:{srv.users}",
        "--mailbox", f"{srv.mail}/{{user}}", *srv.extra,
    ]  # fmt: skip
    srv.start()
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s:
                s.settimeout(10)
                s.connect((host, port))
                assert s.recv(100).startswith(b"+OK")
        deadline = time.monotonic() + 10
        while "::ffff:" not in srv.log_text() and time.monotonic() < deadline:
            if "connect" in srv.log_text() and "::1" in srv.log_text():
                break
            time.sleep(0.05)
        assert "::ffff:" not in srv.log_text()
    finally:
        srv.stop()


def test_a_burst_of_500_connections_is_answered(live_server: object, tmp_path: Path) -> None:
    """
    500 connections opened at once from one address: each gets a greeting or
    an -ERR within 10 s, none is left waiting.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    srv = live_server()  # type: ignore[operator]
    count = 500
    selector = selectors.DefaultSelector()
    sockets = []
    answers: dict[int, bytes] = {}
    try:
        for i in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", srv.port))
            selector.register(s, selectors.EVENT_READ, i)
            sockets.append(s)
        deadline = time.monotonic() + 10
        while len(answers) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(200)  # type: ignore[union-attr]
                except OSError as e:
                    data = f"error {e.errno}".encode()
                answers[key.data] = data
                selector.unregister(key.fileobj)
    finally:
        for s in sockets:
            s.close()
        selector.close()
    waiting = count - len(answers)
    assert waiting == 0, f"{waiting} connections got nothing within 10 s"
    kinds = {a.split(b" ", 1)[0] for a in answers.values()}
    assert kinds <= {b"+OK", b"-ERR"}, kinds
    assert sum(a.startswith(b"+OK") for a in answers.values()) >= 1


def test_sigterm_stops_every_process_cleanly(tmp_path: Path) -> None:
    """
    SIGTERM (to the parent, then to every process as systemd does) stops
    the parent, its worker and every hashing process, with exit status 0
    and nothing but info in the log.
    """
    srv = Pop3Server(tmp_path, "--workers", "2")
    for name in PASSWORDS:
        write_mbox(srv.mail / name, [b"Subject: hello\n\nmessage\n"])
    srv.start()
    assert srv.process is not None
    parent = srv.process.pid
    try:
        assert wait_for(lambda: len(children(parent)) == 1)
        assert wait_for(lambda: len(descendants(parent)) >= 3)
        sessions = []
        for user in PASSWORDS:
            client = poplib.POP3("127.0.0.1", srv.port, timeout=20)
            client.user(user)
            client.pass_(PASSWORDS[user])
            sessions.append(client)
        tree = descendants(parent)
        # As systemd does (KillMode=control-group): every process at once.
        for pid in [parent, *tree]:
            os.kill(pid, signal.SIGTERM)
        assert srv.process.wait(30) == 0
        assert wait_for(lambda: not any(alive(p) for p in tree), 30)
    finally:
        srv.stop()
    log = srv.log_text()
    for bad in ("Traceback", "[ERROR]", "#error]", "#critical]", "died", "Unhandled"):
        assert bad not in log, log
    assert "restarting it" not in log


def test_stop_waits_for_a_commit_in_progress() -> None:
    """A stop closes the ports, then waits for commits, at most DRAIN_TIMEOUT seconds."""
    from twisted.internet.defer import Deferred
    from twisted.internet.testing import MemoryReactorClock

    options = Options()
    options.parseOptions(["--auth", "memory:a:b", "--workers", "1", "--hash-workers", "0",
                          "--listen", "tcp:1110:interface=127.0.0.1"])  # fmt: skip
    for never_done in (False, True):
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        assert top.factory is not None
        commit: Deferred[None] = Deferred()
        top.factory.commits.add(commit)
        stopped: list[object] = []
        top.stopService().addBoth(stopped.append)
        (listener,) = [c for c in top if isinstance(c, tap.ListeningService)]
        assert listener.port is None  # it stopped accepting first
        reactor.advance(tap.DRAIN_TIMEOUT - 1)
        assert stopped == []
        if never_done:
            reactor.advance(1.1)
        else:
            top.factory.commits.discard(commit)
            reactor.advance(0.1)
        assert len(stopped) == 1
