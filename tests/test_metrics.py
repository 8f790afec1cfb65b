"""
Tests for the metrics: L{pop3srv.core.metrics} (the registry, merge, text),
L{pop3srv.server.metrics} (counting log events, the Prometheus text), the
hooks in the hashing pool, the index and the commit, the C{--metrics}
endpoint (L{pop3srv.app.metricsweb}), and a real C{twistd pop3srv} scraped
over HTTP.
"""

from __future__ import annotations

import io
import os
import poplib
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from certs import Authority
from helpers import MESSAGES, FakeMailbox, FakeRealm, RunNow, result_of, run_until
from livepop3 import PASSWORDS, Pop3Server, free_port, write_mbox
from passlib.hash import sha512_crypt
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.portal import Portal
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    LogEvent,
    Logger,
    LogPublisher,
    eventFromJSON,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.web.client import URI, Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from pop3srv.app.metricsweb import MetricsListenError, listen_metrics
from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.credentials import PasswordCredentials
from pop3srv.auth.userfile import UserFile, VerifyResult
from pop3srv.core import metrics as core
from pop3srv.core import sasl
from pop3srv.core.errors import MaildropChanged
from pop3srv.core.metrics import (
    CERT_EXPIRY,
    HASH_CHECK_SECONDS,
    INDEX_SCAN_SECONDS,
    LOGINS,
    PROCESSES,
    SESSIONS_OPEN,
    Metric,
    ProcessMetrics,
    merge,
    render_text,
)
from pop3srv.mbox.commit import commit_deletions, recover
from pop3srv.mbox.index import load_index
from pop3srv.mbox.paths import state_paths
from pop3srv.processes.hashpool import ProcessVerifier
from pop3srv.server import metrics
from pop3srv.server.audit import audit
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import ConnectionLimits, ThrottleSettings
from pop3srv.server.login import (
    LoginFault,
    LoginRefused,
    LoginService,
    LoginSucceeded,
    ServerPolicy,
)
from pop3srv.server.login import Peer as LoginPeer
from pop3srv.server.metrics import PROCESS, EventCounter, render_prometheus, start_counting
from pop3srv.server.sessions import SessionFigures, SessionInfo, SessionTable, log_summary
from pop3srv.server.tls import TLSContextSource

# --- reading snapshots ------------------------------------------------------------------


def value(snapshot: Mapping[str, Any], name: str, **labels: str) -> Any:
    """The value of one series of a snapshot; 0 if it has none."""
    entry = snapshot["metrics"][name]
    for values, v in entry["samples"]:
        if dict(zip(entry["labels"], values, strict=True)) == labels:
            return v
    return 0


def total(snapshot: Mapping[str, Any], name: str) -> float:
    """The sum of every series of a counter or gauge."""
    return sum(v for _, v in snapshot["metrics"][name]["samples"])


@pytest.fixture
def counted() -> Iterator[ProcessMetrics]:
    """A fresh registry counting the events published in this process while the test runs."""
    registry = ProcessMetrics()
    counter = EventCounter(registry)
    globalLogPublisher.addObserver(counter)
    yield registry
    globalLogPublisher.removeObserver(counter)


def _session(**overrides: Any) -> SessionFigures:
    figures = SessionFigures(session="1a2b-7", client="192.0.2.7:5123", listener="pop3", started=0)
    for key, v in overrides.items():
        setattr(figures, key, v)
    return figures


# --- counting events -----------------------------------------------------------------------


def test_audit_events_are_counted(counted: ProcessMetrics) -> None:
    """
    Each audit event counts where it belongs: logins by result and method
    (an app password's label is not a label), failures and refusals by
    reason, a server fault as an error (never a failure), lockouts by
    scope, limit hits and refused connections by reason.
    """
    peer = {"session": "1a2b-7", "peer": "192.0.2.7"}
    audit("login-ok", reason="password", user="alice", **peer)
    audit("login-ok", reason="password+app:phone", user="alice", **peer)
    audit("login-ok", reason="sasl-scram-sha-256", user="bob", **peer)
    audit("login-failed", reason="bad-credentials", user="alice", **peer)
    audit("login-failed", reason="invalid-username", user="mallory", **peer)
    audit("login-refused", reason="locked-out-user", user="alice", **peer)
    audit("login-refused", reason="error", user="alice", **peer)
    audit("lockout", reason="user", user="alice", **peer)
    audit("limit-hit", reason="auth-timeout", **peer)
    audit("connection-refused", reason="ip-rules", **peer)
    snap = counted.snapshot()
    logins = "pop3srv_logins_total"
    assert value(snap, logins, result="ok", method="password") == 2
    assert value(snap, logins, result="ok", method="sasl-scram-sha-256") == 1
    assert value(snap, logins, result="failed", method="unknown") == 2
    assert value(snap, logins, result="refused", method="unknown") == 1
    assert value(snap, logins, result="error", method="unknown") == 1
    assert total(snap, logins) == 7
    assert value(snap, "pop3srv_login_failures_total", reason="bad-credentials") == 1
    assert value(snap, "pop3srv_login_failures_total", reason="invalid-username") == 1
    assert value(snap, "pop3srv_login_refusals_total", reason="locked-out-user") == 1
    assert value(snap, "pop3srv_login_refusals_total", reason="error") == 1
    assert value(snap, "pop3srv_lockouts_total", scope="user") == 1
    assert value(snap, "pop3srv_limit_hits_total", reason="auth-timeout") == 1
    assert value(snap, "pop3srv_connections_refused_total", reason="ip-rules") == 1
    assert total(snap, "pop3srv_metric_errors_total") == 0


def test_session_summaries_are_counted(counted: ProcessMetrics) -> None:
    """
    A session summary counts a session (by listener, TLS and how it
    ended), its RETR, TOP and DELE, and the octets RETR sent; a session
    that never reached QUIT (DELE C{-}) deletes nothing.
    """
    log_summary(
        _session(
            user="alice",
            method="password",
            messages=3,
            octets=900,
            retr=2,
            retr_octets=640,
            top=1,
            dele=1,
            end="quit",
        ),
        5.0,
    )
    log_summary(_session(tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"), end="dropped"), 1.0)
    log_summary(_session(listener="pop3s", tls=("TLSv1.2", "X"), retr=1, retr_octets=10), 1.0)
    snap = counted.snapshot()
    sessions = "pop3srv_sessions_total"
    assert value(snap, sessions, listener="pop3", tls="no", ended="quit") == 1
    assert value(snap, sessions, listener="pop3", tls="yes", ended="dropped") == 1
    assert value(snap, sessions, listener="pop3s", tls="yes", ended="-") == 1
    commands = "pop3srv_message_commands_total"
    assert value(snap, commands, command="RETR") == 3
    assert value(snap, commands, command="TOP") == 1
    assert value(snap, commands, command="DELE") == 1
    assert value(snap, "pop3srv_octets_sent_total") == 650
    assert total(snap, "pop3srv_metric_errors_total") == 0


def test_logins_are_counted_by_method(
    tmp_path: Path, counted: ProcessMetrics, log_events: list[LogEvent]
) -> None:
    """
    The login service's audit events name the method as a field of the
    event, so that failed, refused and faulted logins count under it, not
    C{unknown}; the audit line (fail2ban's) does not change.
    """
    clock = MemoryReactorClock()
    users = tmp_path / "users"
    users.write_text(f"alice:{sha512_crypt.using(rounds=1000).hash('pw')}\n")
    broken = [False]

    def verify(username: str, password: str) -> Deferred[VerifyResult]:
        if broken[0]:
            return fail(OSError("the hashing process died"))
        return succeed(VerifyResult(ok=password == "pw"))

    checker = PasslibChecker(str(users), reactor=RunNow(), verifier=verify)  # type: ignore[arg-type]
    realm = FakeRealm(FakeMailbox(list(MESSAGES), "plain", clock))
    authority = LocalAuthority(ThrottleSettings(), ConnectionLimits(), clock=clock)
    service = LoginService(Portal(realm, [checker]), clock, ServerPolicy(authority=authority))
    peer = LoginPeer("192.0.2.9", "t-1", "192.0.2.9:40000")

    def login(password: bytes, method: str) -> object:
        d = service.login(
            PasswordCredentials(b"alice", password), username="alice", method=method, peer=peer
        )
        clock.advance(60)
        return result_of(d)

    assert isinstance(login(b"pw", "apop"), LoginSucceeded)
    assert login(b"wrong", "apop") == LoginRefused("AUTH", "Invalid username or password.")
    broken[0] = True
    assert isinstance(login(b"pw", "sasl-plain"), LoginFault)
    broken[0] = False
    failure = sasl.Failure(
        "AUTH", "Authentication failed.", reason="empty-password", username="alice"
    )
    service.sasl_failed(failure, peer=peer, method="sasl-plain")
    clock.advance(60)
    # The fifth failure of the pair locks it out.
    for _ in range(3):
        login(b"wrong", "password")
    # Locked out: refused without a check.
    assert login(b"pw", "password") == LoginRefused("AUTH", "Invalid username or password.")
    snap = counted.snapshot()
    logins = "pop3srv_logins_total"
    assert value(snap, logins, result="ok", method="apop") == 1
    assert value(snap, logins, result="failed", method="apop") == 1
    assert value(snap, logins, result="error", method="sasl-plain") == 1
    assert value(snap, logins, result="failed", method="sasl-plain") == 1
    assert value(snap, logins, result="failed", method="password") == 3
    assert value(snap, logins, result="refused", method="password") == 1
    assert value(snap, logins, result="failed", method="unknown") == 0
    lines = [formatEvent(e) for e in log_events if e.get("log_namespace") == "pop3srv.audit"]
    assert lines[1] == (
        'pop3srv-audit event=login-failed session=t-1 peer=192.0.2.9 user="alice" '
        "reason=bad-credentials"
    )
    assert not any("method" in line or "apop" in line for line in lines[1:])


def test_events_a_worker_logged_are_not_counted_again(counted: ProcessMetrics) -> None:
    """
    The parent publishes its workers' events again (read back from their
    JSON); each worker counts its own, so the parent must not count them.
    """
    out = io.StringIO()
    worker = LogPublisher(jsonFileLogObserver(out))
    original = globalLogPublisher._observers
    try:
        # The worker's audit event, as the worker's own log would write it.
        globalLogPublisher._observers = [worker]
        audit("login-ok", reason="password", session="2b-1", peer="192.0.2.8", user="al")
    finally:
        globalLogPublisher._observers = original
    for line in out.getvalue().split("\x1e"):
        if line.strip():
            globalLogPublisher(eventFromJSON(line))
    assert total(counted.snapshot(), "pop3srv_logins_total") == 0
    audit("login-ok", reason="password", session="2b-2", peer="192.0.2.8", user="al")
    assert total(counted.snapshot(), "pop3srv_logins_total") == 1


def test_start_counting_in_a_fork_forgets_the_parents_numbers() -> None:
    """
    C{start_counting(forked=True)} (a worker) starts from zero; called
    twice, it observes once; it watches the sessions and the certificate.
    """
    # Counted through this publisher only (a test of the service may have
    # left this process counting through the global one).
    globalLogPublisher.removeObserver(metrics._counter)
    publisher = LogPublisher()
    table = SessionTable()
    start_counting(sessions=table, publisher=publisher)
    PROCESS.inc(LOGINS, result="ok", method="password")
    start_counting(sessions=table, forked=True, publisher=publisher)
    start_counting(sessions=table, publisher=publisher)
    snap = PROCESS.snapshot()
    assert total(snap, "pop3srv_logins_total") == 0
    assert value(snap, "pop3srv_processes") == 1
    assert total(snap, "pop3srv_build_info") == 1
    [(labels, one)] = snap["metrics"]["pop3srv_build_info"]["samples"]
    assert one == 1 and labels[0] == metrics.__version__
    table.add(SessionInfo("a-1", None, "192.0.2.1:1", "pop3", None, 0.0, "authorization", 1))
    table.add(SessionInfo("a-2", "al", "192.0.2.1:2", "pop3", "TLSv1.3 X", 0.0, "transaction", 1))
    table.add(SessionInfo("a-3", "bo", "192.0.2.1:3", "pop3s", "TLSv1.3 X", 0.0, "update", 1))
    snap = PROCESS.snapshot()
    assert value(snap, "pop3srv_sessions_open", listener="pop3", tls="no") == 1
    assert value(snap, "pop3srv_sessions_open", listener="pop3", tls="yes") == 1
    assert value(snap, "pop3srv_sessions_open", listener="pop3s", tls="yes") == 1
    audit("login-ok", reason="password", session="a-2", peer="192.0.2.1", user="al")
    assert total(PROCESS.snapshot(), "pop3srv_logins_total") == 0  # not this publisher
    publisher(
        {
            "log_logger": Logger(),
            "log_namespace": "pop3srv.audit",
            "audit_event": "login-ok",
            "reason": "apop",
        }
    )
    assert value(PROCESS.snapshot(), "pop3srv_logins_total", result="ok", method="apop") == 1
    PROCESS.reset()


def test_sessions_open_reads_zero_rather_than_nothing(tmp_path: Path) -> None:
    """
    With no session open, C{pop3srv_sessions_open} has its series at 0
    for each listener and TLS combination the process can have (a plain
    session only, without TLS), rather than none.
    """
    globalLogPublisher.removeObserver(metrics._counter)
    table = SessionTable()
    try:
        start_counting(sessions=table, forked=True, publisher=LogPublisher())
        samples = PROCESS.snapshot()["metrics"][SESSIONS_OPEN.name]["samples"]
        assert samples == [[["pop3", "no"], 0]]
        cert, key = Authority.create().issue(tmp_path, "server", 1)
        tls = TLSContextSource(str(cert), str(key))
        start_counting(sessions=table, tls=tls, forked=True, publisher=LogPublisher())
        table.add(SessionInfo("a-1", "al", "192.0.2.1:2", "pop3", "TLSv1.3 X", 0.0, "update", 1))
        samples = PROCESS.snapshot()["metrics"][SESSIONS_OPEN.name]["samples"]
        assert samples == [[["pop3", "no"], 0], [["pop3", "yes"], 1], [["pop3s", "yes"], 0]]
        table.remove("a-1")
        text = render_prometheus(merge([PROCESS.snapshot(), PROCESS.snapshot()])).decode()
        assert 'pop3srv_sessions_open{listener="pop3s",tls="yes"} 0.0' in text
    finally:
        PROCESS.reset()


def test_a_connection_limit_is_a_limit_hit_not_a_refused_connection(
    counted: ProcessMetrics,
) -> None:
    """
    A connection refused by a connection limit (audited as C{limit-hit})
    counts in C{pop3srv_limit_hits_total} only; C{connection-refused} (the
    rules, a fault) in C{pop3srv_connections_refused_total} only; each
    help text says so.
    """
    peer = {"session": "1a2b-7", "peer": "192.0.2.7"}
    audit("limit-hit", reason="max-connections-per-address", **peer)
    audit("connection-refused", reason="error", **peer)
    snap = counted.snapshot()
    assert total(snap, "pop3srv_limit_hits_total") == 1
    assert value(snap, "pop3srv_limit_hits_total", reason="max-connections-per-address") == 1
    assert total(snap, "pop3srv_connections_refused_total") == 1
    hits = snap["metrics"]["pop3srv_limit_hits_total"]["help"]
    refused = snap["metrics"]["pop3srv_connections_refused_total"]["help"]
    assert "max-connections-per-address" in hits and "limit-hit" in hits
    assert "pop3srv_limit_hits_total" in refused and "connection-refused" in refused


def test_certificate_expiry_follows_a_reload(tmp_path: Path) -> None:
    """The expiry gauge reads the certificate new handshakes get, after a reload too."""
    authority = Authority.create()
    cert, key = authority.issue(tmp_path, "server", 1)
    source = TLSContextSource(str(cert), str(key))
    registry = ProcessMetrics()
    registry.watch(CERT_EXPIRY, lambda: metrics.certificate_expiry(source))
    first = value(registry.snapshot(), CERT_EXPIRY.name)
    assert first == source.certificate.not_valid_after_utc.timestamp()
    assert abs(first - (time.time() + 30 * 86400)) < 3600
    time.sleep(1.1)  # certificates are dated to the second
    authority.issue(tmp_path, "server", 2)
    assert source.reload()
    assert value(registry.snapshot(), CERT_EXPIRY.name) > first


# --- the registry ------------------------------------------------------------------------


def test_counting_rules() -> None:
    """
    Labels must be the metric's; a counter cannot go down; a series
    beyond the cap is counted as C{other}; a broken watch is counted, not
    raised.
    """
    registry = ProcessMetrics()
    with pytest.raises(ValueError, match="takes labels"):
        registry.inc(LOGINS, result="ok")
    with pytest.raises(ValueError, match="cannot go down"):
        registry.inc(LOGINS, -1, result="ok", method="password")
    with pytest.raises(ValueError, match="is a counter"):
        registry.set(LOGINS, 1, result="ok", method="password")
    with pytest.raises(ValueError, match="is a gauge"):
        registry.observe(SESSIONS_OPEN, 1, listener="pop3", tls="no")
    for n in range(core.MAX_SERIES + 5):
        registry.inc(LOGINS, result="ok", method=f"m{n}")
    snap = registry.snapshot()
    assert len(snap["metrics"][LOGINS.name]["samples"]) == core.MAX_SERIES + 1
    assert value(snap, LOGINS.name, result="other", method="other") == 5

    def broken() -> list[tuple[dict[str, str], float]]:
        raise RuntimeError("oops")

    registry.watch(PROCESSES, broken)
    snap = registry.snapshot()
    assert value(snap, "pop3srv_metric_errors_total", metric="pop3srv_processes") == 1
    assert value(snap, "pop3srv_processes") == 1


def test_histogram_buckets() -> None:
    """An observation lands in the first bucket whose bound is at least it."""
    registry = ProcessMetrics()
    bounds = HASH_CHECK_SECONDS.buckets
    for seconds in (0.0, bounds[0], bounds[0] * 1.5, bounds[-1] + 1):
        registry.observe(HASH_CHECK_SECONDS, seconds)
    [(_, h)] = registry.snapshot()["metrics"][HASH_CHECK_SECONDS.name]["samples"]
    assert h["counts"][:2] == [2, 1]
    assert h["counts"][-1] == 1
    assert h["count"] == 4 and h["sum"] == pytest.approx(bounds[0] * 2.5 + bounds[-1] + 1)


def _two_processes() -> tuple[dict[str, Any], dict[str, Any]]:
    a, b = ProcessMetrics(), ProcessMetrics()
    a.inc(LOGINS, result="ok", method="password")
    a.inc(LOGINS, result="failed", method="unknown")
    b.inc(LOGINS, 2, result="ok", method="password")
    a.set(CERT_EXPIRY, 2_000_000_000)
    b.set(CERT_EXPIRY, 1_900_000_000)
    a.watch(SESSIONS_OPEN, lambda: [({"listener": "pop3", "tls": "no"}, 3)])
    b.watch(SESSIONS_OPEN, lambda: [({"listener": "pop3", "tls": "no"}, 4)])
    a.observe(INDEX_SCAN_SECONDS, 0.002, kind="full")
    b.observe(INDEX_SCAN_SECONDS, 0.2, kind="full")
    b.observe(INDEX_SCAN_SECONDS, 1000, kind="append")
    return a.snapshot(), b.snapshot()


def test_merge_adds_up_processes() -> None:
    """
    Counters add, gauges combine as they say (sessions add, the
    certificate expiry is the soonest, build info the same), histograms
    add bucket by bucket; the merge is a snapshot again.
    """
    a, b = _two_processes()
    merged = merge([a, b])
    assert value(merged, "pop3srv_logins_total", result="ok", method="password") == 3
    assert value(merged, "pop3srv_logins_total", result="failed", method="unknown") == 1
    assert value(merged, "pop3srv_processes") == 2
    assert value(merged, "pop3srv_sessions_open", listener="pop3", tls="no") == 7
    assert value(merged, CERT_EXPIRY.name) == 1_900_000_000
    full = value(merged, INDEX_SCAN_SECONDS.name, kind="full")
    assert full["count"] == 2 and full["sum"] == pytest.approx(0.202)
    assert full["counts"] == [
        x + y
        for x, y in zip(
            value(a, INDEX_SCAN_SECONDS.name, kind="full")["counts"],
            value(b, INDEX_SCAN_SECONDS.name, kind="full")["counts"],
            strict=True,
        )
    ]
    assert value(merged, INDEX_SCAN_SECONDS.name, kind="append")["counts"][-1] == 1
    assert merge([merged]) == merged
    assert merge([a]) == a  # one process: unchanged
    assert merge([]) == {"format": core.SNAPSHOT_FORMAT, "metrics": {}}


def test_merge_refuses_what_does_not_add_up() -> None:
    """Another format, or a metric of another shape in another process, is an error."""
    a, _ = _two_processes()
    with pytest.raises(ValueError, match="format"):
        merge([a, {"format": 99, "metrics": {}}])
    other = ProcessMetrics([Metric(HASH_CHECK_SECONDS.name, "histogram", "x", buckets=(1.0,))])
    with pytest.raises(ValueError, match="differs"):
        merge([a, other.snapshot()])


def test_exposition_parses() -> None:
    """
    The Prometheus text of a merged snapshot parses with
    C{prometheus_client}'s own parser, with every value as merged:
    counters, gauges, cumulative histogram buckets.
    """
    a, b = _two_processes()
    merged = merge([a, b])
    families = {
        f.name: f for f in text_string_to_metric_families(render_prometheus(merged).decode())
    }
    logins = families["pop3srv_logins"]
    assert logins.type == "counter"
    found = {
        (s.labels["result"], s.labels["method"]): s.value
        for s in logins.samples
        if s.name == "pop3srv_logins_total"
    }
    assert found == {("ok", "password"): 3, ("failed", "unknown"): 1}
    expiry = families[CERT_EXPIRY.name]
    assert expiry.type == "gauge" and expiry.samples[0].value == 1_900_000_000
    scans = families[INDEX_SCAN_SECONDS.name]
    assert scans.type == "histogram"
    full = {
        s.labels["le"]: s.value
        for s in scans.samples
        if s.name.endswith("_bucket") and s.labels["kind"] == "full"
    }
    assert full["+Inf"] == 2
    assert full["0.001"] == 0 and full["0.005"] == 1 and full["0.5"] == 2
    counts = [s.value for s in scans.samples if s.name.endswith("_count")]
    assert sorted(counts) == [1, 2]
    every = {m.name for m in core.METRICS}
    assert {n.removesuffix("_total") for n in every} <= set(families) | {
        "pop3srv_sessions_open",  # watched only
    }


def test_render_text() -> None:
    """C{pop3srv stats}: one line per series, histograms as count and sum."""
    a, b = _two_processes()
    text = render_text(merge([a, b]))
    lines = text.splitlines()
    assert 'pop3srv_logins_total{result="ok",method="password"} 3' in lines
    assert "pop3srv_processes 2" in lines
    assert "pop3srv_tls_certificate_expiry_timestamp_seconds 1900000000" in lines
    assert 'pop3srv_index_scan_seconds_count{kind="full"} 2' in lines
    assert 'pop3srv_index_scan_seconds_sum{kind="full"} 0.202' in lines
    assert all(re.fullmatch(r"[a-z_0-9]+(\{.*\})? \S+", line) for line in lines)


# --- the hooks -----------------------------------------------------------------------------


def _message(tag: str) -> bytes:
    head = f"From {tag}@example.org Thu Jan  1 00:00:00 2026\nSubject: {tag}\n"
    return f"{head}\nbody {tag}\n\n".encode()


def _delta(before: Mapping[str, Any], name: str, **labels: str) -> float:
    now = PROCESS.snapshot()
    if not labels and now["metrics"][name]["labels"]:
        return total(now, name) - total(before, name)
    return float(value(now, name, **labels) - value(before, name, **labels))


def test_index_scans_are_counted_and_timed(tmp_path: Path) -> None:
    """
    A first load scans the whole mbox, a grown one only the new mail, an
    unchanged one nothing; each scan is timed.
    """
    path = tmp_path / "alice"
    path.write_bytes(_message("a") + _message("b"))
    paths = state_paths(str(path))
    before = PROCESS.snapshot()
    fd = os.open(path, os.O_RDWR)
    try:
        load_index(fd, paths.index)
        assert _delta(before, "pop3srv_index_scans_total", kind="full") == 1
        load_index(fd, paths.index)
        assert _delta(before, "pop3srv_index_scans_total") == 1
        with open(path, "ab") as f:
            f.write(_message("c"))
        load_index(fd, paths.index)
        assert _delta(before, "pop3srv_index_scans_total", kind="append") == 1
    finally:
        os.close(fd)
    now = PROCESS.snapshot()
    for kind in ("full", "append"):
        old = value(before, INDEX_SCAN_SECONDS.name, kind=kind)
        new = value(now, INDEX_SCAN_SECONDS.name, kind=kind)
        assert new["count"] - (old["count"] if old else 0) == 1


def test_commits_are_counted(tmp_path: Path) -> None:
    """
    A journal is pending while its commit applies it; a commit that
    cannot apply it is counted as deferred and its journal recovered at
    the next open; a mailbox changed under the session is a failure too.
    """
    path = tmp_path / "alice"
    path.write_bytes(b"".join(_message(t) for t in "abcd"))
    paths = state_paths(str(path))
    before = PROCESS.snapshot()
    seen: list[float] = []

    def fault(point: str) -> None:
        if point == "journal_written":
            seen.append(_delta(before, "pop3srv_journals_pending"))
        if point == "payload_written":
            raise OSError("disk went away")

    fd = os.open(path, os.O_RDWR)
    try:
        index = load_index(fd, paths.index)
        assert commit_deletions(fd, paths, index, [0], fault=fault) is None
        assert seen == [1]
        assert _delta(before, "pop3srv_journals_pending") == 0
        assert _delta(before, "pop3srv_commit_failures_total", reason="deferred") == 1
    finally:
        os.close(fd)
    assert recover(paths.mbox, paths.journal)
    assert _delta(before, "pop3srv_journals_recovered_total", outcome="applied") == 1
    fd = os.open(path, os.O_RDWR)
    try:
        index = load_index(fd, paths.index)
        assert len(index.records) == 3
        os.pwrite(fd, b"X", index.records[1].body_start)  # same size, new content
        with pytest.raises(MaildropChanged):
            commit_deletions(fd, paths, index, [0])
        assert _delta(before, "pop3srv_commit_failures_total", reason="changed") == 1
        assert _delta(before, "pop3srv_journals_pending") == 0
    finally:
        os.close(fd)


def test_hash_queue_and_check_latency(tmp_path: Path) -> None:
    """
    Checks beyond the hashing processes wait in the queue (the gauge);
    every answered check is timed from when it was asked.
    """
    from passlib.hash import sha512_crypt

    users = tmp_path / "users"
    users.write_text(f"alice:{sha512_crypt.using(rounds=1000).hash('pw')}\n")
    verifier = ProcessVerifier(UserFile(str(users)), 1, reactor)
    before = PROCESS.snapshot()
    old = value(before, HASH_CHECK_SECONDS.name)
    verifier.start()
    try:
        checks = [verifier.verify_detailed("alice", pw) for pw in ("pw", "no", "pw", "x")]
        assert value(PROCESS.snapshot(), "pop3srv_hash_queue_depth") == 3
        checks[3].cancel()
        assert value(PROCESS.snapshot(), "pop3srv_hash_queue_depth") == 2
        assert [run_until(d).ok for d in checks[:3]] == [True, False, True]
        assert value(PROCESS.snapshot(), "pop3srv_hash_queue_depth") == 0
        new = value(PROCESS.snapshot(), HASH_CHECK_SECONDS.name)
        assert new["count"] - old["count"] == 3
        assert new["sum"] > old["sum"]
    finally:
        verifier.stop()
    # Its pipes gone before the next test, which may check for a clean reactor.
    from twisted.internet.process import ProcessReader, ProcessWriter
    from twisted.internet.unix import Server as UNIXConnection

    def pipes() -> list[Any]:
        selectables = [*reactor.getReaders(), *reactor.getWriters()]
        return [
            s for s in selectables if isinstance(s, ProcessReader | ProcessWriter | UNIXConnection)
        ]

    deadline = time.monotonic() + 10
    while pipes() and time.monotonic() < deadline:
        reactor.iterate(0.01)
    assert not pipes(), "a hashing process outlived its test"


# --- the endpoint --------------------------------------------------------------------------


@implementer(IAgentEndpointFactory)
class _Direct:
    """Connects by address: the default endpoint resolves names in a thread pool,
    which a reactor that is only iterated never starts."""

    def endpointForURI(self, uri: URI) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port)


def _get(port: int, path: str) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """A real HTTP GET of C{path} on 127.0.0.1:C{port}: code, headers, body."""
    agent = Agent.usingEndpointFactory(reactor, _Direct())
    d: Deferred[Any] = agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())

    def read(response: Any) -> Deferred[Any]:
        headers = dict(response.headers.getAllRawHeaders())
        return readBody(response).addCallback(lambda body: (response.code, headers, body))

    return run_until(d.addCallback(read))


# Twisted's readBody warns of its own client transport (no abortConnection).
@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
def test_endpoint_serves_what_it_gathers() -> None:
    """
    C{GET /metrics} waits for the gathering (which may take a while: the
    workers are asked over AMP) and serves it as Prometheus text; every
    other path is 404; a gathering that fails is a 500 (and logged).
    """
    a, b = _two_processes()
    asked: list[int] = []

    def gather() -> Deferred[dict[str, Any]]:
        asked.append(1)
        if len(asked) == 3:
            return fail(RuntimeError("a worker broke"))
        return task.deferLater(reactor, 0.05, merge, [a, b])

    service = listen_metrics(reactor, "tcp:0:interface=127.0.0.1", gather)
    service.startService()
    try:
        port = service.port.getHost().port
        code, headers, body = _get(port, "/metrics")
        assert code == 200
        assert headers[b"Content-Type"] == [CONTENT_TYPE_LATEST.encode()]
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["pop3srv_processes"].samples[0].value == 2
        for path in ("/", "/metric", "/metrics/", "/metrics/x"):
            assert _get(port, path)[0] == 404
        assert len(asked) == 1
        assert _get(port, "/metrics")[2] == body
        code, _, body = _get(port, "/metrics")
        assert code == 500 and b"could not be gathered" in body
    finally:
        run_until(maybeDeferred(service.stopService))


def test_endpoint_problems_are_one_line() -> None:
    """A bad endpoint or a port in use: one line naming --metrics, nothing listening."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError) as caught:
            listen_metrics(reactor, f"tcp:{port}:interface=127.0.0.1", lambda: succeed({}))
        assert str(caught.value).startswith("--metrics: ")
        assert "\n" not in str(caught.value)
    with pytest.raises(MetricsListenError, match="not an endpoint"):
        listen_metrics(reactor, "nonsense:9110", lambda: succeed({}))


# --- the real server ----------------------------------------------------------------------


Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Scraped:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(scraped: Scraped, name: str, **labels: str) -> float:
    """The sum of the series C{name} whose labels include C{labels}."""
    return sum(
        v for (n, pairs), v in scraped.items() if n == name and set(labels.items()) <= set(pairs)
    )


def _login(port: int, user: str, password: str) -> bool:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
    except poplib.error_proto:
        client.quit()
        return False
    client.retr(1)
    client.quit()
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_scrape_a_real_server(tmp_path: Path, workers: int) -> None:
    """
    The real C{twistd pop3srv --workers N --metrics ...}: after logins
    served by every server process (the audit log's session tags start
    with the pid in hex), one scrape with a real HTTP client shows them
    all, and the sessions, RETRs, password checks and index scans.
    """
    mport = free_port()
    srv = Pop3Server(
        tmp_path, "--workers", str(workers), "--metrics", f"tcp:{mport}:interface=127.0.0.1"
    )
    write_mbox(srv.mail / "alice", [b"Subject: one\n\nhello\n"])
    srv.start()
    try:
        assert _scrape(mport)[("pop3srv_processes", ())] == workers
        failed = int(not _login(srv.port, "alice", "wrong"))
        ok = 0
        pids: set[str] = set()
        # Which process accepts a connection is the kernel's choice: log in
        # until each has served some.
        for _ in range(40):
            ok += _login(srv.port, "alice", PASSWORDS["alice"])
            if ok % 4 == 0:
                pids = set(re.findall(r"event=login-ok session=([0-9a-f]+)-", srv.log_text()))
                if len(pids) >= workers:
                    break
        assert len(pids) == workers, f"logins served by {pids}"
        # Each POP3 session, and the connection start() probed the port with.
        sessions = ok + failed + 1
        # A session is counted when its summary is logged, after the QUIT.
        deadline = time.monotonic() + 10
        while True:
            scraped = _scrape(mport)
            if _sum(scraped, "pop3srv_sessions_total") >= sessions or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert scraped[("pop3srv_processes", ())] == workers
        assert _sum(scraped, "pop3srv_logins_total", result="ok", method="password") == ok
        assert _sum(scraped, "pop3srv_logins_total", result="failed", method="password") == failed
        assert _sum(scraped, "pop3srv_sessions_total", listener="pop3", tls="no") == sessions
        assert _sum(scraped, "pop3srv_sessions_total", ended="quit") == ok + failed
        assert _sum(scraped, "pop3srv_message_commands_total", command="RETR") == ok
        assert _sum(scraped, "pop3srv_octets_sent_total") > 0
        assert _sum(scraped, "pop3srv_hash_check_seconds_count") == ok + failed
        assert _sum(scraped, "pop3srv_index_scans_total", kind="full") >= 1
        assert _sum(scraped, "pop3srv_sessions_open") == 0
        assert _sum(scraped, "pop3srv_build_info") == 1
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10)
        assert caught.value.code == 404
    finally:
        srv.stop()


def _counts(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape's counter and histogram samples (what must never go down)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram")
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _never_lower(before: Mapping[Any, float], after: Mapping[Any, float]) -> list[str]:
    """The series of C{before} that are lower (or gone) in C{after}."""
    return [
        f"{name}{dict(labels)}: {value} -> {after.get((name, labels))}"
        for (name, labels), value in before.items()
        if after.get((name, labels), -1) < value
    ]


def test_counters_never_go_down_when_a_worker_stops_or_dies(tmp_path: Path) -> None:
    """
    The real C{twistd pop3srv --workers 2 --metrics ...}: with the worker
    stopped (SIGSTOP) a scrape shows its last numbers; once it is killed
    (SIGKILL) and replaced, its counters stay in the sums.  No counter or
    histogram sample goes down at any scrape.
    """
    mport = free_port()
    srv = Pop3Server(tmp_path, "--workers", "2", "--metrics", f"tcp:{mport}:interface=127.0.0.1")
    write_mbox(srv.mail / "alice", [b"Subject: one\n\nhello\n"])
    srv.start()
    try:
        assert srv.process is not None
        parent = f"{srv.process.pid:x}"
        ok = 0
        served: dict[str, int] = {}
        # Which process accepts a connection is the kernel's choice.
        for _ in range(60):
            ok += _login(srv.port, "alice", PASSWORDS["alice"])
            tags = re.findall(r"event=login-ok session=([0-9a-f]+)-", srv.log_text())
            served = {pid: tags.count(pid) for pid in set(tags)}
            if len(served) == 2 and min(served.values()) >= 3:
                break
        (worker,) = [int(pid, 16) for pid in served if pid != parent]
        # Every session counted (and the probe connection of start()).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            first = _counts(mport)
            if _sum(first, "pop3srv_logins_total", result="ok") == ok:
                break
            time.sleep(0.1)
        assert _sum(first, "pop3srv_logins_total", result="ok") == ok
        os.kill(worker, signal.SIGSTOP)
        try:
            stopped = _counts(mport)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert _never_lower(first, stopped) == []
        os.kill(worker, signal.SIGKILL)
        # Scrapes while it dies and is replaced, and after.
        deadline = time.monotonic() + 10
        last = stopped
        while time.monotonic() < deadline:
            now = _counts(mport)
            assert _never_lower(last, now) == []
            last = now
            if "restarting it" in srv.log_text():
                break
            time.sleep(0.1)
        ok += _login(srv.port, "alice", PASSWORDS["alice"])
        time.sleep(1.5)
        after = _counts(mport)
        assert _never_lower(last, after) == []
        assert _sum(after, "pop3srv_logins_total", result="ok") == ok
    finally:
        srv.stop()
