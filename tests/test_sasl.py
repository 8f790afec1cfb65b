"""
Tests for L{pop3srv.core.sasl}: the SASL exchange (RFC 5034) with PLAIN, LOGIN
and SCRAM-SHA-256(-PLUS), driven by a SCRAM client written here from RFC
5802, and fuzzed with hypothesis.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from zope.interface import implementer

from pop3srv.auth.credentials import (
    ISCRAMLookup,
    ISCRAMProof,
    PasswordCredentials,
    credentials_for,
    mechanisms_for,
)
from pop3srv.core import sasl, scram
from pop3srv.core.sasl import (
    Challenge,
    ChannelBinding,
    Failure,
    Lookup,
    SASLServer,
    Success,
    Verify,
)
from pop3srv.server.tls import bindings_from_tls_connection, tls_server_end_point

ALL = [sasl.SCRAM_SHA_256_PLUS, sasl.SCRAM_SHA_256, sasl.PLAIN, sasl.LOGIN]
NO_PLUS = [sasl.SCRAM_SHA_256, sasl.PLAIN, sasl.LOGIN]
EXPORTER = ChannelBinding("tls-exporter", b"E" * 32)
END_POINT = ChannelBinding("tls-server-end-point", b"S" * 32)
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def b64(data: bytes | str) -> str:
    """
    @return: C{data} (UTF-8 if text) in base64.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def make_server(
    mechanisms: list[str] = ALL,
    *,
    tls: bool = True,
    plaintext: bool = True,
    bindings: tuple[ChannelBinding, ...] = (EXPORTER, END_POINT),
    authorize: Callable[[str, str], bool] | None = None,
    nonce: str | None = None,
) -> SASLServer:
    """
    @return: a server for one exchange.
    """
    return SASLServer(
        mechanisms=mechanisms,
        tls_active=tls,
        plaintext_allowed=plaintext,
        channel_bindings=bindings if tls else (),
        authorize=authorize,
        nonce_factory=(lambda: nonce) if nonce is not None else scram.make_nonce,
    )


def stored_for(
    password: str, salt: bytes = b"salt" * 4, iterations: int = 4096
) -> scram.StoredScram:
    """
    @return: stored keys for C{password}.
    """
    salted = scram.salted_password(password.encode(), salt, iterations)
    return scram.stored_from_salted(salt, iterations, salted)


class ScramClient:
    """
    A SCRAM-SHA-256 client written from RFC 5802 section 3, independent of
    L{pop3srv.core.scram}.
    """

    def __init__(
        self,
        user: str,
        password: str,
        gs2_flag: str = "n",
        cbind_data: bytes = b"",
        authzid: str = "",
        nonce: str = "fyko+d2lbbFgONRv9qkxdawL",
    ) -> None:
        authz = f"a={authzid.replace('=', '=3D').replace(',', '=2C')}" if authzid else ""
        self.gs2_header = f"{gs2_flag},{authz},"
        self.cbind_data = cbind_data
        self.password = password
        self.nonce = nonce
        name = user.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={name},r={nonce}"
        self.auth_message = b""
        self.salted = b""

    def first(self) -> str:
        """
        @return: client-first-message, base64.
        """
        return b64(self.gs2_header + self.first_bare)

    def final(self, server_first: bytes) -> str:
        """
        @return: client-final-message, base64.
        """
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salt = base64.b64decode(attrs["s"])
        self.salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, int(attrs["i"]))
        cbind = base64.b64encode(self.gs2_header.encode() + self.cbind_data).decode()
        without_proof = f"c={cbind},r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        client_key = hmac.new(self.salted, b"Client Key", "sha256").digest()
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored_key, self.auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return b64(f"{without_proof},p={base64.b64encode(proof).decode()}")

    def check_server(self, server_final: bytes) -> bool:
        """
        @return: whether the server's C{v=} proves it knows our keys.
        """
        server_key = hmac.new(self.salted, b"Server Key", "sha256").digest()
        expected = hmac.new(server_key, self.auth_message, "sha256").digest()
        return server_final == b"v=" + base64.b64encode(expected)


def run_scram(
    server: SASLServer,
    client: ScramClient,
    stored: scram.StoredScram | None,
    mechanism: str = sasl.SCRAM_SHA_256,
    initial: bool = False,
) -> tuple[list[object], ScramClient]:
    """
    Drive a whole SCRAM exchange, "logging in" whenever asked to verify.

    @return: every step the server returned, and the client.
    """
    steps: list[object] = []
    step = server.start(mechanism, client.first() if initial else None)
    steps.append(step)
    if isinstance(step, Challenge):
        assert step.payload == b""
        step = server.respond(client.first())
        steps.append(step)
    if not isinstance(step, Lookup):
        return steps, client
    step = server.lookup_done(stored)
    steps.append(step)
    assert isinstance(step, Challenge)
    step = server.respond(client.final(step.payload))
    steps.append(step)
    if not isinstance(step, Verify):
        return steps, client
    assert stored is not None
    assert credentials_for(step).checkProof(stored)  # type: ignore[attr-defined]
    step = server.verified()
    steps.append(step)
    assert isinstance(step, Challenge)
    assert client.check_server(step.payload)
    steps.append(server.respond(""))
    return steps, client


def test_rfc7677_exchange_byte_for_byte() -> None:
    """
    RFC 7677's example exchange, with its nonces and salt: every server
    message is the RFC's, byte for byte, and the login succeeds.
    """
    server = make_server([sasl.SCRAM_SHA_256], tls=False, nonce=RFC_SERVER_NONCE)
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    stored = stored_for("pencil", salt, 4096)
    assert server.start("scram-sha-256") == Challenge(b"")
    assert server.respond(b64("n,,n=user,r=rOprNGfwEbeRWgbNEkqO")) == Lookup("user")
    step = server.lookup_done(stored)
    assert step == Challenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    step = server.respond(
        b64(
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )
    )
    assert isinstance(step, Verify)
    assert step.username == "user" and step.authzid is None
    assert ISCRAMProof.providedBy(credentials_for(step))
    assert credentials_for(step).checkProof(stored)  # type: ignore[attr-defined]
    final = server.verified()
    assert final == Challenge(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert isinstance(final, Challenge)
    assert final.text_b64 == b64("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert server.respond("") == Success()
    assert server.done


def test_scram_wrong_password_fails_at_checker() -> None:
    """
    With the wrong password the exchange still reaches L{Verify} (the
    checker decides), and the proof does not check out.
    """
    server = make_server(NO_PLUS, tls=False)
    server.start(sasl.SCRAM_SHA_256)
    assert isinstance(server.respond(ScramClient("alice", "wrong").first()), Lookup)
    client = ScramClient("alice", "wrong")
    challenge = server.lookup_done(stored_for("right"))
    assert isinstance(challenge, Challenge)
    step = server.respond(client.final(challenge.payload))
    assert isinstance(step, Verify)
    assert not credentials_for(step).checkProof(stored_for("right"))  # type: ignore[attr-defined]


def test_scram_initial_response() -> None:
    """
    The client-first message may come as the initial response.
    """
    steps, _ = run_scram(
        make_server(NO_PLUS, tls=False), ScramClient("alice", "pw"), stored_for("pw"), initial=True
    )
    assert steps[0] == Lookup("alice")
    assert steps[-1] == Success()


@pytest.mark.parametrize("binding", [EXPORTER, END_POINT])
def test_scram_plus_with_each_binding(binding: ChannelBinding) -> None:
    """
    SCRAM-SHA-256-PLUS succeeds with either binding type when the client
    binds to the same data.
    """
    client = ScramClient("alice", "pw", f"p={binding.type}", binding.data)
    steps, _ = run_scram(make_server(), client, stored_for("pw"), sasl.SCRAM_SHA_256_PLUS)
    assert steps[-1] == Success()


def test_channel_binding_mismatch_refused() -> None:
    """
    A client bound to different TLS data (a man in the middle's) is refused
    with C{[AUTH]} before any verification.
    """
    client = ScramClient("alice", "pw", "p=tls-exporter", b"M" * 32)
    steps, _ = run_scram(make_server(), client, stored_for("pw"), sasl.SCRAM_SHA_256_PLUS)
    assert isinstance(steps[-1], Failure)
    assert steps[-1].code == "AUTH"
    assert steps[-1].detail == "channel binding mismatch"


def test_channel_binding_header_tampered() -> None:
    """
    A C{c=} that does not repeat the GS2 header is refused.
    """
    client = ScramClient("alice", "pw")
    server = make_server(NO_PLUS, tls=False)
    server.start(sasl.SCRAM_SHA_256, client.first())
    challenge = server.lookup_done(stored_for("pw"))
    assert isinstance(challenge, Challenge)
    client.gs2_header = "y,,"
    step = server.respond(client.final(challenge.payload))
    assert isinstance(step, Failure) and step.detail == "channel binding mismatch"


@pytest.mark.parametrize(
    ("mechanisms", "mechanism", "flag", "tls", "detail"),
    [
        (ALL, sasl.SCRAM_SHA_256, "p=tls-exporter", True, "non-PLUS"),
        (ALL, sasl.SCRAM_SHA_256_PLUS, "n", True, "without channel binding"),
        (ALL, sasl.SCRAM_SHA_256_PLUS, "y", True, "without channel binding"),
        (ALL, sasl.SCRAM_SHA_256_PLUS, "p=tls-unique", True, "unsupported channel binding"),
        (ALL, sasl.SCRAM_SHA_256, "y", True, "downgrade"),
        (ALL, sasl.SCRAM_SHA_256_PLUS, "n", False, "-PLUS without TLS"),
    ],
)
def test_channel_binding_negotiation_refusals(
    mechanisms: list[str], mechanism: str, flag: str, tls: bool, detail: str
) -> None:
    """
    Binding asked for with the plain mechanism, the -PLUS mechanism without
    binding, an unsupported binding type, -PLUS without TLS, and a client
    saying C{y} (it could bind but thinks we cannot) while we offer -PLUS:
    all refused (RFC 5802 section 6, downgrade protection).
    """
    client = ScramClient("alice", "pw", flag)
    step = make_server(mechanisms, tls=tls).start(mechanism, client.first())
    assert isinstance(step, Failure)
    assert detail in step.detail


def test_y_flag_accepted_without_plus_offered() -> None:
    """
    C{y} is fine when we do not offer -PLUS (no TLS): no downgrade happened.
    """
    client = ScramClient("alice", "pw", "y")
    steps, _ = run_scram(make_server(NO_PLUS, tls=False), client, stored_for("pw"))
    assert steps[-1] == Success()


def test_unknown_user_gets_fake_salt_and_fails() -> None:
    """
    If the lookup finds nothing, a plausible challenge is still sent and
    the exchange fails after the proof, without asking to verify.
    """
    server = make_server(NO_PLUS, tls=False)
    client = ScramClient("ghost", "pw")
    server.start(sasl.SCRAM_SHA_256, client.first())
    challenge = server.lookup_done(None)
    assert isinstance(challenge, Challenge)
    assert b",s=" in challenge.payload and challenge.payload.endswith(b",i=4096")
    step = server.respond(client.final(challenge.payload))
    assert isinstance(step, Failure) and step.code == "AUTH"


def test_scram_nonce_mismatch() -> None:
    """
    A client-final with a different nonce is refused.
    """
    server = make_server(NO_PLUS, tls=False)
    client = ScramClient("alice", "pw")
    server.start(sasl.SCRAM_SHA_256, client.first())
    challenge = server.lookup_done(stored_for("pw"))
    assert isinstance(challenge, Challenge)
    tampered = challenge.payload.replace(b"r=fyko", b"r=fyk0")
    client.nonce = "fyk0"
    step = server.respond(client.final(tampered))
    assert isinstance(step, Failure) and "nonce" in step.detail


def test_scram_cancel_after_server_final() -> None:
    """
    A client that rejects the server signature cancels with C{*}; the
    caller must then log out the avatar it got.
    """
    server = make_server(NO_PLUS, tls=False)
    client = ScramClient("alice", "pw")
    server.start(sasl.SCRAM_SHA_256, client.first())
    challenge = server.lookup_done(stored_for("pw"))
    assert isinstance(challenge, Challenge)
    assert isinstance(server.respond(client.final(challenge.payload)), Verify)
    assert isinstance(server.verified(), Challenge)
    step = server.respond("*")
    assert isinstance(step, Failure) and step.code is None
    assert isinstance(server.respond(""), Failure)


@pytest.mark.parametrize(
    "message",
    [
        "n,,m=ext,n=user,r=abc",
        "n,,r=abc,n=user",
        "n,,n=user",
        "n,,n=,r=abc",
        "n,,n=us=ZZer,r=abc",
        "n,,n=user,r=a b",
        "x,,n=user,r=abc",
        "n,b=x,n=user,r=abc",
        "n",
        "n,",
        "n,,",
        "p=,,n=user,r=abc",
        "n,,n=user,r=abc,,",
    ],
)
def test_malformed_client_first(message: str) -> None:
    """
    Malformed client-first messages (mandatory extension, wrong order,
    missing nonce, bad escapes, bad GS2 header) end in L{Failure}.
    """
    step = make_server(NO_PLUS, tls=False).start(sasl.SCRAM_SHA_256, b64(message))
    assert isinstance(step, Failure)


def test_scram_authzid() -> None:
    """
    An authzid in the GS2 header equal to the user is fine; a different one
    is refused unless the master-user hook allows it, and then L{Verify}
    names it.
    """
    same = ScramClient("alice", "pw", authzid="alice")
    assert isinstance(
        make_server(NO_PLUS, tls=False).start(sasl.SCRAM_SHA_256, same.first()), Lookup
    )
    other = ScramClient("admin", "pw", authzid="bob")
    step = make_server(NO_PLUS, tls=False).start(sasl.SCRAM_SHA_256, other.first())
    assert isinstance(step, Failure) and step.code == "AUTH"
    server = make_server(NO_PLUS, tls=False, authorize=lambda c, z: (c, z) == ("admin", "bob"))
    steps, _ = run_scram(
        server, ScramClient("admin", "pw", authzid="bob"), stored_for("pw"), initial=True
    )
    verify = [s for s in steps if isinstance(s, Verify)]
    assert verify[0].username == "admin" and verify[0].authzid == "bob"


# --- PLAIN and LOGIN


def test_plain_initial_response() -> None:
    """
    C{AUTH PLAIN <ir>} asks to verify at once, with UTF-8 credentials in a
    L{PasswordCredentials}; after success the exchange ends.
    """
    server = make_server()
    step = server.start("plain", b64("\0jos\u00e9\0p\u00e4ss word"))
    assert isinstance(step, Verify)
    creds = credentials_for(step)
    assert IUsernamePassword.providedBy(creds) and isinstance(creds, PasswordCredentials)
    assert creds.username == "jos\u00e9".encode() and creds.password == "p\u00e4ss word".encode()
    assert "p\u00e4ss" not in repr(creds)
    assert step.authzid is None
    assert server.verified() == Success()


def test_plain_without_initial_response() -> None:
    """
    Without an initial response the server sends an empty challenge.
    """
    server = make_server()
    assert server.start(sasl.PLAIN) == Challenge(b"")
    assert Challenge(b"").text_b64 == ""
    step = server.respond(b64("alice\0alice\0pw"))
    assert isinstance(step, Verify) and step.authzid is None


def test_empty_initial_response() -> None:
    """
    C{=} is an empty initial response: for PLAIN that is malformed.
    """
    step = make_server().start(sasl.PLAIN, "=")
    assert isinstance(step, Failure)


@pytest.mark.parametrize(
    "message",
    [
        b"alice\0pw",
        b"\0\0pw",
        b"\0alice\0",
        b"a\0b\0c\0d",
        b"\0\xff\0pw",
        b"\0" + b"a" * 256 + b"\0pw",
    ],
)
def test_plain_malformed(message: bytes) -> None:
    """
    Wrong field count, empty authcid or password, non-UTF-8 and over-long
    fields end in L{Failure}.
    """
    assert isinstance(make_server().start(sasl.PLAIN, b64(message)), Failure)


def test_plain_authzid_refused_without_hook() -> None:
    """
    An authzid different from the authcid is refused with C{[AUTH]}; with a
    hook that allows it, L{Verify} carries it; a hook that raises refuses.
    """
    step = make_server().start(sasl.PLAIN, b64("bob\0admin\0pw"))
    assert isinstance(step, Failure) and step.code == "AUTH"
    step = make_server(authorize=lambda c, z: c == "admin").start(sasl.PLAIN, b64("bob\0admin\0pw"))
    assert isinstance(step, Verify)
    assert step.username == "admin" and step.authzid == "bob"

    def broken(authcid: str, authzid: str) -> bool:
        raise RuntimeError("boom")

    step = make_server(authorize=broken).start(sasl.PLAIN, b64("bob\0admin\0pw"))
    assert isinstance(step, Failure)


def test_login_outlook_prompts() -> None:
    """
    LOGIN prompts with base64 C{Username:} and C{Password:}, as Outlook
    expects, then asks to verify.
    """
    server = make_server()
    step = server.start("LOGIN")
    assert isinstance(step, Challenge) and step.text_b64 == "VXNlcm5hbWU6"
    step = server.respond(b64("alice"))
    assert isinstance(step, Challenge) and step.text_b64 == "UGFzc3dvcmQ6"
    step = server.respond(b64("secret"))
    assert isinstance(step, Verify)
    assert credentials_for(step).username == b"alice"
    assert credentials_for(step).password == b"secret"  # type: ignore[union-attr]


def test_login_user_in_initial_response() -> None:
    """
    A user name in LOGIN's initial response skips the first prompt.
    """
    server = make_server()
    assert server.start(sasl.LOGIN, b64("alice")) == Challenge(b"Password:")
    assert isinstance(server.respond(b64("pw")), Verify)


@pytest.mark.parametrize("mechanism", [sasl.PLAIN, sasl.LOGIN])
def test_plaintext_mechanisms_need_permission(mechanism: str) -> None:
    """
    PLAIN and LOGIN are refused with C{[AUTH]} where plaintext
    authentication is not allowed.
    """
    step = make_server(plaintext=False, tls=False).start(mechanism, b64("\0a\0b"))
    assert isinstance(step, Failure) and step.code == "AUTH"


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "GSSAPI", "", "PLAIN\0", "x" * 1000])
def test_unknown_mechanism(mechanism: str) -> None:
    """
    A mechanism we do not know is refused.
    """
    step = make_server().start(mechanism)
    assert isinstance(step, Failure)
    assert step.text == "Unrecognized authentication type."


def test_mechanism_not_offered() -> None:
    """
    A known mechanism this session does not offer is refused too.
    """
    assert isinstance(make_server([sasl.SCRAM_SHA_256]).start(sasl.PLAIN, "="), Failure)


@pytest.mark.parametrize(
    ("mechanism", "replies"),
    [
        (sasl.PLAIN, []),
        (sasl.LOGIN, []),
        (sasl.LOGIN, [b64("alice")]),
        (sasl.SCRAM_SHA_256, []),
    ],
)
def test_cancel(mechanism: str, replies: list[str]) -> None:
    """
    C{*} at any prompt cancels: L{Failure} with no response code; the
    exchange is over.
    """
    server = make_server()
    server.start(mechanism)
    for reply in replies:
        server.respond(reply)
    step = server.respond("*")
    assert step == Failure(None, "Authentication cancelled.", "cancelled")
    assert server.done
    assert isinstance(server.respond(b64("x")), Failure)


def test_cancel_as_initial_response() -> None:
    """
    C{AUTH PLAIN *} is a cancellation too.
    """
    step = make_server().start(sasl.PLAIN, "*")
    assert isinstance(step, Failure) and step.detail == "cancelled"


@pytest.mark.parametrize("line", ["not base64!", "YWJj=", "YW Jj", "\u00e9", "YQ", b"\xff"])
def test_bad_base64(line: str | bytes) -> None:
    """
    A response that is not strict base64 ends the exchange.
    """
    server = make_server()
    server.start(sasl.PLAIN)
    assert isinstance(server.respond(line), Failure)
    assert isinstance(make_server().start(sasl.PLAIN, line), Failure)


def test_over_long_response() -> None:
    """
    A response longer than L{sasl.MAX_RESPONSE_OCTETS} is refused even if
    it is valid base64; one at the limit is decoded.
    """
    assert sasl.decode_response("A" * sasl.MAX_RESPONSE_OCTETS) is not None
    assert sasl.decode_response("A" * (sasl.MAX_RESPONSE_OCTETS + 4)) is None
    server = make_server()
    server.start(sasl.PLAIN)
    assert isinstance(server.respond("A" * (sasl.MAX_RESPONSE_OCTETS + 4)), Failure)


def test_steps_out_of_order() -> None:
    """
    Calling a method the current state does not expect gives L{Failure}
    rather than an exception.
    """
    server = make_server()
    assert isinstance(server.respond("x"), Failure)
    server = make_server()
    assert isinstance(server.lookup_done(None), Failure)
    server = make_server()
    assert isinstance(server.verified(), Failure)
    server = make_server()
    server.start(sasl.PLAIN)
    assert isinstance(server.start(sasl.PLAIN), Failure)


# --- fuzzing

MECHANISMS = st.sampled_from([*ALL, "plain", "CRAM-MD5", "", "SCRAM-SHA-1"])
LINES = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()),
    st.lists(
        st.sampled_from(
            [
                "n",
                "y",
                "p=tls-exporter",
                "a=x",
                "n=user",
                "r=abc",
                "c=biws",
                "p=AA==",
                "",
                "m=1",
                "=",
                "s=QQ==",
                "i=1",
            ]
        ),
        max_size=6,
    ).map(lambda parts: b64(",".join(parts))),
    st.just("*"),
    st.just("="),
)


@given(
    mechanism=MECHANISMS,
    initial=st.one_of(st.none(), LINES),
    lines=st.lists(LINES, max_size=6),
    tls=st.booleans(),
    plaintext=st.booleans(),
)
def test_fuzz_never_raises(
    mechanism: str, initial: str | None, lines: list[str], tls: bool, plaintext: bool
) -> None:
    """
    Whatever the client sends, every call returns a L{sasl.Step}, and once
    a L{Failure} or L{Success} comes the exchange is over.
    """
    server = make_server(ALL if tls else NO_PLUS, tls=tls, plaintext=plaintext)
    step = server.start(mechanism, initial)
    kinds = (Challenge, Lookup, Verify, Success, Failure)
    for line in [*lines, ""]:
        assert isinstance(step, kinds)
        if isinstance(step, Lookup):
            step = server.lookup_done(stored_for("pw", iterations=1))
        elif isinstance(step, Verify):
            step = server.verified()
        elif isinstance(step, Success | Failure):
            assert server.done
            assert isinstance(server.respond(line), Failure)
            break
        else:
            step = server.respond(line)
    assert isinstance(step, kinds)


# --- which mechanisms


@implementer(ISCRAMLookup)
class ScramChecker:
    """A checker serving both kinds of credentials."""

    credentialInterfaces = (IUsernamePassword, ISCRAMProof)

    def scram_credentials(self, username: str) -> None:
        """Unused."""


class PasswordChecker:
    """A checker of passwords only."""

    credentialInterfaces = (IUsernamePassword,)


class ClaimsScramChecker:
    """Claims ISCRAMProof but cannot look anyone up."""

    credentialInterfaces = (ISCRAMProof,)


def portal_mechanisms(checkers: list[object], **kwargs: bool) -> list[str]:
    """
    @return: L{mechanisms_for} a portal of C{checkers}, with a SCRAM lookup
        if one of them provides L{ISCRAMLookup}, as the login service does.
    """
    portal = Portal(None, checkers)  # type: ignore[arg-type]
    lookup = ISCRAMLookup(portal.checkers.get(ISCRAMProof), None) is not None
    return mechanisms_for(portal.listCredentialsInterfaces(), scram_lookup=lookup, **kwargs)


def test_mechanisms_for() -> None:
    """
    SCRAM is listed only for a checker that takes L{ISCRAMProof} and
    provides L{ISCRAMLookup}; -PLUS only with TLS; PLAIN and LOGIN only for
    a password checker where plaintext is allowed.
    """
    both = [ScramChecker()]
    assert portal_mechanisms(both, tls_active=True, plaintext_allowed=True) == ALL
    assert portal_mechanisms(both, tls_active=False, plaintext_allowed=True) == NO_PLUS
    assert portal_mechanisms(both, tls_active=False, plaintext_allowed=False) == [
        sasl.SCRAM_SHA_256
    ]
    assert portal_mechanisms(
        both, tls_active=True, plaintext_allowed=False, channel_binding=False
    ) == [sasl.SCRAM_SHA_256]
    assert portal_mechanisms([PasswordChecker()], tls_active=True, plaintext_allowed=True) == [
        sasl.PLAIN,
        sasl.LOGIN,
    ]
    assert portal_mechanisms([ClaimsScramChecker()], tls_active=True, plaintext_allowed=True) == []


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
