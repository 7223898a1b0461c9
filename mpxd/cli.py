"""The ``mpxd`` command: options to a frozen ``Config``, errors to exit codes.

Exit status: 0 clean shutdown, 1 runtime or script error (including a taken
port or pidfile), 2 usage error.  Every error a user can cause is one line on
stderr, never a traceback.
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import re
import signal
import sys
import threading
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from . import __version__
from .config import Config, water_marks
from .core import Core
from .daemonize import Detached, detach, start_failed
from .edge import Edge, edge_options, edge_settings
from .listeners import ListenError, bind_listeners, describe
from .logs import LEVELS, counted, reopen_log_files, setup_logging
from .loop import Loop, prepare_listeners, raise_descriptor_limit
from .pidfile import PidFile, PidFileError
from .privileges import PrivilegeError, drop_privileges
from .script import ScriptError, load_script
from .signals import StopDuringImport, Wakeup, tracebacks_on_fatal_signals
from .systemd import Notifier, listen_fds
from .workers import supervise

log = logging.getLogger("mpxd")

EOLS = {"lf": "\n", "crlf": "\r\n"}


class StartupError(Exception):
    """Start-up failed for a reason the message explains; exit status 1."""


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 <= value < math.inf:    # nan fails too
        raise click.BadParameter(f"must be 0 or more seconds, and finite (not {value})")
    return value or None if param.name in ("idle_timeout", "send_timeout") else value


class _Command(click.Command):
    """click's command, but a bad value from the environment is named as such.

    click reports it under the option's name ("Invalid value for '--port'"),
    and an operator whose /etc/mpxd/NAME.env holds MPXD_PORT=abc looks for
    a --port nobody typed.
    """

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.BadParameter as e:
            ctx, param = e.ctx, e.param
            if ctx is not None and param is not None and param.name and \
                    ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
                e.param_hint = f"{_envvar(param)} (from the environment)"
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            # "--unix and --control cannot be used with --workers": say which
            # of the options it names nobody typed.
            from_env = [f"{opt} from {_envvar(param)}" for param in self.params
                        if isinstance(param, click.Option) and param.name
                        and ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
                        for opt in param.opts if opt.startswith("--")
                        and re.search(re.escape(opt) + r"\b", e.message)]
            if from_env:
                e.message += f" ({', '.join(from_env)} in the environment)"
            raise


def _envvar(param: click.Parameter) -> str:
    return param.envvar if isinstance(param.envvar, str) else f"MPXD_{(param.name or '').upper()}"


@click.command(cls=_Command,
               context_settings={"help_option_names": ["-h", "--help"],
                                 "auto_envvar_prefix": "MPXD",
                                 "max_content_width": 100})
@click.argument("script", type=click.Path(dir_okay=True, path_type=str))
@click.option("--port", "-p", type=click.IntRange(0, 65535),
              help="TCP port to listen on; 0 picks a free one. Not needed "
                   "under systemd socket activation.")
@click.option("--host", "hosts", multiple=True, metavar="ADDRESS", envvar="MPXD_HOST",
              help="Address to listen on, or a name (every address it resolves "
                   "to); repeatable. Default: 127.0.0.1 and ::1. Use 0.0.0.0 and :: "
                   "for all interfaces.")
@click.option("--eol", type=click.Choice(sorted(EOLS), case_sensitive=False), default="lf", show_default=True,
              help="End-of-line written after each response.")
@click.option("--poller", type=click.Choice(["epoll", "poll"], case_sensitive=False), default="epoll",
              show_default=True, help="Readiness mechanism (epoll falls back to "
                                      "poll where the system has none).")
@click.option("--max-line", type=click.IntRange(1), default=65536, show_default=True,
              metavar="BYTES", help="Longest accepted input line; a longer one gets "
                                    "'ERROR line too long' and the session is closed.")
@click.option("--max-output", type=click.IntRange(1), default=16 * 1024 * 1024,
              show_default=True, metavar="BYTES",
              help="Unsent output at which a session that does not read is closed. "
                   "Input stops being read past 1 MiB (or a sixteenth of this).")
@click.option("--max-connections", type=click.IntRange(0), default=0, metavar="N",
              help="Open sessions at most; more clients wait in the listen backlog. "
                   "Default 0: the file-descriptor limit less 32 (mpxd raises its "
                   "soft limit to the hard one, ulimit -Hn).")
@click.option("--idle-timeout", type=float, default=None, metavar="SECONDS",
              callback=_seconds, help="Close sessions without input for this long. "
                                      "Default: never.")
@click.option("--keepalive", type=click.IntRange(0, 32767), default=300, show_default=True,
              metavar="SECONDS",
              help="TCP keepalive: probe a client that has been silent this long (3 "
                   "probes, a third of it apart) and close it, as a reset, when its "
                   "machine is gone. 0: off.")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True,
              metavar="SECONDS", callback=_seconds,
              help="On TERM/INT/QUIT, how long queued output may take before sessions "
                   "are closed anyway.")
@click.option("--send-timeout", type=float, default=60.0, show_default=True,
              metavar="SECONDS", callback=_seconds,
              help="A session that closes (idle timeout, close_session, EOF, an "
                   "error) writes its queued output first; a client that takes none "
                   "of it for this long is dropped. 0: wait for ever.")
@click.option("--threads", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Worker threads for mpxd.run_in_thread.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes sharing the port (SO_REUSEPORT) under a "
                   "supervising parent; each has its own module globals.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Write the pid here and hold a lock on it; a second instance "
                   "with the same pidfile refuses to start.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Log to this file instead of stderr; SIGUSR1 reopens it.")
@click.option("--syslog", is_flag=True, help="Log to syslog (facility daemon).")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info",
              show_default=True,
              help="Least severe level logged ('listening on' and the other start, "
                   "reload and stop lines are INFO).")
@click.option("--session-log/--no-session-log", default=True, show_default=True,
              help="Log one INFO line per closed session (peer, duration, requests, "
                   "bytes, reason).  Under heavy connection churn writing it is "
                   "about 15% of the CPU per connection.")
@click.option("--daemon", "-d", "daemonize", is_flag=True, envvar="MPXD_DAEMON",
              help="Detach into the background (for a plain init); the command "
                   "exits 0 once the daemon listens.")
@click.option("--user", default=None, help="Switch to this user after binding.")
@click.option("--group", default=None, help="Switch to this group after binding "
                                           "(default: the user's group).")
@click.option("--check", is_flag=True,
              help="Only load and validate SCRIPT (as --user, if given); exit 0 if "
                   "it is usable, else 1.")
@edge_options       # --tls-*, --unix*, --allow, --deny, --max-per-ip, --max-rate, --control
@click.version_option(__version__, "--version", "-V", prog_name="mpxd")
def main(script: str, port: int | None, hosts: tuple[str, ...], eol: str, poller: str,
         max_line: int, max_output: int, max_connections: int,
         idle_timeout: float | None, keepalive: int, drain_timeout: float,
         send_timeout: float | None, threads: int,
         workers: int,
         pidfile: str | None, log_file: str | None, syslog: bool, log_level: str,
         session_log: bool,
         daemonize: bool, user: str | None, group: str | None, check: bool,
         **edge: Any) -> None:
    """Serve a line-based TCP protocol from the handler functions in SCRIPT.

    SCRIPT is a Python file defining handle_request(s) and optionally
    handle_open(s) and handle_close(s).  mpxd calls handle_request once per
    input line with s.request set and sends back what s.response holds.

    \b
    Example:
      mpxd --port 47110 handlers/counter.py
      printf '1\\n1\\n5 global\\n' | nc -N localhost 47110

    Signals: TERM/INT/QUIT drain and stop, HUP reloads SCRIPT, USR1 reopens logs.
    Every option can also be set as MPXD_<OPTION>, e.g. MPXD_PORT=47110.
    """
    _standard_descriptors_open()
    if any(not host.strip() for host in hosts):
        raise click.UsageError("--host needs an address (0.0.0.0 or :: for all "
                               "interfaces)")
    for option, path in (("--pidfile", pidfile), ("--log-file", log_file),
                         ("--control", edge.get("control"))):
        if path is not None and not path.strip():
            # --pidfile "$PIDFILE" with the variable unset: no pidfile at
            # all, without a word, and the init script's kill found nothing.
            raise click.UsageError(f"{option} needs a path")
    if check:
        setup_logging("warning")    # what loading the script warns about
        try:
            # As at start-up, where the script is loaded after --user took effect.
            drop_privileges(user, group)
            load_script(script)
        except (PrivilegeError, ScriptError) as e:
            click.echo(f"Error: {e}", err=True)
            _exit(1)
        click.echo(f"{os.path.abspath(script)}: ok")
        _exit(0)

    high_water, low_water = water_marks(max_output)
    config = Config(
        script=os.path.abspath(script), port=port,
        hosts=tuple(hosts) or ("127.0.0.1", "::1"), eol=EOLS[eol], poller=poller,
        max_line=max_line, high_water=high_water, low_water=low_water,
        max_output=max_output, max_connections=max_connections,
        idle_timeout=idle_timeout, keepalive=keepalive, drain_timeout=drain_timeout,
        send_timeout=send_timeout, threads=threads,
        pidfile=os.path.abspath(pidfile) if pidfile else None,
        log_file=os.path.abspath(log_file) if log_file else None,
        log_level=log_level, session_log=session_log, syslog=syslog, daemon=daemonize,
        user=user, group=group,
        **edge_settings(edge),
    )
    try:
        inherited = listen_fds()
    except ListenError as e:
        raise click.ClickException(str(e)) from None
    if port is None and not inherited and not config.unix:
        raise click.UsageError("no --port given and no sockets passed by systemd "
                               "(LISTEN_FDS); say where to listen, e.g. --port 47110")
    raise_descriptor_limit()
    _line_buffered_stdout()
    if workers > 1:
        sys.exit(supervise(config, inherited, workers))
    _exit(run(config, inherited))


def _standard_descriptors_open() -> None:
    """Point a closed stdin, stdout or stderr at /dev/null, before anything opens a file.

    Started with them closed (an init script's ``>&-``), mpxd gave descriptor
    1 to the pidfile and 2 to a listening socket: what a child process or a
    C library then wrote to "stdout" landed in the pidfile.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)     # the lowest free: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _line_buffered_stdout() -> None:
    """Let each ``print()`` of handler code out when it ends its line, whatever it holds.

    Python buffers stdout in 8 KiB blocks when it is not a terminal: under
    systemd (the journal) or ``--daemon --log-file`` a handler's prints came
    out hours late, and out of order with the log lines.  And in a UTF-8
    locale other than C, ``print(s.request)`` of a line with invalid bytes
    (surrogate-escaped) raised UnicodeEncodeError and closed the session;
    such text is written as ``\\udcff`` escapes instead, as in the log.
    """
    if not isinstance(sys.stdout, io.TextIOWrapper):
        return
    if sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    if not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)


def _exit(code: int) -> NoReturn:
    """Exit with ``code``, without waiting for threads the script started.

    Processes it started with ``multiprocessing`` are waited for, as that
    module does at exit, with a warning that names them.

    At exit Python waits for every thread not marked daemon: one the script
    started at import (a poller, say) kept ``--check`` from returning, and
    the daemon running after it logged "stopped" and let its pidfile go.
    """
    multiprocessing = sys.modules.get("multiprocessing")
    children = [p for p in multiprocessing.active_children() if not p.daemon] \
        if multiprocessing is not None else []
    if children:
        # multiprocessing joins them at exit, as Python programs expect; say
        # why a daemon that logged "stopped" has not exited yet.
        log.warning("waiting for %s the script started with multiprocessing "
                    "(pid %s) to end: end them in on_stop, or start them with daemon=True",
                    counted(len(children), "process", "processes"),
                    ", ".join(str(p.pid) for p in children))
    stray = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stray:
        sys.exit(code)
    log.warning("not waiting for %s the script started (%s): start them "
                "with daemon=True, or end them in on_stop", counted(len(stray), "thread"),
                ", ".join(stray))
    atexit._run_exitfuncs()         # what a normal exit runs after joining threads
    for handler in log.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(config: Config, inherited: list) -> int:
    """Start up, serve until stopped, clean up; return the exit status."""
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
    # From here on a stop signal stops start-up cleanly (the pidfile and
    # sockets go, exit 0) instead of killing mpxd; HUP and USR1 wait for
    # the loop.  Not earlier: the --daemon launcher must keep its defaults.
    wakeup = Wakeup()
    wakeup.install()
    tracebacks_on_fatal_signals()
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    listeners: list = []
    edge: Edge | None = None
    try:
        if pidfile is not None:
            pidfile.acquire()
        listeners = inherited or (bind_listeners(config.hosts, config.port or 0,
                                                 config.backlog)
                                  if config.port is not None or not config.unix else [])
        edge = Edge.open(config)    # TLS files, unix and control sockets: still privileged
        listeners = listeners + edge.sockets
        prepare_listeners(listeners, config.keepalive)
        drop_privileges(config.user, config.group)
        # An import may take long: TERM need not wait.
        handlers = load_script(config.script, interruptible=False, stoppable_by=wakeup)
    except (PidFileError, ListenError, PrivilegeError, ScriptError) as e:
        _release(listeners, edge, pidfile, wakeup)
        return start_failed(str(e), detached, config.daemon)
    except StopDuringImport as e:
        _release(listeners, edge, pidfile, wakeup)
        return _stopped_before_serving(e.signum, detached)

    notifier = Notifier.from_environment()
    try:
        core = Core(handlers, config)
        del handlers     # the core holds the script now: a HUP can let this version go
        loop = Loop(core, config, listeners, notifier,
                    reopen_logs=lambda: reopen_log_files(reopenable), wakeup=wakeup)
        loop.install_signals()      # from now on a KeyboardInterrupt is user code's own
        edge.install(loop)
        if not core.start():        # on_start raised: what it prepares is missing
            core.stop(run_on_stop=False)
            _release(listeners, edge, pidfile, wakeup)
            return start_failed(f"{config.script}: on_start failed (its traceback is "
                                "in the log); not serving", detached, config.daemon)
        stop = wakeup.stop_pending      # it came during on_start, say
        if stop is not None:
            core.stop()
            _release(listeners, edge, pidfile, wakeup)
            return _stopped_before_serving(stop, detached)
        if inherited and config.port is not None:
            log.warning("--port %d ignored: serving the sockets systemd passed "
                        "(LISTEN_FDS)", config.port)
        for sock in listeners:
            log.info("listening on %s", describe(sock))
        notifier.ready(f"listening on {', '.join(describe(s) for s in listeners)}")
        if detached is not None:
            detached.ready()
        loop.run()
    finally:
        edge.close()
        if pidfile is not None:
            pidfile.release()
        notifier.close()
    log.info("stopped")
    return 0


def _release(listeners: list, edge: Edge | None, pidfile: PidFile | None,
             wakeup: Wakeup) -> None:
    """Give back what a start-up that ends early took, before saying why:
    a ``--daemon``'s waiting command may start the next instance at once."""
    for sock in listeners:
        sock.close()
    if edge is not None:
        edge.close()
    if pidfile is not None:
        pidfile.release()
    wakeup.close_for_exit()     # a second TERM now must not turn exit 0 into 143


def _stopped_before_serving(signum: int, detached: Detached | None) -> int:
    """A stop signal came during start-up: a clean stop, not a failure."""
    message = f"{signal.Signals(signum).name} during start-up: stopped before serving"
    log.info("%s", message)
    if detached is not None:    # the command that waits did not get a daemon
        detached.failed(message)
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
