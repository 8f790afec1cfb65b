# -*- test-case-name: tests.test_abuse -*-
"""
The audit log: one line per login success or failure, lockout and limit hit,
in a stable format that fail2ban (etc/fail2ban/) and log tools can parse::

    pop3srv-audit event=login-failed session=1a2b-7 peer=192.0.2.7 user="al" reason=bad-credentials

Fields always come in this order; C{user} is JSON-quoted (so no client text
can forge another field), and passwords never appear.

The event carries more than the line shows, for the metrics
(L{pop3srv.server.metrics}): C{audit_event}, the event's kind, and for a
login the C{method} (C{password}, C{apop}, C{sasl-plain}, ...), which the
line leaves out so that its format stays the one fail2ban reads.
"""

from __future__ import annotations

import json

from twisted.logger import Logger

_log = Logger(namespace="pop3srv.audit")

FORMAT = "pop3srv-audit event={event} session={session} peer={peer} user={user} reason={reason}"


def quote_user(username: str | None) -> str:
    """A username as a JSON string with only printable ASCII, cut to 255 characters."""
    if username is None:
        return "-"
    return json.dumps(username[:255], ensure_ascii=True)


def audit(
    event: str,
    *,
    session: str,
    peer: str,
    reason: str,
    user: str | None = None,
    method: str | None = None,
) -> None:
    """
    Log one audit event.

    @param method: for a login, how the client logged in (not in the line).
    """
    _log.info(
        FORMAT,
        event=event,
        session=session,
        peer=peer,
        user=quote_user(user),
        reason=reason,
        audit_event=event,
        method=method,
    )
