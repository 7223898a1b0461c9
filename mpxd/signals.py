"""Signals and cross-thread wake-ups, delivered to the poll loop as readiness.

A Python signal handler that only sets a flag does not wake ``poll()`` (PEP
475 retries the call), so the handlers here only record the signal number and
``signal.set_wakeup_fd`` makes the C-level handler write a byte to one end of
a non-blocking socketpair.  The other end sits in the poll set; when it turns
readable the loop drains it and dispatches each recorded signal.  Worker
threads use the same socketpair (``wake``) to hand results to the loop.

The one exception is the script's import, at start-up and on HUP, when the
loop does not run: inside ``interrupting()`` a stop signal (TERM, INT, QUIT) raises
``StopDuringImport``, as ^C raises KeyboardInterrupt in any Python program.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from typing import Iterator

__all__ = ["Wakeup", "HANDLED_SIGNALS", "STOP_SIGNALS", "StopDuringImport",
           "signal_handlers_kept", "tracebacks_on_fatal_signals"]

log = logging.getLogger("mpxd")

# USR2 is handled only to be ignored: its default action kills the process,
# and operators used to nginx or gunicorn send it for a binary upgrade.
# QUIT stops as TERM does: nginx and unicorn operators send it for a graceful
# stop, and its default action (a core dump) would skip the drain and clean-up.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# What a script must leave alone: mpxd's signals, and PIPE, which stays ignored.
KEPT_SIGNALS = HANDLED_SIGNALS + (signal.SIGPIPE,)
KEEP_YOURS_OUT = ("mpxd keeps its own (TERM, INT and QUIT stop gracefully, HUP reloads, USR1 "
                  "reopens logs, PIPE stays ignored so that a client going away cannot "
                  "kill the daemon): clean up in on_stop instead")
# A third stop signal the loop has not taken up, the first of them this many
# seconds old, means the loop is stuck (a handler that never returns): exit.
STUCK_AFTER = 2.0
STUCK_MESSAGE = (b"mpxd: 3 stop signals in %.0fs and the loop took up none: a handler "
                 b"(or a timer, or on_reload) is stuck; exiting now, without a drain\n")


def tracebacks_on_fatal_signals() -> None:
    """On SIGABRT, SIGSEGV and the like, write where every thread was to stderr.

    systemd's watchdog ends a daemon whose loop a handler blocks with
    SIGABRT: the journal then shows the handler's line, not only the
    restart.  A crash in a C extension shows where it was called from.
    It goes to stderr: the journal under systemd, the log file under
    ``--daemon --log-file``.
    """
    faulthandler.enable(file=2, all_threads=True)


@contextlib.contextmanager
def signal_handlers_kept(path: str, when: str) -> Iterator[None]:
    """Undo, with a warning, what the script's code inside did to the daemon's signals.

    For its import, ``on_start`` and ``on_reload``: the places where setting
    up a library sets up signal handlers.  A handler the script set at
    import was silently replaced at start-up, and after a HUP, or in
    ``on_start``, it replaced mpxd's: TERM no longer stopped the daemon.
    And PIPE must stay ignored: the CLI idiom ``signal(SIGPIPE, SIG_DFL)``
    made the first client that left during a write kill the daemon without
    a word.  (Handlers, which run for every request, are not checked each
    time: a signal that then reaches the script's handler is noticed by
    ``Wakeup.drain``.)
    """
    before = {signum: signal.getsignal(signum) for signum in KEPT_SIGNALS}
    pid = os.getpid()
    try:
        yield
    finally:
        changed = [signum for signum, handler in before.items()
                   if signal.getsignal(signum) != handler]
        # (A child the script forked got default handling back on purpose.)
        if changed and threading.current_thread() is threading.main_thread() \
                and os.getpid() == pid:
            for signum in changed:
                signal.signal(signum, before[signum])
            for wakeup in _installed:   # a TERM that came meanwhile went to the script's
                wakeup.reclaim(changed)
            names = ", ".join(signal.Signals(signum).name for signum in changed)
            log.warning("%s set its own handler for %s %s; %s", path, names, when,
                        KEEP_YOURS_OUT)


class StopDuringImport(BaseException):
    """A stop signal came while mpxd imported the script (at start-up, or on HUP).

    The loop, which would take the signal up, does not run meanwhile, and an
    import may take long (or hang): the stop must not wait for it.

    A BaseException, like KeyboardInterrupt, so that the script's own
    ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The wakeups whose handlers are installed in this process, and, per thread,
# the signal mask to restore after a fork (see _default_signals_in_child).
_installed: list[Wakeup] = []
_forking = threading.local()


def _block_before_fork() -> None:
    _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS) \
        if _installed else None


def _unblock_after_fork() -> None:
    mask, _forking.mask = getattr(_forking, "mask", None), None
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _default_signals_in_child() -> None:
    """In a process forked from mpxd, give the signals their handling back.

    A script that forks at import, ``multiprocessing`` with the fork start
    method, a handler's ``os.fork()``: the child inherited mpxd's handlers,
    which only record.  ``Process.terminate()`` (a SIGTERM) then did
    nothing, and during start-up a TERM made the child run mpxd's clean-up
    and remove the daemon's own pidfile and sockets.  The signals stay
    blocked across the fork, so one sent at once (``terminate()`` right
    after ``start()``) meets the restored handling, not the recording one.
    """
    for wakeup in list(_installed):
        try:
            wakeup.uninstall()
        except (ValueError, OSError):   # not the main thread after all: leave it
            pass
        wakeup._interrupting = False
    _installed.clear()
    _unblock_after_fork()


os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork,
                    after_in_child=_default_signals_in_child)


class Wakeup:
    """A socketpair that signals and threads write to and the loop reads."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self.pending: list[int] = []
        self._stops: list[float] = []      # when each pending stop signal came
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None
        self._interrupting = False

    def fileno(self) -> int:
        """The end the loop polls for readability."""
        return self._reader.fileno()

    def filenos(self) -> list[int]:
        """Both ends (-1 once closed)."""
        return [self._reader.fileno(), self._writer.fileno()]

    @property
    def installed(self) -> bool:
        return self._previous_fd is not None

    def install(self, signals: tuple[int, ...] = HANDLED_SIGNALS) -> None:
        """Route ``signals`` to this wakeup (main thread only; again: no-op)."""
        if self._previous_fd is not None:
            return
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(),
                                                 warn_on_full_buffer=False)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._record)
        _installed.append(self)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Make a stop signal raise ``StopDuringImport`` in the code inside.

        For the script's import, which may take long: the loop, which
        would take the signal up, does not run meanwhile.  Raised also
        on the way in and out if a stop signal is pending: one that came
        just before, or that the code inside caught and went on.
        """
        self._raise_if_stop_pending()
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False
        self._raise_if_stop_pending()

    def _raise_if_stop_pending(self) -> None:
        pending = self.stop_pending
        if pending is not None:
            raise StopDuringImport(pending)

    @property
    def stop_pending(self) -> int | None:
        """The first stop signal not taken up yet, if any."""
        return next((signum for signum in self.pending if signum in STOP_SIGNALS), None)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before ``install``."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        if self in _installed:
            _installed.remove(self)

    def _record(self, signum: int, frame: object) -> None:
        # NO LOGGING, no work: just queue the signal for the loop...
        self.pending.append(signum)
        if signum in STOP_SIGNALS:
            # ...unless the loop is stuck and an operator presses ^C again
            # and again: then the only way out would be SIGKILL.
            now = time.monotonic()
            self._stops.append(now)
            if len(self._stops) >= 3 and now - self._stops[0] >= STUCK_AFTER:
                os.write(2, STUCK_MESSAGE % (now - self._stops[0]))
                faulthandler.dump_traceback(2, all_threads=True)    # where it is stuck
                os._exit(1)
            if self._interrupting:
                self._interrupting = False      # once: cleanup code is not interrupted
                raise StopDuringImport(signum)

    def wake(self) -> None:
        """Make the loop's poll return soon; callable from any thread."""
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already guarantees a wake-up

    def drain(self) -> list[int]:
        """Empty the socketpair; return (and forget) the recorded signals."""
        came = b""
        try:
            while data := self._reader.recv(4096):
                came += data
        except (BlockingIOError, InterruptedError):
            pass
        if came.strip(b"\0"):              # signal numbers, from the C-level handler
            self._take_back(set(came) - {0})
        pending, self.pending = self.pending, []
        self._stops.clear()
        return pending

    def reclaim(self, signums: list[int]) -> None:
        """Record the signals of ``signums`` that reached another handler than ours.

        Their numbers are in the wakeup socket (the C-level handler writes
        them whichever Python handler runs) but not in ``pending``.
        """
        try:
            came = self._reader.recv(4096, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, OSError):
            return
        for signum in signums:
            if signum in self._previous:
                self.pending += [signum] * (came.count(signum) - self.pending.count(signum))

    def _take_back(self, signums: set[int]) -> None:
        """Signals that came to a handler the script set after start-up: take them back.

        The C-level handler writes every signal's number to the wakeup fd,
        whichever Python handler then runs; a signal of ours that ours did
        not record went to a handler a request handler or a timer set.
        """
        for signum in sorted(signums):
            if signum not in self._previous or signal.getsignal(signum) == self._record:
                continue
            signal.signal(signum, self._record)
            if signum not in self.pending:
                self.pending.append(signum)
            log.warning("%s reached a handler the script set after start-up; %s",
                        signal.Signals(signum).name, KEEP_YOURS_OUT)

    def close(self) -> None:
        """Uninstall the signal handlers and close both ends."""
        self.uninstall()
        self._reader.close()
        self._writer.close()

    def close_for_exit(self) -> None:
        """Close, and ignore mpxd's signals from now on: the process is ending.

        Restoring their default action would let a signal sent after the
        loop stopped (an operator's second TERM, systemd's) kill the last
        steps of a clean exit (removing the pidfile and sockets, the last
        log lines) and turn exit status 0 into "killed by SIGTERM".
        """
        for signum in [n for n in self._previous if n in HANDLED_SIGNALS]:
            # Straight from our handler to SIG_IGN: restoring the default
            # first, even for microseconds, is the window this closes.
            signal.signal(signum, signal.SIG_IGN)
            del self._previous[signum]
        self.close()                    # the rest (SIGCHLD), the wakeup fd, the sockets
