"""
Abuse resistance against the real C{twistd pop3srv} process on loopback:
failure delay (not blocking others), lockout and its expiry, connection
limits, allow/deny rules, bad-command disconnect, the audit log and the
fail2ban filter.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import poplib
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import Authority
from livepop3 import PASSWORDS, Pop3Server, attempt, free_port

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "pop3srv.conf"


@pytest.fixture
def start(live_server: Callable[..., Pop3Server]) -> Callable[..., Pop3Server]:
    """Start a server with a small mbox for alice: C{start(*extra, quick_failures=True)}."""

    def start_(*extra: str, quick_failures: bool = True) -> Pop3Server:
        return live_server(
            *extra, quick_failures=quick_failures, mail={"alice": [b"Subject: hi\n\nhello\n"]}
        )

    return start_



def test_failure_delay_does_not_block_other_sessions(start: Callable[..., Pop3Server]) -> None:
    """A failed login waits about 1 s; meanwhile a logged-in session's NOOP is answered."""
    srv = start("--failure-delay", "1", quick_failures=False)
    try:
        honest = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        honest.user("alice")
        honest.pass_(PASSWORDS["alice"])
        noop_times: list[float] = []

        def noops() -> None:
            for _ in range(5):
                started = time.monotonic()
                honest.noop()
                noop_times.append(time.monotonic() - started)
                time.sleep(0.1)

        started = time.monotonic()
        worker = threading.Thread(target=noops)
        worker.start()
        reply = attempt(srv, "alice", "wrong")
        elapsed = time.monotonic() - started
        worker.join(30)
        assert reply == b"-ERR [AUTH] Invalid username or password.\r\n"
        assert elapsed >= 0.95
        assert len(noop_times) == 5 and max(noop_times) < 0.5
        honest.quit()
    finally:
        srv.stop()


def test_lockout_and_expiry(start: Callable[..., Pop3Server]) -> None:
    """After 2 failures the right password is refused until the 2 s lockout ends."""
    srv = start("--user-failure-limit", "2", "--lockout", "2")
    try:
        assert attempt(srv, "alice", "wrong1").startswith(b"-ERR [AUTH]")
        assert attempt(srv, "alice", "wrong2").startswith(b"-ERR [AUTH]")
        assert attempt(srv, "alice", PASSWORDS["alice"]).startswith(b"-ERR [AUTH]")
        deadline = time.monotonic() + 10
        while not attempt(srv, "alice", PASSWORDS["alice"]).startswith(b"+OK"):
            assert time.monotonic() < deadline, "lockout never expired"
            time.sleep(0.5)
        log = srv.log_text()
        assert "event=lockout" in log and "reason=locked-out-address+user" in log
    finally:
        srv.stop()


def test_connection_limit_per_address(start: Callable[..., Pop3Server]) -> None:
    """The third connection from one address is refused with [SYS/TEMP]."""
    srv = start("--max-connections-per-address", "2")
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
        for s in held:
            assert s.recv(100).startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as third:
            assert third.recv(100) == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
            assert third.recv(100) == b""
        for s in held:
            s.close()
        assert "reason=max-connections-per-address" in srv.log_text()
    finally:
        srv.stop()


def test_allow_and_deny_rules(start: Callable[..., Pop3Server]) -> None:
    """With 127.0.0.2 denied inside an allowed 127.0.0.0/8, only 127.0.0.2 is refused."""
    srv = start("--allow", "127.0.0.0/8", "--deny", "127.0.0.2/32")
    try:
        for source, expected in [("127.0.0.1", b"+OK"), ("127.0.0.3", b"+OK"),
                                 ("127.0.0.2", b"-ERR [SYS/PERM] Access denied.")]:  # fmt: skip
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                          source_address=(source, 0)) as s:  # fmt: skip
                assert s.recv(100).startswith(expected), source
    finally:
        srv.stop()


def test_bad_commands_disconnect(start: Callable[..., Pop3Server]) -> None:
    """Ten bad commands in a row end the connection."""
    srv = start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.recv(100)
            s.sendall(b"HELO\r\n" * 12)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.count(b"-ERR Unknown command.") == 10
        assert data.endswith(b"-ERR Too many bad commands; closing.\r\n")
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed")
def test_audit_log_matches_fail2ban_filter_and_hides_passwords(
    start: Callable[..., Pop3Server],
) -> None:
    """fail2ban-regex finds each failed login in the real log with the right address."""
    srv = start("--deny", "127.0.0.9/32")
    try:
        for source, user in [("127.0.0.5", "alice"), ("127.0.0.5", "nobody"),
                             ("127.0.0.6", 'evil"peer=10.9.9.9')]:  # fmt: skip
            assert attempt(srv, user, "Sekr1t-guess", source).startswith(b"-ERR [AUTH]")
        assert attempt(srv, "alice", PASSWORDS["alice"]).startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                      source_address=("127.0.0.9", 0)) as s:  # fmt: skip
            s.recv(100)
    finally:
        srv.stop()
    log = srv.log_text()
    assert "Sekr1t-guess" not in log and PASSWORDS["alice"] not in log
    assert re.search(r'event=login-ok session=\S+ peer=127\.0\.0\.1 user="alice"', log)
    result = subprocess.run(
        ["fail2ban-regex", "--print-all-matched", str(srv.log), str(FILTER)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"Failregex: 4 total", result.stdout), result.stdout
    matched_part = result.stdout.split("Matched line(s):")[1].split("Missed line(s):")[0]
    matched = re.findall(r"session=\S+ peer=(\S+) ", matched_part)
    assert sorted(set(matched)) == ["127.0.0.5", "127.0.0.6", "127.0.0.9"]


TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


def greeted(srv: Pop3Server) -> bytes:
    """The first line a new plain connection gets."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        return s.makefile("rb").readline()


def pipeline_without_reading(sock: socket.socket, seconds: float = 5.0) -> int:
    """
    Send CAPA after CAPA and read nothing, until the server stops taking
    them (its output is backed up) or C{seconds} pass; return the bytes sent.
    """
    sock.setblocking(False)
    burst = b"CAPA\r\n" * 10_000
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(burst)
        except BlockingIOError:
            if not select.select([], [sock], [], 0.5)[1]:
                break
        except ConnectionError:
            break
    return sent


def test_timeouts_free_the_slots_of_peers_that_never_read_or_handshake(
    start: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    Issue 12: with --max-connections 6 and --auth-timeout 2, two clients
    that send STLS and never handshake, two that connect to the implicit-TLS
    port and say nothing, and two that pipeline CAPA without reading (with
    a small receive buffer, so the server's output backs up) take every
    slot.  The login timeout closes them and, as none takes its last output,
    aborts them after the grace (5 s): a new client is greeted again within
    2 + 5 s and a margin, where before their slots were held for ever.
    """
    cert, key = Authority.create().issue(tmp_path, "server", serial=4242)
    tls_port = free_port()
    srv = start(
        "--max-connections", "6", "--auth-timeout", "2",
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--listen-tls", f"tcp:{tls_port}:interface=127.0.0.1",
    )  # fmt: skip
    held: list[socket.socket] = []
    try:
        # The server's start-up probe may still hold a slot for a moment.
        deadline = time.monotonic() + 5
        while greeted(srv) == TOO_MANY:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            held.append(s)
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK POP3 server ready")
            s.sendall(b"STLS\r\n")
            assert f.readline() == b"+OK Begin TLS negotiation.\r\n"
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", srv.port))
            held.append(s)
            assert s.recv(100).startswith(b"+OK POP3 server ready")
            assert pipeline_without_reading(s) > 64 * 1024
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", tls_port), timeout=10))
        last = time.monotonic()
        assert greeted(srv) == TOO_MANY
        while (line := greeted(srv)) == TOO_MANY:
            assert time.monotonic() - last < 2 + 5 + 4, "slots still held"
            time.sleep(0.25)
        assert line.startswith(b"+OK POP3 server ready")
        # Every slot comes back, not just one.
        deadline = time.monotonic() + 5
        while len(held) < 12:
            assert time.monotonic() < deadline, "some slots still held"
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if s.makefile("rb").readline().startswith(b"+OK"):
                held.append(s)
            else:
                s.close()
                time.sleep(0.1)
    finally:
        for s in held:
            s.close()
    log = srv.log_text()
    assert log.count("reason=auth-timeout") >= 6
    assert "did not take its last output in time; aborting" in log


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed")
def test_fail2ban_filter_matches_client_failures_never_server_faults(tmp_path: Path) -> None:
    """
    The filter bans for every failure that is the client's (wrong password,
    a SASL exchange failed on its credentials, a refusal during a lockout)
    and never for a server fault (reason=error).
    """
    stamp = "2026-11-26T07:18:37+0000 [pop3srv.audit#info] pop3srv-audit"
    client_failures = [
        'event=login-failed session=1-1 peer=192.0.2.1 user="a" reason=bad-credentials',
        'event=login-failed session=1-2 peer=192.0.2.2 user="a" reason=authzid-refused',
        'event=login-failed session=1-3 peer=192.0.2.3 user="a" reason=empty-password',
        'event=login-failed session=1-4 peer=192.0.2.4 user="a" reason=channel-binding-mismatch',
        'event=login-refused session=1-5 peer=192.0.2.5 user="a" reason=locked-out-address',
        'event=login-refused session=1-6 peer=192.0.2.6 user="a" reason=locked-out-address+user',
    ]
    faults = [
        'event=login-refused session=1-7 peer=198.51.100.1 user="a" reason=error',
        'event=login-refused session=1-8 peer=198.51.100.2 user="a" reason=server-busy',
    ]
    log = tmp_path / "audit.log"
    log.write_text("".join(f"{stamp} {line}\n" for line in client_failures + faults))
    result = subprocess.run(
        ["fail2ban-regex", "--print-all-matched", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    matched_part = result.stdout.split("Matched line(s):")[1].split("Missed line(s):")[0]
    matched = sorted(set(re.findall(r"session=\S+ peer=(\S+) ", matched_part)))
    assert matched == [f"192.0.2.{n}" for n in range(1, 7)], result.stdout
