# -*- test-case-name: tests.test_deliver -*-
"""
C{pop3srv deliver}: a delivery agent for the maildrops the server serves.

Usage::

    pop3srv deliver [--config FILE] [--mailbox TEMPLATE] [--check-users]
                    [-f SENDER] USER

One message is read on stdin and added to USER's maildrop, found with the
server's mailbox template (C{--mailbox}, else C{mailbox} of C{--config},
else the server's default C{/var/mail/{user}}):

  - B{mbox}: appended under the dotlock and the OFD C{fcntl} lock that the
    server takes (L{pop3srv.mbox.lock.MboxFileLock}), after a C{From }
    line with the envelope sender and the date (C{asctime} form;
    C{MAILER-DAEMON} for the null sender), with mboxrd quoting (every line
    that begins with any number of C{>} and C{From } gets one C{>} more),
    a final newline if the message lacks one and a blank separator line;
    then C{fsync}.  On any failure the file is cut back to its old size and
    synced again, so it holds exactly what it held before.  A missing mbox
    is created, a missing directory is not.  A new mbox in a directory
    whose group may write there (a shared spool: Debian's C{/var/mail},
    2775 C{root:mail}, or a sticky 1777 one) is given the directory's group
    and mode 0660, as Debian's mail spool has it, so that the server,
    running as its own user in that group, can read and rewrite it: a
    setgid directory gives new files its group by itself, else the group is
    set with C{fchown}, which only root or a member of the group may do.
    If that is not allowed the mbox stays 0600 and a warning line says so
    (the mail is delivered; make the directory setgid).  In any other
    directory, such as a home directory whose group may be shared by all
    users, a new mbox is 0600.
  - B{Maildir} (C{maildir:} template): written to C{tmp/} under a unique
    name (C{SECS.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<octets RETR sends>}),
    synced, renamed into C{new/}, and C{new/} synced; the Maildir and its
    C{tmp}, C{new}, C{cur} (and any missing directory between the
    template's trusted prefix and it) are created with mode 0700.

The directories below the template's trusted prefix (the part before
C{{user}}) are walked without following a symlink, as the server does
(L{pop3srv.mbox.paths}).

If the message begins with an mbox C{From } line (procmail pipes one,
Postfix's C{mailbox_command} does not), that line is dropped: we write our
own, with its sender when C{-f} is not given.

The header fields in which mail stores keep their own metadata are dropped
from the message's header block, as Dovecot's LDA does, for mbox and
Maildir alike: C{X-IMAP}, C{X-IMAPbase}, C{X-UID}, C{Status}, C{X-Status},
C{X-Keywords} and C{Content-Length} (L{pop3srv.mbox.scan.HIDDEN_HEADERS}),
and C{X-UIDL}.  The server reads these as the mail store's word: a sender
could otherwise make a message pass for the internal-data message of
UW-IMAP and Dovecot at the top of an empty mbox (never served), or give it
flags.  C{X-UIDL} goes too, although Dovecot keeps it: the server serves
an C{X-UIDL} as the message's UIDL (as qpopper does), and a forged one
could repeat the UIDL of a message the client keeps, which the client
would then never download.

Who exists is the MTA's business (Postfix's C{local_recipient_maps}):
without C{--check-users}, any valid name is delivered to, and the user
files are never read.  Postfix runs C{mailbox_command} as the recipient,
and the user files hold password hashes that no user may read.  With
C{--check-users} (and C{--config}), the passlib user files that C{auth}
names are read, for a delivery agent run by a user who may read them:
a name in none of them is unknown (67), and a file that cannot be read
defers the mail (75).

Signals: a stop signal (C{SIGTERM}, C{SIGINT}, C{SIGHUP}) while the message
is read or the lock waited for ends the run with 75, nothing written.
From then on they are blocked: while the message is written, a pending
one is noticed between chunks and the write is undone as for any failure
(75).  Once the final C{fsync} has returned the message is delivered and
the exit status is 0, whatever arrives or fails afterwards (unlocking,
closing): a 75 then would make the MTA deliver the message twice.

Exit status, as C{sysexits.h} and MTAs (Postfix's C{mailbox_command},
procmail, sendmail) read it; the reason is one line on stderr, which
Postfix shows in the bounce or the deferral:

  - 0: delivered.  A warning line on stderr may say what went wrong after
    the commit, or that a new mbox could not be given the spool's group.
  - 64 (C{EX_USAGE}): a bad command line.
  - 67 (C{EX_NOUSER}): the user is unknown: the name could never name a
    maildrop (L{pop3srv.auth.identity.validate_username}), or
    C{--check-users} found it in none of the user files.
  - 69 (C{EX_UNAVAILABLE}): the message is larger than C{--max-size}.
    Permanent (Postfix: 5.3.0): a retry would meet the same limit.
  - 75 (C{EX_TEMPFAIL}): everything else, so the MTA keeps the message and
    retries: the lock not had in time, a full disk or quota (C{ENOSPC},
    C{EDQUOT}, C{EFBIG}), a read-only file system, a permission problem,
    I/O errors, a missing or unsafe (symlinked, hard-linked) path, a
    signal, and configuration problems too (an unreadable or invalid
    C{--config}, template or, with C{--check-users}, user file):
    C{EX_CONFIG} (78) would make Postfix bounce the mail (5.3.5) for what
    an admin can fix, so, as Dovecot's LDA does, it is deferred instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TextIO, TypeAlias

from pop3srv.mbox.scan import HIDDEN_HEADERS

if TYPE_CHECKING:
    from pop3srv.mbox.lock import MboxFileLock

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DROPPED_HEADERS",
    "EX_NOUSER",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "main",
    "mboxrd_quote",
    "strip_metadata_headers",
    "wire_size",
]

PROG = "pop3srv deliver"

#: C{sysexits.h}.
EX_OK = 0
EX_USAGE = 64
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75

#: The largest message accepted by default, in octets.
DEFAULT_MAX_SIZE = 100 << 20

#: The sender written for the null envelope sender (bounces).
NULL_SENDER = b"MAILER-DAEMON"

#: The default mailbox template: the server's.
DEFAULT_TEMPLATE = "/var/mail/{user}"

#: Octets quoted and written per step; a stop signal is looked for between
#: steps.
WRITE_CHUNK = 1 << 20

#: Octets read from stdin per call.
READ_CHUNK = 1 << 16

#: Seconds between two tries of a busy mbox lock.
LOCK_POLL_INTERVAL = 0.05

#: The header fields dropped from an incoming message (lower case): those
#: in which mail stores keep their metadata, which the server hides and
#: believes, and C{X-UIDL}, which it serves as the UIDL.
DROPPED_HEADERS = HIDDEN_HEADERS | {b"x-uidl"}

#: The signals an MTA or an admin stops a delivery with.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGHUP, signal.SIGINT})

# A line start that mboxrd quotes: any number of ">" and "From ".  The LF
# before it is a literal prefix that sre finds at C speed.
_QUOTED_AFTER_LF = re.compile(rb"\n(?=>*From )")
_QUOTED_AT_START = re.compile(rb">*From ")
# What a From line's sender must not contain: it ends at the first space.
_SENDER_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
# Maildir's host part must not hold "/" (a path), ":" (the info
# separator) or "," (the field separator of ",S="): octal escapes, as
# Courier and Dovecot write them.
_HOST_UNSAFE = re.compile(r"[/:,\\]")
# The end of a header block, as the server's scanner finds it
# (L{pop3srv.mbox.scan}): the LF of its last line, then an empty line.
_END_OF_HEADER = re.compile(rb"\n\r?\n")
# A dropped field after the LF before it, with its continuation lines (that
# begin with a blank), up to but not including the LF that ends it.  Names
# in any case, blanks allowed before the colon: as the scanner reads them.
_DROPPED_FIELD = re.compile(
    rb"\n(?:"
    + b"|".join(re.escape(name) for name in sorted(DROPPED_HEADERS, key=len, reverse=True))
    + rb")[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*",
    re.IGNORECASE,
)


# What signal.signal() gives back: a previous handler or disposition.
_Handler: TypeAlias = "Callable[[int, FrameType | None], Any] | int | signal.Handlers | None"


class DeliveryError(Exception):
    """
    The delivery failed; C{str()} is the one line for stderr.

    @ivar status: the exit status.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Stopped(BaseException):
    """A stop signal arrived before the commit: undo and defer."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopSignals:
    """
    How the stop signals (C{SIGTERM}, C{SIGINT}, C{SIGHUP}) are handled in
    one run.

    While the message is read and the maildrop looked up, the first one
    raises L{_Stopped} wherever the run is: nothing has been written.  From
    L{hold} on they are blocked, so none can land between two steps of a
    write, its undo, or the unlocking; L{check} (between the chunks of a
    write) and L{wait} (while the lock is busy) notice a pending one, and
    the caller undoes what it wrote.  After L{commit} they are ignored: the
    message is delivered.

    @ivar received: the first stop signal seen, or L{None}.
    @ivar committed: whether the message is durably delivered.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.committed = False
        self._raising = True
        self._previous: dict[int, _Handler] = {}
        self._mask: set[int] | None = None

    def install(self) -> None:
        """Put the handlers in place."""
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        for signum in _STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self._raising:
            # Once only: a second signal must not interrupt the handling
            # of the first.
            self._raising = False
            raise _Stopped(signum)

    def hold(self) -> None:
        """
        Block the stop signals from now on.  One that arrived just before
        and whose handler has not run yet is only recorded by it.
        """
        self._raising = False
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    def check(self) -> None:
        """
        @raise _Stopped: a stop signal is pending (it is taken), or came
            before L{hold}.
        """
        if self.received is None:
            pending = signal.sigpending() & _STOP_SIGNALS
            if pending:
                self.received = signal.sigwait(pending)
        if self.received is not None:
            raise _Stopped(self.received)

    def wait(self, seconds: float) -> None:
        """
        Sleep C{seconds}, or less if a stop signal comes.

        @raise _Stopped: one did.
        """
        self.check()
        info = signal.sigtimedwait(_STOP_SIGNALS, seconds)
        if info is not None:
            self.received = info.si_signo
            raise _Stopped(info.si_signo)

    def commit(self) -> None:
        """The message is durable: no signal can change the outcome now."""
        self.committed = True

    def finish(self, keep_held: bool) -> None:
        """
        End the run's handling.

        @param keep_held: leave the stop signals blocked and the handlers in
            place, for a process that exits next: a signal between this and
            the exit then cannot turn the status into a death by signal
            (which an MTA retries, delivering a second time).  Else any
            pending stop signal is taken, and the handlers and the signal
            mask are put back as they were.
        """
        self._raising = False
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        if keep_held:
            return
        # Standard signals do not queue: each can be pending once.
        for _ in range(len(_STOP_SIGNALS)):
            if signal.sigtimedwait(_STOP_SIGNALS, 0) is None:
                break
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)


class _UsageError(Exception):
    """A one-line usage error."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        """
        @param message: what argparse found wrong.
        """
        raise _UsageError(f"{message} (see pop3srv deliver --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # --help: argparse prints, then exits 0.
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    """
    @return: the command line parser of C{pop3srv deliver}.
    """
    parser = _Parser(
        prog=PROG,
        description="Deliver one message, read on stdin, to USER's maildrop (mbox or "
        "Maildir) under the locks the server takes. Exit status as sysexits.h: 0 "
        "delivered, 64 usage, 67 unknown user, 69 message too large, 75 any other "
        "failure (the MTA retries); the reason on stderr.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="the server's TOML configuration, for its mailbox template (the "
        "recipient must be able to read it; else give --mailbox)",
    )
    parser.add_argument(
        "--mailbox",
        metavar="TEMPLATE",
        help="the mailbox template, such as /var/mail/{user} or "
        "maildir:/home/{user}/Maildir [default: mailbox of --config, else "
        f"{DEFAULT_TEMPLATE}]",
    )
    parser.add_argument(
        "--check-users",
        action="store_true",
        help="refuse (exit 67) a user in none of the passlib user files that auth "
        "of --config names, reading them (75 if one cannot be read) [default: "
        "every valid name is delivered to; the MTA decides who exists]",
    )
    parser.add_argument(
        "-f",
        "--sender",
        metavar="SENDER",
        help="the envelope sender for the From line; empty or <> is the null sender "
        "(MAILER-DAEMON) [default: that of a From line the message begins with, "
        "else MAILER-DAEMON]",
    )
    parser.add_argument(
        "--max-size",
        metavar="OCTETS",
        type=_positive_int,
        default=DEFAULT_MAX_SIZE,
        help=f"refuse a larger message (exit 69) [default: {DEFAULT_MAX_SIZE}]",
    )
    parser.add_argument(
        "--lock-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=None,
        help="seconds to wait for the mbox lock before giving up (exit 75) [default: the server's]",
    )
    parser.add_argument("user", metavar="USER", help="the recipient, as the server names it")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


# What argparse calls them in "invalid ... value".
_positive_int.__name__ = "positive integer"
_positive_float.__name__ = "positive number"


@dataclass(frozen=True)
class Target:
    """
    Where a user's mail goes.

    @ivar kind: C{"mbox"} or C{"maildir"}.
    @ivar path: the mbox file or the Maildir directory.
    @ivar trusted_root: the admin's part of the template: symlinks in it are
        followed, none below it.
    """

    kind: str
    path: str
    trusted_root: str


def resolve_target(
    user: str, config: str | None, template: str | None, check_users: bool = False
) -> Target:
    """
    Find C{user}'s maildrop as the server would.

    @param user: the recipient as given.
    @param config: the server's TOML file, or L{None}.
    @param template: a mailbox template that overrides the file's, or L{None}.
    @param check_users: whether to look the user up in the passlib user
        files of C{config}'s C{auth} (the server's default if it names
        none).
    @return: the maildrop.
    @raise DeliveryError: C{EX_NOUSER} for an unknown user, C{EX_TEMPFAIL}
        for a configuration that cannot be read or used.
    """
    from pop3srv.app.config import SETTINGS, ConfigError, load_config
    from pop3srv.auth.identity import normalise_username, validate_username
    from pop3srv.auth.realm import USER_FIELD, check_mailbox_template, split_mailbox_template
    from pop3srv.mbox.paths import template_prefix

    try:
        validate_username(user)
    except ValueError as e:
        raise DeliveryError(EX_NOUSER, f"unknown user {user!r}: {e}") from None
    # The server's avatar is the NFC form (the checkers normalise).
    name = normalise_username(user)
    auth: list[str] = []
    if config is not None:
        try:
            settings, _ = load_config(config)
        except ConfigError as e:
            raise DeliveryError(EX_TEMPFAIL, str(e)) from None
        if template is None:
            template = settings.get("mailbox")
        auth = list(settings.get("auth", SETTINGS["auth"].default))
    if template is None:
        template = DEFAULT_TEMPLATE
    try:
        check_mailbox_template(template)
    except ValueError as e:
        raise DeliveryError(EX_TEMPFAIL, str(e)) from None
    if check_users:
        _check_known(name, auth)
    kind, path_template = split_mailbox_template(template)
    return Target(
        kind=kind,
        path=os.path.normpath(path_template.replace(USER_FIELD, name)),
        trusted_root=template_prefix(path_template, USER_FIELD),
    )


def _check_known(name: str, auth: Sequence[str]) -> None:
    """
    Refuse a user that none of the passlib user files of C{auth} has.

    @raise DeliveryError: C{EX_NOUSER} if unknown; C{EX_TEMPFAIL} if a user
        file cannot be read, or if C{auth} names another kind of checker,
        whose users cannot be known here.
    """
    prefix = "passlib:"
    others = [entry for entry in auth if not entry.startswith(prefix)]
    if others or not auth:
        named = ", ".join(repr(entry.partition(":")[0]) for entry in others) or "none"
        raise DeliveryError(
            EX_TEMPFAIL,
            f"--check-users knows only passlib user files, and auth names {named}",
        )
    from pop3srv.auth.userfile import UserFile, UserFileError

    for entry in auth:
        try:
            users = UserFile(entry[len(prefix) :])
        except UserFileError as e:
            raise DeliveryError(EX_TEMPFAIL, str(e)) from None
        if name in users:
            return
    files = ", ".join(entry[len(prefix) :] for entry in auth)
    raise DeliveryError(EX_NOUSER, f"unknown user {name!r}: not in {files}")


def read_message(stream: BinaryIO, limit: int) -> bytes:
    """
    Read the whole message, refusing one over C{limit} octets before reading
    more than one chunk past it.

    @param stream: the input, in binary mode.
    @param limit: the most octets accepted.
    @return: the message.
    @raise DeliveryError: C{EX_UNAVAILABLE} if too large, C{EX_TEMPFAIL} if
        the input cannot be read.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = stream.read(READ_CHUNK)
        except OSError as e:
            raise DeliveryError(EX_TEMPFAIL, f"cannot read the message: {_reason(e)}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise DeliveryError(
                EX_UNAVAILABLE, f"message refused: larger than the limit of {limit} octets"
            )
        chunks.append(chunk)


def split_from_line(message: bytes) -> tuple[bytes, str | None]:
    """
    Drop an mbox C{From } line that the message begins with.

    @return: the message without it, and the sender it named (L{None} if
        there was no such line or it named none).
    """
    if not message.startswith(b"From "):
        return message, None
    end = message.find(b"\n")
    line, rest = (message, b"") if end < 0 else (message[:end], message[end + 1 :])
    fields = line.split()
    sender = fields[1].decode("utf-8", "surrogateescape") if len(fields) > 1 else None
    return rest, sender


def strip_metadata_headers(message: bytes) -> bytes:
    """
    Drop the L{DROPPED_HEADERS} fields, with their continuation lines, from
    the message's header block: its lines up to the first empty one (all of
    it if there is none), as the server's scanner delimits it.  The body
    and every other field stay as they are.

    @param message: the message, without a leading C{From } line.
    @return: the message without them (the same object if it had none).
    """
    if message.startswith((b"\n", b"\r\n")):
        # An empty header block.
        return message
    end_found = _END_OF_HEADER.search(message)
    end = len(message) if end_found is None else end_found.start() + 1
    # With the LF before its first line, every field starts after an LF.
    header = b"\n" + message[:end]
    if _DROPPED_FIELD.search(header) is None:
        return message
    return _DROPPED_FIELD.sub(b"", header)[1:] + message[end:]


def from_line(sender: str | None, when: float) -> bytes:
    """
    The mbox C{From } line for a message.

    @param sender: the envelope sender; empty, C{<>} or L{None} for the null
        sender.  Angle brackets around it are dropped, and blanks and
        control characters become C{_} (the sender ends at the first blank).
    @param when: the delivery time, seconds since the epoch.
    @return: the line, with its LF.
    """
    raw = (sender or "").strip()
    if raw.startswith("<") and raw.endswith(">"):
        raw = raw[1:-1]
    octets = _SENDER_UNSAFE.sub(b"_", raw.encode("utf-8", "surrogateescape"))
    # time.asctime names days and months in English whatever the locale,
    # as C's asctime(3) does.
    date = time.asctime(time.localtime(when)).encode("ascii")
    return b"From " + (octets or NULL_SENDER) + b" " + date + b"\n"


def mboxrd_quote(message: bytes, chunk: int = WRITE_CHUNK) -> Iterator[bytes]:
    """
    The message with mboxrd quoting, in pieces of about C{chunk} octets.

    Every line that begins with zero or more C{>} and C{From } gets one
    C{>} more; the server's un-quoting (L{pop3srv.mbox.quoting}) takes it
    away again, except on a line of a thousand C{>} or more before C{From },
    which it leaves alone to bound its carry (other mboxrd readers do take
    that one off).  Pieces end after an LF, so no line start is split.

    @param message: the message as received.
    @param chunk: the size of a piece before it is extended to a line end.
    @return: the quoted pieces, in order.
    """
    start = 0
    size = len(message)
    while start < size:
        nl = message.find(b"\n", start + chunk - 1)
        end = size if nl < 0 else nl + 1
        piece = message[start:end]
        out = _QUOTED_AFTER_LF.sub(b"\n>", piece)
        # The piece begins a line; a quoted line there has no LF before it.
        if _QUOTED_AT_START.match(piece) is not None:
            out = b">" + out
        yield out
        start = end


def mbox_entry(message: bytes, sender: str | None, when: float) -> Iterator[bytes]:
    """
    The octets one delivery appends to an mbox that ends with an LF.

    @return: the C{From } line, the quoted message, a final LF if it lacks
        one, and the blank separator line.
    """
    yield from_line(sender, when)
    yield from mboxrd_quote(message)
    yield b"\n" if not message or message.endswith(b"\n") else b"\n\n"


def wire_size(message: bytes) -> int:
    """
    The octets RETR sends for a message stored as C{message}, before the
    terminating dot and without dot-stuffing: every bare LF made CRLF, and
    a CRLF after a last line that lacks an LF.  The server counts a
    Maildir file the same way (L{pop3srv.maildir.sizes.wire_octets}).

    @param message: the stored octets.
    @return: the count, Dovecot's virtual size (C{,W=}).
    """
    if not message:
        return 0
    size = len(message) + message.count(b"\n") - message.count(b"\r\n")
    return size if message.endswith(b"\n") else size + 2


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """
    Write all of C{data} at C{offset}.

    @return: the offset after it.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    return offset


def append_to_mbox(
    target: Target,
    message: bytes,
    sender: str | None,
    when: float,
    lock_timeout: float | None,
    signals: StopSignals,
    warn: Callable[[str], None],
) -> None:
    """
    Append one message to an mbox under the server's locks.  Runs with the
    stop signals held (L{StopSignals.hold}).

    @param target: the mbox.
    @param message: the message, without a leading C{From } line.
    @param sender: the envelope sender (see L{from_line}).
    @param when: the delivery time.
    @param lock_timeout: seconds to wait for the lock; L{None} for the
        server's default.
    @param signals: told of the commit; asked for stop signals.
    @param warn: takes a line about a problem that does not stop the
        delivery.
    @raise DeliveryError: C{EX_TEMPFAIL}, with the file as it was.
    @raise _Stopped: a stop signal came before anything was written.
    """
    from pop3srv.core.errors import MaildropUnavailable
    from pop3srv.mbox.lock import LOCK_TIMEOUT
    from pop3srv.mbox.paths import MaildropDirectory

    where = os.path.dirname(target.path)
    try:
        directory = MaildropDirectory(target.trusted_root, where)
    except FileNotFoundError:
        raise DeliveryError(EX_TEMPFAIL, f"{where} does not exist") from None
    except MaildropUnavailable as e:
        raise DeliveryError(EX_TEMPFAIL, str(e)) from None
    except OSError as e:
        raise DeliveryError(EX_TEMPFAIL, f"cannot open {where}: {_reason(e)}") from None
    try:
        # Every name below goes through the directory's descriptor, so a
        # symlink swapped in meanwhile changes nothing.
        anchored = directory.anchor(target.path)
        try:
            _create_if_missing(anchored, target.path, warn)
            lock = _take_lock(
                anchored,
                target.path,
                LOCK_TIMEOUT if lock_timeout is None else lock_timeout,
                signals,
            )
            try:
                if lock.fd is None:
                    raise DeliveryError(EX_TEMPFAIL, f"{target.path} disappeared")
                _append_locked(lock.fd, target.path, mbox_entry(message, sender, when), signals)
            finally:
                _after_commit(lock.release, signals, warn, f"unlocking {target.path}")
        except MaildropUnavailable as e:
            cause = e.__cause__
            if isinstance(cause, OSError):
                # Its own text names the file by its /proc/self/fd path.
                raise DeliveryError(
                    EX_TEMPFAIL, f"cannot lock {target.path}: {_reason(cause)}"
                ) from None
            raise DeliveryError(EX_TEMPFAIL, str(e)) from None
        except OSError as e:
            raise DeliveryError(EX_TEMPFAIL, f"{target.path}: {_reason(e)}") from None
    finally:
        _after_commit(directory.close, signals, warn, f"closing {where}")


def _after_commit(
    action: Callable[[], object], signals: StopSignals, warn: Callable[[str], None], what: str
) -> None:
    """
    Run a clean-up step: once the message is committed, a failure of it
    is a warning, not a failed delivery.
    """
    if not signals.committed:
        action()
        return
    try:
        action()
    except Exception as e:
        detail = _reason(e) if isinstance(e, OSError) else str(e)
        warn(f"warning: delivered, but {what} failed: {detail}")


def _take_lock(path: str, shown: str, timeout: float, signals: StopSignals) -> MboxFileLock:
    """
    Take the server's mbox locks, trying again while they are busy for up
    to C{timeout} seconds, waking at once for a stop signal.

    @param path: the mbox, anchored.
    @param shown: its name for messages.
    @return: the lock, held.
    @raise DeliveryError: C{EX_TEMPFAIL} on timeout.
    @raise MaildropUnavailable: it cannot be locked (not just busy).
    @raise _Stopped: a stop signal came.
    """
    from pop3srv.core.errors import MaildropUnavailable
    from pop3srv.mbox.lock import MboxFileLock

    # A zero timeout makes each acquire() one try, so the waiting is ours
    # and a signal ends it at once rather than after the lock's own wait.
    lock = MboxFileLock(path, timeout=0)
    deadline = time.monotonic() + timeout
    while True:
        signals.check()
        try:
            lock.acquire()
            return lock
        except MaildropUnavailable as e:
            # A busy lock is the plain class without a cause; failures
            # carry their OSError, or are a subclass (an unsafe file).
            if type(e) is not MaildropUnavailable or e.__cause__ is not None:
                raise
        if time.monotonic() >= deadline:
            raise DeliveryError(EX_TEMPFAIL, f"timed out locking {shown}")
        signals.wait(min(LOCK_POLL_INTERVAL, max(deadline - time.monotonic(), 0.0)))


def _create_if_missing(path: str, shown: str, warn: Callable[[str], None]) -> None:
    """
    Create an empty mbox unless one exists; only a regular file is ever
    opened later (L{pop3srv.mbox.paths.open_mbox_file}).

    It is 0600, except in a directory whose group may write there (a
    shared spool), where it gets that group and 0660; the mode is set
    whatever the umask (Postfix runs its command with 077).

    @param path: the mbox, anchored.
    @param shown: its name for messages.
    @param warn: told if the spool's group cannot be given.
    """
    from pop3srv.mbox.paths import fsync_dir

    directory = os.path.dirname(path)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return
    try:
        os.fchmod(fd, _new_mbox_mode(fd, os.stat(directory), shown, warn))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)


def _new_mbox_mode(fd: int, parent: os.stat_result, shown: str, warn: Callable[[str], None]) -> int:
    """
    Give the new mbox C{fd} the group of its directory C{parent} if that is
    a shared spool.

    @return: the mode it should have: 0660 if it has the spool's group,
        else 0600.
    """
    if not parent.st_mode & stat.S_IWGRP:
        return 0o600
    # A setgid directory gave it the group already; otherwise our own
    # group, which must not get to read it.
    if os.fstat(fd).st_gid != parent.st_gid:
        try:
            os.fchown(fd, -1, parent.st_gid)
        except PermissionError as e:
            warn(
                f"warning: new {shown} is mode 0600: cannot give it the group "
                f"{_group_name(parent.st_gid)} of its directory ({_reason(e)}); make "
                "the directory setgid (chmod g+s) so new mailboxes get its group"
            )
            return 0o600
    return 0o660


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _append_locked(fd: int, shown: str, pieces: Iterator[bytes], signals: StopSignals) -> None:
    """
    Append C{pieces} to the locked mbox C{fd} and sync it; on any failure,
    or a stop signal between two pieces, cut it back to its old size and
    sync that.  Once the sync has returned, tell C{signals} of the commit.

    @param shown: the mbox's name, for messages.
    @raise DeliveryError: C{EX_TEMPFAIL} on failure.
    """
    old_size = os.fstat(fd).st_size
    offset = old_size
    try:
        signals.check()
        # Our From line must begin a line.  An LF is added only where one
        # is missing, never a blank line after an LF: the bytes of the last
        # message, which its UIDL digest covers, stay as they are.
        if old_size and os.pread(fd, 1, old_size - 1) != b"\n":
            offset = _pwrite_all(fd, b"\n", offset)
        for piece in pieces:
            offset = _pwrite_all(fd, piece, offset)
            signals.check()
        os.fsync(fd)
    except BaseException as e:
        undone = _truncate_back(fd, old_size)
        if isinstance(e, _Stopped):
            detail = str(e)
        elif isinstance(e, OSError):
            detail = _reason(e)
        else:
            raise
        if undone is not None:
            raise DeliveryError(
                EX_TEMPFAIL,
                f"{shown}: {detail}; could not cut it back to {old_size} octets: {undone}",
            ) from None
        raise DeliveryError(EX_TEMPFAIL, f"{shown}: {detail}; left as it was") from None
    signals.commit()


def _truncate_back(fd: int, size: int) -> str | None:
    """
    Cut the mbox back to C{size} and sync it.  The stop signals are held
    (L{StopSignals.hold}), so none interrupts it.

    @return: L{None} if done, else why not.
    """
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        return _reason(e)
    return None


_counter = 0


def maildir_name(size: int, wire: int, when: float) -> str:
    """
    A unique Maildir file name, as Dovecot and Courier make them:
    C{SECS.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<wire size>}.

    @param size: the file's octets.
    @param wire: the octets RETR sends for it (L{wire_size}),
        Dovecot's virtual size.
    @param when: the delivery time.
    """
    global _counter
    _counter += 1
    host = _HOST_UNSAFE.sub(lambda m: f"\\{ord(m.group()):03o}", socket.gethostname())
    secs, usec = divmod(int(when * 1_000_000), 1_000_000)
    return f"{secs}.M{usec}P{os.getpid()}Q{_counter}.{host},S={size},W={wire}"


def deliver_to_maildir(
    target: Target,
    message: bytes,
    when: float,
    signals: StopSignals,
    warn: Callable[[str], None],
) -> str:
    """
    Write one message into a Maildir: C{tmp/}, synced, renamed into
    C{new/}, C{new/} synced.  Runs with the stop signals held
    (L{StopSignals.hold}): one noticed before the rename takes the file
    away again.

    @param target: the Maildir.
    @param message: the message, without a leading C{From } line.
    @param when: the delivery time.
    @param signals: told of the commit; asked for stop signals.
    @param warn: takes a line about a problem after the commit.
    @return: the file name in C{new/}.
    @raise DeliveryError: C{EX_TEMPFAIL}, with no file of it left behind.
    """
    from pop3srv.core.errors import MaildropUnavailable

    try:
        maildir = _make_directories(target.trusted_root, target.path)
    except MaildropUnavailable as e:
        raise DeliveryError(EX_TEMPFAIL, str(e)) from None
    except OSError as e:
        raise DeliveryError(EX_TEMPFAIL, f"{target.path}: {_reason(e)}") from None
    fds: list[int] = [maildir]
    try:
        tmp, new = (_subdirectory(maildir, name, fds) for name in ("tmp", "new"))
        _subdirectory(maildir, "cur", fds)
        name = maildir_name(len(message), wire_size(message), when)
        _write_new_file(tmp, name, message, signals)
        try:
            signals.check()
            os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=new)
        except BaseException:
            _unlink_quietly(name, tmp)
            raise
        try:
            os.fsync(new)
        except BaseException:
            # Not known to be durable: take it back, and the MTA retries.
            _unlink_quietly(name, new)
            raise
        signals.commit()
        return name
    except _Stopped as e:
        raise DeliveryError(EX_TEMPFAIL, f"{target.path}: {e}; nothing delivered") from None
    except OSError as e:
        raise DeliveryError(
            EX_TEMPFAIL, f"{target.path}: {_reason(e)}; nothing delivered"
        ) from None
    finally:
        for fd in fds:
            _after_commit(partial(os.close, fd), signals, warn, f"closing {target.path}")


def _write_new_file(directory: int, name: str, data: bytes, signals: StopSignals) -> None:
    """
    Create C{name} in C{directory} (mode 0600), write C{data} a chunk at a
    time and sync it; on failure, or a stop signal between two chunks,
    remove it again.
    """
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=directory,
    )
    try:
        try:
            for start in range(0, len(data), WRITE_CHUNK):
                _pwrite_all(fd, data[start : start + WRITE_CHUNK], start)
                signals.check()
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(name, directory)
        raise


def _unlink_quietly(name: str, directory: int) -> None:
    try:
        os.unlink(name, dir_fd=directory)
    except OSError:
        pass


def _fsync_at(directory: int) -> None:
    """Sync the directory held as C{directory} (an C{O_PATH} descriptor will do)."""
    fd = os.open(f"/proc/self/fd/{directory}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_or_make(parent: int, name: str, shown: str) -> int:
    """
    Open directory C{name} in C{parent} without following a symlink,
    creating it (mode 0700) if missing.

    @return: a read-only descriptor of it.
    @raise UnsafeStateFile: it is a symlink or not a directory.
    """
    from pop3srv.mbox.paths import UnsafeStateFile

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(2):
        try:
            return os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                continue
            _fsync_at(parent)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise UnsafeStateFile(f"{shown}: a symlink or not a directory") from None
    return os.open(name, flags, dir_fd=parent)


def _make_directories(root: str, path: str) -> int:
    """
    Open the directory C{path} below C{root}, creating what is missing
    below C{root} and following no symlink there.

    @return: a read-only descriptor of C{path}.
    @raise UnsafeStateFile: C{path} is not below C{root}, or a component
        below it is a symlink.
    @raise OSError: for other failures.
    """
    from pop3srv.mbox.paths import UnsafeStateFile

    root = os.path.normpath(root)
    rel = os.path.relpath(os.path.normpath(path), root)
    parts = [] if rel == "." else rel.split(os.sep)
    if parts[:1] == [".."]:
        raise UnsafeStateFile(f"{path} is not below the trusted {root}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            below = _open_or_make(fd, part, os.path.join(root, *parts[: i + 1]))
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _subdirectory(maildir: int, name: str, fds: list[int]) -> int:
    fd = _open_or_make(maildir, name, name)
    fds.append(fd)
    return fd


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run C{pop3srv deliver}.

    @param argv: the arguments after C{deliver}; C{sys.argv[2:]} if L{None}.
    @param stdin: where the message comes from.  L{None} means the
        process's stdin, and that this process is the delivery agent and
        exits next: the stop signals are then left blocked on return, so
        that one arriving before the exit cannot turn a delivery into a
        death by signal, which the MTA would retry.  Otherwise the signal
        handlers and mask are put back as they were.
    @param stderr: where the one line of a failure goes.
    @return: the exit status.
    """
    argv = sys.argv[2:] if argv is None else list(argv)
    err = sys.stderr if stderr is None else stderr
    source = sys.stdin.buffer if stdin is None else stdin

    def say(line: str) -> None:
        try:
            print(f"{PROG}: {line}", file=err, flush=True)
        except OSError:
            pass

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        say(str(e))
        return EX_USAGE
    except SystemExit as e:
        # --help, or argparse's own exit: usage unless it asked for 0.
        return EX_OK if e.code in (0, None) else EX_USAGE
    if args.check_users and args.config is None:
        say("--check-users needs --config (see pop3srv deliver --help)")
        return EX_USAGE
    signals = StopSignals()
    try:
        # Inside the try: a signal while the handlers go in is a stop too.
        signals.install()
        return _deliver(args, source, signals, say)
    except _Stopped as e:
        # Only before hold(): nothing was written.
        say(f"{e}; nothing delivered")
        return EX_TEMPFAIL
    finally:
        signals.finish(keep_held=stdin is None)


def _deliver(
    args: argparse.Namespace, source: BinaryIO, signals: StopSignals, say: Callable[[str], None]
) -> int:
    """
    Deliver as C{args} say.

    @return: the exit status.
    @raise _Stopped: a stop signal came before the delivery began writing.
    """
    try:
        target = resolve_target(args.user, args.config, args.mailbox, args.check_users)
        message, line_sender = split_from_line(read_message(source, args.max_size))
        message = strip_metadata_headers(message)
        sender = args.sender if args.sender is not None else line_sender
        when = time.time()
        signals.hold()
        if target.kind == "maildir":
            deliver_to_maildir(target, message, when, signals, say)
        else:
            append_to_mbox(target, message, sender, when, args.lock_timeout, signals, say)
    except DeliveryError as e:
        say(str(e))
        return e.status
    except Exception as e:
        if signals.committed:
            say(f"warning: delivered, but then: {type(e).__name__}: {e}")
            return EX_OK
        # A bug: the MTA keeps the message rather than bounce it.
        say(f"unexpected error: {type(e).__name__}: {e}")
        return EX_TEMPFAIL
    return EX_OK
