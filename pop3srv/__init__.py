"""
pop3srv: a POP3 server for mbox maildrops, built on Twisted.

The public API, for serving POP3 from another Twisted program::

    from twisted.cred.portal import Portal
    from pop3srv import POP3ServerFactory, MboxRealm, PasslibChecker

    portal = Portal(MboxRealm("/var/mail/{user}"), [PasslibChecker("/etc/pop3srv/users")])
    factory = POP3ServerFactory(portal)

 - L{POP3ServerFactory}: the protocol factory; takes any cred L{Portal} whose
   realm gives L{twisted.mail.pop3.IMailbox} avatars.
 - L{MboxRealm}: the realm that maps users to mbox files through a template.
 - L{PasslibChecker}: the checker for passlib-hashed user files.
 - L{open_maildrop} and L{MboxMailbox}: the mbox maildrop as an C{IMailbox}.
 - L{TLSContextSource}: a certificate and key for STLS and implicit TLS
   (pass it as C{POP3ServerFactory(..., tls=source)} and to
   C{TLSMemoryBIOFactory}); C{reload()} re-reads renewed files.

Names are imported on first use, so importing C{pop3srv} (as Twisted's plugin
scan does) stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "POP3ServerFactory": "pop3srv.server.protocol",
    "MboxRealm": "pop3srv.auth.realm",
    "PasslibChecker": "pop3srv.auth.checker",
    "MboxMailbox": "pop3srv.mbox",
    "open_maildrop": "pop3srv.mbox",
    "TLSContextSource": "pop3srv.server.tls",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pop3srv' has no attribute {name!r}")
    return getattr(import_module(module), name)
