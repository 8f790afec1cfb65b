"""
An asyncio POP3 load generator for benchmarks (standard library only).

Every scenario talks to 127.0.0.1 only and is bounded in time and count.
Each returns a dict of measurements.  L{run.py} drives them; they can also
be run alone, e.g.:

    python tests/bench/loadgen.py flood --port 1110 --users users.txt --clients 20 --seconds 10
    python tests/bench/loadgen.py download --port 1110 --user mixed --password pw
    python tests/bench/loadgen.py probe --port 1110 --user x --password pw --seconds 10

C{probe} is the NOOP latency prober: it runs in its own process (so the
load generator's event loop cannot delay it), logs in, prints C{ready},
waits for a line on stdin, then sends a NOOP every C{--interval} seconds
for C{--seconds} and prints one JSON line of latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
TERMINATOR = b"\r\n.\r\n"
READ_SIZE = 256 * 1024
MB = 1_000_000
MiB = 1 << 20


class Pop3Error(Exception):
    pass


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise this process's descriptor limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], q: float) -> float:
    """The C{q}-th percentile (0-100) by nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Client:
    """A minimal POP3 client on asyncio streams, for request/response use."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int, timeout: float = 30.0) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, limit=READ_SIZE * 4), timeout
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer)
        greeting = await asyncio.wait_for(client.line(), timeout)
        if not greeting.startswith(b"+OK"):
            client.close()
            raise Pop3Error(f"greeting: {greeting!r}")
        return client

    async def _more(self) -> None:
        data = await self.reader.read(READ_SIZE)
        if not data:
            raise Pop3Error("connection closed by server")
        self.buf += data

    async def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            if len(self.buf) > 65536:
                raise Pop3Error("status line too long")
            await self._more()

    async def cmd(self, text: str) -> bytes:
        """Send one command, return its status line; raise on -ERR."""
        self.writer.write(text.encode() + b"\r\n")
        reply = await self.line()
        if not reply.startswith(b"+OK"):
            raise Pop3Error(f"{text.split()[0]}: {reply!r}")
        return reply

    async def multiline(self) -> int:
        """
        Consume a multi-line body up to and including its terminator;
        return the octets received (dot-stuffed, with the terminator).
        """
        total = 0
        tail = b"\r\n"  # the status line's CRLF: an empty body is just ".\r\n"
        while True:
            if self.buf:
                chunk = bytes(self.buf)
                self.buf.clear()
            else:
                chunk = await self.reader.read(READ_SIZE)
                if not chunk:
                    raise Pop3Error("connection closed inside a multi-line reply")
            j = (tail + chunk[:4]).find(TERMINATOR)
            if j >= 0:
                end = j + 5 - len(tail)
            else:
                i = chunk.find(TERMINATOR)
                end = i + 5 if i >= 0 else -1
            if end >= 0:
                total += end
                self.buf += chunk[end:]
                return total
            total += len(chunk)
            tail = (tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]

    async def login(self, user: str, password: str) -> None:
        await self.cmd(f"USER {user}")
        await self.cmd(f"PASS {password}")

    async def quit(self, timeout: float = 60.0) -> None:
        try:
            await asyncio.wait_for(self.cmd("QUIT"), timeout)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: S110 (closing a dead connection may fail; nothing to do)
            pass


# --- process memory ---------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """C{root} and all its descendants."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_memory(root: int) -> dict[str, Any]:
    """Sum of Pss and Rss (MiB) over C{root}'s process tree, from smaps_rollup."""
    pss = rss = 0
    pids = process_tree(root)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return {"pss_mib": pss / 1024, "rss_mib": rss / 1024, "processes": len(pids)}


class MemorySampler:
    """Samples L{tree_memory} in a thread; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak_pss = self.peak_rss = 0.0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = tree_memory(self.root)
            self.peak_pss = max(self.peak_pss, m["pss_mib"])
            self.peak_rss = max(self.peak_rss, m["rss_mib"])
            self.peak_processes = max(self.peak_processes, int(m["processes"]))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --- scenarios --------------------------------------------------------------


@dataclass
class Account:
    user: str
    password: str


async def flood(
    port: int, accounts: Sequence[Account], seconds: float, max_sessions: int = 1_000_000
) -> dict[str, Any]:
    """
    (a) One worker per account, each looping connect, USER, PASS, QUIT until
    C{seconds} pass; sessions/s counts sessions whose QUIT got +OK.
    """
    deadline = time.monotonic() + seconds
    done = errors = 0
    latencies: list[float] = []
    first_error: list[str] = []

    async def worker(account: Account) -> None:
        nonlocal done, errors
        while time.monotonic() < deadline and done + errors < max_sessions:
            t0 = time.monotonic()
            try:
                c = await Client.connect(port)
                try:
                    await asyncio.wait_for(c.login(account.user, account.password), 60)
                    await c.quit()
                finally:
                    c.close()
                done += 1
                latencies.append(time.monotonic() - t0)
            except (OSError, Pop3Error, TimeoutError) as e:
                errors += 1
                if not first_error:
                    first_error.append(repr(e))
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(worker(a) for a in accounts)), seconds + 120)
    elapsed = time.monotonic() - t0
    return {
        "sessions": done,
        "errors": errors,
        "seconds": elapsed,
        "sessions_per_s": done / elapsed,
        "session_p50_ms": percentile(latencies, 50) * 1000,
        "session_p99_ms": percentile(latencies, 99) * 1000,
        "first_error": first_error[0] if first_error else "",
    }


async def download(port: int, account: Account, max_seconds: float = 600.0) -> dict[str, Any]:
    """
    (c, d, f) Log in, LIST, then RETR every message in turn (one request at a
    time, as mail clients do), then QUIT without deleting.  MB/s is wire
    octets received by RETR (10^6 bytes per MB) over the time from the first
    RETR to the last terminator.
    """
    c = await Client.connect(port)
    try:
        await c.login(account.user, account.password)
        c.writer.write(b"LIST\r\n")
        status = await c.line()
        if not status.startswith(b"+OK"):
            raise Pop3Error(f"LIST: {status!r}")
        numbers: list[int] = []
        while True:
            line = await c.line()
            if line == b".":
                break
            numbers.append(int(line.split()[0]))
        total = 0
        t0 = time.monotonic()
        retrieved = 0
        for n in numbers:
            c.writer.write(b"RETR %d\r\n" % n)
            status = await c.line()
            if not status.startswith(b"+OK"):
                raise Pop3Error(f"RETR {n}: {status!r}")
            total += await c.multiline()
            retrieved += 1
            if time.monotonic() - t0 > max_seconds:
                break
        elapsed = time.monotonic() - t0
        await c.quit(timeout=600)
    finally:
        c.close()
    return {
        "messages": retrieved,
        "listed": len(numbers),
        "bytes": total,
        "seconds": elapsed,
        "mb_per_s": total / MB / elapsed if elapsed > 0 else float("nan"),
        "complete": retrieved == len(numbers),
    }


async def connect_stat(port: int, account: Account, timeout: float = 300.0) -> dict[str, Any]:
    """
    (e) Time from connect() to the +OK of STAT: greeting, USER, PASS (hash
    check and maildrop open) and STAT.  QUIT afterwards is not timed.
    """
    t0 = time.monotonic()
    c = await Client.connect(port, timeout)
    try:
        await asyncio.wait_for(c.login(account.user, account.password), timeout)
        reply = await asyncio.wait_for(c.cmd("STAT"), timeout)
        elapsed = time.monotonic() - t0
        await c.quit(timeout=600)
    finally:
        c.close()
    parts = reply.split()
    return {"seconds": elapsed, "messages": int(parts[1]), "octets": int(parts[2])}


async def idle_sessions(
    port: int,
    accounts: Sequence[Account],
    server_pid: int,
    settle: float = 2.0,
    login_concurrency: int = 20,
    max_seconds: float = 300.0,
    noop_rounds: int = 2,
) -> dict[str, Any]:
    """
    (g) Log in one session per account (C{login_concurrency} at a time) and
    keep them open; after C{settle} seconds read the server's memory; then
    send NOOP on each session in turn, one at a time, C{noop_rounds} times,
    for NOOP latency percentiles; then QUIT them all.
    """
    raise_nofile()
    deadline = time.monotonic() + max_seconds
    sessions: list[Client] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(login_concurrency)
    before = tree_memory(server_pid)

    async def open_one(account: Account) -> None:
        async with sem:
            if time.monotonic() > deadline:
                errors.append("deadline")
                return
            try:
                c = await Client.connect(port)
                await asyncio.wait_for(c.login(account.user, account.password), 60)
                sessions.append(c)
            except (OSError, Pop3Error, TimeoutError) as e:
                errors.append(repr(e))

    t0 = time.monotonic()
    await asyncio.gather(*(open_one(a) for a in accounts))
    login_seconds = time.monotonic() - t0
    await asyncio.sleep(settle)
    mem = tree_memory(server_pid)
    latencies: list[float] = []
    for _ in range(noop_rounds):
        for c in sessions:
            if time.monotonic() > deadline + 60:
                break
            t1 = time.perf_counter()
            try:
                await asyncio.wait_for(c.cmd("NOOP"), 30)
            except (OSError, Pop3Error, TimeoutError) as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - t1)
    quit_sem = asyncio.Semaphore(50)

    async def quit_one(c: Client) -> None:
        async with quit_sem:
            try:
                await c.quit(timeout=30)
            except (OSError, Pop3Error, TimeoutError):
                pass

    await asyncio.gather(*(quit_one(c) for c in sessions))
    return {
        "sessions": len(sessions),
        "wanted": len(accounts),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "login_seconds": login_seconds,
        "pss_mib": mem["pss_mib"],
        "rss_mib": mem["rss_mib"],
        "pss_before_mib": before["pss_mib"],
        "processes": mem["processes"],
        "noop_p50_ms": percentile(latencies, 50) * 1000,
        "noop_p99_ms": percentile(latencies, 99) * 1000,
        "noop_max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "noops": len(latencies),
    }


def probe_process(
    port: int,
    account: Account,
    seconds: float,
    interval: float,
    python: str = sys.executable,
    retr: bool = False,
) -> Callable[[], dict[str, Any]]:
    """
    Start the NOOP prober in its own process, wait until it is logged in,
    tell it to go, and return a function that collects its result.
    """
    import subprocess

    proc = subprocess.Popen(
        [
            python,
            os.path.abspath(__file__),
            "probe",
            "--port",
            str(port),
            "--user",
            account.user,
            "--password",
            account.password,
            "--seconds",
            str(seconds),
            "--interval",
            str(interval),
            *(["--retr"] if retr else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    ready = proc.stdout.readline().strip()
    if ready != "ready":
        proc.kill()
        proc.wait()
        raise Pop3Error(f"prober did not log in: {ready!r}")
    proc.stdin.write("go\n")
    proc.stdin.flush()

    def collect() -> dict[str, Any]:
        try:
            out, _ = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return json.loads(out.strip().splitlines()[-1])

    return collect


def probe_main(
    port: int, account: Account, seconds: float, interval: float, retr: bool = False
) -> None:
    """
    The prober process: blocking socket, NOOP every C{interval} seconds
    (and, with C{retr}, a RETR of message 1 after each NOOP).
    """
    s = socket.create_connection((HOST, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")

    def cmd(text: str) -> bytes:
        s.sendall(text.encode() + b"\r\n")
        reply = f.readline()
        if not reply.startswith(b"+OK"):
            raise Pop3Error(f"{text.split()[0]}: {reply!r}")
        return reply

    try:
        if not f.readline().startswith(b"+OK"):
            raise Pop3Error("greeting")
        cmd(f"USER {account.user}")
        cmd(f"PASS {account.password}")
    except Exception as e:
        print(f"error {e!r}", flush=True)
        return
    print("ready", flush=True)
    sys.stdin.readline()
    latencies: list[float] = []
    retr_latencies: list[float] = []
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline and len(latencies) < 1_000_000:
        t0 = time.perf_counter()
        cmd("NOOP")
        latencies.append(time.perf_counter() - t0)
        if retr:
            t0 = time.perf_counter()
            cmd("RETR 1")
            while f.readline() != b".\r\n":
                pass
            retr_latencies.append(time.perf_counter() - t0)
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.monotonic()
    cmd("QUIT")
    s.close()
    print(
        json.dumps(
            {
                "noops": len(latencies),
                "noop_p50_ms": percentile(latencies, 50) * 1000,
                "noop_p99_ms": percentile(latencies, 99) * 1000,
                "noop_max_ms": max(latencies) * 1000 if latencies else float("nan"),
                "noop_mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
                "retr_p99_ms": percentile(retr_latencies, 99) * 1000
                if retr_latencies
                else float("nan"),
            }
        ),
        flush=True,
    )


async def noop_during_flood(
    port: int,
    probe_account: Account,
    flood_accounts: Sequence[Account],
    seconds: float,
    interval: float = 0.01,
) -> dict[str, Any]:
    """
    (b) A logged-in session (in its own process) sends NOOP every
    C{interval} s while C{len(flood_accounts)} clients do login+QUIT in a
    loop for C{seconds}; reports the prober's NOOP percentiles and the
    flood's rate.
    """
    collect = await asyncio.get_running_loop().run_in_executor(
        None, probe_process, port, probe_account, seconds, interval
    )
    flood_result = await flood(port, flood_accounts, seconds)
    result = await asyncio.get_running_loop().run_in_executor(None, collect)
    result["flood_sessions_per_s"] = flood_result["sessions_per_s"]
    result["flood_errors"] = flood_result["errors"]
    return result


async def latency_under_wrong_passwords(
    port: int,
    probe_account: Account,
    flood_accounts: Sequence[Account],
    seconds: float,
    interval: float = 0.02,
) -> dict[str, Any]:
    """
    (h, issue 4) NOOP and RETR p99 of a logged-in session, first on an idle
    server, then while C{len(flood_accounts)} clients hammer logins with
    wrong passwords; the ratios are busy over idle (target: within 2x).
    """
    loop = asyncio.get_running_loop()
    collect = await loop.run_in_executor(
        None, lambda: probe_process(port, probe_account, seconds, interval, retr=True)
    )
    idle = await loop.run_in_executor(None, collect)
    wrong = [Account(a.user, "wrong-" + a.password) for a in flood_accounts]
    collect = await loop.run_in_executor(
        None, lambda: probe_process(port, probe_account, seconds, interval, retr=True)
    )
    flood_result = await flood(port, wrong, seconds)
    busy = await loop.run_in_executor(None, collect)
    return {
        "idle_noop_p99_ms": idle["noop_p99_ms"],
        "idle_retr_p99_ms": idle["retr_p99_ms"],
        "busy_noop_p99_ms": busy["noop_p99_ms"],
        "busy_retr_p99_ms": busy["retr_p99_ms"],
        "noop_ratio": busy["noop_p99_ms"] / idle["noop_p99_ms"],
        "retr_ratio": busy["retr_p99_ms"] / idle["retr_p99_ms"],
        "failed_attempts": flood_result["errors"],
        "clients": len(wrong),
    }


# --- command line -----------------------------------------------------------


def read_accounts(path: str) -> list[Account]:
    """C{user password} lines."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                user, password = line.split(None, 1)
                out.append(Account(user, password.strip()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=["flood", "download", "stat", "probe", "idle"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--users", help="file of 'user password' lines (flood, idle)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--server-pid", type=int, default=0, help="for idle: whose memory to read")
    p.add_argument("--retr", action="store_true", help="probe: also RETR 1 after each NOOP")
    args = p.parse_args(argv)
    account = Account(args.user or "", args.password or "")
    if args.scenario == "probe":
        probe_main(args.port, account, args.seconds, args.interval, args.retr)
        return 0
    raise_nofile()
    if args.scenario == "flood":
        coro = flood(args.port, read_accounts(args.users)[: args.clients], args.seconds)
    elif args.scenario == "download":
        coro = download(args.port, account)
    elif args.scenario == "stat":
        coro = connect_stat(args.port, account)
    else:
        coro = idle_sessions(args.port, read_accounts(args.users)[: args.clients], args.server_pid)
    print(json.dumps(asyncio.run(coro)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
