# -*- test-case-name: tests.test_config -*-
"""
The TOML configuration file: parsing and validation, with errors that name
the file and line.  Nothing here touches the reactor.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, as one line that names where it is."""


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type check and a description of what it takes."""

    check: Callable[[Any], bool]
    expects: str


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_str_or_list(value: Any) -> bool:
    return _is_str(value) or _is_str_list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SETTINGS: dict[str, Setting] = {
    "listen": Setting(_is_str_or_list, "an endpoint string or a list of them"),
    "listen_tls": Setting(_is_str_or_list, "an endpoint string or a list of them"),
    "mailbox": Setting(_is_str, 'a path template such as "/var/mail/{user}"'),
    "auth": Setting(_is_str_or_list, "a checker string or a list of them"),
    "idle_timeout": Setting(_is_int, "a whole number of seconds"),
    "index_dir": Setting(_is_str, "a directory path"),
    "tls_cert": Setting(_is_str, "a path to a PEM certificate chain"),
    "tls_key": Setting(_is_str, "a path to a PEM private key"),
    "tls_min_version": Setting(lambda v: v in ("1.2", "1.3"), 'the string "1.2" or "1.3"'),
    "plaintext_auth_networks": Setting(_is_str_or_list, "a list of networks in CIDR notation"),
}
LIST_SETTINGS = frozenset({"listen", "listen_tls", "auth", "plaintext_auth_networks"})


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
    Read and type-check a configuration file.

    @return: the settings found (lists normalised to lists) and a function
        that gives C{file:line} for a key, for errors found later.
    @raise ConfigError: the file is unreadable, not TOML, or has an unknown
        key or a value of the wrong type.
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
        location = f"{path}:{max(line, 1)}"
        raise ConfigError(f"{location}: {text}") from None
    settings: dict[str, Any] = {}
    for key, value in document.items():
        setting = SETTINGS.get(key)
        if setting is None:
            known = ", ".join(sorted(SETTINGS))
            raise ConfigError(
                f"{where(path, source, key)}: unknown setting {key!r} (known: {known})"
            )
        if not setting.check(value):
            raise ConfigError(f"{where(path, source, key)}: {key} must be {setting.expects}")
        settings[key] = [value] if key in LIST_SETTINGS and isinstance(value, str) else value
    return settings, lambda key: where(path, source, key)
