# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd pop3srv} command: options, configuration file and service.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred import credentials, strcred
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from pop3srv.config import ConfigError, load_config
from pop3srv.protocol import MIN_IDLE_TIMEOUT, POP3ServerFactory
from pop3srv.realm import MboxRealm, check_mailbox_template

DEFAULT_LISTEN = "tcp:110"
DEFAULT_MAILBOX = "/var/mail/{user}"
DEFAULT_AUTH = "passlib:/etc/pop3srv/users"


def _option_name(key: str) -> str:
    return f"--{key.replace('_', '-')}"


class Options(usage.Options, strcred.AuthOptionMixin):
    """Options of C{twistd pop3srv}; the command line wins over C{--config}."""

    synopsis = "[options]"
    longdesc = (
        "Serve mbox maildrops over POP3. Every option can also be set in the "
        "TOML file given with --config; the command line wins."
    )
    supportedInterfaces = [
        credentials.IUsernamePassword,
        credentials.IUsernameHashedPassword,
    ]

    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        [
            "mailbox",
            "m",
            None,
            f"Path template of each user's mbox [default: {DEFAULT_MAILBOX}].",
        ],
        [
            "idle-timeout",
            None,
            None,
            f"Seconds of client silence before autologout (at least {MIN_IDLE_TIMEOUT}) "
            f"[default: {MIN_IDLE_TIMEOUT}].",
        ],
        [
            "index-dir",
            None,
            None,
            "Directory for UIDL indexes [default: beside each mbox].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

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
                f"{where} {description!r}: no checker plugin named {e.args[0]!r} "
                "(see --help-auth)"
            ) from None
        except Exception as e:
            raise usage.UsageError(f"{where} {description!r}: {e}") from None

    def postOptions(self) -> None:
        settings: dict[str, Any] = {}
        locate: Callable[[str], str] = _option_name
        if self["config"]:
            try:
                settings, config_where = load_config(self["config"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            locate = config_where
        cli = {
            "listen": self["listen"] or None,
            "mailbox": self["mailbox"],
            "idle_timeout": self["idle-timeout"],
            "index_dir": self["index-dir"],
        }

        def source(key: str) -> str:
            return (
                f"--{key.replace('_', '-')}"
                if cli.get(key) is not None
                else locate(key)
            )

        listen = cli["listen"] or settings.get("listen") or [DEFAULT_LISTEN]
        for description in listen:
            try:
                endpoints.serverFromString(MemoryReactor(), description)
            except Exception as e:
                raise usage.UsageError(
                    f"{source('listen')}: bad endpoint {description!r}: {e}"
                ) from None
        self["listen"] = list(listen)

        mailbox = cli["mailbox"] or settings.get("mailbox") or DEFAULT_MAILBOX
        try:
            check_mailbox_template(mailbox)
        except ValueError as e:
            raise usage.UsageError(f"{source('mailbox')}: {e}") from None
        self["mailbox"] = mailbox

        timeout = (
            cli["idle_timeout"]
            if cli["idle_timeout"] is not None
            else settings.get("idle_timeout", MIN_IDLE_TIMEOUT)
        )
        try:
            timeout = int(timeout)
        except ValueError:
            raise usage.UsageError(
                f"{source('idle_timeout')}: idle timeout must be a whole number of seconds"
            ) from None
        if timeout < MIN_IDLE_TIMEOUT:
            raise usage.UsageError(
                f"{source('idle_timeout')}: idle timeout must be at least {MIN_IDLE_TIMEOUT} "
                "seconds (RFC 1939 section 3)"
            )
        self["idle_timeout"] = timeout

        index_dir = cli["index_dir"] or settings.get("index_dir")
        if index_dir is not None and not os.path.isdir(index_dir):
            raise usage.UsageError(
                f"{source('index_dir')}: {index_dir}: not a directory"
            )
        self["index_dir"] = index_dir

        if not self.get("credCheckers"):
            if "auth" in settings:
                for description in settings["auth"]:
                    self._add_auth(description, locate("auth"))
            else:
                self._add_auth(DEFAULT_AUTH, "default --auth")


class Pop3Service(service.MultiService):
    """The listening services; a port that cannot be bound ends start-up in one line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"twistd pop3srv: {e}") from None


def build_portal(options: Options | dict[str, Any]) -> Portal:
    """The cred portal: our realm and the configured checkers."""
    realm = MboxRealm(options["mailbox"], index_dir=options["index_dir"])
    return Portal(realm, options["credCheckers"])


def makeService(
    options: Options | dict[str, Any], reactor: Any = None
) -> service.MultiService:
    """Assemble one listening service per configured endpoint."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    factory = POP3ServerFactory(
        build_portal(options), idle_timeout=options["idle_timeout"], reactor=reactor
    )
    top = Pop3Service()
    for description in options["listen"]:
        server = StreamServerEndpointService(
            endpoints.serverFromString(reactor, description), factory
        )
        # Fail start-up (not log and carry on) if a port cannot be bound.
        server._raiseSynchronously = True
        server.setServiceParent(top)
    return top
