# -*- test-case-name: tests.test_tap -*-
"""
The settings of C{twistd pop3srv}: one table that gives each its type,
default and help, used for both the command line and the TOML file, with
errors that name the option or the file and line.  Nothing here touches the
reactor.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pop3srv.server.limits import IPNetwork


class ConfigError(ValueError):
    """A configuration problem, as one line that names where it is."""


#: The listen backlog given to every listener whose endpoint names none:
#: Twisted's default of 50 overflows in a burst of connections (a busy NAT
#: gateway, a client reconnecting many sessions), and an overflowed client
#: waits for its SYN to be retried instead of being greeted or refused.
#: 511 is what Dovecot, nginx and Redis use; the kernel's C{somaxconn} (which
#: caps any backlog) wins when it is larger.
MIN_BACKLOG = 511

#: The endpoint types whose description takes a C{backlog} parameter.
_BACKLOG_TYPES = ("tcp", "tcp6", "unix", "ssl")
#: Where each type's parser takes its backlog by position (0: the first field).
_BACKLOG_POSITION = {"tcp": 2, "tcp6": 1, "unix": 2, "ssl": 5}

#: What a bad endpoint's error adds, so the admin sees the right form.
ENDPOINT_HINT = (
    "expected e.g. tcp:110 (every IPv4 and IPv6 address), "
    "tcp:110:interface=192.0.2.1, tcp6:110:interface=2001\\:db8\\:\\:1, "
    "unix:/run/pop3srv/pop3.sock or systemd:domain=INET:index=0; "
    "a ':' inside a value is written '\\:'"
)


def listen_backlog(somaxconn: str = "/proc/sys/net/core/somaxconn") -> int:
    """The backlog for listeners whose endpoint does not give one."""
    try:
        with open(somaxconn, encoding="ascii") as f:
            kernel = int(f.read().strip())
    except (OSError, ValueError):
        kernel = 0
    return max(MIN_BACKLOG, kernel)


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added, unless it is of a type that takes
    none or already gives one.
    """
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_TYPES or re.search(r"(^|[^\\]):backlog=", description):
        return description
    # A backlog may also be given by position (tcp:110:0.0.0.0:64).
    fields = re.split(r"(?<!\\):", description)[1:]
    positional = [f for f in fields if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", f)]
    if len(positional) > _BACKLOG_POSITION[kind]:
        return description
    return f"{description}:backlog={backlog}"


@dataclass(frozen=True)
class Setting:
    """
    One setting.

    @ivar kind: C{str}, C{int}, C{float}, C{list} (of strings; repeatable on
        the command line) or C{networks} (CIDR list; repeatable or
        comma-separated on the command line).
    @ivar minimum: the smallest number accepted, for numbers.
    @ivar choices: the values accepted, for a C{str} with a fixed set.
    """

    key: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    why: str = ""

    @property
    def option(self) -> str:
        """The command-line name, such as C{--idle-timeout}."""
        return "--" + self.key.replace("_", "-")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("list", "networks")


_CPUS = os.cpu_count() or 1

SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in [
        Setting("listen", "list", ["tcp:110"], "Endpoint to serve POP3 on (repeatable)."),
        Setting("listen_tls", "list", [], "Endpoint for implicit TLS, e.g. tcp:995 (repeatable)."),
        Setting("mailbox", "str", "/var/mail/{user}", "Path template of each user's mbox."),
        Setting("auth", "list", ["passlib:/etc/pop3srv/users"], "Credential checker."),
        Setting("index_dir", "str", None, "Directory for UIDL indexes [default: beside mbox]."),
        Setting("uidl_format", "str", None,
                "Dovecot pop3_uidl_format for the UIDLs of mbox messages indexed from now "
                "on, e.g. %08Xu%08Xv to keep Dovecot's; a UIDL once served never changes "
                "[default: pop3srv's own]."),
        Setting("reuse_xuidl", "str", "auto",
                "Whether an X-UIDL header (qpopper's) gives an mbox message indexed from "
                "now on its UIDL, as Dovecot's pop3_reuse_xuidl: yes, no, or auto: no "
                "with --uidl-format (Dovecot's default), yes without (qpopper).",
                choices=("auto", "yes", "no")),
        Setting("idle_timeout", "int", 600, "Seconds of silence before autologout.", 600,
                why="RFC 1939 section 3"),
        Setting("auth_timeout", "float", 60.0, "Seconds a client has to log in.", 1),
        Setting("tls_handshake_timeout", "float", 30.0,
                "Seconds a client has to complete a TLS handshake (implicit TLS or STLS).", 1),
        Setting("write_stall_timeout", "float", 600.0,
                "Seconds the server's output may wait on a client that takes none of it.", 1),
        Setting("tls_cert", "str", None, "PEM file: certificate, then intermediates."),
        Setting("tls_key", "str", None, "PEM file: the certificate's private key."),
        Setting("tls_min_version", "str", "1.2", "Lowest TLS version.", choices=("1.2", "1.3")),
        Setting("plaintext_auth_networks", "networks", ["127.0.0.0/8", "::1/128"],
                "Networks whose clients may log in without TLS."),
        Setting("failure_delay", "float", 2.0, "Seconds before a failed login is answered.", 0),
        Setting("max_failure_delay", "float", 15.0,
                "Cap of the growing failure delay: every failed or refused login is "
                "answered within it; more than 15 is taken as 15.", 0),
        Setting("failure_window", "float", 600.0, "Seconds over which failures count.", 1),
        Setting("address_failure_limit", "int", 10,
                "Failures from one address that lock it out.", 1),
        Setting("user_failure_limit", "int", 5,
                "Failures for one user from one address that lock that pair out.", 1),
        Setting("lockout", "float", 600.0, "Seconds a lockout lasts.", 0),
        Setting("trusted_networks", "networks", [],
                "Networks exempt from failure delays and lockouts."),
        Setting("max_connections", "int", 1000, "Concurrent connections in all.", 1),
        Setting("max_connections_per_address", "int", 20,
                "Concurrent connections from one address.", 1),
        Setting("max_sessions_per_user", "int", 10,
                "Concurrent logged-in sessions of one user from one address.", 1),
        Setting("max_bad_commands", "int", 10, "Consecutive bad commands before closing.", 1),
        Setting("allow", "networks", [], "Only these networks may connect (if set)."),
        Setting("proxy_networks", "networks", [],
                "Load balancers (e.g. HAProxy) whose connections start with a PROXY "
                "protocol v1 or v2 header giving the client's address; no one "
                "else's header is honoured."),
        Setting("proxy_header_timeout", "float", 5.0,
                "Seconds a connection from proxy_networks has to send its PROXY header.", 0.1),
        Setting("counters", "str", "memory",
                "Where failed-login counts and lockouts live: memory (this server's "
                "processes) or redis://HOST:PORT/DB (shared by several servers; "
                "counted here while Redis is unreachable)."),
        Setting("deny", "networks", [], "These networks may not connect."),
        Setting("hash_workers", "int", None,
                "Processes that verify passwords (per server process, or in "
                "all with --hash-pool shared); 0 verifies in one thread of each "
                "server process instead (less memory) [default: CPUs / workers, "
                "at least 1; shared: CPUs].", 0),
        Setting("hash_pool", "str", "per-process",
                "per-process: each server process has its own hashing processes "
                "(steadier sessions during a login flood); shared: one pool, in "
                "the first server process, for all (more logins per second).",
                choices=("per-process", "shared")),
        Setting("hash_threads", "int", None, "Old name of --hash-workers.", 1),
        Setting("hash_queue", "int", 32,
                "Logins that may wait for a hashing process, per server process.", 0),
        Setting("log_level", "str", "info", "Lowest level logged: debug, info, warn or error.",
                choices=("debug", "info", "warn", "error")),
        Setting("log_format", "str", "text",
                "text (twistd's lines) or json (one JSON object per line per event).",
                choices=("text", "json")),
        Setting("workers", "int", _CPUS,
                "Server processes sharing the listening sockets (1: no child processes).", 1),
        Setting("metrics", "str", None,
                "Endpoint serving Prometheus metrics of the whole server at /metrics, "
                "e.g. tcp:9110:interface=127.0.0.1 [default: none]."),
        Setting("control_socket", "str", "auto",
                "UNIX socket that 'pop3srv who' and 'pop3srv stats' read the server "
                "through, mode 0660 (root and the server's group); auto: "
                "$RUNTIME_DIRECTORY/control under systemd, else /run/pop3srv/control "
                "if that directory is writable, else none; none: no socket."),
    ]
}  # fmt: skip


#: The longest a failed or refused login waits for its answer: clients give
#: up waiting (15 s is also Dovecot's longest auth penalty).
MAX_ANSWER_DELAY = 15.0


def parse_networks(items: list[str], where: str) -> list[IPNetwork]:
    """CIDR strings (each may hold several, comma-separated) as networks."""
    try:
        return [
            ipaddress.ip_network(n.strip(), strict=False)
            for item in items
            for n in item.split(",")
            if n.strip()
        ]
    except ValueError as e:
        raise ConfigError(f"{where}: bad network: {e}") from None


def convert(setting: Setting, value: Any, where: str) -> Any:
    """
    Check and convert a value from the command line (text) or TOML.

    @raise ConfigError: naming C{where}.
    """
    kind = setting.kind
    if kind in ("list", "networks"):
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {setting.key} must be a string or a list of strings")
        return parse_networks(value, where) if kind == "networks" else list(value)
    if kind in ("int", "float"):
        number_type = int if kind == "int" else float
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: {setting.key} must be a number")
        try:
            number: float = number_type(value)
        except ValueError:
            noun = "a whole number" if kind == "int" else "a number"
            raise ConfigError(f"{where}: {setting.key} must be {noun}") from None
        if kind == "int" and isinstance(value, float):
            raise ConfigError(f"{where}: {setting.key} must be a whole number")
        if setting.minimum is not None and number < setting.minimum:
            why = f" ({setting.why})" if setting.why else ""
            raise ConfigError(f"{where}: {setting.key} must be at least {setting.minimum:g}{why}")
        if setting.maximum is not None and number > setting.maximum:
            why = f" ({setting.why})" if setting.why else ""
            raise ConfigError(f"{where}: {setting.key} must be at most {setting.maximum:g}{why}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {setting.key} must be a string")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{where}: {setting.key} must be one of {', '.join(setting.choices)}")
    return value


def _line_of(source: str, key: str) -> int | None:
    pattern = re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.MULTILINE)
    match = pattern.search(source)
    return source.count("\n", 0, match.start()) + 1 if match else None


def where(path: str, source: str, key: str) -> str:
    """C{path:line} of C{key}'s assignment, or just C{path}."""
    line = _line_of(source, key)
    return f"{path}:{line}" if line else path


def load_config(path: str) -> tuple[dict[str, Any], Callable[[str], str]]:
    """
    Read a configuration file and check each value against L{SETTINGS}.

    @return: the converted settings found and a function giving C{file:line}
        for a key, for errors found later.
    @raise ConfigError: the file is unreadable, not TOML, or has an unknown
        key or a bad value.
    """
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read configuration: {reason}") from None
    try:
        document = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        found = re.search(r"\(at line (\d+), column \d+\)", message)
        if found:
            line = int(found.group(1))
        else:
            # "(at end of document)": the problem is on the last line.
            line = source.count("\n") + (0 if source.endswith("\n") else 1)
        text = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
        raise ConfigError(f"{path}:{max(line, 1)}: {text}") from None
    settings: dict[str, Any] = {}
    for key, value in document.items():
        setting = SETTINGS.get(key)
        if setting is None:
            known = ", ".join(sorted(SETTINGS))
            location = where(path, source, key)
            raise ConfigError(f"{location}: unknown setting {key!r} (known: {known})")
        settings[key] = convert(setting, value, where(path, source, key))
    return settings, lambda key: where(path, source, key)
