"""
Tests for L{pop3srv.app.logs}: the level filter, the JSON lines, twistd's
log destination, the start-up line, the certificate expiry warning, and
real C{twistd} runs that log through it.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import poplib
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, TWISTD, Pop3Server, write_mbox
from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    PredicateResult,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import logfile
from twisted.scripts._twistd_unix import UnixAppLogger

from pop3srv.app import logs
from pop3srv.app.config import SETTINGS
from pop3srv.app.logs import (
    CertificateExpiryWarning,
    LogControl,
    LogSetupError,
    TwistdLogging,
    event_as_json,
    startup_summary,
    twistd_log_target,
)
from pop3srv.server import audit
from pop3srv.server.tls import TLSContextSource

ROOT = Path(__file__).resolve().parent.parent
UTC = datetime.UTC


def publisher_to(observer: ILogObserver) -> tuple[LogPublisher, Logger]:
    """A publisher with only C{observer}, and a logger publishing to it."""
    publisher = LogPublisher(observer)
    return publisher, Logger(namespace="pop3srv.test", observer=publisher)


def some_events(log: Logger, publisher: LogPublisher) -> None:
    """One event of each kind the server logs, debug to error."""
    log.debug("STLS started for {peer}", peer="192.0.2.7:1234")
    log.info("Started server process {pid} (worker {slot})", pid=4242, slot=1)
    audit_log = Logger(namespace="pop3srv.audit", observer=publisher)
    for user in ("al", None):
        audit_log.info(
            audit.FORMAT,
            event="login-failed",
            session="1a2b-7",
            peer="192.0.2.7",
            user=audit.quote_user(user),
            reason="bad-credentials",
            audit_event="login-failed",
        )
    log.warn("{count} commits still in progress", count=3)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("Sweeping the mail spool failed")


# --- the level filter ---------------------------------------------------------------


def test_info_drops_debug_and_keeps_the_rest() -> None:
    """At info, a debug event is not written; every other level is, once each."""
    out = io.StringIO()
    publisher, log = publisher_to(LogControl("info").file_observer(out))
    some_events(log, publisher)
    text = out.getvalue()
    assert "STLS started" not in text
    for words in ("Started server process 4242", 'user="al"', "3 commits", "ZeroDivisionError"):
        assert text.count(words) == 1, (words, text)


@pytest.mark.parametrize(
    ("level", "expected"), [("debug", 6), ("info", 5), ("warn", 2), ("error", 1)]
)
def test_each_level_keeps_what_it_should(level: str, expected: int) -> None:
    """
    Each level keeps the events at it or above (the failure is critical),
    counted as the JSON objects written.
    """
    out = io.StringIO()
    publisher, log = publisher_to(LogControl(level, "json").file_observer(out))
    some_events(log, publisher)
    levels = [json.loads(line)["log_level"] for line in out.getvalue().splitlines()]
    assert len(levels) == expected, levels
    assert levels[-1] == "critical"
    order = ["debug", "info", "warn", "error", "critical"]
    assert all(order.index(name) >= order.index(level) for name in levels)


def test_text_at_info_is_twistds_text() -> None:
    """
    Apart from the debug event it drops, the text output at info is
    exactly what twistd's own observer writes for the same events.
    """
    ours, theirs = io.StringIO(), io.StringIO()
    control = LogControl("info", "text")
    for observer, out in (
        (control.file_observer(ours), ours),
        (textFileLogObserver(theirs), theirs),
    ):
        publisher, log = publisher_to(observer)
        some_events(log, publisher)
        assert out.getvalue()
    assert "STLS started" in theirs.getvalue()
    twistd_lines = [line for line in theirs.getvalue().splitlines() if "STLS started" not in line]
    # The times differ by the microseconds between the two runs at most.
    stamp = re.compile(r"^\S+ ")
    assert [stamp.sub("", line) for line in ours.getvalue().splitlines()] == [
        stamp.sub("", line) for line in twistd_lines
    ]


def test_dropped_events_are_never_formatted() -> None:
    """
    A debug event at info costs no formatting, neither in the parent's
    text or JSON observer nor in a worker's (no JSON encoding): its fields
    are never turned into text.
    """
    touched: list[str] = []

    class Spy:
        def __format__(self, spec: str) -> str:
            touched.append("format")
            return "spy"

        def __repr__(self) -> str:
            touched.append("repr")
            return "spy"

        __str__ = __repr__

    control = LogControl("info", "json")
    out = io.StringIO()
    for observer in (
        control.file_observer(out),
        LogControl("info", "text").file_observer(out),
        control.worker_observer(out),
    ):
        _, log = publisher_to(observer)
        log.debug("costly {spy} {spy!r}", spy=Spy())
    assert touched == []
    assert out.getvalue() == ""
    _, log = publisher_to(control.worker_observer(out))
    log.info("costly {spy}", spy=Spy())
    assert touched


def test_level_changes_while_running() -> None:
    """L{LogControl.set_level} takes effect for the next event, in every observer made."""
    out = io.StringIO()
    control = LogControl("info")
    _, log = publisher_to(control.file_observer(out))
    log.debug("first debug")
    control.set_level("debug")
    assert control.level == "debug"
    log.debug("second debug")
    control.set_level("error")
    log.warn("a warning")
    log.error("an error")
    text = out.getvalue()
    assert "first debug" not in text
    assert "second debug" in text
    assert "a warning" not in text
    assert "an error" in text


def test_events_without_level_pass() -> None:
    """An event that carries no level is written, as twistd's text observer writes it."""
    out = io.StringIO()
    publisher = LogPublisher(LogControl("error").file_observer(out))
    publisher({"log_format": "no level {here}", "here": "at all", "log_time": 0.0})
    assert "no level at all" in out.getvalue()
    # Nor is a level that is not a LogLevel (a hand-made event) judged.
    assert logs.LevelFilter(LogLevel.error)({"log_level": "loud"}) is PredicateResult.maybe
    assert logs.LevelFilter(LogLevel.error)({"log_level": LogLevel.warn}) is PredicateResult.no


@pytest.mark.parametrize(("level", "log_format"), [("verbose", "text"), ("info", "xml")])
def test_bad_level_or_format(level: str, log_format: str) -> None:
    """An unknown level or format is refused in one line naming the choices."""
    with pytest.raises(LogSetupError, match="must be one of"):
        LogControl(level, log_format)
    with pytest.raises(LogSetupError, match="debug, info, warn, error"):
        LogControl().set_level("verbose")


def test_worker_filters_before_encoding() -> None:
    """
    A worker writes Twisted's JSON, only for events at its level: a debug
    event at info is never encoded.  What it writes reads back (as the
    parent reads it) into events the parent's JSON observer writes with
    the same keys as its own.
    """
    wire = io.StringIO()
    control = LogControl("info", "json")
    publisher, log = publisher_to(control.worker_observer(wire))
    some_events(log, publisher)
    records = [r for r in wire.getvalue().split("\x1e") if r.strip()]
    assert len(records) == 5
    assert not any("STLS started" in r for r in records)

    direct, republished = io.StringIO(), io.StringIO()
    direct_publisher, direct_log = publisher_to(control.file_observer(direct))
    some_events(direct_log, direct_publisher)
    parent = control.file_observer(republished)
    for record in records:
        parent(eventFromJSON(record))
    keys = [sorted(json.loads(line)) for line in direct.getvalue().splitlines()]
    assert [sorted(json.loads(line)) for line in republished.getvalue().splitlines()] == keys


# --- JSON lines ------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Each line of C{text} as JSON: it must be one object per line."""
    objects = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(o, dict) for o in objects)
    return objects


def test_json_one_object_per_event_with_the_audit_keys() -> None:
    """
    One JSON object per line per event; an audit event has the keys of its
    text line, the user as the name itself (or null for none).
    """
    out = io.StringIO()
    publisher, log = publisher_to(LogControl("debug", "json").file_observer(out))
    some_events(log, publisher)
    objects = json_lines(out.getvalue())
    assert len(objects) == 6
    audits = [o for o in objects if o["log_namespace"] == "pop3srv.audit"]
    assert [{k: o[k] for k in ("event", "session", "peer", "user", "reason")} for o in audits] == [
        {
            "event": "login-failed",
            "session": "1a2b-7",
            "peer": "192.0.2.7",
            "user": "al",
            "reason": "bad-credentials",
        },
        {
            "event": "login-failed",
            "session": "1a2b-7",
            "peer": "192.0.2.7",
            "user": None,
            "reason": "bad-credentials",
        },
    ]
    first = audits[0]
    assert first["log_level"] == "info"
    assert first["log_text"] == (
        'pop3srv-audit event=login-failed session=1a2b-7 peer=192.0.2.7 user="al" '
        "reason=bad-credentials"
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["log_time"])
    # The text line's keys, no more (audit_event is not in the line).
    assert set(first) - {"log_time", "log_level", "log_namespace", "log_text"} == {
        "event",
        "session",
        "peer",
        "user",
        "reason",
    }
    started = next(o for o in objects if o["log_text"].startswith("Started"))
    assert (started["pid"], started["slot"]) == (4242, 1)
    failure = next(o for o in objects if o["log_level"] == "critical")
    assert failure["log_text"] == "Sweeping the mail spool failed"
    assert "ZeroDivisionError" in failure["log_traceback"]


def test_json_skips_what_text_skips() -> None:
    """An event without a message (nor failure) gives no line, in text or JSON."""
    for log_format in logs.FORMATS:
        out = io.StringIO()
        publisher = LogPublisher(LogControl("info", log_format).file_observer(out))
        publisher({"log_level": LogLevel.info, "log_namespace": "x", "log_time": 0.0, "n": 1})
        assert out.getvalue() == ""


def test_json_never_breaks_a_line_or_raises() -> None:
    """
    Values with newlines, non-ASCII, non-finite numbers, objects, a broken
    format and a broken field give each one ASCII line of JSON.
    """

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no")

        __str__ = __repr__

    out = io.StringIO()
    publisher = LogPublisher(LogControl("info", "json").file_observer(out))
    base = {"log_level": LogLevel.info, "log_namespace": "x", "log_time": 1e9}
    publisher({**base, "log_format": "a {v}", "v": "line\nbreak \u00e9 \udcff"})
    publisher({**base, "log_format": "b {v}", "v": float("nan")})
    publisher({**base, "log_format": "c {v!r}", "v": Unprintable()})
    publisher({**base, "log_format": "d {v:>}", "v": Unprintable()})
    publisher({**base, "log_format": "e {unclosed", "v": 1})
    publisher({**base, "log_format": "f {v} {v.real}", "v": 2})
    publisher({**base, "log_time": "not a time", "log_format": "g"})
    text = out.getvalue()
    assert text.isascii()
    objects = json_lines(text)
    assert len(objects) == 7
    assert objects[0]["v"] == "line\nbreak \u00e9 \udcff"
    assert objects[1]["v"] == "nan"
    assert objects[3]["v"] == "UNFORMATTABLE"
    assert objects[5]["v"] == 2
    assert objects[6]["log_time"] is None


def test_json_fields_are_values_not_their_repr() -> None:
    """
    A field the message shows converted (C{{user!r}}) is the value itself
    in JSON; one that JSON cannot hold is the text the message shows.
    """
    out = io.StringIO()
    _, log = publisher_to(LogControl("info", "json").file_observer(out))
    log.info("Authentication failed for user {username!r} from {where}", username="al", where=b"x")
    (record,) = json_lines(out.getvalue())
    assert record["log_text"] == "Authentication failed for user 'al' from b'x'"
    assert (record["username"], record["where"]) == ("al", "b'x'")


@given(st.text(max_size=300))
def test_audit_user_round_trips_through_json(user: str) -> None:
    """Whatever the user name, the JSON audit object gives it back (cut to 255)."""
    event: LogEvent = {
        "log_format": audit.FORMAT,
        "log_level": LogLevel.info,
        "log_namespace": "pop3srv.audit",
        "log_time": 0.0,
        "event": "login-failed",
        "session": "1-1",
        "peer": "192.0.2.7",
        "user": audit.quote_user(user),
        "reason": "bad-credentials",
    }
    line = event_as_json(event)
    assert line is not None and "\n" not in line
    assert json.loads(line)["user"] == user[:255]


@given(
    st.text(max_size=100) | st.none() | st.integers() | st.lists(st.text('ab :,="-'), max_size=3)
)
def test_key_value_lines_parse_back(value: Any) -> None:
    """
    A value written by L{logs.key_value} has no space or quote unless
    JSON-quoted, and the JSON line gives back what was meant.
    """
    written = logs.key_value(value)
    event: LogEvent = {
        "log_format": "tag a={a} b={b}",
        "log_level": LogLevel.info,
        "log_namespace": "x",
        "log_time": 0.0,
        "a": written,
        "b": "end",
    }
    text = formatEvent(event)
    assert re.fullmatch(r'tag a=("(?:[^"\\]|\\.)*"|[^\s"]+) b=end', text), text
    line = event_as_json(event)
    assert line is not None
    if value is None:
        meant = None
    elif isinstance(value, list):
        meant = ",".join(value)
    else:
        meant = str(value)
    assert json.loads(line)["a"] == meant


# --- where twistd logs ------------------------------------------------------------------


@pytest.fixture
def usr1() -> Iterator[None]:
    """Whatever the test does to SIGUSR1, put it back."""
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, before)


TWISTD_CASES = [
    {"logfile": None, "nodaemon": False},
    {"logfile": None, "nodaemon": True},
    {"logfile": "-", "nodaemon": True},
    {"logfile": "-", "nodaemon": False},
    {"logfile": "pop3.log", "nodaemon": False},
    {"logfile": "pop3.log", "nodaemon": True},
    {"logfile": "pop3.log", "nodaemon": True, "syslog": True, "prefix": "pop3"},
]


@pytest.mark.parametrize("config", TWISTD_CASES)
def test_target_is_where_twistd_would_log(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usr1: None
) -> None:
    """
    For each combination of twistd's options, L{twistd_log_target} chooses
    what twistd's own logger chooses (read from its private parts: this
    fails if Twisted changes its rules or them).
    """
    monkeypatch.chdir(tmp_path)
    twistd = UnixAppLogger(config)
    try:
        observer: Any = twistd._getLogObserver()
    except SystemExit:
        with pytest.raises(LogSetupError, match="--nodaemon"):
            twistd_log_target(config)
        return
    target = twistd_log_target(config)
    if not isinstance(observer, FileLogObserver):
        assert observer.__self__.__class__.__name__ == "SyslogObserver"
        assert target == logs.SYSLOG
        return
    out = observer._outFile
    if out is sys.stdout:
        assert target == logs.STDOUT
    else:
        assert isinstance(out, logfile.LogFile)
        assert os.path.abspath(target) == out.path


def test_log_file_rotates_on_usr1(tmp_path: Path, usr1: None) -> None:
    """
    Our log file is rotated on SIGUSR1, as twistd's is; a handler already
    there is kept.
    """
    logging = TwistdLogging(LogControl(), str(tmp_path / "log"))
    logging.make_observer()
    handler = signal.getsignal(signal.SIGUSR1)
    assert callable(handler)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    TwistdLogging(LogControl(), str(tmp_path / "other")).make_observer()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_attach_sets_the_applications_observer(tmp_path: Path, usr1: None) -> None:
    """
    Attached to twistd's Application, our observer becomes its
    L{ILogObserver} component (once; one already set is kept); a parent
    that is not an Application is left alone.
    """
    config = {"logfile": str(tmp_path / "log"), "nodaemon": True, "logger": None}
    logging = TwistdLogging.for_twistd(config, LogControl("info", "json"))
    assert logging is not None
    application = service.Application("pop3srv")
    assert logging.attach(application)
    observer = application.getComponent(ILogObserver)
    assert observer is logging.observer
    Logger(namespace="t", observer=cast(Any, observer)).info("hello {who}", who="you")
    (line,) = (tmp_path / "log").read_text().splitlines()
    assert json.loads(line)["who"] == "you"

    other = TwistdLogging.for_twistd(config, LogControl())
    assert other is not None
    assert not other.attach(application)
    assert application.getComponent(ILogObserver) is observer
    assert not other.attach(service.MultiService())


def test_not_under_twistd_or_with_its_logger() -> None:
    """Outside twistd, or with twistd's C{--logger}, logging is not ours."""
    assert TwistdLogging.for_twistd(None, LogControl()) is None
    assert TwistdLogging.for_twistd({"logger": lambda: None, "logfile": None}, LogControl()) is None


@pytest.mark.parametrize(
    ("config", "log_format", "message"),
    [
        ({"logfile": "-", "nodaemon": False}, "text", "a daemon cannot log to standard output"),
        ({"logfile": None, "syslog": True, "nodaemon": True}, "json", "not to --syslog"),
    ],
)
def test_impossible_combinations(config: dict[str, Any], log_format: str, message: str) -> None:
    """Options that cannot work together are refused in one line."""
    with pytest.raises(LogSetupError, match=message):
        TwistdLogging.for_twistd(config, LogControl("info", log_format))


# --- the start-up line -------------------------------------------------------------------


def test_startup_summary() -> None:
    """
    The start-up line names the version, config file, listeners, checkers,
    user count and certificate, as a key=value line; in JSON, by those keys.
    """
    events: list[LogEvent] = []
    text = startup_summary(
        version="1.2.3",
        config="/etc/pop3srv/pop3 srv.toml",
        listen=["tcp:110", "systemd:domain=INET6:name=pop3"],
        listen_tls=[],
        checkers=["passlib:/etc/pop3srv/users"],
        users=12,
        cert_subject="CN=mail.example.org,O=Example Inc",
        cert_not_after=datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        logger=Logger(observer=cast(Any, events.append)),
    )
    assert text == (
        'pop3srv-start version=1.2.3 config="/etc/pop3srv/pop3 srv.toml" '
        "listen=tcp:110,systemd:domain=INET6:name=pop3 listen_tls=- "
        "auth=passlib:/etc/pop3srv/users users=12 "
        'cert_subject="CN=mail.example.org,O=Example Inc" cert_expires=2030-01-02T03:04:05Z'
    )
    (event,) = events
    assert formatEvent(event) == text
    line = event_as_json(event)
    assert line is not None
    record = json.loads(line)
    assert record["config"] == "/etc/pop3srv/pop3 srv.toml"
    assert record["listen_tls"] is None
    assert record["users"] == 12
    assert record["cert_subject"] == "CN=mail.example.org,O=Example Inc"
    assert record["cert_expires"] == "2030-01-02T03:04:05Z"


def test_startup_summary_without_tls_or_file() -> None:
    """No config file, certificate or user count: each is C{-}."""
    text = startup_summary(
        version="1.2.3",
        config=None,
        listen=["tcp:110"],
        listen_tls=[],
        checkers=["unix"],
        users=None,
        cert_subject=None,
        cert_not_after=None,
        logger=Logger(observer=cast(Any, lambda e: None)),
    )
    assert text.endswith(
        "config=- listen=tcp:110 listen_tls=- auth=unix users=- cert_subject=- cert_expires=-"
    )


# --- the certificate expiry warning --------------------------------------------------------

DAY = 86400.0


def expiry_events(log_events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in log_events if "TLS certificate" in formatEvent(e)]


def test_certificate_warning_at_start_and_daily(log_events: list[LogEvent]) -> None:
    """
    A certificate within 14 days of its end is warned about at start-up and
    once a day; the certificate asked for each time is the current one, so
    a renewed one stops the warnings; an expired one is an error.
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    now = datetime.datetime.fromtimestamp(clock.seconds(), UTC)
    current = [now + datetime.timedelta(days=10)]
    warning = CertificateExpiryWarning(lambda: current[0], clock)
    warning.startService()
    (first,) = expiry_events(log_events)
    assert first["log_level"] is LogLevel.warn
    assert first["days_left"] == 10.0
    assert "expires in 10.0 days" in formatEvent(first)

    clock.advance(DAY - 1)
    assert len(expiry_events(log_events)) == 1
    clock.advance(1)
    assert len(expiry_events(log_events)) == 2
    assert expiry_events(log_events)[-1]["days_left"] == 9.0

    current[0] = now + datetime.timedelta(days=90)  # renewed and reloaded
    clock.advance(DAY)
    assert len(expiry_events(log_events)) == 2

    current[0] = now - datetime.timedelta(days=1)
    clock.advance(DAY)
    last = expiry_events(log_events)[-1]
    assert last["log_level"] is LogLevel.error
    assert "expired" in formatEvent(last)

    warning.stopService()
    clock.advance(DAY * 3)
    assert len(expiry_events(log_events)) == 3
    assert not clock.getDelayedCalls()


def test_certificate_far_from_expiry_is_quiet(log_events: list[LogEvent]) -> None:
    """Fifteen days left (and a naive UTC date, as older cryptography gives) is no news."""
    clock = Clock()
    clock.advance(1_700_000_000)
    end = datetime.datetime.fromtimestamp(clock.seconds() + 15 * DAY, UTC).replace(tzinfo=None)
    warning = CertificateExpiryWarning(lambda: end, clock)
    assert warning.check() == pytest.approx(15.0)
    warning.startService()
    warning.stopService()
    assert expiry_events(log_events) == []


def test_certificate_check_survives_an_error(log_events: list[LogEvent]) -> None:
    """A failure to tell the expiry is logged, and the daily checks go on."""
    clock = Clock()
    answers: list[Any] = [OSError("gone"), None]
    calls: list[int] = []

    def not_after() -> datetime.datetime | None:
        calls.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return cast(datetime.datetime | None, answer)

    warning = CertificateExpiryWarning(not_after, clock)
    warning.startService()
    clock.advance(DAY)
    assert len(calls) == 2
    assert any("Cannot tell when" in formatEvent(e) for e in log_events)
    warning.stopService()


# --- real twistd runs ----------------------------------------------------------------------

PROBE_PLUGIN = """
from twisted.application.service import ServiceMaker

probe = ServiceMaker("logprobe", "logprobe_tap", "Logs a few events and stops.", "logprobe")
"""

PROBE_TAP = """
from twisted.application import service
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.python import usage

from pop3srv.app.logs import LogControl, LogSetupError, TwistdLogging
from pop3srv.server.audit import audit

log = Logger(namespace="probe")


class Options(usage.Options):
    optParameters = [["log-level", None, "info"], ["log-format", None, "text"]]
    optFlags = [["twistd-logging", None, "leave logging to twistd"]]


class Probe(service.MultiService):
    # As pop3srv's top service does: twistd hands it the Application.
    def __init__(self, logging):
        super().__init__()
        self.logging = logging

    def setServiceParent(self, parent):
        if self.logging is not None:
            self.logging.attach(parent)
        super().setServiceParent(parent)

    def startService(self):
        super().startService()
        log.debug("probe debug {n}", n=1)
        log.info("probe info {n}", n=2)
        audit("login-failed", session="1a-1", peer="192.0.2.7", reason="bad-credentials",
              user="al")
        print("printed to stdout")
        reactor.callLater(0, reactor.stop)


def makeService(options):
    # Logged before twistd begins logging: buffered, then replayed.
    log.info("built {what}", what="the probe")
    control = LogControl(options["log-level"], options["log-format"])
    try:
        logging = (
            None if options["twistd-logging"]
            else TwistdLogging.for_twistd(options.parent, control)
        )
    except LogSetupError as e:
        raise SystemExit(f"twistd logprobe: {e}")
    return Probe(logging)
"""


@pytest.fixture
def probe(tmp_path: Path) -> dict[str, str]:
    """A twistd plugin, C{logprobe}, that logs through L{pop3srv.app.logs}."""
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "logprobe.py").write_text(textwrap.dedent(PROBE_PLUGIN))
    (tmp_path / "logprobe_tap.py").write_text(textwrap.dedent(PROBE_TAP))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def run_probe(
    env: dict[str, str], cwd: Path, *argv: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_twistd_writes_json_from_the_first_line(probe: dict[str, str], tmp_path: Path) -> None:
    """
    A real C{twistd --logfile FILE} run of a plugin using
    L{TwistdLogging}: every line of the file is a JSON object, from
    twistd's own "starting up" and the events logged while the service was
    built, to "Server Shut Down."; the debug event is not there; the audit
    event has its keys; the reactor's and stdout's events are there.
    """
    log = tmp_path / "probe.log"
    result = run_probe(
        probe, tmp_path, "-n", "--pidfile=", f"--logfile={log}", "logprobe", "--log-format", "json"
    )
    assert result.returncode == 0, result.stderr
    objects = json_lines(log.read_text())
    texts = [o["log_text"] for o in objects]
    assert texts[0] == "built the probe"
    assert texts[1].startswith("twistd ") and texts[1].endswith("starting up.")
    assert "probe info 2" in texts
    assert "printed to stdout" in texts
    assert texts[-1] == "Server Shut Down."
    assert not any("probe debug" in t for t in texts)
    (audited,) = [o for o in objects if o["log_namespace"] == "pop3srv.audit"]
    assert audited["user"] == "al" and audited["event"] == "login-failed"


def test_twistd_debug_level_to_stdout(probe: dict[str, str], tmp_path: Path) -> None:
    """
    As under systemd (C{--nodaemon --logfile=-}): JSON lines on standard
    output, the debug event included at C{--log-level debug}.
    """
    result = run_probe(
        probe,
        tmp_path,
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        "logprobe",
        "--log-format",
        "json",
        "--log-level",
        "debug",
    )
    assert result.returncode == 0, result.stderr
    texts = [o["log_text"] for o in json_lines(result.stdout)]
    assert "probe debug 1" in texts
    assert texts[-1] == "Server Shut Down."


def test_twistd_text_is_unchanged_but_for_debug(probe: dict[str, str], tmp_path: Path) -> None:
    """
    The text log at info is twistd's own, line for line, less the debug
    line (timestamps and the pid-bearing lines aside).
    """
    lines: dict[bool, list[str]] = {}
    for ours in (True, False):
        log = tmp_path / f"probe-{ours}.log"
        flags = [] if ours else ["--twistd-logging"]
        result = run_probe(
            probe, tmp_path, "-n", "--pidfile=", f"--logfile={log}", "logprobe", *flags
        )
        assert result.returncode == 0, result.stderr
        lines[ours] = [re.sub(r"^\S+ ", "", line) for line in log.read_text().splitlines()]
    assert any("probe debug 1" in line for line in lines[False])
    assert lines[True] == [line for line in lines[False] if "probe debug" not in line]
    assert any('user="al"' in line for line in lines[True])


def test_twistd_daemon_logs_json_to_its_file(probe: dict[str, str], tmp_path: Path) -> None:
    """
    As a daemon the log file is opened before twistd detaches (and closes
    standard output): the daemon's events reach it.
    """
    log = tmp_path / "daemon.log"
    result = run_probe(
        probe,
        tmp_path,
        f"--pidfile={tmp_path}/pid",
        f"--logfile={log}",
        "logprobe",
        "--log-format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "Server Shut Down." not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.05)
    texts = [o["log_text"] for o in json_lines(log.read_text())]
    assert "probe info 2" in texts
    assert texts[-1] == "Server Shut Down."


def test_twistd_refuses_a_daemon_logging_to_stdout(probe: dict[str, str], tmp_path: Path) -> None:
    """A daemon told to log to standard output stops at once, in one line."""
    result = run_probe(
        probe,
        tmp_path,
        f"--pidfile={tmp_path}/pid",
        "--logfile=-",
        "logprobe",
        "--log-format",
        "json",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "twistd logprobe: a daemon cannot log to standard output (--logfile=-); add --nodaemon"
    ]


# --- the real twistd pop3srv -----------------------------------------------------------------

needs_wiring = pytest.mark.skipif(
    "log_format" not in SETTINGS or "log_level" not in SETTINGS,
    reason="--log-level and --log-format are not wired into pop3srv.app.config yet",
)


def both_processes_log_in(srv: Pop3Server) -> set[str]:
    """
    Log in alice and bob at once until the sessions of both processes have
    been seen (the pid is the first part of a session id); their pids.
    """
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        clients = []
        for user, password in PASSWORDS.items():
            client = poplib.POP3("127.0.0.1", srv.port, timeout=20)
            client.user(user)
            client.pass_(password)
            clients.append(client)
        for client in clients:
            client.quit()
        time.sleep(0.1)
        seen = {
            o["session"].split("-")[0]
            for o in json_lines(srv.log_text())
            if o.get("event") == "login-ok"
        }
    return seen


@needs_wiring
@pytest.mark.parametrize("level", ["info", "debug"])
def test_pop3srv_json_log_with_workers(tmp_path: Path, level: str) -> None:
    """
    C{twistd pop3srv --log-format json --workers 2}: one JSON object per
    line, its own events and its worker's alike (published again by the
    parent, formatted once), audit events with their keys; the checker's
    debug line for a wrong password only at C{--log-level debug}.
    """
    srv = Pop3Server(tmp_path, "--workers", "2", "--log-format", "json", "--log-level", level)
    for name in PASSWORDS:
        write_mbox(srv.mail / name, [b"Subject: hello\n\nfor %s\n" % name.encode()])
    srv.start()
    try:
        assert len(both_processes_log_in(srv)) == 2, srv.log_text()
        with pytest.raises(poplib.error_proto):
            client = poplib.POP3("127.0.0.1", srv.port, timeout=20)
            client.user("alice")
            client.pass_("wrong")
    finally:
        srv.stop()
    objects = json_lines(srv.log_text())
    assert any(o["log_text"].endswith(" starting up.") for o in objects)
    assert objects[-1]["log_text"] == "Server Shut Down."
    failed = [o for o in objects if o.get("event") == "login-failed"]
    assert len(failed) == 1
    assert failed[0]["user"] == "alice" and failed[0]["peer"] == "127.0.0.1"
    debug = [o for o in objects if o["log_level"] == "debug"]
    if level == "info":
        assert debug == []
    else:
        assert any("Authentication failed for user 'alice'" in o["log_text"] for o in debug)


@needs_wiring
def test_pop3srv_text_log_at_info_has_no_debug(tmp_path: Path) -> None:
    """By default the log is text, as before, without the debug lines."""
    srv = Pop3Server(tmp_path)
    srv.start()
    try:
        with pytest.raises(poplib.error_proto):
            client = poplib.POP3("127.0.0.1", srv.port, timeout=20)
            client.user("alice")
            client.pass_("wrong")
    finally:
        srv.stop()
    text = srv.log_text()
    assert re.search(
        r'\[pop3srv\.audit#info\] pop3srv-audit event=login-failed .* user="alice"', text
    )
    assert "#debug]" not in text
    assert "Authentication failed for user" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def short_lived_certificate(directory: Path, days: float) -> tuple[Path, Path]:
    """A self-signed certificate for localhost that ends in C{days} days, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@needs_wiring
@pytest.mark.skipif(
    not hasattr(TLSContextSource, "certificate"),
    reason="TLSContextSource.certificate (for the start-up line) is not there yet",
)
def test_pop3srv_startup_line_and_certificate_warning(tmp_path: Path) -> None:
    """
    C{twistd pop3srv} logs, once, the start-up line (version, listeners,
    checker, user count, certificate), and a warning for a certificate that
    ends within 14 days; in JSON, by their keys.
    """
    import pop3srv

    cert, key = short_lived_certificate(tmp_path, days=10)
    srv = Pop3Server(
        tmp_path,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--workers",
        "2",
        "--log-format",
        "json",
    )
    srv.start()
    try:
        assert wait_for_text(srv, "expires in")
    finally:
        srv.stop()
    objects = json_lines(srv.log_text())
    (start,) = [o for o in objects if o["log_text"].startswith("pop3srv-start ")]
    assert start["version"] == pop3srv.__version__
    assert start["listen"] == f"tcp:{srv.port}:interface=127.0.0.1"
    assert start["auth"] == f"passlib:{srv.users}"
    assert start["users"] == len(PASSWORDS)
    assert start["cert_subject"] == "CN=localhost"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", start["cert_expires"])
    (warning,) = [o for o in objects if "expires in" in o["log_text"]]
    assert warning["log_level"] == "warn"
    assert 9.9 <= warning["days_left"] <= 10.0
    assert warning["expires"] == start["cert_expires"]


def wait_for_text(srv: Pop3Server, text: str, timeout: float = 20.0) -> bool:
    """Whether C{text} turns up in the server's log within C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in srv.log_text():
            return True
        time.sleep(0.05)
    return False
