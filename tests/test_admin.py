"""
Tests for L{pop3srv.admin.passwd}, the C{pop3srv-passwd} console script.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from passlib.hash import sha256_crypt  # type: ignore[import-untyped]

from pop3srv.admin import passwd as admin
from pop3srv.auth import editor
from pop3srv.auth.userfile import UserFile

OTHER_LINES = (
    "# managed by pop3srv-passwd\n"
    "\n"
    "bob:{bob}:1001:1001::/home/bob::\r\n"
    "  # carol:{{PLAIN}}commented\n"
)

Run = Callable[..., int]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """
    @return: a function running C{main(args)} with C{stdin} as standard
        input, returning the exit status.
    """

    def run_main(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return admin.main(list(args))

    return run_main


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """
    A user file with a comment, a blank line, a CRLF Dovecot-style line for
    bob and an indented comment.
    """
    path = tmp_path / "users"
    path.write_bytes(
        OTHER_LINES.format(bob=sha256_crypt.using(rounds=1000).hash("bob-pw")).encode()
    )
    os.chmod(path, 0o600)
    return path


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """
    @return: stderr, checked to be exactly one line with no traceback.
    """
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pop3srv-passwd: ")
    assert "Traceback" not in err
    return err.strip()


def test_add_creates_file_0640(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Adding a user to a missing file creates it with mode 0640, one argon2id
    line, and the password verifies.
    """
    path = tmp_path / "users"
    assert run("--allow-weak", "--password-stdin", str(path), "alice", stdin="pw one\n") == 0
    assert "Added user 'alice'" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    [line] = path.read_text().splitlines()
    assert line.startswith("alice:$argon2id$")
    assert UserFile(path).verify("alice", "pw one")


def test_add_and_change_preserve_other_lines(
    run: Run, users_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Adding and then changing a user leaves every other line byte-identical,
    keeps the mode, and only the newest password verifies.
    """
    before = users_file.read_bytes()
    assert run("--allow-weak", "--password-stdin", str(users_file), "alice", stdin="first\n") == 0
    after_add = users_file.read_bytes()
    assert after_add.startswith(before)
    assert after_add.count(b"\n") == before.count(b"\n") + 1

    assert run("--allow-weak", "--password-stdin", str(users_file), "alice", stdin="second\n") == 0
    assert "Changed password for user 'alice'" in capsys.readouterr().out
    after_change = users_file.read_bytes()
    assert after_change.startswith(before)
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    users = UserFile(users_file)
    assert users.verify("alice", "second")
    assert not users.verify("alice", "first")
    assert users.verify("bob", "bob-pw")


def test_change_keeps_extra_fields(run: Run, users_file: Path) -> None:
    """
    Changing bob replaces only his hash: his extra fields and CRLF stay.
    """
    before = users_file.read_bytes()
    assert (
        run(
            "--allow-weak",
            "--password-stdin",
            "--scheme",
            "pbkdf2_sha256",
            str(users_file),
            "bob",
            stdin="new\n",
        )
        == 0
    )
    after = users_file.read_bytes()
    [old_line] = [line for line in before.split(b"\n") if line.startswith(b"bob:")]
    [new_line] = [line for line in after.split(b"\n") if line.startswith(b"bob:")]
    assert new_line.startswith(b"bob:$pbkdf2-sha256$")
    assert new_line.endswith(b":1001:1001::/home/bob::\r")
    assert after.replace(new_line, old_line) == before
    assert UserFile(users_file).verify("bob", "new")


def test_delete(run: Run, users_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{--delete} removes the user's line and nothing else; deleting again is
    an error (exit 2, one line).
    """
    before = users_file.read_bytes()
    assert run("--allow-weak", "--password-stdin", str(users_file), "alice", stdin="pw\n") == 0
    assert run("--delete", str(users_file), "alice") == 0
    assert users_file.read_bytes() == before
    capsys.readouterr()
    assert run("--delete", str(users_file), "alice") == 2
    assert error_line(capsys) == f"pop3srv-passwd: {users_file}: no such user 'alice'"


def test_verify(run: Run, users_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{--verify} exits 0 for the right password, 1 for a wrong one and 2
    (with a message) for an unknown user; the file is not changed.
    """
    before = users_file.read_bytes()
    assert run("--verify", "--password-stdin", str(users_file), "bob", stdin="bob-pw\n") == 0
    assert run("--verify", "--password-stdin", str(users_file), "bob", stdin="nope\n") == 1
    capsys.readouterr()
    assert run("--verify", "--password-stdin", str(users_file), "zed", stdin="x\n") == 2
    assert "no such user 'zed'" in error_line(capsys)
    assert users_file.read_bytes() == before


def test_password_stdin_strips_only_newline(run: Run, tmp_path: Path) -> None:
    """
    Only the trailing newline is removed: spaces and a carriage return are
    part of the password.
    """
    path = tmp_path / "users"
    assert (
        run("--allow-weak", "--password-stdin", str(path), "alice", stdin=" sp aces \r\nignored\n")
        == 0
    )
    users = UserFile(path)
    assert users.verify("alice", " sp aces \r")
    assert not users.verify("alice", "sp aces")


def test_prompts_twice(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without C{--password-stdin} the password is asked for twice.
    """
    answers = iter(["typed", "typed"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(admin.getpass, "getpass", fake_getpass)
    path = tmp_path / "users"
    assert run("--allow-weak", str(path), "alice") == 0
    assert prompts == ["Password: ", "Retype password: "]
    assert UserFile(path).verify("alice", "typed")


def test_prompt_mismatch(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Two different answers are an error and nothing is written.
    """
    answers = iter(["one", "two"])
    monkeypatch.setattr(admin.getpass, "getpass", lambda prompt="": next(answers))
    path = tmp_path / "users"
    assert run(str(path), "alice") == 2
    assert error_line(capsys) == "pop3srv-passwd: passwords do not match"
    assert not path.exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "user name is empty"),
        ("a/b", "must not contain '/'"),
        ("a:b", "must not contain ':'"),
        ("..", "'..'"),
        ("a\x01", "control characters"),
        ("a\nb", "whitespace"),
        ("a b", "whitespace"),
        ("x" * 256, "255 octets"),
    ],
)
def test_bad_username(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, reason: str
) -> None:
    """
    An invalid user name is exit 2 with a one-line reason, and no file is
    created.
    """
    path = tmp_path / "users"
    assert run("--password-stdin", str(path), name, stdin="pw\n") == 2
    line = error_line(capsys)
    assert reason in line
    assert not path.exists()


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--password-stdin", "FILE", "alice"], "\n", "empty password"),
        (["--password-stdin", "FILE", "alice"], "", "empty password"),
        (["--scheme", "md5_crypt", "FILE", "alice"], "", "invalid choice: 'md5_crypt'"),
        (["--delete", "--verify", "FILE", "alice"], "", "not allowed with argument"),
        (["--delete", "--scheme", "bcrypt", "FILE", "alice"], "", "--scheme only applies"),
        (["FILE"], "", "required: USER"),
        (["--verify", "--password-stdin", "MISSING", "alice"], "x\n", "No such file or directory"),
        (["--delete", "MISSING", "alice"], "", "No such file or directory"),
        (["--allow-weak", "--password-stdin", "FILE", "alice"], "\udcff\n", "codec can't encode"),
        (["--password-stdin", "FILE", "alice"], "alice2024\n", "password is too weak"),
        (
            ["--min-score", "4", "--password-stdin", "FILE", "alice"],
            "alicewonderland77\n",
            "need 4",
        ),
        (["--app", "a b", "FILE", "alice"], "", "app password label"),
        (
            ["--app", "x", "--password-stdin", "FILE", "alice"],
            "pw\n",
            "app passwords are generated",
        ),
        (["--app", "x", "--no-pop3-main", "FILE", "alice"], "", "concern the main password"),
        (["--app", "nope", "--delete", "FILE", "bob"], "", "has no app password 'nope'"),
        (["--no-pop3-main", "FILE", "zed"], "", "has no main password"),
        (
            ["--scheme", "scram", "--scheme", "scram", "FILE", "alice"],
            "",
            "--scheme may be given twice",
        ),
        (["--no-pop3-main", "--scheme", "scram", "FILE", "alice"], "", "--scheme only applies"),
        (["--min-score", "5", "FILE", "alice"], "", "invalid choice"),
    ],
)
def test_usage_errors(
    run: Run,
    users_file: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    stdin: str,
    message: str,
) -> None:
    """
    Usage errors, bad input and missing files are one line on stderr and
    exit status 2, and leave the file alone.
    """
    before = users_file.read_bytes()
    missing = users_file.parent / "missing"
    argv = [str(users_file) if a == "FILE" else str(missing) if a == "MISSING" else a for a in args]
    assert run(*argv, stdin=stdin) == 2
    assert message in error_line(capsys)
    assert users_file.read_bytes() == before
    assert not missing.exists()


def test_write_is_atomic(run: Run, users_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The change is made by renaming a complete temporary file from the same
    directory over the original; no temporary file is left behind.
    """
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        assert Path(src).read_bytes().endswith(b"\n")
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(editor.os, "replace", spy)
    assert run("--allow-weak", "--password-stdin", str(users_file), "alice", stdin="pw\n") == 0
    [(src, dst)] = renames
    assert Path(src).parent == users_file.parent
    assert dst == str(users_file)
    assert sorted(p.name for p in users_file.parent.iterdir()) == ["users", "users.lock"]


def test_console_script(tmp_path: Path) -> None:
    """
    The installed C{pop3srv-passwd} console script works end to end: add,
    verify (match and mismatch), and a bad name as a one-line error.
    """
    script = Path(sys.executable).parent / "pop3srv-passwd"
    path = tmp_path / "users"

    def script_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], input=stdin, capture_output=True, text=True, timeout=60
        )

    added = script_run(
        "--allow-weak",
        "--password-stdin",
        "--scheme",
        "pbkdf2_sha256",
        str(path),
        "alice",
        stdin="pw\n",
    )
    assert added.returncode == 0, added.stderr
    assert path.read_text().startswith("alice:$pbkdf2-sha256$")
    assert (
        script_run("--verify", "--password-stdin", str(path), "alice", stdin="pw\n").returncode == 0
    )
    assert (
        script_run("--verify", "--password-stdin", str(path), "alice", stdin="no\n").returncode == 1
    )
    bad = script_run("--password-stdin", str(path), "a/b", stdin="pw\n")
    assert bad.returncode == 2
    assert bad.stderr == "pop3srv-passwd: user name must not contain '/'\n"


STRONG = "correct horse battery staple"


def test_weak_password_refused_with_one_line(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A weak password is refused with one line saying why (zxcvbn's score and
    hint) and nothing is written; C{--allow-weak} accepts it; a strong one
    passes.
    """
    path = tmp_path / "users"
    assert run("--password-stdin", str(path), "alice", stdin="password1\n") == 2
    line = error_line(capsys)
    assert line.startswith("pop3srv-passwd: password is too weak (zxcvbn score ")
    assert "--allow-weak" in line
    assert not path.exists()
    assert run("--allow-weak", "--password-stdin", str(path), "alice", stdin="password1\n") == 0
    assert run("--password-stdin", str(path), "bob", stdin=STRONG + "\n") == 0
    assert UserFile(path).verify("bob", STRONG)


def test_user_name_is_a_hint(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    The user name is given to zxcvbn, so a password built on it scores lower
    for that user than for another.
    """
    path = tmp_path / "users"
    password = "qzxalice-qzxalice\n"
    assert run("--min-score", "4", "--password-stdin", str(path), "bob", stdin=password) == 0
    assert run("--min-score", "4", "--password-stdin", str(path), "qzxalice", stdin=password) == 2
    assert "too weak" in error_line(capsys)


def test_min_score_zero_accepts_anything(run: Run, tmp_path: Path) -> None:
    """
    C{--min-score 0} accepts even a trivial password.
    """
    assert (
        run("--min-score", "0", "--password-stdin", str(tmp_path / "u"), "alice", stdin="a\n") == 0
    )


def test_scheme_scram_and_pair(run: Run, tmp_path: Path) -> None:
    """
    C{--scheme scram} writes a scram line; giving C{--scheme} twice writes an
    argon2 and a scram line for the same password, which then serves both
    clear-text logins and SCRAM.
    """
    path = tmp_path / "users"
    assert (
        run("--password-stdin", "--scheme", "scram", str(path), "alice", stdin=STRONG + "\n") == 0
    )
    assert path.read_text().startswith("alice:$scram$")
    assert (
        run(
            "--password-stdin",
            "--scheme",
            "pbkdf2_sha256",
            "--scheme",
            "scram",
            str(path),
            "alice",
            stdin="another " + STRONG + "\n",
        )
        == 0
    )
    lines = path.read_text().splitlines()
    assert [line.split("$")[1] for line in lines] == ["pbkdf2-sha256", "scram"]
    users = UserFile(path)
    assert users.verify("alice", "another " + STRONG)
    assert users.scram_lookup("alice") is not None


def test_app_password_lifecycle(
    run: Run, users_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    C{--app LABEL} prints a generated password once and stores only its
    hash; it verifies with its label reported; C{--app LABEL --delete}
    revokes it and leaves other lines alone.
    """
    before = users_file.read_bytes()
    assert run("--app", "phone", str(users_file), "bob") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "New app password 'phone' for user 'bob':"
    password = out[1]
    assert len(password) == 23 and password.count("-") == 3
    assert out[2] == "It is shown only this once."
    text = users_file.read_text()
    assert password not in text
    assert text.rstrip("\n").endswith(":app=phone")
    assert run("--verify", "--password-stdin", str(users_file), "bob", stdin=password + "\n") == 0
    assert capsys.readouterr().out == "Password matches (app password 'phone').\n"
    assert (
        run(
            "--verify",
            "--app",
            "other",
            "--password-stdin",
            str(users_file),
            "bob",
            stdin=password + "\n",
        )
        == 1
    )
    assert UserFile(users_file).verify("bob", "bob-pw")
    assert run("--app", "phone", "--delete", str(users_file), "bob") == 0
    assert "Revoked app password 'phone' of user 'bob'." in capsys.readouterr().out
    assert users_file.read_bytes() == before
    assert not UserFile(users_file).verify("bob", password)


def test_generated_app_passwords_differ() -> None:
    """
    Generated app passwords are fresh each time and use the unambiguous
    alphabet.
    """
    made = {admin.generate_app_password() for _ in range(20)}
    assert len(made) == 20
    assert all(set(p) <= set(admin._APP_ALPHABET + "-") for p in made)


def test_no_pop3_main(run: Run, users_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{--no-pop3-main} stops the main password logging in while app
    passwords work; C{--pop3-main} undoes it byte for byte.
    """
    before = users_file.read_bytes()
    assert run("--app", "mail", str(users_file), "bob") == 0
    app_password = capsys.readouterr().out.splitlines()[1]
    with_app = users_file.read_bytes()
    assert run("--no-pop3-main", str(users_file), "bob") == 0
    assert "now not usable for POP3" in capsys.readouterr().out
    users = UserFile(users_file)
    assert not users.verify("bob", "bob-pw")
    assert users.verify_detailed("bob", app_password).label == "mail"
    assert run("--pop3-main", str(users_file), "bob") == 0
    assert users_file.read_bytes() == with_app
    assert with_app.startswith(before)
