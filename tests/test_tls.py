"""
Tests for L{pop3srv.server.tls}: the certificate source loads a chain and key
made by L{certs}, C{reload} takes renewed files and keeps the old pair when
the new one is bad, and every file problem is a one-line L{TLSConfigError}
naming the file; the channel binding data SCRAM-SHA-256-PLUS uses
(RFC 5929, RFC 9266) is taken from a real handshake.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import Authority
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import LogEvent, formatEvent
from zope.interface.verify import verifyObject

from pop3srv.server.tls import (
    TLSConfigError,
    TLSContextSource,
    TLSMinimum,
    bindings_from_tls_connection,
    load_tls,
    tls_server_end_point,
)


@dataclass
class Files:
    """A chain (leaf + intermediate) and key, a renewal of it, and a key of another leaf."""

    cert: Path
    key: Path
    new_cert: Path
    new_key: Path
    stray_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Certificates for localhost signed through an intermediate."""
    directory = tmp_path_factory.mktemp("pki")
    middle = Authority.create().intermediate()
    cert, key = middle.issue(directory, "server", serial=1001, chain=[middle.cert])
    new_cert, new_key = middle.issue(directory, "renewed", serial=2002, chain=[middle.cert])
    _, stray = middle.issue(directory, "stray", serial=3003)
    return Files(cert, key, new_cert, new_key, stray)


@pytest.fixture
def live(tmp_path: Path, pki: Files) -> tuple[Path, Path]:
    """Copies of the first pair at the paths a server is configured with."""
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    return cert, key


def options(context: SSL.Context) -> int:
    """The context's option mask (pyOpenSSL has no getter; adding no option returns it)."""
    return int(context.set_options(0))


def _one_line(error: pytest.ExceptionInfo[TLSConfigError], path: Path) -> str:
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    return text


def test_loads_chain_and_key(live: tuple[Path, Path]) -> None:
    """
    The source is an IOpenSSLContextFactory whose context serves the leaf's
    serial; the same context object is returned until a reload.
    """
    source = TLSContextSource(str(live[0]), str(live[1]))
    assert verifyObject(IOpenSSLContextFactory, source)
    assert source.serial == 1001
    context = source.getContext()
    assert isinstance(context, SSL.Context)
    assert source.getContext() is context


def test_minimum_version(live: tuple[Path, Path]) -> None:
    """TLSMinimum names the versions by their numbers; 1.2 is the default, 1.3 is taken."""
    assert TLSMinimum("1.2") is TLSMinimum.TLS1_2
    assert TLSMinimum("1.3") is TLSMinimum.TLS1_3
    with pytest.raises(ValueError):
        TLSMinimum("1.1")
    assert TLSContextSource(str(live[0]), str(live[1])).minimum is TLSMinimum.TLS1_2
    strict = TLSContextSource(str(live[0]), str(live[1]), TLSMinimum.TLS1_3)
    assert strict.minimum is TLSMinimum.TLS1_3
    assert options(strict.getContext()) & SSL.OP_NO_TLSv1_2
    lenient = TLSContextSource(str(live[0]), str(live[1])).getContext()
    assert not options(lenient) & SSL.OP_NO_TLSv1_2
    assert options(lenient) & SSL.OP_NO_TLSv1_1


def test_renegotiation_disabled(live: tuple[Path, Path]) -> None:
    """Client-initiated renegotiation is switched off where OpenSSL has the option."""
    option = getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    context = TLSContextSource(str(live[0]), str(live[1])).getContext()
    assert options(context) & option == option


def test_reload_takes_renewed_files(
    live: tuple[Path, Path], pki: Files, log_events: list[LogEvent]
) -> None:
    """After the files are replaced, reload() serves the new certificate and says so."""
    source = TLSContextSource(str(live[0]), str(live[1]))
    old_context = source.getContext()
    shutil.copy(pki.new_cert, live[0])
    shutil.copy(pki.new_key, live[1])
    assert source.serial == 1001  # nothing changes until asked
    assert source.reload() is True
    assert source.serial == 2002
    assert source.getContext() is not old_context
    assert any("reloaded" in formatEvent(e) and "2002" in formatEvent(e) for e in log_events)


def test_reload_keeps_old_pair_when_new_is_bad(
    live: tuple[Path, Path], pki: Files, log_events: list[LogEvent]
) -> None:
    """A renewal with a key of another certificate is refused, logged, and the old pair kept."""
    source = TLSContextSource(str(live[0]), str(live[1]))
    context = source.getContext()
    shutil.copy(pki.new_cert, live[0])
    shutil.copy(pki.stray_key, live[1])
    assert source.reload() is False
    assert source.serial == 1001
    assert source.getContext() is context
    assert any("not reloaded" in formatEvent(e) for e in log_events)


def test_missing_file(tmp_path: Path, pki: Files) -> None:
    """A missing certificate or key names the file and what it should hold."""
    missing = tmp_path / "nope.crt"
    with pytest.raises(TLSConfigError) as error:
        TLSContextSource(str(missing), str(pki.key))
    assert "cannot read certificate" in _one_line(error, missing)
    with pytest.raises(TLSConfigError) as error:
        TLSContextSource(str(pki.cert), str(missing))
    assert "cannot read private key" in _one_line(error, missing)


def test_not_pem(tmp_path: Path, pki: Files) -> None:
    """A file that is not PEM (or holds the wrong kind of PEM) is named."""
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError) as error:
        load_tls(str(junk), str(pki.key))
    assert "no valid PEM certificate" in _one_line(error, junk)
    with pytest.raises(TLSConfigError) as error:
        load_tls(str(pki.cert), str(junk))
    assert "not a PEM private key" in _one_line(error, junk)
    # The two files swapped: a key where the certificate belongs, and back.
    with pytest.raises(TLSConfigError) as error:
        load_tls(str(pki.key), str(pki.cert))
    _one_line(error, pki.key)


def test_key_of_another_certificate(pki: Files) -> None:
    """A key that does not belong to the certificate names both files."""
    with pytest.raises(TLSConfigError) as error:
        load_tls(str(pki.cert), str(pki.stray_key))
    text = _one_line(error, pki.stray_key)
    assert "does not match" in text and str(pki.cert) in text


def test_encrypted_key(tmp_path: Path, pki: Files) -> None:
    """An encrypted key is refused with a hint that it must be unencrypted."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError) as error:
        load_tls(str(pki.cert), str(locked))
    assert "unencrypted" in _one_line(error, locked)


def test_config_error_is_value_error() -> None:
    """Callers that catch ValueError for bad settings also catch TLSConfigError."""
    assert issubclass(TLSConfigError, ValueError)


# --- channel binding data


def certificate(key: object, algorithm: hashes.HashAlgorithm | None) -> bytes:
    """
    @return: a self-signed certificate for C{key}, signed with C{algorithm}, DER.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.DER)


SHA1_CERT = (
    "MIIBfDCCASKgAwIBAgIUJiNsR2Qoawm5B+vrHU1XQsRKXWowCQYHKoZIzj0EATAUMRIwEAYDVQQD"
    "DAlzaGExLXRlc3QwHhcNMjYxMTI2MDc0MTAzWhcNMzYxMTIzMDc0MTAzWjAUMRIwEAYDVQQDDAlz"
    "aGExLXRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATO5ehgv3LBU+zVaNaNj3T6KJUStvv7"
    "zqsn6CDaQqVYlOa1o4JWM3ReJAwPBluFT1YL5OrXCxAHhaCujmJy2o4Vo1MwUTAdBgNVHQ4EFgQU"
    "l1rJuEUAVQxXTvy/XWUs00KYRiYwHwYDVR0jBBgwFoAUl1rJuEUAVQxXTvy/XWUs00KYRiYwDwYD"
    "VR0TAQH/BAUwAwEB/zAJBgcqhkjOPQQBA0kAMEYCIQCY0318hTwkcKHgcgkfEIlH0yxBOqSuFKhT"
    "qGsy19HnwAIhALO7n5kmx9KDq7q57E42436JsAirRJJoVlyCsjv4CYDG"
)


def test_tls_server_end_point_hash_choice() -> None:
    """
    RFC 5929: the certificate's signature hash (SHA-384 stays SHA-384),
    SHA-1 becomes SHA-256, and a hashless signature (Ed25519) uses SHA-256.
    """
    ec_key = ec.generate_private_key(ec.SECP256R1())
    der = certificate(ec_key, hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()
    der = certificate(ec_key, hashes.SHA256())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    # Made with "openssl req -x509 -sha1": cryptography will not sign with SHA-1.
    der = base64.b64decode(SHA1_CERT)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    der = certificate(ed25519.Ed25519PrivateKey.generate(), None)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_bindings_from_tls_connection() -> None:
    """
    After a real TLS 1.3 handshake (memory BIOs), the server offers
    C{tls-exporter} with the same data the client derives, and
    C{tls-server-end-point} of its certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    der = certificate(key, hashes.SHA256())
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.use_certificate(x509.load_der_x509_certificate(der))
    server_ctx.use_privatekey(key)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert server.get_protocol_version_name() == "TLSv1.3"
    bindings = bindings_from_tls_connection(server)
    assert [b.type for b in bindings] == ["tls-exporter", "tls-server-end-point"]
    assert bindings[0].data == client.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    assert bindings[1].data == hashlib.sha256(der).digest()
    assert "data" not in repr(bindings[0]) and repr(bindings[0]) == "ChannelBinding('tls-exporter')"
