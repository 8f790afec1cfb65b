"""
Tests for L{pop3srv.admin.uidl}, C{pop3srv uidl capture|import}: the
capture file, the header fingerprint, the matching, capture over POP3 from a
real C{twistd pop3srv} (plain, implicit TLS and STLS), and the command.

Capture from and import after a real Dovecot are in
C{tests/test_dovecot_migration.py}.
"""

from __future__ import annotations

import errno
import hashlib
import poplib
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import Authority
from hypothesis import given
from hypothesis import strategies as st
from livepop3 import PASSWORDS, Pop3Server, free_port, write_mbox

from pop3srv.admin import uidl
from pop3srv.admin.uidl import (
    Capture,
    CapturedMessage,
    CaptureError,
    Login,
    ServedMessage,
    capture_over_pop3,
    format_capture,
    header_fingerprint,
    match_capture,
    parse_capture,
)
from pop3srv.mbox import mailbox as mailbox_module
from pop3srv.mbox.mailbox import MboxMailbox, open_maildrop
from pop3srv.mbox.pins import looks_own

SCRIPT = str(Path(sys.executable).with_name("pop3srv"))

MESSAGES = [
    b"From: a@example.org\nSubject: one\nMessage-ID: <1@example.org>\n\nfirst\n",
    b"From: b@example.org\nSubject: two\n\nsecond\n>From the quoted line\n",
    b"From: c@example.org\nSubject: three\n\nthird\n.dot line\n",
]


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed C{pop3srv} script."""
    return subprocess.run(
        [SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        check=False,
    )


# --- the fingerprint --------------------------------------------------------------


def test_fingerprint_ignores_what_servers_differ_in() -> None:
    """
    Line ends, the body, the mbox servers' own headers (folded or not) and
    mboxrd quoting do not change the fingerprint; any other header octet
    does.
    """
    plain = b"From: a\nSubject: s\n  folded\n\nbody\n"
    same = [
        b"From: a\r\nSubject: s\r\n  folded\r\n\r\nother body\r\n",
        b"X-IMAPbase: 1 2\nFrom: a\nStatus: RO\nSubject: s\n  folded\nX-UID: 1\n\nbody\n",
        b"From: a\nX-Keywords: $a\n  $b\nSubject: s\n  folded\nContent-Length: 5\n\n",
        b"From: a\nSubject: s\n  folded\n",
    ]
    for other in same:
        assert header_fingerprint(other) == header_fingerprint(plain), other
    assert header_fingerprint(b">From x\nA: b\n") == header_fingerprint(b"From x\nA: b\n")
    different = [
        b"From: b\nSubject: s\n  folded\n\nbody\n",
        b"From: a\nSubject: s\n\nbody\n",
        b"From: a\nSubject: s\n  folded\nX-UIDL: 12\n\nbody\n",
        b"from: a\nSubject: s\n  folded\n\nbody\n",
    ]
    for other in different:
        assert header_fingerprint(other) != header_fingerprint(plain), other
    assert len(header_fingerprint(plain)) == 32


class _Chunks:
    """A reader that hands out C{data} in the given chunk sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = sizes

    def read(self, n: int = -1) -> bytes:
        size = min(n, self.sizes.pop(0) if self.sizes else n)
        out, self.data = self.data[:size], self.data[size:]
        return out


_PIECES = st.sampled_from(
    [b"From ", b">From ", b">>From ", b"From", b">", b"\n", b"\r\n", b"x", b": ", b"x" * 3000]
)


@given(st.lists(_PIECES, max_size=40).map(b"".join), st.lists(st.integers(1, 5000), max_size=30))
def test_read_served_counts_unquoted_lines(content: bytes, sizes: list[int]) -> None:
    """
    However the content comes in, every line beginning with C{>}s and
    C{From } is counted once, and the header is what comes first.
    """
    header, quoted = uidl._read_served(_Chunks(content, sizes))
    assert quoted == len(re.findall(rb"(?m)^>*From ", content))
    assert content.startswith(header)
    end = min(i for i in (content.find(b"\n\n"), content.find(b"\n\r\n"), len(content)) if i >= 0)
    assert len(header) >= min(end, uidl.MAX_HEADER)


# --- the capture file -------------------------------------------------------------

_UIDL = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70
)


@st.composite
def captures(draw: st.DrawFn) -> Capture:
    count = draw(st.integers(min_value=0, max_value=8))
    with_tops = draw(st.booleans())
    messages = tuple(
        CapturedMessage(
            n,
            draw(_UIDL).encode("ascii"),
            draw(st.integers(min_value=0, max_value=10**9)),
            hashlib.md5(b"%d" % n).hexdigest() if with_tops else None,
        )
        for n in range(1, count + 1)
    )
    user = draw(st.none() | st.sampled_from(["alice", "bob.smith", "x@example.org"]))
    return Capture(user, messages)


@given(captures())
def test_capture_file_round_trip(capture: Capture) -> None:
    """What format_capture writes, parse_capture reads back."""
    again = parse_capture(format_capture(capture))
    assert again.user == capture.user
    assert again.messages == capture.messages


def test_pasted_transcript() -> None:
    """The server's answers pasted as they came (+OK lines, CRLF) are a capture."""
    text = (
        "# from the old server\r\n"
        "uidl\r\n+OK\r\n1 000000016553f100\r\n2 000000026553f100\r\n.\r\n"
        "LIST\r\n+OK 2 messages (300 octets)\r\n1 100\r\n2 200\r\n.\r\n"
    )
    capture = parse_capture(text)
    assert capture.user is None
    assert [(m.number, m.uidl, m.size) for m in capture.messages] == [
        (1, b"000000016553f100", 100),
        (2, b"000000026553f100", 200),
    ]
    assert not capture.has_fingerprints


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("LIST\n1 5\n.\n", "capture: no UIDL section"),
        ("UIDL\n1 a\n.\n", "capture: no LIST section"),
        ("UIDL\n1 a\n.\nLIST\n1 5\n.\nUIDL\n", "capture:7: a second UIDL section"),
        ("UIDL\n1 a\n1 b\n.\n", "capture:3: message 1 appears twice"),
        ("UIDL\n2 a\n.\nLIST\n2 5\n.\n", "skips to message 2"),
        ("UIDL\n1 a\n.\nLIST\n1 5\n2 6\n.\n", "UIDL and LIST sections list different"),
        ("UIDL\n1 a\nLIST\n", "capture:3: the UIDL section has no '.' line"),
        ("UIDL\n1 " + "a" * 71 + "\n.\n", "capture:2: .* is not a valid UIDL"),
        ("UIDL\n1 a\n.\nLIST\n1 big\n.\n", "capture:5: size 'big' is not a number"),
        ("UIDL\n1 a\n.\nLIST\n1 5\n.\nTOP\n1 xyz\n.\n", "capture:8: 'xyz' is not a header"),
        ("HELLO\n", "capture:1: expected UIDL, LIST, TOP or USER"),
        ("UIDL\none a\n.\n", "capture:2: expected 'NUMBER VALUE'"),
    ],
)
def test_bad_capture_files(text: str, reason: str) -> None:
    """Each problem is one line naming the file and line."""
    with pytest.raises(ValueError, match=reason) as caught:
        parse_capture(text)
    assert "\n" not in str(caught.value)


# --- matching ---------------------------------------------------------------------


def _served(*sizes: int, uidl: bytes = b"own") -> list[ServedMessage]:
    return [
        ServedMessage(size, hashlib.md5(b"%d" % n).hexdigest(), uidl + b"%d" % n, f"subject: m{n}")
        for n, size in enumerate(sizes, 1)
    ]


def _capture(*sizes: int) -> Capture:
    return Capture(
        "alice",
        tuple(
            CapturedMessage(n, b"old%d" % n, size, hashlib.md5(b"%d" % n).hexdigest())
            for n, size in enumerate(sizes, 1)
        ),
    )


def test_match_pins_in_order() -> None:
    """Every message matching: 0-based pins; newer messages at the end are counted."""
    matching = match_capture(_capture(10, 20), _served(10, 20, 30))
    assert matching.problems == []
    assert matching.pins == {0: b"old1", 1: b"old2"}
    assert matching.newer == 1


def test_match_reports_every_difference() -> None:
    """Sizes, headers, a missing message and a duplicate UIDL, each by message number."""
    capture = _capture(10, 20, 30)
    served = _served(10, 21, 30)
    served[2] = ServedMessage(30, "0" * 32, b"x", "message-id: <m3@x>")
    matching = match_capture(capture, served)
    assert matching.pins == {}
    assert matching.problems == [
        "message 2 (subject: m2): size 20 in the capture, 21 here",
        "message 3 (message-id: <m3@x>): the headers differ",
    ]
    assert (
        match_capture(capture, served[:2])
        .problems[0]
        .startswith("the capture has 3 messages, the maildrop only 2")
    )
    twice = Capture("alice", (capture.messages[0], CapturedMessage(2, b"old1", 20, None)))
    assert (
        "UIDL old1 is also message 1's"
        in match_capture(twice, _served(10, 20), content_check=False).problems[0]
    )


def test_match_allows_for_quoting() -> None:
    """
    A size that counts the quoting C{>} of the From lines pop3srv un-quotes
    (as Dovecot's does) matches; any other size does not.
    """
    served = [ServedMessage(100, hashlib.md5(b"1").hexdigest(), b"own", "subject: q", quoted=2)]
    for size in (100, 102):
        assert match_capture(_capture(size), served).pins == {0: b"old1"}
    assert match_capture(_capture(101), served).problems == [
        "message 1 (subject: q): size 101 in the capture, 100 here (102 with its quoting)"
    ]


def test_match_without_content_check() -> None:
    """--no-content-check: order and size alone."""
    served = [ServedMessage(s.size, "f" * 32, s.uidl, s.label) for s in _served(10, 20)]
    assert match_capture(_capture(10, 20), served).problems
    assert match_capture(_capture(10, 20), served, content_check=False).pins == {
        0: b"old1",
        1: b"old2",
    }


# --- capture over POP3 from a real pop3srv ------------------------------------------


def _served_by_pop3(
    port: int,
) -> tuple[dict[int, bytes], dict[int, int], dict[int, str]]:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user("alice")
    client.pass_(PASSWORDS["alice"])
    uidls = {int(n): u for n, u in (line.split() for line in client.uidl()[1])}
    sizes = {int(n): int(s) for n, s in (line.split() for line in client.list()[1])}
    tops = {n: header_fingerprint(b"\n".join(client.top(n, 0)[1])) for n in uidls}
    client.quit()
    return uidls, sizes, tops


def test_capture_from_pop3srv(live_server: Callable[..., Pop3Server]) -> None:
    """
    A capture holds exactly what the server's UIDL, LIST and TOP say, and
    changes nothing on the server.
    """
    srv = live_server(mail={"alice": MESSAGES})
    before = (srv.mail / "alice").read_bytes()
    capture = capture_over_pop3("127.0.0.1", srv.port, Login("alice", PASSWORDS["alice"]))
    uidls, sizes, tops = _served_by_pop3(srv.port)
    assert capture.user == "alice"
    assert [m.number for m in capture.messages] == [1, 2, 3]
    assert {m.number: m.uidl for m in capture.messages} == uidls
    assert {m.number: m.size for m in capture.messages} == sizes
    assert {m.number: m.fingerprint for m in capture.messages} == tops
    assert (srv.mail / "alice").read_bytes() == before


def test_capture_refused_login(live_server: Callable[..., Pop3Server]) -> None:
    """A wrong password is one line that does not show the password."""
    srv = live_server(mail={"alice": MESSAGES})
    with pytest.raises(CaptureError) as caught:
        capture_over_pop3("127.0.0.1", srv.port, Login("alice", "not-the-password"))
    message = str(caught.value)
    assert message.startswith(
        f"127.0.0.1:{srv.port}: PASS (password hidden): the server said: -ERR"
    )
    assert "not-the-password" not in message and "\n" not in message


def test_capture_unreachable() -> None:
    """Nothing listening: one line naming the address."""
    port = free_port()
    with pytest.raises(CaptureError, match=f"cannot connect to 127.0.0.1:{port}"):
        capture_over_pop3("127.0.0.1", port, Login("alice", "x"), timeout=5)


def test_capture_over_tls(live_server: Callable[..., Pop3Server], tmp_path: Path) -> None:
    """
    Implicit TLS and STLS, verified against the test root; a server the
    context does not trust is refused.
    """
    root = Authority.create()
    pki = tmp_path / "pki"
    pki.mkdir()
    cert, key = root.issue(pki, "server", serial=7)
    ca = root.write_ca(pki / "root.pem")
    tls_port = free_port()
    srv = live_server(
        "--listen-tls", f"tcp:{tls_port}:interface=127.0.0.1",
        "--tls-cert", str(cert), "--tls-key", str(key),
        mail={"alice": MESSAGES},
    )  # fmt: skip
    trusted = ssl.create_default_context(cafile=str(ca))
    login = Login("alice", PASSWORDS["alice"])
    implicit = capture_over_pop3("127.0.0.1", tls_port, login, security="tls", context=trusted)
    upgraded = capture_over_pop3("127.0.0.1", srv.port, login, security="starttls", context=trusted)
    assert implicit.messages == upgraded.messages
    assert len(implicit.messages) == 3
    with pytest.raises(
        CaptureError, match=r"TLS with 127\.0\.0\.1.* failed: .*CERTIFICATE_VERIFY_FAILED"
    ):
        capture_over_pop3(
            "127.0.0.1", tls_port, login, security="tls", context=ssl.create_default_context()
        )


# --- import into a real mbox and its index --------------------------------------------


def _location(tmp_path: Path, messages: list[bytes]) -> uidl.Location:
    (tmp_path / "mail").mkdir(exist_ok=True)
    (tmp_path / "index").mkdir(exist_ok=True)
    write_mbox(tmp_path / "mail" / "alice", messages)
    return uidl._resolve("alice", None, f"{tmp_path}/mail/{{user}}", str(tmp_path / "index"))


def _capture_of(where: uidl.Location) -> Capture:
    """A capture of what the maildrop holds now, with UIDLs OLD-1, OLD-2, ..."""
    mailbox = where.open()
    try:
        served = uidl.served_messages(mailbox)
    finally:
        mailbox.close()
    return Capture(
        "alice",
        tuple(
            CapturedMessage(n, b"OLD-%d" % n, m.size, m.fingerprint)
            for n, m in enumerate(served, 1)
        ),
    )


def _uidls_served(where: uidl.Location) -> list[bytes]:
    """The UIDLs a POP3 session is given (a real open, which decides them)."""
    mailbox = open_maildrop(where.path, index_dir=where.index_dir, trusted_root=where.trusted_root)
    try:
        return [mailbox.getUidl(i) for i in range(len(mailbox.listMessages()))]
    finally:
        mailbox.close()


def test_import_pins(tmp_path: Path) -> None:
    """
    Every captured message matching: their UIDLs are served from then on,
    and a message that arrived after the capture keeps its own.
    """
    where = _location(tmp_path, MESSAGES[:2])
    capture = _capture_of(where)
    write_mbox(tmp_path / "mail" / "alice", [MESSAGES[2]])
    said: list[str] = []
    assert uidl.import_capture(capture, "alice", where, say=said.append) == 0
    assert said == ["alice: pinned 2 UIDLs, 1 newer keep their own"]
    served = _uidls_served(where)
    assert served[:2] == [b"OLD-1", b"OLD-2"]
    assert looks_own(served[2])


def test_import_refuses_a_mismatch(tmp_path: Path) -> None:
    """One changed message: reported by number, and nothing pinned."""
    where = _location(tmp_path, MESSAGES)
    capture = _capture_of(where)
    (tmp_path / "mail" / "alice").unlink()
    write_mbox(
        tmp_path / "mail" / "alice", [MESSAGES[0], MESSAGES[1].replace(b"two", b"TWO"), MESSAGES[2]]
    )
    said: list[str] = []
    complaints: list[str] = []
    status = uidl.import_capture(
        capture, "alice", where, say=said.append, complain=complaints.append
    )
    assert status == 1 and said == []
    assert complaints[0].startswith("pop3srv: alice: the capture does not match")
    assert "nothing was changed (1 problem)" in complaints[0]
    assert complaints[1:] == ["  message 2 (subject: TWO): the headers differ"]
    assert all(looks_own(u) for u in _uidls_served(where))


def test_import_dry_run(tmp_path: Path) -> None:
    """--dry-run checks and pins nothing, and decides no UIDL either."""
    where = _location(tmp_path, MESSAGES)
    capture = _capture_of(where)
    said: list[str] = []
    status = uidl.import_capture(capture, "alice", where, dry_run=True, say=said.append)
    assert status == 0
    assert said == ["alice: all 3 captured messages match; nothing pinned (--dry-run)"]
    assert uidl.import_capture(capture, "alice", where, say=said.append) == 0
    assert _uidls_served(where) == [b"OLD-1", b"OLD-2", b"OLD-3"]


def test_import_into_a_busy_maildrop(tmp_path: Path) -> None:
    """A session holding the maildrop: one line, nothing pinned."""
    where = _location(tmp_path, MESSAGES)
    capture = _capture_of(where)
    session = open_maildrop(where.path, index_dir=where.index_dir, trusted_root=where.trusted_root)
    try:
        with pytest.raises(uidl._Failed, match="a POP3 session has the maildrop open"):
            uidl.import_capture(capture, "alice", where)
    finally:
        session.close()


def test_import_notices_pins_not_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin that did not take is a failure, not a success."""
    where = _location(tmp_path, MESSAGES)
    monkeypatch.setattr(MboxMailbox, "pin_uidls", lambda self, uidls: None)
    with pytest.raises(uidl._Failed, match=r"messages 1, 2, 3 do not serve the captured UIDLs"):
        uidl.import_capture(_capture_of(where), "alice", where, say=lambda _: None)


# --- the command --------------------------------------------------------------------


def test_command_usage_errors(tmp_path: Path) -> None:
    """Usage errors: one line, exit 2."""
    for args, reason in [
        (["uidl"], "a command is required"),
        (["uidl", "capture", "--user", "alice"], "the following arguments are required: --host"),
        (
            ["uidl", "capture", "--host", "h", "--user", "a", "--cafile", "x"],
            "--cafile and --insecure go with",
        ),
        (["uidl", "import", "--capture", "-", "--user", "alice"], "give --config or --mailbox"),
    ]:
        result = run(*args, stdin="UIDL\n.\nLIST\n.\n")
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("pop3srv: ") and reason in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1


def test_command_capture_and_import_dry_run(
    live_server: Callable[..., Pop3Server], tmp_path: Path
) -> None:
    """
    The installed command: capture to a file (password from a file), then
    a dry-run import of that file against the same mbox; a capture of
    another user is refused.
    """
    srv = live_server(mail={"alice": MESSAGES})
    secret = tmp_path / "secret"
    secret.write_text(PASSWORDS["alice"] + "\n")
    out = tmp_path / "alice.capture"
    result = run(
        "uidl", "capture", "--host", "127.0.0.1", "--port", str(srv.port),
        "--user", "alice", "--password-file", secret, "--output", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"alice: 3 messages captured from 127.0.0.1:{srv.port}\n"
    assert parse_capture(out.read_text()).user == "alice"
    srv.stop()
    template = f"{srv.mail}/{{user}}"
    result = run(
        "uidl", "import", "--capture", out, "--user", "alice", "--mailbox", template, "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "alice: all 3 captured messages match; nothing pinned (--dry-run)\n"
    result = run("uidl", "import", "--capture", out, "--user", "bob", "--mailbox", template)
    assert result.returncode == 2
    assert "the capture is of user alice, not bob" in result.stderr


def _import_args(tmp_path: Path, capture: Capture) -> list[str]:
    (tmp_path / "capture").write_text(format_capture(capture))
    return [
        "import", "--capture", str(tmp_path / "capture"), "--user", "alice",
        "--mailbox", f"{tmp_path}/mail/{{user}}", "--index-dir", str(tmp_path / "index"),
    ]  # fmt: skip


def test_command_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    An error reading the mbox or writing the index is one line, exit 1,
    naming the files as the admin knows them (not as /proc/self/fd/N/...,
    the way the import reaches them).
    """
    where = _location(tmp_path, MESSAGES)
    args = _import_args(tmp_path, _capture_of(where))

    def unwritable(path: str, index: object) -> None:
        raise PermissionError(13, "Permission denied", "/proc/self/fd/9/.index.tmp")

    monkeypatch.setattr(mailbox_module, "write_index", unwritable)
    assert uidl.main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        f"pop3srv: alice: cannot pin the UIDLs: cannot write the index of {where.path}: "
        "Permission denied\n"
    )
    monkeypatch.undo()

    class Failing:
        def read(self, n: int = -1) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        def close(self) -> None:
            pass

    monkeypatch.setattr(MboxMailbox, "getMessage", lambda self, i: Failing())
    assert uidl.main(args) == 1
    err = capsys.readouterr().err
    assert err == f"pop3srv: alice: cannot read {where.path}: Input/output error\n"

    # Anything else the OS says: one line too.
    def failing(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(uidl, "import_capture", failing)
    assert uidl.main(args) == 1
    assert capsys.readouterr().err == "pop3srv: Input/output error\n"
