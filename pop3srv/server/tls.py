# -*- test-case-name: tests.test_tls -*-
"""
The server's TLS settings: one certificate source shared by the implicit-TLS
listeners (RFC 8314) and STLS (RFC 2595), re-read on demand (SIGHUP) so a
renewed certificate takes effect without a restart.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes as PrivateKey
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from pop3srv.core.sasl import ChannelBinding

# ECDHE key exchange with AEAD ciphers only (TLS 1.2); TLS 1.3 suites are all
# of that kind already and are not governed by this string.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


class TLSMinimum(enum.Enum):
    """The lowest TLS version a client may use."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


class TLSConfigError(ValueError):
    """A certificate or key problem, as one line naming the file."""


@dataclass(frozen=True)
class _Loaded:
    options: CertificateOptions
    context: SSL.Context
    serial: int
    certificate: x509.Certificate


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _load_chain(path: str) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{path}: no valid PEM certificate found") from None
    return certificates


def _load_key(path: str) -> PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"{path}: not a PEM private key (or it is encrypted; pop3srv needs it unencrypted)"
        ) from None
    return key


def load_tls(cert_path: str, key_path: str, minimum: TLSMinimum = TLSMinimum.TLS1_2) -> _Loaded:
    """
    Load and check a certificate chain and its key and build the context.

    @raise TLSConfigError: a file is missing, unreadable, not PEM, or the key
        does not belong to the certificate.
    """
    chain = _load_chain(cert_path)
    key = _load_key(key_path)
    try:
        # pyOpenSSL takes cryptography objects (its own PKey and X509 are
        # deprecated); Twisted's annotations still name the old types.
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_3
            if minimum is TLSMinimum.TLS1_3
            else TLSVersion.TLSv1_2,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
            enableSessions=False,
        )
        context = options.getContext()
    except SSL.Error:
        raise TLSConfigError(
            f"{key_path}: the private key does not match the certificate in {cert_path}"
        ) from None
    # Client-initiated renegotiation is a denial-of-service lever and has no use here.
    context.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    return _Loaded(options, context, chain[0].serial_number, chain[0])


@implementer(IOpenSSLContextFactory)
class TLSContextSource:
    """
    The current TLS context for new handshakes; L{reload} re-reads the files.

    Accepted wherever Twisted takes an old-style context factory (it has
    C{getContext}), so one source serves C{TLSMemoryBIOFactory} listeners
    and C{startTLS} for STLS alike.

    @raise TLSConfigError: from the constructor if the files are unusable.
    """

    _log = Logger()

    def __init__(
        self, cert_path: str, key_path: str, minimum: TLSMinimum = TLSMinimum.TLS1_2
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.minimum = minimum
        self._current = load_tls(cert_path, key_path, minimum)

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate new handshakes present."""
        return self._current.certificate

    @property
    def serial(self) -> int:
        """The serial number of the certificate new handshakes present."""
        return self._current.serial

    def getContext(self) -> SSL.Context:
        return self._current.context

    def reload(self) -> bool:
        """
        Re-read the certificate and key.  New handshakes use them; sessions
        already open are not affected.  A bad new pair is logged and the old
        one kept.

        @return: whether the new pair was taken.
        """
        try:
            loaded = load_tls(self.cert_path, self.key_path, self.minimum)
        except TLSConfigError as e:
            self._log.error(
                "TLS certificate not reloaded, keeping the old one: {error}", error=str(e)
            )
            return False
        self._current = loaded
        self._log.info(
            "TLS certificate reloaded from {path} (serial {serial})",
            path=self.cert_path,
            serial=loaded.serial,
        )
        return True


def tls_server_end_point(cert_der: bytes) -> bytes:
    """
    The C{tls-server-end-point} binding data of a certificate (RFC 5929
    section 4.1): its hash with the certificate's signature hash, except
    that MD5 and SHA-1 become SHA-256.  For a signature with no separate
    hash (Ed25519, Ed448) RFC 5929 says nothing; we use SHA-256, as
    OpenSSL-based SCRAM clients do.

    @param cert_der: our certificate, DER.
    @return: the hash.
    @raise ValueError: if C{cert_der} is not a certificate.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:
        algorithm = None
    name = algorithm.name if algorithm is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, cert_der).digest()


def bindings_from_tls_connection(connection: SSL.Connection) -> list[ChannelBinding]:
    """
    The channel bindings a server-side pyOpenSSL connection offers, once
    the handshake is done: C{tls-exporter} on TLS 1.3 only (RFC 9266 forbids
    it on TLS 1.2 without extended master secret, which pyOpenSSL cannot
    show us), and C{tls-server-end-point} whenever we sent a certificate.

    From Twisted: C{transport.getHandle()} after the handshake, for both
    implicit TLS and C{startTLS}.

    @param connection: an C{OpenSSL.SSL.Connection}, handshake complete.
    @return: the bindings, preferred first.
    """
    result = []
    try:
        if connection.get_protocol_version_name() == "TLSv1.3":
            data = connection.export_keying_material(b"EXPORTER-Channel-Binding", 32)
            result.append(ChannelBinding("tls-exporter", bytes(data)))
    except Exception:  # noqa: S110 - no binding is a safe answer
        pass
    try:
        cert = connection.get_certificate()
        if cert is not None:
            der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
            result.append(ChannelBinding("tls-server-end-point", tls_server_end_point(der)))
    except Exception:  # noqa: S110 - no binding is a safe answer
        pass
    return result
