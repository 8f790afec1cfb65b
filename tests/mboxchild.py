"""
Opening a maildrop in a child process whose memory and time are bounded,
for tests that plant state files a careless server would read for ever
(C{/dev/zero}) or block on (a FIFO).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_OPEN_IN_CHILD = """
import resource, sys
# A read of /dev/zero must fail here, not grow until the machine swaps.
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pop3srv.core.errors import MaildropUnavailable
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.testing import synchronous_defer_to_thread
try:
    mb = open_maildrop(sys.argv[1], defer_to_thread=synchronous_defer_to_thread, lock_timeout=2)
except MaildropUnavailable as e:
    print("unavailable", type(e).__name__)
else:
    print("opened", len(mb.listMessages()))
    mb.close()
"""


def open_in_child(mbox: Path, timeout: float = 30) -> str:
    """
    Open the maildrop C{mbox} in a child process limited to 1 GiB of
    address space and C{timeout} seconds.

    @return: C{"opened N"} (N messages) or C{"unavailable ErrorClass"};
        a traceback or a timeout fails the calling test.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _OPEN_IN_CHILD, str(mbox)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()
