"""
Real neighbouring servers for the tests: Debian's daemons (Redis, and any
other a test needs) started on free loopback ports in a test's temporary
directory, never the system service.

  - L{free_port}: a TCP port on 127.0.0.1 that nothing listens on;
  - L{require_binary}: the path of a program, or skip the test saying
    which is missing;
  - L{Neighbour}: one daemon in the foreground, with L{Neighbour.start},
    L{Neighbour.stop} (and start again: an outage and its end),
    L{Neighbour.pause} and L{Neighbour.resume} (SIGSTOP/SIGCONT: a server
    that holds its connections and answers nothing);
  - L{RedisServer}: C{redis-server} without persistence, with
    L{RedisServer.url} for C{--counters} and a blocking
    L{RedisServer.command} to look at what the code under test stored.

Every wait is bounded; a daemon that does not come up fails the test with
the end of its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

#: Seconds a daemon has to start answering, or to exit when told.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on now (the kernel's
    choice; another process could take it before the daemon does, which on
    a test machine does not happen in practice).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_binary(name: str, *extra_dirs: str) -> str:
    """
    The path of the program C{name} (looked up on C{PATH}, then in
    C{extra_dirs} and C{/usr/sbin}, where Debian puts daemons); skips the
    calling test, naming the program and its Debian package's usual name,
    if it is not installed.
    """
    found = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join((*extra_dirs, "/usr/sbin", "/sbin"))
    )
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {name.split('-')[0]}; .ci/run does)")
    return found


class Neighbour:
    """
    A daemon run in the foreground by the tests, logging to a file in its
    directory, listening on L{port} of 127.0.0.1.

    Subclasses give the command line (L{argv}) and may refine how readiness
    is checked (L{answers}).

    @ivar directory: where it runs and logs; created if missing.
    @ivar port: the TCP port it listens on, the same across restarts.
    @ivar log: its output.
    """

    #: The name used in messages and for the log file.
    name = "daemon"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.log = self.directory / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The command line that runs the daemon in the foreground."""
        raise NotImplementedError

    def answers(self) -> bool:
        """Whether the daemon serves now (by default: its port takes a connection)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the daemon and wait until it answers (at most L{START_TIMEOUT} s)."""
        assert not self.running, f"{self.name} is already running"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.name} did not start; its log ends:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL), if it runs; wait for its exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # A paused process would not act on SIGTERM.
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """Freeze the daemon (SIGSTOP): connections stay open, nothing is answered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused daemon go on (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        """The last C{lines} lines of the daemon's log."""
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class RedisError(Exception):
    """An error reply from Redis to L{RedisServer.command}."""


class RedisServer(Neighbour):
    """
    C{redis-server} on 127.0.0.1, its data in memory only (a restart starts
    empty, as after a crash of a Redis without persistence).
    """

    name = "redis-server"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = require_binary("redis-server")
        super().__init__(directory, port)

    @property
    def url(self) -> str:
        """The C{--counters} value for this server's database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]  # fmt: skip

    def answers(self) -> bool:
        try:
            return self.command("PING", timeout=1.0) == "PONG"
        except (OSError, RedisError):
            # Refused, or still loading ("-LOADING").
            return False

    def command(self, *args: str | bytes | int | float, db: int = 0, timeout: float = 5.0) -> Any:
        """
        Send one command to database C{db} on a new connection and return
        the reply: C{str} for a status or bulk string (bytes if it is not
        UTF-8), C{int}, C{None}, or a list of these.

        @raise RedisError: for an error reply.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            reader = s.makefile("rb")
            if db:
                s.sendall(_request("SELECT", db))
                _read_reply(reader)
            s.sendall(_request(*args))
            return _read_reply(reader)


def _request(*args: str | bytes | int | float) -> bytes:
    """A command in RESP, as clients send it."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"".join(
        [f"*{len(parts)}\r\n".encode()] + [b"$%d\r\n%s\r\n" % (len(p), p) for p in parts]
    )


def _read_reply(reader: Any) -> Any:
    """One RESP2 reply from C{reader}."""
    line: bytes = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed in the middle of a reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)[:-2]
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise OSError(f"not a RESP reply: {line!r}")
