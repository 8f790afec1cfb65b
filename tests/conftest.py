"""
Shared test settings and fixtures.

A deterministic Hypothesis profile, as Twisted's own suite uses, and the
fixtures for the fakes, the users and the servers.  The fakes themselves are
in C{helpers.py} (importable by name, since pytest puts this directory on
the path), the live server in C{livepop3.py}, test certificates in
C{certs.py}.

One async style per layer:

  - L0 pure code (C{pop3srv.core}, C{pop3srv.mbox} scanning, quoting,
    indexes and commits): plain functions and Hypothesis; no Deferreds, no
    reactor.
  - L1 Twisted objects in memory (limits and the policy authority, whose
    in-memory answers are Deferreds that have already fired; protocol,
    abuse, STLS, SASL over iosim, realm, TLS context, checker, tap):
    synchronous.  A fake clock
    (L{clock}, C{MemoryReactorClock}), C{StringTransport} or C{iosim}, and
    L{helpers.run_now} instead of a thread pool, so each Deferred has fired
    when the call returns; its value is read with L{helpers.result_of} and
    L{helpers.failure_of} (C{successResultOf}/C{failureResultOf} in the
    trial-style C{SynchronousTestCase} modules).  Never the global reactor.
  - L2 real child processes and pipes inside the test process (hashing
    pool, relay, forking): the global reactor, iterated with
    L{helpers.run_until} until a Deferred fires; never C{reactor.run()}.
  - L3 a real C{twistd pop3srv} (integration, TLS, SASL, abuse, workers,
    examples): blocking stdlib clients (C{poplib}, C{ssl}, C{socket})
    against L{live_server}; no reactor in the test process.
  - L4 the built wheel in a fresh virtualenv (packaging).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from helpers import MESSAGES, FakeMailbox, FakeRealm
from hypothesis import HealthCheck, settings
from livepop3 import Pop3Server, write_mbox, write_users
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

settings.register_profile(
    "pop3srv",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("pop3srv")


@pytest.fixture
def clock() -> MemoryReactorClock:
    """A fake reactor whose time moves only when the test advances it."""
    return MemoryReactorClock()


@pytest.fixture
def fake_mailbox(clock: MemoryReactorClock) -> FakeMailbox:
    """A L{FakeMailbox} over L{MESSAGES} that answers plainly."""
    return FakeMailbox(list(MESSAGES), "plain", clock)


@pytest.fixture
def fake_realm(fake_mailbox: FakeMailbox) -> FakeRealm:
    """A L{FakeRealm} handing out L{fake_mailbox}."""
    return FakeRealm(fake_mailbox)


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    """Every event logged through the global log publisher during the test."""
    collected: list[LogEvent] = []
    observer = cast(ILogObserver, collected.append)
    globalLogPublisher.addObserver(observer)
    yield collected
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """
    A Dovecot-style user file with cheap SHA512-CRYPT hashes for the users
    and passwords of L{livepop3.PASSWORDS}.
    """
    path = tmp_path / "users"
    write_users(path)
    return path


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., Pop3Server]]:
    """
    Start real C{twistd pop3srv} processes: C{live_server(*extra,
    mail={"alice": [message, ...]}, cls=Pop3Server, **kwargs)} writes the
    mboxes, starts the server and returns it; every server started is
    stopped after the test.  The first lives in C{tmp_path}, later ones in
    subdirectories of it.
    """
    servers: list[Pop3Server] = []

    def start(
        *extra: str,
        mail: dict[str, list[bytes]] | None = None,
        cls: Callable[..., Pop3Server] = Pop3Server,
        **kwargs: Any,
    ) -> Pop3Server:
        root = tmp_path if not servers else tmp_path / f"server-{len(servers)}"
        root.mkdir(exist_ok=True)
        srv = cls(root, *extra, **kwargs)
        servers.append(srv)
        for user, messages in (mail or {}).items():
            write_mbox(srv.mail / user, messages)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()
