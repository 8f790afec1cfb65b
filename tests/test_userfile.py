"""
Tests for the user file: L{pop3srv.auth.userfile} (reading),
L{pop3srv.auth.editor} (writing), L{pop3srv.auth.hashpolicy} and
L{pop3srv.auth.identity}.

Hashes are made with passlib at the lowest cost each scheme allows, or are
literals made by an independent implementation (openssl passwd, hashlib),
so the suite stays fast.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import RunNow
from passlib import hash as passlib_hash  # type: ignore[import-untyped]
from twisted.cred.credentials import UsernamePassword
from twisted.logger import LogEvent, formatEvent

from pop3srv.auth import editor, hashpolicy
from pop3srv.auth.checker import PasslibChecker
from pop3srv.auth.editor import (
    apply_upgrade,
    delete_app_password,
    delete_user,
    replace_hash,
    set_main_pop3,
    set_password,
    set_user_hash,
)
from pop3srv.auth.hashpolicy import HASH_SCHEMES, hash_password, normalise_password
from pop3srv.auth.identity import validate_username
from pop3srv.auth.userfile import UserFile, UserFileError, VerifyResult
from pop3srv.core.scram import salted_password, stored_from_salted

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
    tmp_path: Path, log_events: list[LogEvent], hash_field: str, reason: str
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
    logged = messages(log_events)
    assert any(f"{path}:1:" in m and reason in m for m in logged), logged
    assert not any("hunter2" in repr(e) for e in log_events)


def test_malformed_lines_logged_and_skipped(tmp_path: Path, log_events: list[LogEvent]) -> None:
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
    logged = messages(log_events)
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
    assert not any("hunter2" in repr(e) or first in repr(e) for e in log_events)
    assert all(e["log_level"].name == "warn" for e in log_events)


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
    # SHA-crypt would go to libcrypt first; spy on passlib's path here.
    monkeypatch.setattr("pop3srv.auth.hashpolicy.verify_sha_crypt", lambda p, h: None)
    dummy = []
    monkeypatch.setattr(users.context, "dummy_verify", lambda: dummy.append(1))
    assert not users.verify("mallory", PASSWORD)
    assert calls == [(PASSWORD, alice)]
    assert not users.verify("", "x")
    assert not users.verify("../etc/passwd", "x")
    assert len(calls) == 3
    assert dummy == []
    # A password whose SASLprep form differs (U+00A0 becomes a space) is
    # checked in both forms for a known user, so twice for an unknown one too.
    calls.clear()
    assert not users.verify("mallory", "pass\u00a0word")
    assert not users.verify("alice", "pass\u00a0word")
    assert len(calls) == 4
    assert calls[0][1] == calls[1][1] == alice


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


def test_password_the_scheme_refuses_is_a_mismatch(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
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
    assert log_events
    assert not any(long_secret in repr(e) or "secret" in repr(e) for e in log_events)


def test_deprecated_hash_logs_needs_update_once(tmp_path: Path, log_events: list[LogEvent]) -> None:
    """
    With upgrades turned off, a login with a deprecated (htpasswd MD5) hash
    succeeds and logs, once, that the hash should be reset.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{OPENSSL_APR1}\n"), upgrade=False)
    assert users.verify("alice", PASSWORD)
    assert users.verify("alice", PASSWORD)
    notes = [m for m in messages(log_events) if "pop3srv-passwd" in m]
    assert len(notes) == 1
    assert "'alice'" in notes[0]
    assert PASSWORD not in repr(log_events)


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


def test_unreadable_after_start_keeps_last_good(tmp_path: Path, log_events: list[LogEvent]) -> None:
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
    errors = [e for e in log_events if e["log_level"].name == "error"]
    assert len(errors) == 1
    assert formatEvent(errors[0]).startswith(f"{path}: No such file or directory")

    write(path, f"bob:{cheap()}\n")
    assert "bob" in users
    assert "alice" not in users


def test_unreadable_contents_after_start_keeps_last_good(
    tmp_path: Path, log_events: list[LogEvent]
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
    assert any(e["log_level"].name == "error" for e in log_events)


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


def without_blocking_on(fifo: Path, call: Any) -> Any:
    """
    Run C{call()} in a thread and give it 5 s.  If it is still blocked (on
    opening the FIFO C{fifo}, until a writer comes), open and close the
    FIFO for writing so that the thread ends, and fail the test.

    @return: what C{call} returned.
    @raise BaseException: what C{call} raised.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as e:
            outcome.append(("error", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    [(kind, value)] = outcome
    if kind == "error":
        raise value
    return value


def test_fifo_at_construction_is_a_clear_error(tmp_path: Path) -> None:
    """
    A FIFO at the path is refused at once with a one-line L{UserFileError},
    rather than blocking start-up until something writes to it.
    """
    path = tmp_path / "users"
    os.mkfifo(path)
    with pytest.raises(UserFileError) as info:
        without_blocking_on(path, lambda: UserFile(path))
    assert str(info.value) == f"{path}: Not a regular file"


def test_fifo_after_start_keeps_last_good(tmp_path: Path, log_events: list[LogEvent]) -> None:
    """
    A user file replaced by a FIFO after start leaves the last good
    contents in use, with one error logged, as any other unreadable file
    does; the check does not block on the FIFO (with the lock held, which
    would stall every lookup of the process).  When a file is back it is
    read again.
    """
    path = write(tmp_path / "users", f"alice:{cheap()}\n")
    users = UserFile(path)
    path.unlink()
    os.mkfifo(path)
    assert without_blocking_on(path, lambda: users.verify("alice", PASSWORD))
    assert without_blocking_on(path, lambda: users.verify("alice", PASSWORD))
    errors = [formatEvent(e) for e in log_events if e["log_level"].name == "error"]
    assert errors == [f"{path}: Not a regular file; still using the user list read earlier"]
    path.unlink()
    write(path, f"alice:{cheap(password='new')}\n")
    assert users.verify("alice", "new")
    assert not users.verify("alice", PASSWORD)


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

    monkeypatch.setattr(editor.os, "replace", spy)
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

    monkeypatch.setattr(editor.os, "fsync", broken_fsync)
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
    monkeypatch.setattr(editor, "_LOCK_TIMEOUT", 0.2)
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


# --- scram hashes, app passwords, normalisation, hash upgrade

CHEAP_SCRAM = passlib_hash.scram.using(rounds=1000, algs="sha-1,sha-256")


def cheap_scram(password: str = PASSWORD) -> str:
    """
    @return: a low-cost passlib scram hash with a SHA-256 digest.
    """
    return str(CHEAP_SCRAM.hash(password))


def scram_keys_match(users: UserFile, name: str, password: str) -> bool:
    """
    @return: whether the user's SCRAM keys are those of C{password}.
    """
    stored = users.scram_lookup(name)
    assert stored is not None
    expected = stored_from_salted(
        stored.salt,
        stored.iterations,
        salted_password(normalise_password(password).encode(), stored.salt, stored.iterations),
    )
    return (stored.stored_key, stored.server_key) == (expected.stored_key, expected.server_key)


def test_scram_line_serves_plain_and_scram(tmp_path: Path) -> None:
    """
    A user with only a scram hash logs in with a password, and its SCRAM
    keys are those of the password.
    """
    users = UserFile(write(tmp_path / "users", f"alice:{cheap_scram()}\n"))
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", WRONG)
    assert scram_keys_match(users, "alice", PASSWORD)
    assert users.scram_lookup("bob") is None


def test_scram_and_argon2_for_one_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    One user may have an argon2 line and a scram line: passwords are checked
    against the argon2 hash, SCRAM uses the scram one, and a third line of
    either kind is a duplicate.
    """
    argon, scram_hash = cheap("argon2id"), cheap_scram()
    text = f"alice:{argon}\nalice:{scram_hash}\nalice:{cheap_scram('x')}\n"
    users = UserFile(write(tmp_path / "users", text), upgrade=False)
    checked: list[str] = []
    real_verify = users.context.verify

    def spy(secret: str, hashed: str, **kwargs: Any) -> bool:
        checked.append(hashed)
        return bool(real_verify(secret, hashed, **kwargs))

    monkeypatch.setattr(users.context, "verify", spy)
    # Every check through passlib, so the spy sees which hash was used.
    monkeypatch.setattr("pop3srv.auth.hashpolicy.verify_argon2", lambda p, h: None)
    assert users.verify("alice", PASSWORD)
    assert checked == [argon]
    assert scram_keys_match(users, "alice", PASSWORD)
    assert users.labels("alice") == [None]


def test_scram_hash_without_sha256_is_not_served(tmp_path: Path) -> None:
    """
    A scram hash with SHA-1 only verifies passwords but cannot serve
    SCRAM-SHA-256.
    """
    sha1_only = passlib_hash.scram.using(rounds=1000, algs="sha-1").hash(PASSWORD)
    users = UserFile(write(tmp_path / "users", f"alice:{sha1_only}\n"))
    assert users.verify("alice", PASSWORD)
    assert users.scram_lookup("alice") is None


def test_scram_fake_for_unknown_user(tmp_path: Path) -> None:
    """
    An unknown user (or one without a scram hash) gets fake SCRAM keys with
    the same iteration count and salt length as real ones, stable across
    lookups and across a re-read of the file, different per user.
    """
    path = write(tmp_path / "users", f"alice:{cheap_scram()}\nbob:{cheap()}\n")
    users = UserFile(path)
    real = users.scram_credentials("alice")
    ghost = users.scram_credentials("ghost")
    bob = users.scram_credentials("bob")
    assert ghost.iterations == real.iterations == 1000
    assert len(ghost.salt) == len(real.salt)
    assert ghost == users.scram_credentials("ghost") == UserFile(path).scram_credentials("ghost")
    assert ghost.salt != bob.salt
    assert users.scram_lookup("bob") is None
    empty = UserFile(write(tmp_path / "empty", "\n"))
    assert empty.scram_credentials("ghost").iterations == 4096


def test_app_passwords_report_label(tmp_path: Path) -> None:
    """
    App passwords are extra lines with an C{app=LABEL} field; each logs in
    and the result names its label; the main password has label L{None}.
    """
    text = (
        f"alice:{cheap()}:1000:1000::/home/alice::\n"
        f"alice:{cheap(password='phone-pw')}:app=phone\n"
        f"alice:{cheap(password='laptop-pw')}:app=laptop\n"
    )
    users = UserFile(write(tmp_path / "users", text))
    assert users.verify_detailed("alice", PASSWORD) == VerifyResult(ok=True, label=None)
    assert users.verify_detailed("alice", "phone-pw") == VerifyResult(ok=True, label="phone")
    assert users.verify_detailed("alice", "laptop-pw").label == "laptop"
    assert users.verify_detailed("alice", WRONG) == VerifyResult(ok=False)
    assert users.labels("alice") == [None, "phone", "laptop"]


def test_main_password_marked_nopop3(tmp_path: Path) -> None:
    """
    C{nopop3} after the hash makes the main password (both its lines)
    useless here, while app passwords still work and SCRAM uses the first
    app password with a scram hash.
    """
    text = (
        f"alice:{cheap()}:nopop3\n"
        f"alice:{cheap_scram()}:nopop3\n"
        f"alice:{cheap_scram('app-pw')}:app=mail\n"
        f"bob:{cheap()}:nopop3\n"
    )
    users = UserFile(write(tmp_path / "users", text))
    assert not users.verify("alice", PASSWORD)
    assert users.verify_detailed("alice", "app-pw") == VerifyResult(ok=True, label="mail")
    stored = users.scram_lookup("alice")
    assert stored is not None and stored.label == "mail"
    assert scram_keys_match(users, "alice", "app-pw")
    assert "bob" in users
    assert not users.verify("bob", PASSWORD)
    assert users.labels("bob") == []


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("alice:{h}:app=", "app password label"),
        ("alice:{h}:app=bad/label", "app password label"),
        ("alice:{h}:app=a:app=b", "more than one app= field"),
        ("alice:{h}:app=a:nopop3", "main password only"),
    ],
)
def test_bad_app_lines(tmp_path: Path, log_events: list[LogEvent], line: str, reason: str) -> None:
    """
    Bad labels and contradictory markers are logged and the line skipped.
    """
    path = write(tmp_path / "users", line.format(h=cheap()) + "\n")
    assert "alice" not in UserFile(path)
    assert any(reason in m for m in messages(log_events)), messages(log_events)


def test_duplicate_app_password(tmp_path: Path, log_events: list[LogEvent]) -> None:
    """
    A second line for the same app label and kind is skipped with a message.
    """
    text = f"alice:{cheap()}:app=phone\nalice:{cheap(password='x')}:app=phone\n"
    users = UserFile(write(tmp_path / "users", text))
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", "x")
    assert any(
        "duplicate app password 'phone' for user 'alice' (first defined on line 1)" in m
        for m in messages(log_events)
    )


def test_unicode_normalisation(tmp_path: Path) -> None:
    """
    User names are compared in NFC and passwords after SASLprep: a name
    with a combining accent finds the precomposed one, and a no-break space
    matches a space.  A hash made from an unnormalised password (before
    normalisation existed) still verifies.
    """
    nfc, nfd = "jos\u00e9", "jose\u0301"
    legacy = CHEAP["sha256_crypt"].hash("caf\u00e9\u00a0noir")
    text = f"{nfc}:{cheap(password='pass word')}\nbob:{legacy}\n"
    users = UserFile(write(tmp_path / "users", text))
    assert nfd in users
    assert users.verify(nfd, "pass\u00a0word")
    assert users.verify("bob", "caf\u00e9\u00a0noir")
    prepared = hash_password("a\u00a0b", "pbkdf2_sha256")
    assert UserFile(write(tmp_path / "u2", f"carol:{prepared}\n")).verify("carol", "a b")


def verify_and_upgrade(users: UserFile, username: str, password: str) -> tuple[VerifyResult, bool]:
    """
    What a login does (L{PasslibChecker}): verify, then write the upgrade
    the check offers, if any.

    @return: the check's result, and whether the file was upgraded.
    """
    result = users.verify_detailed(username, password)
    if result.upgrade_hash is None or result.matched_hash is None:
        return result, False
    upgraded = apply_upgrade(
        users.path, username, result.matched_hash, result.upgrade_hash, label=result.label
    )
    return result, upgraded


def login(users: UserFile, username: str, password: str) -> Any:
    """
    Log in through L{PasslibChecker} with a thread pool that runs at once.

    @return: the avatar ID, or the L{Failure}.
    """
    run_now = RunNow()
    checker = PasslibChecker(users, reactor=run_now, threadpool=run_now)  # type: ignore[arg-type]
    outcome: list[Any] = []
    checker.requestAvatarId(
        UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
    ).addBoth(outcome.append)
    [result] = outcome
    return result


def test_verify_never_writes_the_file(
    tmp_path: Path, log_events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A check that matches a deprecated hash leaves the file alone: it says
    the hash needs an update and offers a new hash of the password (once
    per user and hash) for the caller to write.
    """
    path = write(tmp_path / "users", f"alice:{OPENSSL_APR1}\n")
    before = path.read_bytes()
    renames: list[str] = []
    monkeypatch.setattr(editor.os, "replace", renames.append)
    users = UserFile(path)
    first = users.verify_detailed("alice", PASSWORD)
    again = users.verify_detailed("alice", PASSWORD)
    assert path.read_bytes() == before and renames == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]
    assert (first.ok, first.label, first.needs_update) == (True, None, True)
    assert first.matched_hash == OPENSSL_APR1
    assert first.upgrade_hash is not None and first.upgrade_hash.startswith("$argon2id$")
    assert hashpolicy.verify_hash(PASSWORD, first.upgrade_hash)
    assert again == VerifyResult(ok=True, needs_update=True, matched_hash=OPENSSL_APR1)
    assert not [m for m in messages(log_events) if "upgrade" in m]


def test_login_through_the_checker_upgrades(
    tmp_path: Path, log_events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The checker writes the upgrade the check offers: the login succeeds,
    the file holds the new hash, and the upgrade is logged once.
    """
    monkeypatch.setattr(
        hashpolicy.CONTEXT,
        "hash",
        lambda secret: CHEAP["argon2id"].using(memory_cost=64).hash(secret),
    )
    path = write(tmp_path / "users", f"alice:{OPENSSL_APR1}:1000\n")
    users = UserFile(path)
    assert login(users, "alice", PASSWORD) == b"alice"
    text = path.read_text()
    assert text.startswith("alice:$argon2id$") and text.endswith(":1000\n")
    assert login(users, "alice", PASSWORD) == b"alice"
    logged = [m for m in messages(log_events) if "upgraded the apr_md5_crypt" in m]
    assert logged == [f"{path}: upgraded the apr_md5_crypt hash of user 'alice' to argon2"]
    assert PASSWORD not in repr(log_events)


def test_failed_upgrade_does_not_fail_the_login(
    tmp_path: Path, log_events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A write that cannot be done (the lock held) or that fails in a way no
    one foresaw is logged; the login succeeds all the same.
    """
    path = write(tmp_path / "users", f"alice:{OPENSSL_APR1}\nbob:{OPENSSL_MD5}\n")
    before = path.read_bytes()
    users = UserFile(path)
    with editor._editor_lock(str(path)):
        assert login(users, "alice", PASSWORD) == b"alice"
    assert any("could not upgrade" in m and "still locked" in m for m in messages(log_events))

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(editor, "apply_upgrade", broken)
    assert login(users, "bob", PASSWORD) == b"bob"
    assert any("disk on fire" in repr(e) for e in log_events)
    assert path.read_bytes() == before


def test_upgrade_rewrites_atomically_and_keeps_other_lines(
    tmp_path: Path, log_events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    After a login with a deprecated hash, the line gets a new argon2 hash
    by an atomic rename, keeping its other fields; every other line stays
    byte-identical; the event is logged without the password; the new hash
    verifies.
    """
    before = (
        "# users\r\n"
        f"bob:{cheap(password='b')}:x\n"
        f"alice:{OPENSSL_APR1}:1000:1000::/home/alice::\r\n"
        f"alice:{cheap(password='app')}:app=phone\n"
        "carol:{SHA512-CRYPT}" + OPENSSL_SHA512 + "\n"
    )
    path = write(tmp_path / "users", before)
    renames: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(editor.os, "replace", spy)
    monkeypatch.setattr(
        hashpolicy.CONTEXT,
        "hash",
        lambda secret: CHEAP["argon2id"].using(memory_cost=16).hash(secret),
    )
    users = UserFile(path)
    result, upgraded = verify_and_upgrade(users, "alice", PASSWORD)
    assert (result.ok, result.label, upgraded) == (True, None, True)
    assert renames == [str(path)]
    after = path.read_bytes().decode()
    [line] = [x for x in after.splitlines(keepends=True) if x.startswith("alice:$argon2")]
    assert line.startswith("alice:$argon2id$") and line.endswith(":1000:1000::/home/alice::\r\n")
    assert after.replace(line, "") == before.replace(
        f"alice:{OPENSSL_APR1}:1000:1000::/home/alice::\r\n", ""
    )
    assert users.verify("alice", PASSWORD)
    assert users.verify_detailed("alice", "app").label == "phone"
    logged = [m for m in messages(log_events) if "upgraded" in m]
    # (The cheap argon2 made here is itself upgraded by the next login.)
    assert logged[0] == f"{path}: upgraded the apr_md5_crypt hash of user 'alice' to argon2"
    assert PASSWORD not in repr(log_events)


def test_upgrade_keeps_dovecot_prefix(tmp_path: Path) -> None:
    """
    A Dovecot line with a scheme prefix gets the new scheme's prefix.
    """
    path = write(tmp_path / "users", "alice:{MD5-CRYPT}" + OPENSSL_MD5 + "::::::\n")
    assert verify_and_upgrade(UserFile(path), "alice", PASSWORD)[1]
    text = path.read_text()
    assert text.startswith("alice:{ARGON2ID}$argon2id$") and text.endswith("::::::\n")
    assert UserFile(path).verify("alice", PASSWORD)


def test_upgrade_skipped_while_locked(tmp_path: Path, log_events: list[LogEvent]) -> None:
    """
    While C{pop3srv-passwd} holds the lock, the upgrade is given up (after a
    short wait), logged, and the login still succeeds; the file is unchanged.
    """
    path = write(tmp_path / "users", f"alice:{OPENSSL_APR1}\n")
    before = path.read_bytes()
    with editor._editor_lock(str(path)):
        result, upgraded = verify_and_upgrade(UserFile(path), "alice", PASSWORD)
    assert (result.ok, result.label, result.needs_update, upgraded) == (True, None, True, False)
    assert path.read_bytes() == before
    assert any("could not upgrade" in m and "still locked" in m for m in messages(log_events))


def test_replace_hash_only_if_unchanged(tmp_path: Path) -> None:
    """
    L{replace_hash} leaves the file alone when the old hash is no longer
    there (a password changed meanwhile by C{pop3srv-passwd}).
    """
    old, new = cheap(), cheap(password="n")
    path = write(tmp_path / "users", f"alice:{cheap(password='changed')}\n")
    before = path.read_bytes()
    assert replace_hash(path, "alice", old, new) is False
    assert path.read_bytes() == before
    path.write_text(f"alice:{old}\n")
    assert replace_hash(path, "alice", old, new) is True
    assert path.read_text() == f"alice:{new}\n"


def test_upgrade_changes_only_the_line_of_the_label_that_matched(tmp_path: Path) -> None:
    """
    The same hash on an app-password line and a main-password line (one
    password used twice): the upgrade after a main-password login changes
    the main line only, though the app line comes first; L{replace_hash}
    with the app label changes the app line only.
    """
    old = OPENSSL_APR1
    path = write(tmp_path / "users", f"alice:{old}:app=phone\nalice:{old}\n")
    result, upgraded = verify_and_upgrade(UserFile(path), "alice", PASSWORD)
    assert (result.ok, result.label, upgraded) == (True, None, True)
    assert result.upgrade_hash is not None
    assert path.read_text() == f"alice:{old}:app=phone\nalice:{result.upgrade_hash}\n"
    new = cheap(password="n")
    assert replace_hash(path, "alice", old, new, label="tablet") is False
    assert replace_hash(path, "alice", old, new, label="phone") is True
    assert path.read_text() == f"alice:{new}:app=phone\nalice:{result.upgrade_hash}\n"


def test_scram_hash_is_never_upgraded(tmp_path: Path) -> None:
    """
    A scram hash is left as it is even if passlib finds it weak: an argon2
    hash in its place would break SCRAM.
    """
    path = write(tmp_path / "users", f"alice:{cheap_scram()}\n")
    before = path.read_bytes()
    assert UserFile(path).verify_detailed("alice", PASSWORD) == VerifyResult(ok=True)
    assert path.read_bytes() == before


def test_set_password_app_and_both_kinds(tmp_path: Path) -> None:
    """
    L{set_password} adds an app password, sets a main password as a pair of
    lines (argon2 and scram), replaces both on change, and
    L{delete_app_password} revokes one app password only.
    """
    path = write(tmp_path / "users", f"bob:{cheap()}\nalice:{cheap()}:uid\n")
    assert set_password(path, "alice", [cheap(password="p1")], "phone") is True
    assert set_password(path, "alice", [cheap(password="m2"), cheap_scram("m2")]) is False
    lines = path.read_text().splitlines()
    assert lines[0].startswith("bob:")
    assert lines[1].startswith("alice:$5$") and lines[1].endswith(":uid")
    assert lines[2].startswith("alice:$scram$") and lines[2].endswith(":uid")
    assert lines[3].endswith(":app=phone")
    users = UserFile(path)
    assert users.verify_detailed("alice", "m2") == VerifyResult(ok=True)
    assert scram_keys_match(users, "alice", "m2")
    assert users.verify_detailed("alice", "p1").label == "phone"
    assert set_password(path, "alice", [cheap(password="m3")]) is False
    assert path.read_text().count("$scram$") == 0
    assert delete_app_password(path, "alice", "phone") is True
    assert delete_app_password(path, "alice", "phone") is False
    users = UserFile(path)
    assert users.verify("alice", "m3") and not users.verify("alice", "p1")
    assert users.verify("bob", PASSWORD)
    with pytest.raises(ValueError, match="one scram and one other"):
        set_password(path, "alice", [cheap(), cheap()])


def test_set_main_pop3_toggles(tmp_path: Path) -> None:
    """
    L{set_main_pop3} adds and removes C{nopop3} on every main-password line
    and leaves app lines alone; a user with no main password is reported.
    """
    text = f"alice:{cheap()}::x\nalice:{cheap_scram()}\nalice:{cheap(password='a')}:app=p\n"
    path = write(tmp_path / "users", text)
    assert set_main_pop3(path, "alice", usable=False)
    assert path.read_text().count(":nopop3") == 2
    assert not UserFile(path).verify("alice", PASSWORD)
    assert UserFile(path).verify("alice", "a")
    assert set_main_pop3(path, "alice", usable=True)
    assert path.read_text() == text
    write(path, f"carol:{cheap()}:app=p\n")
    assert set_main_pop3(path, "carol", usable=False) is False


def test_set_user_hash_ignores_app_lines(tmp_path: Path) -> None:
    """
    L{set_user_hash} changes the main password line, not an app password
    line before it.
    """
    app, main, new = cheap(password="a"), cheap(), cheap(password="n")
    path = write(tmp_path / "users", f"alice:{app}:app=x\nalice:{main}\n")
    assert set_user_hash(path, "alice", new) is False
    assert path.read_text() == f"alice:{app}:app=x\nalice:{new}\n"
