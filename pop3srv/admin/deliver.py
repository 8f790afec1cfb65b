# -*- test-case-name: tests.test_deliver -*-
"""
C{pop3srv deliver}: a delivery agent for the maildrops the server serves.

Usage::

    pop3srv deliver [--config FILE] [--mailbox TEMPLATE] [-f SENDER] USER

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
    is created (mode 0600), a missing directory is not.
  - B{Maildir} (C{maildir:} template): written to C{tmp/} under a unique
    name (C{SECS.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size with CRLF>}),
    synced, renamed into C{new/}, and C{new/} synced; the Maildir and its
    C{tmp}, C{new}, C{cur} (and any missing directory between the
    template's trusted prefix and it) are created with mode 0700.

The directories below the template's trusted prefix (the part before
C{{user}}) are walked without following a symlink, as the server does
(L{pop3srv.mbox.paths}).

If the message begins with an mbox C{From } line (procmail pipes one,
Postfix's C{mailbox_command} does not), that line is dropped: we write our
own, with its sender when C{-f} is not given.

Exit status, as C{sysexits.h} and MTAs (Postfix's C{mailbox_command},
procmail, sendmail) read it; the reason is one line on stderr, which
Postfix shows in the bounce or the deferral:

  - 0: delivered.
  - 64 (C{EX_USAGE}): a bad command line.
  - 67 (C{EX_NOUSER}): the user is unknown: the name could never name a
    maildrop (L{pop3srv.auth.identity.validate_username}), or C{--config}
    names only passlib user files (C{auth = ["passlib:..."]}) and none of
    them has the user.  With another checker in C{auth}, or without
    C{--config}, any valid name is known: the MTA checks its recipients.
  - 69 (C{EX_UNAVAILABLE}): the message is larger than C{--max-size}.
    Permanent (Postfix: 5.3.0): a retry would meet the same limit.
  - 75 (C{EX_TEMPFAIL}): everything else, so the MTA keeps the message and
    retries: the lock not had in time, a full disk or quota (C{ENOSPC},
    C{EDQUOT}, C{EFBIG}), a read-only file system, a permission problem,
    I/O errors, a missing or unsafe (symlinked, hard-linked) path, a
    signal, and configuration problems too (an unreadable or invalid
    C{--config}, template or user file): C{EX_CONFIG} (78) would make
    Postfix bounce the mail (5.3.5) for what an admin can fix, so, as
    Dovecot's LDA does, it is deferred instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO, NoReturn, TextIO

__all__ = [
    "DEFAULT_MAX_SIZE",
    "EX_NOUSER",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "main",
    "mboxrd_quote",
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

#: Octets quoted and written per step.
WRITE_CHUNK = 1 << 20

#: Octets read from stdin per call.
READ_CHUNK = 1 << 16

#: The signals an MTA or an admin stops a delivery with; each undoes the
#: partial append before the exit.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

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


class DeliveryError(Exception):
    """
    The delivery failed; C{str()} is the one line for stderr.

    @ivar status: the exit status.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Stopped(BaseException):
    """A stop signal arrived: undo and defer."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")


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
        help="the server's TOML configuration: its mailbox template and, when auth "
        "names only passlib user files, the users that exist",
    )
    parser.add_argument(
        "--mailbox",
        metavar="TEMPLATE",
        help="the mailbox template, such as /var/mail/{user} or "
        "maildir:/home/{user}/Maildir [default: mailbox of --config, else "
        f"{DEFAULT_TEMPLATE}]",
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


def resolve_target(user: str, config: str | None, template: str | None) -> Target:
    """
    Find C{user}'s maildrop as the server would.

    @param user: the recipient as given.
    @param config: the server's TOML file, or L{None}.
    @param template: a mailbox template that overrides the file's, or L{None}.
    @return: the maildrop.
    @raise DeliveryError: C{EX_NOUSER} for an unknown user, C{EX_TEMPFAIL}
        for a configuration that cannot be read or used.
    """
    from pop3srv.app.config import ConfigError, load_config
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
        auth = list(settings.get("auth", []))
    if template is None:
        template = DEFAULT_TEMPLATE
    try:
        check_mailbox_template(template)
    except ValueError as e:
        raise DeliveryError(EX_TEMPFAIL, str(e)) from None
    _check_known(name, auth)
    kind, path_template = split_mailbox_template(template)
    return Target(
        kind=kind,
        path=os.path.normpath(path_template.replace(USER_FIELD, name)),
        trusted_root=template_prefix(path_template, USER_FIELD),
    )


def _check_known(name: str, auth: Sequence[str]) -> None:
    """
    Refuse a user that none of the passlib user files of C{auth} has, when
    they are all the checkers there are.

    @raise DeliveryError: C{EX_NOUSER} if unknown, C{EX_TEMPFAIL} if a user
        file cannot be read.
    """
    prefix = "passlib:"
    if not auth or not all(entry.startswith(prefix) for entry in auth):
        return
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
    target: Target, message: bytes, sender: str | None, when: float, lock_timeout: float | None
) -> None:
    """
    Append one message to an mbox under the server's locks.

    @param target: the mbox.
    @param message: the message, without a leading C{From } line.
    @param sender: the envelope sender (see L{from_line}).
    @param when: the delivery time.
    @param lock_timeout: seconds to wait for the lock; L{None} for the
        server's default.
    @raise DeliveryError: C{EX_TEMPFAIL}, with the file as it was.
    """
    from pop3srv.core.errors import MaildropUnavailable
    from pop3srv.mbox.lock import LOCK_TIMEOUT, MboxFileLock
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
            _create_if_missing(anchored)
            lock = MboxFileLock(
                anchored, timeout=LOCK_TIMEOUT if lock_timeout is None else lock_timeout
            )
            with lock:
                if lock.fd is None:
                    raise DeliveryError(EX_TEMPFAIL, f"{target.path} disappeared")
                _append_locked(lock.fd, target.path, mbox_entry(message, sender, when))
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
        directory.close()


def _create_if_missing(path: str) -> None:
    """
    Create an empty mbox (mode 0600) unless one exists; only a regular file
    is ever opened later (L{pop3srv.mbox.paths.open_mbox_file}).
    """
    from pop3srv.mbox.paths import fsync_dir

    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def _append_locked(fd: int, shown: str, pieces: Iterator[bytes]) -> None:
    """
    Append C{pieces} to the locked mbox C{fd} and sync it; on any failure
    (a signal included) cut it back to its old size and sync that.

    @param shown: the mbox's name, for messages.
    @raise DeliveryError: C{EX_TEMPFAIL} on failure.
    """
    old_size = os.fstat(fd).st_size
    offset = old_size
    try:
        # Our From line must begin a line.  An LF is added only where one
        # is missing, never a blank line after an LF: the bytes of the last
        # message, which its UIDL digest covers, stay as they are.
        if old_size and os.pread(fd, 1, old_size - 1) != b"\n":
            offset = _pwrite_all(fd, b"\n", offset)
        for piece in pieces:
            offset = _pwrite_all(fd, piece, offset)
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


def _truncate_back(fd: int, size: int) -> str | None:
    """
    Cut the mbox back to C{size} and sync it, with the stop signals held
    off so that the undo is not itself interrupted.

    @return: L{None} if done, else why not.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        return _reason(e)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return None


_counter = 0


def maildir_name(size: int, crlf_size: int, when: float) -> str:
    """
    A unique Maildir file name, as Dovecot and Courier make them:
    C{SECS.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size with CRLF>}.

    @param size: the file's octets.
    @param crlf_size: its octets with every bare LF counted as CRLF, what
        POP3 sends (Dovecot's virtual size).
    @param when: the delivery time.
    """
    global _counter
    _counter += 1
    host = _HOST_UNSAFE.sub(lambda m: f"\\{ord(m.group()):03o}", socket.gethostname())
    secs, usec = divmod(int(when * 1_000_000), 1_000_000)
    return f"{secs}.M{usec}P{os.getpid()}Q{_counter}.{host},S={size},W={crlf_size}"


def deliver_to_maildir(target: Target, message: bytes, when: float) -> str:
    """
    Write one message into a Maildir: C{tmp/}, synced, renamed into
    C{new/}, C{new/} synced.

    @param target: the Maildir.
    @param message: the message, without a leading C{From } line.
    @param when: the delivery time.
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
        crlf_size = len(message) + message.count(b"\n") - message.count(b"\r\n")
        name = maildir_name(len(message), crlf_size, when)
        _write_new_file(tmp, name, message)
        try:
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
        return name
    except _Stopped as e:
        raise DeliveryError(EX_TEMPFAIL, f"{target.path}: {e}; nothing delivered") from None
    except OSError as e:
        raise DeliveryError(
            EX_TEMPFAIL, f"{target.path}: {_reason(e)}; nothing delivered"
        ) from None
    finally:
        for fd in fds:
            os.close(fd)


def _write_new_file(directory: int, name: str, data: bytes) -> None:
    """
    Create C{name} in C{directory} (mode 0600), write C{data} and sync it;
    on failure remove it again.
    """
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=directory,
    )
    try:
        try:
            _pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(name, directory)
        raise


def _unlink_quietly(name: str, directory: int) -> None:
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        os.unlink(name, dir_fd=directory)
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


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


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run C{pop3srv deliver}.

    @param argv: the arguments after C{deliver}; C{sys.argv[2:]} if L{None}.
    @param stdin: where the message comes from; the process's stdin if
        L{None}.
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
    previous = {signum: signal.signal(signum, _stop) for signum in _STOP_SIGNALS}
    try:
        target = resolve_target(args.user, args.config, args.mailbox)
        message, line_sender = split_from_line(read_message(source, args.max_size))
        sender = args.sender if args.sender is not None else line_sender
        when = time.time()
        if target.kind == "maildir":
            deliver_to_maildir(target, message, when)
        else:
            append_to_mbox(target, message, sender, when, args.lock_timeout)
    except DeliveryError as e:
        say(str(e))
        return e.status
    except _Stopped as e:
        say(f"{e}; nothing delivered")
        return EX_TEMPFAIL
    except Exception as e:
        # A bug: the MTA keeps the message rather than bounce it.
        say(f"unexpected error: {type(e).__name__}: {e}")
        return EX_TEMPFAIL
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EX_OK
