"""
A throw-away container booting this machine's own OS with systemd as PID 1,
for tests of the shipped systemd units (tests/test_systemd.py).

C{systemd-nspawn --volatile=yes} runs C{/usr} read-only from the host on a
tmpfs root; C{/etc}, C{/var} and C{/opt} are overlays of the host's (writes
go to a temporary upper directory and vanish with the container), so the
container is this Debian as installed, and installing into it is free.  It
shares the host's network: tests must use loopback addresses and free ports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence

#: Host services that would start in the container and take POP3 ports (or
#: just time): masked on its kernel command line.
MASKED = (
    "dovecot.service",
    "dovecot.socket",
    "postgresql.service",
    "fail2ban.service",
    "haproxy.service",
    "redis-server.service",
)

#: A PATH as a Debian root shell has it: the container's commands, not a
#: developer's (pyenv, ~/.local) on the host.
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CannotBoot(Exception):
    """This machine cannot boot the container; the message says why."""


def unavailable() -> str | None:
    """Why no container can be booted here, or L{None} if it may be tried."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container util-linux)"
    if not os.path.isdir("/usr/lib/systemd") or not os.path.exists("/lib/systemd/systemd"):
        return "no systemd in this OS to boot"
    return None


class Container:
    """
    One booted container.  Use as a context manager: leaving it powers the
    container off and waits for it, whatever happened inside.

    @ivar leader: the PID, on the host, of the container's systemd.
    """

    def __init__(self, binds: Sequence[tuple[str, str, bool]], log_path: str) -> None:
        """
        @param binds: C{(host path, container path, read-only)}; container
            paths go under C{/srv}, a tmpfs in the container.
        @param log_path: where the container's console output goes.
        """
        self.name = f"pop3srv-test-{uuid.uuid4().hex[:8]}"
        self.binds = binds
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def boot(self, timeout: float = 60) -> None:
        """Start the container and wait until its boot is over."""
        command = [
            "systemd-nspawn",
            "--quiet",
            "--directory=/",
            "--volatile=yes",
            f"--machine={self.name}",
            # Without registration: machined is not running on this kind of
            # machine, and nspawn cannot make a scope unit of its own.
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--overlay=+/etc::/etc",
            "--overlay=+/var::/var",
            "--overlay=+/opt::/opt",
            "--tmpfs=/srv",
        ]
        for host, inside, read_only in self.binds:
            command.append(f"--bind{'-ro' if read_only else ''}={host}:{inside}")
        command += ["--boot", "--", "systemd.firstboot=off"]
        command += [f"systemd.mask={unit}" for unit in MASKED]
        log = open(self.log_path, "wb")
        with log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.process.poll() is not None:
                raise CannotBoot(
                    f"systemd-nspawn exited {self.process.returncode}: {self.console()}"
                )
            if time.monotonic() > deadline:
                raise CannotBoot(
                    f"no init in the container after {timeout:.0f} s: {self.console()}"
                )
            children = subprocess.run(
                ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
            ).stdout.split()
            # nspawn's first child still lives in our PID namespace while it
            # sets up; only the container's own init may be driven, or a
            # command would reach this machine's systemd instead.
            inits = [int(pid) for pid in children if _in_other_pid_namespace(int(pid))]
            if inits:
                self.leader = inits[0]
            else:
                time.sleep(0.2)
        while True:
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            )
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise CannotBoot(f"the container's boot did not finish: {state.stdout.strip()}")
            time.sleep(0.5)

    def console(self) -> str:
        """The last lines of the console output."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def run(
        self,
        command: Sequence[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "/",
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the container as root, with a clean environment."""
        environment = {"PATH": DEBIAN_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        environment.update(env or {})
        full = [
            "nsenter",
            f"--target={self.leader}",
            "--all",
            "env",
            "-i",
            f"--chdir={cwd}",
            *(f"{k}={v}" for k, v in environment.items()),
            *command,
        ]
        result = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)!r} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
            )
        return result

    def shell(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a bash script in the container (exits at the first failure)."""
        return self.run(["bash", "-euo", "pipefail", "-c", script], **kwargs)  # type: ignore[arg-type]

    def shutdown(self, timeout: float = 30) -> None:
        """Power off and wait; kill the container if it will not go."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.leader:
            subprocess.run(
                [
                    "nsenter",
                    f"--target={self.leader}",
                    "--all",
                    "systemctl",
                    "poweroff",
                    "--no-block",
                ],
                capture_output=True,
                timeout=15,
                check=False,
            )
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        # nspawn turns SIGTERM into a clean shutdown of the container.
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            # Killing the container's init ends its whole PID namespace;
            # killing nspawn alone would leave the container running.
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            process.kill()
            process.wait(15)


def _in_other_pid_namespace(pid: int) -> bool:
    """Whether C{pid} runs in a PID namespace other than ours (a container's init)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False
