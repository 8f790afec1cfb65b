"""
Tests for L{pop3srv.admin.cli}, the C{pop3srv} admin command, run as the
installed console script (C{who} and C{stats} against a real C{twistd
pop3srv --workers 2}), and for the access rules of
L{pop3srv.admin.checkconfig}.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import platform
import poplib
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import Authority
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from livepop3 import PASSWORDS, Pop3Server

import pop3srv
import twisted
from pop3srv.admin.checkconfig import ServiceIdentity
from pop3srv.app.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "pop3srv.toml"
SCRIPT = str(Path(sys.executable).with_name("pop3srv"))
PREFIX = "pop3srv check-config: "
PASSWORD = "Correct-Horse-Battery-Staple-9"


def run(
    *args: str | Path, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed C{pop3srv} script (with C{env} as its environment, if given)."""
    return subprocess.run(
        [SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=120,
        check=False,
    )


def me() -> str:
    """The name of the user running the tests."""
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class Site:
    """A configuration of the example file, every path in one directory."""

    root: Path
    config: Path
    users: Path
    cert: Path
    key: Path
    index: Path

    def check(self, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        """C{pop3srv check-config --config ...} as the current user."""
        return run("check-config", "--config", self.config, "--user", me(), *extra)

    def replace(self, old: str, new: str) -> int:
        """Replace the one line C{old} of the config; its line number."""
        lines = self.config.read_text().split("\n")
        number = lines.index(old)
        lines[number] = new
        self.config.write_text("\n".join(lines))
        return number + 1


def add_user(users: Path, name: str) -> None:
    """Add a user through C{pop3srv passwd}, which must be C{pop3srv-passwd}."""
    done = run("passwd", "--password-stdin", users, name, stdin=PASSWORD + "\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"Added user {name!r}.\n", "")


def adjusted(root: Path, cert: Path, key: Path, users: Path, index: Path) -> str:
    """
    The example configuration with its paths in C{root}; fails if a line
    it changes is no longer in the example (the test would then check a
    configuration that is not the example's).
    """
    text = EXAMPLE.read_text()
    changes = {
        'mailbox = "/var/mail/{user}"': f'mailbox = "{root}/mail/{{user}}"',
        'auth = ["passlib:/etc/pop3srv/users"]': f'auth = ["passlib:{users}"]',
        '# listen_tls = ["tcp:995"]': 'listen_tls = ["tcp:995"]',
        '# tls_cert = "/etc/pop3srv/tls/fullchain.pem"': f'tls_cert = "{cert}"',
        '# tls_key = "/etc/pop3srv/tls/privkey.pem"': f'tls_key = "{key}"',
        '# index_dir = "/var/lib/pop3srv/index"': f'index_dir = "{index}"',
    }
    for old, new in changes.items():
        assert text.count(old) == 1, f"{old!r} is no longer in {EXAMPLE}"
        text = text.replace(old, new)
    return text


def make_site(root: Path) -> Site:
    """The example configuration, with real files, in C{root}."""
    (root / "mail").mkdir()
    index = root / "index"
    index.mkdir()
    cert, key = Authority.create().issue(root, "tls", serial=1)
    users = root / "users"
    add_user(users, "alice")
    config = root / "pop3srv.toml"
    config.write_text(adjusted(root, cert, key, users, index))
    return Site(root, config, users, cert, key, index)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


def settings_of(stdout: str) -> dict[str, str]:
    """The C{key = value...} lines of a listing, by key."""
    lines = [line for line in stdout.splitlines() if not line.startswith("#")]
    found = {line.split(" = ", 1)[0]: line for line in lines}
    assert len(found) == len(lines), "a setting printed twice"
    return found


def problems(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), stderr
    return [line.removeprefix(PREFIX) for line in lines]


def dated_certificate(
    directory: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> tuple[Path, Path]:
    """A self-signed certificate valid between two times, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "dated.crt", directory / "dated.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- version and help


def test_version() -> None:
    """C{pop3srv version} and C{pop3srv --version}: one line per component."""
    done = run("version")
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0] == f"pop3srv {pop3srv.__version__}"
    assert lines[1] == f"Twisted {twisted.__version__}"
    assert lines[2].startswith(f"Python {platform.python_version()} ")
    assert lines[3].startswith("OpenSSL ") and "serves TLS" in lines[3]
    assert run("--version").stdout == done.stdout


def test_help() -> None:
    """The top-level help lists the commands; check-config's says how changes are marked."""
    top = run("--help")
    assert top.returncode == 0
    for command in ("version", "check-config", "passwd", "who", "stats"):
        assert f"    {command}" in top.stdout
    check = run("check-config", "--help")
    assert check.returncode == 0
    assert "'  # default: VALUE'" in check.stdout
    assert "twistd pop3srv --help" in check.stdout
    for command, usage in (
        ("who", "usage: pop3srv who [-h] [--control-socket PATH] [-c FILE] [--json]"),
        ("stats", "usage: pop3srv stats [-h] [--control-socket PATH] [-c FILE]"),
    ):
        done = run(command, "--help")
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.startswith(usage + "\n")
        assert "/run/pop3srv/control" in done.stdout


def test_passwd_is_pop3srv_passwd(site: Site) -> None:
    """C{pop3srv passwd} hands everything after it, C{--help} too, to pop3srv-passwd."""
    done = run("passwd", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: pop3srv-passwd ")
    assert (
        done.stdout
        == subprocess.run(
            [str(Path(SCRIPT).with_name("pop3srv-passwd")), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    verify = run("passwd", "--verify", "--password-stdin", site.users, "alice", stdin=PASSWORD)
    assert (verify.returncode, verify.stdout) == (0, "Password matches.\n")
    wrong = run("passwd", "--verify", "--password-stdin", site.users, "alice", stdin="nope")
    assert wrong.returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "pop3srv: a command is required (see pop3srv --help)"),
        (("version", "extra"), "pop3srv: unrecognized arguments: extra (see pop3srv --help)"),
        (("frobnicate",), "pop3srv: argument COMMAND: invalid choice: 'frobnicate'"),
        (("check-config", "--user", "no-such-user-here"), "pop3srv: --user no-such-user-here:"),
        (("check-config", "--group", "no-such-group-here"), "pop3srv: --group no-such-group-here:"),
        (("who", "extra"), "pop3srv: unrecognized arguments: extra (see pop3srv --help)"),
        (("stats", "--json"), "pop3srv: unrecognized arguments: --json (see pop3srv --help)"),
    ],
)
def test_usage_errors(args: tuple[str, ...], message: str) -> None:
    """A usage error is one line and exit status 2."""
    done = run(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(message)


# --- check-config


def test_check_config_example(site: Site) -> None:
    """
    The example file with its paths adjusted passes, and every setting is
    printed once, in the order of the settings table, those that differ from
    the default marked; the file's settings equal to the default are not.
    Options after it win over the file, and --user-failure-limit is not
    taken for check-config's own --user.
    """
    done = site.check("--idle-timeout", "900", "--user-failure-limit", "3")
    assert (done.returncode, done.stderr) == (0, "")
    found = settings_of(done.stdout)
    # A setting with no value (metrics) is listed as the comment '# key is not set'.
    listed = [
        line.removeprefix("# ").removesuffix(" is not set")
        if line.startswith("#")
        else line.split(" = ", 1)[0]
        for line in done.stdout.splitlines()
        if not line.startswith("#") or line.endswith(" is not set")
    ]
    assert listed == list(SETTINGS)
    assert found["idle_timeout"] == "idle_timeout = 900  # default: 600"
    assert found["user_failure_limit"] == "user_failure_limit = 3  # default: 5"
    assert found["mailbox"] == (
        f'mailbox = "{site.root}/mail/{{user}}"  # default: "/var/mail/{{user}}"'
    )
    assert found["auth"] == (
        f'auth = ["passlib:{site.users}"]  # default: ["passlib:/etc/pop3srv/users"]'
    )
    assert found["listen_tls"] == 'listen_tls = ["tcp:995"]  # default: []'
    assert found["tls_cert"] == f'tls_cert = "{site.cert}"  # default: not set'
    assert found["index_dir"] == f'index_dir = "{site.index}"  # default: not set'
    # Set in the example file, to the default.
    assert found["listen"] == 'listen = ["tcp:110"]'
    assert found["failure_delay"] == "failure_delay = 2.0"
    assert found["plaintext_auth_networks"] == (
        'plaintext_auth_networks = ["127.0.0.0/8", "::1/128"]'
    )
    assert f"# certificate {site.cert}: CN=localhost, expires " in done.stdout


def test_listing_is_a_config(site: Site) -> None:
    """The listing is TOML that check-config accepts, with the same values."""
    first = site.check("--max-connections", "7")
    assert first.returncode == 0
    listing = site.root / "listing.toml"
    listing.write_text(first.stdout)
    again = run("check-config", "--config", listing, "--user", me())
    assert (again.returncode, again.stderr) == (0, "")
    assert tomllib.loads(again.stdout) == tomllib.loads(first.stdout)
    assert tomllib.loads(first.stdout)["max_connections"] == 7


def test_defaults_unset_shown_as_comments(site: Site) -> None:
    """A setting with no value and no default is a comment line."""
    site.replace(f'index_dir = "{site.index}"', "")
    done = site.check()
    assert done.returncode == 0, done.stderr
    assert "# index_dir is not set" in done.stdout.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is about running as root")
def test_root_without_user_warns(site: Site) -> None:
    """Run as root without --user, access checks mean little: say so, but pass."""
    done = run("check-config", "--config", site.config)
    assert done.returncode == 0
    (line,) = done.stderr.splitlines()
    assert line.startswith(PREFIX + "warning: checked file access as root")


def test_broken_toml(site: Site) -> None:
    """A file that is not TOML: exit 1, one line naming the file and line; no listing."""
    number = site.replace("idle_timeout = 600", "idle_timeout = = 600")
    done = site.check()
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = problems(done.stderr)
    assert line.startswith(f"{site.config}:{number}: ")


def test_bad_value(site: Site) -> None:
    """A value start-up refuses: its file:line and why."""
    number = site.replace("idle_timeout = 600", "idle_timeout = 60")
    done = site.check()
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"{site.config}:{number}: idle_timeout must be at least 600 (RFC 1939 section 3)"
    ]


def test_bad_option(site: Site) -> None:
    """An option twistd pop3srv does not know is a problem, in twistd's words."""
    done = site.check("--no-such-option")
    assert done.returncode == 1
    assert problems(done.stderr) == ["option --no-such-option not recognized"]


@pytest.mark.parametrize("given", ["file", "command line"])
def test_malformed_user_lines(site: Site, given: str) -> None:
    """
    Every line the server would skip is a problem, by number and never
    quoted; the listing is still printed.  So for a file given with --auth.
    """
    users = site.users if given == "file" else site.root / "other-users"
    if given == "command line":
        add_user(users, "carol")
    with users.open("a") as f:
        f.write("# a comment\n\nno-colon-secret-text\nbob:{PLAIN}plain-secret\n")
    first_user_lines = users.read_text().count("\n") - 4
    extra = () if given == "file" else ("--auth", f"passlib:{users}")
    done = site.check(*extra)
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"{users}:{first_user_lines + 3}: no ':' separator",
        f"{users}:{first_user_lines + 4}: user 'bob': plaintext passwords are not accepted",
    ]
    assert "secret" not in done.stderr
    assert f'auth = ["passlib:{users}"]' in done.stdout


def test_missing_user_file(site: Site) -> None:
    """A user file that cannot be read stops start-up: named with where it was set."""
    site.users.unlink()
    done = site.check()
    assert done.returncode == 1
    (line,) = problems(done.stderr)
    assert line.startswith(f"{site.config}:")
    assert line.endswith(f"{site.users}: No such file or directory")


def test_mismatched_key(site: Site) -> None:
    """A key that is not the certificate's stops start-up."""
    _, other_key = Authority.create().issue(site.root, "other", serial=2)
    done = site.check("--tls-key", other_key)
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"{other_key}: the private key does not match the certificate in {site.cert}"
    ]


def test_expired_certificate(site: Site) -> None:
    """An expired certificate is a problem (start-up itself would not notice)."""
    now = datetime.datetime.now(datetime.UTC)
    cert, key = dated_certificate(
        site.root, now - datetime.timedelta(days=100), now - datetime.timedelta(days=3, hours=1)
    )
    done = site.check("--tls-cert", cert, "--tls-key", key)
    assert done.returncode == 1
    (line,) = problems(done.stderr)
    assert line.startswith(f"--tls-cert: {cert}: certificate expired on ")
    assert line.endswith(" UTC (3 days ago)")


def test_certificate_not_yet_valid(site: Site) -> None:
    """So is one whose validity starts in the future."""
    now = datetime.datetime.now(datetime.UTC)
    cert, key = dated_certificate(
        site.root, now + datetime.timedelta(days=1), now + datetime.timedelta(days=100)
    )
    done = site.check("--tls-cert", cert, "--tls-key", key)
    assert done.returncode == 1
    (line,) = problems(done.stderr)
    assert line.startswith(f"--tls-cert: {cert}: certificate is not valid before ")


def test_certificate_expiring_soon(site: Site) -> None:
    """Under 14 days left: a warning, and start-up would still succeed."""
    now = datetime.datetime.now(datetime.UTC)
    cert, key = dated_certificate(
        site.root, now - datetime.timedelta(days=80), now + datetime.timedelta(days=5, hours=1)
    )
    done = site.check("--tls-cert", cert, "--tls-key", key)
    assert done.returncode == 0
    (line,) = problems(done.stderr)
    assert line.startswith(f"warning: --tls-cert: {cert}: certificate expires in 5 days, on ")
    assert f"# certificate {cert}: CN=localhost, expires " in done.stdout
    # 15 days: no warning.
    cert, key = dated_certificate(
        site.root, now - datetime.timedelta(days=80), now + datetime.timedelta(days=15, hours=1)
    )
    assert site.check("--tls-cert", cert, "--tls-key", key).stderr == ""


# --- the service user's access


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """
    A directory every user may search (pytest's own temporary directories
    are private to the user running the tests).
    """
    root = Path(tempfile.mkdtemp(prefix="pop3srv-test-cli-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture
def open_site(open_dir: Path) -> Site:
    return make_site(open_dir)


@pytest.mark.skipif(me() == "nobody", reason="needs a user other than the tests'")
def test_service_user_access(open_site: Site) -> None:
    """
    --user and --group: the user file (mode 0640) and the index directory
    (0755), both owned by the tests' user, are not for nobody; with the
    file's group added (and the directory group-writable) they are.
    """
    site = open_site
    site.index.chmod(0o755)
    done = site.check("--user", "nobody")
    assert done.returncode == 1
    owner = f"owner {me()}:{grp.getgrgid(site.users.stat().st_gid).gr_name}"
    assert problems(done.stderr) == [
        f"{site.users}: user nobody cannot read it ({owner}, mode 0640)",
        f"{site.config}:{index_line(site)}: {site.index}: user nobody cannot write in it "
        f"({owner}, mode 0755)",
    ]
    group = grp.getgrgid(site.users.stat().st_gid).gr_name
    site.index.chmod(0o775)
    allowed = site.check("--user", "nobody", "--group", group)
    assert (allowed.returncode, allowed.stderr) == (0, "")
    assert "# file access checked for user nobody" in allowed.stdout.splitlines()


def index_line(site: Site) -> int:
    lines = site.config.read_text().split("\n")
    return lines.index(f'index_dir = "{site.index}"') + 1


def test_spool_without_index_dir(open_site: Site) -> None:
    """Without index_dir the indexes go beside each mbox: the spool must be writable."""
    site = open_site
    site.replace(f'index_dir = "{site.index}"', "")
    (site.root / "mail").chmod(0o755)
    site.users.chmod(0o644)
    done = site.check("--user", "nobody")
    assert done.returncode == 1
    (line,) = problems(done.stderr)
    assert line.startswith(f"{site.config}:")
    assert line.endswith(
        f"{site.root}/mail: user nobody cannot write in it "
        f"(owner {me()}:{grp.getgrgid(os.getegid()).gr_name}, mode 0755); "
        "without index_dir the indexes go beside each mbox"
    )


@pytest.mark.skipif(me() == "nobody", reason="needs a user other than the tests'")
def test_check_config_as_the_service_user(open_site: Site) -> None:
    """
    The service user must read --config (the server reads it at start-up
    and on every SIGHUP) and create files where its control socket goes.
    """
    site = open_site
    # Everything else is for nobody to use.
    for path in (site.users, site.cert, site.key):
        path.chmod(0o644)
    site.index.chmod(0o777)
    run_dir = site.root / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    site.config.chmod(0o600)
    control = run_dir / "control"
    done = site.check("--user", "nobody", "--control-socket", control)
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"--config: {site.config}: user nobody cannot read it ({describe(site.config)}); "
        "the server reads it at start-up and on SIGHUP",
        f"--control-socket: control socket {control}: {run_dir}: user nobody cannot write "
        f"in it ({describe(run_dir)})",
    ]
    site.config.chmod(0o644)
    run_dir.chmod(0o777)
    allowed = site.check("--user", "nobody", "--control-socket", control)
    assert (allowed.returncode, allowed.stderr) == (0, "")
    assert f"# control socket {control}" in allowed.stdout.splitlines()


def test_check_config_control_socket_place(site: Site, socket_dir: Path) -> None:
    """
    Start-up fails where the control socket cannot be made: in a directory
    that does not exist (from the file or the command line), at a path too
    long for a UNIX socket, over a file that is not a socket.  A socket an
    earlier server left, a directory to write in and none pass; auto is
    resolved as the server resolves it, in systemd's RUNTIME_DIRECTORY.
    """
    number = site.replace('control_socket = "auto"', 'control_socket = "/nonexistent/dir/control"')
    done = site.check()
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"{site.config}:{number}: control socket /nonexistent/dir/control: "
        "/nonexistent/dir does not exist"
    ]
    too_long = socket_dir / ("x" * 100)
    done = site.check("--control-socket", too_long)
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"--control-socket: control socket {too_long}: the path has "
        f"{len(str(too_long))} bytes, more than a UNIX socket's 107"
    ]
    control = socket_dir / "control"
    control.write_text("")
    done = site.check("--control-socket", control)
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"--control-socket: control socket {control}: exists and is not a socket"
    ]
    control.unlink()
    for left_by_a_server in (False, True):
        if left_by_a_server:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
                stale.bind(str(control))
        done = site.check("--control-socket", control)
        assert (done.returncode, done.stderr) == (0, "")
        assert f"# control socket {control}" in done.stdout.splitlines()
    done = site.check("--control-socket", "none")
    assert (done.returncode, done.stderr) == (0, "")
    assert "# control socket: none" in done.stdout.splitlines()
    site.replace('control_socket = "/nonexistent/dir/control"', 'control_socket = "auto"')
    args = ("check-config", "--config", site.config, "--user", me())
    done = run(*args, env=environment(socket_dir / "absent"))
    assert done.returncode == 1
    assert problems(done.stderr) == [
        f"{site.config}:{number}: control socket {socket_dir}/absent/control: "
        f"{socket_dir}/absent does not exist"
    ]
    done = run(*args, env=environment(socket_dir))
    assert (done.returncode, done.stderr) == (0, "")
    assert f"# control socket {control}" in done.stdout.splitlines()
    if not os.path.lexists("/run/pop3srv"):
        done = run(*args, env=environment())
        assert (done.returncode, done.stderr) == (0, "")
        assert (
            "# control socket: none outside systemd (/run/pop3srv does not exist); "
            "under systemd, $RUNTIME_DIRECTORY/control"
        ) in done.stdout.splitlines()


# --- the access rules, in process


def test_access_owner_bits_rule(open_dir: Path) -> None:
    """
    As the kernel does: the owner gets the owner's bits even when the
    group's would allow more; a group member the group's; others theirs;
    root everything.
    """
    path = open_dir / "f"
    path.write_text("")
    if os.geteuid() == 0:
        # Root's own file would be root's, which may read anything.
        os.chown(path, 54321, 54321)
    st = path.stat()
    owner = ServiceIdentity("owner", st.st_uid, frozenset())
    member = ServiceIdentity("member", st.st_uid + 1, frozenset({st.st_gid}))
    other = ServiceIdentity("other", st.st_uid + 1, frozenset({st.st_gid + 1}))
    path.chmod(0o040)
    assert owner.cannot(str(path), os.R_OK) == (
        f"{path}: user owner cannot read it ({describe(path)})"
    )
    assert member.cannot(str(path), os.R_OK) is None
    assert other.cannot(str(path), os.R_OK) is not None
    path.chmod(0o004)
    assert member.cannot(str(path), os.R_OK) is not None
    assert other.cannot(str(path), os.R_OK) is None
    assert ServiceIdentity("root", 0).cannot(str(path), os.R_OK | os.W_OK) is None


def test_access_needs_search_on_every_directory(open_dir: Path) -> None:
    """A readable file in a directory the user cannot search is out of its reach."""
    closed = open_dir / "closed"
    closed.mkdir()
    path = closed / "f"
    path.write_text("")
    path.chmod(0o644)
    closed.chmod(0o700)
    st = path.stat()
    stranger = ServiceIdentity("stranger", st.st_uid + 1, frozenset({st.st_gid + 1}))
    assert stranger.cannot(str(path), os.R_OK) == (
        f"{path}: user stranger cannot reach it: no search permission on {closed} "
        f"({describe(closed)})"
    )
    closed.chmod(0o711)
    assert stranger.cannot(str(path), os.R_OK) is None


def describe(path: Path) -> str:
    """How the messages describe a file's owner and mode."""
    st = path.stat()
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {owner}:{group}, mode {st.st_mode & 0o7777:04o}"


def test_listing_reader_gone(site: Site) -> None:
    """
    When the reader of the listing goes away (| head), the problems still
    reach stderr and the exit status is still the verdict.
    """
    with site.users.open("a") as f:
        f.write("no-colon\n")
    process = subprocess.Popen(
        [SCRIPT, "check-config", "--config", str(site.config), "--user", me()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    try:
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 1
    finally:
        process.kill()
        process.wait()
    assert problems(stderr) == [f"{site.users}:2: no ':' separator"]


# --- who and stats


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for a control socket: its path has about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pop3cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def environment(runtime_directory: Path | None = None) -> dict[str, str]:
    """
    This environment, with systemd's C{RUNTIME_DIRECTORY} set to
    C{runtime_directory}, or unset.
    """
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    if runtime_directory is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime_directory)
    return env


def failed(done: subprocess.CompletedProcess[str]) -> str:
    """The one line of a command that failed (exit status 1), without the prefix."""
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pop3srv: "), done.stderr
    return done.stderr.removeprefix("pop3srv: ").rstrip("\n")


def login(port: int, user: str) -> poplib.POP3:
    """A POP3 session on 127.0.0.1:C{port}, logged in as C{user}."""
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user(user)
    client.pass_(PASSWORDS[user])
    return client


def logins(text: str, result: str) -> int:
    """The logins with C{result} in a C{pop3srv stats} text, over every method."""
    pattern = rf'^pop3srv_logins_total\{{result="{result}",method="[^"]*"\}} (\d+)$'
    return sum(int(n) for n in re.findall(pattern, text, re.MULTILINE))


def test_who_and_stats(socket_dir: Path, live_server: Callable[..., Pop3Server]) -> None:
    """
    Against C{twistd pop3srv --workers 2}: C{pop3srv who} lists the held
    sessions as a table, or as JSON with C{--json}; C{pop3srv stats} counts
    the logins; the socket is found by C{--control-socket}, by the
    C{control_socket} of C{--config}, which the command line overrides, and
    by C{auto} in systemd's C{RUNTIME_DIRECTORY}, as the server finds it.
    """
    path = socket_dir / "control"
    srv = live_server("--workers", "2", "--control-socket", str(path))
    sessions = {user: login(srv.port, user) for user in ("alice", "bob")}
    try:
        clients = {
            user: "{}:{}".format(*client.sock.getsockname()[:2])
            for user, client in sessions.items()
        }
        done = run("who", "--control-socket", path)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        heading, *rows = done.stdout.splitlines()
        assert heading.split() == "USER CLIENT LISTENER TLS SINCE AGE STATE PID".split()
        assert sorted((row.split()[0], row.split()[1]) for row in rows) == sorted(clients.items())
        assert all(row.split()[2:4] == ["pop3", "-"] for row in rows)

        as_json = run("who", "--json", "--control-socket", path)
        assert (as_json.returncode, as_json.stderr) == (0, "")
        listed = json.loads(as_json.stdout)
        assert {s["user"]: s["client"] for s in listed} == clients
        assert all(s["state"] == "transaction" for s in listed)

        config = socket_dir / "pop3srv.toml"
        config.write_text(f'control_socket = "{path}"\n')
        assert json.loads(run("who", "--json", "--config", config).stdout) == listed
        config.write_text('control_socket = "none"\n')
        overridden = run("who", "--json", "--config", config, "--control-socket", path)
        assert json.loads(overridden.stdout) == listed
        config.write_text('control_socket = "auto"\n')
        found = run("who", "--json", "--config", config, env=environment(socket_dir))
        assert json.loads(found.stdout) == listed
        assert json.loads(run("who", "--json", env=environment(socket_dir)).stdout) == listed

        # A worker's counts are its own: stats adds up both processes.
        deadline = time.monotonic() + 10
        while True:
            done = run("stats", "--control-socket", path)
            assert (done.returncode, done.stderr) == (0, ""), done.stderr
            if logins(done.stdout, "ok") == 2:
                break
            assert time.monotonic() < deadline, done.stdout
            time.sleep(0.1)
        assert re.search(r"^pop3srv_processes 2$", done.stdout, re.MULTILINE), done.stdout
        assert logins(done.stdout, "failed") == 0
        assert run("stats", "--config", config, env=environment(socket_dir)).stdout.count(
            "pop3srv_logins_total{"
        ) == done.stdout.count("pop3srv_logins_total{")
    finally:
        for client in sessions.values():
            client.quit()


def test_no_control_socket(socket_dir: Path) -> None:
    """
    Without a control socket to read, each command fails in one line
    saying why: none configured, nothing at the path, no such file.
    """
    for command in ("who", "stats"):
        assert failed(run(command, "--control-socket", "none")) == (
            "the server has no control socket (--control-socket none)"
        )
    config = socket_dir / "pop3srv.toml"
    config.write_text('control_socket = "none"\n')
    assert failed(run("who", "--config", config)) == (
        f'the server has no control socket (control_socket = "none" in {config})'
    )
    missing = socket_dir / "control"
    no_socket = f"{missing}: no such socket (is pop3srv running, with this --control-socket?)"
    assert failed(run("stats", "--control-socket", missing)) == no_socket
    # auto: where the server makes it under systemd.
    assert failed(run("who", "--json", env=environment(socket_dir))) == no_socket
    config.write_text(f'control_socket = "{missing}"\n')
    assert failed(run("stats", "--config", config)) == no_socket
    assert failed(run("who", "--config", socket_dir / "absent.toml")) == (
        f"{socket_dir}/absent.toml: cannot read configuration: No such file or directory"
    )
    config.write_text('control_sockets = "none"\n')
    assert failed(run("who", "--config", config)).startswith(
        f"{config}:1: unknown setting 'control_sockets'"
    )


@pytest.mark.skipif(os.path.lexists("/run/pop3srv"), reason="a pop3srv is installed here")
def test_auto_outside_systemd() -> None:
    """
    Outside systemd, C{auto} is /run/pop3srv/control for the admin even
    where this user could not create it (the server's question, not the
    admin's).
    """
    assert failed(run("who", env=environment())) == (
        "/run/pop3srv/control: no such socket (is pop3srv running, with this --control-socket?)"
    )
