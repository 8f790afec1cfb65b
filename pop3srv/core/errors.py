"""
Errors that reach a POP3 client.

Each class carries the RFC 2449/3206 response code and a fixed text that is
safe to send to a client; the detail (paths, errno, exception text) goes to
the log only.
"""


class Pop3Error(Exception):
    """A failure a client is told about with C{-ERR [code] text}."""

    code: str | None = None
    text: str = "Command failed."

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.text)
        self.detail = detail


class MaildropInUse(Pop3Error):
    """Another session holds this maildrop (RFC 2449 IN-USE)."""

    code = "IN-USE"
    text = "Mailbox is locked by another session."


class MaildropUnavailable(Pop3Error):
    """The maildrop could not be opened or read just now (RFC 3206 SYS/TEMP)."""

    code = "SYS/TEMP"
    text = "Mailbox is temporarily unavailable, try again later."


class CommitFailed(Pop3Error):
    """Deletions could not be made durable; the maildrop is unchanged."""

    code = "SYS/TEMP"
    text = "Could not commit deletions; mailbox unchanged, try again later."


class CommitPending(CommitFailed):
    """
    The deletions are recorded in the journal but could not be applied yet;
    the next open of the maildrop completes them.
    """

    text = "Deletions are recorded and will be completed at the next login."


class MaildropChanged(CommitFailed):
    """Another program rewrote the maildrop during the session."""

    text = "Mailbox was changed by another program; nothing deleted."


class InvalidUsername(Pop3Error):
    """A username that cannot name a maildrop (path characters, controls, length)."""

    code = "AUTH"
    text = "Invalid username or password."
