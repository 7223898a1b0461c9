"""Run the real ``mpxd`` daemon for a test: on a free port, ready when it says so.

``Server.start`` runs ``python -m mpxd --port 0 --host 127.0.0.1 ... SCRIPT``,
waits for its ``listening on`` line (which SPEC section 5 promises means
"ready"), and ``stop`` ends it with SIGTERM by pid.  Only the standard
library is used, so handler authors need nothing beyond pytest.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["Server", "LineClient", "cli_args", "ServerError"]

# 127.0.0.1, or 0.0.0.0 when a test listens on every address (it covers 127.0.0.1)
LISTENING = re.compile(r"listening on (?:127\.0\.0\.1|0\.0\.0\.0):(\d+)")
EOL_NAMES = {"\n": "lf", "\r\n": "crlf", "lf": "lf", "crlf": "crlf"}
# Flags that have a --no- form: False asks for it (the rest: False is absent).
NEGATABLE = {"session_log"}


class ServerError(Exception):
    """The daemon did not start, or did not stop, as it should."""


def cli_args(**options: Any) -> list[str]:
    """Command-line arguments from keyword options: ``idle_timeout=5`` -> ``--idle-timeout 5``.

    ``True`` gives a bare flag, ``None`` nothing, ``False`` the flag's
    ``--no-`` form where it has one (``session_log=False``:
    ``--no-session-log``); a list or tuple repeats the option
    (``allow=["10.0.0.0/8", "127.0.0.1"]``).  ``eol`` may be ``"\\r\\n"``
    as well as ``"crlf"``, so the same options work for ``Harness`` and
    ``Server``.
    """
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name == "eol":
            value = EOL_NAMES.get(value, value)
        if value is True:
            args.append(flag)
        elif value is False:
            if name in NEGATABLE:
                args.append("--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
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
        self.tls_cert: str | None = None    # --tls-cert: client() speaks TLS
        self._log = log
        self._log_changed = log_changed

    @classmethod
    def start(cls, script: str, *args: str, timeout: float = 10.0,
              env: dict[str, str] | None = None, **options: Any) -> Server:
        """Start ``mpxd`` for ``script`` with extra ``args``/``options``; wait until ready.

        Ready is the ``listening on 127.0.0.1:PORT`` log line or, whichever
        comes first, systemd's ``READY=1`` on a notification socket of the
        server's own: the log may go elsewhere (``log_file``, ``syslog``) or
        leave INFO out (``log_level="warning"``).  An ``env`` that sets
        ``NOTIFY_SOCKET`` keeps it, and then only the log line counts.
        """
        extra = [*cli_args(**options), *args]
        if "--daemon" in extra or "-d" in extra:
            raise TypeError("daemon: the test server runs in the foreground, so that "
                            "it can be stopped; --daemon would detach it out of reach")
        command = [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
                   *extra, os.path.abspath(script)]
        # Not the MPXD_ variables of the shell that runs the tests: an exported
        # MPXD_DAEMON=1 detached the server out of the fixture's reach, and
        # MPXD_WORKERS or MPXD_IDLE_TIMEOUT changed what the test tested.
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith("MPXD_")}
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        if _truthy(environment.get("MPXD_DAEMON")):
            raise TypeError("daemon: the test server runs in the foreground, so that "
                            "it can be stopped; MPXD_DAEMON would detach it out of reach")
        notify = None
        if not env or "NOTIFY_SOCKET" not in env:
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            notify.bind("")                 # Linux picks an unused abstract address
            environment["NOTIFY_SOCKET"] = "@" + notify.getsockname()[1:].decode()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=environment)
        log: list[str] = []
        log_changed = threading.Condition()
        ready: list[str] = []               # the STATUS= of READY=1, once it came
        # Read stderr for the whole run: the log is there for the test, and
        # a full pipe must never block the daemon.
        reader = threading.Thread(target=_watch, args=(process, notify, log, ready, log_changed),
                                  name=f"mpxd-log-{process.pid}", daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        with log_changed:
            while True:
                for line in log + ready:
                    match = LISTENING.search(line)
                    if match:
                        server = cls(process, int(match.group(1)), log, log_changed, reader)
                        server.tls_cert = _option_value(extra, "--tls-cert")
                        return server
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

    def client(self, timeout: float = 5.0, cert: str | None = None,
               key: str | None = None) -> LineClient:
        """A new line client connected to this server, over TLS if it has ``--tls-cert``.

        Over TLS the client trusts exactly the server's certificate (no CA,
        no host name check: a test server's certificate is often self-signed
        and names no 127.0.0.1); ``cert``/``key`` present a client
        certificate, for ``--tls-ca``.
        """
        context = None
        if self.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN   # the leaf itself
            context.load_verify_locations(os.path.abspath(self.tls_cert))
            if cert is not None:
                context.load_cert_chain(cert, key)
        elif cert is not None:
            raise ValueError("cert= is for a server started with tls_cert")
        return LineClient(self.address, timeout, context)

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


def _truthy(value: str | None) -> bool:
    """Whether click reads an environment flag as set."""
    return value is not None and value.strip().lower() in ("1", "true", "t", "yes", "y", "on")


def _option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` in command-line ``args`` (the last one), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg[len(option) + 1:]
    return value


def _watch(process: subprocess.Popen, notify: socket.socket | None, log: list[str],
           ready: list[str], log_changed: threading.Condition) -> None:
    """Collect the daemon's stderr lines into ``log`` and READY=1's status into ``ready``.

    mpxd writes its start-up lines before it sends READY=1, so stderr is
    read first whenever either has news: a test that returns on READY=1
    already finds the start-up lines in the log.
    """
    assert process.stderr is not None
    stderr = process.stderr.fileno()
    os.set_blocking(stderr, False)
    poller = select.poll()
    poller.register(stderr, select.POLLIN)
    if notify is not None:
        notify.setblocking(False)
        poller.register(notify, select.POLLIN)
    partial = b""
    try:
        while True:
            poller.poll()
            chunks, ended = _read_all_there_is(stderr)
            *lines, partial = (partial + b"".join(chunks)).split(b"\n")
            if ended and partial:           # a last line without its newline
                lines.append(partial)
            with log_changed:
                log.extend(line.decode("utf-8", "replace") + "\n" for line in lines)
                while notify is not None:
                    try:
                        fields = notify.recv(4096).decode("utf-8", "replace").split("\n")
                    except BlockingIOError:
                        break
                    if "READY=1" in fields:
                        ready.extend(f[7:] for f in fields if f.startswith("STATUS="))
                log_changed.notify_all()
            if ended:
                break
    except (OSError, ValueError):      # the pipe was closed by stop()
        pass
    finally:
        if notify is not None:
            notify.close()
        with log_changed:
            log_changed.notify_all()


def _read_all_there_is(fd: int) -> tuple[list[bytes], bool]:
    """What the pipe holds now, and whether it has ended (EOF)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return chunks, False
        if not chunk:
            return chunks, True
        chunks.append(chunk)


class LineClient:
    """A blocking line client: ``send``, ``readline``, ``ask``, ``read_all``.

    Lines are split at LF with one CR before it removed, so it reads both
    ``--eol lf`` and ``--eol crlf`` output.  Every read times out after
    ``timeout`` seconds (``socket.timeout``) rather than hanging a test.
    """

    def __init__(self, address: tuple[str, int], timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(address, timeout=timeout)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
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
        """Send EOF but keep reading (a half-close, like ``nc -N``); plain TCP only."""
        if isinstance(self.sock, ssl.SSLSocket):
            # Python's ssl cannot send close_notify and go on reading.
            raise ValueError("a TLS connection cannot be half-closed from Python: "
                             "read the answers, then close()")
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
