# -*- test-case-name: tests.test_checker,tests.test_sasl -*-
"""
The C{twisted.cred} side of logging in: the credentials our checkers take,
the interfaces a checker provides to serve SCRAM and master users, the avatar
ID that says which password matched, and the SASL mechanism list.

The protocol core (L{pop3srv.core.sasl}) hands plain values across the seam
(a L{pop3srv.core.sasl.Verify} with a password or a
L{pop3srv.core.scram.ScramProof}); L{credentials_for} turns them into
credentials here, so the core never imports Twisted.

How a checker serves SCRAM
==========================

A SCRAM login needs the checker twice: once before the client has proved
anything (the salt and iteration count must be sent first), and once to
check the proof.  So a checker that can serve SCRAM:

  1. provides L{ISCRAMLookup}: C{scram_credentials(username)} returns a
     Deferred firing with the user's L{StoredScram}, or with L{None} for a
     user it cannot serve.  Better, it returns a plausible fake from
     L{pop3srv.core.scram.fake_stored} so that the salt sent to the client
     does not reveal whether the user exists
     (L{pop3srv.auth.checker.PasslibChecker} does);
  2. lists L{ISCRAMProof} in its C{credentialInterfaces} and, in
     C{requestAvatarId}, looks the user up again and calls
     C{credentials.checkProof(stored)}, which does the constant-time
     comparison.  It fails with C{UnauthorizedLogin} for unknown users;
  3. optionally provides L{ISCRAMAvailability}, so that SCRAM is offered
     only while some user has SCRAM secrets.

Which password matched, and whose maildrop
==========================================

Both travel one way, from the checker out: the checker returns an
L{AvatarId} (the maildrop owner's name, NFC, with the matched app-password
C{label}); C{Portal.login} hands it to the realm, and a realm that knows
this module returns an L{AvatarLogout} carrying it, which is what
C{Portal.login} gives back to the caller.  Nothing is written back into the
credentials.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.cred.credentials import (
    ICredentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from zope.interface import Attribute, Interface, implementer
from zope.interface.interface import InterfaceClass

from pop3srv.core import sasl
from pop3srv.core.scram import ScramProof, StoredScram

__all__ = [
    "APOPCredentials",
    "AvatarId",
    "AvatarLogout",
    "IAuthorizer",
    "IAuthzidCredentials",
    "ISCRAMAvailability",
    "ISCRAMLookup",
    "ISCRAMProof",
    "PasswordCredentials",
    "SCRAMCredentials",
    "credentials_for",
    "mechanisms_for",
]


class IAuthorizer(Interface):
    """
    The master-user rule: may one user act as another (a SASL authzid
    different from the authcid)?  A checker consults it after the authcid's
    credentials check out and then returns the authzid as the avatar ID.
    Without one, such a request is refused.
    """

    def authorize(authcid: str, authzid: str) -> bool:
        """
        @param authcid: who is authenticating (NFC).
        @param authzid: whose maildrop they ask for (NFC).
        @return: whether C{authcid} may act as C{authzid}.
        """


class IAuthzidCredentials(ICredentials):
    """
    Credentials that may ask to act as another user (SASL's authzid).
    """

    authzid = Attribute(
        "The authorization identity as text when it differs from the "
        "authentication identity, else None."
    )


class ISCRAMLookup(Interface):
    """
    Provided by a credentials checker that can serve SCRAM-SHA-256: finds
    the stored keys before the client has proved anything.
    """

    def scram_credentials(username: str) -> object:
        """
        Look up a user's SCRAM-SHA-256 secret.

        @param username: the authentication identity, unescaped.
        @return: a C{Deferred} firing with a L{StoredScram}, or with L{None}
            if the checker cannot serve this user.  Returning a fake from
            L{pop3srv.core.scram.fake_stored} instead of L{None} for unknown
            users is better: then the salt does not tell the client the user
            is unknown.
        """


class ISCRAMAvailability(Interface):
    """
    Optionally provided, besides L{ISCRAMLookup}, by a checker that knows
    whether any user has SCRAM secrets at all.  SCRAM is offered only where
    this says so: a client that picks SCRAM when no user can pass it fails
    every time, and each failure counts towards its lockout.  A lookup
    without this interface is taken to serve SCRAM always (as before it
    existed).
    """

    def scram_available() -> bool:
        """
        Called for every session's mechanism list, on the reactor thread:
        it must answer at once, without I/O (the last known answer, with
        any re-check done elsewhere).

        @return: whether some user could log in with SCRAM now.
        """


class ISCRAMProof(IAuthzidCredentials):
    """
    Credentials from a finished SCRAM exchange: the checker looks the user
    up and calls L{checkProof} with the stored keys.
    """

    username = Attribute("The authentication identity, as UTF-8 bytes.")

    def checkProof(stored: StoredScram) -> bool:
        """
        @param stored: the user's stored keys as the checker knows them.
        @return: whether the client proved knowledge of the password.
        """


@implementer(IAuthzidCredentials)
class PasswordCredentials(UsernamePassword):
    """
    L{UsernamePassword} from USER/PASS, PLAIN or LOGIN, with the SASL
    authzid if one was asked for.

    @ivar authzid: see L{IAuthzidCredentials.authzid}.
    """

    def __init__(self, username: bytes, password: bytes, authzid: str | None = None) -> None:
        """
        @param username: the authentication identity, UTF-8.
        @param password: the password, UTF-8.
        @param authzid: the authorization identity, if it differs.
        """
        super().__init__(username, password)
        self.authzid = authzid

    def __repr__(self) -> str:
        """
        @return: a representation without the password.
        """
        return f"PasswordCredentials(username={self.username!r})"


@implementer(ISCRAMProof)
class SCRAMCredentials:
    """
    The outcome of a SCRAM exchange, for C{Portal.login}.

    @ivar username: the authentication identity, UTF-8 bytes (Twisted's
        convention for C{username}).
    @ivar authzid: see L{IAuthzidCredentials.authzid}.
    """

    def __init__(
        self, username: bytes, auth_message: bytes, proof: bytes, authzid: str | None = None
    ) -> None:
        """
        @param username: the authentication identity as UTF-8.
        @param auth_message: RFC 5802's C{AuthMessage}.
        @param proof: the decoded client proof.
        @param authzid: the authorization identity, if it differs.
        """
        self.username = username
        self.authzid = authzid
        self._proof = ScramProof(auth_message, proof)

    def checkProof(self, stored: StoredScram) -> bool:
        """
        @param stored: the user's stored keys.
        @return: whether the proof matches them.
        """
        return self._proof.check(stored)

    def __repr__(self) -> str:
        """
        @return: a representation without the proof.
        """
        return f"SCRAMCredentials(username={self.username!r})"


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    APOP credentials (RFC 1939 section 7): the MD5 digest of the greeting's
    timestamp followed by the password.  Twisted's own class compares a str
    digest with bytes, so it never matches on Python 3.
    """

    def __init__(self, challenge: bytes, username: bytes, digest: str) -> None:
        """
        @param challenge: the greeting's timestamp.
        @param username: the user name, UTF-8.
        @param digest: the client's hex digest.
        """
        self.challenge = challenge
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, password: bytes) -> bool:
        """
        @param password: the user's password as the checker knows it.
        @return: whether the digest was made from it.
        """
        expected = hashlib.md5(self.challenge + password).hexdigest()
        return hmac.compare_digest(expected, self.digest)


def credentials_for(request: sasl.Verify) -> PasswordCredentials | SCRAMCredentials:
    """
    Turn what a SASL exchange collected into credentials for C{Portal.login}.

    @param request: the L{sasl.Verify} step.
    @return: L{SCRAMCredentials} for a SCRAM proof, else
        L{PasswordCredentials}.
    """
    username = request.username.encode("utf-8")
    if request.proof is not None:
        return SCRAMCredentials(
            username, request.proof.auth_message, request.proof.proof, request.authzid
        )
    assert request.password is not None
    return PasswordCredentials(username, request.password.encode("utf-8"), request.authzid)


class AvatarId(bytes):
    """
    An avatar ID: the maildrop owner's name as UTF-8 bytes (C{bytes}, so any
    realm can take it), remembering which password matched.

    @ivar label: the app-password label, or L{None} for the main password.
    """

    label: str | None

    def __new__(cls, username: bytes, label: str | None = None) -> AvatarId:
        """
        @param username: the user name, UTF-8.
        @param label: the app-password label that matched, if any.
        """
        self = super().__new__(cls, username)
        self.label = label
        return self

    @classmethod
    def of(cls, avatar_id: bytes) -> AvatarId:
        """
        @param avatar_id: what a checker returned.
        @return: it, if it is an L{AvatarId}; else one without a label.
        """
        return avatar_id if isinstance(avatar_id, AvatarId) else cls(avatar_id)


@dataclass(frozen=True)
class AvatarLogout:
    """
    The logout callable of a realm's C{(interface, avatar, logout)} answer,
    naming the avatar ID it was given: how the checker's L{AvatarId} (whose
    maildrop, which password) comes back out of C{Portal.login}.

    @ivar avatar_id: the avatar ID the realm served.
    @ivar release: ends the avatar's session (e.g. unlocks the maildrop).
    """

    avatar_id: AvatarId
    release: Callable[[], object]

    def __call__(self) -> None:
        """
        End the session.
        """
        self.release()


def mechanisms_for(
    interfaces: Iterable[InterfaceClass],
    *,
    scram_lookup: bool,
    tls_active: bool,
    plaintext_allowed: bool,
    channel_binding: bool | None = None,
) -> list[str]:
    """
    The SASL mechanisms a portal can serve, strongest first: what CAPA's
    C{SASL} line and a bare C{AUTH} list.

      - C{SCRAM-SHA-256}: the portal takes L{ISCRAMProof} and there is an
        L{ISCRAMLookup} to find the keys first (C{scram_lookup});
      - C{SCRAM-SHA-256-PLUS}: the same, and C{channel_binding};
      - C{PLAIN} and C{LOGIN}: the portal takes L{IUsernamePassword} (or a
        sub-interface), and C{plaintext_allowed}.

    @param interfaces: C{portal.listCredentialsInterfaces()}.
    @param scram_lookup: whether an L{ISCRAMLookup} is at hand.
    @param tls_active: whether the session is encrypted.
    @param plaintext_allowed: whether the password may cross this connection.
    @param channel_binding: whether channel binding data is available; the
        same as C{tls_active} if L{None}.
    @return: mechanism names.
    """
    if channel_binding is None:
        channel_binding = tls_active
    interfaces = list(interfaces)
    scram_ok = scram_lookup and ISCRAMProof in interfaces
    password_ok = any(i.isOrExtends(IUsernamePassword) for i in interfaces)
    result = []
    if scram_ok:
        if tls_active and channel_binding:
            result.append(sasl.SCRAM_SHA_256_PLUS)
        result.append(sasl.SCRAM_SHA_256)
    if password_ok and plaintext_allowed:
        result += [sasl.PLAIN, sasl.LOGIN]
    return result
