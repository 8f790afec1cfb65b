"""
Several pop3srv nodes behind HAProxy, with one Redis, all real: two
C{twistd pop3srv} nodes on one mail spool share their failure counts in
C{redis-server} and sit behind C{haproxy} run with the sample
C{etc/haproxy/pop3srv.cfg}, which starts every connection with a PROXY
header (v2, or v1 for the C{send-proxy} variant) and passes TLS through.
Clients bind their sockets to other loopback addresses (127.0.0.5, ...),
so the address a node logs says whether the header was honoured.
"""

from __future__ import annotations

import poplib
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import Authority
from haproxy import (
    HAPROXY,
    PLAIN_FRONTEND,
    SAMPLE,
    TLS_FRONTEND,
    HAProxy,
    Node,
    available,
    configure,
)
from livepop3 import Pop3Server, free_port, write_mbox
from neighbours import RedisServer
from passlib.hash import sha512_crypt

pytestmark = pytest.mark.skipif(
    not available(), reason="haproxy is not installed (.ci/run installs it)"
)

# Each test its own users and client addresses: lockouts and open sessions
# last for the module, whose nodes are started once.
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
PASSWORDS = {name: f"{name}-pw" for name in USERS}
MESSAGE = b"Subject: hello\n\nfrom the shared spool\n"

# The nodes trust only HAProxy's address.
HAPROXY_ADDRESS = "127.0.0.1"
USER_FAILURE_LIMIT = 3

# What a node logs when Redis goes away and when it is back.
REDIS_DOWN = re.compile(r"Redis at \S+ unreachable")
REDIS_BACK = re.compile(r"Redis at \S+ is back")

AUDIT = re.compile(
    r"pop3srv-audit event=(?P<event>\S+) session=\S+ peer=(?P<peer>\S+)"
    r' user=(?P<user>"(?:[^"\\]|\\.)*"|-) reason=(?P<reason>\S+)'
)


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> bool:
    """Poll C{condition()} every 50 ms for at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


class BoundPOP3(poplib.POP3):
    """A POP3 client whose socket is bound to the loopback address C{source}."""

    def __init__(self, port: int, source: str, timeout: float = 20.0) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class BoundPOP3SSL(poplib.POP3_SSL):
    """A POP3 over implicit TLS client whose socket is bound to C{source}."""

    def __init__(
        self, port: int, source: str, context: ssl.SSLContext, timeout: float = 20.0
    ) -> None:
        self.source = source
        self.tls_context = context
        super().__init__("127.0.0.1", port, context=context, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        return self.tls_context.wrap_socket(sock, server_hostname=self.host)


class ClusterNode(Pop3Server):
    """
    A pop3srv node: plain POP3 and implicit TLS on loopback, the shared
    spool, index directory and user file, and the given options.
    """

    def __init__(self, root: Path, spool: Path, cert: Path, key: Path, *extra: str) -> None:
        self.tls_port = free_port()
        super().__init__(
            root,
            "--listen-tls", f"tcp:{self.tls_port}:interface=127.0.0.1",
            "--tls-cert", str(cert), "--tls-key", str(key),
            "--index-dir", str(spool / "index"),
            *extra,
            quick_failures=False,
        )  # fmt: skip
        self.mail = spool / "mail"
        self.users = spool / "users"

    def start(self) -> ClusterNode:
        """
        Start it and wait for a greeting, asked for from an address outside
        the proxy networks (from one inside it would wait for a header).
        """
        self.process = self.spawn()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.output.read_text(errors="replace")
                raise RuntimeError(f"pop3srv exited: {output}{self.log_text()}")
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1, source_address=("127.0.0.3", 0)
                ) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pop3srv did not start: {self.log_text()}")

    @property
    def output(self) -> Path:
        """Where twistd's own output goes (a bad option is said there, not in the log)."""
        return self.root / "twistd.out"

    def spawn(self) -> subprocess.Popen[bytes]:
        with self.output.open("ab") as output:
            return subprocess.Popen(
                self.argv(), cwd=self.root, stdout=output, stderr=subprocess.STDOUT
            )

    def audit(self, **match: str) -> list[dict[str, str]]:
        """The audit lines of its log whose fields have the given values."""
        found = []
        for m in AUDIT.finditer(self.log_text()):
            fields = m.groupdict()
            if all(fields[k] == v for k, v in match.items()):
                found.append(fields)
        return found


@dataclass
class Cluster:
    """The nodes, Redis and HAProxy of the module, and what clients need."""

    nodes: list[ClusterNode]
    redis: RedisServer
    haproxy: HAProxy
    plain_port: int
    tls_port: int
    tls_context: ssl.SSLContext
    pki: Path

    def login(self, user: str, source: str, *, tls: bool = False) -> poplib.POP3:
        """A session through HAProxy, logged in with the right password."""
        client = self.connect(source, tls=tls)
        client.user(user)
        client.pass_(PASSWORDS[user])
        return client

    def connect(self, source: str, *, tls: bool = False) -> poplib.POP3:
        if tls:
            return BoundPOP3SSL(self.tls_port, source, self.tls_context)
        return BoundPOP3(self.plain_port, source)

    def attempt(self, user: str, password: str, source: str) -> str:
        """One USER/PASS through HAProxy on a new connection; the PASS reply."""
        client = self.connect(source)
        try:
            client.user(user)
            try:
                reply = client.pass_(password)
            except poplib.error_proto as e:
                reply = e.args[0]
            return reply.decode() if isinstance(reply, bytes) else str(reply)
        finally:
            client.close()

    def audited(self, **match: str) -> list[list[dict[str, str]]]:
        """Per node, its audit lines matching C{match}."""
        return [node.audit(**match) for node in self.nodes]


def write_users(path: Path) -> None:
    path.write_text(
        "".join(
            f"{name}:{{SHA512-CRYPT}}{sha512_crypt.using(rounds=1000).hash(password)}::\n"
            for name, password in PASSWORDS.items()
        )
    )


def haproxy_config(cluster_nodes: list[ClusterNode], plain: int, tls: int, header: str) -> str:
    """The sample configuration for the nodes, listening on C{plain} and C{tls}."""
    return configure(
        SAMPLE.read_text(),
        binds={PLAIN_FRONTEND: f"127.0.0.1:{plain}", TLS_FRONTEND: f"127.0.0.1:{tls}"},
        nodes=[Node(f"127.0.0.1:{n.port}", f"127.0.0.1:{n.tls_port}") for n in cluster_nodes],
        global_section=HAProxy.test_global(),
        proxy_header=header,
        # Consecutive connections alternate nodes, so a test knows it used both.
        balance="roundrobin",
        check_interval="500ms",
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Redis, two nodes on one spool (one with two server processes), HAProxy."""
    root = tmp_path_factory.mktemp("cluster")
    authority = Authority.create()
    cert, key = authority.issue(root, "node", serial=1001)
    ca = authority.write_ca(root / "root.pem")
    spool = root / "spool"
    (spool / "mail").mkdir(parents=True)
    (spool / "index").mkdir()
    write_users(spool / "users")
    for name in USERS:
        write_mbox(spool / "mail" / name, [MESSAGE])

    redis = RedisServer(root / "redis")
    redis.start()
    started: list[ClusterNode] = []
    proxy: HAProxy | None = None
    try:
        for index, workers in enumerate(("1", "2")):
            (root / f"node{index + 1}").mkdir()
            node = ClusterNode(
                root / f"node{index + 1}", spool, cert, key,
                "--workers", workers, "--hash-workers", "1",
                "--proxy-networks", f"{HAPROXY_ADDRESS}/32",
                "--proxy-header-timeout", "1",
                "--counters", redis.url,
                "--failure-delay", "0.1", "--max-failure-delay", "0.5",
                "--user-failure-limit", str(USER_FAILURE_LIMIT),
            )  # fmt: skip
            started.append(node.start())
        plain, tls = free_port(), free_port()
        proxy = HAProxy(root / "haproxy", haproxy_config(started, plain, tls, "send-proxy-v2"))
        proxy.start()
        proxy.wait_up()
        yield Cluster(
            started, redis, proxy, plain, tls, ssl.create_default_context(cafile=str(ca)), ca
        )
    finally:
        if proxy is not None:
            proxy.stop()
        for node in started:
            node.stop()
        redis.stop()


@pytest.fixture(scope="module")
def haproxy_v1(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second HAProxy from the same sample, before the same nodes, with PROXY v1."""
    plain, tls = free_port(), free_port()
    proxy = HAProxy(
        tmp_path_factory.mktemp("haproxy-v1"),
        haproxy_config(cluster.nodes, plain, tls, "send-proxy"),
    )
    proxy.start()
    try:
        proxy.wait_up()
        yield Cluster(
            cluster.nodes, cluster.redis, proxy, plain, tls, cluster.tls_context, cluster.pki
        )
    finally:
        proxy.stop()


def test_sample_is_valid_as_shipped() -> None:
    """HAProxy accepts etc/haproxy/pop3srv.cfg as it is, system settings included."""
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(SAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower()


def test_sample_sends_a_v2_header_with_the_client_address(tmp_path: Path) -> None:
    """
    HAProxy with the sample configuration starts a client's connection to
    a node, on the plain and on the passed-through TLS port, with a PROXY v2
    header for the client's address, and its health checks with a v2 header
    for LOCAL. (Stand-in nodes record what arrives; no pop3srv here.)
    """
    received: list[bytes] = []
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(4)]

    def serve(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.sendall(b"+OK stand-in\r\n")
                try:
                    received.append(conn.recv(4096))
                except OSError:
                    received.append(b"")

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    ports = [s.getsockname()[1] for s in listeners]
    plain, tls = free_port(), free_port()
    proxy = HAProxy(
        tmp_path,
        configure(
            SAMPLE.read_text(),
            binds={PLAIN_FRONTEND: f"127.0.0.1:{plain}", TLS_FRONTEND: f"127.0.0.1:{tls}"},
            nodes=[
                Node(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"),
                Node(f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[3]}"),
            ],
            global_section=HAProxy.test_global(),
            check_interval="200ms",
        ),
    )
    proxy.start()
    try:
        proxy.wait_up()
        for port in (plain, tls):
            with socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.5", 0)
            ) as s:
                assert s.recv(100) == b"+OK stand-in\r\n"
                s.sendall(b"QUIT\r\n")
                s.recv(100)
    finally:
        proxy.stop()
        for s in listeners:
            s.close()
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    assert all(r.startswith(signature) for r in received), received
    # Version 2 (high nibble); command LOCAL (0) for checks, PROXY (1) for clients.
    commands = [r[12] for r in received]
    assert 0x20 in commands
    clients = [r for r in received if r[12] == 0x21]
    assert len(clients) == 2, received
    for header in clients:
        family, length = header[13], struct.unpack("!H", header[14:16])[0]
        assert family == 0x11  # TCP over IPv4
        source, destination, _, _ = struct.unpack("!4s4sHH", header[16 : 16 + length])
        assert socket.inet_ntoa(source) == "127.0.0.5"
        assert socket.inet_ntoa(destination) == "127.0.0.1"


def test_health_checks_pass(cluster: Cluster) -> None:
    """The nodes greet HAProxy's LOCAL health checks, so every server is up."""
    states = cluster.haproxy.server_states()
    assert set(states.values()) == {"UP"}, states
    assert len(states) == 4


def test_one_redis_connection_per_node(cluster: Cluster) -> None:
    """
    Each node talks to Redis over one connection, whatever its number of
    server processes: its first process keeps the counts for all of them.
    """

    def clients() -> list[str]:
        listing = cluster.redis.command("CLIENT", "LIST")
        return [line for line in listing.splitlines() if " cmd=client" not in line]

    assert wait_for(lambda: len(clients()) == len(cluster.nodes), 10), clients()


def test_client_address_in_both_nodes_audit_lines(cluster: Cluster) -> None:
    """
    A client bound to 127.0.0.5 is logged as peer=127.0.0.5 by both nodes
    (HAProxy alternates them), never as HAProxy's address.
    """
    for _ in range(2):
        client = cluster.login("alice", "127.0.0.5")
        assert client.stat() == (1, len(MESSAGE.replace(b"\n", b"\r\n")))
        client.quit()
    assert wait_for(
        lambda: all(cluster.audited(event="login-ok", user='"alice"', peer="127.0.0.5"))
    ), cluster.audited(user='"alice"')
    assert cluster.audited(peer=HAPROXY_ADDRESS) == [[], []]


def test_failures_over_both_nodes_lock_out_on_both(cluster: Cluster) -> None:
    """
    The user's failures from one address, spread over both nodes, add up
    (in Redis) to the limit: then the right password is refused on both.
    """
    source = "127.0.0.6"
    for _ in range(USER_FAILURE_LIMIT):
        assert cluster.attempt("carol", "wrong", source).startswith("-ERR [AUTH]")
    failed = dict(event="login-failed", user='"carol"', peer=source)
    assert wait_for(lambda: sum(map(len, cluster.audited(**failed))) == USER_FAILURE_LIMIT)
    assert all(cluster.audited(**failed)), "the failures did not reach both nodes"
    for _ in range(2):
        assert cluster.attempt("carol", PASSWORDS["carol"], source).startswith("-ERR [AUTH]")
    refused = dict(event="login-refused", user='"carol"', peer=source)
    assert wait_for(lambda: all(cluster.audited(**refused))), "not refused by both nodes"
    reasons = {line["reason"] for lines in cluster.audited(**refused) for line in lines}
    assert all(reason.startswith("locked-out") for reason in reasons), reasons
    # The lockout is of the pair: from another address carol logs in.
    cluster.login("carol", "127.0.0.16").quit()


def test_in_use_across_nodes(cluster: Cluster) -> None:
    """A session open on one node makes a login to the same maildrop on the other [IN-USE]."""
    holder = cluster.login("bob", "127.0.0.7")
    try:
        assert wait_for(lambda: any(cluster.audited(event="login-ok", user='"bob"')))
        holding = [bool(lines) for lines in cluster.audited(event="login-ok", user='"bob"')]
        for _ in range(2):  # the other node, then the holder's
            client = cluster.connect("127.0.0.7")
            client.user("bob")
            with pytest.raises(poplib.error_proto, match=r"IN-USE"):
                client.pass_(PASSWORDS["bob"])
            client.quit()
        refused = dict(event="login-refused", user='"bob"', reason="in-use")
        assert wait_for(lambda: all(cluster.audited(**refused))), cluster.audited(user='"bob"')
        assert holding.count(True) == 1
    finally:
        holder.quit()
    cluster.login("bob", "127.0.0.7").quit()


def read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """Everything C{sock} receives until the peer closes; fails after C{timeout}."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"not closed within {timeout} s; got {data!r}")


def test_no_header_from_a_proxy_address_is_closed(cluster: Cluster) -> None:
    """
    A direct connection to a node from a trusted address (HAProxy's)
    without a PROXY header gets no greeting and is closed: silent, after
    the header timeout; with a POP3 command or a TLS hello instead of a
    header, at once.
    """
    node = cluster.nodes[0]
    started = time.monotonic()
    with socket.create_connection(
        ("127.0.0.1", node.port), source_address=(HAPROXY_ADDRESS, 0)
    ) as s:
        assert read_to_end(s, 10) == b""
    assert time.monotonic() - started < 5  # --proxy-header-timeout 1
    with socket.create_connection(
        ("127.0.0.1", node.port), source_address=(HAPROXY_ADDRESS, 0)
    ) as s:
        s.sendall(b"CAPA\r\n")
        assert b"+OK" not in read_to_end(s, 10)
    context = ssl.create_default_context(cafile=str(cluster.pki))
    with socket.create_connection(
        ("127.0.0.1", node.tls_port), timeout=10, source_address=(HAPROXY_ADDRESS, 0)
    ) as raw:
        with pytest.raises(OSError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_header_from_elsewhere_is_not_honoured(cluster: Cluster) -> None:
    """
    A client outside the proxy networks that sends a PROXY header is
    greeted, the header is a bad command, and it is logged by its own
    address, not the one it claimed.
    """
    node = cluster.nodes[0]
    with socket.create_connection(
        ("127.0.0.1", node.port), timeout=20, source_address=("127.0.0.9", 0)
    ) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"+OK")
        f.write(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 110\r\n")
        f.write(f"USER dave\r\nPASS {PASSWORDS['dave']}\r\n".encode())
        f.flush()
        assert f.readline().startswith(b"-ERR")
        assert f.readline().startswith(b"+OK")
        assert f.readline().startswith(b"+OK")
        f.write(b"QUIT\r\n")
        f.flush()
        f.readline()
    assert wait_for(lambda: node.audit(event="login-ok", user='"dave"'))
    assert [line["peer"] for line in node.audit(user='"dave"')] == ["127.0.0.9"]
    assert "198.51.100.7" not in node.log_text()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("version", [2, 1])
def test_proxy_versions(cluster: Cluster, haproxy_v1: Cluster, version: int, tls: bool) -> None:
    """
    Through HAProxy sending PROXY v1 (send-proxy) or v2 (send-proxy-v2),
    to plain POP3 or passed-through implicit TLS, both nodes see the
    client's address.
    """
    front = cluster if version == 2 else haproxy_v1
    source = f"127.0.{version}.{20 + tls}"
    for _ in range(2):
        client = front.login("erin", source, tls=tls)
        assert client.stat()[0] == 1
        client.quit()
    assert wait_for(lambda: all(front.audited(event="login-ok", user='"erin"', peer=source))), (
        front.audited(user='"erin"')
    )


def test_redis_outage(cluster: Cluster) -> None:
    """
    With Redis stopped, logins go on and each node logs the outage once;
    once it is back, failures on one node count on the other again.
    """
    cluster.redis.stop()
    try:
        for _ in range(4):
            cluster.login("frank", "127.0.0.10").quit()
        for _ in range(2):
            assert cluster.attempt("frank", "wrong", "127.0.0.10").startswith("-ERR [AUTH]")
        assert wait_for(lambda: all(REDIS_DOWN.search(n.log_text()) for n in cluster.nodes)), [
            n.log_text()[-2000:] for n in cluster.nodes
        ]
        assert [len(REDIS_DOWN.findall(n.log_text())) for n in cluster.nodes] == [1, 1]
    finally:
        cluster.redis.start()

    # Each node tries Redis again by itself, without a login to prompt it.
    assert wait_for(lambda: all(REDIS_BACK.search(n.log_text()) for n in cluster.nodes), 30)
    assert [len(REDIS_BACK.findall(n.log_text())) for n in cluster.nodes] == [1, 1]
    source = "127.0.0.11"
    for _ in range(USER_FAILURE_LIMIT):
        assert cluster.attempt("frank", "wrong", source).startswith("-ERR [AUTH]")
    assert wait_for(lambda: all(cluster.audited(event="login-failed", user='"frank"', peer=source)))
    for _ in range(2):
        assert cluster.attempt("frank", PASSWORDS["frank"], source).startswith("-ERR [AUTH]")
    assert wait_for(
        lambda: all(cluster.audited(event="login-refused", user='"frank"', peer=source))
    )
