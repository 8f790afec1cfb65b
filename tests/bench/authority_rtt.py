"""
The round trip a login adds with C{--workers N}: a child's BeginLogin and
EndLogin answered by the parent's policy authority over AMP
(L{pop3srv.processes.authorityrpc}), as a server process asks it on every
login.

Two processes, as in the server: this one is the child (a
L{RemoteAuthority} on a L{RelayClient}), a fork of it the parent (a
L{WorkerConnection} over a L{LocalAuthority}), joined by a UNIX socket
pair.  The calls go one after another, each login's BeginLogin then its
EndLogin, and each pair is timed from the first question to the last
answer.  The same pair asked of a L{LocalAuthority} in this process is the
baseline (what a single server process pays).

    .venv/bin/python tests/bench/authority_rtt.py                 # 5000 logins
    .venv/bin/python tests/bench/authority_rtt.py --calls 20000 --json

Prints the median, p99 and mean in microseconds; C{--json} prints them as
one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import time
from typing import Any

#: Logins timed before the measured ones (imports, allocator, caches).
WARM_UP = 200


def percentile(samples: list[float], fraction: float) -> float:
    """The C{fraction} quantile of C{samples} (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p99 and mean of C{samples} (seconds), in microseconds."""
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": percentile(samples, 0.99) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
    }


def _authority() -> Any:
    """A parent's authority with the default limits, on the global reactor."""
    from twisted.internet import reactor

    from pop3srv.server.authority import LocalAuthority
    from pop3srv.server.limits import ConnectionLimits, ThrottleSettings

    return LocalAuthority(ThrottleSettings(), ConnectionLimits(), clock=reactor)


def _serve_parent(sock: socket.socket) -> None:
    """The parent's end, in the forked process: answer until the child goes."""
    from twisted.internet import reactor

    from pop3srv.processes.authorityrpc import WorkerConnection
    from pop3srv.processes.rpc import connect

    class Parent(WorkerConnection):
        def connectionLost(self, reason: Any = None) -> None:
            super().connectionLost(reason)
            reactor.stop()  # type: ignore[attr-defined]

    connect(reactor, sock, Parent({}, _authority()))
    reactor.run()  # type: ignore[attr-defined]


def measure_local(calls: int) -> list[float]:
    """BeginLogin then EndLogin on a L{LocalAuthority} in this process."""
    authority = _authority()
    samples = []
    for i in range(WARM_UP + calls):
        started = time.perf_counter()
        tickets: list[Any] = []
        authority.begin_login("192.0.2.1", f"user{i % 100}").addCallback(tickets.append)
        authority.end_login(tickets[0], "succeeded")
        if i >= WARM_UP:
            samples.append(time.perf_counter() - started)
    return samples


def fork_parent() -> tuple[int, socket.socket]:
    """
    Fork the process that plays the parent, before this one loads a
    reactor (a fork must not inherit one).

    @return: its pid, and our end of the socket pair to it.
    """
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("fork the parent before loading the reactor")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            _serve_parent(theirs)
        finally:
            os._exit(0)
    theirs.close()
    return pid, ours


def measure_remote(pid: int, ours: socket.socket, calls: int) -> list[float]:
    """
    BeginLogin then EndLogin from this process to the forked parent's
    authority (L{fork_parent}), one login after another.
    """
    from twisted.internet import reactor

    from pop3srv.processes.authorityrpc import RemoteAuthority
    from pop3srv.processes.hashrelay import RelayClient
    from pop3srv.processes.rpc import connect
    from pop3srv.server.limits import ThrottleSettings

    client = RelayClient()
    connect(reactor, ours, client)
    remote = RemoteAuthority(client, ThrottleSettings())
    samples: list[float] = []
    failures: list[Any] = []

    def one(i: int) -> None:
        if i == WARM_UP + calls:
            reactor.stop()  # type: ignore[attr-defined]
            return
        started = time.perf_counter()

        def ended(_: object) -> None:
            if i >= WARM_UP:
                samples.append(time.perf_counter() - started)
            one(i + 1)

        def failed(failure: Any) -> None:
            failures.append(failure)
            reactor.stop()  # type: ignore[attr-defined]

        d = remote.begin_login("192.0.2.1", f"user{i % 100}")
        d.addCallback(lambda ticket: remote.end_login(ticket, "succeeded"))
        d.addCallbacks(ended, failed)

    reactor.callWhenRunning(one, 0)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if client.transport is not None:
        client.transport.loseConnection()
    if failures:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if failures:
        failures[0].raiseException()
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--calls", type=int, default=5000, help="logins timed (after a warm-up)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    pid, ours = fork_parent()
    remote = summary(measure_remote(pid, ours, args.calls))
    local = summary(measure_local(args.calls))
    result = {
        "calls": args.calls,
        "local": local,
        "amp": remote,
        "added_median_us": remote["median_us"] - local["median_us"],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"BeginLogin + EndLogin, {args.calls} logins one after another:")
    for name, figures in (("in process", local), ("over AMP to the parent", remote)):
        print(
            f"  {name:24} median {figures['median_us']:7.1f} us   "
            f"p99 {figures['p99_us']:7.1f} us   mean {figures['mean_us']:7.1f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
