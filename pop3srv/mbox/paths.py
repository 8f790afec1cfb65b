# -*- test-case-name: tests.test_mbox_index -*-
"""
Names of the state files pop3srv keeps for one mbox.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatePaths:
    """
    Where the state files of one mbox live.

    @ivar mbox: absolute path of the mbox.
    @ivar index: the persisted index.
    @ivar lock: the one-session-per-maildrop lock file.
    @ivar journal: the commit journal.
    """

    mbox: str
    index: str
    lock: str
    journal: str


def state_paths(mbox_path: str, index_dir: str | None = None) -> StatePaths:
    """
    Derive the state file names for C{mbox_path}.

    Beside the mbox they are hidden files named after it; in a shared
    C{index_dir} the name also carries a hash of the absolute path, so two
    mboxes with the same basename do not collide.

    @param mbox_path: the mbox file.
    @param index_dir: a directory for state files, or L{None} for "beside
        the mbox".
    @return: the paths.
    """
    mbox = os.path.abspath(mbox_path)
    directory, base = os.path.split(mbox)
    if index_dir is None:
        stem = os.path.join(directory, f".{base}")
    else:
        tag = hashlib.blake2b(os.fsencode(mbox), digest_size=10).hexdigest()
        stem = os.path.join(os.path.abspath(index_dir), f"{tag}-{base}")
    return StatePaths(
        mbox=mbox,
        index=f"{stem}.pop3srv-index",
        lock=f"{stem}.pop3srv-lock",
        journal=f"{stem}.pop3srv-journal",
    )


def fsync_dir(path: str) -> None:
    """
    Make a rename or unlink in directory C{path} durable.

    @param path: a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(paths: StatePaths) -> list[str]:
    """
    Remove temporary index and journal files a killed process left.

    Only a holder of the session lock writes them, so the caller must hold
    it; then every such file is debris.

    @return: the paths removed.
    """
    removed = []
    for target in (paths.index, paths.journal):
        directory, base = os.path.split(target)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(f"{base}.") and name.endswith(".tmp"):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                except OSError:
                    continue
                removed.append(path)
    return removed
