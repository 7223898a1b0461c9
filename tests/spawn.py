"""Run the real ``mpxd`` with ``subprocess`` where the pexpect fixture does not fit.

The ``daemon`` fixture (conftest.py) reads the log from a pty.  The daemon
tests need other set-ups: the log in a file (``--log-file``, USR1), stderr
on a file whose device and inode ``JOURNAL_STREAM`` can name, descriptors
passed to the child (socket activation), a command that detaches
(``--daemon``).  ``Mpxd`` covers those; every process it starts is stopped
by pid when the test ends (the ``mpxd`` fixture).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

MPXD = [sys.executable, "-m", "mpxd"]
# Never inherited from the test runner's own environment (CI may run under systemd).
SYSTEMD_VARIABLES = {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                     "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"}
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


class Mpxd:
    """One ``mpxd`` process; its stderr goes to a file the test can read.

    ``journal=True`` sets ``JOURNAL_STREAM`` to that file's device and inode,
    as systemd does for a service whose output goes to the journal.
    """

    def __init__(self, args: list[str], workdir, *, env: dict | None = None,
                 log_file: str | os.PathLike | None = None, cwd: str = ROOT,
                 command: list[str] | None = None, pass_fds=(),
                 journal: bool = False) -> None:
        self.stderr_path = workdir / f"stderr-{time.monotonic_ns()}.log"
        self.log_path = os.fspath(log_file) if log_file else os.fspath(self.stderr_path)
        self.port: int | None = None
        full_env = {name: value for name, value in os.environ.items()
                    if name not in SYSTEMD_VARIABLES}
        full_env.update(PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
        full_env.update(env or {})
        with open(self.stderr_path, "wb") as stderr:
            if journal:             # stderr is "the journal", as systemd would say
                st = os.fstat(stderr.fileno())
                full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            self.proc = subprocess.Popen((command or MPXD) + args, cwd=cwd, env=full_env,
                                         stdin=subprocess.DEVNULL, stdout=stderr,
                                         stderr=stderr, pass_fds=pass_fds)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything logged so far (the log file or stderr)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match:
        """Wait until ``pattern`` shows up in the log (after offset ``since``)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None   # before reading: no line missed
            match = regex.search(self.log(), since)
            if match:
                return match
            if exited or time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not logged (exit status "
                                     f"{self.proc.poll()}); log:\n{self.log()}\n"
                                     f"stderr:\n{self.stderr()}")
            time.sleep(0.02)

    def wait_listening(self, timeout: float = 10.0) -> int:
        """Wait for ``listening on 127.0.0.1:PORT``; return the port."""
        self.port = int(self.wait_for(LISTENING.pattern, timeout).group(1))
        return self.port

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait_catching(self, signum: int, timeout: float = 10.0) -> None:
        """Wait until the process has a handler for ``signum`` (its start-up
        got that far); before, the signal's default action would apply."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f
                              if line.startswith("SigCgt:"))
            if caught & (1 << (signum - 1)):
                return
            time.sleep(0.01)
        raise AssertionError(f"no handler for {signal.Signals(signum).name} after {timeout}s")

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; return its exit status."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """TERM, then wait; return the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """TERM a process that is not our child; True once it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_gone(pid):
            return True
        time.sleep(0.02)
    return pid_gone(pid)


@pytest.fixture
def mpxd(tmp_path):
    """Factory: ``mpxd(["--port", "0", script], log_file=...)``; killed after the test."""
    started: list[Mpxd] = []

    def start(args: list[str], **kwargs) -> Mpxd:
        process = Mpxd(args, tmp_path, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
