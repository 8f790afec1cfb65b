# -*- test-case-name: tests.test_hashing -*-
"""
The hashing-process side of L{pop3srv.processes.hashpool}: what runs in a
hashing process.

A hashing process is a fork of a server process
(L{pop3srv.processes.forking}).  Its descriptor 0 is its end of a UNIX
socket pair to the server process, on which it answers
L{CheckPassword <pop3srv.processes.rpc.CheckPassword>} one at a time: the
L{VerifyResult} and the log events the check emitted (rejected passwords,
a hash that should be reset) as plain dicts, for the server process to log
(if the check raised, there is no result and the error is among the
events).  It never writes the user file: a hash upgrade travels in the
L{VerifyResult}, for the server process to write.  It exits at
end-of-file, which is also what happens when its server process dies.

It runs no reactor: each check is synchronous and it has nothing else to
do, so a blocking loop feeds what it reads to the AMP parser, whose answers
are written out before the next read.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.protocols import amp
from zope.interface import implementer

from pop3srv.auth.userfile import UserFile
from pop3srv.processes.forking import log_only_to, set_process_name
from pop3srv.processes.rpc import CheckPassword, LogEvents, Peer

__all__ = ["serve"]

_log = Logger()

#: Types of event fields that cross the socket as they are.
_PLAIN = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class _Collector:
    """Keeps the log events of the current check, to send back."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        fields = {
            k: v for k, v in event.items() if not k.startswith("log_") and isinstance(v, _PLAIN)
        }
        self.events.append(
            {
                "namespace": event.get("log_namespace", __name__),
                "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
                "format": event.get("log_format") or "",
                "fields": fields,
            }
        )


class _Socket:
    """The transport of the blocking loop: writes go straight to the socket."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        # The peer broke the protocol (AMP gives up on the connection).
        self.closed = True


class _Checker(Peer):
    """Answers the server process's checks against the user file."""

    def __init__(self, users: UserFile, collector: _Collector) -> None:
        super().__init__()
        self.users = users
        self.collector = collector

    @CheckPassword.responder
    def check(self, username: str, password: str) -> dict[str, Any]:
        self.collector.events.clear()
        try:
            result = self.users.verify_detailed(username, password)
        except Exception as e:
            # Reported, not fatal: the next check may well succeed.
            _log.error("Password check failed: {error}", error=repr(e))
            result = None
        events, self.collector.events = self.collector.events, []
        answer = {"result": result, "events": events}
        if len(LogEvents().toString(events)) > amp.MAX_VALUE_LENGTH:
            # Too many for one AMP value: keep the result, say what was lost.
            answer["events"] = [
                {
                    "namespace": __name__,
                    "level": "warn",
                    "format": "{count} log events of a password check were too long to send",
                    "fields": {"count": len(events)},
                }
            ]
        return answer


def serve(users: UserFile, niceness: int, fd: int = 0) -> None:
    """
    Answer checks on the socket C{fd} until end-of-file.

    @param users: the user file, as loaded in the server process; it
        re-reads the file when it changes.
    @param niceness: added to the process's nice value.
    @param fd: this process's end of the socket pair.
    """
    set_process_name("pop3srv-hash")
    # Below the server processes in CPU priority: when hashing saturates
    # the CPUs, a session's NOOP or RETR runs first, and logins only wait a
    # little longer.  (SCHED_IDLE was tried too: no clear gain over nice 19
    # in the benchmark, and it can starve logins behind any other busy task.)
    if niceness:
        os.nice(niceness)
    collector = _Collector()
    log_only_to(collector)
    transport = _Socket(fd)
    checker = _Checker(users, collector)
    checker.makeConnection(transport)
    while not transport.closed:
        data = os.read(fd, 65536)
        if not data:
            return
        checker.dataReceived(data)
