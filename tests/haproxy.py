# -*- test-case-name: tests.test_several_nodes -*-
"""
Run Debian's real C{haproxy} for integration tests: in the foreground, on
loopback ports, with a configuration made from the sample
C{etc/haproxy/pop3srv.cfg} (addresses and ports put in) in a temporary
directory. Never the system service.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "haproxy" / "pop3srv.cfg"

# The sample's section names: tests put their addresses into these.
PLAIN_FRONTEND = "pop3"
TLS_FRONTEND = "pop3s"
PLAIN_BACKEND = "pop3_nodes"
TLS_BACKEND = "pop3s_nodes"


def available() -> bool:
    """Whether an C{haproxy} binary is installed."""
    return Path(HAPROXY).exists()


@dataclass(frozen=True)
class Node:
    """Where one pop3srv node serves: C{host:port} for plain POP3 and for implicit TLS."""

    plain: str
    tls: str


def configure(
    sample: str,
    *,
    binds: Mapping[str, str],
    nodes: Sequence[Node],
    global_section: str,
    proxy_header: str = "send-proxy-v2",
    balance: str | None = None,
    check_interval: str | None = None,
) -> str:
    """
    The sample configuration with test values put in.

    @param sample: the text of C{etc/haproxy/pop3srv.cfg}.
    @param binds: per frontend name, the address its C{bind} line gets.
    @param nodes: the nodes, in the order of the sample's C{server} lines
        (C{node1}, C{node2}, ...); there must be as many as the sample has.
    @param global_section: the lines of the C{global} section, which replaces
        the sample's (that one is for a system service: chroot, user, syslog).
    @param proxy_header: C{send-proxy-v2} (as in the sample) or C{send-proxy}
        for PROXY protocol v1.
    @param balance: if given, the algorithm for every backend.
    @param check_interval: if given, the C{inter} of the health checks.
    @return: the configuration text.
    @raise ValueError: if the sample no longer has the structure described
        here (a section, C{bind} or C{server} line the tests rely on).
    """
    out: list[str] = []
    section = ""
    name = ""
    seen_binds: set[str] = set()
    seen_servers: dict[str, int] = {}
    for line in sample.splitlines():
        words = line.split()
        if line[:1].strip():  # a section header starts in column 0
            section, name = words[0], (words[1] if len(words) > 1 else "")
            if section == "global":
                out.append("global")
                out.extend(f"    {entry}" for entry in global_section.strip().splitlines())
            else:
                out.append(line)
            continue
        if section == "global" or not words or words[0].startswith("#"):
            continue
        if words[0] == "bind" and section == "frontend":
            if name not in binds:
                raise ValueError(f"no address for the bind line of frontend {name}")
            seen_binds.add(name)
            line = f"    bind {binds[name]}"
        elif words[0] == "server" and section == "backend":
            index = seen_servers.get(name, 0)
            seen_servers[name] = index + 1
            if index >= len(nodes):
                raise ValueError(f"backend {name} has more servers than the {len(nodes)} nodes")
            address = nodes[index].tls if name == TLS_BACKEND else nodes[index].plain
            line = "    " + " ".join([*words[:2], address, *words[3:]])
        elif words[0] == "balance" and balance is not None:
            line = f"    balance {balance}"
        elif words[0] == "default-server" and check_interval is not None:
            line = re.sub(r"\binter \S+", f"inter {check_interval}", line)
        line = re.sub(r"\bsend-proxy-v2\b", proxy_header, line)
        out.append(line)
    if seen_binds != set(binds):
        raise ValueError(f"sample has no frontend(s) {sorted(set(binds) - seen_binds)}")
    for backend in (PLAIN_BACKEND, TLS_BACKEND):
        if seen_servers.get(backend) != len(nodes):
            raise ValueError(f"backend {backend} must have a server line per node ({len(nodes)})")
    return "\n".join(out) + "\n"


class HAProxy:
    """
    One C{haproxy -db} process (foreground, no daemon) with a configuration
    file, a stats socket and its log in C{root}.

    @ivar config: the configuration file.
    @ivar log: where HAProxy's standard output and error (its log) go.
    @ivar stats: the admin socket, for the servers' states.
    """

    def __init__(self, root: Path, config: str) -> None:
        """
        @param root: a directory of its own for the files.
        @param config: the configuration text; C{{stats}} in it is replaced
            by the stats socket's path.
        """
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.stats = root / "stats.sock"
        self.config = root / "haproxy.cfg"
        self.config.write_text(config.replace("{stats}", str(self.stats)))
        self.log = root / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def test_global(*, maxconn: int = 200) -> str:
        """
        A C{global} section for a test: logs to standard output, and a stats
        socket at C{{stats}} (see L{__init__}).
        """
        return (
            "log stdout format raw local0 info\n"
            "stats socket {stats} mode 600 level admin\n"
            f"maxconn {maxconn}\n"
        )

    def check(self) -> None:
        """
        @raise RuntimeError: with HAProxy's own words, if it rejects the
            configuration.
        """
        result = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"haproxy -c: {result.stdout}{result.stderr}")

    def start(self, *, timeout: float = 20) -> HAProxy:
        """Start it and wait until its stats socket answers."""
        self.check()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log_text()}")
            try:
                self.command("show info")
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"haproxy did not start: {self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def command(self, command: str) -> str:
        """One command on the stats socket (e.g. C{show stat}); the answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[tuple[str, str], str]:
        """Per (backend, server), its state as HAProxy shows it: C{UP}, C{DOWN}, ..."""
        text = self.command("show stat").lstrip("# ")
        states = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["svname"] not in ("FRONTEND", "BACKEND"):
                states[(row["pxname"], row["svname"])] = row["status"]
        return states

    def wait_up(self, *, timeout: float = 20) -> None:
        """
        Wait until every server is C{UP} (its health checks pass).

        @raise RuntimeError: after C{timeout} seconds, with the states.
        """
        deadline = time.monotonic() + timeout
        states: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            states = self.server_states()
            if states and all(state == "UP" for state in states.values()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"haproxy servers not all up: {states}\n{self.log_text()}")

    def stop(self) -> None:
        """Stop it (SIGTERM: the hard stop, every connection closed)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
