# -*- test-case-name: tests.test_metrics -*-
"""
The numbers one server process keeps about itself: counters, gauges and
histograms, in a registry that every layer may feed.

This module sits in the core, below everything, because the mbox code
(index scans, commits) and the process code (the hashing queue) count
here as well as the server's glue, and neither may import
L{pop3srv.server}; it imports nothing but the standard library.  The
Twisted side (counting log events, the Prometheus text, the HTTP
endpoint) is L{pop3srv.server.metrics} and L{pop3srv.app.metricsweb}.

Every metric is declared once, below, as a L{Metric}; code counts with the
declaration (C{PROCESS.inc(INDEX_SCANS, kind="full")}), so a misspelt
name fails at import and a wrong label set at the first count.  Some
gauges are not counted but read when a snapshot is taken, from a function
given to L{ProcessMetrics.watch} (the sessions open, the hashing queue).

A snapshot (L{ProcessMetrics.snapshot}) is plain JSON and describes
itself (type, help, labels, buckets), so that the parent of C{--workers}
can add its children's snapshots to its own (L{merge}) and render the sum
without knowing what each process counted.  Counters add up; a gauge says
how it combines (C{sum}: the sessions open in all; C{min}: the soonest
certificate expiry; C{max}: build info); histograms add bucket by bucket.

Counts come from the reactor thread and from worker threads (index scans
and commits run in a thread pool): every change takes one lock.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
Combine = Literal["sum", "min", "max"]
#: Label values in a metric's label order.
LabelValues = tuple[str, ...]
#: What a watch function returns: per label set (a mapping of label name
#: to value), the gauge's value.
Readings = Iterable[tuple[Mapping[str, str], float]]

#: The format of a snapshot, for a reader to refuse one it does not know.
SNAPSHOT_FORMAT = 1
#: Longest label value kept; the rest is cut.  Label values come from our
#: own code (reasons, methods, listener names), never from a client, but a
#: bound keeps one mistake from bloating every scrape.
MAX_LABEL_VALUE = 64
#: Most label sets one metric keeps; later new ones are counted under
#: C{other} in every label.
MAX_SERIES = 200
OTHER = "other"


@dataclass(frozen=True)
class Metric:
    """
    The declaration of one metric.

    @ivar name: its Prometheus name; a counter's ends with C{_total}.
    @ivar kind: C{counter}, C{gauge} or C{histogram}.
    @ivar help: one line for the exposition's C{HELP}.
    @ivar labels: its label names, in order.
    @ivar buckets: a histogram's upper bounds, ascending (C{+Inf} implied).
    @ivar combine: how the values of several processes combine (gauges;
        counters and histograms always add).
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    combine: Combine = "sum"


#: Seconds: from a cheap hash, through a queue, to a hung hashing process's time-out.
_CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds: the tail of a big mbox to a cold scan of a very big one.
_SCAN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

BUILD_INFO = Metric(
    "pop3srv_build_info",
    "gauge",
    "Always 1; the labels name the versions of pop3srv, Python and Twisted.",
    ("version", "python", "twisted"),
    combine="max",
)
PROCESSES = Metric(
    "pop3srv_processes",
    "gauge",
    "Server processes whose numbers these are: the parent and its running workers (one "
    "late to answer counted with its last numbers).",
)
SESSIONS_OPEN = Metric(
    "pop3srv_sessions_open",
    "gauge",
    "Sessions open now, by listener (pop3, pop3s) and whether TLS is on (0 for the "
    "combinations the server can have).",
    ("listener", "tls"),
)
SESSIONS = Metric(
    "pop3srv_sessions_total",
    "counter",
    "Sessions ended, by listener, whether TLS was on, and how they ended.",
    ("listener", "tls", "ended"),
)
LOGINS = Metric(
    "pop3srv_logins_total",
    "counter",
    "Logins, by result (ok, failed, refused, error) and method (unknown where the log "
    "does not say).",
    ("result", "method"),
)
LOGIN_FAILURES = Metric(
    "pop3srv_login_failures_total",
    "counter",
    "Failed logins (the client's credentials were wrong), by reason.",
    ("reason",),
)
LOGIN_REFUSALS = Metric(
    "pop3srv_login_refusals_total",
    "counter",
    "Logins refused without a verdict on the credentials (lockout, busy, server fault), by reason.",
    ("reason",),
)
LOCKOUTS = Metric(
    "pop3srv_lockouts_total",
    "counter",
    "Lockouts started, by scope.",
    ("scope",),
)
LIMIT_HITS = Metric(
    "pop3srv_limit_hits_total",
    "counter",
    "Limits hit (the audit log's limit-hit events), by reason: connections refused by a "
    "connection limit (max-connections, max-connections-per-address) and sessions ended by "
    "a limit (auth-timeout, tls-handshake-timeout, write-stall, bad-commands).",
    ("reason",),
)
CONNECTIONS_REFUSED = Metric(
    "pop3srv_connections_refused_total",
    "counter",
    "Connections refused before the greeting other than by a connection limit (the audit "
    "log's connection-refused events), by reason: ip-rules (allow, deny) or error (the "
    "connection could not be counted). Connection limits count in pop3srv_limit_hits_total.",
    ("reason",),
)
OCTETS_SENT = Metric(
    "pop3srv_octets_sent_total",
    "counter",
    "Octets of RETR responses sent (after the status line, as written: dot-stuffed, CRLF).",
)
MESSAGE_COMMANDS = Metric(
    "pop3srv_message_commands_total",
    "counter",
    "RETR, TOP and DELE commands carried out, by command.",
    ("command",),
)
COMMIT_FAILURES = Metric(
    "pop3srv_commit_failures_total",
    "counter",
    "Commits of deletions that failed, by reason (changed: the mbox changed under the "
    "session, nothing deleted; error: failed before the journal, nothing deleted; "
    "deferred: journalled, finished at the next open).",
    ("reason",),
)
JOURNALS_PENDING = Metric(
    "pop3srv_journals_pending",
    "gauge",
    "Commit journals written and not yet removed by the commits in progress.",
)
JOURNALS_RECOVERED = Metric(
    "pop3srv_journals_recovered_total",
    "counter",
    "Journals of interrupted commits found when a maildrop was opened, by outcome "
    "(applied, set-aside: no longer matching the mbox, kept for an admin).",
    ("outcome",),
)
HASH_QUEUE = Metric(
    "pop3srv_hash_queue_depth",
    "gauge",
    "Password checks waiting for a free hashing process.",
)
HASH_CHECK_SECONDS = Metric(
    "pop3srv_hash_check_seconds",
    "histogram",
    "Seconds from asking for a password check to its answer, queueing included.",
    buckets=_CHECK_BUCKETS,
)
INDEX_SCANS = Metric(
    "pop3srv_index_scans_total",
    "counter",
    "Scans of an mbox to bring its index up to date, by kind (full, or append: only "
    "the mail added since).",
    ("kind",),
)
INDEX_SCAN_SECONDS = Metric(
    "pop3srv_index_scan_seconds",
    "histogram",
    "Seconds an index scan took, by kind.",
    ("kind",),
    buckets=_SCAN_BUCKETS,
)
CERT_EXPIRY = Metric(
    "pop3srv_tls_certificate_expiry_timestamp_seconds",
    "gauge",
    "When the TLS certificate new handshakes present expires (seconds since the epoch; "
    "the soonest of all processes).",
    combine="min",
)
METRIC_ERRORS = Metric(
    "pop3srv_metric_errors_total",
    "counter",
    "Counts lost and gauges not read because of a bug, by metric (or events).",
    ("metric",),
)

#: Every metric, in the order of the exposition.
METRICS: tuple[Metric, ...] = (
    BUILD_INFO,
    PROCESSES,
    SESSIONS_OPEN,
    SESSIONS,
    LOGINS,
    LOGIN_FAILURES,
    LOGIN_REFUSALS,
    LOCKOUTS,
    LIMIT_HITS,
    CONNECTIONS_REFUSED,
    OCTETS_SENT,
    MESSAGE_COMMANDS,
    COMMIT_FAILURES,
    JOURNALS_PENDING,
    JOURNALS_RECOVERED,
    HASH_QUEUE,
    HASH_CHECK_SECONDS,
    INDEX_SCANS,
    INDEX_SCAN_SECONDS,
    CERT_EXPIRY,
    METRIC_ERRORS,
)


class _Histogram:
    """One histogram series: a count per bucket (not cumulative), sum and count."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0
        self.count = 0


def _combine(how: Combine, a: float, b: float) -> float:
    if how == "min":
        return min(a, b)
    if how == "max":
        return max(a, b)
    return a + b


class ProcessMetrics:
    """
    This process's metrics.  One per process: L{PROCESS}.

    Counting never raises for a value: a label set beyond L{MAX_SERIES} is
    folded into C{other}; a wrong label I{name}, or a count on a metric of
    the wrong kind, is a bug and raises L{ValueError}.
    """

    def __init__(self, metrics: Sequence[Metric] = METRICS) -> None:
        self.metrics = tuple(metrics)
        self._lock = threading.Lock()
        self._values: dict[Metric, dict[LabelValues, float]] = {}
        self._histograms: dict[Metric, dict[LabelValues, _Histogram]] = {}
        self._watches: list[tuple[Metric, Callable[[], Readings]]] = []
        self.reset()

    def reset(self) -> None:
        """
        Start again from nothing: no counts, no watches.  A forked server
        process calls this first, so that it reports its own numbers, not
        a copy of its parent's (which the parent reports itself).
        """
        # A new lock too: a fork may have copied the old one held by a
        # thread that does not exist in the child.
        self._lock = threading.Lock()
        self._values = {m: {} for m in self.metrics if m.kind != "histogram"}
        self._histograms = {m: {} for m in self.metrics if m.kind == "histogram"}
        self._watches = []
        if PROCESSES in self._values:
            self._values[PROCESSES][()] = 1

    # --- counting ---------------------------------------------------------------------

    def _key(
        self, metric: Metric, labels: Mapping[str, str], series: Mapping[Any, Any]
    ) -> LabelValues:
        if set(labels) != set(metric.labels):
            raise ValueError(
                f"{metric.name} takes labels ({', '.join(metric.labels)}), "
                f"not ({', '.join(sorted(labels))})"
            )
        key = tuple(str(labels[name])[:MAX_LABEL_VALUE] for name in metric.labels)
        if key not in series and len(series) >= MAX_SERIES:
            return tuple(OTHER for _ in metric.labels)
        return key

    def _series(self, metric: Metric, *kinds: Kind) -> dict[LabelValues, float]:
        if metric.kind not in kinds:
            raise ValueError(f"{metric.name} is a {metric.kind}")
        try:
            return self._values[metric]
        except KeyError:
            raise ValueError(f"{metric.name} is not kept here") from None

    def inc(self, metric: Metric, amount: float = 1.0, /, **labels: str) -> None:
        """Add C{amount} (at least 0 for a counter) to a counter or gauge."""
        if metric.kind == "counter" and amount < 0:
            raise ValueError(f"{metric.name} is a counter: it cannot go down")
        with self._lock:
            series = self._series(metric, "counter", "gauge")
            key = self._key(metric, labels, series)
            series[key] = series.get(key, 0) + amount

    def dec(self, metric: Metric, amount: float = 1.0, /, **labels: str) -> None:
        """Take C{amount} from a gauge."""
        with self._lock:
            series = self._series(metric, "gauge")
            key = self._key(metric, labels, series)
            series[key] = series.get(key, 0) - amount

    def set(self, metric: Metric, value: float, /, **labels: str) -> None:
        """Set a gauge."""
        with self._lock:
            series = self._series(metric, "gauge")
            series[self._key(metric, labels, series)] = value

    def observe(self, metric: Metric, value: float, /, **labels: str) -> None:
        """Count one observation of C{value} in a histogram."""
        if metric.kind != "histogram":
            raise ValueError(f"{metric.name} is a {metric.kind}")
        with self._lock:
            series = self._histograms[metric]
            key = self._key(metric, labels, series)
            h = series.get(key)
            if h is None:
                h = series[key] = _Histogram(len(metric.buckets))
            # The first bucket whose bound is at least the value ("le").
            h.counts[bisect.bisect_left(metric.buckets, value)] += 1
            h.sum += value
            h.count += 1

    @contextmanager
    def timed(self, metric: Metric, /, **labels: str) -> Iterator[None]:
        """Observe in histogram C{metric} how long the C{with} block took, if it returns."""
        started = time.perf_counter()
        yield
        self.observe(metric, time.perf_counter() - started, **labels)

    def watch(self, metric: Metric, read: Callable[[], Readings]) -> Callable[[], None]:
        """
        Read gauge C{metric} from C{read} whenever a snapshot is taken.

        Several watches of one metric combine as the metric says (the
        queues of two hashing pools add up); a watch's readings replace
        anything set or counted for the same labels.

        @param read: returns, per label set, the value; it runs in the
            snapshot's thread and must not block.
        @return: a function that ends the watch.
        """
        if metric.kind != "gauge":
            raise ValueError(f"{metric.name} is a {metric.kind}; only gauges are read")
        entry = (metric, read)
        with self._lock:
            self._watches.append(entry)

        def unwatch() -> None:
            with self._lock:
                if entry in self._watches:
                    self._watches.remove(entry)

        return unwatch

    # --- reading ----------------------------------------------------------------------

    def _read_watches(self) -> dict[Metric, dict[LabelValues, float]]:
        with self._lock:
            watches = list(self._watches)
        read: dict[Metric, dict[LabelValues, float]] = {}
        for metric, fn in watches:
            try:
                readings = [(dict(labels), float(value)) for labels, value in fn()]
                series = read.setdefault(metric, {})
                for labels, value in readings:
                    key = self._key(metric, labels, series)
                    series[key] = (
                        _combine(metric.combine, series[key], value) if key in series else value
                    )
            except Exception:
                # Counted, not raised: one broken gauge must not cost the
                # whole scrape.
                if METRIC_ERRORS in self._values:
                    self.inc(METRIC_ERRORS, metric=metric.name)
        return read

    def snapshot(self) -> dict[str, Any]:
        """
        This process's numbers, as plain JSON: C{{"format": 1, "metrics":
        {name: {"type", "help", "labels", "combine", "buckets" (histograms),
        "samples": [[label values, value], ...]}}}}, where a histogram's
        value is C{{"counts": [per bucket, then +Inf], "sum", "count"}}.
        Unlabelled counters and gauges are there at 0 before any count.
        """
        read = self._read_watches()
        metrics: dict[str, Any] = {}
        with self._lock:
            for metric in self.metrics:
                entry: dict[str, Any] = {
                    "type": metric.kind,
                    "help": metric.help,
                    "labels": list(metric.labels),
                    "combine": metric.combine,
                }
                samples: list[list[Any]]
                if metric.kind == "histogram":
                    entry["buckets"] = list(metric.buckets)
                    histograms = dict(self._histograms[metric])
                    if not metric.labels and not histograms:
                        histograms[()] = _Histogram(len(metric.buckets))
                    samples = [
                        [list(key), {"counts": list(h.counts), "sum": h.sum, "count": h.count}]
                        for key, h in sorted(histograms.items())
                    ]
                else:
                    values = dict(self._values[metric])
                    values.update(read.get(metric, {}))
                    if not metric.labels and metric not in read:
                        values.setdefault((), 0)
                    samples = [[list(key), value] for key, value in sorted(values.items())]
                entry["samples"] = samples
                metrics[metric.name] = entry
        return {"format": SNAPSHOT_FORMAT, "metrics": metrics}


def merge(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    Add up the snapshots of several processes (L{ProcessMetrics.snapshot})
    into one of the same shape: counters and histograms add, gauges
    combine as each says.  A metric that only some processes know (a
    newer worker) is kept as they have it.

    @raise ValueError: a snapshot of another format, or a metric whose type,
        labels or buckets differ between two snapshots.
    """
    merged: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[LabelValues, Any]] = {}
    for snapshot in snapshots:
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"not a metrics snapshot of format {SNAPSHOT_FORMAT}")
        for name, entry in snapshot["metrics"].items():
            shape = {k: entry.get(k) for k in ("type", "labels", "buckets")}
            first = merged.get(name)
            if first is None:
                merged[name] = {k: v for k, v in entry.items() if k != "samples"}
                values[name] = {}
            elif {k: first.get(k) for k in shape} != shape:
                raise ValueError(f"metric {name} differs between the processes")
            series = values[name]
            kind, combine = entry["type"], entry.get("combine", "sum")
            for labels, value in entry["samples"]:
                key = tuple(labels)
                old = series.get(key)
                if old is None:
                    series[key] = (
                        dict(value, counts=list(value["counts"])) if kind == "histogram" else value
                    )
                elif kind == "histogram":
                    old["counts"] = [
                        a + b for a, b in zip(old["counts"], value["counts"], strict=True)
                    ]
                    old["sum"] += value["sum"]
                    old["count"] += value["count"]
                else:
                    series[key] = _combine("sum" if kind == "counter" else combine, old, value)
    for name, entry in merged.items():
        entry["samples"] = [[list(key), value] for key, value in sorted(values[name].items())]
    return {"format": SNAPSHOT_FORMAT, "metrics": merged}


def lasting(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """
    What of a process's snapshot outlives the process: its counters and
    histograms (what it did), not its gauges (what it has now, which is
    nothing once it has ended).  The parent adds this much of each worker
    that ended to every later sum (L{pop3srv.app.control.ServerView}), so
    that no counter goes down when a worker dies.

    @raise ValueError: a snapshot of another format.
    """
    if snapshot.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a metrics snapshot of format {SNAPSHOT_FORMAT}")
    return {
        "format": SNAPSHOT_FORMAT,
        "metrics": {
            name: entry
            for name, entry in snapshot["metrics"].items()
            if entry.get("type") in ("counter", "histogram")
        },
    }


def format_value(value: float) -> str:
    """A number as the text forms show it: whole numbers without a point."""
    if math.isfinite(value) and value == int(value) and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """Labels as the exposition writes them: C{{name="value",...}}, escaped."""
    if not names:
        return ""
    pairs = (
        f'{n}="' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        for n, v in zip(names, values, strict=True)
    )
    return "{" + ",".join(pairs) + "}"


def render_text(snapshot: Mapping[str, Any]) -> str:
    """
    A snapshot (one process's, or a L{merge}) as text for people
    (C{pop3srv stats}): one C{name{labels} value} line per series, with
    the names and labels of the Prometheus exposition; a histogram as its
    C{_count} and C{_sum}.
    """
    lines = []
    for name, entry in snapshot["metrics"].items():
        names = entry["labels"]
        for labels, value in entry["samples"]:
            text = _label_text(names, labels)
            if entry["type"] == "histogram":
                lines.append(f"{name}_count{text} {format_value(value['count'])}")
                lines.append(f"{name}_sum{text} {format_value(value['sum'])}")
            else:
                lines.append(f"{name}{text} {format_value(value)}")
    return "\n".join(lines) + "\n"


#: This process's metrics.
PROCESS = ProcessMetrics()
