# -*- test-case-name: tests.test_wire -*-
"""
The POP3 commands a client can send, as parsed values.

Message numbers are kept as the client sent them (C{msn}, 1-based); the
session machine converts them to 0-based mailbox indexes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class User:
    """C{USER name}."""

    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    """C{PASS password}; the password is everything after the first space."""

    password: str


@dataclass(frozen=True, slots=True)
class Apop:
    """C{APOP name digest}."""

    name: str
    digest: str


@dataclass(frozen=True, slots=True)
class Stat:
    """C{STAT}."""


@dataclass(frozen=True, slots=True)
class List:
    """C{LIST [msn]}."""

    msn: int | None


@dataclass(frozen=True, slots=True)
class Retr:
    """C{RETR msn}."""

    msn: int


@dataclass(frozen=True, slots=True)
class Dele:
    """C{DELE msn}."""

    msn: int


@dataclass(frozen=True, slots=True)
class Noop:
    """C{NOOP}."""


@dataclass(frozen=True, slots=True)
class Rset:
    """C{RSET}."""


@dataclass(frozen=True, slots=True)
class Quit:
    """C{QUIT}."""


@dataclass(frozen=True, slots=True)
class Top:
    """C{TOP msn lines}."""

    msn: int
    lines: int


@dataclass(frozen=True, slots=True)
class Uidl:
    """C{UIDL [msn]}."""

    msn: int | None


@dataclass(frozen=True, slots=True)
class Capa:
    """C{CAPA} (RFC 2449)."""


@dataclass(frozen=True, slots=True)
class Stls:
    """C{STLS} (RFC 2595)."""


@dataclass(frozen=True, slots=True)
class Auth:
    """
    C{AUTH [mechanism [initial-response]]} (RFC 5034); a bare C{AUTH} asks
    for the list of mechanisms.
    """

    mechanism: str | None
    initial_response: str | None


@dataclass(frozen=True, slots=True)
class Utf8:
    """C{UTF8} (RFC 6856)."""


Command = (
    User
    | Pass
    | Apop
    | Stat
    | List
    | Retr
    | Dele
    | Noop
    | Rset
    | Quit
    | Top
    | Uidl
    | Capa
    | Stls
    | Auth
    | Utf8
)


@dataclass(frozen=True, slots=True)
class BadCommand:
    """
    A line that is not a valid command.

    @ivar reason: a short, client-safe explanation sent after C{-ERR}.
    """

    reason: str
