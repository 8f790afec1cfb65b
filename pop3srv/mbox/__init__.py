"""
The mbox maildrop behind the POP3 server.

L{open_maildrop} opens one session's L{MboxMailbox}.  Both are imported on
first use, so C{import pop3srv.mbox.scan} does not load Twisted.
"""

from importlib import import_module
from typing import Any

__all__ = ["MboxMailbox", "open_maildrop"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("pop3srv.mbox.mailbox"), name)
    raise AttributeError(f"module 'pop3srv.mbox' has no attribute {name!r}")
