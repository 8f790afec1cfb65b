# -*- test-case-name: tests.test_mbox_scan -*-
"""
Helpers for testing code that uses L{pop3srv.mbox}: straightforward
reference implementations to compare the chunked ones with, and a
synchronous stand-in for C{deferToThread}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from pop3srv.mbox.quoting import MAX_QUOTES


def synchronous_defer_to_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run C{f} at once in this thread; a drop-in for C{deferToThread} in tests.
    """
    return maybeDeferred(f, *args, **kwargs)


def reference_split(data: bytes) -> list[tuple[int, int, int, int]]:
    """
    Split a whole mbox held in memory, the obvious way.

    @return: per message C{(start, body_start, end, next_start)}.
    """
    starts = [m.start() for m in re.finditer(rb"(?:^|(?<=\n))From ", data)]
    result = []
    for i, start in enumerate(starts):
        nxt = starts[i + 1] if i + 1 < len(starts) else len(data)
        nl = data.find(b"\n", start, nxt)
        body_start = nxt if nl < 0 else nl + 1
        end = nxt
        if data[nxt - 2 : nxt] == b"\n\n":
            end = nxt - 1
        elif data[nxt - 4 : nxt] == b"\r\n\r\n":
            end = nxt - 2
        result.append((start, body_start, max(end, body_start), nxt))
    return result


def reference_unquote(content: bytes) -> bytes:
    """
    mboxrd un-quoting, one line at a time.
    """
    out = []
    for line in re.findall(rb"[^\n]*\n|[^\n]+", content):
        stripped = line.lstrip(b">")
        quotes = len(line) - len(stripped)
        if 1 <= quotes <= MAX_QUOTES and stripped.startswith(b"From "):
            line = line[1:]
        out.append(line)
    return b"".join(out)


def reference_wire(content: bytes) -> bytes:
    """
    What RETR sends before the dot (without dot-stuffing): un-quoted, bare
    LF made CRLF, and a final CRLF added if missing.
    """
    if not content:
        return b""
    text = reference_unquote(content)
    text = re.sub(rb"(?<!\r)\n", b"\r\n", text)
    if not text.endswith(b"\n"):
        text += b"\r\n"
    return text
