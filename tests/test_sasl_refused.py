"""SASL failures on the credentials (issue 12 item 5c): audited, counted and delayed."""

from __future__ import annotations

import ipaddress

from helpers import MESSAGES, FakeMailbox, FakeRealm, b64
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent

from pop3srv.server.protocol import POP3ServerFactory


def test_sasl_plain_foreign_authzid_is_audited_counted_and_delayed(
    log_events: list[LogEvent],
) -> None:
    """
    AUTH PLAIN with an authorization identity the checker would refuse is
    answered after the failure delay, audited as authzid-refused and
    counted, so five of them lock the pair out.
    """
    clock = MemoryReactorClock()
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    factory = POP3ServerFactory(
        Portal(FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock)), [checker]),
        reactor=clock,
        plaintext_auth_networks=[ipaddress.ip_network("0.0.0.0/0")],
    )
    for _ in range(5):
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.3", 40000))
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(b"AUTH PLAIN " + b64(b"bob\0alice\0secret").encode() + b"\r\n")
        assert transport.value() == b""
        clock.advance(31)
        assert transport.value() == b"-ERR [AUTH] Authentication failed.\r\n"
        # The session goes on in AUTHORIZATION.
        transport.clear()
        protocol.dataReceived(b"CAPA\r\n")
        assert transport.value().startswith(b"+OK")
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert sum("reason=authzid-refused" in line for line in lines) == 5
    assert any("event=lockout" in line for line in lines)
    # The pair is locked out now: the right password is refused without a check.
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.3", 40000))
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"AUTH PLAIN " + b64(b"\0alice\0secret").encode() + b"\r\n")
    clock.advance(31)
    assert transport.value() == b"-ERR [AUTH] Invalid username or password.\r\n"
