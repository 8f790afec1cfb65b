# -*- test-case-name: tests.test_checker -*-
"""
The C{passlib} strcred plugin: C{--auth passlib:/path/to/users}.

Only Twisted and L{pop3srv.auth.credentials} (for the L{ISCRAMProof}
interface; it imports nothing but Twisted and the pure protocol core) load at
module level; the checker and passlib load when a checker is built, so plugin
scanning stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

from pop3srv.auth.credentials import ISCRAMProof

if TYPE_CHECKING:
    from pop3srv.auth.checker import PasslibChecker

PASSLIB_HELP = """\
Checks usernames and passwords against a user file of name:hash lines,
one user per line; '#' comments and blank lines are allowed, fields after
the hash are ignored (so a Dovecot passwd-file works), and the file is
re-read whenever it changes.

Accepted hashes: argon2 (the default for new hashes), bcrypt,
sha512_crypt, sha256_crypt, pbkdf2_sha256, pbkdf2_sha512, scram
(passlib's; serves SASL SCRAM-SHA-256 and -PLUS as well) and LDAP
{SSHA}, {SSHA256}, {SSHA512}; for htpasswd migration also $apr1$ and $1$
(deprecated). Dovecot prefixes {SHA512-CRYPT}, {SHA256-CRYPT},
{BLF-CRYPT}, {MD5-CRYPT}, {ARGON2ID}, {ARGON2I} and {CRYPT} are
understood. Plaintext ({PLAIN}) and unknown schemes are rejected, and a
bad line is logged and skipped.

A user may have a scram and an argon2 line for one password, app passwords
(a field app=LABEL after the hash, one line each) and a main password
marked unusable for POP3 (a field nopop3).

Manage the file with pop3srv-passwd.
"""


@implementer(ICheckerFactory, IPlugin)
class PasslibCheckerFactory:
    """
    Build L{pop3srv.auth.checker.PasslibChecker}s from a user file path.
    """

    authType = "passlib"
    authHelp = PASSLIB_HELP
    argStringFormat = "A path to a user file of name:hash lines"
    credentialInterfaces = (IUsernamePassword, ISCRAMProof)

    def generateChecker(self, argstring: str = "") -> PasslibChecker:
        """
        @param argstring: the path to the user file.
        @return: a checker for that file.
        @raise pop3srv.auth.userfile.UserFileError: if the path is empty or the
            file cannot be read.
        """
        from pop3srv.auth.checker import PasslibChecker
        from pop3srv.auth.userfile import UserFile, UserFileError

        if not argstring.strip():
            raise UserFileError(f"{self.authType!r} requires a user file path")
        return PasslibChecker(UserFile(argstring))


thePasslibCheckerFactory = PasslibCheckerFactory()
