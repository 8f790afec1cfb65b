# -*- test-case-name: tests.test_mbox_sweep -*-
"""
Start-up clean-up of the mail spool after a crash: dotlocks left by dead
pop3srv processes of this host are removed (so deliveries are not held up
until the lock ages out), so are temporary dotlock files a failed write (a
full disk) or a kill left behind, and interrupted commits are finished (so
local mail readers do not see a half-applied mbox until the user's next
login).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from twisted.logger import Logger

from pop3srv.core.errors import Pop3Error
from pop3srv.mbox.commit import recover
from pop3srv.mbox.lock import STALE_AGE, MboxFileLock, left_by_dead_local_process
from pop3srv.mbox.paths import remove_stale_dotlock_temps, state_paths

_log = Logger()
USER_FIELD = "{user}"
JOURNAL_SUFFIX = ".pop3srv-journal"


@dataclass
class SweepReport:
    """What a sweep did."""

    removed_dotlocks: list[str] = field(default_factory=list)
    removed_temps: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)


def _candidate_users(names: list[str], base: str) -> set[str]:
    """
    The users whose mbox a journal name in C{names} may belong to.

    @param names: file names in the journal directory.
    @param base: the template's last component, such as C{{user}} or
        C{{user}.mbox}: a journal is named after the mbox, so the text
        around the user is stripped as the template puts it there.
    """
    # Every {user} in the name is the same user.
    parts = [re.escape(part) for part in base.split(USER_FIELD)]
    mbox_name = re.compile(parts[0] + "(?P<user>.+)" + "(?P=user)".join(parts[1:]))
    users = set()
    for name in names:
        if name.endswith(JOURNAL_SUFFIX):
            stem = name[: -len(JOURNAL_SUFFIX)]
            # Beside the mbox: ".MBOX"; in an index dir: "<hash>-MBOX".
            mbox = stem[1:] if stem.startswith(".") else stem.partition("-")[2]
            match = mbox_name.fullmatch(mbox)
            if match is not None:
                users.add(match["user"])
    return {u for u in users if u not in (".", "..") and "/" not in u}


def sweep_spool(
    template: str, index_dir: str | None = None, *, temp_age: float = STALE_AGE
) -> SweepReport:
    """
    Clean up after a crash, for mboxes named by C{template}.  Blocking: run
    it in a thread.  Only a template whose C{{user}} is in the last path
    component names a spool directory that can be swept.

    @param template: the mailbox path template.
    @param index_dir: where the state files are, if not beside the mboxes.
    @param temp_age: seconds after which a temporary dotlock file
        (C{.NAME.lock.<32 hex>}, regular, ours) is debris.
    """
    report = SweepReport()
    spool, base = os.path.split(template)
    if USER_FIELD in spool or USER_FIELD not in base:
        return report
    hostname = socket.gethostname()
    try:
        names = os.listdir(spool)
    except OSError as e:
        _log.warn("Cannot sweep mail spool {spool}: {error}", spool=spool, error=e)
        return report
    for name in names:
        if name.endswith(".lock") or ".lock." in name:
            path = os.path.join(spool, name)
            if left_by_dead_local_process(path, hostname):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                report.removed_dotlocks.append(path)
                _log.info("Removed dotlock {path} left by a dead pop3srv", path=path)
    # A temporary file whose write failed holds no pid to judge by: its age
    # says it is debris.
    for path in remove_stale_dotlock_temps(spool, temp_age):
        report.removed_temps.append(path)
        _log.info("Removed a dotlock temporary file left behind: {path}", path=path)
    journal_dir = index_dir if index_dir is not None else spool
    try:
        journal_names = [n for n in os.listdir(journal_dir) if n.endswith(JOURNAL_SUFFIX)]
    except OSError:
        journal_names = []
    for user in sorted(_candidate_users(journal_names, base)):
        mbox = template.replace(USER_FIELD, user)
        paths = state_paths(mbox, index_dir)
        if not os.path.lexists(paths.journal):
            continue
        try:
            with MboxFileLock(mbox, timeout=5):
                if recover(mbox, paths.journal):
                    report.recovered.append(mbox)
        except (OSError, Pop3Error) as e:
            _log.warn("Could not finish the interrupted commit of {path}: {error}",
                      path=mbox, error=e)  # fmt: skip
    return report
