# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd pop3srv} command: options, configuration file and service.
"""

from __future__ import annotations

import ipaddress
import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred import credentials, strcred
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from pop3srv.config import ConfigError, load_config
from pop3srv.protocol import LOOPBACK_NETWORKS, MIN_IDLE_TIMEOUT, POP3ServerFactory
from pop3srv.realm import MboxRealm, check_mailbox_template
from pop3srv.tls import TLSConfigError, TLSContextSource, TLSMinimum

DEFAULT_LISTEN = "tcp:110"
DEFAULT_MAILBOX = "/var/mail/{user}"
DEFAULT_AUTH = "passlib:/etc/pop3srv/users"
DEFAULT_PLAINTEXT_AUTH_NETWORKS = ",".join(str(n) for n in LOOPBACK_NETWORKS)


def _option_name(key: str) -> str:
    return f"--{key.replace('_', '-')}"


class Options(usage.Options, strcred.AuthOptionMixin):
    """Options of C{twistd pop3srv}; the command line wins over C{--config}."""

    synopsis = "[options]"
    longdesc = (
        "Serve mbox maildrops over POP3. Every option can also be set in the "
        "TOML file given with --config; the command line wins."
    )
    supportedInterfaces = [credentials.IUsernamePassword, credentials.IUsernameHashedPassword]

    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["mailbox", "m", None, f"Path template of each user's mbox [default: {DEFAULT_MAILBOX}]."],
        ["idle-timeout", None, None,
         f"Seconds of client silence before autologout (at least {MIN_IDLE_TIMEOUT}) "
         f"[default: {MIN_IDLE_TIMEOUT}]."],
        ["index-dir", None, None, "Directory for UIDL indexes [default: beside each mbox]."],
        ["tls-cert", None, None, "PEM file: the certificate, then any intermediates."],
        ["tls-key", None, None, "PEM file: the certificate's private key."],
        ["tls-min-version", None, None, "Lowest TLS version accepted: 1.2 or 1.3 [default: 1.2]."],
        ["plaintext-auth-networks", None, None,
         "Comma-separated networks whose clients may log in without TLS "
         f"[default: {DEFAULT_PLAINTEXT_AUTH_NETWORKS}]."],
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["listen-tls"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, and turn a usage error into one line on stderr and exit
        status 1, rather than twistd's full usage text around it.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to serve POP3 on, e.g. tcp:110 (repeatable) [default: tcp:110]."""
        self["listen"].append(endpoint)

    def opt_listen_tls(self, endpoint: str) -> None:
        """Endpoint to serve POP3 over implicit TLS on, e.g. tcp:995 (repeatable)."""
        self["listen-tls"].append(endpoint)

    def opt_auth(self, description: str) -> None:
        """Credential checker, e.g. passlib:/etc/pop3srv/users (repeatable)."""
        self._add_auth(description, "--auth")

    def _add_auth(self, description: str, where: str) -> None:
        try:
            self.addChecker(strcred.makeChecker(description))
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
        settings: dict[str, Any] = {}
        locate: Callable[[str], str] = _option_name
        if self["config"]:
            try:
                settings, locate = load_config(self["config"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        cli = {
            "listen": self["listen"] or None,
            "listen_tls": self["listen-tls"] or None,
            "mailbox": self["mailbox"],
            "idle_timeout": self["idle-timeout"],
            "index_dir": self["index-dir"],
            "tls_cert": self["tls-cert"],
            "tls_key": self["tls-key"],
            "tls_min_version": self["tls-min-version"],
            "plaintext_auth_networks": self["plaintext-auth-networks"],
        }

        def pick(key: str, default: Any) -> tuple[Any, str]:
            """The value for C{key} and where it came from, for error messages."""
            if cli[key] is not None:
                return cli[key], _option_name(key)
            if key in settings:
                return settings[key], locate(key)
            return default, _option_name(key)

        def fail(where: str, message: str) -> usage.UsageError:
            return usage.UsageError(f"{where}: {message}")

        for key, default in (("listen", [DEFAULT_LISTEN]), ("listen_tls", [])):
            descriptions, where = pick(key, default)
            for description in descriptions:
                try:
                    endpoints.serverFromString(MemoryReactor(), description)
                except Exception as e:
                    raise fail(where, f"bad endpoint {description!r}: {e}") from None
            self[key] = list(descriptions)

        mailbox, where = pick("mailbox", DEFAULT_MAILBOX)
        try:
            check_mailbox_template(mailbox)
        except ValueError as e:
            raise fail(where, str(e)) from None
        self["mailbox"] = mailbox

        timeout, where = pick("idle_timeout", MIN_IDLE_TIMEOUT)
        try:
            timeout = int(timeout)
        except ValueError:
            raise fail(where, "idle timeout must be a whole number of seconds") from None
        if timeout < MIN_IDLE_TIMEOUT:
            raise fail(
                where,
                f"idle timeout must be at least {MIN_IDLE_TIMEOUT} seconds (RFC 1939 section 3)",
            )
        self["idle_timeout"] = timeout

        index_dir, where = pick("index_dir", None)
        if index_dir is not None and not os.path.isdir(index_dir):
            raise fail(where, f"{index_dir}: not a directory")
        self["index_dir"] = index_dir

        networks, where = pick("plaintext_auth_networks", DEFAULT_PLAINTEXT_AUTH_NETWORKS)
        items = [networks] if isinstance(networks, str) else networks
        try:
            self["plaintext_auth_networks"] = [
                ipaddress.ip_network(n.strip(), strict=False)
                for item in items
                for n in item.split(",")
                if n.strip()
            ]
        except ValueError as e:
            raise fail(where, f"bad network: {e}") from None

        self["tls"] = self._tls(pick, fail)

        if not self.get("credCheckers"):
            if "auth" in settings:
                for description in settings["auth"]:
                    self._add_auth(description, locate("auth"))
            else:
                self._add_auth(DEFAULT_AUTH, "default --auth")

    def _tls(
        self,
        pick: Callable[[str, Any], tuple[Any, str]],
        fail: Callable[[str, str], usage.UsageError],
    ) -> TLSContextSource | None:
        cert, cert_where = pick("tls_cert", None)
        key, key_where = pick("tls_key", None)
        version, version_where = pick("tls_min_version", TLSMinimum.TLS1_2.value)
        try:
            minimum = TLSMinimum(str(version))
        except ValueError:
            raise fail(
                version_where, f"TLS minimum version must be 1.2 or 1.3, not {version!r}"
            ) from None
        if cert is None and key is None:
            if self["listen_tls"]:
                raise fail(
                    _option_name("listen_tls"), "implicit TLS needs --tls-cert and --tls-key"
                )
            return None
        if cert is None or key is None:
            where = key_where if key is None else cert_where
            raise fail(where, "--tls-cert and --tls-key go together")
        try:
            return TLSContextSource(cert, key, minimum)
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None


class Pop3Service(service.MultiService):
    """
    The listening services.  A port that cannot be bound ends start-up in one
    line; SIGHUP re-reads the TLS certificate.
    """

    _log = Logger()

    def __init__(self, tls: TLSContextSource | None, reactor: Any) -> None:
        super().__init__()
        self.tls = tls
        self._reactor = reactor
        self._previous_handler: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None

    def startService(self) -> None:
        super().startService()
        if self.tls is not None:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> Any:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return super().stopService()

    def _on_sighup(self, signum: int, frame: object) -> None:
        # A signal handler may interrupt the reactor anywhere; do the work in it.
        self._reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> bool:
        """Re-read the certificate and key (for embedders and SIGHUP)."""
        if self.tls is None:
            return False
        return self.tls.reload()


def build_portal(options: Options | dict[str, Any]) -> Portal:
    """The cred portal: our realm and the configured checkers."""
    realm = MboxRealm(options["mailbox"], index_dir=options["index_dir"])
    return Portal(realm, options["credCheckers"])


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> Pop3Service:
    """Assemble one listening service per configured endpoint."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    tls = options.get("tls")
    factory = POP3ServerFactory(
        build_portal(options),
        idle_timeout=options["idle_timeout"],
        reactor=reactor,
        tls=tls,
        plaintext_auth_networks=options.get("plaintext_auth_networks", LOOPBACK_NETWORKS),
    )
    top = Pop3Service(tls, reactor)
    listeners = [(d, factory) for d in options["listen"]]
    if options.get("listen_tls"):
        tls_factory = TLSMemoryBIOFactory(tls, False, factory, clock=reactor)
        listeners += [(d, tls_factory) for d in options["listen_tls"]]
    for description, protocol_factory in listeners:
        server = StreamServerEndpointService(
            endpoints.serverFromString(reactor, description), protocol_factory
        )
        # Fail start-up (not log and carry on) if a port cannot be bound.
        server._raiseSynchronously = True
        server.setServiceParent(top)
    return top
