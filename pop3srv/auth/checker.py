# -*- test-case-name: tests.test_checker -*-
"""
A credentials checker backed by a L{UserFile}: L{IUsernamePassword} (USER/PASS,
SASL PLAIN and LOGIN) and L{ISCRAMProof} (SASL SCRAM-SHA-256), and the
L{ISCRAMLookup} a SCRAM exchange needs before the client's proof (and
L{ISCRAMAvailability}: whether any user has SCRAM secrets).  The types
live in L{pop3srv.auth.credentials}.

Hash verification is slow on purpose, so it runs in a thread pool, or,
given a C{verifier} (L{pop3srv.processes.hashpool.ProcessVerifier}, as C{twistd
pop3srv} does), in hashing processes, so that a backend that holds the GIL
cannot stall the reactor; the reactor thread only decodes the credentials
and maps the result.  SCRAM lookups are cheap and stay in the thread pool.
A hash upgrade offered in the L{VerifyResult} (C{upgrade_hash}) is written
by the checker, in its thread pool, with
L{pop3srv.auth.editor.apply_upgrade}, before the login is answered.

A wrong password, an unknown user, or credentials that are not UTF-8 fail
with L{UnauthorizedLogin}.  A check that could not be made (a hashing
process that died, a user file that cannot be read, a bug) is a server
fault, not a wrong password: it is logged here in full and fails with
L{CheckerFault}, which a login service reports as a temporary failure and
never counts against the user.

Which password matched, and whose maildrop
==========================================

A user may have app passwords (see L{pop3srv.auth.userfile}).  The avatar ID is
still the user name as UTF-8 bytes, so any realm can take it; it is an
L{AvatarId}, a C{bytes} subclass whose C{label} attribute is the app-password
label (L{None} for the main password).  The checker also logs C{"User
{username!r} authenticated with app password {label!r}"} at info level.

Credentials that ask to act as another user (a SASL authzid,
L{IAuthzidCredentials}) are checked as their authcid, then the checker's
L{IAuthorizer} decides; if it allows, the avatar ID names the authzid, so the
realm opens that maildrop through the ordinary C{Portal.login}.  The user name
is normalised to NFC here, once: the avatar ID carries that form onward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pop3srv.auth.credentials import (
    AvatarId,
    IAuthorizer,
    IAuthzidCredentials,
    ISCRAMAvailability,
    ISCRAMLookup,
    ISCRAMProof,
)
from pop3srv.auth.identity import normalise_username
from pop3srv.core.scram import StoredScram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool

    from pop3srv.auth.userfile import UserFile, VerifyResult

# AvatarId is re-exported: it was defined here before the cred types moved.
__all__ = [
    "FAILURE_MESSAGE",
    "MAX_CREDENTIAL_BYTES",
    "REFRESH_INTERVAL",
    "AvatarId",
    "CheckerFault",
    "PasslibChecker",
]

#: The one message for every failed login, so that the text never tells an
#: unknown user from a wrong password.
FAILURE_MESSAGE = "Invalid username or password."

#: The longest user name or password, in UTF-8 octets, that is checked at
#: all; a longer one fails as a wrong password.  No password anyone could
#: have set is that long (passlib hashes at most 4,096 octets), and it is
#: the most an AMP value carries to a hashing process or the parent's relay,
#: which would otherwise refuse the call as a broken one.
MAX_CREDENTIAL_BYTES = 0xFFFF

#: The fewest seconds between two re-reads of the user file started by
#: L{PasslibChecker.scram_available}, which is asked once per connection: a
#: connection flood costs one thread-pool call and C{stat} per interval, not
#: one per connection, and a SCRAM line added or removed shows within it.
REFRESH_INTERVAL = 1.0


class CheckerFault(Exception):
    """
    The credentials could not be checked, for a reason that is the
    server's, not the client's.  The cause, logged in full by the checker,
    is the exception's C{__cause__}.  Deliberately not an
    L{UnauthorizedLogin}: a server fault is never a wrong password.
    """


def _too_long(value: str) -> bool:
    """
    @return: whether C{value} is longer than L{MAX_CREDENTIAL_BYTES} octets
        of UTF-8.
    """
    # Four octets per character at most: most values skip the encoding.
    return len(value) * 4 > MAX_CREDENTIAL_BYTES and (
        len(value.encode("utf-8", "surrogatepass")) > MAX_CREDENTIAL_BYTES
    )


def _as_text(value: bytes | str) -> str:
    """
    @param value: a username or password from a credentials object.
    @return: the value as text.
    @raise UnicodeDecodeError: if bytes are not UTF-8.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


@implementer(ICredentialsChecker, ISCRAMLookup, ISCRAMAvailability, IAuthorizer)
class PasslibChecker:
    """
    Check usernames and passwords, or SCRAM proofs, against a user file of
    passlib hashes.

    @ivar credentialInterfaces: L{IUsernamePassword} and L{ISCRAMProof}.  Not
        APOP: with the password stored as a one-way hash, APOP's MD5
        challenge/response cannot work.
    @ivar authorizer: the master-user rule for SASL authzids, or L{None} to
        refuse every authzid that differs from the authcid.
    """

    credentialInterfaces = (IUsernamePassword, ISCRAMProof)
    log = Logger()

    def __init__(
        self,
        users: UserFile | str,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
        verifier: Callable[[str, str], Deferred[VerifyResult]] | None = None,
        authorizer: IAuthorizer | None = None,
        *,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param users: the user file to verify against, or its path.
        @param reactor: delivers results back to the reactor thread; the
            global reactor if L{None}, looked up on first use.
        @param threadpool: runs the verification; if L{None}, the pool of
            C{reactor}, which must then also provide
            L{twisted.internet.interfaces.IReactorThreads}.
        @param verifier: verifies a password instead of
            C{users.verify_detailed} in C{threadpool}, e.g.
            L{pop3srv.processes.hashpool.ProcessVerifier.verify_detailed}; it must
            check the same file.
        @param authorizer: see L{authorizer}.
        @param clock: times the re-reads of L{scram_available}; if L{None},
            C{time.monotonic}, which a change of the system clock does not
            move.
        """
        if isinstance(users, str):
            from pop3srv.auth.userfile import UserFile

            users = UserFile(users)
        self.users = users
        self._reactor = reactor
        self._threadpool = threadpool
        self.verifier = verifier
        self.authorizer = authorizer
        self._clock = clock
        # The process that has a re-read of the file under way, if any: a
        # forked child must not wait for its parent's thread.
        self._refreshing: int | None = None
        # When the last re-read for scram_available started, by the clock.
        self._refresh_started = float("-inf")

    def _pool(self) -> tuple[IReactorFromThreads, ThreadPool]:
        """
        Resolve the reactor and thread pool, importing the global reactor
        only now so that importing this module never installs one.

        @return: the reactor and the pool to verify in.
        """
        reactor: Any = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        threadpool = self._threadpool
        if threadpool is None:
            # Needs IReactorThreads, which the global reactor provides.
            threadpool = reactor.getThreadPool()
        return reactor, threadpool

    def scram_credentials(self, username: str) -> Deferred[StoredScram]:
        """
        Look up a user's SCRAM-SHA-256 keys for the server-first message
        (L{ISCRAMLookup}).  In the thread pool, as the file may be re-read.

        @param username: the authentication identity.
        @return: a Deferred firing with the keys, or with a stable fake for
            a user who is unknown or has no scram hash (see
            L{UserFile.scram_credentials}), so the salt tells nothing.
        """
        reactor, threadpool = self._pool()
        return deferToThreadPool(reactor, threadpool, self.users.scram_credentials, username)

    def scram_available(self) -> bool:
        """
        Whether some user has SCRAM secrets (L{ISCRAMAvailability}): the
        answer of the file as last read, at once, while a re-read is started
        in the thread pool (one at a time, and at most one every
        L{REFRESH_INTERVAL} seconds) so that a SCRAM line added or removed
        shows in the mechanisms of the sessions that start after it.  With a
        C{verifier} this process checks no passwords itself, so without that
        re-read its copy of the file would only follow SCRAM lookups, which
        do not happen while SCRAM is not offered.

        @return: L{UserFile.has_scram} as last read.
        """
        now = time.monotonic() if self._clock is None else self._clock.seconds()
        # A clock set back (now before the last start) does not stop re-reads.
        recent = 0 <= now - self._refresh_started < REFRESH_INTERVAL
        if self._refreshing != os.getpid() and not recent:
            self._refreshing = os.getpid()
            self._refresh_started = now
            reactor, threadpool = self._pool()
            d = deferToThreadPool(reactor, threadpool, self.users.refresh)

            def done(result: object) -> object:
                self._refreshing = None
                return result

            d.addBoth(done)
            d.addErrback(
                lambda reason: self.log.failure(
                    "Re-reading {path} failed", reason, path=self.users.path
                )
            )
        return self.users.has_scram

    # Narrower than the interface's Deferred[bytes | tuple[()]] (never the
    # anonymous avatar), which mypy rejects as Deferred is invariant.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernamePassword | ISCRAMProof
    ) -> Deferred[bytes]:
        """
        Verify a username and password, or a SCRAM proof, and resolve the
        authzid the credentials may carry (L{IAuthzidCredentials}).

        @param credentials: L{IUsernamePassword} with C{username} and
            C{password} as UTF-8 bytes (Twisted's convention) or as text; or
            L{ISCRAMProof}, checked against the user's current keys.
        @return: a Deferred firing with an L{AvatarId} (the maildrop owner's
            name, NFC, as UTF-8 bytes, with the matched label); failing
            with L{UnauthorizedLogin} and L{FAILURE_MESSAGE} whatever the
            client got wrong, or with L{CheckerFault} if the check could not
            be made.
        """
        if ISCRAMProof.providedBy(credentials):
            return self._check_scram(credentials)
        authzid = credentials.authzid if IAuthzidCredentials.providedBy(credentials) else None
        try:
            username = normalise_username(_as_text(credentials.username))
            password = _as_text(credentials.password)
        except UnicodeDecodeError:
            self.log.debug("Authentication failed: credentials are not UTF-8")
            return fail(UnauthorizedLogin(FAILURE_MESSAGE))
        if _too_long(username) or _too_long(password):
            self.log.debug("Authentication failed: user name or password too long")
            return fail(UnauthorizedLogin(FAILURE_MESSAGE))
        d: Deferred[VerifyResult]
        if self.verifier is not None:
            d = self.verifier(username, password)
        else:
            reactor, threadpool = self._pool()
            d = deferToThreadPool(
                reactor, threadpool, self.users.verify_detailed, username, password
            )

        def on_result(result: VerifyResult) -> bytes | Deferred[bytes]:
            if not result.ok:
                self.log.debug("Authentication failed for user {username!r}", username=username)
                raise UnauthorizedLogin(FAILURE_MESSAGE)
            if result.upgrade_hash is None or result.matched_hash is None:
                return self._succeeded(username, authzid, result.label)
            # The check offers a new hash for a deprecated one; writing it
            # rewrites the file, so it runs in the pool, and a failure is
            # logged there (or here, if unforeseen) but never fails the login.
            from pop3srv.auth.editor import apply_upgrade

            reactor, threadpool = self._pool()
            written: Deferred[bool | None] = deferToThreadPool(
                reactor,
                threadpool,
                apply_upgrade,
                self.users.path,
                username,
                result.matched_hash,
                result.upgrade_hash,
                label=result.label,
            )
            written.addErrback(
                lambda reason: self.log.failure(
                    "Could not upgrade the hash of user {username!r}", reason, username=username
                )
            )
            return written.addCallback(lambda _: self._succeeded(username, authzid, result.label))

        return d.addCallbacks(on_result, self._unexpected, errbackArgs=(username,))

    def _check_scram(self, credentials: ISCRAMProof) -> Deferred[bytes]:
        """
        Check a SCRAM proof against the user's current keys.

        @param credentials: from a finished SCRAM exchange.
        @return: as for L{requestAvatarId}.
        """
        try:
            username = normalise_username(_as_text(credentials.username))
        except UnicodeDecodeError:
            self.log.debug("Authentication failed: credentials are not UTF-8")
            return fail(UnauthorizedLogin(FAILURE_MESSAGE))
        reactor, threadpool = self._pool()
        d = deferToThreadPool(reactor, threadpool, self.users.scram_lookup, username)

        def on_result(stored: StoredScram | None) -> bytes:
            if stored is None or not credentials.checkProof(stored):
                self.log.debug(
                    "SCRAM authentication failed for user {username!r}", username=username
                )
                raise UnauthorizedLogin(FAILURE_MESSAGE)
            return self._succeeded(username, credentials.authzid, stored.label)

        return d.addCallbacks(on_result, self._unexpected, errbackArgs=(username,))

    def _unexpected(self, reason: Failure, username: str) -> NoReturn:
        """
        Log a checking error in full, and fail as a server fault.

        @raise CheckerFault: always, caused by C{reason}'s exception.
        """
        self.log.failure(
            "Unexpected error checking credentials for user {username!r}",
            reason,
            username=username,
        )
        cause = reason.value
        raise CheckerFault(f"checking the credentials failed: {type(cause).__name__}") from cause

    def _succeeded(self, username: str, authzid: str | None, label: str | None) -> AvatarId:
        """
        Report a match and resolve whose maildrop it opens.

        @param username: the authenticated user, NFC.
        @param authzid: the user they ask to act as, or L{None}.
        @param label: the app-password label that matched, or L{None}.
        @return: the avatar ID: C{username}, or C{authzid} (NFC) if it
            differs and L{authorizer} allows it.
        @raise UnauthorizedLogin: if an authzid is asked for and not allowed.
        """
        owner = username
        if authzid:
            owner = normalise_username(authzid)
            if owner != username and not self.authorize(username, owner):
                self.log.info(
                    "User {username!r} may not act as {authzid!r}",
                    username=username,
                    authzid=owner,
                )
                raise UnauthorizedLogin(FAILURE_MESSAGE)
        if label is not None:
            self.log.info(
                "User {username!r} authenticated with app password {label!r}",
                username=username,
                label=label,
            )
        return AvatarId(owner.encode("utf-8"), label)

    def authorize(self, authcid: str, authzid: str) -> bool:
        """
        The master-user rule (L{IAuthorizer}), which L{requestAvatarId}
        applies after the credentials check out; a SASL exchange may ask it
        early too, to refuse before any hashing.

        @param authcid: who is authenticating (NFC).
        @param authzid: whose maildrop they ask for (NFC).
        @return: whether L{authorizer} lets C{authcid} act as C{authzid};
            without one, or if it raises, no.
        """
        if self.authorizer is None:
            return False
        try:
            return bool(self.authorizer.authorize(authcid, authzid))
        except Exception:
            self.log.failure("Authorization rule failed for {username!r}", username=authcid)
            return False
