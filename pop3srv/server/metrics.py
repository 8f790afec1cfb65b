# -*- test-case-name: tests.test_metrics -*-
"""
What a server process counts for C{--metrics} and C{pop3srv stats}, and
how the numbers are written for Prometheus.

The registry itself, L{ProcessMetrics}, is L{pop3srv.core.metrics} (below
every layer, so the mbox and process code count there too); this module
adds what needs Twisted:

  - L{EventCounter}, a log observer that counts the audit events (logins,
    lockouts, limit hits, refused connections) and the session summaries
    (sessions, RETR, TOP, DELE, octets sent) this process logs.  The log
    lines are the record; counting from their events means a metric can
    never disagree with the log, and needs no hook in the protocol or the
    login service.
  - L{start_counting}: what each server process calls once, as it builds
    its service: count its events, watch its sessions and certificate.
  - L{render_prometheus}: a snapshot (one process's, or the sum of all of
    them, L{merge}) in the Prometheus text format, by C{prometheus_client}.

One L{ProcessMetrics} per process, L{PROCESS}.  A worker is a fork of the
parent, so it starts with a copy of the parent's numbers and observers:
L{start_counting} with C{forked=True} clears them.  The parent publishes
its workers' log events again in its own log; those are not counted here
(each worker counts its own, and the parent adds the workers' snapshots
to its own when asked), or every worker event would count twice.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet import defer
from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

import twisted
from pop3srv import __version__
from pop3srv.core.metrics import (
    BUILD_INFO,
    CERT_EXPIRY,
    CONNECTIONS_REFUSED,
    LIMIT_HITS,
    LOCKOUTS,
    LOGIN_FAILURES,
    LOGIN_REFUSALS,
    LOGINS,
    MESSAGE_COMMANDS,
    METRIC_ERRORS,
    OCTETS_SENT,
    PROCESS,
    SESSIONS,
    SESSIONS_OPEN,
    ProcessMetrics,
    Readings,
    merge,
    render_text,
)
from pop3srv.server.tls import TLSContextSource

__all__ = [
    "AUDIT_NAMESPACE",
    "PROCESS",
    "SESSION_NAMESPACE",
    "EventCounter",
    "ProcessMetrics",
    "local_snapshot",
    "merge",
    "render_prometheus",
    "render_text",
    "start_counting",
]

#: Where the audit events are logged (L{pop3srv.server.audit}).
AUDIT_NAMESPACE = "pop3srv.audit"
#: Where the session summaries are logged (L{pop3srv.server.sessions}).
SESSION_NAMESPACE = "pop3srv.session"
#: The method label of a login whose event does not name one.
UNKNOWN = "unknown"

#: The session summary's keys (L{pop3srv.server.sessions.FORMAT}) for the
#: counts of its commands; a missing count is C{-}.
_COMMAND_KEYS = {"RETR": "retr", "TOP": "top", "DELE": "dele"}


def _tls_label(value: object) -> str:
    """C{yes} if a session's C{tls} field names a protocol, else C{no}."""
    return "no" if value in (None, "", "-", "none") else "yes"


def _number(value: object) -> float:
    """A count from an event: a number, or text of one (a worker's event); else 0."""
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value) if value >= 0 else 0.0
    try:
        number = float(str(value))
    except ValueError:
        return 0.0
    return number if number >= 0 else 0.0


@implementer(ILogObserver)
class EventCounter:
    """
    Counts this process's audit events and session summaries into a
    L{ProcessMetrics}.  Never raises: an observer that raised would be
    logged by the publisher, once per event.
    """

    _log = Logger()

    def __init__(self, metrics: ProcessMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: LogEvent) -> None:
        # An event a worker logged, published again by the parent, carries
        # its logger only as JSON's placeholder; ours carry the Logger.
        if not isinstance(event.get("log_logger"), Logger):
            return
        namespace = event.get("log_namespace")
        try:
            if namespace == AUDIT_NAMESPACE and "audit_event" in event:
                self.audit(event)
            elif namespace == SESSION_NAMESPACE and event.get("session_summary"):
                self.session_ended(event)
        except Exception:
            # Counted, not logged: this observer would see that event too.
            self.metrics.inc(METRIC_ERRORS, metric="events")

    def audit(self, event: Mapping[str, Any]) -> None:
        """Count one audit event (L{pop3srv.server.audit.audit})."""
        kind = event["audit_event"]
        reason = str(event.get("reason", ""))
        count = self.metrics.inc
        # The login method is a field of the event, not of the line.
        method = str(event.get("method") or UNKNOWN)
        if kind == "login-ok":
            if method == UNKNOWN:
                # The reason: "password", or "password+app:LABEL" for an app
                # password (the label is the user's, so not a label of ours).
                method = reason.split("+", 1)[0] or UNKNOWN
            count(LOGINS, result="ok", method=method)
        elif kind == "login-failed":
            count(LOGINS, result="failed", method=method)
            count(LOGIN_FAILURES, reason=reason)
        elif kind == "login-refused":
            # A server fault is never a wrong password, nor a refusal.
            result = "error" if reason == "error" else "refused"
            count(LOGINS, result=result, method=method)
            count(LOGIN_REFUSALS, reason=reason)
        elif kind == "lockout":
            count(LOCKOUTS, scope=reason)
        elif kind == "limit-hit":
            count(LIMIT_HITS, reason=reason)
        elif kind == "connection-refused":
            count(CONNECTIONS_REFUSED, reason=reason)

    def session_ended(self, event: Mapping[str, Any]) -> None:
        """Count one session summary (L{pop3srv.server.sessions})."""
        count = self.metrics.inc
        count(
            SESSIONS,
            listener=str(event.get("listener") or UNKNOWN),
            tls=_tls_label(event.get("tls")),
            ended=str(event.get("end") or UNKNOWN),
        )
        for command, key in _COMMAND_KEYS.items():
            times = _number(event.get(key))
            if times:
                count(MESSAGE_COMMANDS, times, command=command)
        sent = _number(event.get("retr_octets"))
        if sent:
            count(OCTETS_SENT, sent)


class _Sessions(Protocol):
    """What L{start_counting} reads of a session table."""

    def list(self) -> list[Any]: ...


#: The listener and TLS label sets of the sessions a process without TLS
#: can have, and those it can have with TLS (STLS, implicit TLS).
PLAIN_SESSIONS: tuple[tuple[str, str], ...] = (("pop3", "no"),)
TLS_SESSIONS: tuple[tuple[str, str], ...] = (("pop3", "no"), ("pop3", "yes"), ("pop3s", "yes"))


def sessions_open(
    sessions: _Sessions, known: Iterable[tuple[str, str]] = PLAIN_SESSIONS
) -> Readings:
    """
    The sessions open in C{sessions}, per listener and TLS yes/no.

    @param known: the C{(listener, tls)} label sets read as 0 when no
        session has them, so that a monitor sees 0 rather than no series.
    """
    counted = Counter(dict.fromkeys(known, 0))
    counted.update((s.listener, _tls_label(s.tls)) for s in sessions.list())
    return [({"listener": listener, "tls": tls}, n) for (listener, tls), n in counted.items()]


def certificate_expiry(tls: TLSContextSource) -> Readings:
    """
    When the certificate new handshakes get from C{tls} expires, in
    seconds since the epoch: read each time, so a reloaded one counts at
    once.
    """
    return [({}, tls.certificate.not_valid_after_utc.timestamp())]


_counter = EventCounter(PROCESS)
_unwatch: list[Callable[[], None]] = []


def start_counting(
    *,
    sessions: _Sessions | None = None,
    tls: TLSContextSource | None = None,
    forked: bool = False,
    publisher: LogPublisher = globalLogPublisher,
) -> None:
    """
    Make this server process count into L{PROCESS}: its log events, the
    sessions of C{sessions}, the expiry of C{tls}'s certificate, and its
    build.  Called again (a new service in the same process), it replaces
    what the last call watched.

    @param sessions: the process's session table, if any.
    @param tls: the process's TLS context source, if any.
    @param forked: this process is a fork of a server process (a worker):
        forget the numbers and watches copied from the parent first.
    @param publisher: where this process's log events are published.
    """
    if forked:
        PROCESS.reset()
        _unwatch.clear()
    while _unwatch:
        _unwatch.pop()()
    # A worker's log set-up replaced the parent's observers, this one too.
    publisher.removeObserver(_counter)
    publisher.addObserver(_counter)
    PROCESS.set(
        BUILD_INFO,
        1,
        version=__version__,
        python=platform.python_version(),
        twisted=twisted.__version__,
    )
    if sessions is not None:
        table = sessions
        known = PLAIN_SESSIONS if tls is None else TLS_SESSIONS
        _unwatch.append(PROCESS.watch(SESSIONS_OPEN, lambda: sessions_open(table, known)))
    if tls is not None:
        source = tls
        _unwatch.append(PROCESS.watch(CERT_EXPIRY, lambda: certificate_expiry(source)))


def local_snapshot() -> defer.Deferred[dict[str, Any]]:
    """
    This process's snapshot, as the gathering functions answer (for a
    server of one process, whose numbers are all here).
    """
    return defer.succeed(PROCESS.snapshot())


class _SnapshotCollector:
    """A C{prometheus_client} collector that yields one snapshot's metrics."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, entry in self.snapshot["metrics"].items():
            labels, doc, kind = entry["labels"], entry["help"], entry["type"]
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, doc, labels=labels)
                for values, value in entry["samples"]:
                    family.add_metric(values, value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, doc, labels=labels)
                for values, value in entry["samples"]:
                    family.add_metric(values, value)
            elif kind == "histogram":
                histogram = HistogramMetricFamily(name, doc, labels=labels)
                bounds = [floatToGoString(b) for b in entry["buckets"]] + ["+Inf"]
                for values, value in entry["samples"]:
                    cumulative, buckets = 0, []
                    for bound, n in zip(bounds, value["counts"], strict=True):
                        cumulative += n
                        buckets.append((bound, cumulative))
                    histogram.add_metric(values, buckets, value["sum"])
                family = histogram
            else:
                continue  # a kind a newer process knows: left out
            yield family


def render_prometheus(snapshot: Mapping[str, Any]) -> bytes:
    """
    A snapshot (L{ProcessMetrics.snapshot}, or a L{merge} of several) in
    the Prometheus text exposition format, as
    C{prometheus_client.exposition.CONTENT_TYPE_LATEST} names it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)
