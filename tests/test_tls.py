"""
Tests for L{pop3srv.server.tls}: the certificate source loads a chain and key
made by L{certs}, C{reload} takes renewed files and keeps the old pair when
the new one is bad, and every file problem is a one-line L{TLSConfigError}
naming the file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import Authority
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import LogEvent, formatEvent
from zope.interface.verify import verifyObject

from pop3srv.server.tls import (
    TLSConfigError,
    TLSContextSource,
    TLSMinimum,
    load_tls,
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
