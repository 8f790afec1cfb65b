# -*- test-case-name: tests.test_protocol,tests.test_abuse -*-
"""
The login service: everything between "the client sent credentials" and
"this session owns a maildrop", in one place.

A L{LoginService} asks the policy authority (L{IPolicyAuthority}: the
failed-login throttle and the per-user session count, for the whole
service) and owns the login gate (how many password checks may run at once
in this process), C{Portal.login} and the audit log, and answers each
attempt with one outcome:

  - L{LoginSucceeded}: the maildrop is open and listed; its C{release}
    logs out and ends the session count, once;
  - L{LoginRefused}: the client is told C{-ERR [code] text} (a wrong
    password, after the failure delay; a lockout; a locked maildrop; too
    many sessions; the server too busy to check now);
  - L{LoginFault}: the server failed (C{-ERR [SYS/TEMP]}), never counted as
    a wrong password.

The protocol only renders the outcome.  The service also answers what the
session offers: the SASL mechanisms (from C{portal.listCredentialsInterfaces()},
and SCRAM only while some user has SCRAM secrets), whether APOP can be
checked, the SCRAM key lookup and the early authzid filter; and it counts
the SASL failures the exchange itself finds on the credentials
(L{LoginService.sasl_failed}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from twisted.cred import credentials, error
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure

from pop3srv.auth.checker import CheckerFault
from pop3srv.auth.credentials import (
    AvatarLogout,
    IAuthorizer,
    IAuthzidCredentials,
    ISCRAMAvailability,
    ISCRAMLookup,
    ISCRAMProof,
    mechanisms_for,
)
from pop3srv.core import sasl
from pop3srv.core.errors import InvalidUsername, Pop3Error
from pop3srv.core.machine import AUTH_FAILED
from pop3srv.core.scram import StoredScram
from pop3srv.server.audit import audit
from pop3srv.server.authority import (
    AttemptTicket,
    Blocked,
    IPolicyAuthority,
    LocalAuthority,
    Verdict,
    log_fault,
)
from pop3srv.server.limits import (
    AccessRules,
    ConnectionLimits,
    FailureOutcome,
    LoginGate,
    ThrottleSettings,
)

__all__ = [
    "LoginFault",
    "LoginOutcome",
    "LoginRefused",
    "LoginService",
    "LoginSucceeded",
    "Peer",
    "ServerPolicy",
    "escape_for_log",
]

TEMPORARY_FAILURE = "Temporary failure, try again later."

#: The least time (seconds) kept for a password check when an attempt
#: waits for a place: the wait ends this long, or as long as the slowest
#: recent failed check if that is longer, before C{max_failure_delay}.
MIN_CHECK_TIME = 1.0

_T = TypeVar("_T")


class _Late:
    """What L{LoginService._by_deadline} fires with when the answer is late."""


_LATE = _Late()


def escape_for_log(text: str) -> str:
    """Make client-supplied text safe for a single log line."""
    return text.encode("unicode_escape").decode("ascii")[:300]


@dataclass
class ServerPolicy:
    """
    The abuse limits a factory enforces (see L{pop3srv.server.limits}).

    A reload of the configuration (L{pop3srv.app.reload}) replaces
    C{access}, C{auth_timeout} and C{max_bad_commands} and sets the
    C{login_gate}'s capacity in place: each is read when a connection needs
    it (the rules and the login deadline at the connect), so the new values
    hold for the connections that come after.

    @ivar authority: counts and decides the failed-login throttle,
        connections and sessions for the whole service; L{None} for a
        L{LocalAuthority} with the documented defaults, made by
        L{authority_on} (which the L{LoginService} given this policy calls).
    @ivar access: the IP rules checked before the greeting.
    @ivar login_gate: how many password checks may run at once in this
        process.
    @ivar auth_timeout: seconds a client may take to log in, from connect.
    @ivar max_bad_commands: consecutive bad commands before disconnecting.
    """

    authority: IPolicyAuthority | None = None
    access: AccessRules = field(default_factory=AccessRules)
    login_gate: LoginGate = field(default_factory=lambda: LoginGate(64))
    auth_timeout: float = 60.0
    max_bad_commands: int = 10

    def authority_on(self, clock: IReactorTime) -> IPolicyAuthority:
        """
        The policy's authority; if it has none yet, a L{LocalAuthority}
        with the documented defaults, timed by C{clock}, which it keeps.

        @param clock: the clock of the reactor the policy is used on.
        """
        if self.authority is None:
            self.authority = LocalAuthority(ThrottleSettings(), ConnectionLimits(), clock=clock)
        return self.authority


@dataclass(frozen=True)
class Peer:
    """
    Where a login attempt comes from, for the throttle, counts and audit.

    @ivar host: the client's address (C{local} for a UNIX socket).
    @ivar session: the session tag of the audit log.
    @ivar label: C{host:port}, for log lines.
    """

    host: str
    session: str
    label: str


class LoginSucceeded:
    """
    The client is logged in: the maildrop is open and listed.

    @ivar username: whose maildrop it is (the avatar ID the checker
        returned, when the realm reports it; else the name the client asked
        for).
    @ivar label: the app-password label that matched, or L{None}.
    @ivar mailbox: the L{IMailbox} avatar.
    @ivar sizes: the message sizes from C{listMessages}.
    """

    def __init__(
        self,
        username: str,
        label: str | None,
        mailbox: Any,
        sizes: Sequence[int],
        release: Callable[[], None],
    ) -> None:
        self.username = username
        self.label = label
        self.mailbox = mailbox
        self.sizes = sizes
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """
        Log out and end the session count; later calls do nothing.
        """
        release, self._release = self._release, None
        self.mailbox = None
        if release is not None:
            release()

    def __repr__(self) -> str:
        return f"LoginSucceeded(username={self.username!r}, label={self.label!r})"


@dataclass(frozen=True)
class LoginRefused:
    """
    Tell the client C{-ERR [code] text}; it stays in AUTHORIZATION.
    """

    code: str
    text: str


@dataclass(frozen=True)
class LoginFault:
    """
    The server could not complete the login (a bug, a lost worker, a lookup
    that failed): C{-ERR [SYS/TEMP]}, logged in full, never counted as a
    wrong password.
    """

    text: str = TEMPORARY_FAILURE
    code: ClassVar[str] = "SYS/TEMP"


LoginOutcome = LoginSucceeded | LoginRefused | LoginFault


class LoginService:
    """
    Logs clients in through one C{Portal}, under one L{ServerPolicy}.

    SCRAM needs the user's stored keys before there are any credentials to
    log in with, so that first step cannot be a C{Portal.login}; the service
    is given the L{ISCRAMLookup} to use (C{scram_lookup}), and likewise the
    L{IAuthorizer} whose rule may refuse an authzid early.  L{for_portal}
    finds both where they must be for the answers to agree: on the checker
    the portal itself uses for L{ISCRAMProof} (and for passwords), so the
    keys sent first are the keys the proof is then checked against.  That
    one look at C{portal.checkers} happens here, once, at start-up; the
    login itself always goes through C{Portal.login}, which also resolves
    an authzid (the checker returns it as the avatar ID).

    Every failed login is answered at the same time after the attempt
    began, whatever it cost to check: after the throttle's delay, or after
    the slowest failed check of the last one to two throttle windows if
    that is longer (capped at the throttle's C{max_failure_delay}).  So the
    time of a wrong password does not tell a user with a costly hash from
    an unknown user, whose password is checked against a cheaper decoy; the
    slowest time is remembered that long so that a prober cannot wash it
    out with cheap failures first.  A success is answered as soon as it is
    known.

    Nothing the authority does keeps a client waiting past its patience,
    C{max_failure_delay} from the start of the attempt: a refused or failed
    login is answered by then (once its password check, if any, has ended),
    however long the count of its failure takes.  An attempt that waits for
    a place stops waiting early enough for its check to fit in: when no
    more than the time of a check is left, the slowest recent failed check
    or L{MIN_CHECK_TIME} if that is longer (but at most half the cap, so
    that a wait is always possible).  It is then answered C{[SYS/TEMP]}
    without a check, and counts for nothing.  So an admitted check normally
    ends, and is answered, within the cap.
    """

    _log = Logger()

    def __init__(
        self,
        portal: Portal,
        reactor: Any,
        policy: ServerPolicy | None = None,
        *,
        scram_lookup: ISCRAMLookup | None = None,
        authorizer: IAuthorizer | None = None,
        scram_availability: ISCRAMAvailability | None = None,
    ) -> None:
        """
        @param portal: a portal whose realm gives L{IMailbox} avatars.
        @param reactor: for the failure delay (L{IReactorTime}); also the
            clock of the default authority (L{ServerPolicy.authority_on}).
        @param policy: abuse limits; the documented defaults if L{None}.
        @param scram_lookup: finds SCRAM keys; L{None} offers no SCRAM.
        @param authorizer: refuses authzids before any password is checked;
            L{None} refuses every authzid that differs from the authcid.
        @param scram_availability: says whether any user has SCRAM keys;
            if L{None}, C{scram_lookup} if it provides
            L{ISCRAMAvailability}, else SCRAM is offered whenever there is
            a lookup.
        """
        self.portal = portal
        self.reactor = reactor
        self.policy = policy if policy is not None else ServerPolicy()
        self.authority: IPolicyAuthority = self.policy.authority_on(reactor)
        self.scram_lookup = scram_lookup
        self.authorizer = authorizer
        if scram_availability is None:
            scram_availability = ISCRAMAvailability(scram_lookup, None)
        self.scram_availability = scram_availability
        # The slowest failed check (seconds from the start of the attempt)
        # in the throttle window that began at _window_start (at the first
        # failure), and in the one before it.
        self._window_start: float | None = None
        self._slowest = 0.0
        self._slowest_before = 0.0

    @classmethod
    def for_portal(
        cls, portal: Portal, reactor: Any, policy: ServerPolicy | None = None
    ) -> LoginService:
        """
        A service whose SCRAM lookup and authorizer are those of the
        checkers C{portal} uses (see the class docstring for why there).

        @return: the service.
        """
        scram_checker = portal.checkers.get(ISCRAMProof)
        scram_lookup = ISCRAMLookup(scram_checker, None)
        authorizer = None
        for interface in (ISCRAMProof, credentials.IUsernamePassword):
            authorizer = IAuthorizer(portal.checkers.get(interface), None)
            if authorizer is not None:
                break
        return cls(portal, reactor, policy, scram_lookup=scram_lookup, authorizer=authorizer)

    # --- what a session offers

    def mechanisms(self, *, tls_active: bool, plaintext_allowed: bool) -> tuple[str, ...]:
        """
        @return: the SASL mechanisms, strongest first; SCRAM only while
            some user has SCRAM keys (L{ISCRAMAvailability}).
        """
        return tuple(
            mechanisms_for(
                self.portal.listCredentialsInterfaces(),
                scram_lookup=self._scram_usable(),
                tls_active=tls_active,
                plaintext_allowed=plaintext_allowed,
            )
        )

    def _scram_usable(self) -> bool:
        """
        @return: whether there is a SCRAM lookup and, as far as it says,
            some user it can serve.
        """
        if self.scram_lookup is None:
            return False
        if self.scram_availability is None:
            return True
        try:
            return bool(self.scram_availability.scram_available())
        except Exception:
            # A broken answer must not stop the session: offer SCRAM as a
            # lookup without the interface would.
            self._log.failure("Asking whether SCRAM can be served failed")
            return True

    def apop_available(self) -> bool:
        """Whether some checker can verify an APOP digest."""
        return credentials.IUsernameHashedPassword in self.portal.listCredentialsInterfaces()

    @property
    def authorize(self) -> Callable[[str, str], bool] | None:
        """
        The early authzid filter for L{pop3srv.core.sasl.SASLServer}, or
        L{None} to refuse every authzid that differs from the authcid.
        """
        return self.authorizer.authorize if self.authorizer is not None else None

    def lookup(self, username: str) -> defer.Deferred[StoredScram | LoginFault | None]:
        """
        Find a user's SCRAM keys before the proof.

        @param username: the authentication identity.
        @return: a Deferred firing with the keys, L{None} (no keys: the
            exchange goes on with a fake and fails), or a L{LoginFault}.
        """
        if self.scram_lookup is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.maybeDeferred(self.scram_lookup.scram_credentials, username)

        def failed(failure: Failure) -> LoginFault:
            self._log.failure(
                "SCRAM lookup for {user} failed", failure, user=escape_for_log(username)
            )
            return LoginFault()

        return d.addErrback(failed)

    # --- logging in

    def login(
        self, creds: credentials.ICredentials, *, username: str, method: str, peer: Peer
    ) -> defer.Deferred[LoginOutcome]:
        """
        Check C{creds} (unless the throttle or the gate refuses), open and
        list the maildrop, and count the session.

        @param creds: for C{Portal.login}.
        @param username: the name the client gave (the authcid), for the
            throttle and the audit log.
        @param method: the login kind for the audit log (C{password},
            C{apop}, C{sasl-plain}, ...).
        @param peer: who is asking.
        @return: a Deferred firing with the outcome, after the failure delay
            for a refusal that has one; it never fails.
        """
        return _when_settled(self._login(creds, username, method, peer, self.reactor.seconds()))

    def _login(
        self,
        creds: credentials.ICredentials,
        username: str,
        method: str,
        peer: Peer,
        started: float,
    ) -> defer.Deferred[LoginOutcome]:
        """
        L{login}, for an attempt that began at C{started}.
        """
        authority = self.authority
        asked = authority.begin_login(peer.host, username)
        answer = self._by_deadline(asked, self._wait_deadline(started), withdraw=True)

        def admitted(
            answer: AttemptTicket | Blocked | _Late,
        ) -> defer.Deferred[LoginOutcome] | LoginOutcome:
            if isinstance(answer, _Late):
                # Other attempts from this address held every place until
                # there was no time left for a check: no check, no count.
                self._audit(peer, "login-refused", "attempts-in-flight", username, method)
                return LoginRefused("SYS/TEMP", "Too many logins in progress, try again later.")
            if isinstance(answer, Blocked):
                # No password check at all, so a blocked guesser cannot tie
                # up the hashing threads; the refusal counts as a failure,
                # answered after its delay, at the latest at the cap.
                self._audit(peer, "login-refused", f"locked-out-{answer.scope}", username, method)
                counted = authority.login_failed(peer.host, username)
                refused = LoginRefused("AUTH", AUTH_FAILED)
                return self._answer_counted(counted, started, refused, username, peer, method)
            return self._check(creds, username, method, peer, started, answer)

        checked: defer.Deferred[LoginOutcome] = answer.addCallback(admitted)
        return checked.addErrback(self._fault, username, peer, method)

    def _check(
        self,
        creds: credentials.ICredentials,
        username: str,
        method: str,
        peer: Peer,
        started: float,
        ticket: AttemptTicket,
    ) -> defer.Deferred[LoginOutcome] | LoginOutcome:
        """
        Check C{creds} for an attempt the authority admitted (C{ticket}),
        unless the gate has no place for it.
        """
        policy = self.policy
        if not policy.login_gate.try_enter():
            self._end_quietly(ticket, "released")
            self._audit(peer, "login-refused", "server-busy", username, method)
            return LoginRefused("SYS/TEMP", "Server busy, try again later.")
        checking = self.reactor.seconds()
        d: defer.Deferred[Any] = self.portal.login(creds, None, IMailbox)

        def leave_gate(result: object) -> object:
            policy.login_gate.leave()
            return result

        d.addBoth(leave_gate)
        requested = creds.authzid if IAuthzidCredentials.providedBy(creds) else None
        d.addCallbacks(
            self._logged_in,
            self._failed,
            callbackArgs=(username, requested or username, method, peer, ticket),
            errbackArgs=(username, method, peer, ticket, started, checking),
        )
        return d

    def _wait_deadline(self, started: float) -> float:
        """
        When an attempt that began at C{started} stops waiting for a place:
        early enough for its check to end within C{max_failure_delay} (see
        the class docstring).
        """
        if self._window_start is not None:
            # Forget a slow check of windows gone by (none before a failure).
            self._rotate(self.reactor.seconds())
        cap = self.authority.settings.max_failure_delay
        check = max(MIN_CHECK_TIME, self._slowest, self._slowest_before)
        return started + cap - min(check, cap / 2)

    def _end_quietly(self, ticket: AttemptTicket, verdict: Verdict) -> None:
        """End C{ticket} without waiting for the answer (a fault is logged)."""
        ended = self.authority.end_login(ticket, verdict)
        ended.addErrback(
            lambda failure: log_fault(self._log, failure, "Ending a login attempt failed")
        )

    def _by_deadline(
        self, asked: defer.Deferred[_T], deadline: float, *, withdraw: bool = False
    ) -> defer.Deferred[_T | _Late]:
        """
        Wait for the authority's answer C{asked}, but not past C{deadline}.

        @param withdraw: cancel C{asked} at the deadline (a C{begin_login}
            that is waiting for a place); a ticket it still brings is
            ended, uncounted.
        @return: fires with C{asked}'s result (or fails as it does), or with
            C{_LATE} at the deadline if it has not come; a late answer is
            dropped (a late failure logged).
        """
        raced: defer.Deferred[_T | _Late] = defer.Deferred()

        def late() -> None:
            raced.callback(_LATE)
            if withdraw:
                asked.cancel()

        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), late)

        def settled(result: _T | Failure) -> None:
            if timer.active():
                timer.cancel()
                if isinstance(result, Failure):
                    raced.errback(result)
                else:
                    raced.callback(result)
            elif isinstance(result, AttemptTicket):
                self._end_quietly(result, "released")
            elif isinstance(result, Failure) and not result.check(defer.CancelledError):
                log_fault(self._log, result, "The policy authority answered late, and failed")

        asked.addBoth(settled)
        return raced

    def sasl_failed(
        self, step: sasl.Failure, *, peer: Peer, method: str | None = None
    ) -> defer.Deferred[LoginOutcome]:
        """
        A SASL exchange failed on the client's credentials before any
        password check (a L{sasl.Failure} with a C{reason}: an authzid
        refused, an empty password, a channel binding that does not match):
        audit it and count it as a failed login, like a wrong password, and
        answer with the step's text after the same delay.

        @param step: the failure; its C{username} is the authcid.
        @param peer: who is asking.
        @param method: the login kind for the audit event (C{sasl-plain},
            ...), as for L{login}.
        @return: a Deferred firing with a L{LoginRefused}, after the delay.
        """
        now = self.reactor.seconds()
        username = step.username or ""
        reason = step.reason or "bad-credentials"
        self._audit(peer, "login-failed", reason, step.username, method)
        counted = self.authority.login_failed(peer.host, username)
        refused = LoginRefused(step.code or "AUTH", step.text)
        return _when_settled(self._answer_counted(counted, now, refused, username, peer, method))

    def _answer_counted(
        self,
        counted: defer.Deferred[FailureOutcome],
        started: float,
        refused: LoginRefused,
        username: str,
        peer: Peer,
        method: str | None,
    ) -> defer.Deferred[LoginOutcome]:
        """
        Answer C{refused} for a failure the authority is counting
        (C{counted}), after its delay (L{_answer_failure}), and at the
        latest C{max_failure_delay} after C{started}, however long the
        count takes; a count that fails is a L{LoginFault}.
        """

        def audited(outcome: FailureOutcome) -> FailureOutcome:
            # Audited when it is known, even after the client was answered.
            if outcome.lockout is not None:
                self._audit(peer, "lockout", outcome.lockout.scope, username or None)
            return outcome

        counted.addCallback(audited)
        deadline = started + self.authority.settings.max_failure_delay

        def answer(outcome: FailureOutcome | _Late) -> defer.Deferred[LoginOutcome] | LoginOutcome:
            if isinstance(outcome, _Late):
                return refused
            return self._answer_failure(started, outcome.delay, refused)

        answered: defer.Deferred[LoginOutcome] = self._by_deadline(counted, deadline).addCallback(
            answer
        )
        return answered.addErrback(self._fault, username, peer, method)

    def _logged_in(
        self,
        result: tuple[Any, Any, Callable[[], None]],
        username: str,
        owner: str,
        method: str,
        peer: Peer,
        ticket: AttemptTicket,
    ) -> defer.Deferred[LoginOutcome]:
        """
        C{Portal.login} succeeded: end the attempt, count the session and
        list the maildrop.

        @param owner: whose maildrop was asked for, used only when the realm
            does not report the avatar ID (L{AvatarLogout}).
        """
        _, mailbox, logout = result
        label = None
        if isinstance(logout, AvatarLogout):
            owner = logout.avatar_id.decode("utf-8")
            label = logout.avatar_id.label
        authority = self.authority
        # The end of the attempt and the session's count in one question (a
        # round trip with a remote authority); one that fails holds nothing.
        asked: defer.Deferred[bool] = authority.login_succeeded(ticket, owner, peer.host)

        def log_out() -> None:
            try:
                logout()
            except Exception:
                self._log.failure("Releasing the mailbox of {peer} failed", peer=peer.label)

        def release() -> None:
            authority.end_session(owner, peer.host)
            log_out()

        def unanswered(failure: Failure) -> LoginOutcome:
            # The authority failed: a server fault, whatever the password.
            log_out()
            return self._fault(failure, owner, peer, method)

        def answered(counted: bool) -> defer.Deferred[LoginOutcome] | LoginOutcome:
            if not counted:
                log_out()
                self._audit(peer, "login-refused", "max-sessions-per-user", owner, method)
                return LoginRefused("SYS/TEMP", "Too many sessions for this user.")
            d: defer.Deferred[Sequence[int]] = defer.maybeDeferred(mailbox.listMessages)

            def listed(sizes: Sequence[int]) -> LoginOutcome:
                reason = f"{method}+app:{label}" if label else method
                self._audit(peer, "login-ok", reason, owner, method)
                return LoginSucceeded(owner, label, mailbox, sizes, release)

            def unlisted(failure: Failure) -> LoginOutcome:
                release()
                return self._fault(failure, owner, peer, method)

            return d.addCallbacks(listed, unlisted)

        outcome: defer.Deferred[LoginOutcome] = asked.addCallbacks(answered, unanswered)
        return outcome

    def _failed(
        self,
        failure: Failure,
        username: str,
        method: str,
        peer: Peer,
        ticket: AttemptTicket,
        started: float,
        checking: float,
    ) -> defer.Deferred[LoginOutcome] | LoginOutcome:
        """
        C{Portal.login} failed: a wrong password (counted, answered after the
        delay), a refusal the client is told about, or a server fault (both
        release the attempt uncounted).

        @param started: when the attempt began.
        @param checking: when its check began (after any wait for a place,
            which says nothing of what the check cost).
        """
        if failure.check(error.UnauthorizedLogin, error.UnhandledCredentials, InvalidUsername):
            reason = "invalid-username" if failure.check(InvalidUsername) else "bad-credentials"
            self._audit(peer, "login-failed", reason, username, method)
            now = self.reactor.seconds()
            self._rotate(now)
            self._slowest = max(self._slowest, now - checking)
            authority = self.authority

            def counted(outcome: FailureOutcome | None) -> Any:
                # An authority that no longer knows the ticket (it ended
                # already) still counts the failure.
                if outcome is None:
                    return authority.login_failed(peer.host, username)
                return outcome

            ended = authority.end_login(ticket, "failed").addCallback(counted)
            return self._answer_counted(
                ended, started, LoginRefused("AUTH", AUTH_FAILED), username, peer, method
            )
        self._end_quietly(ticket, "released")
        if failure.check(Pop3Error):
            exc = failure.value
            assert isinstance(exc, Pop3Error)
            code = (exc.code or "SYS/TEMP").lower()
            self._audit(peer, "login-refused", code, username, method)
            self._log.info(
                "Login of {user} from {peer} refused: {detail}",
                user=escape_for_log(username),
                peer=peer.label,
                detail=exc.detail or exc.text,
            )
            return LoginRefused(exc.code or "SYS/TEMP", exc.text)
        return self._fault(failure, username, peer, method)

    def _fault(
        self, failure: Failure, username: str, peer: Peer, method: str | None = None
    ) -> LoginFault:
        self._audit(peer, "login-refused", "error", username, method)
        if failure.check(CheckerFault):
            # The checker logged the cause with its traceback already.
            self._log.error(
                "Login of {user} from {peer} failed: the password could not be checked",
                user=escape_for_log(username),
                peer=peer.label,
            )
        else:
            # An authority that cannot be reached is one line; a bug is
            # logged with its traceback.
            log_fault(
                self._log,
                failure,
                "Login of {user} from {peer} failed",
                user=escape_for_log(username),
                peer=peer.label,
            )
        return LoginFault()

    def _answer_failure(
        self, started: float, delay: float, outcome: LoginOutcome
    ) -> defer.Deferred[LoginOutcome]:
        """
        Answer a failure at C{started} plus C{delay}, or plus the slowest
        recent failed check if that is longer (see the class docstring),
        holding no thread meanwhile.

        @param started: when the attempt began.
        @param delay: the throttle's delay.
        """
        now = self.reactor.seconds()
        self._rotate(now)
        cap = self.authority.settings.max_failure_delay
        floor = max(self._slowest, self._slowest_before)
        # Never past the cap after the start, whatever the authority says.
        wait = started + min(max(delay, floor), cap) - now
        return task.deferLater(self.reactor, max(0.0, wait), lambda: outcome)

    def _rotate(self, now: float) -> None:
        """
        Start a new throttle window for the slowest failed check once the
        current one is over, keeping the one that ended (a sliding maximum
        over one to two windows, in constant space).
        """
        if self._window_start is None:
            self._window_start = now
        window = self.authority.settings.window
        elapsed = now - self._window_start
        if elapsed < window:
            return
        self._slowest_before = self._slowest if elapsed < 2 * window else 0.0
        self._slowest = 0.0
        self._window_start = now

    @staticmethod
    def _audit(
        peer: Peer, event: str, reason: str, user: str | None, method: str | None = None
    ) -> None:
        audit(event, session=peer.session, peer=peer.host, reason=reason, user=user, method=method)


def _when_settled(chain: defer.Deferred[_T]) -> defer.Deferred[_T]:
    """
    A Deferred that fires with C{chain}'s final result: one whose callbacks
    wait on further Deferreds counts as C{called} already, which an answer
    still to come is not.
    """
    settled: defer.Deferred[_T] = defer.Deferred()
    chain.chainDeferred(settled)
    return settled
