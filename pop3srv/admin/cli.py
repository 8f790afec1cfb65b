# -*- test-case-name: tests.test_cli -*-
"""
C{pop3srv}: the admin command, one subcommand per job::

    pop3srv version                 # also: pop3srv --version
    pop3srv check-config --config /etc/pop3srv/pop3srv.toml --user pop3srv
    pop3srv passwd FILE USER        # the same as pop3srv-passwd FILE USER

Usage errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import ssl
import sys
from typing import NoReturn

__all__ = ["main", "versions"]

PROG = "pop3srv"

EXIT_FAILED = 1
EXIT_USAGE = 2

_CHECK_CONFIG_HELP = """\
Validate a configuration as 'twistd pop3srv' does at start-up (the TOML
file, every option, endpoints, certificate and key, user files, mailbox
template), without starting anything, and then what start-up does not
look at: certificate dates (a warning within 14 days of expiry, a problem
once expired), every malformed user-file line by number, whether the
service user may read the certificate, key and user files and create
files in the index directory (or, without index_dir, the mail spool).

Any option of 'twistd pop3srv' may follow (see: twistd pop3srv --help);
the command line wins over the file, as for the server.

Prints the effective settings on stdout in TOML (usable as a config
file): every setting as 'key = value', a setting that differs from its
default followed by '  # default: VALUE', a setting with no value as the
comment '# key is not set'. Problems and warnings go to stderr, one line
each. Exit status 0 when start-up would succeed (warnings allowed), 1 if
not, 2 for a usage error.
"""


class _UsageError(Exception):
    """A one-line usage error."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        """
        @param message: what argparse found wrong.
        """
        raise _UsageError(f"{message} (see {self.prog} --help)")


def versions() -> list[str]:
    """
    @return: one line each for pop3srv, Twisted, Python and OpenSSL: the
        one pyOpenSSL links (it serves TLS) and the one of Python's C{ssl}
        module, when they differ.
    """
    from OpenSSL import SSL
    from OpenSSL import __version__ as pyopenssl_version

    import twisted
    from pop3srv import __version__

    serving = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    lines = [
        f"pop3srv {__version__}",
        f"Twisted {twisted.__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()})",
        f"{serving} (pyOpenSSL {pyopenssl_version}, serves TLS)",
    ]
    if ssl.OPENSSL_VERSION != serving:
        lines.append(f"{ssl.OPENSSL_VERSION} (Python's ssl module)")
    return lines


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Administer a pop3srv POP3 server.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--version", action="store_true", help="print the versions (as: pop3srv version)"
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=_Parser
    )
    commands.add_parser(
        "version",
        help="print the versions of pop3srv, Twisted, Python and OpenSSL",
        description="Print the versions of pop3srv, Twisted, Python and OpenSSL, one a line.",
    )
    check = commands.add_parser(
        "check-config",
        help="validate a configuration and print the effective settings",
        description=_CHECK_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} check-config [--config FILE] [--user NAME] [--group NAME] "
        "[twistd pop3srv options]",
        # An abbreviation could swallow a twistd option (--user-failure-limit).
        allow_abbrev=False,
    )
    check.add_argument("-c", "--config", metavar="FILE", help="the TOML configuration file")
    check.add_argument(
        "--user",
        metavar="NAME",
        help="the user the server runs as, for access checks [default: the user "
        "running this, checked with access(2); a named user is checked by "
        "owners and mode bits along the path, ACLs aside]",
    )
    check.add_argument(
        "--group",
        metavar="NAME",
        action="append",
        default=[],
        help="a group the server runs with, besides the user's own (twistd --gid, "
        "systemd Group= and SupplementaryGroups=); repeatable",
    )
    # 'passwd' is handled before parsing (everything after it is
    # pop3srv-passwd's, --help included); listed here for --help.
    commands.add_parser(
        "passwd",
        help="manage a user file: the same as pop3srv-passwd (see pop3srv passwd --help)",
        add_help=False,
    )
    # 'who' and 'stats' join here once the server has a control socket.
    return parser


def _check_config(args: argparse.Namespace, rest: list[str]) -> int:
    """
    @param rest: the arguments check-config does not know: twistd pop3srv's.
    @return: the exit status.
    """
    from pop3srv.admin.checkconfig import ServiceIdentity, check_config

    try:
        who = ServiceIdentity.named(args.user, args.group)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    argv = (["--config", args.config] if args.config else []) + rest
    as_root_unasked = os.geteuid() == 0 and args.user is None and not args.group
    return check_config(argv, who, sys.stdout, sys.stderr, as_root_unasked=as_root_unasked)


def main(argv: list[str] | None = None) -> int:
    """
    Run C{pop3srv}.

    @param argv: the arguments after the program name; C{sys.argv[1:]} if
        L{None}.
    @return: the exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["passwd"]:
        from pop3srv.admin import passwd

        return passwd.main(argv[1:])
    parser = _build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command != "check-config" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.version or args.command == "version":
            print("\n".join(versions()))
            return 0
        if args.command == "check-config":
            return _check_config(args, rest)
        parser.error("a command is required")
    except _UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (| head): nothing left to tell anyone, and
        # the flush at exit must not fail again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        # A bug, but an administrator still gets one line, not a traceback.
        print(f"{PROG}: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
