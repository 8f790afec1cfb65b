"""Tests for the start-up sweep of the mail spool (stale dotlocks, interrupted commits)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from test_mbox_commit import SimulatedCrash, _message, _open, _sync

from pop3srv.mbox.paths import state_paths
from pop3srv.mbox.sweep import sweep_spool


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_removes_only_our_dead_dotlocks(tmp_path: Path) -> None:
    """Our host's dotlock with a dead pid goes; live, foreign and MDA locks stay."""
    host = socket.gethostname()
    ours_dead = tmp_path / "alice.lock"
    ours_dead.write_text(f"{dead_pid()} {host}\n")
    temp_dead = tmp_path / ".bob.lock.0123abcd"
    temp_dead.write_text(f"{dead_pid()} {host}\n")
    ours_alive = tmp_path / "carol.lock"
    ours_alive.write_text(f"{__import__('os').getpid()} {host}\n")
    foreign = tmp_path / "dave.lock"
    foreign.write_text(f"{dead_pid()} otherhost.example\n")
    mda = tmp_path / "erin.lock"
    mda.write_text("")
    report = sweep_spool(f"{tmp_path}/{{user}}")
    assert sorted(report.removed_dotlocks) == sorted([str(ours_dead), str(temp_dead)])
    assert ours_alive.exists() and foreign.exists() and mda.exists()


def test_finishes_interrupted_commit(tmp_path: Path) -> None:
    """A journal left by a crash is applied at start-up, without any login."""
    mbox = tmp_path / "alice"
    messages = [_message(f"m{i}") for i in range(3)]
    mbox.write_bytes(b"".join(messages))

    def crash(where: str) -> None:
        if where == "payload_partial":
            raise SimulatedCrash(where)

    mb = _open(mbox)
    mb._fault = crash
    mb.deleteMessage(0)
    _sync(mb)
    mb.close()
    assert Path(state_paths(str(mbox)).journal).exists()
    report = sweep_spool(f"{tmp_path}/{{user}}")
    assert report.recovered == [str(mbox)]
    assert mbox.read_bytes() == b"".join(messages[1:])


def test_template_with_user_directory_is_left_alone(tmp_path: Path) -> None:
    """A template like /home/{user}/mbox names no single spool: nothing is swept."""
    (tmp_path / "x.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    assert sweep_spool(f"{tmp_path}/{{user}}/mbox").removed_dotlocks == []


def test_finishes_interrupted_commit_with_text_around_user(tmp_path: Path) -> None:
    """
    With a template such as C{/srv/{user}.mbox} the user is found in the
    journal's name without the template's text around it, and the commit
    is finished at start-up; a journal of a name the template cannot make
    is not taken for a user's.
    """
    mbox = tmp_path / "bob.mbox"
    messages = [_message(f"m{i}") for i in range(3)]
    mbox.write_bytes(b"".join(messages))

    def crash(where: str) -> None:
        if where == "payload_partial":
            raise SimulatedCrash(where)

    mb = _open(mbox)
    mb._fault = crash
    mb.deleteMessage(0)
    _sync(mb)
    mb.close()
    assert Path(state_paths(str(mbox)).journal).exists()
    stray = tmp_path / ".carol.pop3srv-journal"
    stray.write_bytes(b"")
    report = sweep_spool(f"{tmp_path}/{{user}}.mbox")
    assert report.recovered == [str(mbox)]
    assert mbox.read_bytes() == b"".join(messages[1:])
    assert stray.exists() and not (tmp_path / "carol.mbox").exists()
