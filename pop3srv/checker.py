# -*- test-case-name: tests.test_checker -*-
"""
A credentials checker for L{IUsernamePassword} backed by a L{UserFile}.

Hash verification is slow on purpose, so it runs in a thread pool; the
reactor thread only decodes the credentials and maps the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorFromThreads
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool

    from pop3srv.userfile import UserFile

__all__ = ["FAILURE_MESSAGE", "PasslibChecker"]

#: The one message for every failed login, so that the text never tells an
#: unknown user from a wrong password.
FAILURE_MESSAGE = "Invalid username or password."


def _as_text(value: bytes | str) -> str:
    """
    @param value: a username or password from a credentials object.
    @return: the value as text.
    @raise UnicodeDecodeError: if bytes are not UTF-8.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


@implementer(ICredentialsChecker)
class PasslibChecker:
    """
    Check usernames and passwords against a user file of passlib hashes.

    @ivar credentialInterfaces: only L{IUsernamePassword}: with the password
        stored as a one-way hash, APOP-style challenge/response cannot work.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        users: UserFile | str,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
    ) -> None:
        """
        @param users: the user file to verify against, or its path.
        @param reactor: delivers results back to the reactor thread; the
            global reactor if L{None}, looked up on first use.
        @param threadpool: runs the verification; if L{None}, the pool of
            C{reactor}, which must then also provide
            L{twisted.internet.interfaces.IReactorThreads}.
        """
        if isinstance(users, str):
            from pop3srv.userfile import UserFile

            users = UserFile(users)
        self.users = users
        self._reactor = reactor
        self._threadpool = threadpool

    def _pool(self) -> tuple[IReactorFromThreads, ThreadPool]:
        """
        Resolve the reactor and thread pool, importing the global reactor
        only now so that importing this module never installs one.

        @return: the reactor and the pool to verify in.
        """
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        threadpool = self._threadpool
        if threadpool is None:
            # Needs IReactorThreads, which the global reactor provides.
            threadpool = reactor.getThreadPool()
        return reactor, threadpool

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes]:
        """
        Verify a username and password.

        @param credentials: with C{username} and C{password} as UTF-8 bytes
            (Twisted's convention) or as text.
        @return: a Deferred firing with the username as UTF-8 bytes, or
            failing with L{UnauthorizedLogin} and L{FAILURE_MESSAGE} whatever
            the reason.
        """
        try:
            username = _as_text(credentials.username)
            password = _as_text(credentials.password)
        except UnicodeDecodeError:
            self.log.debug("Authentication failed: credentials are not UTF-8")
            return fail(UnauthorizedLogin(FAILURE_MESSAGE))
        reactor, threadpool = self._pool()
        d = deferToThreadPool(reactor, threadpool, self.users.verify, username, password)

        def on_result(ok: bool) -> bytes:
            if not ok:
                self.log.debug("Authentication failed for user {username!r}", username=username)
                raise UnauthorizedLogin(FAILURE_MESSAGE)
            return username.encode("utf-8")

        def on_error(reason: Failure) -> bytes:
            self.log.failure(
                "Unexpected error verifying credentials for user {username!r}",
                reason,
                username=username,
            )
            raise UnauthorizedLogin(FAILURE_MESSAGE)

        return d.addCallbacks(on_result, on_error)
