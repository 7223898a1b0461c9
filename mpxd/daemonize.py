"""``--daemon``: detach from the terminal, report start-up back to the caller.

The classic double fork (fork, setsid, fork) with one addition: a pipe from
the daemon back to the command the operator typed.  That command waits until
the daemon writes ``ok`` (it listens) or an error message (start-up failed),
and exits 0 or 1 accordingly, so an init script learns about a broken script
or a taken port instead of a silent, dead daemon.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

__all__ = ["Detached", "detach", "start_failed"]


def start_failed(message: str, detached: "Detached | None", daemon: bool) -> int:
    """Say why start-up failed, wherever the operator will look; return 1.

    The log first (the command ``--daemon`` left waiting may show it), then
    that command, then stderr if the log goes elsewhere (a file, syslog).
    """
    logger = logging.getLogger("mpxd")
    logger.error("%s", message)
    if detached is not None:
        detached.failed(message)
    if not daemon and logger.handlers and not any(
            getattr(h, "stream", None) is sys.stderr for h in logger.handlers):
        print(f"Error: {message}", file=sys.stderr)
    return 1


class Detached:
    """The daemon's end of the start-up pipe."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        """Tell the waiting command that the daemon listens: it exits 0."""
        self._report("ok")

    def failed(self, message: str) -> None:
        """Tell the waiting command why start-up failed: it prints that, exits 1."""
        self._report("error " + message.replace("\n", " "))

    def _report(self, text: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, text.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass        # the command was killed meanwhile; the daemon carries on
        finally:
            os.close(fd)


def detach(stdio_fd: int | None = None) -> Detached:
    """Fork into the background; only the daemon returns from this call.

    The original process waits for the daemon's report and exits with 0
    (it listens) or 1 (its error message printed to stderr).  The daemon
    runs in a new session, in ``/``, with stdin on ``/dev/null``, stdout
    and stderr on ``stdio_fd`` (the log file) or ``/dev/null``, and no other
    descriptor inherited from the caller.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child > 0:                           # the command the operator ran
        os.close(write_fd)
        _wait_for_the_daemon(read_fd, child)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:                       # the session leader steps aside
        os._exit(0)
    # First of all, the launcher learns who the daemon is (to pass a ^C on).
    os.write(write_fd, f"pid {os.getpid()}\n".encode())
    os.chdir("/")
    os.umask(0o022)
    _close_inherited_descriptors()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for stdio in (1, 2):
        os.dup2(null if stdio_fd is None else stdio_fd, stdio)
    os.close(null)
    return Detached(write_fd)


def _wait_for_the_daemon(read_fd: int, child: int) -> NoReturn:
    """The launcher: wait for the daemon's report; exit 0 (it listens) or 1.

    A ^C (or TERM) meanwhile is passed on to the daemon, which then stops
    before it serves, as the operator meant: it used to make the launcher
    say "Aborted!" and exit 1 while the daemon went on starting.
    """
    daemon: list[int] = []
    interrupted: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        interrupted.append(signum)
        if daemon:
            os.kill(daemon[0], signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, pass_on)
    os.waitpid(child, 0)                    # the session leader exits at once
    # Lines up to the report, or EOF if the daemon died: a process the
    # daemon forked may hold the pipe open long after the report.
    pending, report = b"", ""
    while not report and (chunk := os.read(read_fd, 4096)):
        pending += chunk
        while b"\n" in pending and not report:
            line, pending = pending.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            if text.startswith("pid ") and not daemon:
                daemon.append(int(text[len("pid "):]))
                if interrupted:             # before the pid came: pass it on now
                    os.kill(daemon[0], signal.SIGTERM)
            else:
                report = text
    if report == "ok" and not interrupted:
        os._exit(0)
    if report == "ok":
        message = f"interrupted as the daemon (pid {daemon[0]}) began to serve: it stops now"
    elif report.startswith("error "):
        message = report[len("error "):]
    else:
        message = "the daemon exited during start-up"
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def _close_inherited_descriptors() -> None:
    """Close the descriptors above 2 that the invoking program left open to us.

    Whatever mpxd opens itself is close-on-exec (PEP 446), so a descriptor
    without that flag was inherited: a pipe the caller reads until EOF, a
    lock it holds.  A daemon that kept it would hang or block its caller.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return                              # no /proc: leave them
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass                            # the directory listdir had open
