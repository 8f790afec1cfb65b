# -*- test-case-name: tests.test_sasl -*-
"""
The SASL exchange of POP3 C{AUTH} (RFC 5034) as a sans-IO state machine.

Mechanisms: C{PLAIN} (RFC 4616), C{LOGIN} (what Outlook sends),
C{SCRAM-SHA-256} and C{SCRAM-SHA-256-PLUS} (RFC 5802, RFC 7677) with the
C{tls-exporter} (RFC 9266) and C{tls-server-end-point} (RFC 5929) channel
bindings.  Nothing here touches a transport or the reactor: the caller
feeds lines in and performs what the returned L{Step} asks for.

Driving it::

    server = SASLServer(mechanisms=offered, tls_active=..., plaintext_allowed=...,
                        channel_bindings=bindings)
    step = server.start(mechanism, initial_response)   # AUTH mech [ir]
    while True:
        Challenge  -> send "+ " + step.text_b64 + CRLF; step = server.respond(line)
        Lookup     -> find the user's StoredScram (or None);
                      step = server.lookup_done(stored)   (on error: -ERR [SYS/TEMP])
        Verify     -> check step's password or SCRAM proof (and its authzid)
                      success: step = server.verified()  (Challenge or Success)
                      failure: -ERR [AUTH] or [SYS/TEMP]
        Success    -> +OK, enter TRANSACTION
        Failure    -> "-ERR [code] text" (no code if step.code is None); one
                      with a reason failed on the credentials: audit it and
                      count it as a failed login before answering

Every method returns a L{Step} and never raises, whatever the client sent.
The steps are plain data: turning a L{Verify} into C{twisted.cred}
credentials is L{pop3srv.auth.credentials.credentials_for}'s job, and the
channel bindings of a TLS connection come from
L{pop3srv.server.tls.bindings_from_tls_connection}.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pop3srv.core import scram
from pop3srv.core.scram import ScramProof, StoredScram

__all__ = [
    "CHANNEL_BINDING_TYPES",
    "CREDENTIAL_FAILURES",
    "LOGIN",
    "MAX_RESPONSE_OCTETS",
    "PLAIN",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "Challenge",
    "ChannelBinding",
    "Failure",
    "Lookup",
    "SASLServer",
    "Step",
    "Success",
    "Verify",
    "decode_response",
]

PLAIN = "PLAIN"
LOGIN = "LOGIN"
SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

#: Channel binding types we can serve, preferred first.
CHANNEL_BINDING_TYPES = ("tls-exporter", "tls-server-end-point")

#: The longest client response line accepted, in octets of base64 (the
#: C{*} or the encoded text, without CRLF; it bounds an initial response
#: too).  8 KiB decodes to 6 KiB, far beyond any real PLAIN or SCRAM
#: message, and caps what one exchange can make us hold.
MAX_RESPONSE_OCTETS = 8192

# RFC 4616 caps each PLAIN field at 255 octets; we apply the same to LOGIN.
_MAX_FIELD_OCTETS = 255

_LOGIN_USERNAME = b"Username:"
_LOGIN_PASSWORD = b"Password:"

_AUTH = "AUTH"

#: The C{reason}s of a L{Failure} on the client's credentials.
AUTHZID_REFUSED = "authzid-refused"
EMPTY_PASSWORD = "empty-password"  # noqa: S105 - a reason, not a password
INVALID_PASSWORD = "invalid-password"  # noqa: S105 - a reason, not a password
CHANNEL_BINDING_MISMATCH = "channel-binding-mismatch"
CHANNEL_BINDING_DOWNGRADE = "channel-binding-downgrade"
NO_SCRAM_SECRET = "no-scram-secret"  # noqa: S105 - a reason, not a secret
CREDENTIAL_FAILURES = frozenset(
    {
        AUTHZID_REFUSED,
        EMPTY_PASSWORD,
        INVALID_PASSWORD,
        CHANNEL_BINDING_MISMATCH,
        CHANNEL_BINDING_DOWNGRADE,
        NO_SCRAM_SECRET,
    }
)
_BAD = "Invalid authentication exchange."
_REFUSED = "Authentication failed."


@dataclass(frozen=True)
class ChannelBinding:
    """
    One TLS channel binding the connection offers.

    @ivar type: the RFC 5056 name, C{tls-exporter} or C{tls-server-end-point}.
    @ivar data: the binding data: for C{tls-exporter}, 32 octets of
        C{export_keying_material(b"EXPORTER-Channel-Binding", 32)}; for
        C{tls-server-end-point}, the hash of our certificate
        (L{pop3srv.server.tls.tls_server_end_point}).
    """

    type: str
    data: bytes

    def __repr__(self) -> str:
        """
        @return: the type only.
        """
        return f"ChannelBinding({self.type!r})"


@dataclass(frozen=True)
class Challenge:
    """
    Send C{"+ " + text_b64 + "\\r\\n"} and feed the client's next line to
    L{SASLServer.respond}.

    @ivar payload: the challenge, raw (C{b""} sends a bare C{"+ "}).
    """

    payload: bytes

    @property
    def text_b64(self) -> str:
        """
        @return: the payload in base64, C{""} when it is empty.
        """
        return base64.b64encode(self.payload).decode("ascii")


@dataclass(frozen=True)
class Lookup:
    """
    SCRAM only: find the user's L{StoredScram} (the checker's
    C{ISCRAMLookup}) and pass it (or L{None}) to L{SASLServer.lookup_done}.

    @ivar username: the authentication identity, unescaped.
    """

    username: str


@dataclass(frozen=True)
class Verify:
    """
    Check what the client sent (C{password} for PLAIN and LOGIN, C{proof}
    for SCRAM); on success call L{SASLServer.verified}, on failure send
    C{-ERR [AUTH]} (or C{[SYS/TEMP]} for an unexpected error) and drop the
    exchange.  Exactly one of C{password} and C{proof} is set.

    @ivar mechanism: the mechanism, upper case.
    @ivar username: the authentication identity (authcid) as sent.
    @ivar authzid: the authorization identity when it differs from
        C{username} and L{SASLServer}'s C{authorize} hook let it through:
        whoever checks the credentials decides whether C{username} may act
        as it, and then opens its maildrop.  L{None} otherwise.
    @ivar password: the password as sent (PLAIN, LOGIN), or L{None}.
    @ivar proof: the SCRAM proof, or L{None}.
    """

    mechanism: str
    username: str
    authzid: str | None = None
    password: str | None = field(default=None, repr=False)
    proof: ScramProof | None = None


@dataclass(frozen=True)
class Success:
    """Send C{+OK}: the client is logged in."""


@dataclass(frozen=True)
class Failure:
    """
    Send C{-ERR [code] text} (no code if C{code} is L{None}); the exchange
    is over.

    A failure on the client's credentials, which a login service audits and
    counts like a wrong password, carries a C{reason}; one on the exchange
    itself (bad syntax, a cancel, an unknown mechanism) does not.

    @ivar code: an RFC 2449/3206 response code such as C{AUTH}, or L{None}.
    @ivar text: fixed, client-safe text.
    @ivar detail: what went wrong, for the log only (never a secret).
    @ivar reason: for a failure on the credentials, a machine-readable
        reason (one of L{CREDENTIAL_FAILURES}); else L{None}.
    @ivar username: the authentication identity (authcid) when C{reason}
        is set; else L{None}.
    """

    code: str | None
    text: str
    detail: str = ""
    reason: str | None = None
    username: str | None = None


Step = Challenge | Lookup | Verify | Success | Failure


def decode_response(line: str | bytes) -> bytes | None:
    """
    Decode one client response (continuation line or initial response).

    @param line: the line without CRLF.
    @return: the decoded octets, or L{None} if it is not strict base64 or is
        longer than L{MAX_RESPONSE_OCTETS}.
    """
    if isinstance(line, str):
        try:
            raw = line.encode("ascii")
        except UnicodeEncodeError:
            return None
    else:
        raw = line
    if len(raw) > MAX_RESPONSE_OCTETS:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


def _utf8(data: bytes) -> str | None:
    """
    @return: C{data} as text, or L{None} if it is not UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _State(Enum):
    IDLE = "idle"
    PLAIN = "plain"
    LOGIN_USER = "login-user"
    LOGIN_PASSWORD = "login-password"  # noqa: S105 - a state name
    SCRAM_FIRST = "scram-first"
    SCRAM_LOOKUP = "scram-lookup"
    SCRAM_FINAL = "scram-final"
    VERIFYING = "verifying"
    SCRAM_ACK = "scram-ack"
    DONE = "done"


class SASLServer:
    """
    One SASL exchange: C{AUTH} to C{+OK} or C{-ERR}.  Build a new one for
    each C{AUTH} command.
    """

    def __init__(
        self,
        *,
        mechanisms: Sequence[str],
        tls_active: bool,
        plaintext_allowed: bool,
        channel_bindings: Sequence[ChannelBinding] = (),
        authorize: Callable[[str, str], bool] | None = None,
        nonce_factory: Callable[[], str] = scram.make_nonce,
    ) -> None:
        """
        @param mechanisms: what this session offers
            (L{pop3srv.auth.credentials.mechanisms_for});
            anything else is refused, and C{SCRAM-SHA-256-PLUS} in it arms
            the downgrade check.
        @param tls_active: whether the connection is encrypted; the C{-PLUS}
            mechanism is refused without it.
        @param plaintext_allowed: whether PLAIN and LOGIN may be used (TLS,
            or a trusted network).
        @param channel_bindings: what the TLS connection can bind to
            (L{pop3srv.server.tls.bindings_from_tls_connection}).
        @param authorize: an early filter on authzids, before any password
            is checked (the checker still decides after it, see
            L{pop3srv.auth.credentials.IAuthorizer}); L{None} refuses every
            authzid that differs from the authcid.
        @param nonce_factory: makes the SCRAM server nonce; tests inject a
            fixed one.
        """
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.tls_active = tls_active
        self.plaintext_allowed = plaintext_allowed
        self.channel_bindings = {b.type: b for b in channel_bindings}
        self.authorize = authorize
        self._nonce_factory = nonce_factory
        self._state = _State.IDLE
        self.mechanism: str | None = None
        self._login_user = ""
        # SCRAM state.
        self._gs2_header = ""
        self._cbind_data = b""
        self._client_first_bare = ""
        self._nonce = ""
        self._username = ""
        self._authzid: str | None = None
        self._stored: StoredScram | None = None
        self._fake = False
        self._server_first = ""
        self._auth_message = b""

    # --- the public steps

    def start(self, mechanism: str, initial_response: str | bytes | None = None) -> Step:
        """
        Begin the exchange for C{AUTH mechanism [initial-response]}.

        @param mechanism: the mechanism name as sent (case-insensitive).
        @param initial_response: the initial response as sent, C{=} for an
            empty one, or L{None} if there was none.
        @return: the first step.
        """
        if self._state is not _State.IDLE:
            return self._fail(None, _BAD, "exchange already started")
        mechanism = mechanism.upper()
        self.mechanism = mechanism
        if mechanism not in self.mechanisms or mechanism not in _MECHANISMS:
            return self._fail(None, "Unrecognized authentication type.", "unknown mechanism")
        if mechanism in (PLAIN, LOGIN) and not self.plaintext_allowed:
            return self._fail(
                _AUTH,
                "Plaintext authentication is disallowed without TLS; use STLS first.",
                "plaintext mechanism without TLS",
            )
        if mechanism == SCRAM_SHA_256_PLUS and not (self.tls_active and self.channel_bindings):
            return self._fail(None, "Unrecognized authentication type.", "-PLUS without TLS")
        data: bytes | None = None
        if initial_response is not None:
            if initial_response in ("=", b"="):
                data = b""
            else:
                if initial_response in ("*", b"*"):
                    return self._fail(None, "Authentication cancelled.", "cancelled")
                data = decode_response(initial_response)
                if data is None:
                    return self._fail(None, _BAD, "initial response is not base64")
        if mechanism == PLAIN:
            self._state = _State.PLAIN
            return Challenge(b"") if data is None else self._plain(data)
        if mechanism == LOGIN:
            if data is None or not data:
                self._state = _State.LOGIN_USER
                return Challenge(_LOGIN_USERNAME)
            # Some clients put the user name in the initial response.
            self._state = _State.LOGIN_USER
            return self._login_username(data)
        self._state = _State.SCRAM_FIRST
        return Challenge(b"") if data is None else self._scram_first(data)

    def respond(self, line: str | bytes) -> Step:
        """
        Take the client's answer to a L{Challenge}.

        @param line: the line as received, without CRLF.
        @return: the next step.
        """
        if self._state not in _WAITING_FOR_CLIENT:
            return self._fail(None, _BAD, "response when none was asked for")
        if line in ("*", b"*"):
            return self._fail(None, "Authentication cancelled.", "cancelled")
        data = decode_response(line)
        if data is None:
            return self._fail(None, _BAD, "response is not base64 or too long")
        state = self._state
        if state is _State.PLAIN:
            return self._plain(data)
        if state is _State.LOGIN_USER:
            return self._login_username(data)
        if state is _State.LOGIN_PASSWORD:
            return self._login_password(data)
        if state is _State.SCRAM_FIRST:
            return self._scram_first(data)
        if state is _State.SCRAM_FINAL:
            return self._scram_final(data)
        # SCRAM_ACK: the client's (empty) answer to server-final.
        if data:
            return self._fail(None, _BAD, "unexpected data after server-final")
        self._state = _State.DONE
        return Success()

    def lookup_done(self, stored: StoredScram | None) -> Step:
        """
        Continue after a L{Lookup}.

        @param stored: the user's keys, or L{None} if the checker has none;
            then a fake is used so the client cannot tell, and the exchange
            fails after the client's proof.
        @return: the server-first L{Challenge}.
        """
        if self._state is not _State.SCRAM_LOOKUP:
            return self._fail(None, _BAD, "lookup result when none was asked for")
        if stored is None:
            self._fake = True
            stored = scram.fake_stored(_FAKE_SECRET, self._username, scram.DEFAULT_ITERATIONS)
        self._stored = stored
        self._nonce += self._nonce_factory()
        self._server_first = (
            f"r={self._nonce},s={base64.b64encode(stored.salt).decode('ascii')},"
            f"i={stored.iterations}"
        )
        self._state = _State.SCRAM_FINAL
        return Challenge(self._server_first.encode("ascii"))

    def verified(self) -> Step:
        """
        Continue after the credentials of a L{Verify} were accepted.

        @return: L{Success}, or for SCRAM the server-final L{Challenge}
            (C{v=...}) whose empty answer goes to L{respond}.  If the client
            then cancels, the caller must log the avatar out again.
        """
        if self._state is not _State.VERIFYING:
            return self._fail(None, _BAD, "verified when nothing was being verified")
        if self._stored is None:
            self._state = _State.DONE
            return Success()
        self._state = _State.SCRAM_ACK
        signature = scram.server_signature(self._stored, self._auth_message)
        return Challenge(b"v=" + base64.b64encode(signature))

    @property
    def done(self) -> bool:
        """Whether the exchange has ended (in success or failure)."""
        return self._state is _State.DONE

    # --- mechanisms

    def _fail(self, code: str | None, text: str, detail: str) -> Failure:
        self._state = _State.DONE
        return Failure(code, text, detail)

    def _refuse(self, detail: str, reason: str, username: str) -> Failure:
        """
        Fail on the client's credentials: C{-ERR [AUTH]}, with the reason
        and the authcid for the audit log and the throttle.
        """
        self._state = _State.DONE
        return Failure(_AUTH, _REFUSED, detail, reason, username)

    def _identity(self, authcid: str, authzid: str) -> Failure | str | None:
        """
        Apply the authorization rule.

        @return: L{None} to act as C{authcid}, the authzid to act as, or a
            L{Failure}.
        """
        if not authzid or authzid == authcid:
            return None
        if self.authorize is not None:
            try:
                allowed = bool(self.authorize(authcid, authzid))
            except Exception:
                allowed = False
            if allowed:
                return authzid
        return self._refuse(
            "authzid differs from authcid and was not authorized", AUTHZID_REFUSED, authcid
        )

    def _password_verify(self, authcid: str, password: str, authzid: str) -> Step:
        identity = self._identity(authcid, authzid)
        if isinstance(identity, Failure):
            return identity
        self._state = _State.VERIFYING
        assert self.mechanism is not None
        return Verify(self.mechanism, authcid, identity, password=password)

    def _plain(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return self._fail(None, _BAD, "PLAIN message is not authzid NUL authcid NUL passwd")
        if any(len(p) > _MAX_FIELD_OCTETS for p in parts):
            return self._fail(None, _BAD, "PLAIN field too long")
        fields = [_utf8(p) for p in parts]
        authzid, authcid, password = fields
        if authzid is None or authcid is None or password is None:
            return self._fail(None, _BAD, "PLAIN message is not UTF-8")
        if not authcid:
            return self._fail(_AUTH, _REFUSED, "empty PLAIN authcid")
        if not password:
            return self._refuse("empty PLAIN password", EMPTY_PASSWORD, authcid)
        return self._password_verify(authcid, password, authzid)

    def _login_username(self, data: bytes) -> Step:
        name = _utf8(data)
        if not name or len(data) > _MAX_FIELD_OCTETS or "\0" in name:
            return self._fail(None, _BAD, "bad LOGIN user name")
        self._login_user = name
        self._state = _State.LOGIN_PASSWORD
        return Challenge(_LOGIN_PASSWORD)

    def _login_password(self, data: bytes) -> Step:
        password = _utf8(data)
        if not password:
            reason = EMPTY_PASSWORD if password == "" else INVALID_PASSWORD
            return self._refuse("bad LOGIN password", reason, self._login_user)
        if len(data) > _MAX_FIELD_OCTETS or "\0" in password:
            return self._refuse("bad LOGIN password", INVALID_PASSWORD, self._login_user)
        return self._password_verify(self._login_user, password, "")

    def _scram_first(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return self._fail(None, _BAD, "client-first is not UTF-8")
        try:
            flag, authzid, bare = _split_gs2(text)
            attributes = _attributes(bare)
        except ValueError as e:
            return self._fail(None, _BAD, f"client-first: {e}")
        if not attributes or attributes[0][0] == "m":
            return self._fail(None, _BAD, "client-first: unsupported mandatory extension")
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r":
            return self._fail(None, _BAD, "client-first: expected n= and r=")
        try:
            username = scram.unescape_saslname(attributes[0][1])
        except ValueError as e:
            return self._fail(None, _BAD, f"client-first: {e}")
        nonce = attributes[1][1]
        if not username or not nonce or not _printable(nonce):
            return self._fail(None, _BAD, "client-first: empty user name or bad nonce")
        plus = self.mechanism == SCRAM_SHA_256_PLUS
        if flag.startswith("p="):
            if not plus:
                return self._refuse(
                    "channel binding requested with a non-PLUS mechanism",
                    CHANNEL_BINDING_MISMATCH,
                    username,
                )
            binding = self.channel_bindings.get(flag[2:])
            if binding is None:
                return self._refuse(
                    "unsupported channel binding type", CHANNEL_BINDING_MISMATCH, username
                )
            self._cbind_data = binding.data
        elif plus:
            return self._refuse(
                "-PLUS mechanism without channel binding", CHANNEL_BINDING_MISMATCH, username
            )
        elif flag == "y" and SCRAM_SHA_256_PLUS in self.mechanisms:
            # The client can bind but believes we cannot: someone removed
            # -PLUS from what it saw (RFC 5802 section 6).
            return self._refuse(
                "channel binding downgrade detected", CHANNEL_BINDING_DOWNGRADE, username
            )
        identity = self._identity(username, authzid)
        if isinstance(identity, Failure):
            return identity
        self._authzid = identity
        self._gs2_header = text[: len(text) - len(bare)]
        self._client_first_bare = bare
        self._nonce = nonce
        self._username = username
        self._state = _State.SCRAM_LOOKUP
        return Lookup(username)

    def _scram_final(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return self._fail(None, _BAD, "client-final is not UTF-8")
        try:
            attributes = _attributes(text)
        except ValueError as e:
            return self._fail(None, _BAD, f"client-final: {e}")
        if len(attributes) < 3 or attributes[0][0] != "c" or attributes[1][0] != "r":
            return self._fail(None, _BAD, "client-final: expected c=, r= ... p=")
        if attributes[-1][0] != "p":
            return self._fail(None, _BAD, "client-final: proof missing")
        cbind = decode_response(attributes[0][1])
        proof = decode_response(attributes[-1][1])
        if cbind is None or proof is None:
            return self._fail(None, _BAD, "client-final: bad base64")
        if attributes[1][1] != self._nonce:
            return self._fail(_AUTH, _REFUSED, "client-final: nonce mismatch")
        expected = self._gs2_header.encode("utf-8") + self._cbind_data
        if not secrets.compare_digest(cbind, expected):
            return self._refuse(
                "channel binding mismatch", CHANNEL_BINDING_MISMATCH, self._username
            )
        without_proof = text[: text.rindex(",p=")]
        self._auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode("utf-8")
        if self._fake:
            return self._refuse("no SCRAM secret for this user", NO_SCRAM_SECRET, self._username)
        self._state = _State.VERIFYING
        assert self.mechanism is not None
        return Verify(
            self.mechanism,
            self._username,
            self._authzid,
            proof=ScramProof(self._auth_message, proof),
        )


_MECHANISMS = frozenset({PLAIN, LOGIN, SCRAM_SHA_256, SCRAM_SHA_256_PLUS})

_WAITING_FOR_CLIENT = frozenset(
    {
        _State.PLAIN,
        _State.LOGIN_USER,
        _State.LOGIN_PASSWORD,
        _State.SCRAM_FIRST,
        _State.SCRAM_FINAL,
        _State.SCRAM_ACK,
    }
)

# Used only when a checker answers a lookup with None: the fake salt must be
# stable for a user within this process.  Checkers that persist a secret
# (PasslibChecker) make fakes that are stable across restarts too.
_FAKE_SECRET = secrets.token_bytes(32)


def _printable(value: str) -> bool:
    """
    @return: whether C{value} is RFC 5802 C{printable} (0x21-0x7E but C{,}).
    """
    return all("\x21" <= c <= "\x7e" and c != "," for c in value)


def _split_gs2(text: str) -> tuple[str, str, str]:
    """
    Split a client-first message into its GS2 parts.

    @return: C{(cbind-flag, authzid, client-first-message-bare)}; the
        authzid is unescaped, C{""} if absent.
    @raise ValueError: if the header is malformed.
    """
    flag, comma, rest = text.partition(",")
    if not comma:
        raise ValueError("no GS2 header")
    if flag not in ("n", "y") and not (flag.startswith("p=") and _valid_cb_name(flag[2:])):
        raise ValueError("bad channel binding flag")
    authzid_field, comma, bare = rest.partition(",")
    if not comma:
        raise ValueError("truncated GS2 header")
    authzid = ""
    if authzid_field:
        if not authzid_field.startswith("a="):
            raise ValueError("bad authzid field")
        authzid = scram.unescape_saslname(authzid_field[2:])
    return flag, authzid, bare


def _valid_cb_name(name: str) -> bool:
    """
    Any syntactically valid channel binding name passes here; whether we
    support it is decided later, with a clearer log line.

    @return: whether C{name} is 1*(ALPHA / DIGIT / "." / "-").
    """
    return bool(name) and all(c.isascii() and (c.isalnum() or c in ".-") for c in name)


def _attributes(text: str) -> list[tuple[str, str]]:
    """
    Split C{a=v,b=w} into pairs.

    @raise ValueError: if a part is not a single letter, C{=}, a value.
    """
    pairs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise ValueError("malformed attribute")
        pairs.append((part[0], part[2:]))
    return pairs
