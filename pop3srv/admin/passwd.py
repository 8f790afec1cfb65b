# -*- test-case-name: tests.test_admin -*-
"""
C{pop3srv-passwd}: add, change, delete and verify users in a user file, and
manage their app passwords.

Usage::

    pop3srv-passwd FILE USER                 # add or change, prompts twice
    pop3srv-passwd --password-stdin FILE USER
    pop3srv-passwd --scheme bcrypt FILE USER
    pop3srv-passwd --scheme argon2 --scheme scram FILE USER   # both lines
    pop3srv-passwd --delete FILE USER
    pop3srv-passwd --verify FILE USER        # exit 0 if it matches, 1 if not
    pop3srv-passwd --app phone FILE USER     # new app password, printed once
    pop3srv-passwd --app phone --delete FILE USER             # revoke it
    pop3srv-passwd --no-pop3-main FILE USER  # only app passwords log in
    pop3srv-passwd --pop3-main FILE USER     # the main password logs in again

A password chosen by the user is refused if zxcvbn scores it below
C{--min-score} (default 3 of 4), with the user name and file name as hints,
unless C{--allow-weak} is given.

Every error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import socket
import sys
from typing import NoReturn

from pop3srv.auth.editor import delete_app_password, delete_user, set_main_pop3, set_password
from pop3srv.auth.hashpolicy import DEFAULT_SCHEME, HASH_SCHEMES, SCRAM_SCHEME, hash_password
from pop3srv.auth.identity import normalise_username, validate_label, validate_username
from pop3srv.auth.userfile import UserFile, UserFileError

__all__ = ["main"]

PROG = "pop3srv-passwd"

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2

#: zxcvbn's scale is 0 (guessable in under 10^3 tries) to 4 (over 10^10).
DEFAULT_MIN_SCORE = 3

# No 0/o, 1/l/i: app passwords get read off one screen and typed on another.
_APP_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_APP_GROUPS = 4
_APP_GROUP_LENGTH = 5

# zxcvbn's matching grows quickly with length; beyond this a password is
# strong by length alone and only the prefix is scored.
_MAX_SCORED_LENGTH = 128


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
    action.add_argument(
        "--no-pop3-main",
        action="store_true",
        help="mark the main password unusable for POP3 (app passwords still work)",
    )
    action.add_argument(
        "--pop3-main",
        action="store_true",
        help="make the main password usable for POP3 again",
    )
    parser.add_argument(
        "--scheme",
        metavar="NAME",
        action="append",
        choices=HASH_SCHEMES,
        help=f"hash scheme for the new password (default {DEFAULT_SCHEME}, "
        f"i.e. argon2id; one of: {', '.join(HASH_SCHEMES)}); give it twice, "
        f"once as {SCRAM_SCHEME}, to store a scram and another hash of the "
        "same password, so that SASL SCRAM works beside other schemes",
    )
    parser.add_argument(
        "--app",
        metavar="LABEL",
        help="work on the app password LABEL: generate a new random one and "
        "print it once, or with --delete revoke it",
    )
    parser.add_argument(
        "--min-score",
        metavar="N",
        type=int,
        choices=range(5),
        default=DEFAULT_MIN_SCORE,
        help=f"refuse passwords zxcvbn scores below N, 0-4 (default {DEFAULT_MIN_SCORE})",
    )
    parser.add_argument(
        "--allow-weak",
        action="store_true",
        help="accept a password whatever its strength",
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


def check_strength(password: str, user_inputs: list[str], min_score: int) -> str | None:
    """
    Judge a password with zxcvbn.

    @param password: the candidate.
    @param user_inputs: words an attacker would try first (the user name,
        the host name...).
    @param min_score: the lowest acceptable score, 0-4.
    @return: L{None} if it is strong enough, else a one-line reason.
    """
    from zxcvbn import zxcvbn

    result = zxcvbn(password[:_MAX_SCORED_LENGTH], user_inputs=user_inputs)
    score = int(result["score"])
    if score >= min_score:
        return None
    feedback = result.get("feedback") or {}
    hint = feedback.get("warning") or " ".join(feedback.get("suggestions") or [])
    reason = f"password is too weak (zxcvbn score {score} of 4, need {min_score})"
    if hint:
        reason += f": {hint.rstrip('.')}"
    return reason + "; choose another or give --allow-weak"


def generate_app_password() -> str:
    """
    @return: a random app password: four groups of five letters and digits
        (about 99 bits), e.g. C{abcde-fghjk-mnpqr-stuvw}.
    """
    return "-".join(
        "".join(secrets.choice(_APP_ALPHABET) for _ in range(_APP_GROUP_LENGTH))
        for _ in range(_APP_GROUPS)
    )


def _hashes(password: str, schemes: list[str] | None) -> list[str]:
    """
    @param password: the password.
    @param schemes: from C{--scheme}; L{None} for the default.
    @return: one hash per scheme.
    @raise _Failed: for two schemes of the same kind.
    """
    if not schemes:
        return [hash_password(password)]
    _check_schemes(schemes)
    return [hash_password(password, scheme) for scheme in schemes]


def _check_schemes(schemes: list[str] | None) -> None:
    """
    @param schemes: from C{--scheme}.
    @raise _Failed: unless there is at most one scheme, or a scram and one
        other.
    """
    if schemes and (len(schemes) > 2 or (len(schemes) == 2 and schemes.count(SCRAM_SCHEME) != 1)):
        raise _Failed(f"--scheme may be given twice only as {SCRAM_SCHEME} and one other scheme")


def _run(args: argparse.Namespace) -> int:
    """
    Carry out the parsed command.

    @param args: from L{_build_parser}.
    @return: the exit status.
    @raise _Failed: for errors to report.
    @raise ValueError: for invalid user names and unreadable files.
    """
    validate_username(args.user)
    user = normalise_username(args.user)
    label = args.app
    if label is not None:
        validate_label(label)
    setting = not (args.delete or args.verify or args.no_pop3_main or args.pop3_main)
    if not setting and args.scheme is not None:
        raise _Failed("--scheme only applies when setting a password")
    _check_schemes(args.scheme)
    if (args.no_pop3_main or args.pop3_main) and label is not None:
        raise _Failed("--no-pop3-main and --pop3-main concern the main password, not --app")
    if args.delete:
        if args.password_stdin:
            raise _Failed("--password-stdin does not apply to --delete")
        if label is not None:
            if not delete_app_password(args.file, user, label):
                raise _Failed(f"{args.file}: user {user!r} has no app password {label!r}")
            print(f"Revoked app password {label!r} of user {user!r}.")
            return EXIT_OK
        if not delete_user(args.file, user):
            raise _Failed(f"{args.file}: no such user {user!r}")
        print(f"Deleted user {user!r}.")
        return EXIT_OK
    if args.no_pop3_main or args.pop3_main:
        if not set_main_pop3(args.file, user, usable=args.pop3_main):
            raise _Failed(f"{args.file}: user {user!r} has no main password")
        state = "usable" if args.pop3_main else "not usable"
        print(f"The main password of user {user!r} is now {state} for POP3.")
        return EXIT_OK
    if args.verify:
        users = UserFile(args.file, upgrade=False)
        if user not in users:
            raise _Failed(f"{args.file}: no such user {user!r}")
        password = _read_password(args.password_stdin, confirm=False)
        result = users.verify_detailed(user, password)
        if result.ok and (label is None or result.label == label):
            which = "" if result.label is None else f" (app password {result.label!r})"
            print(f"Password matches{which}.")
            return EXIT_OK
        print("Password does not match.")
        return EXIT_MISMATCH
    if label is not None:
        if args.password_stdin:
            raise _Failed("app passwords are generated; --password-stdin does not apply to --app")
        password = generate_app_password()
        added = set_password(args.file, user, _hashes(password, args.scheme), label)
        print(f"{'New' if added else 'Replaced'} app password {label!r} for user {user!r}:")
        print(password)
        print("It is shown only this once.")
        return EXIT_OK
    password = _read_password(args.password_stdin, confirm=True)
    if not args.allow_weak:
        hints = [user, *user.replace(".", " ").replace("@", " ").split()]
        hints += [os.path.basename(args.file), socket.gethostname(), "pop3", "pop3srv", "mail"]
        reason = check_strength(password, hints, args.min_score)
        if reason is not None:
            raise _Failed(reason)
    added = set_password(args.file, user, _hashes(password, args.scheme))
    print(f"{'Added' if added else 'Changed password for'} user {user!r}.")
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
