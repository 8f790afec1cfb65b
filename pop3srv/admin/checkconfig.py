# -*- test-case-name: tests.test_cli -*-
"""
C{pop3srv check-config}: everything C{twistd pop3srv} validates at start-up
(by running its own option parser, L{pop3srv.app.tap.Options}, without
starting anything), what start-up checks only when it makes its services
(the control socket's place), then what start-up cannot see until a client
comes or a SIGHUP: certificate expiry, malformed user-file lines, whether
the service user can read the files and write the index directory.  Prints
the effective settings as TOML.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from cryptography import x509

from pop3srv import __version__
from pop3srv.app import tap
from pop3srv.app.config import SETTINGS, Setting, convert, load_config
from pop3srv.app.control import control_path, default_client_path
from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.realm import USER_FIELD, split_mailbox_template
from pop3srv.auth.userfile import UserFile, UserFileError

__all__ = ["EXPIRY_WARNING_DAYS", "Findings", "ServiceIdentity", "check_config"]

#: A certificate expiring within this many days is warned about.
EXPIRY_WARNING_DAYS = 14

#: What L{tap.Options} puts before its one-line errors.
_TAP_PREFIX = "twistd pop3srv: "

#: The longest path a UNIX socket can have on Linux: C{sun_path} holds
#: this many bytes and a NUL.
MAX_SOCKET_PATH = 107


@dataclass
class Findings:
    """
    What a check found.

    @ivar problems: each would stop start-up or break logins; one line each.
    @ivar warnings: worth an admin's look, but the server would run.
    @ivar notes: facts for the header of the settings listing.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _owner_and_mode(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {owner}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


_VERBS = {os.R_OK: "read", os.W_OK | os.X_OK: "write in"}


@dataclass(frozen=True)
class ServiceIdentity:
    """
    Who the server runs as, for file access checks.

    @ivar name: the user name, for messages.
    @ivar uid: the user id, or L{None} for this process itself: then the
        kernel answers (C{access(2)}, ACLs included); otherwise the mode
        bits and owners along the path do (ACLs are not considered).
    @ivar gids: the groups of that user.
    """

    name: str
    uid: int | None = None
    gids: frozenset[int] = frozenset()

    @classmethod
    def current(cls) -> ServiceIdentity:
        """This process's effective user."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name)

    @classmethod
    def named(cls, user: str | None, groups: Sequence[str] = ()) -> ServiceIdentity:
        """
        A user (this process's if L{None}) with its primary group, the
        groups C{/etc/group} lists it in, and C{groups} (as twistd's
        C{--gid} or systemd's C{SupplementaryGroups=} add).

        @raise ValueError: for an unknown user or group.
        """
        if user is None and not groups:
            return cls.current()
        try:
            entry = pwd.getpwuid(os.geteuid()) if user is None else _user_entry(user)
        except KeyError:
            raise ValueError(f"--user {user}: no such user") from None
        gids = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
        for name in groups:
            try:
                gids.add(
                    grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
                )
            except KeyError:
                raise ValueError(f"--group {name}: no such group") from None
        return cls(entry.pw_name, entry.pw_uid, frozenset(gids))

    def cannot(self, path: str, mode: int) -> str | None:
        """
        Why this user may not access C{path} with C{mode} (C{os.R_OK}, or
        C{os.W_OK | os.X_OK} for a directory to create files in), or
        L{None} if it may.
        """
        verb = _VERBS.get(mode, "use")
        if self.uid is None:
            if os.access(path, mode):
                return None
            try:
                detail = f" ({_owner_and_mode(os.stat(path))})"
            except OSError:
                detail = ""
            return f"{path}: user {self.name} cannot {verb} it{detail}"
        real = os.path.realpath(path)
        parts = real.split(os.sep)[1:]
        try:
            for depth in range(len(parts)):
                directory = os.sep + os.sep.join(parts[:depth])
                st = os.stat(directory)
                if not self._allows(st, os.X_OK):
                    return (
                        f"{path}: user {self.name} cannot reach it: no search permission "
                        f"on {directory} ({_owner_and_mode(st)})"
                    )
            st = os.stat(real)
        except OSError as e:
            return f"{path}: cannot tell whether user {self.name} may {verb} it: {e.strerror}"
        if not self._allows(st, mode):
            return f"{path}: user {self.name} cannot {verb} it ({_owner_and_mode(st)})"
        return None

    def _allows(self, st: os.stat_result, mode: int) -> bool:
        if self.uid == 0:
            return True
        # As the kernel does: the owner's bits for the owner, whatever the
        # group's say; then the group's; then everyone else's.
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid in self.gids:
            shift = 3
        else:
            shift = 0
        need = (4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0)
        need |= 1 if mode & os.X_OK else 0
        return (st.st_mode >> shift) & need == need


def _user_entry(user: str) -> pwd.struct_passwd:
    return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)


class _Options(tap.Options):
    """
    C{twistd pop3srv}'s options, remembering what the command line itself
    gave, to tell where each setting came from.
    """

    def __init__(self) -> None:
        #: The C{--auth} descriptions of the command line, in order.
        self.auth_given: list[str] = []
        #: The single-valued options as the command line gave them.
        self.command_line: dict[str, Any] = {}
        super().__init__()

    def opt_auth(self, description: str) -> None:
        """Credential checker, e.g. passlib:/etc/pop3srv/users (repeatable)."""
        self.auth_given.append(description)
        super().opt_auth(description)

    def postOptions(self) -> None:
        # Before the merge, which writes the settled values over these.
        self.command_line = dict(self)
        super().postOptions()


@dataclass
class _Settled:
    """
    The parsed options and where each setting came from.

    @ivar options: as start-up would use them.
    @ivar auth: the effective C{auth} descriptions.
    @ivar origin: per key, C{--option}, C{file:line}, or L{None} when it
        is the default.
    """

    options: _Options
    auth: list[str]
    origin: dict[str, str | None]

    def where(self, key: str) -> str:
        """For messages: where C{key} was set, or C{default --option}."""
        return self.origin[key] or f"default {SETTINGS[key].option}"


def _settle(argv: Sequence[str]) -> _Settled:
    """
    Parse as C{twistd pop3srv} would.

    @raise ValueError: its one-line error.
    """
    options = _Options()
    try:
        options.parseOptions(list(argv))
    except SystemExit as e:
        if isinstance(e.code, str):
            raise ValueError(e.code.removeprefix(_TAP_PREFIX)) from None
        raise
    found: dict[str, Any] = {}
    locate: Callable[[str], str] = lambda key: SETTINGS[key].option  # noqa: E731
    if options["config"]:
        # It parsed a moment ago; read again for the keys the file sets.
        found, locate = load_config(options["config"])
    origin: dict[str, str | None] = {}
    for key, setting in SETTINGS.items():
        if key == "auth":
            on_command_line = bool(options.auth_given)
        elif setting.repeatable:
            on_command_line = key in options.given
        else:
            on_command_line = options.command_line.get(key.replace("_", "-")) is not None
        if on_command_line:
            origin[key] = setting.option
        elif key in found:
            origin[key] = locate(key)
        else:
            origin[key] = None
    auth = options.auth_given or found.get("auth") or list(SETTINGS["auth"].default)
    return _Settled(options, auth, origin)


def check_certificate(path: str, now: datetime.datetime, origin: str) -> Findings:
    """
    The dates of every certificate in a PEM chain file (start-up has
    checked that it loads and matches its key; OpenSSL never checks a
    server's own certificate dates, clients do).

    @param now: an aware datetime.
    @param origin: where the path was set, for messages.
    """
    findings = Findings()
    try:
        with open(path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as e:
        # Replaced since start-up's check read it.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        findings.problems.append(f"{origin}: {path}: {reason}")
        return findings
    for index, cert in enumerate(chain):
        subject = cert.subject.rfc4514_string() or "no subject"
        what = "certificate" if index == 0 else f"chain certificate {index + 1} ({subject})"
        after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
        days = (after - now) // datetime.timedelta(days=1)
        if after <= now:
            findings.problems.append(
                f"{origin}: {path}: {what} expired on {after:%Y-%m-%d %H:%M} UTC "
                f"({(now - after) // datetime.timedelta(days=1)} days ago)"
            )
        elif before > now:
            findings.problems.append(
                f"{origin}: {path}: {what} is not valid before {before:%Y-%m-%d %H:%M} UTC"
            )
        elif days < EXPIRY_WARNING_DAYS:
            findings.warnings.append(
                f"{origin}: {path}: {what} expires in {days} days, on {after:%Y-%m-%d %H:%M} UTC"
            )
        if index == 0:
            findings.notes.append(
                f"certificate {path}: {subject}, expires {after:%Y-%m-%d} ({days} days)"
            )
    return findings


class _CheckedUserFile(UserFile):
    """A user file that keeps the lines it skips instead of logging them."""

    def __init__(self, path: str) -> None:
        #: C{(line number, reason)} of every line skipped.
        self.skipped: list[tuple[int, str]] = []
        super().__init__(path, upgrade=False)

    def _skip(self, lineno: int, reason: str) -> None:
        self.skipped.append((lineno, reason))


def check_user_file(path: str, who: ServiceIdentity) -> Findings:
    """
    Whether the service user can read the file, and every line the server
    would skip, with its number (never its text: it may be a password).
    """
    findings = Findings()
    reason = who.cannot(path, os.R_OK)
    if reason is not None:
        findings.problems.append(reason)
    try:
        users = _CheckedUserFile(path)
    except UserFileError as e:
        findings.problems.append(str(e))
        return findings
    for lineno, why in users.skipped:
        findings.problems.append(f"{path}:{lineno}: {why}")
    return findings


def check_index_location(settled: _Settled, who: ServiceIdentity) -> Findings:
    """
    Whether the service user can create files where the UIDL indexes,
    session locks and journals go: C{index_dir}, or beside each mbox.
    """
    findings = Findings()
    options = settled.options
    if options["index_dir"] is not None:
        reason = who.cannot(options["index_dir"], os.W_OK | os.X_OK)
        if reason is not None:
            findings.problems.append(f"{settled.where('index_dir')}: {reason}")
        return findings
    kind, template = split_mailbox_template(options["mailbox"])
    if kind == "maildir":
        # Its lock and size cache live inside each user's Maildir.
        return findings
    spool = os.path.dirname(template)
    if USER_FIELD in spool:
        # One directory per user: nothing fixed to look at.
        return findings
    if not os.path.isdir(spool):
        findings.warnings.append(
            f"{settled.where('mailbox')}: {spool} does not exist; logins will fail until it does"
        )
        return findings
    reason = who.cannot(spool, os.W_OK | os.X_OK)
    if reason is not None:
        findings.problems.append(
            f"{settled.where('mailbox')}: {reason}; without index_dir the indexes "
            "go beside each mbox"
        )
    return findings


def check_config_file(settled: _Settled, who: ServiceIdentity) -> Findings:
    """
    Whether the service user can read C{--config}: the server reads it at
    start-up and again on every SIGHUP, as that user.
    """
    findings = Findings()
    path = settled.options["config"]
    if path:
        reason = who.cannot(path, os.R_OK)
        if reason is not None:
            findings.problems.append(
                f"--config: {reason}; the server reads it at start-up and on SIGHUP"
            )
    return findings


def check_control_socket(
    settled: _Settled, who: ServiceIdentity, environ: Mapping[str, str] = os.environ
) -> Findings:
    """
    Whether the server can make its control socket where C{control_socket}
    puts it (L{control_path}): start-up fails if it cannot.

    C{auto} is resolved as the server resolves it, with C{environ} for
    systemd's C{RUNTIME_DIRECTORY}: there, if set; if not, in the default
    runtime directory only if it exists and the service user may create
    files in it, and else there is none (which start-up accepts).
    """
    findings = Findings()
    value = settled.options["control_socket"]
    where = settled.where("control_socket")
    path = control_path(value, environ)
    if value == "auto" and not environ.get("RUNTIME_DIRECTORY", "").split(":")[0]:
        # control_path asked whether this process may create it; the
        # server's question is whether the service user may.
        path = default_client_path(environ)
        directory = os.path.dirname(path)
        reason = (
            f"{directory} does not exist"
            if not os.path.isdir(directory)
            else who.cannot(directory, os.W_OK | os.X_OK)
        )
        if reason is not None:
            findings.notes.append(
                f"control socket: none outside systemd ({reason}); "
                "under systemd, $RUNTIME_DIRECTORY/control"
            )
            return findings
    if path is None:
        findings.notes.append("control socket: none")
        return findings
    problem = _control_socket_problem(path, who)
    if problem is not None:
        findings.problems.append(f"{where}: control socket {path}: {problem}")
    findings.notes.append(f"control socket {path}")
    return findings


def _control_socket_problem(path: str, who: ServiceIdentity) -> str | None:
    """Why the server, as C{who}, cannot listen on a UNIX socket at C{path}, or L{None}."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        return f"the path has {size} bytes, more than a UNIX socket's {MAX_SOCKET_PATH}"
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        there = "is not a directory" if os.path.lexists(directory) else "does not exist"
        return f"{directory} {there}"
    reason = who.cannot(directory, os.W_OK | os.X_OK)
    if reason is not None:
        # It makes the socket there, and removes it when it stops.
        return reason
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISSOCK(mode):
        # The server replaces only a stale socket.
        return "exists and is not a socket"
    return None


def _toml(value: Any) -> str:
    """A value in TOML syntax."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON's string escapes are valid in TOML basic strings.
    return json.dumps(str(value), ensure_ascii=False)


def _default_of(setting: Setting) -> Any:
    if setting.default is None:
        return None
    return convert(setting, setting.default, setting.option)


def settings_lines(settled: _Settled) -> list[str]:
    """
    Every setting, C{key = value} in TOML; one that differs from its
    default ends with C{  # default: VALUE}; one with no value (and no
    default) is a comment, C{# key is not set}.  A setting whose default
    is worked out at start-up (C{hash_workers}) counts as changed when it
    was set.
    """
    lines = []
    for key, setting in SETTINGS.items():
        value = settled.auth if key == "auth" else settled.options[key]
        default = _default_of(setting)
        if value is None:
            lines.append(f"# {key} is not set")
            continue
        changed = settled.origin[key] is not None if default is None else value != default
        line = f"{key} = {_toml(value)}"
        if changed:
            line += f"  # default: {'not set' if default is None else _toml(default)}"
        lines.append(line)
    return lines


def check_config(
    argv: Sequence[str],
    who: ServiceIdentity,
    out: TextIO,
    err: TextIO,
    prog: str = "pop3srv check-config",
    now: datetime.datetime | None = None,
    as_root_unasked: bool = False,
) -> int:
    """
    Run every check and print the settings.

    @param argv: options as for C{twistd pop3srv}.
    @param who: the service user.
    @param out: where the settings go.
    @param err: where problems and warnings go, one line each, after
        C{prog: }.
    @param as_root_unasked: this runs as root and C{who} was not given:
        say that access checks as root mean little.
    @return: 0 if start-up would succeed, 1 if not.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    findings = Findings()
    settled: _Settled | None = None
    try:
        settled = _settle(argv)
    except ValueError as e:
        findings.problems.append(" ".join(str(e).split()))
    if settled is not None:
        options = settled.options
        findings.warnings += options.warnings
        if as_root_unasked:
            findings.warnings.append(
                "checked file access as root, which may read and write anything; "
                "give --user (and --group) of the service to check its access"
            )
        parts: list[Findings] = [check_config_file(settled, who)]
        if options["tls_cert"] is not None:
            for key in ("tls_cert", "tls_key"):
                reason = who.cannot(options[key], os.R_OK)
                if reason is not None:
                    # SIGHUP re-reads them as the service user.
                    findings.problems.append(f"{settled.where(key)}: {reason}")
            parts.append(check_certificate(options["tls_cert"], now, settled.where("tls_cert")))
        for checker in options["credCheckers"]:
            if isinstance(checker, PasslibChecker):
                parts.append(check_user_file(checker.users.path, who))
        parts.append(check_index_location(settled, who))
        parts.append(check_control_socket(settled, who))
        for part in parts:
            findings.problems += part.problems
            findings.warnings += part.warnings
            findings.notes += part.notes
        findings.notes.append(f"file access checked for user {who.name}")
        source = f"{options['config']} and " if options["config"] else ""
        header = [f"pop3srv {__version__}: the settings of {source}the command line"]
        header.append("a setting that differs from its default ends with '# default: VALUE'")
        try:
            _write(out, (f"# {line}" for line in header + findings.notes))
            _write(out, settings_lines(settled))
            out.flush()
        except BrokenPipeError:
            # The reader of the listing went away (| head); the problems
            # and the exit status still count, and the flush at exit must
            # not fail again on the closed pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    _write(err, (f"{prog}: warning: {line}" for line in findings.warnings))
    _write(err, (f"{prog}: {line}" for line in findings.problems))
    return 1 if findings.problems else 0


def _write(stream: TextIO, lines: Iterable[str]) -> None:
    for line in lines:
        stream.write(line + "\n")
