"""
SASL AUTH (RFC 5034) and UTF8 (RFC 6856) against the real C{twistd pop3srv}:
PLAIN and LOGIN driven with poplib and curl, SCRAM-SHA-256 and
SCRAM-SHA-256-PLUS with a client written from RFC 5802, app passwords.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import Authority
from helpers import ScramClient, b64
from livepop3 import PASSWORDS, Pop3Server, write_mbox
from passlib.hash import scram as scram_hash

PW = PASSWORDS["alice"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Root CA file, server certificate, key."""
    directory = tmp_path_factory.mktemp("pki")
    root = Authority.create()
    cert, key = root.issue(directory, "server", serial=77)
    return root.write_ca(directory / "root.pem"), cert, key


def start(tmp_path: Path, pki: tuple[Path, Path, Path], *extra: str) -> Pop3Server:
    """A server whose alice has an argon2-free SHA512-CRYPT line and a SCRAM line."""
    srv = Pop3Server(
        tmp_path, "--tls-cert", str(pki[1]), "--tls-key", str(pki[2]),
        "--listen-tls", "tcp:0:interface=127.0.0.1", *extra,
    )  # fmt: skip
    with srv.users.open("a") as f:
        f.write(f"alice:{scram_hash.using(rounds=4096).hash(PW)}\n")
    write_mbox(srv.mail / "alice", [b"Subject: sasl\n\nhello\n"])
    return srv.start()


@pytest.fixture
def server(tmp_path: Path, pki: tuple[Path, Path, Path]) -> Iterator[Pop3Server]:
    """A running server on loopback (plaintext logins allowed there)."""
    srv = start(tmp_path, pki)
    yield srv
    srv.stop()


def client(srv: Pop3Server) -> poplib.POP3:
    """A fresh plain connection."""
    return poplib.POP3("127.0.0.1", srv.port, timeout=30)


def test_capa_lists_mechanisms_and_bare_auth(server: Pop3Server) -> None:
    """CAPA's SASL line and a bare AUTH list what the checkers can serve."""
    c = client(server)
    assert c.capa()["SASL"] == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
    assert "UTF8" in c.capa()
    assert c._longcmd("AUTH")[1] == [b"SCRAM-SHA-256", b"PLAIN", b"LOGIN"]
    assert c._shortcmd("UTF8").startswith(b"+OK")
    c.quit()


def test_plain_with_initial_response(server: Pop3Server) -> None:
    """AUTH PLAIN with an initial response logs in."""
    c = client(server)
    assert c._shortcmd("AUTH PLAIN " + b64(f"\0alice\0{PW}")).startswith(b"+OK Maildrop")
    assert c.stat()[0] == 1
    c.quit()
    assert 'user="alice" reason=sasl-plain' in server.log_text()


def test_plain_and_login_with_continuations_and_cancel(server: Pop3Server) -> None:
    """Empty challenge for PLAIN, Username:/Password: for LOGIN, '*' cancels."""
    c = client(server)
    assert c._shortcmd("AUTH PLAIN") == b"+ "
    with pytest.raises(poplib.error_proto):
        c._shortcmd("*")
    assert c._shortcmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
    assert c._shortcmd(b64("alice")) == b"+ " + b64("Password:").encode()
    assert c._shortcmd(b64(PW)).startswith(b"+OK Maildrop")
    c.quit()


def test_bad_base64_and_wrong_password(server: Pop3Server) -> None:
    """Malformed base64 and a wrong password are -ERR; the session goes on."""
    c = client(server)
    with pytest.raises(poplib.error_proto):
        c._shortcmd("AUTH PLAIN !!!notbase64")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        c._shortcmd("AUTH PLAIN " + b64("\0alice\0wrong"))
    assert "SASL" in c.capa()
    c.quit()


def scram_login(c: poplib.POP3, mechanism: str, client_: ScramClient) -> bytes:
    """Run a SCRAM exchange on C{c}; the final server line."""
    assert c._shortcmd(f"AUTH {mechanism}") == b"+ "
    server_first = c._shortcmd(client_.first())
    assert server_first.startswith(b"+ ")
    server_final = c._shortcmd(client_.final(base64.b64decode(server_first[2:])))
    assert server_final.startswith(b"+ ")
    assert client_.check_server(base64.b64decode(server_final[2:]))
    return c._shortcmd("")


def test_scram_sha_256(server: Pop3Server) -> None:
    """SCRAM-SHA-256 logs in without the password crossing the wire."""
    c = client(server)
    assert scram_login(c, "SCRAM-SHA-256", ScramClient("alice", PW)).startswith(b"+OK Maildrop")
    c.quit()


def test_scram_sha_256_plus_over_tls(tmp_path: Path, pki: tuple[Path, Path, Path]) -> None:
    """Over implicit TLS, -PLUS binds to the server certificate; a wrong binding fails."""
    srv = start(tmp_path, pki)
    try:
        port = int(srv.log_text().split("(TLS) starting on ")[1].split()[0])
        ctx = ssl.create_default_context(cafile=str(pki[0]))
        c = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=30)
        assert c.capa()["SASL"][0] == "SCRAM-SHA-256-PLUS"
        der = c.sock.getpeercert(binary_form=True)
        binding = hashlib.sha256(der).digest()
        plus = ScramClient("alice", PW, gs2_flag="p=tls-server-end-point", cbind_data=binding)
        assert scram_login(c, "SCRAM-SHA-256-PLUS", plus).startswith(b"+OK Maildrop")
        c.quit()
        c = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=30)
        forged = ScramClient("alice", PW, gs2_flag="p=tls-server-end-point", cbind_data=b"x" * 32)
        assert c._shortcmd("AUTH SCRAM-SHA-256-PLUS") == b"+ "
        server_first = c._shortcmd(forged.first())
        with pytest.raises(poplib.error_proto):
            c._shortcmd(forged.final(base64.b64decode(server_first[2:])))
        c.quit()
    finally:
        srv.stop()


def test_plaintext_mechanisms_hidden_without_tls(
    tmp_path: Path, pki: tuple[Path, Path, Path]
) -> None:
    """Outside trusted networks, only SCRAM is offered before TLS; PLAIN is refused."""
    srv = start(tmp_path, pki, "--plaintext-auth-networks", "10.77.0.0/16")
    try:
        c = client(srv)
        assert c.capa()["SASL"] == ["SCRAM-SHA-256"]
        with pytest.raises(poplib.error_proto):
            c._shortcmd("AUTH PLAIN " + b64(f"\0alice\0{PW}"))
        c.quit()
    finally:
        srv.stop()


def test_app_password_logs_its_label(server: Pop3Server) -> None:
    """A generated app password works, and the audit line names its label."""
    passwd = str(Path(sys.executable).with_name("pop3srv-passwd"))
    out = subprocess.run(
        [passwd, "--app", "phone", str(server.users), "alice"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    app_password = out.stdout.splitlines()[1].strip()
    c = client(server)
    assert c._shortcmd("AUTH PLAIN " + b64(f"\0alice\0{app_password}")).startswith(b"+OK")
    c.quit()
    assert 'user="alice" reason=sasl-plain+app:phone' in server.log_text()
    assert app_password not in server.log_text()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("options", [["--login-options", "AUTH=PLAIN"],
                                     ["--login-options", "AUTH=LOGIN"],
                                     ["--login-options", "AUTH=PLAIN", "--sasl-ir"]])  # fmt: skip
def test_curl_sasl(server: Pop3Server, options: list[str]) -> None:
    """curl logs in with PLAIN, LOGIN and PLAIN with an initial response."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *options, "--user", f"alice:{PW}",
         f"pop3://127.0.0.1:{server.port}/1"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.replace(b"\r\n", b"\n") == b"Subject: sasl\n\nhello\n"
    method = options[1].split("=")[1].lower()
    assert f'user="alice" reason=sasl-{method}' in server.log_text()
