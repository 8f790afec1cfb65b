"""
A private Dovecot POP3 server for tests: Debian's C{dovecot-pop3d} run as
C{dovecot -F -c OWN.conf} on a free loopback port, with every file of its
own (configuration, run and state directories, log, mbox spool, index) in a
temporary directory.  It is never the system service.

Dovecot refuses to give mail access to root, so when the tests run as root
the mail belongs to the system C{mail} user, and Dovecot's mail processes
run as that user; otherwise everything is the test user's.  The approach is
the one C{tests/bench/run.py} uses for its benchmark instance.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from livepop3 import free_port
from neighbours import require_binary

HOST = "127.0.0.1"


def require_dovecot() -> str:
    """
    The path of C{dovecot}; skips the calling test if Dovecot's POP3 server
    is not installed.
    """
    found = require_binary("dovecot")
    # The pop3 binary comes with dovecot-pop3d, not with dovecot-core.
    if not any(os.path.exists(f"{d}/pop3") for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
        pytest.skip("Dovecot's POP3 server is not installed (apt-get install dovecot-pop3d)")
    return found


def mail_owner() -> tuple[int, int]:
    """
    The uid and gid the test mail and Dovecot's mail processes use: the
    caller's, or the system C{mail} user's when the caller is root.
    """
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam("mail")
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class Listing:
    """
    What a POP3 server says about a maildrop: per message number (from 1),
    its UIDL and its LIST size.
    """

    uidls: dict[int, bytes]
    sizes: dict[int, int]


class DovecotServer:
    """
    One private Dovecot instance serving POP3 from mbox files.

    @ivar root: its directory (mode 0755, so Dovecot's unprivileged
        processes can reach it); removed by L{cleanup}.
    @ivar spool: where the users' mbox files live, one per user name.
    @ivar port: the loopback port it listens on once started.
    """

    def __init__(
        self,
        passwords: Mapping[str, str],
        *,
        uidl_format: str = "%08Xu%08Xv",
        master_users: Mapping[str, str] | None = None,
        settings: str = "",
    ) -> None:
        """
        @param passwords: user name to password.
        @param uidl_format: Dovecot's C{pop3_uidl_format}.
        @param master_users: master user name to password; they may log in
            as any user (SASL PLAIN with that user as authorization id, or
            C{USER user*master}).
        @param settings: more configuration lines, appended.
        """
        # A short path for Dovecot's UNIX sockets, outside pytest's 0700
        # tmp_path that Dovecot's unprivileged processes cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="p3dovecot-"))
        os.chmod(self.root, 0o755)  # noqa: S103 (Dovecot's other users must reach it)
        self.spool = self.root / "mail"
        self.folders = self.root / "folders"
        self.index = self.root / "index"
        self.passwords = dict(passwords)
        self.user_settings: dict[str, dict[str, str]] = {}
        self.master_users = dict(master_users or {})
        self.uidl_format = uidl_format
        self.settings = settings
        self.port = 0
        self.log = self.root / "dovecot.log"
        self.process: subprocess.Popen[bytes] | None = None
        uid, gid = mail_owner()
        for d in (self.spool, self.folders, self.index):
            d.mkdir()
            os.chown(d, uid, gid)

    def add_user(self, name: str, password: str, **settings: str) -> None:
        """
        Add a user, with settings of its own (userdb fields, such as
        C{pop3_uidl_format}), from the next start on.
        """
        self.passwords[name] = password
        self.user_settings[name] = settings

    def mbox(self, user: str) -> Path:
        """The path of C{user}'s mbox."""
        return self.spool / user

    def put_mbox(self, user: str, data: bytes) -> Path:
        """
        Write C{user}'s mbox as C{data}, owned by the mail user, and forget
        what Dovecot's index knew of it.
        """
        path = self.mbox(user)
        path.write_bytes(data)
        uid, gid = mail_owner()
        os.chown(path, uid, gid)
        os.chmod(path, 0o600)
        shutil.rmtree(self.index / user, ignore_errors=True)
        return path

    def _write_config(self) -> Path:
        uid, gid = mail_owner()
        passwd = self.root / "passwd"
        lines = []
        for name, password in self.passwords.items():
            # Dovecot expands % in userdb fields: doubled, it stays one.
            fields = " ".join(
                f"userdb_{key}={value.replace('%', '%%')}"
                for key, value in self.user_settings.get(name, {}).items()
            )
            lines.append(
                f"{name}:{{PLAIN}}{password}:{uid}:{gid}::{self.folders}/{name}::{fields}\n"
            )
        passwd.write_text("".join(lines))
        master = ""
        if self.master_users:
            masters = self.root / "masters"
            masters.write_text(
                "".join(f"{name}:{{PLAIN}}{pw}\n" for name, pw in self.master_users.items())
            )
            master = f"""\
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  master = yes
  args = {masters}
}}
"""
        conf = self.root / "dovecot.conf"
        conf.write_text(f"""\
# A private test instance: never the system service.
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log}
protocols = pop3
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = mbox:{self.folders}/%u:INBOX={self.spool}/%u:INDEX={self.index}/%u
pop3_uidl_format = {self.uidl_format}
{master}passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{self.settings}
""")
        return conf

    def start(self) -> DovecotServer:
        """Start it and wait for its greeting (30 s at most)."""
        self.port = free_port()
        conf = self._write_config()
        with open(self.root / "dovecot.stdout", "ab") as out:
            self.process = subprocess.Popen(
                [require_dovecot(), "-F", "-c", str(conf)],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited at start-up: {self.log_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if s.recv(200).startswith(b"+OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not start within 30 s: {self.log_text()}")

    def restart(
        self, *, uidl_format: str | None = None, settings: str | None = None
    ) -> DovecotServer:
        """
        Stop, forget Dovecot's index (so that it reads the mbox files again),
        change the UIDL format or the extra settings, and start again.
        """
        self.stop()
        if uidl_format is not None:
            self.uidl_format = uidl_format
        if settings is not None:
            self.settings = settings
        for entry in self.index.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
        return self.start()

    def log_text(self) -> str:
        """Dovecot's log and what it printed."""
        parts = []
        for name in ("dovecot.stdout", "dovecot.log"):
            path = self.root / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL to its own process group)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            # Only the process group started above (start_new_session).
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def cleanup(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@contextmanager
def pop3_session(
    port: int, user: str, password: str, *, timeout: float = 30
) -> Iterator[poplib.POP3]:
    """
    A logged-in POP3 session on the loopback C{port}, QUIT at the end (which
    commits what the session did).
    """
    client = poplib.POP3(HOST, port, timeout=timeout)
    try:
        client.user(user)
        client.pass_(password)
        yield client
    finally:
        try:
            client.quit()
        except (poplib.error_proto, OSError):
            client.close()


def listing(client: poplib.POP3) -> Listing:
    """The UIDL and LIST answers of a session."""
    uidls: dict[int, bytes] = {}
    for line in client.uidl()[1]:
        number, uidl = line.split(b" ", 1)
        uidls[int(number)] = uidl
    sizes: dict[int, int] = {}
    for line in client.list()[1]:
        number, size = line.split(b" ", 1)
        sizes[int(number)] = int(size)
    return Listing(uidls, sizes)


def retrieve(client: poplib.POP3, number: int) -> bytes:
    """
    Message C{number} as RETR sends it, dot-unstuffed, with CRLF line ends
    (the octets LIST counts).
    """
    lines = client.retr(number)[1]
    return b"".join(line + b"\r\n" for line in lines)
