# -*- test-case-name: tests.test_mbox_quoting -*-
"""
mboxrd un-quoting as a chunked stream transform.

In an mboxrd file a content line that begins with one or more C{>} followed
by C{From } was stored with one extra C{>}; delivering the message removes
it.  The transform works on whole chunks with C-speed bytes and regex
operations and carries at most one ambiguous partial line start
(C{MAX_CARRY} bytes) from one chunk to the next, so its output does not
depend on how the input is split and its memory use is bounded.
"""

from __future__ import annotations

import re

#: Longest run of C{>} that is un-quoted.  A longer run is left alone, which
#: bounds the carry whether or not the line is split across chunks.
MAX_QUOTES = 1000

#: Upper bound on the bytes carried between chunks (C{>} * 1000 + C{From}).
MAX_CARRY = MAX_QUOTES + len(b"From")

_QUOTED = re.compile(rb"^>(>{0,%d}From )" % (MAX_QUOTES - 1), re.MULTILINE)
_PARTIAL = re.compile(rb">{1,%d}(?:F|Fr|Fro|From)?" % MAX_QUOTES)
_NEEDLE = b">From "


class _LineStartCarry:
    """
    Split a byte stream into spans that can be judged on their own.

    @ivar _carry: an incomplete line start that might still become a quoted
        C{From } line once more bytes arrive; it always begins a line.
    @ivar _at_line_start: whether the next byte (after C{_carry}) begins a
        line.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True

    def _take(self, data: bytes) -> tuple[bytes, bytes]:
        """
        Accept C{data} and return the bytes that are now decidable.

        @return: C{(mid_line, lines)}: C{mid_line} continues a line that began
            earlier and needs no work; C{lines} begins at a line start.
        """
        buf = self._carry + data if self._carry else data
        self._carry = b""
        if not buf:
            return b"", b""
        mid_line = b""
        if not self._at_line_start:
            nl = buf.find(b"\n")
            if nl < 0:
                return buf, b""
            mid_line, buf = buf[: nl + 1], buf[nl + 1 :]
        tail_start = buf.rfind(b"\n") + 1
        tail = buf[tail_start:]
        if not tail:
            self._at_line_start = True
        elif _PARTIAL.fullmatch(tail) is not None:
            self._carry = tail
            self._at_line_start = True
            buf = buf[:tail_start]
        else:
            self._at_line_start = False
        return mid_line, buf

    def _drain(self) -> bytes:
        """
        End the stream and return the carry, which can no longer match.
        """
        carry = self._carry
        self._carry = b""
        self._at_line_start = True
        return carry


class MboxUnquoter(_LineStartCarry):
    """
    Turn the stored content of one mbox message into the delivered message.

    Feed the raw content (everything after the C{From } line) in chunks of
    any size, then call L{finish}; the concatenated results are the same
    however the input was split.  Line ends are passed through as stored.
    """

    def feed(self, data: bytes) -> bytes:
        """
        Transform the next chunk.

        @param data: the next raw bytes of the message content.
        @return: the un-quoted bytes that can be decided so far.
        """
        mid_line, lines = self._take(data)
        if _NEEDLE in lines:
            lines = _QUOTED.sub(rb"\1", lines)
        return mid_line + lines if mid_line else lines

    def finish(self) -> bytes:
        """
        End the message.

        @return: the bytes held back from the last chunk; the transform is
            then ready for a new message.
        """
        return self._drain()


class QuotedLineCounter(_LineStartCarry):
    """
    Count the lines that L{MboxUnquoter} would un-quote, without copying.

    Each un-quoted line is one octet shorter, which is all the scanner needs
    to compute sizes arithmetically.
    """

    def feed(self, data: bytes) -> int:
        """
        Count quoted lines that are complete in the next chunk.

        @param data: the next raw bytes of the message content.
        @return: the number of lines decided in this call that lose a C{>}.
        """
        lines = self._take(data)[1]
        if _NEEDLE not in lines:
            return 0
        return len(_QUOTED.findall(lines))

    def finish(self) -> int:
        """
        End the message.  A carried partial line start never matches.

        @return: always 0, for symmetry with L{feed}.
        """
        self._drain()
        return 0


def unquote(content: bytes) -> bytes:
    """
    Un-quote a whole message content held in memory.

    @param content: raw message content.
    @return: the delivered message.
    """
    unquoter = MboxUnquoter()
    return unquoter.feed(content) + unquoter.finish()
