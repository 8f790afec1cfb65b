"""
Integration tests: the real C{twistd pop3srv} process on 127.0.0.1, real mbox
files on disk, and real clients (Python's poplib, curl, fetchmail, mpop).
"""

from __future__ import annotations

import mailbox
import os
import poplib
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from livepop3 import PASSWORDS, Pop3Server, write_mbox

MESSAGES = [
    b"From: a@example.org\nSubject: plain\n\nHello.\n",
    b"Subject: tricky\n\n.starts with a dot\n..two dots\n.\nFrom the start of a line\n"
    b">From quoted already\nlast line without newline",
    b"Subject: empty body\n\n",
    b"Subject: eight bit\n\n\xe9t\xe9 \xff\xfe\n",
    b"Subject: big\n\n" + b"".join(b"%07d " % i + b"x" * 70 + b"\n" for i in range(15000)),
]
# Python's mailbox writes mboxo, which cannot tell an original ">From " line from
# a quoted "From " line; pop3srv reads mboxrd, so that line comes back unquoted.
EXPECTED = [m.replace(b"\n>From quoted", b"\nFrom quoted") for m in MESSAGES]


def wire_form(message: bytes) -> list[bytes]:
    """The lines poplib returns for C{message}."""
    lines = message.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


@pytest.fixture
def server(live_server: Callable[..., Pop3Server]) -> Pop3Server:
    """A running server with alice's mbox holding MESSAGES and bob's empty."""
    return live_server(mail={"alice": MESSAGES})


def connect(srv: Pop3Server, user: str = "alice") -> poplib.POP3:
    """A logged-in poplib session."""
    client = poplib.POP3("127.0.0.1", srv.port, timeout=30)
    client.user(user)
    client.pass_(PASSWORDS[user])
    return client


def uidls(client: poplib.POP3) -> list[bytes]:
    """The UIDL listing, as a list of unique ids in message order."""
    return [line.split()[1] for line in client.uidl()[1]]


def test_download_everything_with_poplib(server: Pop3Server) -> None:
    """STAT, LIST and RETR agree, and every message comes back as delivered."""
    client = connect(server)
    count, octets = client.stat()
    assert count == len(MESSAGES)
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sum(sizes) == octets
    for number, expected in enumerate(EXPECTED, start=1):
        _, lines, size = client.retr(number)
        assert lines == wire_form(expected)
        assert size == sizes[number - 1]
    _, top_lines, _ = client.top(2, 1)
    assert top_lines == [b"Subject: tricky", b"", b".starts with a dot"]
    ids = uidls(client)
    assert len(set(ids)) == len(ids)
    assert all(1 <= len(uid) <= 70 and all(0x21 <= b <= 0x7E for b in uid) for uid in ids)
    assert not any(uid.startswith(b"b'") for uid in ids)
    assert client.capa().keys() >= {"TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES"}
    assert "APOP" not in client.getwelcome().decode() and b"<" not in client.getwelcome()
    client.quit()


def test_delete_and_reconnect(server: Pop3Server) -> None:
    """Deleted messages are gone after QUIT, others keep their UIDLs; the inode stays."""
    path = server.mail / "alice"
    before = os.stat(path)
    client = connect(server)
    ids = uidls(client)
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")
    after = os.stat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    client = connect(server)
    assert uidls(client) == [ids[1], ids[3], ids[4]]
    assert client.retr(1)[1] == wire_form(EXPECTED[1])
    client.quit()
    assert [m.get_payload(decode=False) is not None for m in mailbox.mbox(str(path))] == [True] * 3


def test_rset_and_dropped_connection_commit_nothing(server: Pop3Server) -> None:
    """RSET undeletes; a connection dropped after DELE deletes nothing."""
    client = connect(server)
    client.dele(1)
    client.rset()
    client.dele(2)
    client.close()  # no QUIT
    time.sleep(0.2)
    client = connect(server)
    assert client.stat()[0] == len(MESSAGES)
    client.quit()


def test_uidl_stable_across_restart_and_unique_for_identical_deliveries(
    server: Pop3Server,
) -> None:
    """UIDLs survive a restart; two identical deliveries get different UIDLs."""
    path = server.mail / "alice"
    client = connect(server)
    first = uidls(client)
    client.quit()
    with open(path, "ab") as f:
        twin = b"From twin@example.org Thu Nov 26 07:00:00 2026\nSubject: twin\n\nsame\n\n"
        f.write(twin + twin)
    server.restart()
    client = connect(server)
    second = uidls(client)
    assert second[: len(first)] == first
    assert len(set(second)) == len(second) == len(first) + 2
    client.dele(len(first) + 1)  # the first twin
    client.quit()
    server.restart()
    client = connect(server)
    assert uidls(client) == second[: len(first)] + second[len(first) + 1 :]
    client.quit()


def test_second_session_gets_in_use(server: Pop3Server) -> None:
    """A second login to a maildrop in use gets -ERR [IN-USE]; the first goes on."""
    first = connect(server)
    second = poplib.POP3("127.0.0.1", server.port, timeout=30)
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORDS["alice"])
    assert first.noop().startswith(b"+OK")
    first.quit()
    second.user("alice")
    second.pass_(PASSWORDS["alice"])
    second.quit()


def test_wrong_password_unknown_user_and_bad_names(server: Pop3Server) -> None:
    """Failures share one [AUTH] text; path-like names never touch the disk."""
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    replies = []
    wrong = "Wr0ng-pw-7"
    for user, password in [("alice", wrong), ("nobody", wrong), ("../alice", "x")]:
        client.user(user)
        with pytest.raises(poplib.error_proto) as caught:
            client.pass_(password)
        replies.append(caught.value.args[0])
    assert replies[0] == replies[1] == b"-ERR [AUTH] Invalid username or password."
    assert replies[2].startswith(b"-ERR [AUTH]")
    # The session goes on; NOOP is a TRANSACTION command (RFC 1939), so refused.
    with pytest.raises(poplib.error_proto, match=r"not valid in this state"):
        client.noop()
    client.quit()
    assert "alice-pw" not in server.log_text() and wrong not in server.log_text()


def test_missing_mbox_is_an_empty_maildrop(server: Pop3Server) -> None:
    """bob has no mbox file yet: he logs in to an empty maildrop."""
    client = connect(server, "bob")
    assert client.stat() == (0, 0)
    client.quit()


def append_like_an_mda(path: Path, message: bytes) -> None:
    """Deliver C{message} with the locks Postfix local(8) takes (fcntl and dotlock)."""
    box = mailbox.mbox(str(path))
    box.lock()
    try:
        box.add(message)
        box.flush()
    finally:
        box.unlock()
        box.close()


def test_mail_delivered_during_session_survives_commit(server: Pop3Server) -> None:
    """An MTA delivery while a session deletes mail is kept by the commit."""
    path = server.mail / "alice"
    client = connect(server)
    client.dele(1)
    append_like_an_mda(path, b"Subject: arrived during session\n\nnew\n")
    client.quit()
    client = connect(server)
    assert client.stat()[0] == len(MESSAGES)
    assert client.retr(len(MESSAGES))[1][0] == b"Subject: arrived during session"
    client.quit()


def test_pipelined_commands_in_one_segment(server: Pop3Server) -> None:
    """A client that pipelines a whole session gets every answer in order."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"CAPA\r\nUSER alice\r\nPASS alice-pw\r\nSTAT\r\nLIST 1\r\nNOOP\r\nQUIT\r\n")
        data = b""
        while not data.endswith(b"messages deleted.\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    statuses = [line for line in data.split(b"\r\n") if line[:3] in (b"+OK", b"-ER")]
    assert [line.split(b" ")[0] for line in statuses] == [b"+OK"] * 8
    assert statuses[4].startswith(b"+OK 5 ")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_retrieves(server: Pop3Server) -> None:
    """curl's pop3:// client lists the maildrop and fetches a message."""
    base = f"pop3://127.0.0.1:{server.port}"
    auth = ["--user", f"alice:{PASSWORDS['alice']}"]
    listing = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *auth, f"{base}/"], capture_output=True, check=True
    )
    assert len(listing.stdout.splitlines()) == len(MESSAGES)
    message = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *auth, f"{base}/2"], capture_output=True, check=True
    )
    assert message.stdout.replace(b"\r\n", b"\n").rstrip(b"\n") == EXPECTED[1]


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail_downloads_and_deletes(server: Pop3Server, tmp_path: Path) -> None:
    """fetchmail fetches every message through an MDA and deletes them on the server."""
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll 127.0.0.1 service {server.port} protocol pop3 auth password\n"
        f'  user alice password "{PASSWORDS["alice"]}" is alice here\n'
        f"  sslproto '' mda \"sh -c 'cat > {out}/$$$$.msg'\"\n"
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--nosyslog", "-v"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(out.iterdir())) == len(MESSAGES)
    client = connect(server)
    assert client.stat()[0] == 0
    client.quit()


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")
def test_mpop_downloads_keeping_messages(server: Pop3Server, tmp_path: Path) -> None:
    """mpop delivers every message to an mbox, keeping them on the server (UIDL)."""
    target = tmp_path / "mpop.mbox"
    target.touch()
    config = tmp_path / "mpoprc"
    config.write_text(
        "account default\n"
        f"host 127.0.0.1\nport {server.port}\nuser alice\n"
        f"password {PASSWORDS['alice']}\n"
        "tls off\nauth user\nkeep on\n"
        f"delivery mbox {target}\n"
        f"uidls_file {tmp_path}/uidls\n"
    )
    config.chmod(0o600)
    result = subprocess.run(["mpop", "-C", str(config), "-q"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(mailbox.mbox(str(target))) == len(MESSAGES)
    again = subprocess.run(["mpop", "-C", str(config)], capture_output=True, timeout=60)
    assert again.returncode == 0
    assert len(mailbox.mbox(str(target))) == len(MESSAGES)  # UIDLs: nothing new


def test_sigkill_during_commit_leaves_old_or_new_mailbox(tmp_path: Path) -> None:
    """
    Killing the server at random moments of a large commit leaves the mbox
    holding either all the messages or all but the deleted one, never a mix.
    """
    srv = Pop3Server(tmp_path)
    path = srv.mail / "alice"
    messages = [b"Subject: filler %02d\n\n" % i + (b"y" * 70 + b"\n") * 3000 for i in range(20)]
    rng = random.Random(4)
    outcomes = []
    try:
        for _ in range(6):
            path.unlink(missing_ok=True)
            write_mbox(path, messages)
            srv.start()
            client = connect(srv)
            old = uidls(client)
            client.dele(1)
            client.sock.sendall(b"QUIT\r\n")
            time.sleep(rng.uniform(0, 0.08))
            srv.kill()
            client.close()
            srv.start()
            client = connect(srv)
            after = uidls(client)
            sizes = [int(line.split()[1]) for line in client.list()[1]]
            last = client.retr(len(after))[1]
            client.quit()
            srv.stop()
            assert after in (old, old[1:])
            assert len(set(sizes)) == 1 and last[0] == b"Subject: filler 19"
            outcomes.append(after == old[1:])
    finally:
        srv.stop()
    print("new-state outcomes:", outcomes)
    assert len(outcomes) == 6


def test_twisted_memory_checker_logs_in(tmp_path: Path) -> None:
    """--auth memory:user:pw (Twisted's own checker plugin) really logs users in."""
    srv = Pop3Server(tmp_path)
    write_mbox(srv.mail / "carol", [b"Subject: m\n\nx\n"])
    argv = srv.argv()
    argv[argv.index(f"passlib:{srv.users}")] = "memory:carol:c-pw:dave:d-pw"
    srv.argv = lambda: argv  # type: ignore[method-assign]
    srv.start()
    try:
        client = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        client.user("carol")
        client.pass_("c-pw")
        assert client.stat()[0] == 1
        client.quit()
        assert b"<" in poplib.POP3("127.0.0.1", srv.port, timeout=30).getwelcome()
    finally:
        srv.stop()


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_cannot_grow_server_memory(server: Pop3Server) -> None:
    """Pipelining CAPA for seconds without reading replies leaves the server's memory flat."""
    import socket

    assert server.process is not None
    before = rss_kib(server.process.pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.setblocking(False)
        burst = b"CAPA\r\n" * 10_000
        sent, deadline = 0, time.monotonic() + 6
        while time.monotonic() < deadline and sent < 200_000_000:
            try:
                sent += s.send(burst)
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss_kib(server.process.pid) - before
    assert sent > 1_000_000  # the server did read a lot before pushing back
    assert grown < 40_000, f"server grew by {grown} KiB"


def test_hash_workers_zero_verifies_in_process(tmp_path: Path) -> None:
    """--hash-workers 0 (small machines): logins work and no helper process is started."""
    srv = Pop3Server(tmp_path, "--hash-workers", "0")
    write_mbox(srv.mail / "alice", [b"Subject: m\n\nx\n"])
    srv.start()
    try:
        client = connect(srv)
        assert client.stat()[0] == 1
        client.quit()
        assert srv.process is not None
        children = Path(f"/proc/{srv.process.pid}/task/{srv.process.pid}/children").read_text()
        assert children.split() == []
    finally:
        srv.stop()
