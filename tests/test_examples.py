"""
The README's examples, run for real: the embedding example serves POP3 from a
plain Twisted program, and the checker plugin example works with twistd.
"""

from __future__ import annotations

import os
import poplib
import re
import subprocess
import sys
import time
from pathlib import Path

from livepop3 import PASSWORDS, Pop3Server, free_port, write_mbox

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    """The code block that follows C{<!-- example: name -->} in the README."""
    match = re.search(
        rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S
    )
    assert match, f"README has no example {name!r}"
    return match.group(1)


def wait_for_greeting(port: int, process: subprocess.Popen[bytes]) -> poplib.POP3:
    """Connect to C{port} once the server answers (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()
        try:
            return poplib.POP3("127.0.0.1", port, timeout=10)
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)


def test_embedding_example(tmp_path: Path, users_file: Path) -> None:
    """The embedding example, pointed at a temporary user file and mbox, serves mail."""
    users = users_file
    (tmp_path / "mail").mkdir()
    write_mbox(tmp_path / "mail" / "alice", [b"Subject: embedded\n\nhi\n"])
    port = free_port()
    code = (
        example("embed")
        .replace("/var/mail/{user}", f"{tmp_path}/mail/{{user}}")
        .replace("/etc/pop3srv/users", str(users))
        .replace("tcp:1110:", f"tcp:{port}:")
    )
    script = tmp_path / "embed.py"
    script.write_text(code)
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = wait_for_greeting(port, process)
        client.user("alice")
        client.pass_(PASSWORDS["alice"])
        assert client.retr(1)[1] == [b"Subject: embedded", b"", b"hi"]
        client.quit()
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_checker_plugin_example(tmp_path: Path) -> None:
    """The example plugin is listed by --help-auth and logs users in under twistd."""
    plugins = tmp_path / "plugins" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "token_checker.py").write_text(example("checker-plugin"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "plugins")}
    twistd = str(Path(sys.executable).with_name("twistd"))
    listing = subprocess.run(
        [twistd, "pop3srv", "--help-auth"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "token" in listing.stdout
    server = Pop3Server(tmp_path)
    write_mbox(server.mail / "carol", [b"Subject: token\n\nok\n"])
    argv = server.argv()
    argv[argv.index(f"passlib:{server.users}")] = "token:s3cret-token"
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        client = wait_for_greeting(server.port, process)
        client.user("carol")
        client.pass_("s3cret-token")
        assert client.stat()[0] == 1
        client.quit()
    finally:
        process.terminate()
        process.communicate(timeout=10)
