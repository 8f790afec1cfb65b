"""
The systemd side: the C{sd_notify} messages (L{pop3srv.app.systemd}), the
shipped units, and the README's install run as written in a container that
boots this machine's OS under systemd (L{tests.nspawn}).
"""

from __future__ import annotations

import configparser
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import endpoints
from twisted.python.systemd import ListenFDs

from pop3srv.app.config import SETTINGS
from pop3srv.app.systemd import Notifier
from tests import nspawn

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "etc" / "systemd"


# --- sd_notify


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing for systemd's notification socket."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        yield s


def test_notify_sends_states(manager: socket.socket) -> None:
    """READY, RELOADING, STOPPING and STATUS go out as sd_notify datagrams."""
    environ = {"NOTIFY_SOCKET": manager.getsockname(), "OTHER": "x"}
    notifier = Notifier.from_environment(environ)
    assert notifier.ready(status="serving")
    assert manager.recv(4096).decode().split("\n") == [
        "READY=1",
        f"MAINPID={os.getpid()}",
        "STATUS=serving",
    ]
    assert notifier.reloading()
    reloading = manager.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
    assert notifier.stopping()
    assert manager.recv(4096) == b"STOPPING=1"


def test_notify_takes_the_address_out_of_the_environment(manager: socket.socket) -> None:
    """Children forked later must not inherit NOTIFY_SOCKET."""
    environ = {"NOTIFY_SOCKET": manager.getsockname(), "OTHER": "x"}
    Notifier.from_environment(environ)
    assert environ == {"OTHER": "x"}


def test_notify_abstract_address() -> None:
    """An address starting with @ is an abstract socket."""
    name = f"pop3srv-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert s.recv(4096) == b"STOPPING=1"


def test_notify_without_manager() -> None:
    """Not under systemd: nothing is sent, nothing fails."""
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).ready()


def test_notify_only_from_its_own_process(manager: socket.socket) -> None:
    """A fork that kept the notifier (a worker) sends nothing."""
    notifier = Notifier(manager.getsockname(), pid=os.getpid() + 1)
    assert not notifier.enabled
    assert not notifier.ready()
    manager.settimeout(0.2)
    with pytest.raises(TimeoutError):
        manager.recv(4096)


def test_notify_failure_is_logged_once(tmp_path: Path, log_events: list[dict]) -> None:
    """A manager that went away costs one error line, never an exception."""
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.ready()
    assert not notifier.stopping()
    errors = [e for e in log_events if "Cannot notify" in e.get("log_format", "")]
    assert len(errors) == 1


# --- the unit files


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (UNITS / name).read_text()
    # systemd continues a line ending with a backslash.
    parser.read_string(re.sub(r"\\\n\s*", " ", text))
    return parser


def _exec_start() -> list[str]:
    return _unit("pop3srv.service")["Service"]["ExecStart"].split()


def test_service_is_notify_and_in_the_venv() -> None:
    """The unit waits for READY=1 and runs the virtualenv's twistd."""
    service = _unit("pop3srv.service")["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert _exec_start()[0] == "/opt/pop3srv/bin/twistd"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["StateDirectory"] == "pop3srv"


def test_limit_nofile_fits_max_connections() -> None:
    """Room for each connection's socket and its mailbox files."""
    limit = int(_unit("pop3srv.service")["Service"]["LimitNOFILE"])
    assert limit >= 4 * int(SETTINGS["max_connections"].default)


def test_service_adopts_the_sockets_by_name() -> None:
    """
    The service's systemd: endpoints name exactly the sockets the .socket
    units pass, and Twisted finds them by those names.
    """
    argv = _exec_start()
    wanted = {
        option: argv[i + 1]
        for i, option in enumerate(argv)
        if option in ("--listen", "--listen-tls")
    }
    names = {
        _unit(name)["Socket"]["FileDescriptorName"]: name
        for name in ("pop3srv.socket", "pop3srv-tls.socket")
    }
    assert wanted == {
        "--listen": "systemd:domain=INET6:name=pop3",
        "--listen-tls": "systemd:domain=INET6:name=pop3s",
    }
    assert set(names) == {"pop3", "pop3s"}
    for name in names.values():
        assert _unit(name)["Socket"]["Service"] == "pop3srv.service"
    service_unit = _unit("pop3srv.service")["Unit"]
    assert set(service_unit["Requires"].split()) == set(names.values())

    # As systemd would pass them: LISTEN_FDS from fd 3 on, named.
    with socket.socket(socket.AF_INET6) as a, socket.socket(socket.AF_INET6) as b:
        environ = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "pop3:pop3s",
        }
        fds = ListenFDs.fromEnvironment(environ, start=a.fileno())
        if b.fileno() != a.fileno() + 1:
            pytest.skip("the two sockets did not get consecutive descriptors")
        parser = endpoints._SystemdParser()
        parser._sddaemon = fds
        for description, fd in ((wanted["--listen"], a), (wanted["--listen-tls"], b)):
            args, kwargs = endpoints._parse(description)
            endpoint = parser.parseStreamServer(object(), *args[1:], **kwargs)
            assert endpoint.fileno == fd.fileno()
            assert endpoint.addressFamily == socket.AF_INET6


def test_hardening_exceptions_are_explained() -> None:
    """
    The two options the server cannot live with are off, and a comment says
    why; everything else is still there.
    """
    text = (UNITS / "pop3srv.service").read_text()
    service = _unit("pop3srv.service")["Service"]
    assert "MemoryDenyWriteExecute" not in service
    assert re.search(r"^# No MemoryDenyWriteExecute=yes: pyOpenSSL", text, re.M)
    assert re.search(r"^SystemCallFilter=setpriority$", text, re.M)
    assert re.search(r"^# \.\.\.except setpriority: hashing processes", text, re.M)
    for option, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[option] == value, option


# --- under a real systemd

PASSWORD = "Correct-Horse-Battery-Staple-17"
LINEAGE = "/etc/letsencrypt/live/mail.example.org"
# Journal lines that mean something went wrong: Python's and Twisted's
# error reports, and systemd's about the service (a kill, a failed state,
# a notification it refused).
_JOURNAL_FAULTS = re.compile(
    r"Traceback|Unhandled|\bCRITICAL\b|\bERROR\b|\berror\b|died|SIGSYS|core-dump"
    r"|code=killed|code=dumped|status=\d+/|Failed with result|failed|Got notification message"
    r"|Cannot|cannot|Timed out|timed out",
)


def _readme_block(marker: str) -> str:
    """The shell block after C{<!-- test_systemd: MARKER -->} in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- test_systemd: {marker} -->\n```sh\n(.*?)```\n", text, re.S)
    assert match, f"README.md has no block marked {marker}"
    return match.group(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _copy_checkout(destination: Path) -> None:
    """The checkout's files, as a clone would have them (no venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _served_certificate(port: int, implicit: bool) -> bytes:
    """Log in (POP3S or STLS) and return the certificate the server sent (DER)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client: poplib.POP3
    if implicit:
        client = poplib.POP3_SSL("::1", port, context=context, timeout=20)
    else:
        client = poplib.POP3("::1", port, timeout=20)
        assert client.stls(context).startswith(b"+OK")
    try:
        assert client.user("alice").startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        count, _ = client.stat()
        assert count == 3
        assert b"Subject: Welcome to pop3srv" in b"\n".join(client.top(1, 0)[1])
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
    finally:
        client.quit()
    return der


def _der(pem_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def _wait_for_certificate(port: int, implicit: bool, expected: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        served = _served_certificate(port, implicit)
        if served == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert served == expected


def _show(box: nspawn.Container, unit: str, *properties: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A copy of the checkout, a wheelhouse with pop3srv's dependencies (and
    the build backend) so that the container installs offline, and the test
    files: two certificates and an mbox.
    """
    reason = nspawn.unavailable()
    if reason:
        pytest.skip(f"cannot boot a systemd container here: {reason}")
    base = tmp_path_factory.mktemp("systemd")
    src, wheels, files = base / "src", base / "wheels", base / "files"
    _copy_checkout(src)
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run([*pip, "wheel", "--wheel-dir", str(wheels), str(src)], check=True, timeout=300)
    subprocess.run(
        [*pip, "download", "--dest", str(wheels), "setuptools>=64", "wheel"],
        check=True,
        timeout=300,
    )
    shutil.rmtree(src / "build", ignore_errors=True)
    files.mkdir()
    from pop3srv.admin import demo

    demo.create_self_signed(str(files / "first.pem"), str(files / "first.key"))
    demo.create_self_signed(str(files / "second.pem"), str(files / "second.key"))
    (files / "mbox").write_text(demo._mbox_text())
    return base


def test_installed_as_the_readme_says_under_systemd(built: Path) -> None:
    """
    The README's install block, as written, in a container booting this OS;
    then the shipped units with their sandbox: STLS and POP3S logins, a
    certificate renewal by the README's deploy hook, restart, stop, a
    start by socket activation, and a journal with no error in it.
    """
    started = time.monotonic()
    files = built / "files"
    port, tls_port = _free_port(), _free_port()
    binds = [
        (str(built / "src"), "/srv/pop3srv", False),
        (str(built / "wheels"), "/srv/wheels", True),
        (str(files), "/srv/files", True),
    ]
    try:
        box = nspawn.Container(binds, str(built / "console.log"))
        box.__enter__()
    except nspawn.CannotBoot as e:
        pytest.skip(f"cannot boot a systemd container here: {e}")
    with box:
        # What the README takes as given: a certificate from certbot, mail
        # for alice in the spool; and ports of our own (the container
        # shares this machine's loopback).
        box.shell(
            f"""
            install -d {LINEAGE}
            install -m 0644 /srv/files/first.pem {LINEAGE}/fullchain.pem
            install -m 0600 /srv/files/first.key {LINEAGE}/privkey.pem
            install -m 0660 -g mail /srv/files/mbox /var/mail/alice
            for unit in pop3srv.socket:{port} pop3srv-tls.socket:{tls_port}; do
                install -d /etc/systemd/system/${{unit%:*}}.d
                printf '[Socket]\\nListenStream=\\nListenStream=[::1]:%s\\n' "${{unit#*:}}" \\
                    > /etc/systemd/system/${{unit%:*}}.d/test-port.conf
            done
            """
        )
        box.shell(
            _readme_block("install"),
            cwd="/srv/pop3srv",
            input=f"{PASSWORD}\n{PASSWORD}\n",
            env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/srv/wheels"},
            timeout=240,
        )
        listing = box.shell("stat -c '%U:%G %a' /etc/pop3srv /etc/pop3srv/users /var/lib/pop3srv")
        assert listing.stdout.split("\n")[:3] == [
            "root:pop3srv 750",
            "root:pop3srv 640",
            "pop3srv:pop3srv 750",
        ]
        first = _show(
            box, "pop3srv.service", "ActiveState", "MainPID", "ExecMainStartTimestampMonotonic"
        )
        assert first["ActiveState"] == "active", box.run(
            ["systemctl", "status", "pop3srv"], check=False
        ).stdout

        assert _served_certificate(tls_port, implicit=True) == _der(files / "first.pem")
        assert _served_certificate(port, implicit=False) == _der(files / "first.pem")
        # The index went to the StateDirectory, not beside the mbox.
        box.shell("ls -A /var/lib/pop3srv | grep -q . && ! ls -A /var/mail | grep -q pop3srv-index")

        # Renewal: certbot's deploy hook from the README.
        box.shell(
            f"""
            install -m 0644 /srv/files/second.pem {LINEAGE}/fullchain.pem
            install -m 0600 /srv/files/second.key {LINEAGE}/privkey.pem
            """
        )
        box.shell(_readme_block("renew"), env={"RENEWED_LINEAGE": LINEAGE})
        _wait_for_certificate(tls_port, True, _der(files / "second.pem"))
        _wait_for_certificate(port, False, _der(files / "second.pem"))
        reloaded = _show(box, "pop3srv.service", "ActiveState", "MainPID")
        assert reloaded == {"ActiveState": "active", "MainPID": first["MainPID"]}

        box.run(["systemctl", "restart", "pop3srv.service"])
        restarted = _show(box, "pop3srv.service", "ActiveState", "MainPID", "NRestarts")
        assert restarted["ActiveState"] == "active"
        assert restarted["MainPID"] != first["MainPID"]
        assert _served_certificate(tls_port, implicit=True) == _der(files / "second.pem")

        box.run(["systemctl", "stop", "pop3srv.service"])
        stopped = _show(box, "pop3srv.service", "ActiveState", "Result", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        # The sockets stay: the next client starts the service again.
        assert _served_certificate(port, implicit=False) == _der(files / "second.pem")
        assert _show(box, "pop3srv.service", "ActiveState")["ActiveState"] == "active"

        box.run(["systemctl", "stop", "pop3srv.socket", "pop3srv-tls.socket", "pop3srv.service"])
        final = _show(box, "pop3srv.service", "ActiveState", "Result", "ExecMainStatus")
        assert final == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}

        journal = box.run(
            [
                "journalctl",
                "--no-pager",
                "-o",
                "short-monotonic",
                "-b",
                "-u",
                "pop3srv.service",
                "-u",
                "pop3srv.socket",
                "-u",
                "pop3srv-tls.socket",
            ]
        ).stdout
        assert "Started pop3srv.service" in journal or "Started pop3srv" in journal, journal
        faults = [line for line in journal.splitlines() if _JOURNAL_FAULTS.search(line)]
        assert faults == [], journal
    print(f"systemd container test: {time.monotonic() - started:.1f} s")
