"""
Tests for L{pop3srv.userfile}.

Hashes are made with passlib at the lowest cost each scheme allows, or are
literals made by an independent implementation (openssl passwd, hashlib),
so the suite stays fast.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from passlib import hash as passlib_hash  # type: ignore[import-untyped]
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from pop3srv import userfile
from pop3srv.userfile import (
    HASH_SCHEMES,
    UserFile,
    UserFileError,
    delete_user,
    hash_password,
    set_user_hash,
    validate_username,
)

PASSWORD = "correct horse"
WRONG = "battery staple"

# Made with "openssl passwd" and hashlib, not passlib, from PASSWORD.
OPENSSL_SHA512 = (
    "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2Epl"
    "zfAqxL5Vvwp2scFtv/uamSo5z0"
)
OPENSSL_SHA256 = "$5$saltsalt$myjXcpMpE2Ofk7fj9hqyNYSn6lmWG4Mqnjx.KIRRr4/"
OPENSSL_APR1 = "$apr1$abcdefgh$sIQmFnT1CuEXAsyjuXjUX/"
OPENSSL_MD5 = "$1$abcdefgh$y6iHhJNbuC0xpbk0w9pm80"
HASHLIB_SSHA = "{SSHA}5pcxo13YdJml98eQSIlT3FMEBMMBAgME"
HASHLIB_SSHA256 = "{SSHA256}0hJvnJrn389Ik7M3OR+qOZl6NBsSet72zG2p4yy6GwEBAgME"
HASHLIB_SSHA512 = (
    "{SSHA512}59hB/WwyfgQUZfHrhGKG7B924+SMQ9dsAndq2fAiQ192K1Up6+Uyb2bNkO/rs2my"
    "nGTKvujt8okIdKCusVizJwECAwQ="
)

# Handler classes, not bound .hash methods: passlib loads backends lazily
# and a method bound before that keeps calling the loader stub.
CHEAP: dict[str, Any] = {
    "argon2id": passlib_hash.argon2.using(type="ID", memory_cost=8, rounds=1, parallelism=1),
    "argon2i": passlib_hash.argon2.using(type="I", memory_cost=8, rounds=1, parallelism=1),
    "bcrypt": passlib_hash.bcrypt.using(rounds=4),
    "bcrypt_2y": passlib_hash.bcrypt.using(rounds=4, ident="2y"),
    "sha512_crypt": passlib_hash.sha512_crypt.using(rounds=1000),
    "sha256_crypt": passlib_hash.sha256_crypt.using(rounds=1000),
    "pbkdf2_sha256": passlib_hash.pbkdf2_sha256.using(rounds=1000),
    "pbkdf2_sha512": passlib_hash.pbkdf2_sha512.using(rounds=1000),
    "ldap_salted_sha1": passlib_hash.ldap_salted_sha1,
    "ldap_salted_sha256": passlib_hash.ldap_salted_sha256,
    "ldap_salted_sha512": passlib_hash.ldap_salted_sha512,
    "apr_md5_crypt": passlib_hash.apr_md5_crypt,
    "md5_crypt": passlib_hash.md5_crypt,
}


def cheap(scheme: str = "sha256_crypt", password: str = PASSWORD) -> str:
    """
    @return: a low-cost hash of C{password}.
    """
    return str(CHEAP[scheme].hash(password))


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """
    Collect every log event emitted during the test.
    """
    collected: list[LogEvent] = []
    globalLogPublisher.addObserver(collected.append)
    yield collected
    globalLogPublisher.removeObserver(collected.append)


def messages(events: list[LogEvent]) -> list[str]:
    """
    @return: the formatted text of each event.
    """
    return [formatEvent(e) for e in events]


def write(path: Path, text: str) -> Path:
    """
    Write a user file, returning its path.
    """
    path.write_bytes(text.encode("utf-8"))
    return path


def bump(path: Path, text: str) -> None:
    """
    Rewrite C{path} in place and move its mtime a whole second on, so the
    change is seen whatever the filesystem's timestamp granularity.
    """
    before = os.stat(path).st_mtime_ns
    path.write_bytes(text.encode("utf-8"))
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.mark.parametrize("scheme", sorted(CHEAP))
def test_each_accepted_scheme_verifies(tmp_path: Path, scheme: str) -> None:
    """
    A hash from every accepted scheme verifies the right password and
    rejects a wrong one.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{cheap(scheme)}\n"))
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", WRONG)


@pytest.mark.parametrize(
    "line",
    [
        f"alice:{{SHA512-CRYPT}}{OPENSSL_SHA512}::::::",
        f"alice:{{SHA256-CRYPT}}{OPENSSL_SHA256}::::::",
        f"alice:{{CRYPT}}{OPENSSL_SHA512}",
        f"alice:{{MD5-CRYPT}}{OPENSSL_MD5}",
        f"alice:{OPENSSL_SHA512}",
        f"alice:{OPENSSL_APR1}",
        f"alice:{HASHLIB_SSHA}",
        f"alice:{HASHLIB_SSHA256}",
        f"alice:{HASHLIB_SSHA512}::::::",
        f"alice:{HASHLIB_SSHA.replace('{SSHA}', '{ssha}')}",
        f"alice:{{sha512-crypt}}{OPENSSL_SHA512}",
        f"alice:{{BLF-CRYPT}}{cheap('bcrypt_2y')}:1000:1000::/home/alice::",
        f"alice:{{ARGON2ID}}{cheap('argon2id')}::::::",
        f"alice:{{ARGON2I}}{cheap('argon2i')}",
        f"alice:{{SHA512-CRYPT}}{cheap('sha512_crypt')}::::::userdb_mail=x",
    ],
)
def test_literal_and_dovecot_lines(tmp_path: Path, line: str) -> None:
    """
    Dovecot passwd-file lines (scheme prefix, trailing fields), htpasswd
    C{$apr1$} lines and LDAP salted SHA made outside passlib all verify.
    """
    users = UserFile(write(tmp_path / "users", line + "\n"))
    assert "alice" in users
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", WRONG)


def test_comments_blank_lines_and_crlf(tmp_path: Path) -> None:
    """
    Comments (also indented), blank lines, CRLF endings and a missing final
    newline are all fine.
    """
    text = (
        "# users\r\n"
        "\r\n"
        "   # indented comment\n"
        "\t\n"
        f"alice:{cheap()}:extra:fields\r\n"
        f"bob:{cheap(password='b')}"
    )
    users = UserFile(write(tmp_path / "users", text))
    assert users.verify("alice", PASSWORD)
    assert users.verify("bob", "b")


@pytest.mark.parametrize(
    ("hash_field", "reason"),
    [
        ("{PLAIN}hunter2", "plaintext passwords are not accepted"),
        ("{plain}hunter2", "plaintext passwords are not accepted"),
        ("{CLEARTEXT}hunter2", "plaintext passwords are not accepted"),
        ("{FOO}hunter2", "unsupported password scheme"),
        ("{SHA}hunter2", "unsupported password scheme"),
        ("{hunter2", "unrecognised password hash"),
        ("hunter2", "unrecognised password hash"),
        ("", "empty password hash"),
        ("!" + OPENSSL_SHA512, "account disabled"),
        ("$6$hunter2", "malformed sha512_crypt hash"),
        ("{SHA512-CRYPT}" + OPENSSL_MD5, "does not match its {SHA512-CRYPT} prefix"),
        ("{ARGON2I}$argon2id$v=19$m=8,t=1,p=1$x$y", "does not match"),
        ("{SSHA}hunter2!!", "malformed ldap_salted_sha1 hash"),
    ],
    # Test ids, and so tmp_path names, must not quote "hunter2".
    ids=lambda value: "case" if "hunter2" in str(value) else None,
)
def test_rejected_hashes(
    tmp_path: Path, events: list[LogEvent], hash_field: str, reason: str
) -> None:
    """
    Plaintext, unknown, disabled, malformed and mislabelled hashes are
    refused: the line is logged with its reason and skipped, and the field
    itself (which may be a plaintext password) is never logged.
    """
    path = write(tmp_path / "users", f"alice:{hash_field}\nbob:{cheap()}\n")
    users = UserFile(path)
    assert "alice" not in users
    assert not users.verify("alice", "hunter2")
    assert users.verify("bob", PASSWORD)
    logged = messages(events)
    assert any(f"{path}:1:" in m and reason in m for m in logged), logged
    assert not any("hunter2" in repr(e) for e in events)


def test_malformed_lines_logged_and_skipped(tmp_path: Path, events: list[LogEvent]) -> None:
    """
    Lines with no colon, an empty or invalid name, invalid UTF-8 or a
    duplicate name are each logged with the file path and line number and
    skipped; the good lines around them still work, the first definition of
    a duplicate wins, and no line text reaches the log.
    """
    first, second = cheap(), cheap(password="second")
    path = tmp_path / "users"
    path.write_bytes(
        b"# header\n"  # 1
        b"hunter2\n"  # 2: no colon
        + f":{first}\n".encode()  # 3: empty name
        + f"alice:{first}\n".encode()  # 4: good
        + f"bad user:{first}\n".encode()  # 5: whitespace in name
        + b"caf\xe9:"
        + first.encode()
        + b"\n"  # 6: not UTF-8
        + f"alice:{second}\n".encode()  # 7: duplicate
        + f"bob:{first}\n".encode()  # 8: good
    )
    users = UserFile(path)
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", "second")
    assert users.verify("bob", PASSWORD)
    logged = messages(events)
    for lineno, reason in [
        (2, "no ':' separator"),
        (3, "user name is empty"),
        (5, "whitespace"),
        (6, "not valid UTF-8"),
        (7, "duplicate user 'alice' (first defined on line 4)"),
    ]:
        assert any(
            m.startswith(f"{path}:{lineno}: skipping line:") and reason in m for m in logged
        ), (lineno, logged)
    assert not any(f"{path}:{n}:" in m for m in logged for n in (1, 4, 8))
    assert not any("hunter2" in repr(e) or first in repr(e) for e in events)
    assert all(e["log_level"].name == "warn" for e in events)


def test_unknown_user_verifies_against_real_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An unknown user's password is verified against the first user's real
    hash (so it costs what a wrong password costs) and the answer is
    L{False} even when that password would match the decoy hash.
    """
    alice, bob = cheap(), cheap(password="b")
    users = UserFile(write(tmp_path / "users", f"alice:{alice}\nbob:{bob}\n"))
    calls: list[tuple[str, str]] = []
    real_verify = users.context.verify

    def spy(secret: str, hashed: str, **kwargs: Any) -> bool:
        calls.append((secret, hashed))
        return bool(real_verify(secret, hashed, **kwargs))

    monkeypatch.setattr(users.context, "verify", spy)
    dummy = []
    monkeypatch.setattr(users.context, "dummy_verify", lambda: dummy.append(1))
    assert not users.verify("mallory", PASSWORD)
    assert calls == [(PASSWORD, alice)]
    assert not users.verify("", "x")
    assert not users.verify("../etc/passwd", "x")
    assert len(calls) == 3
    assert dummy == []


def test_unknown_user_in_empty_file_uses_dummy_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With no users at all there is no real hash to borrow, so passlib's
    C{dummy_verify} is used instead.
    """
    users = UserFile(write(tmp_path / "users", "# nobody yet\n"))
    dummy = []
    monkeypatch.setattr(users.context, "dummy_verify", lambda: dummy.append(1))
    assert not users.verify("alice", PASSWORD)
    assert dummy == [1]


def test_password_the_scheme_refuses_is_a_mismatch(tmp_path: Path, events: list[LogEvent]) -> None:
    """
    bcrypt raises for a password over 72 octets or containing NUL; that is
    a failed login, not an exception, and the password is not logged.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{cheap('bcrypt')}\n"))
    long_secret = "Z" * 100
    assert not users.verify("alice", long_secret)
    assert not users.verify("alice", "nul\0secret")
    # The unknown-user path borrows the same hash and must not raise either.
    assert not users.verify("mallory", long_secret)
    assert events
    assert not any(long_secret in repr(e) or "secret" in repr(e) for e in events)


def test_deprecated_hash_logs_needs_update_once(tmp_path: Path, events: list[LogEvent]) -> None:
    """
    A login with a deprecated (htpasswd MD5) hash succeeds and logs, once,
    that the hash should be reset.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{OPENSSL_APR1}\n"))
    assert users.verify("alice", PASSWORD)
    assert users.verify("alice", PASSWORD)
    notes = [m for m in messages(events) if "pop3srv-passwd" in m]
    assert len(notes) == 1
    assert "'alice'" in notes[0]
    assert PASSWORD not in repr(events)


def test_reload_on_change(tmp_path: Path) -> None:
    """
    A change of mtime (same size, same inode) is noticed on the next lookup.
    """
    path = write(tmp_path / "users", f"alice:{cheap(password='pw-one')}\n")
    users = UserFile(path)
    assert users.verify("alice", "pw-one")
    bump(path, f"alice:{cheap(password='pw-two')}\n")
    assert not users.verify("alice", "pw-one")
    assert users.verify("alice", "pw-two")


def test_reload_on_rename_and_size(tmp_path: Path) -> None:
    """
    A file replaced by rename (new inode) is noticed even with its mtime
    forced back to the old value, and so is a change of size alone.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    users = UserFile(path)
    old = os.stat(path)
    replacement = write(tmp_path / "new", f"alice:{cheap()}\nbob:{cheap()}\n")
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(replacement, path)
    assert "bob" in users

    with open(path, "ab") as f:
        f.write(f"carol:{cheap()}\n".encode())
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert "carol" in users


def test_no_reparse_when_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Lookups on an unchanged file stat it but do not read it again.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{cheap()}\n"))
    loads = []
    real_load = users._load

    def counting_load() -> Any:
        loads.append(1)
        return real_load()

    monkeypatch.setattr(users, "_load", counting_load)
    for _ in range(3):
        assert "alice" in users
    assert loads == []


def test_unreadable_after_start_keeps_last_good(tmp_path: Path, events: list[LogEvent]) -> None:
    """
    If the file vanishes after start the last good contents stay in use and
    one error is logged (not one per lookup); when it comes back it is read
    again.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    users = UserFile(path)
    path.unlink()
    assert users.verify("alice", PASSWORD)
    assert users.verify("alice", PASSWORD)
    errors = [e for e in events if e["log_level"].name == "error"]
    assert len(errors) == 1
    assert formatEvent(errors[0]).startswith(f"{path}: No such file or directory")

    write(path, f"bob:{cheap()}\n")
    assert "bob" in users
    assert "alice" not in users


def test_unreadable_contents_after_start_keeps_last_good(
    tmp_path: Path, events: list[LogEvent]
) -> None:
    """
    A file that still stats but cannot be opened (here: replaced by a
    directory) also leaves the last good contents in use.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    users = UserFile(path)
    path.unlink()
    path.mkdir()
    assert "alice" in users
    assert any(e["log_level"].name == "error" for e in events)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """
    A missing file at construction raises L{UserFileError} (a
    L{ValueError}) whose message is one line: the path and the reason.
    """
    path = tmp_path / "nope"
    with pytest.raises(UserFileError) as info:
        UserFile(path)
    assert str(info.value) == f"{path}: No such file or directory"
    assert isinstance(info.value, ValueError)
    with pytest.raises(UserFileError, match="Is a directory"):
        UserFile(tmp_path)


@pytest.mark.parametrize(
    "name", ["alice", "alice@example.org", "a.b-c_d+e", "Ünïcødé", "x" * 255, "a#b"]
)
def test_validate_username_accepts(name: str) -> None:
    """
    Ordinary names, addresses and non-ASCII letters are valid.
    """
    validate_username(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("a:b", "':'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".", "'.'"),
        ("a\0b", "control"),
        ("a\x1bb", "control"),
        ("a\x85b", "whitespace"),
        ("a\u202eb", "control"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\u3000b", "whitespace"),
        ("é" * 128, "255 octets"),
        ("#alice", "'#'"),
        ("a\udcffb", "Unicode"),
    ],
)
def test_validate_username_rejects(name: str, reason: str) -> None:
    """
    Empty names, path characters, colons, controls, whitespace, names over
    255 UTF-8 octets and comment-like names are rejected with a reason.
    """
    with pytest.raises(ValueError, match=reason.replace(".", r"\.")):
        validate_username(name)


def test_hash_password_default_is_argon2id(tmp_path: Path) -> None:
    """
    New hashes are argon2id by default, and verify through L{UserFile}.
    """
    hashed = hash_password(PASSWORD)
    assert hashed.startswith("$argon2id$")
    users = UserFile(write(tmp_path / "users", f"alice:{hashed}\n"))
    assert users.verify("alice", PASSWORD)


def test_hash_password_scheme(tmp_path: Path) -> None:
    """
    A scheme can be chosen; deprecated, plaintext-equivalent and unknown
    schemes cannot.
    """
    assert hash_password(PASSWORD, "pbkdf2_sha256").startswith("$pbkdf2-sha256$")
    assert "bcrypt" in HASH_SCHEMES
    for bad in ("md5_crypt", "apr_md5_crypt", "ldap_salted_sha1", "plaintext", "x"):
        with pytest.raises(ValueError, match="unknown or deprecated scheme"):
            hash_password(PASSWORD, bad)


# The editor.

EDIT_BEFORE = (
    "# pop3srv users\n"
    "\n"
    "alice:{old}:1000:1000::/home/alice::userdb_x=1\r\n"
    "  # indented: alice:not-a-user\n"
    "#alice:commented-out\n"
    "alicex:{old}\n"
    "bob:{old}"
)


def test_set_user_hash_changes_only_the_hash(tmp_path: Path) -> None:
    """
    Changing a user replaces only the hash field of that user's line: the
    extra fields, the CRLF ending, comments, similar names and the last
    line without a newline stay byte-identical.
    """
    old, new = cheap(), cheap(password="new")
    path = write(tmp_path / "users", EDIT_BEFORE.format(old=old))
    assert set_user_hash(path, "alice", new) is False
    expected = EDIT_BEFORE.format(old=old).replace(f"alice:{old}:1000", f"alice:{new}:1000")
    assert path.read_bytes() == expected.encode()
    assert UserFile(path).verify("alice", "new")


def test_set_user_hash_adds_user(tmp_path: Path) -> None:
    """
    A new user is appended; a last line without a newline gets one first.
    """
    old, new = cheap(), cheap(password="new")
    before = EDIT_BEFORE.format(old=old)
    path = write(tmp_path / "users", before)
    assert set_user_hash(path, "carol", new) is True
    assert path.read_bytes() == (before + "\n" + f"carol:{new}\n").encode()
    users = UserFile(path)
    assert users.verify("carol", "new")
    assert users.verify("bob", PASSWORD)


def test_set_user_hash_line_without_extra_fields(tmp_path: Path) -> None:
    """
    A plain C{name:hash} line becomes C{name:newhash}, nothing added.
    """
    old, new = cheap(), cheap(password="new")
    path = write(tmp_path / "users", f"alice:{old}\n")
    set_user_hash(path, "alice", new)
    assert path.read_text() == f"alice:{new}\n"


def test_set_user_hash_changes_first_duplicate(tmp_path: Path) -> None:
    """
    With a duplicated user, the first line (the one the server uses) is
    changed and the later one left alone.
    """
    old, new = cheap(), cheap(password="new")
    path = write(tmp_path / "users", f"alice:{old}\nalice:{old}\n")
    set_user_hash(path, "alice", new)
    assert path.read_text() == f"alice:{new}\nalice:{old}\n"


def test_set_user_hash_creates_file_0640(tmp_path: Path) -> None:
    """
    A missing file is created with mode 0640 whatever the umask.
    """
    path = tmp_path / "users"
    old_umask = os.umask(0o077)
    try:
        assert set_user_hash(path, "alice", cheap()) is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    text = path.read_text()
    assert text.startswith("alice:$5$")
    assert text.count("\n") == 1


def test_set_user_hash_preserves_mode(tmp_path: Path) -> None:
    """
    The rewritten file keeps the original's mode.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    os.chmod(path, 0o600)
    set_user_hash(path, "bob", cheap())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_set_user_hash_rejects_bad_input(tmp_path: Path) -> None:
    """
    Invalid names and hashes the server would not accept are refused before
    the file is touched.
    """
    path = write(tmp_path / "users", "")
    for name in ("", "a:b", "a/b", "#x"):
        with pytest.raises(ValueError, match="user name"):
            set_user_hash(path, name, cheap())
    for hashed in ("{PLAIN}x", "x", "a:b", OPENSSL_MD5 + "\n", " " + OPENSSL_MD5):
        with pytest.raises(ValueError):
            set_user_hash(path, "alice", hashed)
    assert path.read_bytes() == b""


def test_edit_is_atomic_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The new contents are written to a temporary file in the same directory
    and renamed over the original, leaving no temporary file behind.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    old_inode = os.stat(path).st_ino
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((src, dst))
        assert Path(src).read_text().startswith("alice:")
        real_replace(src, dst)

    monkeypatch.setattr(userfile.os, "replace", spy)
    set_user_hash(path, "bob", cheap())
    [(src, dst)] = renames
    assert os.path.dirname(src) == str(tmp_path)
    assert dst == str(path)
    assert os.stat(path).st_ino != old_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_failed_edit_leaves_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    If writing the new file fails (here: fsync), the original is untouched,
    the temporary file is removed, and the error is one line naming the path.
    """
    before = f"alice:{cheap()}\n"
    path = write(tmp_path / "users", before)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(userfile.os, "fsync", broken_fsync)
    with pytest.raises(UserFileError) as info:
        set_user_hash(path, "bob", cheap())
    assert str(info.value) == f"{path}: Input/output error"
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_edit_through_symlink_keeps_symlink(tmp_path: Path) -> None:
    """
    Editing through a symlink rewrites the target and leaves the link.
    """
    target = write(tmp_path / "real", f"alice:{cheap()}\n")
    link = tmp_path / "users"
    link.symlink_to(target)
    set_user_hash(link, "bob", cheap())
    assert link.is_symlink()
    assert "bob:" in target.read_text()


def test_edit_waits_for_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    While another editor holds C{<path>.lock}, an edit waits and then gives
    up with a one-line error, leaving the file alone.
    """
    path = write(tmp_path / "users", "")
    monkeypatch.setattr(userfile, "_LOCK_TIMEOUT", 0.2)
    with open(str(path) + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserFileError, match=r"users\.lock: still locked"):
            set_user_hash(path, "alice", cheap())
    assert path.read_bytes() == b""
    set_user_hash(path, "alice", cheap())
    assert "alice" in UserFile(path)


def test_concurrent_edits_lose_nothing(tmp_path: Path) -> None:
    """
    Editors running at once are serialised by the lock: every user added
    by every thread is in the final file.
    """
    path = write(tmp_path / "users", "")
    hashed = cheap()
    names = [f"user{i}" for i in range(16)]
    threads = [threading.Thread(target=set_user_hash, args=(path, name, hashed)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(line.split(":")[0] for line in path.read_text().splitlines()) == sorted(names)


def test_delete_user(tmp_path: Path) -> None:
    """
    Deleting removes every line for the user (so a duplicate cannot come
    into force) and keeps all other lines byte-identical.
    """
    old = cheap()
    before = EDIT_BEFORE.format(old=old) + f"\nalice:{old}\n"
    path = write(tmp_path / "users", before)
    assert delete_user(path, "alice") is True
    expected = before.replace(f"alice:{old}:1000:1000::/home/alice::userdb_x=1\r\n", "").replace(
        f"\nalice:{old}\n", "\n"
    )
    assert path.read_bytes() == expected.encode()
    users = UserFile(path)
    assert "alice" not in users
    assert "alicex" in users


def test_delete_unknown_user_leaves_file(tmp_path: Path) -> None:
    """
    Deleting a user who is not there returns L{False} and does not rewrite
    the file.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    inode = os.stat(path).st_ino
    assert delete_user(path, "bob") is False
    assert os.stat(path).st_ino == inode


def test_delete_from_missing_file(tmp_path: Path) -> None:
    """
    Deleting from a missing file is a L{UserFileError}, and creates nothing
    but the lock.
    """
    path = tmp_path / "users"
    with pytest.raises(UserFileError, match="No such file or directory"):
        delete_user(path, "alice")
    assert not path.exists()
