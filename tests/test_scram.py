"""
Tests for L{pop3srv.core.scram}: the SCRAM-SHA-256 arithmetic against RFC 7677's
example, saslname escaping and fakes.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3srv.auth.credentials import ISCRAMProof, SCRAMCredentials
from pop3srv.core import scram

# RFC 7677 section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST_BARE = "n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_FINAL_WITHOUT_PROOF = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
RFC_AUTH_MESSAGE = ",".join(
    (RFC_CLIENT_FIRST_BARE, RFC_SERVER_FIRST, RFC_FINAL_WITHOUT_PROOF)
).encode()


def rfc_stored() -> scram.StoredScram:
    """
    @return: the stored keys for RFC 7677's user C{user}, password C{pencil}.
    """
    salted = scram.salted_password(b"pencil", RFC_SALT, 4096)
    return scram.stored_from_salted(RFC_SALT, 4096, salted)


def test_rfc7677_proof_and_signature() -> None:
    """
    RFC 7677's client proof verifies and the server signature is the one
    the RFC shows, byte for byte.
    """
    stored = rfc_stored()
    assert scram.verify_proof(stored, RFC_AUTH_MESSAGE, RFC_PROOF)
    assert scram.server_signature(stored, RFC_AUTH_MESSAGE) == RFC_SIGNATURE


def test_wrong_proof_refused() -> None:
    """
    A proof with one bit flipped, a short proof and the right proof for a
    different message are all refused.
    """
    stored = rfc_stored()
    flipped = bytes([RFC_PROOF[0] ^ 1]) + RFC_PROOF[1:]
    assert not scram.verify_proof(stored, RFC_AUTH_MESSAGE, flipped)
    assert not scram.verify_proof(stored, RFC_AUTH_MESSAGE, RFC_PROOF[:-1])
    assert not scram.verify_proof(stored, RFC_AUTH_MESSAGE + b"x", RFC_PROOF)


def test_credentials_check_proof() -> None:
    """
    L{SCRAMCredentials} provides L{ISCRAMProof}, checks its proof against
    given keys and keeps the proof out of its repr; so does the plain
    L{scram.ScramProof} the core hands over.
    """
    creds = SCRAMCredentials(b"user", RFC_AUTH_MESSAGE, RFC_PROOF)
    assert ISCRAMProof.providedBy(creds)
    assert creds.checkProof(rfc_stored())
    assert creds.authzid is None
    assert "dHzb" not in repr(creds) and RFC_PROOF.hex() not in repr(creds)
    assert "stored_key" not in repr(rfc_stored())
    proof = scram.ScramProof(RFC_AUTH_MESSAGE, RFC_PROOF)
    assert proof.check(rfc_stored())
    assert not scram.ScramProof(RFC_AUTH_MESSAGE + b"x", RFC_PROOF).check(rfc_stored())
    assert "dHzb" not in repr(proof) and RFC_PROOF.hex() not in repr(proof)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [("user", "user"), ("a,b", "a=2Cb"), ("a=b", "a=3Db"), ("=,=", "=3D=2C=3D")],
)
def test_saslname_escaping(name: str, escaped: str) -> None:
    """
    C{,} and C{=} are escaped as RFC 5802 says, and unescaping undoes it.
    """
    assert scram.escape_saslname(name) == escaped
    assert scram.unescape_saslname(escaped) == name


@pytest.mark.parametrize("bad", ["a=2", "a=", "a=3d", "a=XYb", "a,b"])
def test_bad_saslname(bad: str) -> None:
    """
    An unknown C{=} escape or a bare comma is an error.
    """
    with pytest.raises(ValueError):
        scram.unescape_saslname(bad)


@given(st.text())
def test_escape_round_trip(name: str) -> None:
    """
    Any name survives escaping and unescaping, and the escaped form has no
    comma.
    """
    escaped = scram.escape_saslname(name)
    assert "," not in escaped
    assert scram.unescape_saslname(escaped) == name


def test_nonce_is_printable_and_fresh() -> None:
    """
    Nonces are printable without commas, and differ each time.
    """
    nonces = {scram.make_nonce() for _ in range(50)}
    assert len(nonces) == 50
    for nonce in nonces:
        assert "," not in nonce
        assert all("\x21" <= c <= "\x7e" for c in nonce)


def test_fake_stored_is_stable_and_plausible() -> None:
    """
    A fake for one name is the same each time, differs between names and
    secrets, and has a 16-octet salt and the iteration count asked for.
    """
    one = scram.fake_stored(b"k" * 32, "ghost", 4096)
    assert one == scram.fake_stored(b"k" * 32, "ghost", 4096)
    assert one.salt != scram.fake_stored(b"k" * 32, "ghost2", 4096).salt
    assert one.salt != scram.fake_stored(b"j" * 32, "ghost", 4096).salt
    assert len(one.salt) == 16
    assert one.iterations == 4096
    assert not scram.verify_proof(one, RFC_AUTH_MESSAGE, RFC_PROOF)
