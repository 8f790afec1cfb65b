"""
Run the real C{twistd pop3srv} process for integration tests, on a free
loopback port, with a user file and mbox files in a temporary directory.
"""

from __future__ import annotations

import mailbox
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from passlib.hash import sha512_crypt

TWISTD = str(Path(sys.executable).with_name("twistd"))
PASSWORDS = {"alice": "alice-pw", "bob": "bob pw with spaces"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_users(path: Path) -> None:
    """A Dovecot-style user file with cheap SHA512-CRYPT hashes."""
    lines = ["# test users\n"]
    for name, password in PASSWORDS.items():
        lines.append(f"{name}:{{SHA512-CRYPT}}{sha512_crypt.using(rounds=1000).hash(password)}::\n")
    path.write_text("".join(lines))


def write_mbox(path: Path, messages: list[bytes]) -> None:
    """Write C{messages} to an mbox file the way Python's mailbox module does."""
    box = mailbox.mbox(str(path))
    box.lock()
    try:
        for message in messages:
            box.add(message)
        box.flush()
    finally:
        box.unlock()
        box.close()


class Pop3Server:
    """One C{twistd -n pop3srv} process."""

    def __init__(self, root: Path, *extra: str, quick_failures: bool = True) -> None:
        self.root = root
        self.mail = root / "mail"
        self.mail.mkdir(exist_ok=True)
        self.users = root / "users"
        if not self.users.exists():
            write_users(self.users)
        self.log = root / "twistd.log"
        self.port = free_port()
        # Tests that are not about the failure delay should not wait for it.
        quick = ["--failure-delay", "0.05", "--max-failure-delay", "0.2"]
        # One process unless a test asks for more: these tests count limits
        # and kill "the server", which --workers N would split over processes.
        single = [] if any(a.startswith("--workers") for a in extra) else ["--workers", "1"]
        self.extra = (quick if quick_failures else []) + single + list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log}",
            "pop3srv",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--auth",
            f"passlib:{self.users}",
            "--mailbox",
            f"{self.mail}/{{user}}",
            *self.extra,
        ]

    def start(self) -> Pop3Server:
        self.process = subprocess.Popen(
            self.argv(), cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                raise RuntimeError(f"pop3srv exited: {output!r} {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(100)
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pop3srv did not start: {self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        self.process = None

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()
        self.process = None

    def restart(self) -> Pop3Server:
        self.stop()
        self.port = free_port()
        return self.start()


def attempt(
    srv: Pop3Server,
    user: str,
    password: str,
    source: str = "127.0.0.1",
    timeout: float = 30,
) -> bytes:
    """One USER/PASS attempt on a fresh connection from C{source}; the PASS reply."""
    with socket.create_connection(
        ("127.0.0.1", srv.port), timeout=timeout, source_address=(source, 0)
    ) as s:
        f = s.makefile("rwb")
        f.readline()
        f.write(f"USER {user}\r\nPASS {password}\r\n".encode())
        f.flush()
        f.readline()
        reply = f.readline()
        f.write(b"QUIT\r\n")
        f.flush()
        return reply
