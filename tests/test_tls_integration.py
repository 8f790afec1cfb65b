"""
TLS against the real C{twistd pop3srv} process: implicit TLS (RFC 8314) and
STLS (RFC 2595) with real handshakes from Python's ssl, poplib, curl and
openssl s_client; the STARTTLS injection case; old protocol versions;
plaintext-login policy; certificate rotation on SIGHUP; start-up errors.
"""

from __future__ import annotations

import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from certs import Authority
from livepop3 import PASSWORDS, TWISTD, Pop3Server, free_port, write_mbox

MESSAGES = [b"Subject: secret\n\nover TLS only\n", b"Subject: two\n\n.dot\n"]


@dataclass
class PKI:
    """Test certificates: a root, a chain with an intermediate, a second leaf, a stray key."""

    root: Path
    cert: Path
    key: Path
    new_cert: Path
    new_key: Path
    stray_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Certificates for localhost and 127.0.0.1, signed through an intermediate."""
    directory = tmp_path_factory.mktemp("pki")
    root = Authority.create()
    middle = root.intermediate()
    cert, key = middle.issue(directory, "server", serial=1001, chain=[middle.cert])
    new_cert, new_key = middle.issue(directory, "renewed", serial=2002, chain=[middle.cert])
    _, stray = middle.issue(directory, "stray", serial=3003)
    return PKI(root.write_ca(directory / "root.pem"), cert, key, new_cert, new_key, stray)


class TLSServer(Pop3Server):
    """A pop3srv process with STLS on the plain port and implicit TLS on a second one."""

    def __init__(self, root: Path, pki: PKI, *extra: str) -> None:
        self.tls_port = free_port()
        self.cert = root / "live.crt"
        self.key = root / "live.key"
        shutil.copy(pki.cert, self.cert)
        shutil.copy(pki.key, self.key)
        super().__init__(
            root,
            "--listen-tls", f"tcp:{self.tls_port}:interface=127.0.0.1",
            "--tls-cert", str(self.cert), "--tls-key", str(self.key),
            *extra,
        )  # fmt: skip


@pytest.fixture
def server(live_server: Callable[..., Pop3Server], pki: PKI) -> TLSServer:
    """A running TLS-enabled server with alice's messages."""
    return cast(TLSServer, live_server(pki, mail={"alice": MESSAGES}, cls=TLSServer))


def context(pki: PKI) -> ssl.SSLContext:
    """A client context that trusts only the test root (so the chain must be sent whole)."""
    return ssl.create_default_context(cafile=str(pki.root))


def serial_of(sock: ssl.SSLSocket) -> int:
    """The serial number of the server certificate on C{sock}."""
    return int(sock.getpeercert()["serialNumber"], 16)


def test_pop3s_with_poplib(server: TLSServer, pki: PKI) -> None:
    """POP3_SSL verifies the chain, logs in, reads mail; CAPA has USER and no STLS."""
    client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=context(pki), timeout=30)
    assert serial_of(client.sock) == 1001
    capabilities = client.capa()
    assert "STLS" not in capabilities and "USER" in capabilities
    client.user("alice")
    client.pass_(PASSWORDS["alice"])
    assert client.retr(1)[1] == [b"Subject: secret", b"", b"over TLS only"]
    client.quit()


def test_stls_with_poplib(server: TLSServer, pki: PKI) -> None:
    """STLS is offered before TLS and gone after it; a second STLS is refused."""
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    assert "STLS" in client.capa()
    client.stls(context=context(pki))
    assert serial_of(client.sock) == 1001
    assert "STLS" not in client.capa()
    with pytest.raises(poplib.error_proto, match="TLS is already active"):
        client._shortcmd("STLS")
    client.user("alice")
    client.pass_(PASSWORDS["alice"])
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        client._shortcmd("STLS")
    client.quit()


def test_stls_with_arguments_is_refused(server: TLSServer) -> None:
    """STLS takes no arguments."""
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    with pytest.raises(poplib.error_proto, match="takes no arguments"):
        client._shortcmd("STLS please")
    client.quit()


def test_starttls_command_injection_is_discarded(server: TLSServer, pki: PKI) -> None:
    """Commands sent in the same plaintext segment as STLS are never executed."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    greeting = raw.recv(1000)
    assert greeting.startswith(b"+OK")
    raw.sendall(b"STLS\r\nCAPA\r\nUSER alice\r\n")
    assert raw.recv(1000) == b"+OK Begin TLS negotiation.\r\n"
    tls = context(pki).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"PASS " + PASSWORDS["alice"].encode() + b"\r\n")
    assert tls.recv(1000) == b"-ERR Send USER first.\r\n"
    tls.sendall(b"NOOP\r\nQUIT\r\n")
    data = b""
    while chunk := tls.recv(1000):
        data += chunk
    # NOOP is a TRANSACTION command (RFC 1939), refused before login.
    assert data == b"-ERR Command not valid in this state.\r\n+OK Bye.\r\n"
    tls.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused(server: TLSServer, version: ssl.TLSVersion) -> None:
    """TLS 1.0 and 1.1 clients fail the handshake with a protocol-version alert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=30) as raw:
        with pytest.raises(ssl.SSLError) as caught:
            ctx.wrap_socket(raw, server_hostname="localhost")
    # The alert comes from the server: the client offered the version and was refused.
    assert "PROTOCOL_VERSION" in str(caught.value) or "UNSUPPORTED_PROTOCOL" in str(
        caught.value
    ).upper().replace(" ", "_")


def test_tls12_accepted_with_ecdhe_and_minimum_13_enforced(
    tmp_path: Path, pki: PKI, server: TLSServer
) -> None:
    """TLS 1.2 works by default with an ECDHE AEAD suite; --tls-min-version 1.3 refuses it."""
    ctx = context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            name, version, _ = tls.cipher()
            assert version == "TLSv1.2"
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
            assert tls.compression() is None
    (tmp_path / "strict").mkdir()
    strict = TLSServer(tmp_path / "strict", pki, "--tls-min-version", "1.3").start()
    try:
        with socket.create_connection(("127.0.0.1", strict.tls_port), timeout=30) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="localhost")
    finally:
        strict.stop()


def test_plaintext_login_refused_outside_trusted_networks(tmp_path: Path, pki: PKI) -> None:
    """With loopback not trusted, USER gets -ERR [AUTH] until STLS; greeting and CAPA say so."""
    srv = TLSServer(tmp_path, pki, "--plaintext-auth-networks", "10.99.0.0/16")
    write_mbox(srv.mail / "alice", MESSAGES)
    srv.start()
    try:
        client = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        assert b"STLS" in client.getwelcome()
        capabilities = client.capa()
        assert "USER" not in capabilities and "STLS" in capabilities
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext authentication"):
            client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext authentication"):
            client.pass_(PASSWORDS["alice"])
        client.stls(context=context(pki))
        assert "USER" in client.capa()
        client.user("alice")
        client.pass_(PASSWORDS["alice"])
        assert client.stat()[0] == 2
        client.quit()
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_pop3s_and_required_stls(server: TLSServer, pki: PKI) -> None:
    """curl fetches over pop3:// (implicit TLS) and over pop3:// with --ssl-reqd (STLS)."""
    common = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki.root),
              "--user", f"alice:{PASSWORDS['alice']}"]  # fmt: skip
    implicit = subprocess.run(
        [*common, f"pop3s://127.0.0.1:{server.tls_port}/1"], capture_output=True, check=True
    )
    assert implicit.stdout.replace(b"\r\n", b"\n") == MESSAGES[0]
    upgraded = subprocess.run(
        [*common, "--ssl-reqd", f"pop3://127.0.0.1:{server.port}/"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert upgraded.stdout.split() == [b"1", b"34", b"2", b"22"]


def s_client(*args: str, stdin: bytes) -> str:
    """Run openssl s_client, send C{stdin}, return everything it printed."""
    result = subprocess.run(
        ["openssl", "s_client", "-ign_eof", *args], input=stdin, capture_output=True, timeout=30
    )
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client(server: TLSServer, pki: PKI) -> None:
    """s_client verifies the chain both with -connect and with -starttls pop3."""
    session = b"USER alice\r\nPASS " + PASSWORDS["alice"].encode() + b"\r\nSTAT\r\nQUIT\r\n"
    verify = ["-CAfile", str(pki.root), "-verify_return_error"]
    implicit = s_client("-connect", f"127.0.0.1:{server.tls_port}", *verify, stdin=session)
    assert "Verify return code: 0 (ok)" in implicit and "+OK 2 56" in implicit
    upgraded = s_client(
        "-starttls", "pop3", "-connect", f"127.0.0.1:{server.port}", *verify, stdin=session
    )
    assert "Verify return code: 0 (ok)" in upgraded and "+OK 2 56" in upgraded
    assert "depth=1 CN = pop3srv test intermediate" in upgraded


def test_sighup_rotates_certificate_while_sessions_continue(server: TLSServer, pki: PKI) -> None:
    """After SIGHUP new handshakes see the new serial; an open session keeps working."""
    old_session = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=context(pki), timeout=30)
    old_session.user("alice")
    old_session.pass_(PASSWORDS["alice"])
    shutil.copy(pki.new_cert, server.cert)
    shutil.copy(pki.new_key, server.key)
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while True:
        probe = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=context(pki), timeout=30)
        serial = serial_of(probe.sock)
        probe.quit()
        if serial == 2002 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert serial == 2002
    upgraded = poplib.POP3("127.0.0.1", server.port, timeout=30)
    upgraded.stls(context=context(pki))
    assert serial_of(upgraded.sock) == 2002
    upgraded.quit()
    assert serial_of(old_session.sock) == 1001
    assert old_session.noop().startswith(b"+OK")
    assert old_session.retr(2)[1] == [b"Subject: two", b"", b"..dot"[1:]]
    old_session.quit()


def test_bad_new_certificate_is_logged_and_old_one_kept(server: TLSServer, pki: PKI) -> None:
    """A mismatched key on SIGHUP is logged; handshakes keep the old certificate."""
    shutil.copy(pki.new_cert, server.cert)
    shutil.copy(pki.stray_key, server.key)
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "not reloaded" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS certificate not reloaded, keeping the old one" in server.log_text()
    assert str(server.key) in server.log_text()
    client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=context(pki), timeout=30)
    assert serial_of(client.sock) == 1001
    client.quit()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("missing.crt", "key"), "missing.crt: cannot read certificate: No such file or directory"),
        (("key", "key"), ": no valid PEM certificate found"),
        (("cert", "stray"), "the private key does not match the certificate"),
        (("cert", "cert"), ": not a PEM private key"),
    ],
)
def test_startup_certificate_errors_are_one_line(
    tmp_path: Path, pki: PKI, files: tuple[str, str], message: str
) -> None:
    """Unusable certificate or key files stop start-up with one line naming the file."""
    names = {"cert": pki.cert, "key": pki.key, "stray": pki.stray_key}
    cert, key = (str(names.get(f, tmp_path / f)) for f in files)
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "pop3srv", "--auth", "memory:a:b",
         "--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert, "--tls-key", key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("twistd pop3srv: ") and message in lines[0]


def test_implicit_tls_without_certificate_is_refused() -> None:
    """--listen-tls without a certificate is a one-line start-up error."""
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "pop3srv", "--auth", "memory:a:b",
         "--listen-tls", "tcp:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "twistd pop3srv: --listen-tls: implicit TLS needs --tls-cert and --tls-key"
    )
