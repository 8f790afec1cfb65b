# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd pop3srv} command: options, configuration file and service.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.cred import credentials, strcred
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, tcp
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from pop3srv import __version__
from pop3srv.app.config import (
    ENDPOINT_HINT,
    MAX_ANSWER_DELAY,
    SETTINGS,
    ConfigError,
    convert,
    listen_backlog,
    load_config,
    with_backlog,
)
from pop3srv.app.control import (
    ControlSocket,
    ControlSocketError,
    ProcessReport,
    ReportResponder,
    ServerView,
    control_path,
)
from pop3srv.app.logs import (
    CertificateExpiryWarning,
    LogControl,
    LogSetupError,
    TwistdLogging,
    startup_summary,
)
from pop3srv.app.metricsweb import MetricsListenError, listen_metrics
from pop3srv.app.reload import Reloader, ReloadOutcome
from pop3srv.app.systemd import Notifier
from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.realm import (
    MAILDIR_UIDL_FORMAT,
    MboxRealm,
    check_mailbox_template,
    split_mailbox_template,
)
from pop3srv.mbox.sweep import sweep_spool
from pop3srv.mbox.uidlformat import UidlFormat
from pop3srv.processes import malloc
from pop3srv.processes.authorityrpc import RemoteAuthority
from pop3srv.processes.hashpool import ProcessVerifier
from pop3srv.processes.hashrelay import RelayClient
from pop3srv.processes.supervisor import (
    AdoptedPortService,
    Build,
    ListeningService,
    WorkerSupervisor,
)
from pop3srv.server.authority import IPolicyAuthority, LocalAuthority
from pop3srv.server.limits import (
    AccessRules,
    ConnectionLimits,
    IAuthCounters,
    LoginGate,
    MemoryCounters,
    ThrottleSettings,
    events_to_keep,
)
from pop3srv.server.metrics import PROCESS, merge, render_text, start_counting
from pop3srv.server.protocol import POP3ServerFactory, ServerPolicy
from pop3srv.server.proxy import ProxyHeaderFactory
from pop3srv.server.rediscounters import CountersService, counters_for, parse_counters_url
from pop3srv.server.tls import TLSConfigError, TLSContextSource, TLSMinimum

DEFAULT_AUTH = SETTINGS["auth"].default[0]

#: What L{Options.parseOptions} puts before a usage error.
_USAGE_PREFIX = "twistd pop3srv: "

#: Seconds a stopping server process gives the commits in progress (the
#: UPDATE state after QUIT) to finish, once it has stopped accepting;
#: sessions still open after that are closed without committing, as a
#: dropped connection is.  Below the supervisor's C{STOP_TIMEOUT}.
DRAIN_TIMEOUT = 10.0

_log = Logger()


class _ParseOnlyReactor:
    """
    The reactor of endpoints built only to check their descriptions:
    endpoints keep their reactor and use it only to listen.  (Twisted's
    MemoryReactor would do, but its module loads trial and unittest, about
    3 MiB in every server process.)
    """


def _make_checker(description: str) -> Any:
    """
    C{strcred.makeChecker}, but C{passlib:} is built without a plugin scan,
    which would import every checker plugin installed (Twisted's C{sshkeys}
    loads conch: about 1 MiB in every server process).
    """
    from twisted.plugins.pop3srv_cred import thePasslibCheckerFactory

    auth_type, _, argstring = description.partition(":")
    if auth_type == thePasslibCheckerFactory.authType:
        return thePasslibCheckerFactory.generateChecker(argstring)
    return strcred.makeChecker(description)


def _endpoint_problem(description: str) -> str | None:
    """
    What is wrong with an endpoint description that can be told without
    listening (its syntax, a port out of range, a UNIX socket's missing
    directory), in a few words with the right form; L{None} if nothing.
    """
    if description.split(":", 1)[0].lower() == "haproxy":
        # Twisted's haproxy: endpoint takes the header from anyone who can
        # connect, so any client could claim any address.
        return (
            "the haproxy: endpoint honours a PROXY header from anyone; listen on a "
            "plain endpoint and name the balancers with --proxy-networks CIDRS"
        )
    try:
        endpoint = endpoints.serverFromString(_ParseOnlyReactor(), description)
    except Exception as e:
        # Twisted's own words are about its parser's arguments ("got
        # multiple values for argument 'interface'"): add the right form.
        reason = str(e) or type(e).__name__
        return f"{reason}; {ENDPOINT_HINT}"
    port = getattr(endpoint, "_port", None)
    if isinstance(endpoint, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint) and (
        not isinstance(port, int) or not 0 <= port <= 65535
    ):
        return f"port {port} is out of range (0 to 65535)"
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        directory = os.path.dirname(os.path.abspath(endpoint._address))
        if not os.path.isdir(directory):
            return f"directory {directory} does not exist"
    return None


def _repeatable_option(key: str) -> Callable[[Options, str], None]:
    def opt(self: Options, value: str) -> None:
        self.given.setdefault(key, []).append(value)

    opt.__doc__ = SETTINGS[key].help
    return opt


def _bytes_keyed(checker: Any) -> Any:
    """
    Twisted's C{memory} checker plugin stores names and passwords as text,
    but cred credentials carry bytes, so as built it never matches; store
    them as bytes.
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in checker.users.items()
        }
    return checker


class Options(usage.Options, strcred.AuthOptionMixin):
    """Options of C{twistd pop3srv}; the command line wins over C{--config}."""

    synopsis = "[options]"
    longdesc = (
        "Serve mbox maildrops over POP3. Every option can also be set in the "
        "TOML file given with --config (key: the option name with underscores); "
        "the command line wins."
    )
    supportedInterfaces = [credentials.IUsernamePassword, credentials.IUsernameHashedPassword]

    optParameters = [["config", "c", None, "TOML configuration file."]] + [
        [s.key.replace("_", "-"), None, None, f"{s.help} [default: {s.default}]"]
        for s in SETTINGS.values()
        if not s.repeatable
    ]

    def __init__(self) -> None:
        self.given: dict[str, list[str]] = {}
        #: The arguments parsed, kept for a reload to parse them again
        #: (L{reparse}); L{None} until parsed.
        self.argv: list[str] | None = None
        #: The C{--auth} descriptions in effect (command line, file or default).
        self.auth_descriptions: list[str] = []
        #: Settings accepted but changed, one line each, logged at start-up.
        self.warnings: list[str] = []
        super().__init__()

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, and turn a usage error into one line on stderr and exit
        status 1, rather than twistd's full usage text around it.
        """
        self.argv = list(options) if options is not None else sys.argv[1:]
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"{_USAGE_PREFIX}{e}") from None

    opt_listen = _repeatable_option("listen")
    opt_listen_tls = _repeatable_option("listen_tls")
    opt_plaintext_auth_networks = _repeatable_option("plaintext_auth_networks")
    opt_trusted_networks = _repeatable_option("trusted_networks")
    opt_allow = _repeatable_option("allow")
    opt_deny = _repeatable_option("deny")
    opt_proxy_networks = _repeatable_option("proxy_networks")

    def opt_auth(self, description: str) -> None:
        """Credential checker, e.g. passlib:/etc/pop3srv/users (repeatable)."""
        self._add_auth(description, "--auth")

    def _add_auth(self, description: str, where: str) -> None:
        self.auth_descriptions.append(description)
        try:
            self.addChecker(_bytes_keyed(_make_checker(description)))
        except strcred.UnsupportedInterfaces:
            raise usage.UsageError(
                f"{where} {description!r}: this checker cannot check passwords"
            ) from None
        except strcred.InvalidAuthType as e:
            raise usage.UsageError(
                f"{where} {description!r}: no checker plugin named {e.args[0]!r} (see --help-auth)"
            ) from None
        except Exception as e:
            raise usage.UsageError(f"{where} {description!r}: {e}") from None

    def postOptions(self) -> None:
        try:
            self._settle()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _settle(self) -> None:
        """Merge command line, file and defaults into C{self[key]}; validate."""
        found: dict[str, Any] = {}
        locate: Callable[[str], str] = lambda key: SETTINGS[key].option  # noqa: E731
        if self["config"]:
            found, locate = load_config(self["config"])
        origin: dict[str, str] = {}
        for key, setting in SETTINGS.items():
            if key == "auth":
                continue
            raw = self.given.get(key) if setting.repeatable else self.get(key.replace("_", "-"))
            if raw is not None:
                self[key], origin[key] = convert(setting, raw, setting.option), setting.option
            elif key in found:
                self[key], origin[key] = found[key], locate(key)
            else:
                default = setting.default
                self[key] = None if default is None else convert(setting, default, setting.option)
                origin[key] = setting.option

        endpoints_given = [(k, d) for k in ("listen", "listen_tls") for d in self[k]]
        if self["metrics"]:
            endpoints_given.append(("metrics", self["metrics"]))
        for key, description in endpoints_given:
            problem = _endpoint_problem(description)
            if problem is not None:
                raise ConfigError(f"{origin[key]}: bad endpoint {description!r}: {problem}")
        try:
            check_mailbox_template(self["mailbox"])
        except ValueError as e:
            raise ConfigError(f"{origin['mailbox']}: {e}") from None
        if self["index_dir"] is not None and not os.path.isdir(self["index_dir"]):
            raise ConfigError(f"{origin['index_dir']}: {self['index_dir']}: not a directory")
        if self["uidl_format"] is not None:
            if split_mailbox_template(self["mailbox"])[0] == "maildir":
                raise ConfigError(
                    f"{origin['uidl_format']}: {MAILDIR_UIDL_FORMAT}; the mailbox "
                    f"({origin['mailbox']}) is {self['mailbox']}"
                )
            try:
                UidlFormat.parse(self["uidl_format"])
            except ValueError as e:
                raise ConfigError(f"{origin['uidl_format']}: uidl_format: {e}") from None
        self["tls"] = self._tls(origin)
        try:
            parse_counters_url(self["counters"])
        except ValueError as e:
            raise ConfigError(f"{origin['counters']}: {e}") from None
        if self["hash_workers"] is None:
            # The old name still works; otherwise one hashing process per
            # CPU, shared out among the server processes' pools unless they
            # share one (hashrelay).
            cpus = os.cpu_count() or 1
            self["hash_workers"] = (
                self["hash_threads"]
                if self["hash_threads"] is not None
                else cpus
                if self["hash_pool"] == "shared"
                else max(1, cpus // self["workers"])
            )
        self["hash_threads"] = self["hash_workers"]
        self["log_control"] = LogControl(self["log_level"], self["log_format"])
        if self["max_failure_delay"] > MAX_ANSWER_DELAY:
            # An old configuration (the default was 30) still starts.
            self.warnings.append(
                f"{origin['max_failure_delay']}: max_failure_delay "
                f"{self['max_failure_delay']:g} is above {MAX_ANSWER_DELAY:g} s, which clients "
                f"wait at most; using {MAX_ANSWER_DELAY:g}"
            )
            self["max_failure_delay"] = MAX_ANSWER_DELAY

        if not self.get("credCheckers"):
            for description in found.get("auth", [DEFAULT_AUTH]):
                self._add_auth(description, locate("auth") if "auth" in found else "default --auth")

    def _tls(self, origin: dict[str, str]) -> TLSContextSource | None:
        cert, key = self["tls_cert"], self["tls_key"]
        if cert is None and key is None:
            if self["listen_tls"]:
                raise ConfigError(
                    f"{origin['listen_tls']}: implicit TLS needs --tls-cert and --tls-key"
                )
            return None
        if cert is None or key is None:
            missing = "tls_cert" if cert is None else "tls_key"
            raise ConfigError(f"{origin[missing]}: --tls-cert and --tls-key go together")
        try:
            return TLSContextSource(cert, key, TLSMinimum(self["tls_min_version"]))
        except TLSConfigError as e:
            raise ConfigError(str(e)) from None

    def policy(
        self,
        counters: IAuthCounters | None = None,
        authority: IPolicyAuthority | None = None,
        clock: Any = None,
    ) -> ServerPolicy:
        """
        The abuse limits these options set.

        @param counters: where the failure counts and blocks are kept, for
            the L{LocalAuthority} made when C{authority} is L{None}; this
            process's memory if L{None}.
        @param authority: the authority to ask (a child process asks its
            parent's); if L{None}, a new L{LocalAuthority} with these
            options' limits over C{counters} (the single process, or the
            parent: its C{policy().authority}).
        @param clock: the new L{LocalAuthority}'s time; the global reactor
            if L{None}.
        """
        if authority is None:
            authority = LocalAuthority(
                self.throttle_settings(),
                self.connection_limits(),
                counters if counters is not None else MemoryCounters(),
                clock=clock,
            )
        return ServerPolicy(
            authority=authority,
            access=self.access_rules(),
            login_gate=LoginGate(self.login_gate_capacity()),
            auth_timeout=self["auth_timeout"],
            max_bad_commands=self["max_bad_commands"],
        )

    def throttle_settings(self) -> ThrottleSettings:
        """The failed-login limits these options set."""
        return ThrottleSettings(
            failure_delay=self["failure_delay"],
            max_failure_delay=self["max_failure_delay"],
            address_limit=self["address_failure_limit"],
            pair_limit=self["user_failure_limit"],
            window=self["failure_window"],
            lockout=self["lockout"],
            trusted=tuple(self["trusted_networks"]),
        )

    def connection_limits(self) -> ConnectionLimits:
        """The connection and session limits these options set."""
        return ConnectionLimits(
            max_connections=self["max_connections"],
            max_per_address=self["max_connections_per_address"],
            max_sessions_per_user=self["max_sessions_per_user"],
        )

    def access_rules(self) -> AccessRules:
        """The allow and deny rules these options set."""
        return AccessRules(allow=tuple(self["allow"]), deny=tuple(self["deny"]))

    def login_gate_capacity(self) -> int:
        """How many logins of one server process may be checked or wait to be."""
        return max(1, self["hash_workers"]) + self["hash_queue"]

    def reparse(self) -> Options:
        """
        These options parsed again from the same command line, the
        configuration file read again, for a reload (L{pop3srv.app.reload})
        to compare with the running ones: the C{--auth} checkers are only
        named (L{auth_descriptions}), not built, and a certificate and key
        that do not load are left for the reload to judge (it keeps the
        running pair, as L{TLSContextSource.reload} does).

        @raise ConfigError: the file or a value is bad, in the one line
            start-up would give (C{file:line: ...}).
        """
        if self.argv is None:
            raise ConfigError("these options were not parsed from a command line")
        fresh = _Reparsed()
        try:
            fresh.parseOptions(self.argv)
        except SystemExit as e:
            raise ConfigError(str(e.code).removeprefix(_USAGE_PREFIX)) from None
        return fresh


class _Reparsed(Options):
    """L{Options} parsed again for a reload (L{Options.reparse})."""

    def _add_auth(self, description: str, where: str) -> None:
        self.auth_descriptions.append(description)
        # Stands for the checker a restart would build, so that the file's
        # are added only when the command line names none, as at start-up.
        self.setdefault("credCheckers", []).append(description)

    def _tls(self, origin: dict[str, str]) -> TLSContextSource | None:
        try:
            return super()._tls(origin)
        except ConfigError:
            if self["tls_cert"] is None or self["tls_key"] is None:
                raise
            # Both are named, and the pair does not load: the reload keeps
            # the running pair and logs why.
            return None


class Pop3Service(service.MultiService):
    """
    The listening services.  A port that cannot be bound ends start-up in one
    line; SIGHUP re-reads the configuration file and the TLS certificate
    (L{reload}).  A stop (SIGTERM, SIGINT)
    stops accepting, lets the commits in progress finish (at most
    L{DRAIN_TIMEOUT} seconds), then stops the rest; the process exits 0.
    """

    _log = Logger()

    def __init__(self, tls: TLSContextSource | None, reactor: Any) -> None:
        super().__init__()
        self.tls = tls
        self._reactor = reactor
        self._previous_handler: Any = None
        #: The workers (C{--workers} above 1), told of SIGHUP too.
        self.supervisor: WorkerSupervisor | None = None
        #: The protocol factory, whose commits a stop waits for.
        self.factory: POP3ServerFactory | None = None
        #: Tells systemd (Type=notify) when we are ready, reloading, stopping.
        self.notifier = Notifier(None)
        #: Applies a reload of the configuration (set by L{makeService});
        #: without one, SIGHUP re-reads only the certificate.
        self.reloader: Reloader | None = None
        #: The log level and format every process filters and writes with.
        self.log_control: LogControl | None = None
        #: twistd's log observer, chosen when twistd adopts this service.
        self.logging: TwistdLogging | None = None
        #: Called once every service has started (the start-up log line).
        self.on_started: Callable[[], object] | None = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands us its Application here, before it begins logging:
        # the one moment to choose its log observer (pop3srv.app.logs).
        if self.logging is not None:
            self.logging.attach(parent)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None

    def startService(self) -> None:
        super().startService()
        # Always: without a handler, SIGHUP (systemctl reload) would kill us.
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if hasattr(self._reactor, "sigTerm"):
            # The reactor installs these when it runs, after this.  Twisted's
            # own raise ReactorNotRunning (a traceback in the log) at a
            # second signal, which a worker gets whenever systemd signals
            # the whole group as the parent passes the stop on; and they
            # make twistd end by the signal instead of exiting 0.
            self._reactor.sigTerm = self._reactor.sigInt = self._on_stop_signal
        # Every listener is bound by now (in makeService, or adopted).
        self.notifier.ready()
        if self.on_started is not None:
            self.on_started()

    def _on_stop_signal(self, signum: int, frame: object = None) -> None:
        # Nothing but the hand-over here: logging inside a signal handler can
        # interrupt a write to the same log ("reentrant call").
        self._reactor.callFromThread(self._stop_reactor, signum)

    def _stop_reactor(self, signum: int | None = None) -> None:
        if signum is not None:
            self._log.info(
                "Received {signal}, shutting down.", signal=signal.Signals(signum).name
            )
        with contextlib.suppress(ReactorNotRunning):
            self._reactor.stop()

    def stopService(self) -> defer.Deferred[Any]:
        self.notifier.stopping()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        # First stop accepting, here and in the workers (which drain as
        # this process does, meanwhile), then wait for the commits.
        first = [
            child
            for child in self
            if isinstance(child, ListeningService | AdoptedPortService | WorkerSupervisor)
        ]
        d: defer.Deferred[Any] = defer.DeferredList(
            [defer.maybeDeferred(child.stopService) for child in first]
        )
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: super(Pop3Service, self).stopService())
        return d

    def _drain(self) -> defer.Deferred[None]:
        """Fires once no commit is in progress, or after L{DRAIN_TIMEOUT}."""
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self._reactor.seconds() + DRAIN_TIMEOUT

        def check() -> None:
            commits = self.factory.commits if self.factory is not None else set()
            if not commits:
                done.callback(None)
            elif self._reactor.seconds() >= deadline:
                self._log.warn(
                    "{count} commits still in progress after {timeout:g} s; stopping without them",
                    count=len(commits),
                    timeout=DRAIN_TIMEOUT,
                )
                done.callback(None)
            else:
                self._reactor.callLater(0.05, check)

        check()
        return done

    def _on_sighup(self, signum: int, frame: object) -> None:
        # A signal handler may interrupt the reactor anywhere; do the work in it.
        self._reactor.callFromThread(self._reload)
        if self.supervisor is not None:
            self._reactor.callFromThread(self.supervisor.signal_all, "HUP")

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            self.reload()
        finally:
            self.notifier.ready()

    def reload(self) -> ReloadOutcome | None:
        """
        Re-read the configuration file and the certificate, and apply what
        can change without a restart (L{pop3srv.app.reload}); for SIGHUP
        and embedders.

        @return: what was applied and what was kept; L{None} without a
            reloader (only the certificate was re-read).
        """
        if self.reloader is None:
            self.reload_tls()
            return None
        return self.reloader.reload(self.log_control)

    def reload_tls(self) -> bool:
        """Re-read the certificate and key (for embedders and SIGHUP)."""
        if self.tls is None:
            return False
        return self.tls.reload()


class ThreadPoolService(service.Service):
    """
    Runs the thread pool for SCRAM lookups and the spool sweep, and for
    password checks with C{--hash-workers 0}.
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="pop3srv-threads")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        self.pool.stop()
        return super().stopService()


class VerifierService(service.Service):
    """Starts the password-hashing processes with the server, stops them with it."""

    def __init__(self, verifier: ProcessVerifier) -> None:
        self.verifier = verifier

    def startService(self) -> None:
        super().startService()
        # Started now, so the first logins do not wait for process start-up.
        self.verifier.start()

    def stopService(self) -> Any:
        self.verifier.stop()
        return super().stopService()


class SpoolSweepService(service.Service):
    """At start-up, cleans the mail spool after a crash, in a thread of the pool."""

    _log = Logger()

    def __init__(
        self, template: str, index_dir: str | None, reactor: Any, pool: ThreadPool
    ) -> None:
        self.template = template
        self.index_dir = index_dir
        self._reactor = reactor
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        d = deferToThreadPool(self._reactor, self._pool, sweep_spool, self.template, self.index_dir)
        d.addErrback(lambda f: self._log.failure("Sweeping the mail spool failed", f))


class _IPv6OnlyPort(tcp.Port):
    """A TCP port on an IPv6 address that takes no IPv4 connections."""

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return s


class _IPv6WildcardEndpoint:
    """
    Listens on every IPv6 address (C{::}), beside an IPv4 listener on
    every IPv4 address: a port that took IPv4 too would see IPv4 clients
    as IPv4-mapped IPv6 addresses (C{::ffff:192.0.2.1}) in the log, where
    fail2ban would ban the IPv6 form.  Dovecot's C{*, ::} does the same.
    """

    def __init__(self, reactor: Any, port: int, backlog: int) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> Any:
            port = _IPv6OnlyPort(self._port, factory, self._backlog, "::", self._reactor)
            port.startListening()
            return port

        return defer.execute(start)

    def __repr__(self) -> str:
        return f"<IPv6 endpoint [::]:{self._port}>"


def _ipv6_available() -> bool:
    """Whether this host can listen on IPv6 (a kernel or container may lack it)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        # Whatever the reason (no IPv6 in the kernel, none on loopback, a
        # security module saying no), serve IPv4 rather than fail.
        return False
    return True


def _endpoints(reactor: Any, description: str) -> list[Any]:
    """
    The endpoints to listen on for one description: C{tcp:PORT} with no
    interface means every address, IPv4 and (where the host has it) IPv6,
    as an admin expects of a mail server; anything else is Twisted's.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    if (
        type(endpoint) is endpoints.TCP4ServerEndpoint
        and not endpoint._interface
        and not isinstance(reactor, _ParseOnlyReactor)
        and _ipv6_available()
    ):
        return [endpoint, _IPv6WildcardEndpoint(reactor, endpoint._port, endpoint._backlog)]
    return [endpoint]


def _worker_build(options: Options, own: LocalAuthority) -> Build:
    """
    How a worker builds its service: as here, on the sockets it inherits,
    asking the parent's policy authority.  A worker started after a reload
    starts with what the reload applied (it updates C{options} and C{own}).

    @param own: the parent's authority.
    """

    def build(reactor: Any, inherited: list[tuple[int, str]], parent: RelayClient) -> Pop3Service:
        authority = RemoteAuthority(parent, own.settings)
        return makeService(
            options, reactor, inherited=inherited, parent=parent, authority=authority
        )

    return build


def _log_startup(options: Options) -> None:
    """The start-up line: version, configuration, listeners, checkers, users, certificate."""
    tls = options["tls"]
    cert = tls.certificate if tls is not None else None
    files = [c.users for c in options["credCheckers"] if isinstance(c, PasslibChecker)]
    startup_summary(
        version=__version__,
        config=options["config"],
        listen=options["listen"],
        listen_tls=options["listen_tls"],
        checkers=options.auth_descriptions,
        users=sum(len(f) for f in files) if files else None,
        cert_subject=cert.subject.rfc4514_string() if cert is not None else None,
        cert_not_after=cert.not_valid_after_utc if cert is not None else None,
    )


def makeService(
    options: Options,
    reactor: Any = None,
    inherited: list[tuple[int, str]] | None = None,
    parent: RelayClient | None = None,
    authority: IPolicyAuthority | None = None,
) -> Pop3Service:
    """
    Assemble the services: one listener per endpoint, the hashing processes,
    and, for C{--workers} above 1, the workers.

    @param options: parsed options.
    @param reactor: the reactor; the global one if L{None}.
    @param inherited: in a worker (L{pop3srv.processes.supervisor}), the
        listening sockets it inherited, as C{(fd, "plain" or "tls")}: they
        are adopted instead of binding the endpoints, no workers are started
        and the spool is not swept (the parent does that).
    @param parent: in a worker, its connection to the parent server
        process, to whose hashing pool its checks go with C{--hash-pool
        shared} (L{pop3srv.processes.hashrelay}).
    @param authority: the policy authority to ask (in a worker, its
        parent's, a L{RemoteAuthority}); if L{None}, a new L{LocalAuthority}
        (L{Options.policy}), which answers the workers too.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    malloc.tune()
    tls = options["tls"]
    top = Pop3Service(tls, reactor)
    top.log_control = options["log_control"]
    for warning in options.warnings:
        _log.warn("{warning}", warning=warning)
    threads = ThreadPoolService(max(1, options["hash_workers"]))
    threads.setServiceParent(top)
    relay = parent if options["hash_pool"] == "shared" else None
    checkers = []
    verifiers: dict[str, Any] = {}
    for checker in options["credCheckers"]:
        if isinstance(checker, PasslibChecker):
            verify = None
            if options["hash_workers"] > 0:
                # Verify in processes: a backend that holds the GIL (pure-Python
                # sha512_crypt) would otherwise stall every session.
                if relay is not None:
                    verify = relay.verifier(checker.users.path)
                else:
                    verifier = ProcessVerifier(checker.users, options["hash_workers"], reactor)
                    VerifierService(verifier).setServiceParent(top)
                    verify = verifier.verify_detailed
                verifiers[checker.users.path] = verify
            checker = PasslibChecker(
                checker.users, reactor=reactor, threadpool=threads.pool, verifier=verify
            )
        checkers.append(checker)
    realm = MboxRealm(
        options["mailbox"],
        index_dir=options["index_dir"],
        uidl_format=options["uidl_format"],
        reuse_xuidl=None if options["reuse_xuidl"] == "auto" else options["reuse_xuidl"] == "yes",
    )
    counters = None
    if authority is None:
        # This process keeps the counts (a single process, or the parent of
        # workers, which ask it): only it talks to Redis.
        counters = counters_for(
            options["counters"],
            reactor,
            max_events=events_to_keep(options.throttle_settings()),
        )
        CountersService(counters).setServiceParent(top)
    policy = options.policy(counters=counters, authority=authority, clock=reactor)
    factory = POP3ServerFactory(
        Portal(realm, checkers),
        idle_timeout=options["idle_timeout"],
        reactor=reactor,
        tls=tls,
        plaintext_auth_networks=options["plaintext_auth_networks"],
        policy=policy,
        tls_handshake_timeout=options["tls_handshake_timeout"],
        write_stall_timeout=options["write_stall_timeout"],
    )
    top.factory = factory
    if parent is not None:
        # The parent asks each worker for its sessions and metrics
        # (pop3srv.app.control), on the connection the worker has to it.
        parent.answer_with(ReportResponder(ProcessReport.of(factory, PROCESS)))
    # Each server process counts its own events, sessions and certificate;
    # a worker first forgets the numbers it forked with.
    start_counting(sessions=factory.sessions, tls=tls, forked=inherited is not None)
    factories: dict[str, Any] = {"plain": factory}
    listeners = [(d, "plain") for d in options["listen"]]
    if options["listen_tls"]:
        factories["tls"] = TLSMemoryBIOFactory(tls, False, factory, clock=reactor)
        listeners += [(d, "tls") for d in options["listen_tls"]]
    if options["proxy_networks"]:
        # Outermost: the header comes before anything else, a TLS
        # handshake included.
        factories = {
            kind: ProxyHeaderFactory(
                wrapped,
                options["proxy_networks"],
                reactor,
                options["proxy_header_timeout"],
                health_reply=b"+OK pop3srv ready\r\n" if kind == "plain" else b"",
            )
            for kind, wrapped in factories.items()
        }
    top.reloader = Reloader(
        options,
        factory,
        [f for f in factories.values() if isinstance(f, ProxyHeaderFactory)],
        speaks_for_service=inherited is None,
    )
    if inherited is not None:
        for fd, kind in inherited:
            AdoptedPortService(reactor, fd, factories[kind]).setServiceParent(top)
        return top
    # Only here, in the process systemd started: it takes NOTIFY_SOCKET out
    # of the environment, so no child can speak for the service.
    top.notifier = Notifier.from_environment()
    try:
        top.logging = TwistdLogging.for_twistd(options.parent, options["log_control"])
    except LogSetupError as e:
        raise SystemExit(f"twistd pop3srv: {e}") from None
    top.on_started = lambda: _log_startup(options)
    if tls is not None:
        CertificateExpiryWarning(
            lambda: tls.certificate.not_valid_after_utc, reactor
        ).setServiceParent(top)
    servers = []
    backlog = listen_backlog()
    for description, kind in listeners:
        for endpoint in _endpoints(reactor, with_backlog(description, backlog)):
            server = ListeningService(endpoint, factories[kind], kind)
            server.setServiceParent(top)
            servers.append(server)
            try:
                # Now, not when the service starts: twistd (without -n)
                # turns into a daemon in between, and a daemon's start-up
                # error reaches the terminal only as an exception's class
                # name and a pointer to the log (or not at all: it waits
                # for ever on a SystemExit).
                server.bind()
            except CannotListenError as e:
                raise SystemExit(f"twistd pop3srv: {e}") from None
            except Exception as e:
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise SystemExit(
                    f"twistd pop3srv: cannot listen on {description!r}: {reason}"
                ) from None
    if options["workers"] > 1:
        # The workers ask this process's authority, so it must be one that
        # keeps the counts here.
        own = policy.authority
        if not isinstance(own, LocalAuthority):
            raise ValueError("--workers above 1 needs this process's own LocalAuthority")
        # Added after the listeners: it starts once every port is bound, to
        # pass them on.
        top.supervisor = WorkerSupervisor(
            reactor,
            options["workers"] - 1,
            servers,
            _worker_build(options, own),
            log_observer=options["log_control"].worker_observer,
            verifiers=verifiers if options["hash_pool"] == "shared" else None,
            authority=own,
        )
        top.supervisor.setServiceParent(top)
    # One view of every server process, for the metrics endpoint and the
    # control socket, which this process alone serves.
    supervisor = top.supervisor
    view = ServerView(
        ProcessReport.of(factory, PROCESS),
        reactor,
        merge,
        children=supervisor.connections if supervisor is not None else lambda: [],
    )
    if options["metrics"]:
        # Every worker's numbers are gathered per scrape.
        try:
            listen_metrics(reactor, options["metrics"], view.metrics).setServiceParent(top)
        except MetricsListenError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None
    control = control_path(options["control_socket"])
    if control is not None:
        control_socket = ControlSocket(control, view, render_text, reactor)
        try:
            # Now, as the listeners: a problem is reported on the terminal.
            control_socket.bind()
        except ControlSocketError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None
        control_socket.setServiceParent(top)
    # Last, so that its thread starts after the hashing processes and the
    # workers are forked: a fork copies the locks other threads hold at that
    # moment.
    if split_mailbox_template(options["mailbox"])[0] == "mbox":
        # A Maildir leaves no commit debris: its deletions are unlinks.
        SpoolSweepService(
            options["mailbox"], options["index_dir"], reactor, threads.pool
        ).setServiceParent(top)
    return top
