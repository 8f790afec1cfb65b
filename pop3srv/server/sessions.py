# -*- test-case-name: tests.test_session_log -*-
"""
The sessions of this process: who is connected now (L{SessionTable}, what
C{pop3srv who} shows), and the summary line each session logs when it ends
(L{log_summary}), in a stable C{key=value} format like the audit log's::

    pop3srv-session session=1a2b-7 user="alice" client=192.0.2.7:51234 listener=pop3
     tls=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 method=password duration=4.518
     messages=3 octets=10342 retr=2 retr_octets=7210 top=0 dele=1
     after_messages=2 after_octets=6845 end=quit uidl_hash=5d1c0b7e9a42

(one line in the log).  Fields always come in this order and none is ever
empty: C{-} stands for "no value".  C{user} is JSON-quoted, so no client
text can forge another field; every other value is the server's own and is
reduced to C{[A-Za-z0-9._:+\\[\\]-]} anyway.  The event also carries each
field as an event key, as the line shows it (numbers as C{int},
C{duration} as a C{float}, C{user} JSON-quoted, a missing value as
C{"-"}), and C{session_summary=True}, so an observer (the metrics) can
count from it without parsing the text.

A I{session} is a connection that was admitted and greeted: a connection
refused before the greeting (IP rules, a connection limit, an authority
that did not answer) is in the audit log, and is neither in the table nor
summarised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from pop3srv.server.audit import quote_user

__all__ = [
    "FORMAT",
    "SessionFigures",
    "SessionInfo",
    "SessionTable",
    "UidlHash",
    "log_summary",
    "tls_description",
]

_log = Logger(namespace="pop3srv.session")

#: The summary line; see the module docstring for the fields.
FORMAT = (
    "pop3srv-session session={session} user={user} client={client} listener={listener}"
    " tls={tls} cipher={cipher} method={method} duration={duration:.3f}"
    " messages={messages} octets={octets} retr={retr} retr_octets={retr_octets}"
    " top={top} dele={dele} after_messages={after_messages} after_octets={after_octets}"
    " end={end} uidl_hash={uidl_hash}"
)

#: How many hex digits of the UIDL list's SHA-256 the summary shows.
UIDL_HASH_DIGITS = 12

_UNSAFE = re.compile(r"[^A-Za-z0-9._:+\[\]-]")

#: The states a session is in, as the table shows them.
STATES = ("authorization", "transaction", "update")


def _token(value: str | None) -> str:
    """A value for the line: C{-} for none, else only characters that cannot split it."""
    if not value:
        return "-"
    return _UNSAFE.sub("_", value[:100])


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """
    One open session, as C{pop3srv who} shows it.

    @ivar id: the session tag of the audit log (C{1a2b-7}).
    @ivar user: whose maildrop it has open, or L{None} before login.
    @ivar client: the client's address (C{host:port}, C{[v6]:port},
        C{local} for a UNIX socket); the one the PROXY header gave, behind
        a proxy.
    @ivar listener: C{pop3} (plain, STLS possible) or C{pop3s} (implicit
        TLS).
    @ivar tls: C{"<version> <cipher>"} once a handshake is done, else
        L{None}.
    @ivar since: when the client connected, in seconds since the epoch.
    @ivar state: one of L{STATES}.
    @ivar pid: the server process that serves it.
    """

    id: str
    user: str | None
    client: str
    listener: str
    tls: str | None
    since: float
    state: str
    pid: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able C{dict}."""
        return dataclasses.asdict(self)


class SessionTable:
    """
    The open sessions of one process, by id.  Its entries are frozen: an
    L{update} replaces one, so a L{list} taken earlier never changes.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, SessionInfo] = {}

    def add(self, info: SessionInfo) -> None:
        """
        Add a session.

        @raise ValueError: a session with its id is in the table already.
        """
        if info.id in self._sessions:
            raise ValueError(f"session {info.id} is in the table already")
        self._sessions[info.id] = info

    def update(self, id: str, **fields: Any) -> None:
        """
        Change some fields of a session.

        @raise KeyError: no such session.
        @raise TypeError: a field L{SessionInfo} does not have.
        """
        self._sessions[id] = dataclasses.replace(self._sessions[id], **fields)

    def remove(self, id: str) -> None:
        """
        Remove a session.

        @raise KeyError: no such session.
        """
        del self._sessions[id]

    def get(self, id: str) -> SessionInfo | None:
        """A session by id, or L{None}."""
        return self._sessions.get(id)

    def list(self) -> list[SessionInfo]:
        """The open sessions, oldest first."""
        return sorted(self._sessions.values(), key=lambda info: info.since)

    def __len__(self) -> int:
        return len(self._sessions)


class UidlHash:
    """
    The short hash of a maildrop's UIDL list as the session saw it at login:
    the first L{UIDL_HASH_DIGITS} hex digits of the SHA-256 of the UIDLs in
    message order, each followed by LF.  The same mailbox content gives the
    same hash in every session; a different hash for the same content means
    the UIDLs changed, and clients will download the messages again.

    Computing it costs one C{getUidl} a message, as a full C{UIDL} listing
    does.  So it is not computed at login (it would slow every login on a
    large maildrop) but on the way: L{uidl} is the function the session's
    machine looks UIDLs up with, and it feeds the hash with the UIDLs a
    listing asks for anyway, in order.  L{hexdigest} looks up only what no
    listing asked for; it must be called while the mailbox is still as it
    was at login (before a commit deletes anything, before it is released).
    """

    def __init__(self, uidl_of: Callable[[int], str | bytes], count: int) -> None:
        """
        @param uidl_of: the mailbox's C{getUidl}.
        @param count: how many messages the maildrop had at login.
        """
        self._uidl_of = uidl_of
        self._count = count
        self._next = 0
        self._hash = hashlib.sha256()
        self._digest: str | None = None

    def uidl(self, index: int) -> str | bytes:
        """The UIDL of message C{index} (0-based), hashed on the way."""
        uidl = self._uidl_of(index)
        if self._digest is None and self._next <= index < self._count:
            self._feed(index)
            if self._digest is None:
                self._add(uidl)
                self._next = index + 1
        return uidl

    def _add(self, uidl: str | bytes) -> None:
        if isinstance(uidl, str):
            uidl = uidl.encode("utf-8", "backslashreplace")
        self._hash.update(uidl)
        self._hash.update(b"\n")

    def _feed(self, end: int) -> None:
        """Hash the UIDLs from the next one up to C{end} (excluded)."""
        uidl_of = self._uidl_of
        try:
            for index in range(self._next, end):
                self._add(uidl_of(index))
        except Exception:
            # Never the session's problem: its own lookups raise for
            # themselves.  The hash says it could not be computed.
            self._digest = "?"
        else:
            self._next = max(self._next, end)

    def hexdigest(self) -> str:
        """
        The hash, or C{?} if some UIDL could not be read.  Once computed,
        it does not change: L{uidl} only looks UIDLs up after this.
        """
        if self._digest is None:
            self._feed(self._count)
            if self._digest is None:
                self._digest = self._hash.hexdigest()[:UIDL_HASH_DIGITS]
        return self._digest


@dataclass
class SessionFigures:
    """
    What one session did, for its summary line.

    @ivar session: the session tag.
    @ivar client: the client's address (as in L{SessionInfo.client}).
    @ivar listener: C{pop3} or C{pop3s}.
    @ivar started: when the client connected (the reactor's seconds).
    @ivar tls: the TLS version and cipher, once a handshake is done.
    @ivar user: who logged in, or L{None}.
    @ivar method: how (C{password}, C{apop}, C{sasl-plain},
        C{sasl-scram-sha-256}, ...), or L{None}.
    @ivar messages: the messages in the maildrop at login.
    @ivar octets: their size at login (the sum of the C{LIST} sizes).
    @ivar retr: C{RETR} responses sent (each one that began).
    @ivar retr_octets: octets of C{RETR} responses after their status
        line, as written to the connection: dot-stuffed, CRLF line ends,
        the terminating C{.} line included; a download cut short counts
        what was written.
    @ivar top: C{TOP} responses sent.
    @ivar dele: C{DELE} commands accepted (an C{RSET} does not undo the
        count; whether they were committed shows in C{end} and the
        after-commit figures); L{None} for a session that never logged in.
    @ivar after_messages: messages left after a successful commit, or
        L{None}.
    @ivar after_octets: their size, or L{None}.
    @ivar uidl_hash: the L{UidlHash} at login, or L{None}.
    @ivar end: how the session ended (see L{pop3srv.server.protocol}), or
        L{None} while it goes on.
    """

    session: str
    client: str
    listener: str
    started: float
    tls: tuple[str, str] | None = None
    user: str | None = None
    method: str | None = None
    messages: int | None = None
    octets: int | None = None
    retr: int = 0
    retr_octets: int = 0
    top: int = 0
    dele: int | None = None
    after_messages: int | None = None
    after_octets: int | None = None
    uidl_hash: str | None = None
    end: str | None = None

    def add_retr_octets(self, octets: int) -> None:
        """Count octets of a C{RETR} response written to the connection."""
        self.retr_octets += octets

    def fields(self, ended: float) -> dict[str, Any]:
        """The summary line's fields, as the line shows them (see L{FORMAT})."""
        version, cipher = self.tls if self.tls is not None else ("none", "none")

        def number(value: int | None) -> int | str:
            return "-" if value is None else value

        return {
            "session": _token(self.session),
            "user": quote_user(self.user),
            "client": _token(self.client),
            "listener": _token(self.listener),
            "tls": _token(version),
            "cipher": _token(cipher),
            "method": _token(self.method),
            "duration": round(max(0.0, ended - self.started), 3),
            "messages": number(self.messages),
            "octets": number(self.octets),
            "retr": self.retr,
            "retr_octets": self.retr_octets,
            "top": self.top,
            "dele": number(self.dele),
            "after_messages": number(self.after_messages),
            "after_octets": number(self.after_octets),
            "end": _token(self.end),
            "uidl_hash": _token(self.uidl_hash),
        }


def log_summary(figures: SessionFigures, ended: float) -> None:
    """
    Log a session's summary line (namespace C{pop3srv.session}).

    @param figures: what the session did; its C{end} should be set.
    @param ended: when it ended, on the clock of C{figures.started}.
    """
    _log.info(FORMAT, session_summary=True, **figures.fields(ended))


def tls_description(connection: object) -> tuple[str, str]:
    """
    The TLS version and cipher of a pyOpenSSL connection whose handshake is
    done (C{transport.getHandle()}), each C{unknown} where it cannot tell.
    """
    names = []
    for method in ("get_protocol_version_name", "get_cipher_name"):
        getter = getattr(connection, method, None)
        try:
            value = getter() if getter is not None else None
        except Exception:
            value = None
        names.append(value if isinstance(value, str) and value else "unknown")
    return names[0], names[1]
