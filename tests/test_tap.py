"""Tests for L{pop3srv.app.tap} and L{pop3srv.app.config}: options, TOML and start-up errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from livepop3 import TWISTD, write_users
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from pop3srv.app.config import ConfigError, load_config
from pop3srv.app.tap import Options, makeService
from pop3srv.server.protocol import POP3ServerFactory


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """A user file."""
    path = tmp_path / "users"
    write_users(path)
    return path


def parse(*argv: str) -> Options:
    """Parse C{argv} as C{twistd pop3srv} would."""
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults_with_auth(users: Path) -> None:
    """Without a config file the documented defaults apply."""
    options = parse("--auth", f"passlib:{users}")
    assert options["listen"] == ["tcp:110"]
    assert options["mailbox"] == "/var/mail/{user}"
    assert options["idle_timeout"] == 600
    assert options["index_dir"] is None
    assert len(options["credCheckers"]) == 1


def test_default_auth_names_missing_user_file() -> None:
    """With no --auth, the default passlib file is used; if missing, the error names it."""
    with pytest.raises(SystemExit, match="/etc/pop3srv/users"):
        parse()


def test_config_file_and_command_line_precedence(tmp_path: Path, users: Path) -> None:
    """Values come from the file unless the command line gives them."""
    config = tmp_path / "pop3srv.toml"
    config.write_text(
        f'listen = "tcp:1110:interface=127.0.0.1"\nmailbox = "/srv/mail/{{user}}"\n'
        f'auth = ["passlib:{users}"]\nidle_timeout = 900\nindex_dir = "{tmp_path}"\n'
    )
    options = parse("--config", str(config))
    assert options["listen"] == ["tcp:1110:interface=127.0.0.1"]
    assert options["mailbox"] == "/srv/mail/{user}"
    assert options["idle_timeout"] == 900
    assert options["index_dir"] == str(tmp_path)
    options = parse(
        "--config",
        str(config),
        "--listen",
        "tcp:2110",
        "--listen",
        "tcp:3110",
        "--idle-timeout",
        "1200",
        "--mailbox",
        "/m/{user}.mbox",
    )
    assert options["listen"] == ["tcp:2110", "tcp:3110"]
    assert (options["idle_timeout"], options["mailbox"]) == (1200, "/m/{user}.mbox")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = ["tcp:1"]\nbogus = 1\n', r":2: unknown setting 'bogus'"),
        ('listen = ["tcp:1"]\n\nidle_timeout = "ten"\n', r":3: idle_timeout must be a whole"),
        ("mailbox = [1]\n", r":1: mailbox must be a string"),
        ("listen = [\n", r":\d+: "),
    ],
)
def test_config_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    """Unknown keys, wrong types and TOML syntax errors name the file and line."""
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=str(config) + message):
        load_config(str(config))


def test_unreadable_config(tmp_path: Path) -> None:
    """A missing config file is one clear error."""
    with pytest.raises(SystemExit, match=r"missing.toml: cannot read configuration"):
        parse("--config", str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "tcp:notaport"], "--listen: bad endpoint 'tcp:notaport'"),
        (["--listen", "nosuch:1"], "--listen: bad endpoint 'nosuch:1'"),
        (["--idle-timeout", "30"], "--idle-timeout: idle_timeout must be at least 600 (RFC 1939"),
        (["--idle-timeout", "x"], "--idle-timeout: idle_timeout must be a whole number"),
        (["--mailbox", "/var/mail/x"], "--mailbox: mailbox template '/var/mail/x' must contain"),
        (["--mailbox", "mail/{user}"], "must be an absolute path"),
        (["--mailbox", "/m/{user}/{home}"], "may use no field but"),
        (["--index-dir", "/nonexistent/dir"], "--index-dir: /nonexistent/dir: not a directory"),
        (["--auth", "nosuchchecker:x"], "no checker plugin named 'nosuchchecker'"),
        (["--tls-handshake-timeout", "0"], "--tls-handshake-timeout: tls_handshake_timeout must"),
        (["--write-stall-timeout", "soon"], "--write-stall-timeout: write_stall_timeout must be a"),
    ],
)
def test_bad_options(users: Path, argv: list[str], message: str) -> None:
    """Each bad option stops parsing with a message naming it."""
    with pytest.raises(SystemExit) as caught:
        parse("--auth", f"passlib:{users}", *argv)
    assert message in str(caught.value)


def test_old_max_failure_delay_is_taken_as_15(tmp_path: Path, users: Path) -> None:
    """
    A configuration from before the 15 s cap (the default was 30) still
    starts, with the cap and one warning naming where the value was set;
    bad values are still refused.
    """
    config = tmp_path / "c.toml"
    config.write_text(f'auth = "passlib:{users}"\nmax_failure_delay = 30\n')
    options = parse("--config", str(config))
    assert options["max_failure_delay"] == 15
    assert options["tls"] is None and len(options.warnings) == 1
    assert options.warnings[0].startswith(f"{config}:2: max_failure_delay 30 is above 15 s")
    assert parse("--auth", f"passlib:{users}", "--max-failure-delay", "15").warnings == []
    with pytest.raises(SystemExit, match="max_failure_delay must be at least 0"):
        parse("--auth", f"passlib:{users}", "--max-failure-delay", "-1")


def test_config_value_error_names_file_and_line(tmp_path: Path, users: Path) -> None:
    """A value that type-checks but is invalid still names the file and line."""
    config = tmp_path / "c.toml"
    config.write_text(f'auth = "passlib:{users}"\n# comment\nidle_timeout = 5\n')
    with pytest.raises(SystemExit, match=rf"{config}:3: idle_timeout must be at least 600"):
        parse("--config", str(config))


def test_make_service_listens_on_each_endpoint(users: Path) -> None:
    """makeService builds one listening service per endpoint with our factory."""
    options = parse(
        "--auth",
        f"passlib:{users}",
        "--listen",
        "tcp:1110:interface=127.0.0.1",
        "--listen",
        "tcp:1111:interface=127.0.0.1",
        # MemoryReactor cannot spawn processes; --workers has its own tests.
        "--workers",
        "1",
    )
    # A clock too: a stop waits for commits on the reactor's time.
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (1110, "127.0.0.1"),
        (1111, "127.0.0.1"),
    ]
    assert isinstance(reactor.tcpServers[0][1], POP3ServerFactory)
    stopped = top.stopService()
    # Stopped for certain: a thread pool left running keeps pytest from exiting.
    assert stopped.called and not isinstance(stopped.result, Failure)


def test_connection_timeouts_reach_the_factory(users: Path) -> None:
    """
    --tls-handshake-timeout and --write-stall-timeout have safe defaults and
    are passed to the protocol factory.
    """
    defaults = parse("--auth", f"passlib:{users}")
    assert (defaults["tls_handshake_timeout"], defaults["write_stall_timeout"]) == (30, 600)
    options = parse(
        "--auth",
        f"passlib:{users}",
        "--listen",
        "tcp:1110:interface=127.0.0.1",
        "--workers",
        "1",
        "--tls-handshake-timeout",
        "7",
        "--write-stall-timeout",
        "45.5",
    )
    # A clock too: a stop waits for commits on the reactor's time.
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, POP3ServerFactory)
    assert (factory.tls_handshake_timeout, factory.write_stall_timeout) == (7, 45.5)
    stopped = top.stopService()
    assert stopped.called and not isinstance(stopped.result, Failure)
    top.stopService()


def run_twistd(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the real twistd with a time limit."""
    return subprocess.run([TWISTD, *argv], capture_output=True, text=True, timeout=60)


def test_twistd_lists_plugin_and_checker() -> None:
    """twistd --help lists pop3srv; --help-auth lists the passlib checker."""
    assert "pop3srv" in run_twistd("--help").stdout
    assert "passlib" in run_twistd("pop3srv", "--help-auth").stdout


def test_twistd_bad_option_is_one_line_without_traceback(tmp_path: Path) -> None:
    """A bad value stops start-up with one error line naming it, never a traceback."""
    result = run_twistd(
        "--nodaemon", "--pidfile=", "pop3srv", "--idle-timeout", "5", "--auth", "memory:a:b"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output == (
        "twistd pop3srv: --idle-timeout: idle_timeout must be at least 600 (RFC 1939 section 3)\n"
    )


def test_twistd_port_in_use_fails_start(tmp_path: Path) -> None:
    """A port that cannot be bound stops start-up with one line and a non-zero exit."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            "--nodaemon",
            "--pidfile=",
            f"--logfile={tmp_path}/log",
            "pop3srv",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--auth",
            "memory:a:b",
        )
    assert result.returncode != 0
    # The port is bound before twistd opens its log: the line is on stderr.
    logfile = tmp_path / "log"
    log = result.stdout + result.stderr + (logfile.read_text() if logfile.exists() else "")
    assert f"twistd pop3srv: Couldn't listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log


def test_sample_config_parses_and_documents_every_setting() -> None:
    """etc/pop3srv.toml loads, and names every setting (set or commented out)."""
    import re

    from pop3srv.app.config import SETTINGS

    sample = Path(__file__).resolve().parent.parent / "etc" / "pop3srv.toml"
    settings, _ = load_config(str(sample))
    assert settings["listen"] == ["tcp:110"]
    text = sample.read_text()
    for key in SETTINGS:
        assert re.search(rf"^(# )?{key} = ", text, re.MULTILINE), key


def test_losing_the_hashing_relay_after_a_stop_is_harmless() -> None:
    """
    A worker whose parent dies sees its connection to the parent close,
    perhaps just after a SIGTERM stopped it: the second stop must not raise.
    """
    from twisted.internet.selectreactor import SelectReactor

    from pop3srv.processes.supervisor import _stop_running

    reactor = SelectReactor()
    errors: list[Exception] = []

    def both() -> None:
        reactor.stop()
        try:
            _stop_running(reactor)
        except Exception as e:
            errors.append(e)

    reactor.callWhenRunning(both)
    reactor.run(installSignalHandlers=False)
    assert errors == []


def test_backlog_added_only_where_none_is_given() -> None:
    """
    A burst-sized backlog is added to a listener without one, and never to
    one that gives it by name or by position (which would not parse).
    """
    from pop3srv.app.config import with_backlog

    assert with_backlog("tcp:110", 511) == "tcp:110:backlog=511"
    assert with_backlog("tcp:110:interface=127.0.0.1", 511).endswith(":backlog=511")
    for given in (
        "tcp:110:127.0.0.1:64",
        "tcp:110:backlog=64",
        "tcp6:110:64",
        "unix:/run/pop3.sock:666:5",
    ):
        assert with_backlog(given, 511) == given
