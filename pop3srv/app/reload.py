# -*- test-case-name: tests.test_reload -*-
"""
Live reload: what SIGHUP (C{systemctl reload}) does to a running server.

The process parses its own command line again, reading the configuration
file afresh (L{pop3srv.app.tap.Options.reparse}; the command line still
wins over the file), and compares the result with what it runs:

  - a file that does not parse, or a bad value, is one error line
    (C{Configuration not reloaded: FILE:LINE: ...; keeping the running
    configuration}) and nothing changes;
  - a setting in L{LIVE} that changed is applied to the connections that
    come after: the limits (in the L{LocalAuthority}, counts kept), the
    allow and deny rules, the plaintext and trusted networks, the timeouts,
    the bad-command limit, the login queue, the PROXY balancers and their
    header timeout, the log level, and the TLS settings (a certificate and
    key that do not load keep the running pair, as
    L{TLSContextSource.reload} does).  The idle and write-stall timeouts
    are read each time a timer starts, so open sessions take them at their
    next command too;
  - any other setting that changed (the listeners, C{workers}, the hashing
    processes, C{auth}, C{mailbox}, C{index_dir}, C{counters}, ... and any
    setting not in L{LIVE}) is logged as C{KEY changed in FILE: needs a
    restart; keeping VALUE} and left as it is.  So is turning TLS or the
    PROXY balancers on or off (L{LIVE_WHILE_SET}): that changes what each
    listener is built of;
  - one line says what was applied.

The certificate is re-read at every SIGHUP, even when the file is bad: a
renewal hook's reload must not wait for someone's typo to be fixed.

Every server process reloads itself (the parent passes SIGHUP on to its
workers): each reads the file, as each read it at start-up.  The limits
counted for the whole service live in the parent's L{LocalAuthority}, so
the parent's reload changes them for every process; a worker takes the
failed-login settings only to bound its own answers.  Only the parent (or
a single process) speaks for the server: it logs a bad file at error, what
needs a restart at warn and the summary at info; a worker, which reads the
same file, logs all three at debug, so that one edit is one line whatever
C{--workers} is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger, LogLevel

from pop3srv.app.config import SETTINGS, ConfigError
from pop3srv.server.authority import LocalAuthority
from pop3srv.server.limits import AccessRules, ConnectionLimits, ThrottleSettings
from pop3srv.server.protocol import POP3ServerFactory
from pop3srv.server.proxy import ProxyHeaderFactory
from pop3srv.server.tls import TLSContextSource, TLSMinimum

__all__ = [
    "LIVE",
    "LIVE_WHILE_SET",
    "Change",
    "ReloadOutcome",
    "Reloader",
    "compare",
    "needs_restart",
    "show",
]

#: The settings a reload applies, for the connections that come after.
LIVE: frozenset[str] = frozenset(
    {
        "idle_timeout",
        "auth_timeout",
        "tls_handshake_timeout",
        "write_stall_timeout",
        "tls_cert",
        "tls_key",
        "tls_min_version",
        "plaintext_auth_networks",
        "failure_delay",
        "max_failure_delay",
        "failure_window",
        "address_failure_limit",
        "user_failure_limit",
        "lockout",
        "trusted_networks",
        "max_connections",
        "max_connections_per_address",
        "max_sessions_per_user",
        "max_bad_commands",
        "allow",
        "deny",
        "proxy_networks",
        "proxy_header_timeout",
        "hash_queue",
        "log_level",
    }
)

#: Settings of L{LIVE} applied only while they are set before and after:
#: turning TLS or the PROXY balancers on or off changes what the
#: listeners are built of.
LIVE_WHILE_SET: frozenset[str] = frozenset({"tls_cert", "tls_key", "proxy_networks"})

#: Settings not compared: another name of one that is.
_ALIASES = frozenset({"hash_threads"})

#: The settings the certificate source is made of.
_TLS_KEYS = frozenset({"tls_cert", "tls_key", "tls_min_version"})


class ReloadableOptions(Protocol):
    """What a reload needs of the options (L{pop3srv.app.tap.Options})."""

    @property
    def auth_descriptions(self) -> list[str]: ...

    def __getitem__(self, key: str, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...

    def reparse(self) -> ReloadableOptions: ...

    def throttle_settings(self) -> ThrottleSettings: ...

    def connection_limits(self) -> ConnectionLimits: ...

    def access_rules(self) -> AccessRules: ...

    def login_gate_capacity(self) -> int: ...


class LogLevelControl(Protocol):
    """The log level, as L{pop3srv.app.logs.LogControl} sets it."""

    def set_level(self, level: str) -> None: ...


@dataclass(frozen=True)
class Change:
    """
    A setting whose value in the file is not the running one.

    @ivar key: the setting (C{auth} for the C{--auth} descriptions).
    @ivar old: the running value.
    @ivar new: the value read.
    """

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {show(self.old)} -> {show(self.new)}"


@dataclass
class ReloadOutcome:
    """
    What one reload did.

    @ivar error: why the configuration was not reloaded (one line), or
        L{None}.
    @ivar applied: the changes applied.
    @ivar kept: the changes not applied (they need a restart, or the new
        certificate did not load).
    @ivar tls_reloaded: whether the certificate was re-read and taken;
        L{None} without TLS.
    """

    error: str | None = None
    applied: list[Change] = field(default_factory=list)
    kept: list[Change] = field(default_factory=list)
    tls_reloaded: bool | None = None


def show(value: Any) -> str:
    """A setting's value as a log line gives it."""
    if value is None:
        return "(unset)"
    if isinstance(value, list | tuple):
        return ", ".join(show(v) for v in value) if value else "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def compare(running: ReloadableOptions, fresh: ReloadableOptions) -> list[Change]:
    """
    The settings whose values differ, in the order of L{SETTINGS}.

    @param running: the options the process runs with.
    @param fresh: the options just read.
    """
    changes = []
    for key in SETTINGS:
        if key in _ALIASES:
            continue
        if key == "auth":
            old: Any = list(running.auth_descriptions)
            new: Any = list(fresh.auth_descriptions)
        else:
            old, new = running[key], fresh[key]
        if old != new:
            changes.append(Change(key, old, new))
    return changes


def needs_restart(change: Change) -> bool:
    """Whether C{change} can only take effect with a restart."""
    if change.key in LIVE_WHILE_SET:
        return not change.old or not change.new
    return change.key not in LIVE


class Reloader:
    """
    Reloads the configuration of one server process, in place: the
    factory's settings, its policy and authority, the PROXY header readers
    and the certificate source are changed, and the running options are
    updated with what was applied (so a worker the parent starts after the
    reload starts with them).

    @ivar options: the running options.
    @ivar factory: the process's protocol factory.
    @ivar proxies: the PROXY header readers around it, if any.
    @ivar speaks_for_service: whether this process logs for the whole
        server (a single process, or the parent of workers) rather than
        as a worker.
    """

    _log = Logger()

    def __init__(
        self,
        options: ReloadableOptions,
        factory: POP3ServerFactory,
        proxies: Sequence[ProxyHeaderFactory] = (),
        *,
        speaks_for_service: bool = True,
    ) -> None:
        self.options = options
        self.factory = factory
        self.proxies = tuple(proxies)
        self.speaks_for_service = speaks_for_service

    @property
    def _info(self) -> LogLevel:
        return LogLevel.info if self.speaks_for_service else LogLevel.debug

    @property
    def _warn(self) -> LogLevel:
        return LogLevel.warn if self.speaks_for_service else LogLevel.debug

    @property
    def _error(self) -> LogLevel:
        return LogLevel.error if self.speaks_for_service else LogLevel.debug

    def reload(self, log_control: LogLevelControl | None = None) -> ReloadOutcome:
        """
        Read the configuration again and apply what can change live; the
        certificate is re-read whatever the file holds.

        @param log_control: what sets this process's log level; L{None}
            when the log observer is not pop3srv's (then a changed
            C{log_level} is not applied).
        """
        config = self.options["config"]
        if config is None:
            # Nothing to read: the command line has not changed.
            return ReloadOutcome(tls_reloaded=self._reload_tls(self.options))
        try:
            fresh = self.options.reparse()
        except ConfigError as e:
            return self._not_reloaded(str(e))
        except Exception as e:
            self._log.failure("Reading the configuration again failed", level=self._error)
            return self._not_reloaded(str(e) or type(e).__name__)

        outcome = ReloadOutcome()
        for change in compare(self.options, fresh):
            if needs_restart(change):
                self._keep(outcome, change, config, "needs a restart")
            elif change.key == "log_level" and log_control is None:
                self._keep(outcome, change, config, "the log observer is not pop3srv's")
            else:
                outcome.applied.append(change)
        outcome.tls_reloaded = self._reload_tls(
            _Overlay(self.options, {c.key: c.new for c in outcome.applied})
        )
        if outcome.tls_reloaded is False:
            # The pair did not load (logged): the running one stays, and
            # so do the settings that named the new one.
            for change in [c for c in outcome.applied if c.key in _TLS_KEYS]:
                outcome.applied.remove(change)
                outcome.kept.append(change)
        for change in outcome.applied:
            self.options[change.key] = change.new
        self._apply(log_control)

        summary = (
            "applied to new connections: " + "; ".join(str(c) for c in outcome.applied)
            if outcome.applied
            else "nothing to apply"
        )
        restarts = sum(1 for c in outcome.kept if needs_restart(c))
        if restarts:
            summary += (
                "; 1 changed setting needs a restart"
                if restarts == 1
                else f"; {restarts} changed settings need a restart"
            )
        self._log.emit(
            self._info,
            "Configuration reloaded from {config}; {summary}",
            config=config,
            summary=summary,
            applied=[c.key for c in outcome.applied],
            kept=[c.key for c in outcome.kept],
        )
        return outcome

    def _not_reloaded(self, reason: str) -> ReloadOutcome:
        self._log.emit(
            self._error,
            "Configuration not reloaded: {reason}; keeping the running configuration",
            reason=reason,
        )
        return ReloadOutcome(error=reason, tls_reloaded=self._reload_tls(self.options))

    def _keep(self, outcome: ReloadOutcome, change: Change, config: str, why: str) -> None:
        outcome.kept.append(change)
        self._log.emit(
            self._warn,
            "{key} changed in {config}: {why}; keeping {value}",
            key=change.key,
            config=config,
            why=why,
            value=show(change.old),
        )

    def _reload_tls(self, wanted: _Values) -> bool | None:
        """
        Re-read the certificate and key named by C{wanted} (and its lowest
        TLS version); if they do not load, keep the running ones, as they
        were named.

        @return: whether the new pair was taken; L{None} without TLS.
        """
        tls = self.factory.tls
        if not isinstance(tls, TLSContextSource):
            return None
        running = (tls.cert_path, tls.key_path, tls.minimum)
        tls.cert_path = wanted["tls_cert"]
        tls.key_path = wanted["tls_key"]
        tls.minimum = TLSMinimum(wanted["tls_min_version"])
        if tls.reload():
            return True
        tls.cert_path, tls.key_path, tls.minimum = running
        return False

    def _apply(self, log_control: LogLevelControl | None) -> None:
        """Set everything the running options make that can change live."""
        options, factory = self.options, self.factory
        policy = factory.policy
        policy.access = options.access_rules()
        policy.auth_timeout = options["auth_timeout"]
        policy.max_bad_commands = options["max_bad_commands"]
        policy.login_gate.capacity = options.login_gate_capacity()
        factory.idle_timeout = options["idle_timeout"]
        factory.plaintext_auth_networks = tuple(options["plaintext_auth_networks"])
        factory.tls_handshake_timeout = options["tls_handshake_timeout"]
        factory.write_stall_timeout = options["write_stall_timeout"]
        for proxy in self.proxies:
            proxy.trusted = tuple(options["proxy_networks"])
            proxy.header_timeout = options["proxy_header_timeout"]
        authority = factory.login.authority
        if isinstance(authority, LocalAuthority):
            authority.reconfigure(options.throttle_settings(), options.connection_limits())
        else:
            # A worker: the limits are counted by its parent, which reloads
            # them itself; the failed-login settings bound its own answers.
            authority.settings = options.throttle_settings()
        if log_control is not None and "log_level" in SETTINGS:
            log_control.set_level(options["log_level"])


class _Values(Protocol):
    """Settings by key."""

    def __getitem__(self, key: str, /) -> Any: ...


class _Overlay:
    """The running options with the changes about to be applied on top."""

    def __init__(self, running: ReloadableOptions, changed: Mapping[str, Any]) -> None:
        self._running = running
        self._changed = changed

    def __getitem__(self, key: str, /) -> Any:
        return self._changed[key] if key in self._changed else self._running[key]
