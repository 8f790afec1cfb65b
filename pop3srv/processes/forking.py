# -*- test-case-name: tests.test_forking -*-
"""
Child processes that are forks of this one, not new programs: the one way
pop3srv starts a child (see L{pop3srv.processes.supervisor} for why).

A worker (L{pop3srv.processes.supervisor}) or hashing process
(L{pop3srv.processes.hashpool}) started with exec would import Python,
Twisted, pyOpenSSL and cryptography again into private memory of its own.
A fork shares those pages with its parent until either writes them, so
with the cyclic garbage collector kept off the inherited objects
(L{gc.freeze}) most of them stay shared for the life of the process.

L{ForkedProcess} is Twisted's own child process (pipes, exit reporting,
signals), except that the child runs a Python function instead of exec.
Twisted has no public API for that, so it overrides three private hooks of
C{twisted.internet.process.Process} (C{_trySpawnInsteadOfFork},
C{_resetSignalDisposition}, C{_execChild}) and clears its table of child
processes in the fork; C{tests/test_forking.py} pins what it relies on.
By the time the function runs, Twisted has closed every descriptor the
child was not given (the parent's reactor, listening sockets, sessions and
log file among them), so the copy of the parent's reactor is dead weight
the child never runs; L{fresh_reactor} installs a new one for a child that
needs a reactor.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from twisted.internet import process
from twisted.internet.interfaces import IProcessProtocol
from twisted.logger import globalLogPublisher

__all__ = [
    "ForkedProcess",
    "can_fork_reactor",
    "fresh_reactor",
    "log_only_to",
    "set_process_name",
]

#: prctl(2) option that sets the calling thread's name (what ps and top show).
_PR_SET_NAME = 15

#: What a forked child stops using but must not free: objects of the parent
#: (its reactor, log observers, child processes) may own Python socket or
#: file objects whose descriptor numbers the child has since reused, and
#: freeing them would close those.
_KEPT: list[Any] = []

#: The signals a Twisted reactor or twistd handles; a forked child resets
#: them so that the parent's handlers (and its wakeup descriptor) are gone
#: before the child installs its own.
_PARENT_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGCHLD", "SIGUSR1", "SIGUSR2")


#: The signals a forked child ignores until it says otherwise (a worker's
#: reactor handles SIGTERM again): a child stops when its parent tells it
#: or goes, so that systemd's SIGTERM to every process of the service, or a
#: terminal's SIGINT to the whole group, cannot kill a hashing process
#: while its server process still counts on it.
_STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _reactor_classes() -> tuple[type, ...]:
    """The reactor classes L{fresh_reactor} can build anew."""
    classes = []
    for module, name in (
        ("twisted.internet.epollreactor", "EPollReactor"),
        ("twisted.internet.pollreactor", "PollReactor"),
        ("twisted.internet.selectreactor", "SelectReactor"),
    ):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def can_fork_reactor(reactor: Any) -> bool:
    """
    Whether a fork of this process can run a reactor of C{reactor}'s kind:
    the poll-style reactors need no state but their own descriptors.  Others
    (asyncio, for one) carry state a fork would share; a fork of a process
    that runs one gets the first poll-style reactor there is instead
    (L{fresh_reactor}).
    """
    return type(reactor) in _reactor_classes()


def _forget_parent() -> None:
    """
    Drop what a fork inherits from the parent's reactor and twistd: their
    signal handlers (and the wakeup descriptor, now closed, whose number
    may be reused) and the parent's child processes, which are not ours.
    """
    signal.set_wakeup_fd(-1)
    for name in _PARENT_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN if name in _STOP_SIGNALS else signal.SIG_DFL)
    _KEPT.append(dict(process.reapProcessHandlers))
    process.reapProcessHandlers.clear()


def fresh_reactor() -> Any:
    """
    In a forked child, replace the installed reactor (the parent's, whose
    descriptors are closed) with a new one: of the same class if
    L{can_fork_reactor}, else of the first poll-style class available.

    @return: the new reactor, now C{twisted.internet.reactor}.
    """
    from twisted.internet.main import installReactor

    old: Any = sys.modules.pop("twisted.internet.reactor", None)
    _KEPT.append(old)
    kind = type(old) if can_fork_reactor(old) else _reactor_classes()[0]
    reactor = kind()
    installReactor(reactor)
    return reactor


def log_only_to(observer: Any) -> None:
    """
    In a forked child, send every log event to C{observer} (an
    L{ILogObserver}) only, instead of to the parent's observers (its log
    file, whose descriptor is closed).
    """
    for old in list(getattr(globalLogPublisher, "_observers", [])):
        _KEPT.append(old)
        globalLogPublisher.removeObserver(old)
    globalLogPublisher.addObserver(observer)


def set_process_name(name: str) -> None:
    """
    Name this process (C{/proc/PID/comm}, what C{ps} and C{top} show, at most
    15 bytes): a fork keeps its parent's command line, so this is how an
    admin tells the processes apart.  Does nothing where prctl is missing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        return


class ForkedProcess(process.Process):
    """
    A child process that runs C{main()} in a fork of this process.

    The parent side is an ordinary Twisted process transport: C{childFDs},
    the process protocol, L{signalProcess}, and C{processEnded} with the
    exit status, which is C{main}'s return value (0 for L{None}) or 1 if
    it raised (the traceback goes to the child's descriptor 2).
    """

    def __init__(
        self,
        reactor: Any,
        main: Callable[[], int | None],
        protocol: IProcessProtocol,
        childFDs: dict[int, Any],
    ) -> None:
        self._main = main
        if not ForkedProcess._froze:
            # Keep the collector off what every child inherits, the start-up
            # state: a collection writes to every object it visits, copying
            # the page it is on.  Done once, after collecting start-up
            # garbage; objects made later are collected as usual.
            ForkedProcess._froze = True
            gc.collect()
            gc.freeze()
        super().__init__(
            reactor, sys.executable, [sys.executable], None, None, protocol, childFDs=childFDs
        )

    _froze = False

    def _trySpawnInsteadOfFork(self, *args: Any, **kwargs: Any) -> bool:
        # posix_spawn would exec; this process must fork.
        return False

    def _resetSignalDisposition(self) -> None:
        # Twisted restores ignored signals to their defaults for the program
        # it is about to exec.  A fork stays this Python process, which
        # ignores SIGPIPE (a client that resets the connection mid-write
        # must not kill the process) and SIGXFSZ: keep them ignored.
        return

    def _execChild(
        self, path: Any, uid: Any, gid: Any, executable: Any, args: Any, environment: Any
    ) -> None:
        # Runs in the child after Twisted has set up its descriptors, with
        # the collector disabled (Twisted does that around fork).
        status = 1
        try:
            # The parent's objects are this child's start-up state too.
            gc.freeze()
            gc.enable()
            _forget_parent()
            result = self._main()
            status = 0 if result is None else int(result)
        except BaseException:
            # Nowhere else to report it: the parent logs descriptor 2.
            with contextlib.suppress(BaseException):
                with open(2, "w", encoding="utf-8", closefd=False) as err:
                    traceback.print_exc(file=err)
        finally:
            # Never return into the parent's call stack, and skip the
            # parent's exit handlers.
            os._exit(status)
