"""Run the real ``mpxd`` daemon for a test: on a free port, ready when it says so.

``Server.start`` runs ``python -m mpxd --port 0 --host 127.0.0.1 ... SCRIPT``,
waits for its ``listening on`` line (which SPEC section 5 promises means
"ready"), and ``stop`` ends it with SIGTERM by pid.  Only the standard
library is used, so handler authors need nothing beyond pytest.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["Server", "LineClient", "cli_args", "ServerError"]

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
EOL_NAMES = {"\n": "lf", "\r\n": "crlf", "lf": "lf", "crlf": "crlf"}


class ServerError(Exception):
    """The daemon did not start, or did not stop, as it should."""


def cli_args(**options: Any) -> list[str]:
    """Command-line arguments from keyword options: ``idle_timeout=5`` -> ``--idle-timeout 5``.

    ``True`` gives a bare flag, ``False``/``None`` nothing; ``eol`` may be
    ``"\\r\\n"`` as well as ``"crlf"``, so the same options work for
    ``Harness`` and ``Server``.
    """
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name == "eol":
            value = EOL_NAMES.get(value, value)
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


class Server:
    """One running ``mpxd``; ``address``, ``port``, ``pid``, ``client()``, ``stop()``."""

    def __init__(self, process: subprocess.Popen, port: int, log: list[str],
                 log_changed: threading.Condition, reader: threading.Thread) -> None:
        self.process = process
        self._reader = reader
        self.port = port
        self.address = ("127.0.0.1", port)
        self.returncode: int | None = None
        self._log = log
        self._log_changed = log_changed

    @classmethod
    def start(cls, script: str, *args: str, timeout: float = 10.0,
              env: dict[str, str] | None = None, **options: Any) -> Server:
        """Start ``mpxd`` for ``script`` with extra ``args``/``options``; wait until ready."""
        command = [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
                   *cli_args(**options), *args, os.path.abspath(script)]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        log: list[str] = []
        log_changed = threading.Condition()
        # Read stderr for the whole run: the log is there for the test, and
        # a full pipe must never block the daemon.
        reader = threading.Thread(target=_read_log, args=(process, log, log_changed),
                                  name=f"mpxd-log-{process.pid}", daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        with log_changed:
            while True:
                for line in log:
                    match = LISTENING.search(line)
                    if match:
                        return cls(process, int(match.group(1)), log, log_changed, reader)
                if process.poll() is not None and not reader.is_alive():
                    process.stderr.close()
                    raise ServerError(f"mpxd exited with status {process.returncode} "
                                      f"before listening:\n" + "".join(log))
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                log_changed.wait(min(left, 0.5))
        process.kill()
        process.wait()
        reader.join(timeout)
        raise ServerError(f"mpxd did not log 'listening on' within {timeout}s:\n"
                          + "".join(log))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        """Everything the daemon has logged so far."""
        with self._log_changed:
            return "".join(self._log)

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Wait until a log line matches the regular expression ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self._log:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"no log line matching {pattern!r} within "
                                      f"{timeout}s:\n" + "".join(self._log))
                self._log_changed.wait(left)

    def client(self, timeout: float = 5.0) -> LineClient:
        """A new line client connected to this server."""
        return LineClient(self.address, timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by pid, wait for the exit; return the exit status (0 is clean).

        A daemon that does not exit within ``timeout`` is killed and
        ``ServerError`` raised.
        """
        if self.returncode is not None:
            return self.returncode
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.returncode = self.process.returncode
                raise ServerError(f"mpxd did not stop within {timeout}s of SIGTERM; "
                                  f"killed it") from None
        self.returncode = self.process.returncode
        self._reader.join(timeout)      # the pipe ends with the process
        if not self._reader.is_alive() and self.process.stderr is not None:
            self.process.stderr.close()
        return self.returncode


def _read_log(process: subprocess.Popen, log: list[str],
              log_changed: threading.Condition) -> None:
    assert process.stderr is not None
    try:
        for raw in iter(process.stderr.readline, b""):
            with log_changed:
                log.append(raw.decode("utf-8", "replace"))
                log_changed.notify_all()
    except (OSError, ValueError):      # the pipe was closed by stop()
        pass
    with log_changed:
        log_changed.notify_all()


class LineClient:
    """A blocking line client: ``send``, ``readline``, ``ask``, ``read_all``.

    Lines are split at LF with one CR before it removed, so it reads both
    ``--eol lf`` and ``--eol crlf`` output.  Every read times out after
    ``timeout`` seconds (``socket.timeout``) rather than hanging a test.
    """

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: str | bytes) -> None:
        """Send ``data`` as it is (a ``str`` is encoded, no newline added)."""
        self.sock.sendall(data.encode("utf-8", "surrogateescape")
                          if isinstance(data, str) else data)

    def send_line(self, line: str) -> None:
        self.send(line + "\n")

    def readline(self) -> str:
        """The next line from the server, end-of-line removed."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed by the server; "
                               f"unterminated data {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if line.endswith(b"\r"):
            line = line[:-1]
        return line.decode("utf-8", "surrogateescape")

    def readlines(self, n: int) -> list[str]:
        return [self.readline() for _ in range(n)]

    def ask(self, line: str) -> str:
        """Send one line and return the first line of the answer."""
        self.send_line(line)
        return self.readline()

    def read_all(self) -> bytes:
        """Every byte until the server closes the connection."""
        chunks = [self._buffer]
        self._buffer = b""
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def shutdown_write(self) -> None:
        """Send EOF but keep reading (a half-close, like ``nc -N``)."""
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
