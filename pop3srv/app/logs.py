# -*- test-case-name: tests.test_logs -*-
"""
What C{twistd pop3srv} logs and how: C{--log-level} and C{--log-format},
the start-up line, and the certificate expiry warning.

How the log observer is chosen
==============================

twistd sets up logging itself, between building the service and starting
it (L{twisted.application.app.AppLogger.start}): it takes the observer
C{--logger} names, or else the L{ILogObserver} component of the
L{Application <twisted.application.service.Application>}, or else one of
its own (a text file observer on C{--logfile}, standard output, or
C{--syslog}), and begins logging to it, which first replays the events
buffered so far.  A plugin's C{makeService} runs before that and never sees
the Application, but the service it returns does: twistd adds it with
C{service.setServiceParent(application)}, before it starts logging.  So
the top service (C{Pop3Service}) hands its parent to L{TwistdLogging.attach},
which sets our observer as the Application's L{ILogObserver} component,
the one twistd's own documentation gives for choosing a log observer.

This way every event goes through our observer, from the first: the events
buffered while the service was built, twistd's own "starting up" lines, the
workers' events the parent publishes again, "Server Shut Down." at the end.
The other ways were worse:
  - wrapping twistd's observer once the service starts (in
    C{privilegedStartService}) needs the private list of observers of the
    global publisher and, for JSON, the private file of twistd's text
    observer, and the lines logged before it (twistd's own) would stay
    text in a JSON log;
  - an observer factory for twistd's C{--logger} is an option of twistd,
    not of pop3srv: an admin would have to give it, and it cannot see
    C{--log-format}.
The price is that our observer writes where twistd would have:
L{twistd_log_target} follows twistd's rules (C{--syslog}, C{--logfile},
C{-}, C{--nodaemon}, the default C{twistd.log}, rotation on SIGUSR1), and a
test compares it with twistd's own choice for each combination, so that a
change in Twisted fails there.  An admin's own C{--logger} still wins; then
C{--log-level} and C{--log-format} do not apply, which is logged.  The log
file is opened when twistd adds the service, before it turns into a daemon
or drops privileges, as twistd's own is; under systemd (C{--nodaemon
--logfile=-}) the lines go to standard output, which is the journal.
Outside twistd (an embedder's program, a test) nothing here is used unless
called: logging is the program's.

The level can change while running (L{LogControl.set_level}, for a reload);
the format and the destination cannot, as twistd's observer is chosen once.

The level filter and the workers
================================

L{LevelFilter} is the first thing an event meets in our observer: a debug
event at C{--log-level info} costs one comparison and is never formatted.
Workers send their events to the parent as Twisted's JSON
(L{pop3srv.processes.supervisor}), which publishes them again in its log,
where they are filtered and formatted like its own, once.  A worker drops
the events below the level before it encodes them
(L{LogControl.worker_observer}), with the same L{LogControl} as its parent
(a fork's copy): a debug event costs a worker no JSON and no pipe.  A
worker's word to its parent that it serves is not the log's to drop: the
supervisor writes it past this filter (L{pop3srv.processes.supervisor}),
and the parent's own filter decides whether its line is shown.
L{LevelFilter} passes events that carry no level, as twistd's text
observer prints them; Twisted's L{LogLevelFilterPredicate} would drop them,
and looks the level up by namespace for every event.

The JSON lines
==============

C{--log-format json} writes one JSON object per line per event
(L{event_as_json}), where the text format writes one text line (events the
text observer skips are skipped too).  The keys:
  - C{log_time} (ISO 8601, UTC), C{log_level}, C{log_namespace},
    C{log_system} (when the event has one), C{log_text} (the message as the
    text line has it) and C{log_traceback} (for a failure): Twisted's
    C{log_} prefix, which no field of an event may use, so they never
    clash with the fields;
  - the fields the event's message names, with their values.  A
    C{key=value} line (an audit event, the start-up line, the session
    summary) gives its keys as they are in the text, and a value the text
    JSON-quotes (the audit C{user}) is the string itself; C{-} (no value)
    is C{null}.
So C{pop3srv-audit event=login-failed session=1a2b-7 peer=192.0.2.7
user="al" reason=bad-credentials} is, in JSON, C{{"log_time": ...,
"log_level": "info", "log_namespace": "pop3srv.audit", "log_text":
"pop3srv-audit event=login-failed ...", "event": "login-failed",
"session": "1a2b-7", "peer": "192.0.2.7", "user": "al", "reason":
"bad-credentials"}}.  The output is ASCII: no value can break a line.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import signal
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    PredicateResult,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import logfile
from twisted.python.components import Componentized
from zope.interface import implementer

#: C{--log-level} values, lowest first.
LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
#: C{--log-format} values.
FORMATS = ("text", "json")

#: A certificate this close to its end (days) is warned about.
CERTIFICATE_WARNING_DAYS = 14.0
#: Seconds between two expiry checks.
CERTIFICATE_CHECK_INTERVAL = 86400.0

#: The start-up line.
STARTUP_FORMAT = (
    "pop3srv-start version={version} config={config} listen={listen} "
    "listen_tls={listen_tls} auth={auth} users={users} "
    "cert_subject={cert_subject} cert_expires={cert_expires}"
)

_log = Logger()


class LogSetupError(ValueError):
    """Logging cannot be set up as asked, in one line."""


# --- the level filter -------------------------------------------------------------


@implementer(ILogFilterPredicate)
class LevelFilter:
    """
    Drops events below a level; passes events that carry no level.

    @ivar level: the lowest level passed.
    """

    def __init__(self, level: LogLevel = LogLevel.info) -> None:
        self.level = level

    def __call__(self, event: LogEvent) -> Any:
        level = event.get("log_level")
        try:
            if level is not None and level < self.level:
                return PredicateResult.no
        except TypeError:
            # Not a LogLevel (a hand-made event): not ours to judge.
            pass
        return PredicateResult.maybe


class LogControl:
    """
    This process's log level and format: one object, shared by the
    parent's observer and (as a fork's copy) its workers' filters, so that
    changing the level (L{set_level}, e.g. on a reload) changes every
    filter of the process.

    @ivar filter: the level filter every observer made here goes through.
    @ivar log_format: C{"text"} or C{"json"}; fixed once logging has begun.
    """

    def __init__(self, level: str = "info", log_format: str = "text") -> None:
        """
        @raise LogSetupError: an unknown level or format.
        """
        if log_format not in FORMATS:
            raise LogSetupError(f"log_format must be one of {', '.join(FORMATS)}")
        self.filter = LevelFilter(_level(level))
        self.log_format = log_format

    @property
    def level(self) -> str:
        """The name of the lowest level logged."""
        return str(self.filter.level.name)

    def set_level(self, level: str) -> None:
        """
        Log from C{level} on, from now on.

        @raise LogSetupError: an unknown level.
        """
        self.filter.level = _level(level)

    def filtered(self, observer: ILogObserver) -> ILogObserver:
        """C{observer}, given only the events at this control's level or above."""
        return FilteringLogObserver(observer, [self.filter])

    def file_observer(self, out: IO[Any]) -> ILogObserver:
        """The filtered observer writing this control's format to C{out}."""
        if self.log_format == "json":
            return self.filtered(json_lines_observer(out))
        return self.filtered(textFileLogObserver(out))

    def worker_observer(self, out: IO[Any]) -> ILogObserver:
        """
        What a worker logs to: its events at this control's level or above,
        as Twisted's JSON for the parent to publish again (which
        C{eventFromJSON} reads back whole, levels and failures included).
        """
        return self.filtered(jsonFileLogObserver(out))


def _level(name: str) -> LogLevel:
    try:
        return LEVELS[name]
    except KeyError:
        raise LogSetupError(f"log_level must be one of {', '.join(LEVELS)}") from None


# --- JSON lines -------------------------------------------------------------------

_JSONValue = str | int | float | bool | None

#: The start of a C{key=value} line's format: an optional tag, then a key.
_FIRST_PAIR = re.compile(r"(?:[A-Za-z][\w.-]* +)?(?P<key>[A-Za-z_][\w.-]*)=")
#: Every later pair's literal text: a space, then a key.
_NEXT_PAIR = re.compile(r" +(?P<key>[A-Za-z_][\w.-]*)=")

#: A format field: its name, conversion and format spec.
_Field = tuple[str, str | None, str]


@functools.lru_cache(maxsize=512)
def _format_fields(log_format: str) -> tuple[tuple[_Field, ...], tuple[str, ...] | None]:
    """
    The fields a format names (plain names only, C{log_} ones left out),
    and, if the format is a C{key=value} line (an optional tag, then only
    C{key={field}} pairs), each field's key; else L{None}.
    """
    fields: list[_Field] = []
    keys: list[str] | None = []
    try:
        parsed = list(string.Formatter().parse(log_format))
    except ValueError:
        return (), None
    for i, (literal, name, spec, conversion) in enumerate(parsed):
        if name is None:
            if literal.strip():
                keys = None
            continue
        match = (_FIRST_PAIR if i == 0 else _NEXT_PAIR).fullmatch(literal)
        plain = name.isidentifier() and not name.startswith("log_")
        if match is None or not plain or keys is None:
            keys = None
        else:
            keys.append(match["key"])
        if plain:
            fields.append((name, conversion, spec or ""))
    return tuple(fields), (tuple(keys) if keys else None)


def _field_value(event: LogEvent, name: str, conversion: str | None, spec: str) -> _JSONValue:
    """
    A field's value for JSON: a number, string, boolean or null as the
    event holds it (without the message's conversion: C{{user!r}} is the
    name itself), else its text as the message shows it.
    """
    raw = event.get(name)
    # A conversion (!r) keeps text unambiguous; JSON does that by itself.
    if raw is None or isinstance(raw, str | int):
        return raw
    if isinstance(raw, float) and math.isfinite(raw):
        return raw
    # An event published again from a worker holds its fields as text
    # (Twisted's "flattened" values) where they were not JSON.
    flattened = event.get("log_flattened")
    if isinstance(flattened, dict):
        text = flattened.get(f"{name}!{'r' if conversion == 'r' else 's'}:{spec}")
        if isinstance(text, str):
            return text
    try:
        value = repr(raw) if conversion == "r" else ascii(raw) if conversion == "a" else raw
        return format(value, spec)
    except Exception:
        return "UNFORMATTABLE"


def _decoded(value: _JSONValue) -> _JSONValue:
    """A C{key=value} line's value: C{-} is null, a JSON-quoted string is the string."""
    if not isinstance(value, str):
        return value
    if value == "-":
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


def _iso_time(when: object) -> str | None:
    if not isinstance(when, int | float) or not math.isfinite(when):
        return None
    try:
        moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent) -> str | None:
    """
    One event as a JSON object, on one line (see the module docstring), or
    L{None} for an event that the text format would not write either.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if not text and failure is None:
        return None
    level = event.get("log_level")
    record: dict[str, Any] = {
        "log_time": _iso_time(event.get("log_time")),
        "log_level": getattr(level, "name", None if level is None else str(level)),
        "log_namespace": event.get("log_namespace"),
    }
    if event.get("log_system") is not None:
        record["log_system"] = str(event["log_system"])
    record["log_text"] = text
    if failure is not None:
        try:
            record["log_traceback"] = failure.getTraceback()
        except Exception as e:
            record["log_traceback"] = f"(unable to obtain the traceback: {e})"
    log_format = event.get("log_format")
    if isinstance(log_format, str):
        fields, keys = _format_fields(log_format)
        if keys is None:
            for name, conversion, spec in fields:
                record.setdefault(name, _field_value(event, name, conversion, spec))
        else:
            for key, (name, conversion, spec) in zip(keys, fields, strict=True):
                record.setdefault(key, _decoded(_field_value(event, name, conversion, spec)))
    return json.dumps(record, ensure_ascii=True, allow_nan=False, default=str)


def _json_line(event: LogEvent) -> str | None:
    try:
        line = event_as_json(event)
    except Exception as e:
        # Never lose an event to a formatting bug: say what happened.
        line = json.dumps(
            {
                "log_time": _iso_time(event.get("log_time")),
                "log_text": f"unformattable event: {e!r}",
            },
            ensure_ascii=True,
        )
    return None if line is None else line + "\n"


def json_lines_observer(out: IO[Any]) -> FileLogObserver:
    """A file observer writing each event as one JSON line (L{event_as_json})."""
    return FileLogObserver(out, _json_line)


# --- where twistd logs ------------------------------------------------------------

#: L{twistd_log_target} for syslog and standard output.
SYSLOG = "syslog"
STDOUT = "-"


def twistd_log_target(config: Mapping[str, Any]) -> str:
    """
    Where twistd logs, by its options (C{--syslog}, C{--logfile},
    C{--nodaemon}), by the rules of
    C{twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver}.

    @param config: twistd's parsed options.
    @return: L{SYSLOG}, L{STDOUT}, or the path of the log file.
    @raise LogSetupError: a daemon told to log to standard output, which
        it closes.
    """
    logfile_name = config.get("logfile") or ""
    nodaemon = bool(config.get("nodaemon"))
    if config.get("syslog"):
        return SYSLOG
    if logfile_name == "-":
        if not nodaemon:
            raise LogSetupError(
                "a daemon cannot log to standard output (--logfile=-); add --nodaemon"
            )
        return STDOUT
    if nodaemon and not logfile_name:
        return STDOUT
    return str(logfile_name or "twistd.log")


def _open_log_file(path: str) -> logfile.LogFile:
    """The log file, rotated on SIGUSR1 unless that signal is taken, as twistd does."""
    log_file = logfile.LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


class TwistdLogging:
    """
    The log observer of C{twistd pop3srv}, given to twistd through its
    Application (see the module docstring).

    @ivar control: the level and format.
    @ivar target: where the log goes (L{twistd_log_target}).
    @ivar observer: the observer, once made.
    """

    def __init__(self, control: LogControl, target: str, syslog_prefix: str = "") -> None:
        """
        @raise LogSetupError: JSON to syslog.
        """
        if target == SYSLOG and control.log_format == "json":
            raise LogSetupError(
                "--log-format json writes to --logfile or standard output, not to --syslog"
            )
        self.control = control
        self.target = target
        self._syslog_prefix = syslog_prefix
        self.observer: ILogObserver | None = None

    @classmethod
    def for_twistd(cls, twistd_config: Any, control: LogControl) -> TwistdLogging | None:
        """
        The logging of a C{twistd} run, from its options.

        @param twistd_config: twistd's options (C{options.parent} of the
            plugin's options), or L{None} when not run by twistd (an
            embedder, a test): then L{None}, and logging is the caller's.
        @return: L{None} also when twistd's C{--logger} names an observer.
        @raise LogSetupError: options that cannot work together; say it
            and exit before twistd goes on.
        """
        if twistd_config is None or "logfile" not in twistd_config:
            return None
        if twistd_config.get("logger"):
            _log.info(
                "twistd --logger chooses the log observer: "
                "--log-level and --log-format do not apply"
            )
            return None
        target = twistd_log_target(twistd_config)
        return cls(control, target, str(twistd_config.get("prefix") or ""))

    def make_observer(self) -> ILogObserver:
        """
        The observer, made (and the log file opened) on the first call.

        @raise OSError: the log file cannot be opened.
        """
        if self.observer is None:
            if self.target == SYSLOG:
                from twisted.python import syslog

                # Twisted's annotation is wrong: it takes an old-style
                # observer, as twistd gives it this one.
                emit: Any = syslog.SyslogObserver(self._syslog_prefix).emit
                self.observer = self.control.filtered(LegacyLogObserverWrapper(emit))
            elif self.target == STDOUT:
                # Taken now: once logging begins, twistd puts a logging
                # file object in sys.stdout.
                self.observer = self.control.file_observer(sys.stdout)
            else:
                log_file: Any = _open_log_file(self.target)  # a file, to FileLogObserver
                self.observer = self.control.file_observer(log_file)
        return self.observer

    def attach(self, parent: object) -> bool:
        """
        Make our observer twistd's, if C{parent} is the Application twistd
        is about to log for and it has no observer of its own.  Call it from
        the top service's C{setServiceParent}.

        @return: whether it was attached.
        """
        if not isinstance(parent, Componentized):
            return False
        if parent.getComponent(ILogObserver, None) is not None:
            return False
        parent.setComponent(ILogObserver, self.make_observer())
        return True


# --- the start-up line ------------------------------------------------------------

_BARE = re.compile(r"[!#-\[\]-~]+")


def key_value(value: str | int | Sequence[str] | None) -> str:
    """
    A value as a C{key=value} line writes it: C{-} for none, a list
    comma-joined, and JSON-quoted if it has a space, a quote, a backslash
    or anything but printable ASCII (so nothing can forge another field).
    """
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    text = value if isinstance(value, str) else ",".join(value)
    if text == "-" or not _BARE.fullmatch(text):
        return json.dumps(text, ensure_ascii=True)
    return text


def _utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        # cryptography's older not_valid_after: naive, in UTC.
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def _iso_date(moment: datetime.datetime | None) -> str | None:
    if moment is None:
        return None
    return _utc(moment).isoformat(timespec="seconds").replace("+00:00", "Z")


def startup_summary(
    *,
    version: str,
    config: str | None,
    listen: Sequence[str],
    listen_tls: Sequence[str],
    checkers: Sequence[str],
    users: int | None,
    cert_subject: str | None,
    cert_not_after: datetime.datetime | None,
    logger: Logger | None = None,
) -> str:
    """
    Log the start-up line (a C{key=value} line, L{STARTUP_FORMAT}) and
    return its text.

    @param version: pop3srv's version.
    @param config: the configuration file, if any.
    @param listen: the C{--listen} endpoints.
    @param listen_tls: the C{--listen-tls} endpoints.
    @param checkers: the credential checkers, as C{--auth} gives them.
    @param users: how many users the user files hold, if known.
    @param cert_subject: the certificate's subject (RFC 4514), if TLS.
    @param cert_not_after: when the certificate expires, if TLS.
    @param logger: where to log it; this module's logger if L{None}.
    """
    fields = {
        "version": key_value(version),
        "config": key_value(config),
        "listen": key_value(list(listen) or None),
        "listen_tls": key_value(list(listen_tls) or None),
        "auth": key_value(list(checkers) or None),
        "users": "-" if users is None else users,
        "cert_subject": key_value(cert_subject),
        "cert_expires": key_value(_iso_date(cert_not_after)),
    }
    (logger or _log).info(STARTUP_FORMAT, **fields)
    return STARTUP_FORMAT.format(**fields)


# --- the certificate expiry warning -----------------------------------------------


class CertificateExpiryWarning(service.Service):
    """
    At start-up and every L{CERTIFICATE_CHECK_INTERVAL} seconds, warns when
    the certificate expires within L{CERTIFICATE_WARNING_DAYS} days (an
    error once it has expired).  It asks C{not_after} each time, so a
    certificate reloaded meanwhile is the one judged.
    """

    _log = Logger()

    def __init__(
        self,
        not_after: Callable[[], datetime.datetime | None],
        clock: IReactorTime,
        warn_days: float = CERTIFICATE_WARNING_DAYS,
        interval: float = CERTIFICATE_CHECK_INTERVAL,
    ) -> None:
        """
        @param not_after: returns the current certificate's end of validity
            (aware, or naive in UTC), or L{None} when there is none.
        @param clock: the reactor's time, which says "now".
        """
        self._not_after = not_after
        self._clock = clock
        self.warn_days = warn_days
        self.interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def check(self) -> float | None:
        """
        Warn now if it is time to.

        @return: the days the certificate has left (negative once
            expired), or L{None} if there is none or it cannot be told.
        """
        try:
            end = self._not_after()
        except Exception:
            # The next check may do better; a failure here must not end them.
            self._log.failure("Cannot tell when the TLS certificate expires")
            return None
        if end is None:
            return None
        days_left = (_utc(end).timestamp() - self._clock.seconds()) / 86400.0
        expires = _iso_date(end)
        if days_left <= 0:
            self._log.error(
                "The TLS certificate expired at {expires}, {days_ago:.1f} days ago: "
                "clients refuse it; renew it and reload (SIGHUP)",
                expires=expires,
                days_ago=round(-days_left, 1),
            )
        elif days_left <= self.warn_days:
            self._log.warn(
                "The TLS certificate expires in {days_left:.1f} days, at {expires}: "
                "renew it and reload (SIGHUP)",
                expires=expires,
                days_left=round(days_left, 1),
            )
        return days_left
