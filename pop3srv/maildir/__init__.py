# -*- test-case-name: tests.test_maildir -*-
"""
The Maildir maildrop behind the POP3 server (C{--mailbox maildir:PATH}).

L{open_maildir} opens one session's L{MaildirMailbox}.  Both are imported
on first use, so C{import pop3srv.maildir.names} does not load Twisted.
"""

from importlib import import_module
from typing import Any

__all__ = ["MaildirMailbox", "open_maildir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("pop3srv.maildir.mailbox"), name)
    raise AttributeError(f"module 'pop3srv.maildir' has no attribute {name!r}")
