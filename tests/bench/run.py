"""
`make bench`: run the issue-5 scenarios against pop3srv and, when it is
installed or installable, a private Dovecot instance, in interleaved rounds;
print a table of medians and pop3srv/Dovecot ratios and write it, with the
machine it ran on, to tests/bench/results.md (and results.json).

Dovecot runs twice: in its default login mode (a new pop3-login process per
connection, `service_count = 1`) and in its high-performance login mode
(long-lived pop3-login processes, `service_count = 0`, `process_min_avail`
= the number of CPUs), the way admins who care about login rate configure
it.  The second instance runs every scenario in full mode and only the
login flood (a) with --quick; --dovecot-hp-scenarios changes that.

    .venv/bin/python tests/bench/run.py          # full: 3 rounds, 200 MB/1 GB/50 MB, 1000 idle
    .venv/bin/python tests/bench/run.py --quick      # small sizes, one round, < 3 minutes
    .venv/bin/python tests/bench/run.py --scenarios a,b,c --rounds 1 --no-dovecot

Everything listens on and connects to 127.0.0.1 only.  Generated mailboxes
and user files live in tests/bench/data/ (git-ignored) and are reused; each
server gets its own copy of every mbox, so one server's writes never reach
the other.  Dovecot is never the system service: it is `dovecot -F -c
CONF` with its own base_dir, ports, logs and index directory, stopped at the
end.  Each round starts each server afresh with its index removed, so
"first open" is a cold index build (the mbox itself is in the page cache).

Scenarios (the letters of --scenarios):
  e  connect -> STAT on the big mbox: first open after start (index removed),
     then the median of 5 later sessions
  d  RETR of the one big message (MB/s, 10^6 octets on the wire per second)
  c  download the mixed mailbox: LIST, then RETR each in turn, one client
  f  peak PSS/RSS of the server's process tree while downloading the big mbox
  a  N clients each looping connect/USER/PASS/QUIT for T seconds: sessions/s
  b  NOOP p50/p99 of one logged-in session (separate process, NOOP every 10 ms)
     while N clients log in; once each with sha512-crypt, bcrypt and argon2 users
  g  1000 logged-in idle sessions: server PSS, then NOOP on each in turn: p50/p99
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import mailgen  # noqa: E402
from loadgen import Account  # noqa: E402

DATA = HERE / "data"
TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"
ALL_SCENARIOS = "edcfabgh"


# --- configuration -----------------------------------------------------------


@dataclass
class Sizes:
    mixed: int
    big: int
    single: int
    idle: int
    flood_clients: int
    flood_seconds: float
    noop_seconds: float
    rounds: int
    warm_sessions: int = 5

    def label(self, n: int) -> str:
        if n >= 1 << 30 and n % (1 << 30) == 0:
            return f"{n >> 30}G"
        return f"{n >> 20}M"


FULL = Sizes(
    mixed=200 << 20,
    big=1 << 30,
    single=50 << 20,
    idle=1000,
    flood_clients=20,
    flood_seconds=15,
    noop_seconds=10,
    rounds=3,
)
QUICK = Sizes(
    mixed=20 << 20,
    big=100 << 20,
    single=50 << 20,
    idle=200,
    flood_clients=20,
    flood_seconds=4,
    noop_seconds=3,
    rounds=1,
    warm_sessions=3,
)

HASHES = ("sha512", "bcrypt", "argon2")


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile_in_child() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 1 << 20), hard))


# --- data: mailboxes and users --------------------------------------------------


@dataclass
class Dataset:
    users_file: Path  # Dovecot-style passwd-file, read by both servers
    sources: dict[str, Path]  # user -> pristine mbox
    accounts: dict[str, Account]
    idle: list[Account]
    flood: dict[str, list[Account]]  # hash scheme -> flood accounts
    probe: Account
    info: dict[str, Any] = field(default_factory=dict)


def _password(user: str) -> str:
    return f"pw-{user}-bench"


def _hash(scheme: str, password: str) -> str:
    from passlib.hash import argon2, bcrypt, sha512_crypt

    if scheme == "sha512":
        return "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(password)
    if scheme == "bcrypt":
        return "{BLF-CRYPT}" + bcrypt.hash(password)  # passlib default cost 12
    return "{ARGON2ID}" + argon2.using(type="ID").hash(password)  # m=64 MiB, t=3, p=4


def prepare_data(sizes: Sizes) -> Dataset:
    """Generate (or reuse) the mbox files and the user file."""
    mboxes = DATA / "mbox"
    mboxes.mkdir(parents=True, exist_ok=True)
    mixed = mboxes / f"mixed-{sizes.label(sizes.mixed)}-seed1.mbox"
    big = mboxes / f"mixed-{sizes.label(sizes.big)}-seed2.mbox"
    single = mboxes / f"single-{sizes.label(sizes.single)}-seed3.mbox"
    small = mboxes / "small-3-seed4.mbox"
    for path, make in (
        (mixed, lambda p: mailgen.generate_mixed(str(p), sizes.mixed, 1)),
        (big, lambda p: mailgen.generate_mixed(str(p), sizes.big, 2)),
        (single, lambda p: mailgen.generate_single(str(p), sizes.single, 3)),
        (small, lambda p: mailgen.generate_small(str(p), 3, 4)),
    ):
        if not path.exists():
            log(f"generating {path.relative_to(ROOT)}")
            t0 = time.monotonic()
            n, size = make(path)
            log(f"  {n} messages, {size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")

    n_idle = max(sizes.idle, sizes.flood_clients)
    sources: dict[str, Path] = {"mixed": mixed, "big": big, "single": single, "probe": small}
    schemes: dict[str, str] = {
        "mixed": "sha512",
        "big": "sha512",
        "single": "sha512",
        "probe": "sha512",
    }
    idle_names = [f"i{i:04d}" for i in range(n_idle)]
    for name in idle_names:
        sources[name] = small
        schemes[name] = "sha512"
    flood_names: dict[str, list[str]] = {"sha512": idle_names[: sizes.flood_clients]}
    for scheme, prefix in (("bcrypt", "b"), ("argon2", "a")):
        flood_names[scheme] = [f"{prefix}{i:03d}" for i in range(sizes.flood_clients)]
        for name in flood_names[scheme]:
            sources[name] = small
            schemes[name] = scheme

    users_file = DATA / f"users-{n_idle}-{sizes.flood_clients}.passwd"
    if not users_file.exists():
        log(f"hashing {len(schemes)} passwords into {users_file.relative_to(ROOT)}")
        tmp = users_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("# pop3srv benchmark users (Dovecot passwd-file format)\n")
            for name, scheme in schemes.items():
                f.write(f"{name}:{_hash(scheme, _password(name))}::::::\n")
        os.replace(tmp, users_file)
    users_file.chmod(0o644)
    accounts = {name: Account(name, _password(name)) for name in schemes}
    return Dataset(
        users_file=users_file,
        sources=sources,
        accounts=accounts,
        idle=[accounts[n] for n in idle_names[: sizes.idle]],
        flood={s: [accounts[n] for n in names] for s, names in flood_names.items()},
        probe=accounts["probe"],
        info={
            "mixed": f"{mixed.name} ({mixed.stat().st_size / 1e6:.0f} MB, "
            f"{count_messages(mixed)} messages)",
            "big": f"{big.name} ({big.stat().st_size / 1e6:.0f} MB, "
            f"{count_messages(big)} messages)",
            "single": f"{single.name} ({single.stat().st_size / 1e6:.1f} MB, 1 message)",
        },
    )


def count_messages(path: Path) -> int:
    cache = path.with_suffix(".count")
    if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
        return int(cache.read_text())
    n = 0
    with open(path, "rb") as f:
        prev = b"\n"
        for line in f:
            if prev.endswith(b"\n") and line.startswith(b"From "):
                n += 1
            prev = line
    cache.write_text(str(n))
    return n


def sync_mail(dataset: Dataset, mail: Path) -> None:
    """Make C{mail}/USER a pristine private copy of each user's mbox."""
    mail.mkdir(parents=True, exist_ok=True)
    for user, source in dataset.sources.items():
        target = mail / user
        s = source.stat()
        try:
            t = target.stat()
            if t.st_size == s.st_size and t.st_mtime_ns == s.st_mtime_ns:
                continue
        except FileNotFoundError:
            pass
        tmp = mail / f".{user}.copying"
        shutil.copyfile(source, tmp)
        os.utime(tmp, ns=(s.st_atime_ns, s.st_mtime_ns))
        os.replace(tmp, target)


# --- servers -------------------------------------------------------------------


class Server:
    name = "?"

    def __init__(self, workdir: Path, dataset: Dataset) -> None:
        self.workdir = workdir
        self.dataset = dataset
        self.mail = workdir / "mail"
        self.index = workdir / "index"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []

    def prepare_round(self) -> None:
        """Pristine mbox copies, no index: the next open is a cold one."""
        sync_mail(self.dataset, self.mail)
        shutil.rmtree(self.index, ignore_errors=True)
        self.index.mkdir(parents=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.port = free_port()
        self.argv = self.command()
        logfile = open(self.workdir / f"{self.name}.stdout", "ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.workdir,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile_in_child,
            start_new_session=True,
        )
        logfile.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up: see {self.workdir}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if s.recv(200).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within 60 s: see {self.workdir}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            # Only the process group we started (start_new_session above).
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Pop3srv(Server):
    name = "pop3srv"
    extra_args: list[str] = []

    def command(self) -> list[str]:
        return [
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={self.workdir / 'twistd.log'}",
            "pop3srv",
            "--listen",
            f"tcp:{self.port}:interface={HOST}",
            "--auth",
            f"passlib:{self.dataset.users_file}",
            "--mailbox",
            f"{self.mail}/{{user}}",
            "--index-dir",
            str(self.index),
            *self.extra_args,
        ]

    @classmethod
    def detect_limit_args(cls, idle: int) -> list[str]:
        """
        Connection limits (issue 4) would refuse the benchmark's own load from
        one loopback address; raise them the way Dovecot's are raised.
        """
        try:
            helptext = subprocess.run(
                [TWISTD, "pop3srv", "--help"], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        n = str(max(idle, 100) * 2 + 100)
        out = []
        for option in ("--max-connections", "--max-connections-per-address"):
            if f"{option}=" in helptext:
                out += [option, n]
        return out


class Dovecot(Server):
    """
    A private Dovecot instance; C{high_performance} selects the login mode
    that keeps C{process_min_avail} long-lived pop3-login processes, each
    serving many connections, instead of one new process per connection.
    """

    name = "dovecot"

    def __init__(
        self, workdir: Path, dataset: Dataset, idle: int, high_performance: bool = False
    ) -> None:
        super().__init__(workdir, dataset)
        self.idle = idle
        self.high_performance = high_performance
        if high_performance:
            self.name = "dovecot-hp"
        # Short path for Dovecot's UNIX sockets.
        self.base = Path(tempfile.mkdtemp(prefix="pop3bench-dovecot-"))
        os.chmod(self.base, 0o755)  # noqa: S103 (Dovecot's unprivileged processes need it)

    def _owner(self) -> tuple[int, int]:
        """Dovecot refuses mail access as root: use the system 'mail' user then."""
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        import pwd

        entry = pwd.getpwnam("mail")
        return entry.pw_uid, entry.pw_gid

    def prepare_round(self) -> None:
        super().prepare_round()
        uid, gid = self._owner()
        (self.workdir / "folders").mkdir(exist_ok=True)
        for top in (self.mail, self.index, self.workdir / "folders"):
            os.chown(top, uid, gid)
            for dirpath, dirnames, filenames in os.walk(top):
                for n in dirnames + filenames:
                    os.chown(os.path.join(dirpath, n), uid, gid)

    def command(self) -> list[str]:
        conf = self.workdir / "dovecot.conf"
        uid, gid = self._owner()
        limit = max(self.idle, 100) * 2 + 100
        (self.workdir / "folders").mkdir(exist_ok=True)
        # Dovecot's LoginProcess documentation: high-performance mode, with
        # process_min_avail "at least the number of CPU cores".
        login_mode = (
            f"  service_count = 0\n  process_min_avail = {os.cpu_count() or 1}\n"
            if self.high_performance
            else ""
        )
        conf.write_text(f"""\
# Private benchmark instance: never the system service.
base_dir = {self.base}/run
state_dir = {self.base}/state
log_path = {self.workdir}/dovecot.log
protocols = pop3
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
mail_location = mbox:{self.workdir}/folders/%u:INBOX={self.mail}/%u:INDEX={self.index}/%u
# Retrieval must not rewrite the mbox (Status: headers) between scenarios.
pop3_no_flag_updates = yes
default_process_limit = {limit}
default_client_limit = {limit * 2}
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = {self.dataset.users_file}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.workdir}/folders/%u
}}
service pop3-login {{
{login_mode}  inet_listener pop3 {{
    address = {HOST}
    port = {self.port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        return ["dovecot", "-F", "-c", str(conf)]

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def ensure_dovecot(allow_install: bool) -> str | None:
    """The Dovecot version, installing dovecot-pop3d with apt-get if allowed; None if absent."""
    if shutil.which("dovecot") is None and allow_install:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log("installing dovecot-pop3d with apt-get (services are not started)")
            policy = Path("/usr/sbin/policy-rc.d")
            made_policy = False
            if not policy.exists():
                # Keep the package scripts from starting the system service.
                policy.write_text("#!/bin/sh\nexit 101\n")
                policy.chmod(0o755)
                made_policy = True
            try:
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                subprocess.run(
                    ["apt-get", "update", "-q"], env=env, timeout=600, stdout=subprocess.DEVNULL
                )
                subprocess.run(
                    ["apt-get", "install", "-y", "-q", "dovecot-pop3d"],
                    env=env,
                    timeout=900,
                    stdout=subprocess.DEVNULL,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                log(f"apt-get failed: {e}")
            finally:
                if made_policy:
                    policy.unlink()
        else:
            log(
                "Dovecot is not installed and cannot be installed here "
                "(needs root and apt-get: apt-get install dovecot-pop3d)"
            )
    if shutil.which("dovecot") is None:
        return None
    out = subprocess.run(["dovecot", "--version"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# --- scenarios --------------------------------------------------------------------


Results = dict[str, dict[str, list[float]]]


def record(results: Results, key: str, server: str, value: float) -> None:
    results.setdefault(key, {}).setdefault(server, []).append(value)


def run_round(
    server: Server,
    dataset: Dataset,
    sizes: Sizes,
    scenarios: str,
    results: Results,
    details: list[dict[str, Any]],
    deadline: float,
) -> None:
    name = server.name
    acc = dataset.accounts
    server.prepare_round()
    server.start()
    log(f"{name} started on {HOST}:{server.port} (pid {server.pid})")
    record(results, "start_pss", name, loadgen.tree_memory(server.pid)["pss_mib"])

    def run(label: str, coro: Any, limit: float) -> dict[str, Any] | None:
        if time.monotonic() > deadline:
            log(f"  {label}: skipped, the overall time limit is reached")
            return None
        t0 = time.monotonic()
        try:
            out = asyncio.run(asyncio.wait_for(coro, limit))
        except Exception as e:  # a failed scenario is reported, not fatal
            log(f"  {label}: FAILED {e!r}")
            details.append({"server": name, "scenario": label, "error": repr(e)})
            return None
        details.append({"server": name, "scenario": label, **out})
        log(
            f"  {label} ({time.monotonic() - t0:.1f} s): "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()
            )
        )
        return out

    try:
        if "e" in scenarios:
            out = run(
                "e cold connect->STAT big", loadgen.connect_stat(server.port, acc["big"]), 600
            )
            if out:
                record(results, "e_cold", name, out["seconds"])
            warm = []
            for i in range(sizes.warm_sessions):
                out = run(
                    f"e warm connect->STAT big #{i + 1}",
                    loadgen.connect_stat(server.port, acc["big"]),
                    120,
                )
                if out:
                    warm.append(out["seconds"] * 1000)
            if warm:
                record(results, "e_warm", name, statistics.median(warm))
        if "d" in scenarios:
            out = run("d RETR single", loadgen.download(server.port, acc["single"]), 300)
            if out and out["complete"]:
                record(results, "d", name, out["mb_per_s"])
        if "c" in scenarios:
            out = run("c download mixed", loadgen.download(server.port, acc["mixed"]), 900)
            if out and out["complete"]:
                record(results, "c", name, out["mb_per_s"])
        if "f" in scenarios:
            sampler = loadgen.MemorySampler(server.pid)
            base = loadgen.tree_memory(server.pid)
            with sampler:
                out = run("f download big (memory)", loadgen.download(server.port, acc["big"]), 900)
            if out:
                log(
                    f"    peak PSS {sampler.peak_pss:.1f} MiB, RSS {sampler.peak_rss:.1f} MiB, "
                    f"{sampler.peak_processes} processes ({sampler.samples} samples; "
                    f"before: {base['pss_mib']:.1f} MiB PSS)"
                )
                details.append(
                    {
                        "server": name,
                        "scenario": "f memory",
                        "peak_pss_mib": sampler.peak_pss,
                        "peak_rss_mib": sampler.peak_rss,
                        "processes": sampler.peak_processes,
                        "samples": sampler.samples,
                        "pss_before_mib": base["pss_mib"],
                    }
                )
                record(results, "f_pss", name, sampler.peak_pss)
                record(results, "f_rss", name, sampler.peak_rss)
                if out["complete"]:
                    record(results, "f_speed", name, out["mb_per_s"])
        if "a" in scenarios:
            out = run(
                "a login flood",
                loadgen.flood(server.port, dataset.flood["sha512"], sizes.flood_seconds),
                sizes.flood_seconds + 180,
            )
            if out:
                record(results, "a", name, out["sessions_per_s"])
        if "b" in scenarios:
            for scheme in HASHES:
                out = run(
                    f"b NOOP during {scheme} flood",
                    loadgen.noop_during_flood(
                        server.port, dataset.probe, dataset.flood[scheme], sizes.noop_seconds
                    ),
                    sizes.noop_seconds + 240,
                )
                if out:
                    record(results, f"b_{scheme}_p99", name, out["noop_p99_ms"])
                    record(results, f"b_{scheme}_p50", name, out["noop_p50_ms"])
                    record(results, f"b_{scheme}_rate", name, out["flood_sessions_per_s"])
        if "g" in scenarios:
            out = run(
                f"g {len(dataset.idle)} idle sessions",
                loadgen.idle_sessions(server.port, dataset.idle, server.pid),
                600,
            )
            if out:
                if out["sessions"] == out["wanted"]:
                    record(results, "g_pss", name, out["pss_mib"])
                    record(results, "g_p99", name, out["noop_p99_ms"])
                else:
                    log(
                        f"    only {out['sessions']} of {out['wanted']} sessions opened: "
                        "not recorded"
                    )
        if "h" in scenarios:
            hammer = (dataset.idle * 50)[:50]
            out = run(
                "h NOOP/RETR while 50 clients send wrong passwords",
                loadgen.latency_under_wrong_passwords(
                    server.port, dataset.probe, hammer, sizes.noop_seconds
                ),
                2 * sizes.noop_seconds + 240,
            )
            if out:
                record(results, "h_noop", name, out["noop_ratio"])
                record(results, "h_retr", name, out["retr_ratio"])
    finally:
        server.stop()
        log(f"{name} stopped")


# --- report ----------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str
    higher_better: bool
    # (pop3srv, dovecot or None) -> (target text, met?)
    target: Callable[[float, float | None], tuple[str, bool | None]]


def _rel(factor: float, higher: bool) -> Callable[[float, float | None], tuple[str, bool | None]]:
    def check(p: float, d: float | None) -> tuple[str, bool | None]:
        sign = "≥" if higher else "≤"
        text = f"{sign} {factor:g}× Dovecot" if factor != 1 else f"{sign} Dovecot"  # noqa: RUF001
        if d is None:
            return text, None
        return text, (p >= factor * d) if higher else (p <= factor * d)

    return check


def _abs(limit: float, unit: str) -> Callable[[float, float | None], tuple[str, bool | None]]:
    def check(p: float, d: float | None) -> tuple[str, bool | None]:
        return f"≤ {limit:g} {unit}", p <= limit

    return check


def rows(sizes: Sizes, dataset: Dataset) -> list[Row]:
    m, b, s = (sizes.label(sizes.mixed), sizes.label(sizes.big), sizes.label(sizes.single))
    n, idle = sizes.flood_clients, len(dataset.idle)
    out = [
        Row(
            "a",
            f"{n} concurrent clients doing login+QUIT (sha512-crypt)",
            "sessions/s",
            True,
            _rel(3, True),
        ),
    ]
    for scheme in HASHES:
        out.append(
            Row(
                f"b_{scheme}_p99",
                f"NOOP p99 of a session while {n} clients log in ({scheme})",
                "ms",
                False,
                _rel(1, False),
            )
        )
        out.append(
            Row(f"b_{scheme}_p50", f"  … NOOP p50 ({scheme})", "ms", False, lambda p, d: ("", None))
        )
        out.append(
            Row(
                f"b_{scheme}_rate",
                f"  … logins/s during it ({scheme})",
                "sessions/s",
                True,
                lambda p, d: ("", None),
            )
        )
    out += [
        Row(
            "c",
            f"download the {m} mixed mailbox (RETR each, one client)",
            "MB/s",
            True,
            _rel(1.2, True),
        ),
        Row("d", f"RETR of one {s} message", "MB/s", True, _rel(1.5, True)),
        Row(
            "e_cold",
            f"connect → STAT on the {b} mbox, first open after start",
            "s",
            False,
            _abs(2, "s"),
        ),
        Row(
            "e_warm", "  the same, a later session (median of several)", "ms", False, _abs(33, "ms")
        ),
        Row(
            "f_pss",
            f"peak PSS, all server processes, downloading the {b} mbox",
            "MiB",
            False,
            _abs(59, "MiB"),
        ),
        Row(
            "f_rss",
            "  … peak RSS sum (counts shared pages once per process)",
            "MiB",
            False,
            lambda p, d: ("", None),
        ),
        Row(
            "f_speed", f"  … download speed of the {b} mbox", "MB/s", True, lambda p, d: ("", None)
        ),
        Row(
            "start_pss",
            "server PSS right after start (before any session)",
            "MiB",
            False,
            lambda p, d: ("", None),
        ),
        Row("g_pss", f"{idle} logged-in idle sessions: server PSS", "MiB", False, _abs(100, "MiB")),
        Row("g_p99", f"{idle} logged-in idle sessions: NOOP p99", "ms", False, _abs(8, "ms")),
        Row(
            "h_noop",
            "NOOP p99 while 50 clients send wrong passwords, over idle (issue 4)",
            "x",
            False,
            _abs(2, "x"),
        ),
        Row("h_retr", "  … RETR p99, over idle (issue 4)", "x", False, _abs(2, "x")),
    ]
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def make_table(
    results: Results, sizes: Sizes, dataset: Dataset, have_dovecot: bool, have_hp: bool = False
) -> str:
    """
    One row per measurement: pop3srv, Dovecot in its default login mode and
    the ratio, then (if it ran) Dovecot in high-performance login mode and
    the ratio to that; the target column judges against the default mode.
    """
    hp_head, hp_rule = (" Dovecot HP | pop3srv/Dovecot HP |", "---|---|") if have_hp else ("", "")
    lines = [
        f"| scenario | pop3srv | Dovecot | pop3srv/Dovecot |{hp_head} target | met? |",
        f"|---|---|---|---|{hp_rule}---|---|",
    ]

    def median(values: dict[str, list[float]], server: str) -> float | None:
        return statistics.median(values[server]) if values.get(server) else None

    for row in rows(sizes, dataset):
        values = results.get(row.key, {})
        p = median(values, "pop3srv")
        d = median(values, "dovecot")
        ratio = f"{p / d:.2f}" if p is not None and d else "—"
        hp_cells = ""
        if have_hp:
            h = median(values, "dovecot-hp")
            hp_ratio = f"{p / h:.2f}" if p is not None and h else "—"
            hp_cells = f" {fmt(h)} | {hp_ratio} |"
        target, met = ("", None) if p is None else row.target(p, d)
        mark = {True: "yes", False: "**no**", None: ""}[met]
        if p is None and not target:
            target = row.target(0, None)[0]
        lines.append(
            f"| {row.label} [{row.unit}] | {fmt(p)} | {fmt(d) if have_dovecot else 'n/a'} "
            f"| {ratio} |{hp_cells} {target} | {mark} |"
        )
    return "\n".join(lines)


def machine_info(dovecot_version: str | None) -> dict[str, str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    import twisted

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "pop3srv"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in pop3srv/"
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Twisted": twisted.__version__,
        "Dovecot": dovecot_version or "not run",
        "pop3srv": commit,
    }


# --- main ----------------------------------------------------------------------------


def authority_round_trip(calls: int = 5000) -> str:
    """
    What asking the parent's policy authority adds to a login with
    C{--workers N} (tests/bench/authority_rtt.py), as a Markdown paragraph.
    """
    script = HERE / "authority_rtt.py"
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--json", "--calls", str(calls)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        figures = json.loads(out)
    except (subprocess.SubprocessError, ValueError) as e:
        return f"\n\nPolicy authority round trip: not measured ({e}).\n"
    local, amp = figures["local"], figures["amp"]
    return (
        f"\n\nPolicy authority (`--workers N`), {figures['calls']} logins, each a BeginLogin "
        "and an EndLogin (two round trips): "
        f"in-process median {local['median_us']:.0f} µs (p99 {local['p99_us']:.0f} µs); "
        f"over AMP to the parent median {amp['median_us']:.0f} µs "
        f"(p99 {amp['p99_us']:.0f} µs), so about {figures['added_median_us'] / 2:.0f} µs "
        "added per round trip.\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round (< 3 minutes)")
    p.add_argument(
        "--scenarios", default=ALL_SCENARIOS, help=f"letters of {ALL_SCENARIOS} (default all)"
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--mixed-size", help="e.g. 200M")
    p.add_argument("--big-size", help="e.g. 1G")
    p.add_argument("--single-size", help="e.g. 50M")
    p.add_argument("--idle", type=int, help="idle sessions for scenario g")
    p.add_argument("--clients", type=int, help="concurrent clients for a and b")
    p.add_argument("--flood-seconds", type=float)
    p.add_argument("--noop-seconds", type=float)
    p.add_argument("--no-dovecot", action="store_true", help="measure pop3srv alone")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install dovecot-pop3d")
    p.add_argument(
        "--dovecot-hp-scenarios",
        help="scenarios for Dovecot in high-performance login mode "
        "(default: all, or 'a' with --quick; '' to skip that instance)",
    )
    p.add_argument(
        "--pop3srv-arg",
        action="append",
        default=[],
        help="extra argument for twistd pop3srv (repeatable), e.g. --pop3srv-arg=--workers=2",
    )
    p.add_argument(
        "--time-limit", type=float, help="minutes after which remaining scenarios are skipped"
    )
    p.add_argument("--results", default=str(HERE / "results.md"))
    args = p.parse_args(argv)

    base = QUICK if args.quick else FULL
    sizes = Sizes(**{**base.__dict__})
    for attr, value in (
        ("mixed", args.mixed_size),
        ("big", args.big_size),
        ("single", args.single_size),
    ):
        if value:
            setattr(sizes, attr, mailgen.parse_size(value))
    for attr, value in (
        ("rounds", args.rounds),
        ("idle", args.idle),
        ("flood_clients", args.clients),
        ("flood_seconds", args.flood_seconds),
        ("noop_seconds", args.noop_seconds),
    ):
        if value is not None:
            setattr(sizes, attr, value)
    scenarios = "".join(c for c in args.scenarios if c in ALL_SCENARIOS)
    hp_wanted = args.dovecot_hp_scenarios
    if hp_wanted is None:
        hp_wanted = "a" if args.quick else ALL_SCENARIOS
    hp_scenarios = "".join(c for c in scenarios if c in hp_wanted)
    time_limit = (args.time_limit or (2.5 if args.quick else 30)) * 60
    started = time.monotonic()
    deadline = started + time_limit

    loadgen.raise_nofile()
    dovecot_version = None if args.no_dovecot else ensure_dovecot(not args.no_install)
    if not args.no_dovecot and dovecot_version is None:
        log("Dovecot is not available: measuring pop3srv alone (the Dovecot column stays empty)")
    dataset = prepare_data(sizes)
    Pop3srv.extra_args = Pop3srv.detect_limit_args(sizes.idle) + args.pop3srv_arg

    run_dir = DATA / "run"
    servers: list[Server] = [Pop3srv(run_dir / "pop3srv", dataset)]
    if dovecot_version:
        servers.append(Dovecot(run_dir / "dovecot", dataset, sizes.idle))
        if hp_scenarios:
            servers.append(
                Dovecot(run_dir / "dovecot-hp", dataset, sizes.idle, high_performance=True)
            )
    only = {"dovecot-hp": hp_scenarios}
    for s in servers:
        s.workdir.mkdir(parents=True, exist_ok=True)

    results: Results = {}
    details: list[dict[str, Any]] = []

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for r in range(sizes.rounds):
            order = servers if r % 2 == 0 else list(reversed(servers))
            for server in order:
                if time.monotonic() > deadline:
                    break
                log(f"round {r + 1}/{sizes.rounds}: {server.name}")
                try:
                    run_round(
                        server,
                        dataset,
                        sizes,
                        only.get(server.name, scenarios),
                        results,
                        details,
                        deadline,
                    )
                except RuntimeError as e:
                    log(f"{server.name}: {e}")
                    details.append({"server": server.name, "error": str(e)})
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        for s in servers:
            s.stop()
            if isinstance(s, Dovecot):
                s.cleanup()

    elapsed = time.monotonic() - started
    info = machine_info(dovecot_version)
    table = make_table(
        results,
        sizes,
        dataset,
        dovecot_version is not None,
        dovecot_version is not None and bool(hp_scenarios),
    )
    mode = "quick" if args.quick else "full"
    header = [
        f"# pop3srv benchmark ({mode} mode, {sizes.rounds} round(s), medians)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed / 60:.1f} minutes, "
        f"scenarios `{scenarios}`.",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        *[f"- {k} mailbox: {v}" for k, v in dataset.info.items()],
        f"- pop3srv: `twistd -n pop3srv ... {' '.join(Pop3srv.extra_args)}` "
        "(limits raised so the benchmark's own connections from 127.0.0.1 are not refused)",
        "- Dovecot: private instance, default settings except process/client limits raised, "
        "pop3_no_flag_updates=yes, mbox with its index in a private directory",
        "- Dovecot HP: the same in high-performance login mode (service pop3-login "
        f"{{ service_count = 0, process_min_avail = {os.cpu_count()} }}), "
        f"scenarios `{hp_scenarios or 'none'}`; the targets compare with the default mode",
        "- Client and servers share the machine; all traffic on 127.0.0.1. "
        "MB = 10^6 octets on the wire.",
        "",
    ]
    if args.quick:
        header.append(
            "Quick mode: small sizes, one round. The issue's absolute targets are for the full "
            "sizes, so the 'met?' column is only indicative here."
        )
        header.append("")
    raw = {k: v for k, v in sorted(results.items())}
    rtt = authority_round_trip()
    text = (
        "\n".join(header)
        + "\n"
        + table
        + rtt
        + "\n\nPer-round values:\n\n```\n"
        + "\n".join(
            f"{k}: " + "; ".join(f"{srv} " + ", ".join(fmt(x) for x in xs) for srv, xs in v.items())
            for k, v in raw.items()
        )
        + "\n```\n"
    )
    print("\n" + text)
    Path(args.results).write_text(text)
    Path(args.results).with_suffix(".json").write_text(
        json.dumps(
            {"machine": info, "sizes": sizes.__dict__, "results": results, "details": details},
            indent=1,
            default=str,
        )
    )
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
