# -*- test-case-name: tests.test_systemd -*-
"""
Tell systemd how the service is doing (the C{sd_notify} protocol of
C{Type=notify} units), with the standard library only.

The service manager gives the main process the address of a datagram socket
in C{$NOTIFY_SOCKET}; each state is one datagram of C{KEY=value} lines.
L{Notifier.from_environment} takes the address out of the environment, so
that no child (workers, hashing processes, both forks) inherits it: with
C{NotifyAccess=main} systemd would log a warning for each message a child
sent.  A notifier also sends only from the process that made it.

Without C{$NOTIFY_SOCKET} (not under systemd, or not C{Type=notify}) every
call does nothing.  A failure to send is logged once and never stops the
server: systemd then reports the start as timed out, which says enough.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

from twisted.logger import Logger

_log = Logger()


class Notifier:
    """
    Sends state changes to the service manager.

    @ivar address: the socket address (a path, or an abstract name starting
        with a NUL byte), or L{None} when there is nobody to tell.
    """

    def __init__(self, address: str | bytes | None, pid: int | None = None) -> None:
        self.address = address
        self._pid = os.getpid() if pid is None else pid
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """
        The notifier C{$NOTIFY_SOCKET} names, removed from the environment.
        Call it in the main process before it forks any child.
        """
        env = os.environ if environ is None else environ
        raw = env.pop("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@"):
            # An abstract socket: systemd spells its leading NUL as "@".
            address = b"\0" + raw[1:].encode()
        elif raw:
            # vsock: and other forms are for virtual machines, not services.
            _log.warn("Ignoring NOTIFY_SOCKET={raw!r}: not a Unix socket", raw=raw)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to tell, from this process."""
        return self.address is not None and os.getpid() == self._pid

    def notify(self, **fields: str | int) -> bool:
        """
        Send one message, e.g. C{notify(READY=1, STATUS="serving")}.

        @return: whether it was sent.
        """
        if not self.enabled or not fields:
            return False
        assert self.address is not None
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # The manager reads its socket at once; never wait for it on
                # the reactor thread.
                s.setblocking(False)
                s.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                _log.error(
                    "Cannot notify the service manager at {address!r}: {error}",
                    address=self.address,
                    error=e,
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Every listener is bound: start-up is over (C{READY=1})."""
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def reloading(self) -> bool:
        """
        A reload (SIGHUP) has begun; L{ready} ends it.  C{MONOTONIC_USEC}
        lets systemd 253 and later (C{Type=notify-reload}) match it to the
        reload it asked for; older ones ignore it.
        """
        return self.notify(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self) -> bool:
        """The server is on its way down (C{STOPPING=1})."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """A one-line status for C{systemctl status}."""
        return self.notify(STATUS=text)
