"""
Protocol-level tests of STLS and implicit TLS: state changes with iosim's
TLS negotiation, and a real in-memory handshake through TLSMemoryBIOFactory.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from certs import Authority
from helpers import MESSAGES, FakeMailbox, FakeRealm, Recorder
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from pop3srv.server.protocol import POP3ServerFactory
from pop3srv.server.tls import TLSContextSource

NOWHERE_TRUSTED = [ipaddress.ip_network("10.255.255.0/24")]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A root CA file and a server certificate chain (leaf + intermediate) and key."""
    directory = tmp_path_factory.mktemp("certs")
    root = Authority.create()
    middle = root.intermediate()
    cert, key = middle.issue(directory, "server", serial=1001, chain=[middle.cert])
    return root.write_ca(directory / "root.pem"), cert, key


def make_factory(tls_files: tuple[Path, Path, Path], networks: Any) -> POP3ServerFactory:
    """A server factory with a certificate and the given plaintext-auth networks."""
    _, cert, key = tls_files
    clock = MemoryReactorClock()
    realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock))
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    return POP3ServerFactory(
        Portal(realm, [checker]),
        reactor=clock,
        tls=TLSContextSource(str(cert), str(key)),
        plaintext_auth_networks=networks,
    )


class PretendContext:
    """What iosim's pretend TLS negotiation asks of a context factory."""

    def iosimVerify(self, other: object) -> bool:
        return True


def pretend_tls_pair(factory: POP3ServerFactory) -> tuple[Recorder, Any, iosim.IOPump]:
    """
    Server and client over iosim from 127.0.0.2 (not trusted unless the
    factory says so), whose startTLS only pretends to negotiate.
    """
    if factory.tls is not None:
        factory.tls.iosimVerify = PretendContext().iosimVerify
    peer = IPv4Address("TCP", "127.0.0.2", 50000)
    client, server, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None),
        Recorder,
        clock=factory.reactor,
        serverTransportFactory=lambda p: iosim.FakeTransport(p, isServer=True, peerAddress=peer),
    )
    return client, server, pump


def say(client: Recorder, pump: iosim.IOPump, data: bytes) -> bytes:
    """Send C{data} and return what came back."""
    client.received = b""
    client.transport.write(data)
    pump.flush()
    return client.received


def test_stls_resets_state_and_unlocks_login(tls_files: tuple[Path, Path, Path]) -> None:
    """Before STLS: no USER, STLS offered; after it: USER allowed, STLS gone, USER forgotten."""
    client, server, pump = pretend_tls_pair(make_factory(tls_files, NOWHERE_TRUSTED))
    assert client.received.startswith(b"+OK POP3 server ready; use STLS before logging in.")
    capa = say(client, pump, b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" in capa and b"\r\nUSER\r\n" not in capa
    assert say(client, pump, b"USER alice\r\n") == (
        b"-ERR [AUTH] Plaintext authentication is disallowed without TLS; use STLS first.\r\n"
    )
    assert say(client, pump, b"STLS now\r\n") == b"-ERR This command takes no arguments.\r\n"
    assert say(client, pump, b"STLS\r\n") == b"+OK Begin TLS negotiation.\r\n"
    client.transport.startTLS(PretendContext())
    pump.flush()
    assert ISSLTransport.providedBy(server.transport)
    capa = say(client, pump, b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" not in capa and b"\r\nUSER\r\n" in capa
    assert say(client, pump, b"PASS secret\r\n") == b"-ERR Send USER first.\r\n"
    assert say(client, pump, b"STLS\r\n") == b"-ERR TLS is already active.\r\n"
    reply = say(client, pump, b"USER alice\r\nPASS secret\r\n")
    assert reply.endswith(b"+OK Maildrop has 2 messages (73 octets).\r\n")


def test_commands_pipelined_after_stls_are_discarded(tls_files: tuple[Path, Path, Path]) -> None:
    """CVE-2011-0411: commands sent with STLS in one plaintext segment never run."""
    client, _server, pump = pretend_tls_pair(make_factory(tls_files, NOWHERE_TRUSTED))
    reply = say(client, pump, b"STLS\r\nCAPA\r\nUSER alice\r\n")
    assert reply == b"+OK Begin TLS negotiation.\r\n"
    client.transport.startTLS(PretendContext())
    # One reply, to this command alone (NOOP is a TRANSACTION command: RFC 1939).
    assert say(client, pump, b"NOOP\r\n") == b"-ERR Command not valid in this state.\r\n"
    assert say(client, pump, b"PASS secret\r\n") == b"-ERR Send USER first.\r\n"


def test_stls_refused_after_login_and_without_certificate(
    tls_files: tuple[Path, Path, Path],
) -> None:
    """STLS is not a TRANSACTION command, and without a certificate it is not offered."""
    factory = make_factory(tls_files, [ipaddress.ip_network("0.0.0.0/0")])
    client, _, pump = pretend_tls_pair(factory)
    say(client, pump, b"USER alice\r\nPASS secret\r\n")
    assert say(client, pump, b"STLS\r\n") == b"-ERR Command not valid in this state.\r\n"
    factory.tls = None
    client, _, pump = pretend_tls_pair(factory)
    assert b"STLS" not in say(client, pump, b"CAPA\r\n")
    assert say(client, pump, b"STLS\r\n") == b"-ERR STLS is not available.\r\n"


def test_implicit_tls_in_memory_handshake(tls_files: tuple[Path, Path, Path]) -> None:
    """A real TLS handshake in memory: the session is encrypted, USER allowed, no STLS."""
    root, _, _ = tls_files
    factory = make_factory(tls_files, NOWHERE_TRUSTED)
    server_factory = TLSMemoryBIOFactory(factory.tls, False, factory, clock=factory.reactor)
    authority = ssl.Certificate.loadPEM(root.read_bytes())
    client_options = ssl.optionsForClientTLS("localhost", trustRoot=authority)
    recorder = Recorder()

    class ClientFactory:
        def buildProtocol(self, addr: object) -> Recorder:
            return recorder

    client_factory = TLSMemoryBIOFactory(
        client_options, True, ClientFactory(), clock=factory.reactor
    )
    client, _server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=factory.reactor,
    )
    pump.flush()
    assert recorder.received.startswith(b"+OK POP3 server ready.")
    recorder.received = b""
    client.write(b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
    pump.flush()
    assert b"STLS" not in recorder.received and b"\r\nUSER\r\n" in recorder.received
    assert recorder.received.endswith(b"+OK 2 73\r\n")


def test_reload_api_for_embedders(tmp_path: Path) -> None:
    """TLSContextSource.reload takes a renewed pair and keeps the old one on a bad pair."""
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "live", serial=5001)
    source = TLSContextSource(str(cert), str(key))
    assert source.serial == 5001
    old_context = source.getContext()
    renewed_cert, renewed_key = authority.issue(tmp_path, "renewed", serial=5002)
    cert.write_bytes(renewed_cert.read_bytes())
    key.write_bytes(renewed_key.read_bytes())
    assert source.reload() is True
    assert source.serial == 5002 and source.getContext() is not old_context
    cert.write_bytes(b"not a certificate")
    assert source.reload() is False
    assert source.serial == 5002
