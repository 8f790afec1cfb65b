"""
The mbox maildrop behind the POP3 server.

L{open_maildrop} opens one session's L{MboxMailbox}.
"""

from pop3srv.mbox.mailbox import MboxMailbox, open_maildrop

__all__ = ["MboxMailbox", "open_maildrop"]
