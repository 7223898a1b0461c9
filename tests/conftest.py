"""Shared fixtures: run the real ``mpxd`` command under pexpect on a free port."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import textwrap
import time

import pexpect
import pytest

# The ``mpxd`` fixture (the real command under subprocess, logs in a file)
# lives in tests/spawn.py; every test module may ask for it.
pytest_plugins = ["spawn"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANDLERS = os.path.join(ROOT, "handlers")
MPXD = [sys.executable, "-m", "mpxd"]
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


class Daemon:
    """A running ``mpxd`` started by a test; ``stop()`` ends it by pid."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 10,
                 listening: bytes = LISTENING.pattern):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.child = pexpect.spawn(MPXD[0], MPXD[1:] + args, cwd=ROOT, env=full_env,
                                   timeout=timeout, maxread=65536)
        self.child.expect(listening)
        self.port = int(self.child.match.group(1))
        self.address = ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        return self.child.pid

    def connect(self, timeout: float = 5.0) -> LineClient:
        return LineClient(self.address, timeout)

    def expect_log(self, pattern: str | bytes, timeout: float = 5) -> re.Match:
        self.child.expect(pattern, timeout=timeout)
        return self.child.match

    def signal(self, signum: int) -> None:
        os.kill(self.child.pid, signum)

    def stop(self, timeout: float = 10) -> int:
        """TERM, wait for exit; returns the exit status."""
        if self.child.isalive():
            self.signal(signal.SIGTERM)
            self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus if self.child.exitstatus is not None else \
            -(self.child.signalstatus or 0)

    def kill(self) -> None:
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)


class LineClient:
    """A blocking line client for tests."""

    def __init__(self, address, timeout: float = 5.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def send(self, data: str | bytes) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_lines(self, *lines: str) -> None:
        self.send("".join(line + "\n" for line in lines))

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unterminated data {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "surrogateescape")

    def readlines(self, n: int) -> list[str]:
        return [self.readline() for _ in range(n)]

    def ask(self, line: str) -> str:
        self.send_lines(line)
        return self.readline()

    def read_all(self) -> bytes:
        """Everything until the server closes the connection."""
        chunks = [self.buf]
        self.buf = b""
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon():
    """Factory: ``daemon("handlers/counter.py", "--eol", "crlf")``; stopped after the test."""
    started: list[Daemon] = []

    def start(script: str, *args: str, env: dict | None = None,
              listening: bytes = LISTENING.pattern) -> Daemon:
        d = Daemon(["--port", "0", "--host", "127.0.0.1", *args, script], env=env,
                   listening=listening)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def write_script(tmp_path):
    """Write a handler script from source text; returns its path."""
    def write(source: str, name: str = "handler.py") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return str(path)
    return write


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
