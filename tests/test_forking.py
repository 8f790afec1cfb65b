"""
Tests for L{pop3srv.processes.forking}: child processes that are forks of this one.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from pop3srv.processes.forking import ForkedProcess, can_fork_reactor, set_process_name


class Recorder(ProcessProtocol):
    """Collects a child's output and its end."""

    def __init__(self) -> None:
        self.output: dict[int, bytes] = {1: b"", 2: b""}
        self.reason: Failure | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output[childFD] += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason


def run(main: Any) -> Recorder:
    """Fork a child running C{main}; iterate the reactor until it has ended."""
    recorder = Recorder()
    ForkedProcess(reactor, main, recorder, {1: "r", 2: "r"})
    deadline = time.monotonic() + 30
    while recorder.reason is None:
        assert time.monotonic() < deadline, "the child did not end"
        reactor.iterate(0.01)
        # Without reactor.run() no SIGCHLD handler reaps it: look ourselves.
        if recorder.transport.pid is not None:
            recorder.transport.reapProcess()
    return recorder


def test_the_child_runs_the_function_in_a_fork() -> None:
    """The function runs in another process that shares this one's state."""
    marker = f"{os.getpid()}-{id(run)}"

    def main() -> None:
        set_process_name("pop3srv-test")
        with open("/proc/self/comm") as f:
            name = f.read().strip()
        os.write(1, f"{os.getpid()} {marker} {name}".encode())

    recorder = run(main)
    pid, seen, name = recorder.output[1].decode().split()
    assert int(pid) != os.getpid()
    assert seen == marker and name == "pop3srv-test"
    assert recorder.reason is not None and recorder.reason.check(ProcessDone)


def test_the_return_value_is_the_exit_status() -> None:
    reason = run(lambda: 3).reason
    assert reason is not None and reason.check(ProcessTerminated)
    assert reason.value.exitCode == 3


def test_an_exception_is_reported_on_stderr_with_status_1() -> None:
    def main() -> None:
        raise RuntimeError("broken child")

    recorder = run(main)
    reason = recorder.reason
    assert reason is not None and reason.check(ProcessTerminated)
    assert reason.value.exitCode == 1
    assert b"RuntimeError: broken child" in recorder.output[2]


def test_only_the_given_descriptors_are_open_in_the_child() -> None:
    """The parent's other descriptors (its reactor's among them) are closed."""
    r, w = os.pipe()
    try:
        recorder = run(lambda: os.write(1, " ".join(os.listdir("/proc/self/fd")).encode()) and None)
    finally:
        os.close(r)
        os.close(w)
    # 1, 2, and the one listdir itself opened.
    assert len(recorder.output[1].split()) == 3


def test_the_default_reactor_can_be_rebuilt() -> None:
    assert can_fork_reactor(reactor)
    assert not can_fork_reactor(object())


def test_the_child_keeps_ignoring_sigpipe() -> None:
    """
    Python ignores SIGPIPE; a forked server must too, or a client that
    resets its connection mid-write kills the process and its sessions.
    """

    def main() -> None:
        with open("/proc/self/status") as f:
            ignored = next(line for line in f if line.startswith("SigIgn:"))
        os.write(1, ignored.split()[1].encode())

    recorder = run(main)
    ignored = int(recorder.output[1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1))


def test_a_fork_of_another_reactor_gets_a_poll_style_one() -> None:
    """
    A fork of a process whose reactor cannot be rebuilt in a fork (asyncio,
    say) gets the first poll-style reactor instead.
    """

    def main() -> None:
        import sys

        from pop3srv.processes.forking import fresh_reactor

        sys.modules["twisted.internet.reactor"] = object()  # type: ignore[assignment]
        new = fresh_reactor()
        os.write(
            1, f"{can_fork_reactor(new)} {new is sys.modules['twisted.internet.reactor']}".encode()
        )

    recorder = run(main)
    assert recorder.output[1] == b"True True", recorder.output
