# -*- test-case-name: tests.test_admin -*-
"""
C{pop3srv-passwd}: add, change, delete and verify users in a user file.

Usage::

    pop3srv-passwd FILE USER                 # add or change, prompts twice
    pop3srv-passwd --password-stdin FILE USER
    pop3srv-passwd --scheme bcrypt FILE USER
    pop3srv-passwd --delete FILE USER
    pop3srv-passwd --verify FILE USER        # exit 0 if it matches, 1 if not

Every error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import NoReturn

from pop3srv.userfile import (
    DEFAULT_SCHEME,
    HASH_SCHEMES,
    UserFile,
    UserFileError,
    delete_user,
    hash_password,
    set_user_hash,
    validate_username,
)

__all__ = ["main"]

PROG = "pop3srv-passwd"

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2


class _Failed(Exception):
    """A one-line error for stderr."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like ours."""

    def error(self, message: str) -> NoReturn:
        """
        @param message: what argparse found wrong.
        """
        raise _Failed(f"{message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    """
    @return: the command-line parser.
    """
    parser = _Parser(
        prog=PROG,
        description=(
            "Add or change a user's password in a pop3srv user file, or delete "
            "or verify a user. The file is created (mode 0640) if missing and "
            "rewritten atomically; other lines are kept exactly."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="the user file")
    parser.add_argument("user", metavar="USER", help="the user name")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--delete", action="store_true", help="remove the user")
    action.add_argument(
        "--verify",
        action="store_true",
        help="check a password: exit 0 if it matches, 1 if not",
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of standard input instead of prompting",
    )
    parser.add_argument(
        "--scheme",
        metavar="NAME",
        choices=HASH_SCHEMES,
        help=f"hash scheme for the new password (default {DEFAULT_SCHEME}, "
        f"i.e. argon2id; one of: {', '.join(HASH_SCHEMES)})",
    )
    return parser


def _read_password(from_stdin: bool, confirm: bool) -> str:
    """
    Get the password from stdin or the terminal.

    @param from_stdin: read one line from stdin, without its newline.
    @param confirm: when prompting, ask twice and require a match.
    @return: the password.
    @raise _Failed: on a mismatch, an empty password or end of input.
    """
    if from_stdin:
        line = sys.stdin.readline()
        # Only the newline: spaces at either end may be part of the password.
        password = line.removesuffix("\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            if confirm and getpass.getpass("Retype password: ") != password:
                raise _Failed("passwords do not match")
        except EOFError:
            raise _Failed("no password given (end of input)") from None
    if not password:
        raise _Failed("empty password")
    return password


def _run(args: argparse.Namespace) -> int:
    """
    Carry out the parsed command.

    @param args: from L{_build_parser}.
    @return: the exit status.
    @raise _Failed: for errors to report.
    @raise ValueError: for invalid user names and unreadable files.
    """
    validate_username(args.user)
    if (args.delete or args.verify) and args.scheme is not None:
        raise _Failed("--scheme only applies when setting a password")
    if args.delete:
        if args.password_stdin:
            raise _Failed("--password-stdin does not apply to --delete")
        if not delete_user(args.file, args.user):
            raise _Failed(f"{args.file}: no such user {args.user!r}")
        print(f"Deleted user {args.user!r}.")
        return EXIT_OK
    if args.verify:
        users = UserFile(args.file)
        if args.user not in users:
            raise _Failed(f"{args.file}: no such user {args.user!r}")
        password = _read_password(args.password_stdin, confirm=False)
        if users.verify(args.user, password):
            print("Password matches.")
            return EXIT_OK
        print("Password does not match.")
        return EXIT_MISMATCH
    password = _read_password(args.password_stdin, confirm=True)
    added = set_user_hash(args.file, args.user, hash_password(password, args.scheme))
    print(f"{'Added' if added else 'Changed password for'} user {args.user!r}.")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """
    Run C{pop3srv-passwd}.

    @param argv: the arguments after the program name; C{sys.argv[1:]} if
        L{None}.
    @return: 0 on success (and for C{--verify}, a match), 1 for a
        C{--verify} mismatch, 2 for any error, which is reported as one line
        on stderr and never as a traceback.
    """
    try:
        return _run(_build_parser().parse_args(argv))
    except (_Failed, UserFileError, ValueError, OSError) as e:
        message = str(e)
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as e:
        # A bug, but an administrator still gets one line, not a traceback.
        message = f"unexpected error: {type(e).__name__}: {e}"
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR
