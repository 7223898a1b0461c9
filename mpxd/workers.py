"""``--workers N``: N worker processes share the port; a small parent supervises.

Each worker is a whole mpxd: its own poll loop, its own copy of the handler
script and so its own module globals (a ``global`` counter counts per
worker; state shared between workers belongs in a store such as Redis, see
docs/scaling.md).  The workers listen on the same port with ``SO_REUSEPORT``:
each has its own listening socket and the kernel spreads new connections
across them, so there is no accept contention and no lock.

The parent never runs handler code.  It

* binds (without listening) one socket per address with ``SO_REUSEPORT``:
  that picks the port for ``--port 0`` and keeps it while workers restart;
  a socket that does not listen is never handed a connection;
* forks the workers, each of which binds its own listening socket to that
  port, drops privileges, loads the script and reports "ready" on a pipe;
  only once every worker is ready does the parent log ``listening on
  HOST:PORT``, tell systemd READY=1 and release ``--daemon``'s caller;
* restarts a worker that dies, at once after a long life, with a growing
  delay (0.5 s doubling to 30 s) while it keeps dying young;
* forwards TERM, INT, QUIT, HUP and USR1 to every worker (and reopens its own log
  files on USR1); on a stop signal it waits for the workers to drain and exit,
  kills those still there ``--drain-timeout`` + 5 s later, removes the
  pidfile and exits 0 if every worker exited cleanly;
* holds the pidfile; the workers hold the port;
* under a systemd watchdog, sends ``WATCHDOG=1`` only while every ready
  worker's loop sends it a heartbeat on that pipe: a worker blocked by a
  handler gets the service restarted, as a blocked single process does.

Sockets passed by systemd (``LISTEN_FDS``) are inherited by every worker
instead: one shared listening socket, no ``SO_REUSEPORT``.

Workers are forked with the forwarded signals blocked and unblock them once
their own handlers are installed, so a signal forwarded during start-up is
never lost; a TERM stops a worker's slow script import at once.  Each worker
runs in its own process group (a Ctrl-C in the terminal reaches the parent
only, which forwards it once) and gets SIGTERM from the kernel if the parent
dies (``PR_SET_PDEATHSIG``).

The parent keeps the privileges it was started with, so that a restarted
worker can bind a port below 1024 again; only the workers switch to
``--user``/``--group``.  A restarted worker loads the script as it is on
disk at that moment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback

import click

from .config import Config
from .core import Core
from .daemonize import Detached, detach, start_failed
from .edge import Edge
from .listeners import ListenError, bind_listeners, describe
from .forks import keep_from_children
from .logs import counted, reopen_log_files, setup_logging
from .loop import MAX_WAIT, USR2_IGNORED, Loop, prepare_listeners
from .pidfile import PidFile, PidFileError
from .privileges import PrivilegeError, drop_privileges, ids_of
from .script import ScriptError, load_script
from .signals import (HANDLED_SIGNALS, STOP_SIGNALS, StopDuringImport, Wakeup,
                      tracebacks_on_fatal_signals)
from .systemd import Notifier
from .timers import TimerHeap

__all__ = ["supervise", "Supervisor"]

log = logging.getLogger("mpxd")

FORWARDED = HANDLED_SIGNALS                 # TERM, INT, QUIT, HUP, USR1 (USR2: not)
STABLE_AFTER = 10.0     # a worker that lived this long and died restarts at once
BACKOFF_FIRST = 0.5     # seconds before restarting a worker that died young
BACKOFF_MAX = 30.0
KILL_GRACE = 5.0        # seconds past --drain-timeout before SIGKILL
STATUS_INTERVAL = 5.0   # seconds between systemd STATUS= updates
PR_SET_PDEATHSIG = 1


class Worker:
    """One worker slot: its number stays, its process changes on restart."""

    __slots__ = ("number", "pid", "status_fd", "ready", "started", "young_deaths",
                 "message", "last_beat")
    # On its pipe a worker writes "ready" or "error MESSAGE" once, then lines:
    # "alive" (heartbeats, under a watchdog) and, after each HUP, "reloaded"
    # or "reload failed MESSAGE".

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid: int | None = None
        self.status_fd: int | None = None   # read end of the "ready"/"error" pipe
        self.ready = False
        self.started = 0.0
        self.young_deaths = 0               # deaths in a row, each soon after start
        self.message = ""                   # what the worker wrote on its pipe
        self.last_beat = 0.0                # when it last said "alive" (watchdog)

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.pid})"


def supervise(config: Config, inherited: list[socket.socket], count: int) -> int:
    """Start up like ``cli.run`` does, run ``count`` workers; return the exit status."""
    if config.unix or config.control:
        # One path can hold one socket: N workers cannot each bind it.
        raise click.UsageError("--unix and --control cannot be used with --workers")
    detached: Detached | None = None
    try:
        reopenable = setup_logging(config.log_level, config.log_file, config.syslog,
                                   redirect_stdio=config.daemon)
    except OSError as e:
        click.echo(f"Error: cannot open log file {config.log_file}: {e.strerror}", err=True)
        return 1
    if config.daemon:
        if not config.log_file and not config.syslog:
            log.warning("--daemon without --log-file or --syslog: log lines are discarded")
        detached = detach(reopenable[0].stream.fileno() if reopenable else None)
    tracebacks_on_fatal_signals()       # the workers, forked, keep it
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    try:
        if pidfile is not None:
            pidfile.acquire()
        held = inherited or bind_listeners(config.hosts, config.port or 0, config.backlog,
                                           reuse_port=True, listen=False, refuse_taken=True)
    except (PidFileError, ListenError) as e:
        if pidfile is not None:
            pidfile.release()
        return start_failed(str(e), detached, config.daemon)

    # A log file USR1 makes anew is the supervisor's, which keeps root: the
    # workers, which reopen it next, could not write to it.
    owner = ids_of(config.user, config.group)
    supervisor = Supervisor(config, count, held, shared=bool(inherited),
                            notifier=Notifier.from_environment(), detached=detached,
                            reopen_logs=lambda: reopen_log_files(reopenable, owner))
    try:
        status = supervisor.run()
    finally:
        for sock in held:
            sock.close()
        if pidfile is not None:
            pidfile.release()
    if supervisor.failure:
        return start_failed(supervisor.failure, detached, config.daemon)
    log.info("stopped")
    return status


class Supervisor:
    """The parent: forks, watches, restarts and signals the workers."""

    def __init__(self, config: Config, count: int, held: list[socket.socket], *,
                 shared: bool, notifier: Notifier, detached: Detached | None = None,
                 reopen_logs=None) -> None:
        self.config = config
        self.held = held                # reserved (or, if shared, inherited) sockets
        self.shared = shared
        self.port = held[0].getsockname()[1] if held and not shared else 0
        self.notifier = notifier
        self.detached = detached
        self.reopen_logs = reopen_logs
        self.workers = [Worker(n) for n in range(1, count + 1)]
        self.timers = TimerHeap()
        self.wakeup = Wakeup()
        self.poller = select.poll()
        self.announced = False          # "listening on" logged, READY=1 sent
        self.stopping = False
        self.failure = ""               # why start-up failed, if it did
        self.watchdog_held = False      # a silent worker stopped the WATCHDOG=1 pings
        self.reloading: set[int] = set()    # workers whose HUP reload has not ended
        self.reload_failures: list[str] = []
        self.hup_again = False          # a HUP came during a reload: one more after it
        self.unclean = False            # a worker exited badly during shutdown

    # ------------------------------------------------------------ running

    def run(self) -> int:
        """Fork the workers and supervise them until they all exited on TERM."""
        self.wakeup.install(FORWARDED + (signal.SIGCHLD,))
        self.poller.register(self.wakeup.fileno(), select.POLLIN)
        try:
            for worker in self.workers:
                if not self.stopping:       # a failed fork stops start-up
                    self._spawn(worker)
            if self.notifier.enabled:
                self._every(STATUS_INTERVAL, self._report_status)
                if self.notifier.watchdog_interval:
                    self._every(self.notifier.watchdog_interval, self._watchdog)
            while not (self.stopping and self._alive() == 0):
                self._wait()
        finally:
            self.wakeup.close_for_exit()
            self.notifier.close()
        return 1 if self.unclean else 0

    def _wait(self) -> None:
        deadline = self.timers.next_deadline()
        timeout = None if deadline is None else \
            min(max(0.0, deadline - time.monotonic()), MAX_WAIT)   # see MAX_WAIT
        events = self.poller.poll(None if timeout is None else timeout * 1000.0)
        for fd, _mask in events:
            if fd == self.wakeup.fileno():
                for signum in self.wakeup.drain():
                    self._on_signal(signum)
            else:
                worker = next((w for w in self.workers if w.status_fd == fd), None)
                if worker is not None:
                    self._read_status(worker)
        self._reap()
        self.timers.run_due(time.monotonic(), lambda timer: timer.callback(*timer.args))
        if not self.announced and not self.stopping and all(w.ready for w in self.workers):
            self._announce()

    def _alive(self) -> int:
        return sum(1 for w in self.workers if w.pid is not None)

    def _every(self, interval: float, fn) -> None:
        self.timers.add(time.monotonic() + interval, fn, (), interval)

    def _announce(self) -> None:
        """Every worker listens: now the service is ready."""
        self.announced = True
        log.info("%d workers ready: pids %s", len(self.workers),
                 " ".join(str(w.pid) for w in self.workers))
        for sock in self.held:
            log.info("listening on %s", describe(sock))
        self.notifier.ready(f"listening on {', '.join(describe(s) for s in self.held)} "
                            f"with {len(self.workers)} workers")
        if self.detached is not None:
            self.detached.ready()

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return                      # _reap runs after every wake-up
        if signum in STOP_SIGNALS:
            if self.stopping:
                log.info("second stop signal: passing it on, workers close sessions now")
            else:
                self._stop(f"shutting down: stopping {self._alive()} workers")
                if not self.announced and self.detached is not None:
                    # The --daemon command still waits: it got no daemon.
                    self.detached.failed(f"{signal.Signals(signum).name} during "
                                         "start-up: stopped before serving")
            self._forward(signum)
        elif signum == signal.SIGHUP:
            if self.stopping:
                return
            if not self.announced:
                # Each worker reloads once it serves; READY=1 comes with "listening on".
                log.info("HUP during start-up: passing it on to the workers")
                self._forward(signum)
                return
            if self.reloading:
                # One reload at a time: workers could merge two HUPs into one
                # reload and answer once, and an answer to the first would
                # end the second's wait.
                self.hup_again = True
                return
            log.info("reloading: passing HUP on to %d workers", self._alive())
            self.notifier.reloading()
            self.reloading = {w.number for w in self.workers if w.ready}
            self.reload_failures = []
            self._forward(signum)
            self._reload_ended_if_done()
        elif signum == signal.SIGUSR1:
            if self.reopen_logs is not None:
                self.reopen_logs()
            self._forward(signum)
        elif signum == signal.SIGUSR2:
            log.warning(USR2_IGNORED)   # and not passed on: one warning is enough

    def _reloaded(self, worker: Worker, failure: str | None) -> None:
        """``worker`` reported how its reload ended (or it exited meanwhile)."""
        if worker.number not in self.reloading:
            return
        self.reloading.discard(worker.number)
        if failure:
            self.reload_failures.append(failure)
        self._reload_ended_if_done()

    def _reload_ended_if_done(self) -> None:
        """Every worker reloaded or refused: systemd's reload ends (READY=1)."""
        if self.reloading:
            return
        if self.stopping:           # a stop abandoned the reload: STOPPING=1 says it
            self.reload_failures = []
            return
        if self.reload_failures:
            failure = self.reload_failures[0]
            log.error("reload failed in %s: %s",
                      counted(len(self.reload_failures), "worker"), failure)
            self.notifier.ready(f"reload failed: {failure}; {self._status_text()}")
        else:
            log.info("every worker reloaded")
            self.notifier.ready(self._status_text())
        self.reload_failures = []
        if self.hup_again:
            self.hup_again = False
            self._on_signal(signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        for worker in self.workers:
            if worker.pid is not None:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass                # exited; _reap will see it

    def _stop(self, why: str) -> None:
        """Stop restarting; the caller forwards TERM; SIGKILL comes later."""
        log.info("%s", why)
        self.stopping = True
        self.notifier.stopping(why)
        self.timers.add(time.monotonic() + self.config.drain_timeout + KILL_GRACE,
                        self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.pid is not None:
                log.warning("%s still running %gs after TERM: killing it", worker.name,
                            self.config.drain_timeout + KILL_GRACE)
                self.unclean = True
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ----------------------------------------------------- worker deaths

    def _read_status(self, worker: Worker, final: bool = False) -> None:
        """Read what the worker wrote: "ready", or "error MESSAGE"; close at EOF.

        ``final``: the worker has exited; take what is there and close the
        pipe even without EOF (a process the script forked may hold it).
        """
        fd = worker.status_fd
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                if not final:
                    return
                data = b""
            except OSError:
                data = b""
            if not data:
                break
            worker.message += data.decode("utf-8", "replace")
            if worker.message.startswith("error "):
                continue                    # all of it, until the worker exits
            worker.last_beat = time.monotonic()     # any line: its loop runs
            *lines, worker.message = worker.message.split("\n")
            for line in lines:
                if line == "ready" and not worker.ready:
                    worker.ready = True
                    if self.announced:
                        log.info("%s ready", worker.name)
                elif line == "reloaded" or line.startswith("reload failed "):
                    # (A HUP during start-up comes before "ready": not waited for.)
                    self._reloaded(worker, line[len("reload failed "):] or None)
        self.poller.unregister(fd)
        os.close(fd)
        worker.status_fd = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._exited(worker, status)

    def _exited(self, worker: Worker, status: int) -> None:
        if worker.status_fd is not None:
            self._read_status(worker, final=True)
        code = os.waitstatus_to_exitcode(status)
        how = f"exited with status {code}" if code >= 0 else \
            f"was killed by {signal.Signals(-code).name}"
        error = worker.message[len("error "):].strip() \
            if worker.message.startswith("error ") else ""
        was_ready, lived = worker.ready, time.monotonic() - worker.started
        name = worker.name
        worker.pid = None
        worker.ready = False
        self._reloaded(worker, None)        # a reload waits for it no longer
        if self.stopping:
            if error and error == self.failure:
                log.debug("%s %s: %s", name, how, error)    # said once already
            elif code != 0:
                self.unclean = True
                log.warning("%s %s%s", name, how, f": {error}" if error else "")
            else:
                log.info("%s exited", name)
            return
        if not self.announced:
            # Start-up failed: a broken script or a port in use fails the same
            # way in every worker, so say it once and stop the others.
            self.failure = error or f"{name} {how} during start-up"
            self._stop("start-up failed: stopping the other workers")
            self._forward(signal.SIGTERM)
            return
        cause = error or (how if was_ready else f"{how} before it was ready")
        self._restart_later(worker, lived, f"{name} {cause}")

    def _restart_later(self, worker: Worker, lived: float, what: str) -> None:
        """At once after a long life; with a doubling delay while it dies young."""
        if lived >= STABLE_AFTER:
            worker.young_deaths = 0
            delay = 0.0
        else:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** worker.young_deaths)
            worker.young_deaths += 1
        log.error("%s; restarting it%s", what, f" in {delay:g}s" if delay else "")
        self.timers.add(time.monotonic() + delay, self._respawn, (worker,))

    def _respawn(self, worker: Worker) -> None:
        if not self.stopping and worker.pid is None:
            self._spawn(worker)

    # ------------------------------------------------------------ forking

    def _spawn(self, worker: Worker) -> None:
        """Fork one worker; it reports on a pipe when it serves or why it cannot."""
        read_fd, write_fd = os.pipe()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                self._become_worker(worker, write_fd)     # never returns
        except OSError as e:                # EAGAIN, ENOMEM: try again later
            os.close(read_fd)
            os.close(write_fd)
            if not self.announced:
                self.failure = f"cannot start worker {worker.number}: {e.strerror}"
                self._stop("start-up failed: stopping the other workers")
                self._forward(signal.SIGTERM)
            else:
                self._restart_later(worker, 0.0, f"cannot start worker {worker.number}: "
                                                 f"{e.strerror}")
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        worker.pid = pid
        worker.status_fd = read_fd
        worker.ready = False
        worker.message = ""
        worker.started = time.monotonic()
        self.poller.register(read_fd, select.POLLIN)

    def _become_worker(self, worker: Worker, status_fd: int) -> None:
        """In the child: forget the parent's state, then serve until stopped."""
        code = 1
        try:
            parent = os.getppid()
            self.wakeup.close()         # the parent's signal handlers and socketpair
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for other in self.workers:
                if other.status_fd is not None:
                    os.close(other.status_fd)
            if not self.shared:
                for sock in self.held:  # the port reservation is the parent's
                    sock.close()
            if self.detached is not None and self.detached._fd is not None:
                # --daemon's caller waits for EOF on this pipe: only the
                # parent may hold it open.
                os.close(self.detached._fd)
                self.detached._fd = None
            os.setpgid(0, 0)
            code = _serve_as_worker(self.config, worker.number, status_fd,
                                    self.held if self.shared else None, self.port,
                                    self.reopen_logs, parent,
                                    heartbeat=self.notifier.watchdog_interval)
        except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
            try:
                log.error("worker %d failed:\n%s", worker.number, traceback.format_exc().rstrip())
            except BaseException:  # noqa: BLE001
                pass
        finally:
            for handler in logging.getLogger("mpxd").handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001
                    pass
            os._exit(code)

    # ------------------------------------------------------------- status

    def _status_text(self) -> str:
        return f"{sum(1 for w in self.workers if w.ready)} of {len(self.workers)} workers ready"

    def _report_status(self) -> None:
        self.notifier.status(self._status_text())

    def _watchdog(self) -> None:
        """``WATCHDOG=1``, unless a ready worker's loop has stopped sending heartbeats."""
        interval = self.notifier.watchdog_interval or 0.0
        now = time.monotonic()
        silent = [w for w in self.workers
                  if w.ready and w.pid is not None and now - w.last_beat > 1.5 * interval]
        if not silent:
            if self.watchdog_held:
                log.info("every worker sends heartbeats again: watchdog pings resume")
            self.watchdog_held = False
            self.notifier.watchdog()
        elif not self.watchdog_held:
            self.watchdog_held = True
            log.error("%s sent no heartbeat for %.1fs: its loop is blocked; not "
                      "telling systemd's watchdog that the service is alive",
                      ", ".join(w.name for w in silent), now - min(w.last_beat for w in silent))


def _serve_as_worker(config: Config, number: int, status_fd: int,
                     shared: list[socket.socket] | None, port: int,
                     reopen_logs, parent: int, heartbeat: float | None = None) -> int:
    """A worker's life: bind, drop privileges, load the script, serve; exit status.

    ``heartbeat``: under a systemd watchdog, the pipe stays open after
    "ready" and the loop writes "alive" on it every ``heartbeat`` seconds.
    """
    # Forwarded signals were blocked since the fork, so that none met the
    # default actions the fork gave back (mpxd.signals); from now on they
    # are this worker's own, and a TERM stops a slow import at once.
    wakeup = Wakeup()
    wakeup.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    try:
        listeners = shared or bind_listeners(config.hosts, port, config.backlog,
                                             reuse_port=True, warn=False)
        edge = Edge.open(config)        # TLS files, rules, limits: per worker
        prepare_listeners(listeners, config.keepalive)
        drop_privileges(config.user, config.group, warn=number == 1)
        _die_with_parent(parent)
        handlers = load_script(config.script, interruptible=False, stoppable_by=wakeup)
    except (ListenError, PrivilegeError, ScriptError) as e:
        _report(status_fd, f"error {e}")
        return 1
    except StopDuringImport as e:
        wakeup.close_for_exit()
        log.info("worker %d: %s during start-up: stopped before serving", number, e)
        return 0
    core = Core(handlers, config)
    del handlers     # the core holds the script now: a HUP can let this version go
    loop = Loop(core, config, listeners, Notifier(None), reopen_logs=reopen_logs,
                wakeup=wakeup)
    loop.install_signals()
    edge.install(loop, warn=number == 1)   # a warning about the options: once
    if not core.start():                # on_start raised (logged): do not serve
        core.stop(run_on_stop=False)
        _report(status_fd, f"error {config.script}: on_start failed in worker {number} "
                           "(its traceback is in the log); not serving")
        return 1
    # "ready" from the loop's first pass: on_start has run and it accepts.
    # The pipe stays open for how each HUP reload ended, and for heartbeats.
    core.call_later(0, _report, status_fd, "ready", False)
    os.set_blocking(status_fd, False)       # a line is dropped rather than wait
    keep_from_children(lambda: [status_fd])   # a process the script forks: not its business
    loop.reload_done = lambda failure: _report(
        status_fd, "reloaded" if failure is None else
        "reload failed " + " ".join(failure.split()), False)
    if heartbeat is not None:
        core.call_every(heartbeat, _beat, status_fd)
    try:
        loop.run()
    finally:
        edge.close()
    log.info("worker %d stopped", number)
    return 0


def _report(fd: int, text: str, close: bool = True) -> None:
    try:
        os.write(fd, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass                            # the parent is gone; PDEATHSIG follows
    finally:
        if close:
            os.close(fd)


def _beat(fd: int) -> None:
    """The loop runs: tell the parent, for systemd's watchdog."""
    try:
        os.write(fd, b"alive\n")
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the parent dies (after the uid change, which clears it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.debug("prctl unavailable: %s", e)
    if os.getppid() != parent:          # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
