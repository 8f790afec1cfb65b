# -*- test-case-name: tests.test_cli -*-
"""
C{pop3srv}: the admin command, one subcommand per job::

    pop3srv version                 # also: pop3srv --version
    pop3srv check-config --config /etc/pop3srv/pop3srv.toml --user pop3srv
    pop3srv passwd FILE USER        # the same as pop3srv-passwd FILE USER
    pop3srv deliver [-f SENDER] USER  # an MDA: one message on stdin (sysexits codes)
    pop3srv uidl capture|import     # carry UIDLs over from the old POP3 server
    pop3srv who [--json]            # the open sessions, over the control socket
    pop3srv stats                   # the server's counters, over the control socket

Usage errors are one line on stderr and exit status 2; a command that
fails says why in one line on stderr, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import sys

from pop3srv.admin.cmdline import Failed as _Failed
from pop3srv.admin.cmdline import OneLineParser as _Parser
from pop3srv.admin.cmdline import UsageError as _UsageError

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
files in the index directory (or, without index_dir, the mail spool);
whether it may read the --config file (re-read on SIGHUP) and create the
control socket where control_socket puts it (resolved as the server
resolves it).

Any option of 'twistd pop3srv' may follow (see: twistd pop3srv --help);
the command line wins over the file, as for the server.

Prints the effective settings on stdout in TOML (usable as a config
file): every setting as 'key = value', a setting that differs from its
default followed by '  # default: VALUE', a setting with no value as the
comment '# key is not set'. Problems and warnings go to stderr, one line
each. Exit status 0 when start-up would succeed (warnings allowed), 1 if
not, 2 for a usage error.
"""


_CONTROL_SOCKET_HELP = (
    "the server's control socket [default: control_socket of --config, else "
    "auto: $RUNTIME_DIRECTORY/control if set, else /run/pop3srv/control]"
)


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
    # 'deliver' too: its usage errors and failures exit with sysexits codes
    # for the MTA (pop3srv.admin.deliver), not 2 and 1.
    commands.add_parser(
        "deliver",
        help="deliver one message on stdin to a user's maildrop, for an MTA "
        "(see pop3srv deliver --help)",
        add_help=False,
    )
    # 'uidl' has subcommands of its own (pop3srv.admin.uidl).
    commands.add_parser(
        "uidl",
        help="capture the old server's UIDLs and pin them to the same messages "
        "(see pop3srv uidl --help)",
        add_help=False,
    )
    who = commands.add_parser(
        "who",
        help="list the open POP3 sessions of a running server",
        description="List the open POP3 sessions of a running server, in every "
        "server process: user (- before login), client address, listener, TLS, "
        "start, age, state and process id, oldest first. Read through the "
        "server's control socket: run this as root or as a member of the "
        "server's group.",
    )
    _add_control_options(who)
    who.add_argument(
        "--json",
        action="store_true",
        help="print the sessions as a JSON list of objects instead of a table",
    )
    stats = commands.add_parser(
        "stats",
        help="print the counters of a running server",
        description="Print the metrics of a running server, summed over every "
        "server process (logins by result, sessions, hashing, ...): one "
        "'name{labels} value' line per series, with the names and labels of the "
        "--metrics endpoint. Read through the server's control socket: run this "
        "as root or as a member of the server's group.",
    )
    _add_control_options(stats)
    return parser


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    """The options that say where the server's control socket is."""
    parser.add_argument("--control-socket", metavar="PATH", help=_CONTROL_SOCKET_HELP)
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="the server's TOML configuration file, for its control_socket setting",
    )


def _control_socket(args: argparse.Namespace) -> str:
    """
    Where the server's control socket is: C{--control-socket}, else the
    C{control_socket} setting of C{--config}, else the setting's default.

    @return: the socket's path.
    @raise _Failed: the configuration cannot be read, or says the server
        has no control socket.
    """
    from pop3srv.app.config import SETTINGS, ConfigError, load_config
    from pop3srv.app.control import control_path, default_client_path

    value: str | None = args.control_socket
    source = f"--control-socket {value}"
    if value is None and args.config is not None:
        try:
            settings, _ = load_config(args.config)
        except ConfigError as e:
            raise _Failed(str(e)) from None
        value = settings.get("control_socket")
        source = f'control_socket = "{value}" in {args.config}'
    if value is None:
        value = str(SETTINGS["control_socket"].default)
        source = "the default"
    if value == "auto":
        # Not control_path's answer: whether the server could create
        # /run/pop3srv/control is the server's question, not this user's.
        return default_client_path()
    path = control_path(value)
    if path is None:
        raise _Failed(f"the server has no control socket ({source})")
    return path


def _who(args: argparse.Namespace) -> int:
    """
    @return: the exit status.
    """
    from pop3srv.app.control import ControlError, format_sessions, who

    try:
        sessions = who(_control_socket(args))
    except ControlError as e:
        raise _Failed(str(e)) from None
    if args.json:
        print(json.dumps(sessions, indent=2))
    else:
        sys.stdout.write(format_sessions(sessions))
    return 0


def _stats(args: argparse.Namespace) -> int:
    """
    @return: the exit status.
    """
    from pop3srv.app.control import ControlError, stats

    try:
        text = stats(_control_socket(args))
    except ControlError as e:
        raise _Failed(str(e)) from None
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


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
    if argv[:1] == ["deliver"]:
        from pop3srv.admin import deliver

        return deliver.main(argv[1:])
    if argv[:1] == ["uidl"]:
        from pop3srv.admin import uidl

        return uidl.main(argv[1:])
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
        if args.command == "who":
            return _who(args)
        if args.command == "stats":
            return _stats(args)
        parser.error("a command is required")
    except _UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Failed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILED
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
