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
# The ">" after an LF that a quoted line loses, the rest as a lookahead: the
# replacement is then a literal LF, which sre copies without expanding a
# template per match.
_QUOTED_AFTER_LF = re.compile(rb"\n>(?=>{0,%d}From )" % (MAX_QUOTES - 1))
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
        if not self._carry and b">" not in data:
            # No ">" at all (attachments, most plain text): nothing can be
            # un-quoted or carried, so the chunk passes through uncopied.
            if data:
                self._at_line_start = data[-1] == 0x0A
            return data
        buf = self._carry + data if self._carry else data
        self._carry = b""
        at_line_start = self._at_line_start
        last_nl = buf.rfind(b"\n")
        if last_nl < 0 and not at_line_start:
            # The middle of a line that began earlier: no line start here.
            return buf
        tail_start = last_nl + 1
        decided = buf
        if tail_start == len(buf):
            self._at_line_start = True
        elif buf[tail_start] == 0x3E and _PARTIAL.fullmatch(buf, tail_start) is not None:
            self._carry = buf[tail_start:]
            self._at_line_start = True
            decided = buf[:tail_start]
        else:
            self._at_line_start = False
        # Every line start but the first follows an LF, so one C-speed sub
        # over the whole span does them (returning the span itself when
        # nothing matches); the first line is checked on its own, and only
        # if it starts at a line start.  No slicing at the first LF.
        if _NEEDLE not in decided:
            # Every quoted line holds ">From ": one C-speed search rules
            # out most chunks with a ">" in them (reply quoting).
            return decided
        out = _QUOTED_AFTER_LF.sub(b"\n", decided)
        if at_line_start and out[:1] == b">" and _QUOTED.match(out) is not None:
            out = out[1:]
        return out

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
