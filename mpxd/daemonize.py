"""``--daemon``: detach from the terminal, report start-up back to the caller.

The classic double fork (fork, setsid, fork) with one addition: a pipe from
the daemon back to the command the operator typed.  That command waits until
the daemon writes ``ok`` (it listens) or an error message (start-up failed),
and exits 0 or 1 accordingly, so an init script learns about a broken script
or a taken port instead of a silent, dead daemon.
"""

from __future__ import annotations

import os
import sys

__all__ = ["Detached", "detach"]


class Detached:
    """The daemon's end of the start-up pipe."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        self._report("ok")

    def failed(self, message: str) -> None:
        self._report("error " + message)

    def _report(self, text: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)


def detach(keep_stderr: bool = False) -> Detached:
    """Fork into the background; only the daemon returns from this call.

    The original process waits for the daemon's report and exits with 0
    (it listens) or 1 (its error message printed to stderr).
    """
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:                       # the command the operator ran
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        report = b"".join(chunks).decode("utf-8", "replace")
        if report == "ok":
            os._exit(0)
        message = report[len("error "):] if report.startswith("error ") else \
            "the daemon exited during start-up"
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:                       # the session leader steps aside
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not keep_stderr:
        os.dup2(null, 2)
    os.close(null)
    return Detached(write_fd)
