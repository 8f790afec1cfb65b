# -*- test-case-name: tests.test_hashing -*-
"""
The worker side of L{pop3srv.hashing}: what runs in a hashing process.

Kept apart, and free of C{twisted.internet}, so that the processes (and the
fork server they come from) import only the user file code.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

from twisted.logger import ILogObserver, LogLevel, globalLogBeginner
from zope.interface import implementer

from pop3srv.userfile import UserFile, VerifyResult

#: Types of event fields that cross the pipe as they are.
_PLAIN = (str, int, float, bool, type(None))

# --- the worker side: module globals live in each worker process only.

_users: UserFile | None = None
_events: list[dict[str, Any]] = []


@implementer(ILogObserver)
def _collect(event: dict[str, Any]) -> None:
    """Keep a log event of the current verification, to send back."""
    level = event.get("log_level")
    fields = {k: v for k, v in event.items() if not k.startswith("log_") and isinstance(v, _PLAIN)}
    _events.append(
        {
            "namespace": event.get("log_namespace", __name__),
            "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
            "format": event.get("log_format") or "",
            "fields": fields,
        }
    )


def _exit_with(owner: int) -> None:
    """
    Exit when the process C{owner} has exited.

    A worker cannot count on seeing end-of-file when a server process is
    killed: the executor gives every worker both ends of its queues, and the
    fork server's liveness pipe too, so the worker, its fork server and the
    resource tracker would otherwise outlive a server killed by SIGKILL.
    """
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        # A pidfd becomes readable when the process exits.
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                # It exists (as another user).
                continue
    os._exit(0)


def init_worker(path: str, upgrade: bool, niceness: int = 0, owner: int = 0) -> None:
    """
    Open the user file in a new worker process.

    @param path: the user file.
    @param upgrade: whether to rewrite deprecated hashes after a match.
    @param niceness: added to the process's nice value.
    @param owner: the server process's pid: the worker exits when it does.
    """
    global _users
    if owner:
        threading.Thread(
            target=_exit_with, args=(owner,), daemon=True, name="pop3srv-owner-watch"
        ).start()
    # Below the server processes in CPU priority: when hashing saturates
    # the CPUs, a session's NOOP or RETR runs first, and logins only wait a
    # little longer.  (SCHED_IDLE was tried too: no clear gain over nice 19
    # in the benchmark, and it can starve logins behind any other busy task.)
    if niceness:
        os.nice(niceness)
    # Without an observer twisted.logger would buffer every event forever.
    globalLogBeginner.beginLoggingTo([_collect], redirectStandardIO=False, discardBuffer=True)
    _users = UserFile(path, upgrade=upgrade)
    # The server process parsed the same file and already logged its
    # problems; do not repeat them for every worker.
    _events.clear()


def verify(username: str, password: str) -> tuple[VerifyResult, list[dict[str, Any]]]:
    """
    Verify in a worker process.

    @return: the result and the log events emitted meanwhile.
    """
    assert _users is not None
    _events.clear()
    try:
        return _users.verify_detailed(username, password), list(_events)
    finally:
        _events.clear()


def ping() -> int:
    """Start-up check: the worker runs and has opened the file."""
    return os.getpid()
