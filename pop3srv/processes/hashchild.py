# -*- test-case-name: tests.test_hashing -*-
"""
The worker side of L{pop3srv.processes.hashpool}: what runs in a hashing process.

A worker is a fork of a server process (L{pop3srv.processes.forking}).  It reads
requests from descriptor 0 and writes answers to descriptor 1, one at a
time, each a frame: a 4-byte big-endian length and a pickle.  A request is
C{(username, password)}; the answer is C{(VerifyResult, events)}, the log
events the check emitted (upgrade notices, rejected passwords) as plain
dicts, for the server process to log (if the check raised, the result is
L{None} and the error is among the events).  The worker exits at end-of-file on
descriptor 0, which is also what happens when its server process dies.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel
from zope.interface import implementer

from pop3srv.auth.userfile import UserFile
from pop3srv.processes.forking import log_only_to, set_process_name

__all__ = ["HEADER", "MAX_FRAME", "FrameBuffer", "FrameTooLarge", "frame", "serve"]

#: A frame's length prefix.
HEADER = struct.Struct("!I")
#: The largest frame either side accepts (a request holds a user name and a
#: password, an answer a result and a few log events).
MAX_FRAME = 1 << 20

_log = Logger()


def frame(message: Any) -> bytes:
    """C{message} pickled, behind its length."""
    body = pickle.dumps(message)
    return HEADER.pack(len(body)) + body


class FrameTooLarge(ValueError):
    """A frame claims more than L{MAX_FRAME} bytes: the stream is unusable."""


class FrameBuffer:
    """Splits a byte stream, as it arrives, into the bodies of its frames."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """
        Add C{data}; yield each frame body it completes, in order.

        @raise FrameTooLarge: a frame claims more than L{MAX_FRAME} bytes.
        """
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                self._buffer = b""
                raise FrameTooLarge(f"frame of {length} bytes")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            body, self._buffer = self._buffer[HEADER.size : end], self._buffer[end:]
            yield body


#: Types of event fields that cross the pipe as they are.
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


def _read_exactly(fd: int, n: int) -> bytes | None:
    """C{n} bytes from C{fd}, or L{None} at end-of-file."""
    parts = []
    while n:
        data = os.read(fd, n)
        if not data:
            return None
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(users: UserFile, niceness: int) -> None:
    """
    Answer requests on descriptors 0 and 1 until end-of-file.

    @param users: the user file, as loaded in the server process; it
        re-reads the file when it changes.
    @param niceness: added to the process's nice value.
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
    while True:
        header = _read_exactly(0, HEADER.size)
        if header is None:
            return
        (length,) = HEADER.unpack(header)
        if length > MAX_FRAME:
            raise ValueError(f"request frame of {length} bytes")
        body = _read_exactly(0, length)
        if body is None:
            return
        username, password = pickle.loads(body)  # noqa: S301 (our own parent)
        collector.events.clear()
        try:
            result = users.verify_detailed(username, password)
        except Exception as e:
            # Reported, not fatal: the next check may well succeed.
            _log.error("Password check failed: {error}", error=repr(e))
            result = None
        answer = frame((result, list(collector.events)))
        collector.events.clear()
        _write_all(1, answer)
