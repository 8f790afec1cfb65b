"""
Live reload of the configuration (L{pop3srv.app.reload}): SIGHUP reads the
TOML file again, applies limits, rules, networks, timeouts, the log level
and the TLS settings for new connections, logs what needs a restart, and
keeps everything when the file is bad.

The diff and the apply are tested on a service built by C{makeService}
over a fake reactor (L1); the whole thing on a real C{twistd pop3srv}
given SIGHUP, alone and with C{--workers 2} (L3).  Every loop is bounded
in count and time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import Authority
from helpers import result_of
from livepop3 import PASSWORDS, TWISTD, Pop3Server, write_mbox, write_users
from test_workers import children, wait_for
from test_workers_policy import admit, connect, pids_of, server_pids
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent

from pop3srv.app.config import SETTINGS
from pop3srv.app.reload import LIVE, Change, compare, needs_restart, show
from pop3srv.app.tap import Options, Pop3Service, _worker_build, makeService
from pop3srv.processes.authorityrpc import RemoteAuthority
from pop3srv.processes.hashrelay import RelayClient
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import ConnectionLimits, ThrottleSettings
from pop3srv.server.protocol import POP3ServerFactory
from pop3srv.server.proxy import ProxyHeaderFactory
from pop3srv.server.tls import TLSContextSource, TLSMinimum

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections"


def toml(values: dict[str, Any]) -> str:
    """C{values} as TOML (JSON's strings, numbers and arrays are TOML's)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


class Config:
    """A TOML configuration file a test edits between reloads."""

    def __init__(self, path: Path, **values: Any) -> None:
        self.path = path
        self.values = values
        self.write()

    def write(self) -> None:
        # Written aside and renamed, as an editor does: a reader never sees
        # half a file.
        aside = self.path.with_suffix(".new")
        aside.write_text(toml(self.values))
        os.replace(aside, self.path)

    def set(self, **values: Any) -> None:
        self.values.update(values)
        self.write()

    def drop(self, *keys: str) -> None:
        for key in keys:
            self.values.pop(key, None)
        self.write()

    def line_of(self, key: str) -> int:
        """The line C{key} is set on."""
        return list(self.values).index(key) + 1


def texts(events: list[LogEvent], level: LogLevel | None = None) -> list[str]:
    """The logged lines (at C{level} only, if given)."""
    return [formatEvent(e) for e in events if level is None or e.get("log_level") == level]


# --- L1: the diff and the apply, on a service over a fake reactor ----------------


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    write_users(path)
    return path


@pytest.fixture
def config(tmp_path: Path, users: Path) -> Config:
    """A file with the settings start-up needs and a low connection limit."""
    return Config(
        tmp_path / "pop3srv.toml",
        listen="tcp:1110:interface=127.0.0.1",
        auth=f"passlib:{users}",
        mailbox=f"{tmp_path}/{{user}}",
        max_connections_per_address=2,
    )


def build(*argv: str) -> tuple[Options, Pop3Service]:
    """Parse C{argv} as twistd would and build the service (not started)."""
    options = Options()
    # One process (a fake reactor forks nothing), no hashing processes.
    options.parseOptions([*argv, "--workers", "1", "--hash-workers", "0"])
    return options, makeService(options, reactor=MemoryReactorClock())


def local_authority(top: Pop3Service) -> LocalAuthority:
    assert top.factory is not None
    authority = top.factory.login.authority
    assert isinstance(authority, LocalAuthority)
    return authority


def opened(authority: LocalAuthority, host: str) -> str | None:
    """Count a connection from C{host}: the limit it breaks, or L{None}."""
    breach: str | None = result_of(authority.open_connection(host))
    return breach


def greeting(factory: POP3ServerFactory, host: str) -> bytes:
    """What a client at C{host} is told first."""
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    line = transport.value()
    protocol.connectionLost(None)
    return line


def test_only_the_live_settings_change_without_a_restart() -> None:
    """
    A changed setting needs a restart unless it is in LIVE; TLS and the
    PROXY balancers change live only while set before and after; any
    setting not known to the reload (one added later) needs a restart.
    """
    for key in ("max_connections_per_address", "allow", "log_level", "idle_timeout"):
        assert not needs_restart(Change(key, 1, 2))
    for key in ("listen", "listen_tls", "workers", "auth", "mailbox", "counters", "metrics"):
        assert needs_restart(Change(key, 1, 2))
    assert not needs_restart(Change("proxy_networks", ["192.0.2.0/24"], ["198.51.100.0/24"]))
    assert needs_restart(Change("proxy_networks", [], ["192.0.2.0/24"]))
    assert needs_restart(Change("proxy_networks", ["192.0.2.0/24"], []))
    assert not needs_restart(Change("tls_cert", "/a.crt", "/b.crt"))
    assert needs_restart(Change("tls_cert", None, "/b.crt"))
    assert needs_restart(Change("tls_key", "/a.key", None))
    # Every live key is a setting (a renamed one would silently need a restart).
    assert LIVE <= set(SETTINGS)


def test_values_as_the_log_shows_them() -> None:
    """Lists joined, floats short, nothing shown as such."""
    assert show(["tcp:110", "tcp:111"]) == "tcp:110, tcp:111"
    assert show([ipaddress.ip_network("10.0.0.0/8")]) == "10.0.0.0/8"
    assert (show([]), show(None), show(60.0), show(4)) == ("(none)", "(unset)", "60", "4")
    assert str(Change("lockout", 600.0, 30.5)) == "lockout 600 -> 30.5"


def test_compare_lists_what_differs(config: Config) -> None:
    """
    The changed settings in table order, C{auth} by its descriptions, the
    old name C{hash_threads} not twice; the command line still wins over
    the file.
    """
    options, _ = build("--config", str(config.path), "--auth-timeout", "30")
    auth = config.values["auth"]
    config.set(
        auth_timeout=45,
        deny=["192.0.2.0/24"],
        max_connections_per_address=4,
        auth=[auth, auth + "-2"],
        hash_pool="shared",
    )
    changes = compare(options, options.reparse())
    assert [c.key for c in changes] == [
        "auth",
        "max_connections_per_address",
        "deny",
        "hash_pool",
    ]
    assert (changes[0].old, changes[0].new) == ([auth], [auth, auth + "-2"])
    assert options["auth_timeout"] == 30


def test_limits_change_for_new_connections_and_counts_are_kept(
    config: Config, log_events: list[LogEvent]
) -> None:
    """
    A raised max_connections_per_address admits more at once; a lowered
    one refuses new connections until enough of those counted have ended.
    The one line says what was applied.
    """
    options, top = build("--config", str(config.path))
    authority = local_authority(top)
    host = "192.0.2.7"
    assert [opened(authority, host) for _ in range(3)] == [
        None,
        None,
        "max-connections-per-address",
    ]
    config.set(max_connections_per_address=4, max_sessions_per_user=3, max_connections=50)
    outcome = top.reload()
    assert outcome is not None and outcome.error is None
    assert authority.limits == ConnectionLimits(50, 4, 3)
    assert options["max_connections_per_address"] == 4
    assert [opened(authority, host) for _ in range(3)] == [
        None,
        None,
        "max-connections-per-address",
    ]
    summary = [t for t in texts(log_events, LogLevel.info) if "Configuration reloaded" in t]
    assert summary == [
        f"Configuration reloaded from {config.path}; applied to new connections: "
        "max_connections 1000 -> 50; max_connections_per_address 2 -> 4; "
        "max_sessions_per_user 10 -> 3"
    ]

    config.set(max_connections_per_address=1)
    top.reload()
    assert authority.connections.total == 4
    assert opened(authority, host) == "max-connections-per-address"
    for _ in range(3):
        authority.close_connection(host)
    assert opened(authority, host) == "max-connections-per-address"
    authority.close_connection(host)
    assert opened(authority, host) is None


def test_per_connection_settings_change(config: Config) -> None:
    """
    Rules, networks, timeouts, the failed-login limits and the login queue
    reach the factory, its policy and the authority; a denied address is
    refused at its next connect.
    """
    _, top = build("--config", str(config.path))
    factory = top.factory
    assert factory is not None
    assert greeting(factory, "192.0.2.7").startswith(b"+OK")
    gate = factory.policy.login_gate
    config.set(
        deny=["192.0.2.0/24"],
        plaintext_auth_networks=["10.0.0.0/8"],
        trusted_networks=["10.1.0.0/16"],
        failure_delay=0.5,
        lockout=30,
        auth_timeout=20,
        max_bad_commands=3,
        idle_timeout=900,
        tls_handshake_timeout=5,
        write_stall_timeout=60,
        hash_queue=7,
    )
    outcome = top.reload()
    assert outcome is not None and len(outcome.applied) == 11 and not outcome.kept
    assert greeting(factory, "192.0.2.7") == b"-ERR [SYS/PERM] Access denied.\r\n"
    assert greeting(factory, "198.51.100.1").startswith(b"+OK")
    assert factory.plaintext_auth_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    policy = factory.policy
    assert (policy.auth_timeout, policy.max_bad_commands) == (20, 3)
    assert (factory.idle_timeout, factory.tls_handshake_timeout) == (900, 5)
    assert factory.write_stall_timeout == 60
    assert policy.login_gate is gate and gate.capacity == 1 + 7
    settings = local_authority(top).settings
    assert (settings.failure_delay, settings.lockout) == (0.5, 30)
    assert settings.trusted == (ipaddress.ip_network("10.1.0.0/16"),)


def test_the_proxy_balancers_change_while_there_are_some(config: Config) -> None:
    """
    The PROXY header readers trust the new balancers and wait the new
    time; removing every balancer would need a restart (the readers stay).
    """
    config.set(proxy_networks=["192.0.2.0/24"])
    reactor = MemoryReactorClock()
    options = Options()
    options.parseOptions(["--config", str(config.path), "--workers", "1", "--hash-workers", "0"])
    top = makeService(options, reactor=reactor)
    proxy = reactor.tcpServers[0][1]
    assert isinstance(proxy, ProxyHeaderFactory)
    assert proxy.trusts(IPv4Address("TCP", "192.0.2.9", 1))
    config.set(proxy_networks=["198.51.100.0/24"], proxy_header_timeout=2.5)
    top.reload()
    assert not proxy.trusts(IPv4Address("TCP", "192.0.2.9", 1))
    assert proxy.trusts(IPv4Address("TCP", "198.51.100.9", 1))
    assert proxy.header_timeout == 2.5
    config.set(proxy_networks=[])
    outcome = top.reload()
    assert outcome is not None and [c.key for c in outcome.kept] == ["proxy_networks"]
    assert proxy.trusts(IPv4Address("TCP", "198.51.100.9", 1))


def test_the_log_level_changes(config: Config) -> None:
    """log_level goes to the process's log control."""
    _, top = build("--config", str(config.path))
    assert top.log_control is not None and top.log_control.level == "info"
    config.set(log_level="debug")
    top.reload()
    assert top.log_control.level == "debug"


def test_a_bad_file_changes_nothing(config: Config, log_events: list[LogEvent]) -> None:
    """
    A syntax error or a bad value is one error line naming the file and
    line; every running setting stays, the limits included.
    """
    options, top = build("--config", str(config.path))
    before = {key: options[key] for key in SETTINGS if key != "auth"}
    authority = local_authority(top)
    limits = authority.limits

    config.path.write_text(toml(config.values) + "max_connections = [\n")
    outcome = top.reload()
    line = len(config.values) + 1
    assert outcome is not None and outcome.error is not None
    assert outcome.error.startswith(f"{config.path}:{line}: ")
    config.set(max_connections_per_address=0, allow=["10.0.0.0/8"])
    outcome = top.reload()
    assert outcome is not None
    assert outcome.error == (
        f"{config.path}:{config.line_of('max_connections_per_address')}: "
        "max_connections_per_address must be at least 1"
    )
    errors = texts(log_events, LogLevel.error)
    assert len(errors) == 2
    for error in errors:
        assert error.startswith(f"Configuration not reloaded: {config.path}:")
        assert error.endswith("; keeping the running configuration")
    assert {key: options[key] for key in SETTINGS if key != "auth"} == before
    assert authority.limits is limits
    assert top.factory is not None and top.factory.policy.access.allow == ()


def test_settings_that_need_a_restart_are_kept(
    config: Config, tmp_path: Path, log_events: list[LogEvent]
) -> None:
    """
    Each changed setting that needs a restart is one warning naming it,
    the file and the value kept; the others in the same file are applied.
    """
    options, top = build("--config", str(config.path))
    config.set(
        listen="tcp:1111:interface=127.0.0.1",
        mailbox=f"{tmp_path}/other/{{user}}",
        counters="redis://127.0.0.1:6379/0",
        max_connections_per_address=3,
    )
    outcome = top.reload()
    assert outcome is not None
    assert [c.key for c in outcome.kept] == ["listen", "mailbox", "counters"]
    assert [c.key for c in outcome.applied] == ["max_connections_per_address"]
    warnings = [t for t in texts(log_events, LogLevel.warn) if "changed in" in t]
    assert warnings == [
        f"listen changed in {config.path}: needs a restart; keeping tcp:1110:interface=127.0.0.1",
        f"mailbox changed in {config.path}: needs a restart; keeping {tmp_path}/{{user}}",
        f"counters changed in {config.path}: needs a restart; keeping memory",
    ]
    assert options["listen"] == ["tcp:1110:interface=127.0.0.1"]
    assert options["mailbox"] == f"{tmp_path}/{{user}}"
    assert local_authority(top).limits.max_per_address == 3
    assert any("3 changed settings need a restart" in t for t in texts(log_events))


@pytest.fixture
def ca() -> Authority:
    return Authority.create()


def test_tls_settings_change_and_a_bad_pair_keeps_the_running_one(
    config: Config, tmp_path: Path, ca: Authority, log_events: list[LogEvent]
) -> None:
    """
    New certificate paths and a new lowest version take effect; a pair that
    does not load keeps the running one (and its settings) while the rest
    of the file is applied; turning TLS off needs a restart.
    """
    cert, key = ca.issue(tmp_path, "first", 1001)
    config.set(tls_cert=str(cert), tls_key=str(key))
    options, top = build("--config", str(config.path))
    tls = top.tls
    assert isinstance(tls, TLSContextSource) and tls.serial == 1001

    cert2, key2 = ca.issue(tmp_path, "second", 1002)
    config.set(tls_cert=str(cert2), tls_key=str(key2), tls_min_version="1.3")
    outcome = top.reload()
    assert outcome is not None and outcome.tls_reloaded is True
    assert (tls.serial, tls.cert_path, tls.minimum) == (1002, str(cert2), TLSMinimum.TLS1_3)
    assert options["tls_cert"] == str(cert2)

    # A key that is not the certificate's.
    config.set(tls_key=str(key), max_bad_commands=4)
    outcome = top.reload()
    assert outcome is not None and outcome.tls_reloaded is False
    assert [c.key for c in outcome.kept] == ["tls_key"]
    assert (tls.serial, tls.key_path) == (1002, str(key2))
    assert options["tls_key"] == str(key2)
    assert top.factory is not None and top.factory.policy.max_bad_commands == 4
    assert any("TLS certificate not reloaded" in t for t in texts(log_events, LogLevel.error))

    config.drop("tls_cert", "tls_key")
    outcome = top.reload()
    assert outcome is not None and [c.key for c in outcome.kept] == ["tls_cert", "tls_key"]
    assert tls.serial == 1002


def test_a_bad_file_still_rereads_the_certificate(
    config: Config, tmp_path: Path, ca: Authority
) -> None:
    """A renewed certificate is taken at SIGHUP even when the file is bad."""
    cert, key = ca.issue(tmp_path, "site", 2001)
    config.set(tls_cert=str(cert), tls_key=str(key))
    _, top = build("--config", str(config.path))
    assert isinstance(top.tls, TLSContextSource) and top.tls.serial == 2001
    ca.issue(tmp_path, "site", 2002)
    config.path.write_text("max_connections = \n")
    outcome = top.reload()
    assert outcome is not None and outcome.error is not None
    assert outcome.tls_reloaded is True and top.tls.serial == 2002


def test_without_a_file_only_the_certificate_is_reread(
    users: Path, tmp_path: Path, ca: Authority, log_events: list[LogEvent]
) -> None:
    """With no --config there is nothing to read again but the certificate."""
    cert, key = ca.issue(tmp_path, "site", 3001)
    _, top = build(
        "--auth", f"passlib:{users}", "--listen", "tcp:1110:interface=127.0.0.1",
        "--tls-cert", str(cert), "--tls-key", str(key),
    )  # fmt: skip
    ca.issue(tmp_path, "site", 3002)
    outcome = top.reload()
    assert outcome is not None and outcome.tls_reloaded is True and outcome.error is None
    assert not any("Configuration" in t for t in texts(log_events))


def test_a_worker_reloads_its_own_settings_and_leaves_limits_to_its_parent(
    config: Config, log_events: list[LogEvent]
) -> None:
    """
    In a worker (it asks its parent's authority) a reload takes the rules
    and the failed-login settings; it logs what needs a restart and the
    summary at debug only: the parent speaks for the server.
    """
    options = Options()
    options.parseOptions(["--config", str(config.path), "--workers", "1", "--hash-workers", "0"])
    remote = RemoteAuthority(RelayClient(), options.throttle_settings())
    top = makeService(options, MemoryReactorClock(), inherited=[], authority=remote)
    config.set(failure_delay=0.25, deny=["192.0.2.0/24"], max_connections_per_address=5)
    config.set(listen="tcp:1111:interface=127.0.0.1")
    outcome = top.reload()
    assert outcome is not None and [c.key for c in outcome.kept] == ["listen"]
    assert remote.settings.failure_delay == 0.25
    assert top.factory is not None and not top.factory.policy.access.permits("192.0.2.1")
    assert [t for t in texts(log_events, LogLevel.warn) if "changed in" in t] == []
    assert [t for t in texts(log_events, LogLevel.info) if "Configuration" in t] == []
    assert any("Configuration reloaded" in t for t in texts(log_events, LogLevel.debug))


def test_a_worker_logs_a_bad_file_at_debug(config: Config, log_events: list[LogEvent]) -> None:
    """
    A bad edit is one error line for the whole server: the parent's.  A
    worker, which reads the same file, says it at debug only, a file that
    does not parse and a bad value alike.
    """
    options = Options()
    options.parseOptions(["--config", str(config.path), "--workers", "1", "--hash-workers", "0"])
    remote = RemoteAuthority(RelayClient(), options.throttle_settings())
    top = makeService(options, MemoryReactorClock(), inherited=[], authority=remote)
    config.path.write_text(toml(config.values) + "max_connections = [\n")
    outcome = top.reload()
    assert outcome is not None and outcome.error is not None
    config.set(max_connections_per_address=0)
    outcome = top.reload()
    assert outcome is not None and outcome.error is not None
    said = [t for t in texts(log_events) if "Configuration not reloaded" in t]
    assert len(said) == 2
    assert said == [t for t in texts(log_events, LogLevel.debug) if "not reloaded" in t]
    assert texts(log_events, LogLevel.error) == []
    assert texts(log_events, LogLevel.critical) == []


def test_a_worker_started_after_a_reload_starts_with_it(config: Config) -> None:
    """
    The parent hands a worker it starts later (one that died is replaced)
    the reloaded options and its authority's reloaded settings.
    """
    options, top = build("--config", str(config.path))
    own = local_authority(top)
    config.set(failure_delay=0.75, allow=["127.0.0.0/8"])
    top.reload()
    worker = _worker_build(options, own)(MemoryReactorClock(), [], RelayClient())
    assert isinstance(worker, Pop3Service) and worker.factory is not None
    authority = worker.factory.login.authority
    assert isinstance(authority, RemoteAuthority)
    assert authority.settings == own.settings
    assert isinstance(authority.settings, ThrottleSettings)
    assert authority.settings.failure_delay == 0.75
    assert worker.factory.policy.access.allow == (ipaddress.ip_network("127.0.0.0/8"),)


# --- L3: a real twistd pop3srv given SIGHUP -------------------------------------


class FileConfiguredServer(Pop3Server):
    """
    A C{twistd pop3srv} configured by a TOML file (listeners included, so
    the file can change them), with only C{--config} and what the test
    adds on the command line.
    """

    def __init__(self, root: Path, *extra: str, **settings: Any) -> None:
        super().__init__(root, *extra)
        self.config = Config(
            root / "pop3srv.toml",
            listen=f"tcp:{self.port}:interface=127.0.0.1",
            auth=f"passlib:{self.users}",
            mailbox=f"{self.mail}/{{user}}",
            **settings,
        )

    def argv(self) -> list[str]:
        return [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log}",
            "pop3srv",
            "--config",
            str(self.config.path),
            *self.extra,
        ]

    def reload(self, expected: str, lines: int = 1) -> None:
        """Send SIGHUP and wait until the log has C{lines} more with C{expected}."""
        assert self.process is not None
        wanted = self.log_text().count(expected) + lines
        self.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: self.log_text().count(expected) >= wanted), self.log_text()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[Callable[..., FileConfiguredServer]]:
    """C{file_server(*extra, **settings)}: started, with mail; stopped after the test."""
    servers: list[FileConfiguredServer] = []

    def start(*extra: str, **settings: Any) -> FileConfiguredServer:
        srv = FileConfiguredServer(tmp_path, *extra, **settings)
        servers.append(srv)
        for name in PASSWORDS:
            write_mbox(srv.mail / name, [b"Subject: hi\n\nhello\n"])
        srv.start()
        return srv

    yield start
    for srv in servers:
        srv.stop()


def hold(srv: Pop3Server, count: int, source: str) -> list[socket.socket]:
    """C{count} greeted connections from C{source}."""
    return [admit(srv, source) for _ in range(count)]


def refused(srv: Pop3Server, source: str) -> bool:
    """Whether a new connection from C{source} is refused for the per-address limit."""
    s, first = connect(srv, source)
    s.close()
    return first.startswith(TOO_MANY)


def test_sighup_changes_the_connection_limit_and_a_broken_edit_keeps_it(
    file_server: Callable[..., FileConfiguredServer],
) -> None:
    """
    The Done-when of issue 15: max_connections_per_address 2 -> 4 by an
    edit and SIGHUP, in the same process; then a broken edit is one error
    line naming the file and line, and the limit stays 4.
    """
    srv = file_server(max_connections_per_address=2)
    assert srv.process is not None
    pid = srv.process.pid
    source = "127.0.0.5"
    held = hold(srv, 2, source)
    try:
        assert refused(srv, source)
        srv.config.set(max_connections_per_address=4)
        srv.reload("Configuration reloaded from")
        assert "max_connections_per_address 2 -> 4" in srv.log_text()
        held += hold(srv, 2, source)
        assert refused(srv, source)

        # A syntax error on line 3, with good lines around it.
        lines = toml(srv.config.values).splitlines(keepends=True)
        srv.config.path.write_text("".join([*lines[:2], "lockout = 30 s\n", *lines[2:]]))
        line = 3
        srv.reload("Configuration not reloaded")
        assert f"Configuration not reloaded: {srv.config.path}:{line}: " in srv.log_text(), (
            srv.log_text()
        )
        assert "keeping the running configuration" in srv.log_text()
        assert refused(srv, source)
        held.pop().close()
        held.append(admit(srv, source))
        assert refused(srv, source)
        assert srv.process.pid == pid and srv.process.poll() is None
    finally:
        for s in held:
            s.close()


def test_sighup_with_a_changed_listener_says_it_needs_a_restart(
    file_server: Callable[..., FileConfiguredServer],
) -> None:
    """A changed listen is logged as needing a restart; the old port still serves."""
    srv = file_server()
    old = srv.config.values["listen"]
    srv.config.set(listen="tcp:1:interface=127.0.0.1")
    srv.reload("Configuration reloaded from")
    assert (
        f"listen changed in {srv.config.path}: needs a restart; keeping {old}" in srv.log_text()
    ), srv.log_text()
    s, first = connect(srv, "127.0.0.1")
    s.close()
    assert first.startswith(b"+OK")


def test_sighup_changes_the_limit_for_every_worker(
    file_server: Callable[..., FileConfiguredServer],
) -> None:
    """
    With --workers 2 the limit lives in the parent's authority: after the
    reload both processes admit up to the new total and refuse past it.
    """
    srv = file_server(
        "--workers", "2", "--hash-workers", "1", "--log-level", "debug",
        max_connections_per_address=2,
    )  # fmt: skip
    process = srv.process
    assert process is not None
    assert wait_for(lambda: len(children(process.pid)) == 1)
    # A worker signalled before it handles SIGHUP would miss the reload.
    assert wait_for(lambda: "is serving" in srv.log_text())
    both = server_pids(srv)
    source = "127.0.0.6"
    held = hold(srv, 2, source)
    try:
        # Whichever process takes them, the third and later are refused.
        assert all(refused(srv, source) for _ in range(6))
        srv.config.set(max_connections_per_address=4)
        # The parent's line (info) and the worker's (debug).
        srv.reload("Configuration reloaded from", lines=2)
        held += hold(srv, 2, source)
        assert all(refused(srv, source) for _ in range(6))
    finally:
        for s in held:
            s.close()

    # Each process reloads its own rules: both refuse a newly denied address.
    denied = "127.0.0.7"
    srv.config.set(deny=[f"{denied}/32"])
    srv.reload("Configuration reloaded from", lines=2)
    for n in range(60):
        s, first = connect(srv, denied)
        s.close()
        assert first.startswith(b"-ERR [SYS/PERM] Access denied"), (n, first)
        if n >= 3 and set(pids_of(srv, "connection-refused", denied, "ip-rules")) == both:
            break
    assert set(pids_of(srv, "connection-refused", denied, "ip-rules")) == both
