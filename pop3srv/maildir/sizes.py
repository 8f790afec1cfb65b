# -*- test-case-name: tests.test_maildir -*-
"""
The octets RETR sends for a Maildir message, and a cache of them.

A POP3 size counts what is sent: the stored bytes with every bare LF made
CRLF, and a CRLF after a last line that has no line end (the protocol's
L{pop3srv.core.wire.DotStuffer} does both; dot-stuffing is not counted).
A name with C{,W=} states it (Dovecot's virtual size); for any other
message the file is read once, in pieces, and the count kept in
L{SizeCache}, a state file of the server's own, so the next session does
not read the Maildir again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable

from pop3srv.mbox.paths import UnsafeStateFile, open_state_file, read_bounded

#: Raw bytes read per read() when counting or streaming a message.
READ_CHUNK = 64 * 1024
#: The first line of a size cache; another first line is an unknown format.
CACHE_MAGIC = b"pop3srv maildir sizes 1\n"
#: The most octets a size cache may hold (some millions of messages).
CACHE_LIMIT = 256 << 20

#: What a cached size is valid for: the name's UIDL form, then the file's
#: inode, length and mtime in nanoseconds.  A message file never changes,
#: so a stored size holds while the same file sits under the same name.
CacheKey = tuple[bytes, int, int, int]


def wire_octets(fd: int) -> int:
    """
    Count the octets RETR sends for the file open as C{fd}, reading it from
    its current offset to the end in pieces.

    @param fd: a descriptor open for reading.
    @return: the count.
    """
    total = lf = crlf = 0
    after_cr = False
    last = b""
    while chunk := os.read(fd, READ_CHUNK):
        total += len(chunk)
        lf += chunk.count(b"\n")
        crlf += chunk.count(b"\r\n")
        if after_cr and chunk[:1] == b"\n":
            # A CR LF split between two reads.
            crlf += 1
        after_cr = chunk[-1:] == b"\r"
        last = chunk[-1:]
    if total == 0:
        return 0
    # Each bare LF gains a CR; an unended last line gains a CRLF.
    return total + lf - crlf + (0 if last == b"\n" else 2)


class SizeCache:
    """
    Wire sizes computed in earlier sessions, by L{CacheKey}.

    Only a holder of the maildrop's session lock reads or writes it.  A
    damaged, foreign or missing file is an empty cache: the sizes are
    computed again.

    @ivar changed: whether L{store} has anything new to write.
    """

    def __init__(self, entries: dict[CacheKey, int] | None = None) -> None:
        self._entries = dict(entries or {})
        self._used: dict[CacheKey, int] = {}
        self.changed = False

    @classmethod
    def load(cls, path: str) -> SizeCache:
        """
        Read the cache at C{path} (a file of the server's user, no symlink).

        @raise UnsafeStateFile: it is a symlink, a FIFO, or not a regular
            file of the server's user.
        """
        try:
            fd = open_state_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return cls()
        try:
            data = read_bounded(fd, CACHE_LIMIT, path)
        except UnsafeStateFile:
            return cls()
        finally:
            os.close(fd)
        return cls(parse_cache(data))

    def get(self, key: CacheKey) -> int | None:
        """
        The size stored for C{key}; a size found is kept by L{store}.
        """
        size = self._entries.get(key)
        if size is not None:
            self._used[key] = size
        return size

    def put(self, key: CacheKey, size: int) -> None:
        """
        Remember a size computed now.
        """
        self._used[key] = size
        self.changed = True

    def store(self, path: str) -> None:
        """
        Write the sizes used in this session (those of messages gone are
        dropped) to C{path}, if anything changed: a temporary file beside
        it, renamed over it.

        @raise OSError: it cannot be written; the old file is left alone.
        """
        if not self.changed and len(self._used) == len(self._entries):
            return
        directory, base = os.path.split(path)
        # mkstemp: O_EXCL, so nothing planted under the name is followed.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{base}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(render_cache(self._used.items()))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._entries = dict(self._used)
        self.changed = False


def remove_stale_temps(path: str) -> list[str]:
    """
    Remove temporary files L{SizeCache.store} left when its process was
    killed.  Only a holder of the session lock writes them, so the caller
    must hold it; then every such file is debris.

    @param path: the cache file.
    @return: the paths removed.
    """
    directory, base = os.path.split(path)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(f"{base}.") and name.endswith(".tmp"):
            stale = os.path.join(directory, name)
            try:
                os.unlink(stale)
            except OSError:
                continue
            removed.append(stale)
    return removed


def render_cache(entries: Iterable[tuple[CacheKey, int]]) -> bytes:
    """
    The file form of cache entries: L{CACHE_MAGIC}, then one line each,
    C{INODE LENGTH MTIME_NS SIZE NAME}.
    """
    lines = [CACHE_MAGIC]
    for (name, ino, length, mtime_ns), size in entries:
        lines.append(b"%d %d %d %d %s\n" % (ino, length, mtime_ns, size, name))
    return b"".join(lines)


def parse_cache(data: bytes) -> dict[CacheKey, int]:
    """
    Read L{render_cache}'s form; a malformed line is skipped, an unknown
    format is empty.
    """
    if not data.startswith(CACHE_MAGIC):
        return {}
    entries: dict[CacheKey, int] = {}
    for line in data[len(CACHE_MAGIC) :].split(b"\n"):
        fields = line.split(b" ")
        if len(fields) != 5 or not fields[4] or not all(f.isdigit() for f in fields[:4]):
            continue
        ino, length, mtime_ns, size = (int(f) for f in fields[:4])
        entries[(fields[4], ino, length, mtime_ns)] = size
    return entries
