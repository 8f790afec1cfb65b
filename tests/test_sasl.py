"""
Tests for L{pop3srv.core.sasl}: the SASL exchange (RFC 5034) with PLAIN, LOGIN
and SCRAM-SHA-256(-PLUS), driven by the SCRAM client of L{helpers}
(written from RFC 5802), and fuzzed with hypothesis.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from helpers import ScramClient, b64
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.testing import MemoryReactorClock
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
from pop3srv.server.login import LoginService

ALL = [sasl.SCRAM_SHA_256_PLUS, sasl.SCRAM_SHA_256, sasl.PLAIN, sasl.LOGIN]
NO_PLUS = [sasl.SCRAM_SHA_256, sasl.PLAIN, sasl.LOGIN]
EXPORTER = ChannelBinding("tls-exporter", b"E" * 32)
END_POINT = ChannelBinding("tls-server-end-point", b"S" * 32)
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


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


def portal_mechanisms(
    checkers: list[object],
    *,
    tls_active: bool,
    plaintext_allowed: bool,
    channel_binding: bool | None = None,
) -> list[str]:
    """
    @return: the mechanisms the login service of a portal of C{checkers}
        offers (L{LoginService.mechanisms}); with C{channel_binding} given,
        which the service leaves to C{tls_active}, L{mechanisms_for} with
        the SCRAM lookup that service found.
    """
    service = LoginService.for_portal(Portal(None, checkers), MemoryReactorClock())  # type: ignore[arg-type]
    if channel_binding is None:
        return list(service.mechanisms(tls_active=tls_active, plaintext_allowed=plaintext_allowed))
    return mechanisms_for(
        service.portal.listCredentialsInterfaces(),
        scram_lookup=service.scram_lookup is not None,
        tls_active=tls_active,
        plaintext_allowed=plaintext_allowed,
        channel_binding=channel_binding,
    )


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
