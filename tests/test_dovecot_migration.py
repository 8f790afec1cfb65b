"""
Moving from Dovecot to pop3srv without a re-download, against a real
Dovecot (Debian's C{dovecot-pop3d}, a private instance: L{dovecot}).

Dovecot serves an mbox and rewrites it (a session that retrieves every
message makes it write C{X-IMAPbase}, C{X-UID} and C{Status}); then:

  - Dovecot's C{pop3_uidl_format} variables and modifiers, and its header
    MD5, come out of L{pop3srv.mbox.uidlformat} exactly as Dovecot renders
    them, for the metadata in the rewritten file;
  - C{twistd pop3srv --uidl-format %08Xu%08Xv} serves the same file with
    the same UIDLs, message text and sizes (mboxrd un-quoting aside), also
    for a UW-IMAP mbox with its folder-internal-data pseudo-message, and
    with C{X-UIDL} headers as Dovecot's C{pop3_reuse_xuidl} uses them (or,
    by default, does not);
  - the UIDLs pop3srv served stay when Dovecot, still serving the same
    spool, rewrites its headers;
  - mpop, keeping its mail on the server, downloads nothing again after
    the switch, only what is new;
  - C{pop3srv uidl capture} from the running Dovecot and C{pop3srv uidl
    import} make pop3srv serve Dovecot's UIDLs, whatever its own format;
    a capture that does not match the file changes nothing.
"""

from __future__ import annotations

import mailbox
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dovecot import DovecotServer, Listing, listing, mail_owner, pop3_session, retrieve
from livepop3 import PASSWORDS, Pop3Server
from neighbours import require_binary

from pop3srv.mbox.uidlformat import UidlFormat, header_md5

SCRIPT = str(Path(sys.executable).with_name("pop3srv"))
DEBIAN_FORMAT = "%08Xu%08Xv"


def entry(header: bytes, body: bytes, sender: bytes = b"MAILER-DAEMON") -> bytes:
    """One mbox entry as an MDA writes it (mboxrd-quoted body, blank line after)."""
    quoted = re.sub(rb"(?m)^(>*From )", rb">\1", body)
    return b"From " + sender + b" Thu Jan  4 10:00:00 2024\n" + header + b"\n" + quoted + b"\n"


#: The site's mail before Dovecot touched it: folded Received lines, Date
#: and Message-ID, a body with a From line (stored quoted) and a dot, an
#: MDA's Status and Content-Length, two identical deliveries, no body.
SITE_MAIL = [
    entry(
        b"Received: from mx.example.org by mail.example.org\n\twith ESMTP id 1; Thu, 4 Jan 2024\n"
        b"Date: Thu, 4 Jan 2024 09:59:00 +0000\nMessage-ID: <one@example.org>\n"
        b"From: Ann <ann@example.org>\nSubject: first\n",
        b"Hello.\n",
    ),
    entry(
        b"Received: from mx.example.org\nDelivered-To: alice@example.org\n"
        b"Message-ID: <two@example.org>\nSubject: quoting\n",
        b"From the start of a line\n>From already quoted\n.\n..two dots\nend\n",
    ),
    entry(
        b"Subject: by an old MDA\nStatus: O\nContent-Length: 13\n",
        b"thirteen oct\n",
    ),
    entry(b"Subject: twice\nMessage-ID: <same@example.org>\n", b"identical\n"),
    entry(b"Subject: twice\nMessage-ID: <same@example.org>\n", b"identical\n"),
    entry(b"Subject: no body\n", b""),
]


@dataclass(frozen=True)
class Served:
    """What one POP3 server said: UIDL and LIST, and each message's RETR and TOP n 0."""

    listing: Listing
    texts: dict[int, bytes]
    tops: dict[int, bytes]


def served(port: int, user: str = "alice") -> Served:
    """Read everything (nothing deleted); QUIT."""
    with pop3_session(port, user, PASSWORDS[user]) as client:
        found = listing(client)
        texts = {n: retrieve(client, n) for n in found.uidls}
        tops = {n: b"".join(line + b"\r\n" for line in client.top(n, 0)[1]) for n in found.uidls}
    return Served(found, texts, tops)


def unquoted(text: bytes) -> bytes:
    """A message as Dovecot sends it, mboxrd-un-quoted as pop3srv sends it."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", text)


@dataclass(frozen=True)
class Metadata:
    """What Dovecot (or UW) wrote into an mbox."""

    uidvalidity: int
    uids: list[int]
    headers: list[bytes]
    pseudo: bool


def read_metadata(path: Path) -> Metadata:
    """
    The UIDVALIDITY, each message's X-UID and header, from the file: the
    check that the old server did write its headers.
    """
    data = path.read_bytes()
    starts = [0] + [m.start() + 1 for m in re.finditer(rb"\nFrom ", data)]
    entries = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]
    headers = [e.split(b"\n", 1)[1].split(b"\n\n", 1)[0] + b"\n" for e in entries]
    base = re.search(rb"(?m)^X-IMAP(?:base)?:\s*(\d+)", headers[0])
    assert base is not None, "no X-IMAPbase or X-IMAP header in the first message"
    pseudo = re.search(rb"(?m)^X-IMAP:", headers[0]) is not None
    if pseudo:
        headers = headers[1:]
    uids = []
    for header in headers:
        uid = re.search(rb"(?m)^X-UID:\s*(\d+)", header)
        assert uid is not None, f"no X-UID in {header[:80]!r}"
        uids.append(int(uid.group(1)))
    return Metadata(int(base.group(1)), uids, headers, pseudo)


#: The pop3srv servers each Dovecot's test started, stopped with it.
_STARTED: dict[int, list[Pop3Server]] = {}


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    """
    A private Dovecot for alice and bob (stopped and removed after the
    test), and every pop3srv started on its spool stopped too.
    """
    server = DovecotServer(PASSWORDS, master_users={"migrator": "master-secret"})
    try:
        yield server
    finally:
        for pop3 in _STARTED.pop(id(server), []):
            pop3.stop()
        server.cleanup()


@pytest.fixture
def rewritten(dovecot: DovecotServer) -> Metadata:
    """
    alice's site mail, served by Dovecot in a session that retrieved every
    message: Dovecot has written its headers into the file.
    """
    path = dovecot.put_mbox("alice", b"".join(SITE_MAIL))
    dovecot.start()
    before = served(dovecot.port)
    assert len(before.listing.uidls) == len(SITE_MAIL)
    metadata = read_metadata(path)
    assert metadata.uids == list(range(1, len(SITE_MAIL) + 1))
    assert b"Status: RO" in path.read_bytes()
    return metadata


def pop3srv(dovecot: DovecotServer, tmp_path: Path, *extra: str) -> Pop3Server:
    """
    C{twistd pop3srv} serving Dovecot's spool (the same mbox files), with
    its index in the test's directory; the L{dovecot} fixture stops it.
    """
    index = tmp_path / "pop3srv-index"
    index.mkdir(exist_ok=True)
    server = Pop3Server(dovecot.root, "--index-dir", str(index), *extra)
    assert server.mail == dovecot.spool
    _STARTED.setdefault(id(dovecot), []).append(server)
    return server


# --- Dovecot's format language, as Dovecot renders it --------------------------------

FORMATS = [
    DEBIAN_FORMAT,
    "%08Xv%08Xu",
    "%v.%u",
    "%v-%u",
    "%u",
    "%m",
    "%g",
    "%Mu",
    "%UXv-%XUu",
    "%3.2v%u",
    "%-4v:%u",
    "%.-3v%u",
    "%Rv%05u",
    "%02u:%v",
    "%u%",
    "x%%%u",
    "%50Hv.%50Nu.%u",
    "%.8m%Xm%u",
]


def test_formats_render_as_dovecot_does(dovecot: DovecotServer, rewritten: Metadata) -> None:
    """
    For each format, Dovecot's UIDLs equal what L{UidlFormat} renders from
    the file's X-UID and X-IMAPbase and L{header_md5} of each header
    (Dovecot's C{%g} of an mbox message is the same header MD5), with
    Dovecot's default C{mbox_md5 = apop3d} and with C{all}.  Each format is
    a user of its own with a copy of the rewritten mbox.
    """
    mbox = dovecot.mbox("alice").read_bytes()
    cases = [(fmt, "apop3d") for fmt in FORMATS] + [("%m", "all"), ("%g-%u", "all")]
    for k, (fmt, backend) in enumerate(cases):
        dovecot.add_user(f"format{k}", "pw", pop3_uidl_format=fmt, mbox_md5=backend)
        dovecot.put_mbox(f"format{k}", mbox)
    dovecot.restart()
    for k, (fmt, backend) in enumerate(cases):
        with pop3_session(dovecot.port, f"format{k}", "pw") as client:
            got = listing(client).uidls
        parsed = UidlFormat.parse(fmt)
        expected = {}
        for n, (uid, header) in enumerate(zip(rewritten.uids, rewritten.headers, strict=True), 1):
            md5 = header_md5(header, backend=backend)
            expected[n] = parsed.render({"u": uid, "v": rewritten.uidvalidity, "m": md5, "g": md5})
        assert got == expected, (fmt, backend)


# --- pop3srv serves what Dovecot served --------------------------------------------


def test_pop3srv_serves_what_dovecot_served(
    dovecot: DovecotServer, rewritten: Metadata, tmp_path: Path
) -> None:
    """
    The same UIDLs with C{--uidl-format %08Xu%08Xv}, the same text for RETR
    and TOP, and sizes that count exactly what is sent; pop3srv differs
    only where it un-quotes C{>From } lines.  Serving changes nothing in
    the file.
    """
    old = served(dovecot.port)
    dovecot.stop()
    path = dovecot.mbox("alice")
    before = path.read_bytes()
    new = served(pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start().port)
    assert new.listing.uidls == old.listing.uidls
    assert new.texts == {n: unquoted(t) for n, t in old.texts.items()}
    assert new.listing.sizes == {n: len(t) for n, t in new.texts.items()}
    assert new.tops == old.tops
    # Dovecot counts the quoting ">" it sends; pop3srv does not send it.
    assert old.listing.sizes[2] - new.listing.sizes[2] == 2
    assert path.read_bytes() == before


def test_uw_imap_mbox(dovecot: DovecotServer, tmp_path: Path) -> None:
    """
    An mbox UW-IMAP wrote (its folder-internal-data pseudo-message, X-IMAP,
    X-UID, Status, X-Status, X-Keywords): pop3srv, like Dovecot, never
    serves the pseudo-message and hides the headers, and with UW ipop3d's
    format C{%08Xv%08Xu} gives Dovecot's UIDLs.
    """
    pseudo = (
        b"From MAILER-DAEMON Thu Jan  4 10:00:00 2024\n"
        b"Date: 04 Jan 2024 10:00:00 +0000\n"
        b"From: Mail System Internal Data <MAILER-DAEMON@mail.example.org>\n"
        b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
        b"Message-ID: <1704362400@mail.example.org>\n"
        b"X-IMAP: 1704362400 0000000012 $Forwarded\n"
        b"Status: RO\n\n"
        b"This text is part of the internal format of your mail folder, and is not\n"
        b"a real message.  It is created automatically by the mail system software.\n"
        b"If deleted, important folder data will be lost, and it will be re-created\n"
        b"with the data reset to initial values.\n\n"
    )
    mail = [
        entry(
            b"Subject: uw one\nStatus: RO\nX-Status: A\nX-Keywords: $Forwarded\nX-UID: 7\n",
            b"one\n",
        ),
        entry(b"Subject: uw two\nStatus: O\nX-Status: \nX-Keywords:\nX-UID: 11\n", b"two\n"),
    ]
    path = dovecot.put_mbox("alice", pseudo + b"".join(mail))
    dovecot.uidl_format = "%08Xv%08Xu"
    dovecot.start()
    old = served(dovecot.port)
    dovecot.stop()
    assert old.listing.uidls == {1: b"659681a000000007", 2: b"659681a00000000b"}
    assert read_metadata(path).pseudo
    new = served(pop3srv(dovecot, tmp_path, "--uidl-format", "%08Xv%08Xu").start().port)
    assert new.listing == old.listing
    assert (
        new.texts
        == old.texts
        == {1: b"Subject: uw one\r\n\r\none\r\n", 2: b"Subject: uw two\r\n\r\ntwo\r\n"}
    )


X_UIDL_MAIL = [
    entry(b"Subject: from qpopper\nX-UIDL: 3a1e2f0c55d1b2a3\n", b"a\n"),
    entry(b"Subject: newer\n", b"b\n"),
    entry(b"Subject: spaced\nX-UIDL:  <qp.4711@host>\n", b"c\n"),
]


def test_x_uidl_reused(dovecot: DovecotServer, tmp_path: Path) -> None:
    """
    With Dovecot's C{pop3_reuse_xuidl = yes}, C{X-UIDL} headers (qpopper's)
    are the UIDLs where present, the format elsewhere: so with pop3srv's
    C{--reuse-xuidl yes}.
    """
    dovecot.put_mbox("alice", b"".join(X_UIDL_MAIL))
    dovecot.settings = "pop3_reuse_xuidl = yes\n"
    dovecot.start()
    old = served(dovecot.port)
    dovecot.stop()
    assert old.listing.uidls[1] == b"3a1e2f0c55d1b2a3"
    new = served(
        pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT, "--reuse-xuidl", "yes")
        .start()
        .port
    )
    assert new.listing.uidls == old.listing.uidls


def test_x_uidl_ignored_as_dovecot_does_by_default(dovecot: DovecotServer, tmp_path: Path) -> None:
    """
    Dovecot as shipped (C{pop3_reuse_xuidl = no}) serves its format's UIDL
    for a message with an C{X-UIDL} header, and so does pop3srv with
    C{--uidl-format} and nothing else said.
    """
    dovecot.put_mbox("alice", b"".join(X_UIDL_MAIL))
    dovecot.start()
    old = served(dovecot.port)
    dovecot.stop()
    assert b"3a1e2f0c55d1b2a3" not in old.listing.uidls.values()
    new = served(pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start().port)
    assert new.listing.uidls == old.listing.uidls


def test_dovecot_rewriting_the_spool_changes_no_uidl(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """
    pop3srv serves a spool Dovecot wrote to (and a message delivered since,
    by C{pop3srv deliver}, without Dovecot's headers); then Dovecot, still
    serving the spool, rewrites the file (X-IMAPbase's next UID, the new
    message's X-UID, Status): pop3srv serves the very same UIDLs.
    """
    path = dovecot.put_mbox("alice", b"".join(SITE_MAIL))
    dovecot.start()
    served(dovecot.port)
    dovecot.stop()
    deliver = subprocess.run(
        [SCRIPT, "deliver", "--mailbox", f"{dovecot.spool}/{{user}}", "alice"],
        input=b"Subject: new\nMessage-ID: <new@example.org>\n\nnew mail\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert deliver.returncode == 0, deliver.stderr
    uid, gid = mail_owner()
    os.chown(path, uid, gid)
    srv = pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start()
    first = served(srv.port).listing.uidls
    srv.stop()
    before = path.read_bytes()
    dovecot.start()
    served(dovecot.port)
    dovecot.stop()
    assert path.read_bytes() != before
    assert read_metadata(path).uids == list(range(1, len(SITE_MAIL) + 2))
    srv = pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start()
    assert served(srv.port).listing.uidls == first


# --- a client that keeps its mail ---------------------------------------------------


def _mpop(tmp_path: Path, port: int) -> subprocess.CompletedProcess[str]:
    """One mpop run for alice with keep and only_new, into tmp_path/fetched."""
    config = tmp_path / "mpoprc"
    config.write_text(
        f"""defaults
tls off
auth user
keep on
only_new on
uidls_file {tmp_path}/uidls
delivery mbox {tmp_path}/fetched

account old
host 127.0.0.1
port {port}
user alice
password {PASSWORDS["alice"]}
"""
    )
    os.chmod(config, 0o600)
    (tmp_path / "fetched").touch()
    return subprocess.run(
        [require_binary("mpop"), "-C", str(config), "old"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _fetched(tmp_path: Path) -> list[bytes]:
    box = mailbox.mbox(str(tmp_path / "fetched"))
    try:
        return [bytes(m) for m in box]
    finally:
        box.close()


def test_kept_mail_is_not_downloaded_again(dovecot: DovecotServer, tmp_path: Path) -> None:
    """
    mpop keeping mail on the server fetches everything from Dovecot, then
    after the switch to pop3srv (C{--uidl-format %08Xu%08Xv}) only the one
    message that arrived since.
    """
    dovecot.put_mbox("alice", b"".join(SITE_MAIL))
    dovecot.start()
    first = _mpop(tmp_path, dovecot.port)
    assert first.returncode == 0, first.stderr
    assert len(_fetched(tmp_path)) == len(SITE_MAIL)
    dovecot.stop()
    with open(dovecot.mbox("alice"), "ab") as spool:
        spool.write(entry(b"Subject: arrived after the switch\n", b"new\n"))
    srv = pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start()
    second = _mpop(tmp_path, srv.port)
    assert second.returncode == 0, second.stderr
    fetched = _fetched(tmp_path)
    assert len(fetched) == len(SITE_MAIL) + 1, [m.split(b"\n", 1)[0] for m in fetched]
    assert b"Subject: arrived after the switch" in fetched[-1]


# --- capture and import -------------------------------------------------------------


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _capture(dovecot: DovecotServer, tmp_path: Path, *login: str) -> Path:
    out = tmp_path / f"alice{len(login)}.capture"
    result = _run(
        "uidl", "capture", "--host", "127.0.0.1", "--port", str(dovecot.port),
        "--user", "alice", *login, "--output", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_import_capture_from_dovecot(
    dovecot: DovecotServer, rewritten: Metadata, tmp_path: Path
) -> None:
    """
    Capture from the running Dovecot (with alice's password, and as a master
    user: the same capture), import, serve: pop3srv with its own UIDL format
    serves Dovecot's UIDLs, and keeps serving them when the format setting
    changes later.
    """
    dovecot.restart(uidl_format="%v.%u")
    old = served(dovecot.port)
    password = tmp_path / "password"
    password.write_text(PASSWORDS["alice"] + "\n")
    master = tmp_path / "master"
    master.write_text("master-secret\n")
    capture = _capture(dovecot, tmp_path, "--password-file", str(password))
    as_master = _capture(
        dovecot, tmp_path, "--master-user", "migrator", "--password-file", str(master)
    )
    assert capture.read_text().split("\n", 1)[1] == as_master.read_text().split("\n", 1)[1]
    dovecot.stop()
    index = tmp_path / "pop3srv-index"
    index.mkdir()
    result = _run(
        "uidl", "import", "--capture", capture, "--user", "alice",
        "--mailbox", f"{dovecot.spool}/{{user}}", "--index-dir", index,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"alice: pinned {len(SITE_MAIL)} UIDLs")
    srv = pop3srv(dovecot, tmp_path).start()
    assert served(srv.port).listing.uidls == old.listing.uidls
    srv.stop()
    srv = pop3srv(dovecot, tmp_path, "--uidl-format", DEBIAN_FORMAT).start()
    assert served(srv.port).listing.uidls == old.listing.uidls


def test_import_refuses_a_changed_mbox(
    dovecot: DovecotServer, rewritten: Metadata, tmp_path: Path
) -> None:
    """
    A capture that does not match the file (a header edited after it was
    taken, same size) is refused, naming the message; pop3srv then serves
    its own UIDLs, none of Dovecot's.
    """
    old = served(dovecot.port)
    password = tmp_path / "password"
    password.write_text(PASSWORDS["alice"] + "\n")
    capture = _capture(dovecot, tmp_path, "--password-file", str(password))
    dovecot.stop()
    path = dovecot.mbox("alice")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"Subject: quoting", b"Subject: QUOTING"))
    uid, gid = mail_owner()
    os.chown(path, uid, gid)
    index = tmp_path / "pop3srv-index"
    index.mkdir()
    result = _run(
        "uidl", "import", "--capture", capture, "--user", "alice",
        "--mailbox", f"{dovecot.spool}/{{user}}", "--index-dir", index,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("pop3srv: alice: the capture does not match")
    assert "nothing was changed (1 problem)" in lines[0]
    assert lines[1:] == ["  message 2 (message-id: <two@example.org>): the headers differ"]
    srv = pop3srv(dovecot, tmp_path).start()
    assert not set(served(srv.port).listing.uidls.values()) & set(old.listing.uidls.values())
