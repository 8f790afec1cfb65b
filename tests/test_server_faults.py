"""
Server faults against the real C{twistd pop3srv} process (issue 13 item 4):
a hashing process killed during a correct login, and a user file that
cannot be read.  A fault answers C{-ERR [SYS/TEMP]}, is audited as
C{reason=error}, counts towards no lockout, and the next login of that user
from that address succeeds.  Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from livepop3 import PASSWORDS, Pop3Server, attempt
from passlib.hash import sha512_crypt

from pop3srv.auth.hashpolicy import verify_hash

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "pop3srv.conf"
MAIL = {"alice": [b"Subject: hi\n\nhello\n"]}

T = TypeVar("T")



def processes() -> dict[int, tuple[str, int, int]]:
    """
    @return: every process's name (C{comm}), parent and CPU time in clock
        ticks, by pid.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        # The name is between the first "(" and the last ")", and may hold either.
        name = data[data.index("(") + 1 : data.rindex(")")]
        fields = data[data.rindex(")") + 2 :].split()
        found[int(entry)] = (name, int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def hashing_processes(root: int) -> dict[int, int]:
    """
    @param root: the server's pid.
    @return: the CPU time of each C{pop3srv-hash} process below C{root}, by pid.
    """
    table = processes()
    below = {root}
    grew = True
    while grew:
        more = {pid for pid, (_, ppid, _) in table.items() if ppid in below} - below
        grew = bool(more)
        below |= more
    return {pid: table[pid][2] for pid in below if table.get(pid, ("",))[0] == "pop3srv-hash"}


def wait_for(what: str, probe: Callable[[], T], seconds: float = 15) -> T:
    """Poll C{probe} until it returns something true, for at most C{seconds}."""
    deadline = time.monotonic() + seconds
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def costly_hash(password: str, seconds: float = 1.5) -> str:
    """
    A SHA512-CRYPT hash of C{password} whose check, by the server's own
    verification, takes about C{seconds} here: long enough to kill the
    hashing process in the middle of it.
    """
    probe_rounds = 100_000
    probe = sha512_crypt.using(rounds=probe_rounds).hash(password)
    started = time.monotonic()
    assert verify_hash(password, probe)
    per_round = max(1e-9, (time.monotonic() - started) / probe_rounds)
    rounds = min(50_000_000, max(probe_rounds, int(seconds / per_round)))
    return str(sha512_crypt.using(rounds=rounds).hash(password))


def fail2ban_matches(log: Path) -> int:
    """How many lines of C{log} the shipped fail2ban filter matches."""
    result = subprocess.run(
        ["fail2ban-regex", str(log), str(FILTER)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = re.search(r"Failregex: (\d+) total", result.stdout)
    assert found, result.stdout
    return int(found.group(1))


@pytest.mark.parametrize(
    "pool",
    [
        pytest.param(("--hash-workers", "1"), id="per-process"),
        pytest.param(
            ("--workers", "2", "--hash-pool", "shared", "--hash-workers", "1"), id="shared"
        ),
    ],
)
def test_hashing_process_killed_during_a_correct_login(
    live_server: Callable[..., Pop3Server], tmp_path: Path, pool: tuple[str, ...]
) -> None:
    """
    SIGKILL to the hashing process while it checks alice's correct
    password: the client gets C{-ERR [SYS/TEMP]}, the audit log says
    C{reason=error} (which the fail2ban filter does not match), nothing is
    counted (with a limit of one failure, a counted one would lock alice
    out), and her next login from the same address succeeds on the hashing
    process that replaced the killed one.
    """
    password = PASSWORDS["alice"]
    (tmp_path / "users").write_text(f"alice:{{SHA512-CRYPT}}{costly_hash(password)}::\n")
    srv = live_server(*pool, "--user-failure-limit", "1", "--address-failure-limit", "1", mail=MAIL)
    assert srv.process is not None
    server_pid = srv.process.pid
    [(victim, cpu)] = wait_for(
        "the hashing process", lambda: list(hashing_processes(server_pid).items())
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"+OK")
        f.write(f"USER alice\r\nPASS {password}\r\n".encode())
        f.flush()
        assert f.readline().startswith(b"+OK")
        # Checking: it has used CPU since it sat idle (20 ms or more).
        wait_for(
            "the check to start",
            lambda: hashing_processes(server_pid).get(victim, cpu) >= cpu + 2,
        )
        os.kill(victim, signal.SIGKILL)
        assert f.readline().startswith(b"-ERR [SYS/TEMP] ")
    assert attempt(srv, "alice", password).startswith(b"+OK")
    assert victim not in hashing_processes(server_pid)
    srv.stop()
    log = srv.log_text()
    assert re.search(
        r'event=login-refused session=\S+ peer=127\.0\.0\.1 user="alice" reason=error', log
    )
    assert re.search(r'event=login-ok session=\S+ peer=127\.0\.0\.1 user="alice"', log)
    assert "reason=bad-credentials" not in log and "event=lockout" not in log
    assert "A password-hashing process died; starting a new one" in log
    if shutil.which("fail2ban-regex") is not None:
        assert fail2ban_matches(srv.log) == 0


def test_user_file_unreadable_after_start_keeps_logins_working(
    live_server: Callable[..., Pop3Server],
) -> None:
    """
    A user file replaced after start by a FIFO, then by a directory: each
    server process (and hashing process) goes on with the user list it read
    last, so the right password still logs in, promptly (a FIFO once
    blocked the hashing process until its 60 s timeout, and the server's
    own re-read for good), nothing is audited as a wrong password, and the
    error is logged.  Once a file is back it is read: a password changed
    in it logs in.
    """
    srv = live_server("--hash-workers", "1", mail=MAIL)
    password = PASSWORDS["alice"]
    assert attempt(srv, "alice", password).startswith(b"+OK")
    srv.users.unlink()
    os.mkfifo(srv.users)
    assert attempt(srv, "alice", password, timeout=15).startswith(b"+OK")
    srv.users.unlink()
    srv.users.mkdir()
    assert attempt(srv, "alice", password, timeout=15).startswith(b"+OK")
    srv.users.rmdir()
    srv.users.write_text(f"alice:{{SHA512-CRYPT}}{sha512_crypt.using(rounds=1000).hash('new')}::\n")
    assert attempt(srv, "alice", "new", timeout=15).startswith(b"+OK")
    srv.stop()
    log = srv.log_text()
    assert f"{srv.users}: Not a regular file; still using the user list read earlier" in log
    assert f"{srv.users}: Is a directory; still using the user list read earlier" in log
    assert "reason=bad-credentials" not in log and "reason=error" not in log
    assert log.count("event=login-ok") == 4


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_user_file_unreadable_at_start_is_one_line(tmp_path: Path, kind: str) -> None:
    """
    A user file that cannot be read when the server starts stops it at
    once with one line naming the file and the reason (a FIFO once hung
    start-up until something wrote to it).
    """
    users = tmp_path / "users"
    if kind == "fifo":
        os.mkfifo(users)
    else:
        users.mkdir()
    srv = Pop3Server(tmp_path)
    started = time.monotonic()
    try:
        result = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit")
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    reason = "Not a regular file" if kind == "fifo" else "Is a directory"
    assert f"{users}: {reason}" in result.stdout + result.stderr
