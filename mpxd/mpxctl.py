"""``mpxctl``: the operator's client for a running mpxd.

Talks to the control socket (``mpxd --control PATH``), or, for ``reload``,
``stop`` and ``status``, works from the pidfile alone (``--pidfile PATH``:
HUP, TERM, and whether the pidfile's lock is held).

Exit status, for scripts: 0 done, 1 the daemon answered with an error,
2 usage error, 3 the daemon cannot be reached (not running, no socket,
no permission, no answer).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
import sys
import time
from typing import Callable

import click

from . import __version__

__all__ = ["main", "ControlClient", "DaemonError", "Unreachable"]

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3


class Unreachable(Exception):
    """The daemon cannot be reached; exit status 3."""


class Busy(Unreachable):
    """The daemon's control socket is there but accepts nobody in time (a busy loop)."""


class DaemonError(Exception):
    """The daemon answered ``ERROR ...``; exit status 1."""


class ControlClient:
    """One connection to a control socket; ``ask`` sends a command, returns its lines."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            self._connect(path, timeout)
        except FileNotFoundError:
            self.sock.close()
            raise Unreachable(f"no control socket at {path} (is mpxd running "
                              f"with --control {path}?)") from None
        except ConnectionRefusedError:
            self.sock.close()
            try:
                mode = os.stat(path).st_mode
            except OSError:             # removed meanwhile: the daemon has just exited
                mode = stat.S_IFSOCK
            if not stat.S_ISSOCK(mode):
                raise Unreachable(f"{path} is not a socket (give the path mpxd's "
                                  f"--control names)") from None
            raise Unreachable(f"nobody listens on {path} (mpxd is not running)") from None
        except PermissionError:
            self.sock.close()
            raise Unreachable(f"no permission to use {path}: only the daemon's "
                              f"user and root may") from None
        except OSError as e:
            self.sock.close()
            raise Unreachable(f"cannot connect to {path}: {e.strerror or e}") from None

    def _connect(self, path: str, timeout: float) -> None:
        """Connect, waiting up to ``timeout`` while the daemon's queue is full.

        A unix socket's connect fails at once (EAGAIN) when the listener's
        queue is full, as while the loop is busy: that is no answer yet,
        not a daemon gone.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise Busy(f"{path} accepts no connection within {timeout:g}s "
                               f"(its queue is full: is the daemon stuck?)") from None
                time.sleep(0.02)

    def ask(self, command: str) -> tuple[list[str], str]:
        """Send ``command``; return (data lines, text after OK).  ``DaemonError`` on ERROR."""
        try:
            self.sock.sendall(command.encode() + b"\n")
            lines = []
            while True:
                line = self._readline()
                if line is None:
                    # A control socket never closes first: whoever did was
                    # refused, or is not mpxd's control socket at all.
                    if lines:
                        raise Unreachable(f"{self.path} answered {lines[0][:80]!r}, which "
                                          f"is not mpxd's control protocol (is it an mpxd "
                                          f"--control socket?)")
                    raise Unreachable(f"{self.path} closed the connection unanswered "
                                      f"(only the daemon's user and root may use it)")
                if line == "OK" or line.startswith("OK "):
                    return lines, line[3:]
                if line.startswith("ERROR"):
                    raise DaemonError(line[6:] or "error")
                lines.append(line)
        except socket.timeout:
            raise Unreachable(f"no answer from {self.path} within "
                              f"{self.sock.gettimeout():g}s") from None
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closes at once on a client of another user.
            raise Unreachable(f"{self.path} closed the connection unanswered "
                              f"(only the daemon's user and root may use it)") from None
        except OSError as e:
            raise Unreachable(f"lost the connection to {self.path}: "
                              f"{e.strerror or e}") from None

    def _readline(self) -> str | None:
        """The next line of the answer; ``None`` when the other end closed."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------- pidfiles

def daemon_pid(pidfile: str) -> int:
    """The pid of the mpxd holding ``pidfile``'s lock; ``Unreachable`` if none does.

    The lock, not the number in the file, says whether the daemon runs
    (the same rule as mpxd's own pidfile handling).  It is looked up in
    /proc/locks, so that asking never takes the lock, even briefly.
    """
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unreachable(f"no pidfile {pidfile} (mpxd is not running)") from None
    except OSError as e:
        raise Unreachable(f"cannot read pidfile {pidfile}: {e.strerror}") from None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        holder = _lock_holder(fd)
        if holder is None:
            raise Unreachable(f"mpxd is not running (nobody holds {pidfile}; "
                              + (f"it names pid {text})" if text else "it is empty)"))
    finally:
        os.close(fd)
    if text.isdigit():
        return int(text)
    if holder > 0:
        return holder
    raise Unreachable(f"pidfile {pidfile} holds no pid ({text!r})")


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file (0 if unknown), or None if unlocked."""
    st = os.fstat(fd)
    identity = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "FLOCK" in fields and identity in fields:
                    pid = fields[fields.index(identity) - 1]
                    return int(pid) if pid.isdigit() else 0
        return None
    except OSError:
        pass
    try:                            # no /proc: probe with a lock of our own
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return 0
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


# ------------------------------------------------------------- rendering

def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def render_stats(lines: list[str]) -> list[str]:
    """``stats`` answer lines as the ``mpxctl status`` report."""
    figures: dict[str, str] = {}
    listeners: list[tuple[str, dict[str, str]]] = []
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "listener":
            name, *pairs = value.split(" ")
            listeners.append((name, dict(p.split("=", 1) for p in pairs if "=" in p)))
        else:
            figures[key] = value
    number = lambda key: int(float(figures.get(key, "0")))  # noqa: E731
    out = [f"mpxd {figures.get('version', '?')} (pid {figures.get('pid', '?')}): "
           f"{figures.get('state', '?')}, up {_duration(float(figures.get('uptime', 0)))}",
           f"connections  {number('connections')} open, "
           f"{number('connections_total'):,} since start",
           f"requests     {number('requests'):,}",
           f"traffic      {_size(number('bytes_in'))} in, {_size(number('bytes_out'))} out",
           f"errors       {number('errors')}",
           f"reloads      {number('reloads')}"]
    if "refused" in figures:
        out.append(f"refused      {number('refused'):,}")
    if "tls_handshakes" in figures:
        out.append(f"TLS          {number('tls_handshakes'):,} handshakes, "
                   f"{number('tls_failures'):,} failed")
    if "throttled" in figures:
        out.append(f"throttled    {number('throttled'):,} times (--max-rate)")
    if listeners:
        width = max(len(name) for name, _ in listeners)
        out.append("listeners")
        for name, counts in listeners:
            out.append(f"  {name:<{width}}  {counts.get('open', '?'):>6} open  "
                       f"{counts.get('total', '?'):>8} total")
    return out


def render_sessions(lines: list[str]) -> list[str]:
    """``sessions`` answer lines as an aligned table."""
    rows = []
    for line in lines:
        words = line.split(" ")
        pairs = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        rows.append([words[0], words[1], pairs.get("age", "") + "s",
                     pairs.get("idle", "") + "s", pairs.get("requests", ""),
                     pairs.get("queued", ""), pairs.get("tls", "").replace("\\20", " ")])
    header = ["ID", "PEER", "AGE", "IDLE", "REQUESTS", "QUEUED", "TLS"]
    if not any(row[6] for row in rows):
        header.pop()
        rows = [row[:6] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    left = {1, 6}
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in [header] + rows]


# ------------------------------------------------------------------- CLI

class Target:
    """Where the daemon is: ``--control`` socket and/or ``--pidfile``."""

    def __init__(self, control: str | None, pidfile: str | None, timeout: float) -> None:
        self.control = control
        self.pidfile = pidfile
        self.timeout = timeout

    def ask(self, command: str) -> tuple[list[str], str]:
        if not self.control:
            raise click.UsageError("this command needs --control PATH (or MPXCTL_CONTROL)")
        client = ControlClient(self.control, self.timeout)
        try:
            return client.ask(command)
        finally:
            client.close()

    def signal(self, signum: int) -> int:
        assert self.pidfile is not None
        pid = daemon_pid(self.pidfile)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            raise Unreachable(f"pid {pid} from {self.pidfile} does not exist") from None
        except PermissionError:
            raise Unreachable(f"no permission to signal pid {pid}") from None
        return pid

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the daemon has exited (its socket or pidfile lock is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.control:
                    ControlClient(self.control, 1.0).close()
                else:
                    daemon_pid(self.pidfile or "")
            except Busy:
                pass                    # still there, busy (its queue is full)
            except Unreachable:
                return True
            time.sleep(0.05)
        return False


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not value < 1e9:         # nan and inf too: socket timeouts refuse them
        raise click.BadParameter(f"must be a number of seconds below 1e9, not {value}")
    return value


def _target_options(command: Callable) -> Callable:
    command = click.option("--timeout", type=click.FloatRange(0, min_open=True),
                           default=5.0, show_default=True, metavar="SECONDS",
                           callback=_finite,
                           help="How long to wait for the daemon's answer.")(command)
    # readable=False: a file mpxctl may not read is said on use (exit 3), not
    # as a usage error (2).
    command = click.option("--pidfile", "-p", type=click.Path(dir_okay=False, readable=False),
                           envvar="MPXCTL_PIDFILE", metavar="PATH",
                           help="The daemon's --pidfile (reload, stop, status "
                                "by signal and lock).")(command)
    command = click.option("--control", "-c", type=click.Path(dir_okay=False, readable=False),
                           envvar="MPXCTL_CONTROL", metavar="PATH",
                           help="The daemon's --control socket.")(command)
    return command


def _target(ctx: click.Context, control: str | None, pidfile: str | None,
            timeout: float) -> Target:
    parent = ctx.find_object(Target)
    if parent is not None:              # options given before the subcommand
        typed = click.core.ParameterSource.COMMANDLINE

        def pick(name: str, mine: str | None, theirs: str | None) -> str | None:
            # What was typed beats the environment (MPXCTL_CONTROL), which
            # fills in this command's option as well as the group's.
            if ctx.get_parameter_source(name) != typed and ctx.parent is not None \
                    and ctx.parent.get_parameter_source(name) == typed:
                return theirs
            return mine or theirs
        control = pick("control", control, parent.control)
        pidfile = pick("pidfile", pidfile, parent.pidfile)
        if ctx.get_parameter_source("timeout") == click.core.ParameterSource.DEFAULT:
            timeout = parent.timeout
    if not control and not pidfile:
        raise click.UsageError("say where the daemon is: --control PATH or --pidfile PATH")
    return Target(control, pidfile, timeout)


def _run(action: Callable[[], None]) -> None:
    """Run a subcommand's work; turn failures into messages and exit codes."""
    try:
        action()
    except DaemonError as e:
        click.echo(f"mpxctl: the daemon says: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except Unreachable as e:
        click.echo(f"mpxctl: {e}", err=True)
        sys.exit(EXIT_UNREACHABLE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_target_options
@click.version_option(__version__, "--version", "-V", prog_name="mpxctl")
@click.pass_context
def main(ctx: click.Context, control: str | None, pidfile: str | None,
         timeout: float) -> None:
    """Look inside and steer a running mpxd.

    \b
    Examples:
      mpxctl status --control /run/mpxd/control.sock
      mpxctl sessions -c /run/mpxd/control.sock
      mpxctl kill 17 -c /run/mpxd/control.sock
      mpxctl reload --pidfile /run/mpxd.pid      (sends HUP)
      mpxctl stop --pidfile /run/mpxd.pid --wait  (sends TERM, waits for exit)

    Exit status: 0 done, 1 the daemon answered with an error, 2 usage
    error, 3 the daemon cannot be reached.
    """
    ctx.obj = Target(control, pidfile, timeout)


@main.command()
@_target_options
@click.option("--raw", is_flag=True, help="Print the daemon's key/value lines as they come.")
@click.pass_context
def status(ctx: click.Context, control: str | None, pidfile: str | None,
           timeout: float, raw: bool) -> None:
    """Show uptime, connections, requests, traffic and errors.

    With only --pidfile: whether the daemon runs, and its pid.
    """
    target = _target(ctx, control, pidfile, timeout)

    def action() -> None:
        if target.control:
            lines, _ = target.ask("stats")
            click.echo("\n".join(lines if raw else render_stats(lines)))
        else:
            click.echo(f"mpxd is running (pid {daemon_pid(target.pidfile or '')})")
    _run(action)


@main.command()
@_target_options
@click.option("--raw", is_flag=True, help="Print the daemon's lines as they come.")
@click.pass_context
def sessions(ctx: click.Context, control: str | None, pidfile: str | None,
             timeout: float, raw: bool) -> None:
    """List open sessions: id, peer, age, idle time, requests, queued output."""
    target = _target(ctx, control, pidfile, timeout)

    def action() -> None:
        lines, summary = target.ask("sessions")
        if lines:                   # none: no empty line for a "while read" loop
            click.echo("\n".join(lines if raw else render_sessions(lines)))
        if not raw:
            click.echo(summary, err=True)
    _run(action)


@main.command()
@click.argument("session_id", metavar="ID", type=click.IntRange(1))
@_target_options
@click.pass_context
def kill(ctx: click.Context, session_id: int, control: str | None, pidfile: str | None,
         timeout: float) -> None:
    """Close session ID at once (its queued output is dropped)."""
    target = _target(ctx, control, pidfile, timeout)
    _run(lambda: click.echo(target.ask(f"kill {session_id}")[1]))


@main.command()
@_target_options
@click.pass_context
def reload(ctx: click.Context, control: str | None, pidfile: str | None,
           timeout: float) -> None:
    """Reload the script and TLS certificates (HUP with --pidfile)."""
    target = _target(ctx, control, pidfile, timeout)

    def action() -> None:
        if target.control:
            click.echo(target.ask("reload")[1])
        else:
            click.echo(f"sent HUP to pid {target.signal(signal.SIGHUP)}")
    _run(action)


@main.command()
@_target_options
@click.option("--wait", is_flag=True, help="Wait (up to --timeout) until the daemon has exited.")
@click.pass_context
def stop(ctx: click.Context, control: str | None, pidfile: str | None,
         timeout: float, wait: bool) -> None:
    """Shut down gracefully: queued output is written, then exit (TERM with --pidfile)."""
    target = _target(ctx, control, pidfile, timeout)

    def action() -> None:
        if target.control:
            click.echo(target.ask("stop")[1])
        else:
            click.echo(f"sent TERM to pid {target.signal(signal.SIGTERM)}")
        if wait and not target.wait_gone(timeout):
            raise DaemonError(f"still running after {timeout:g}s")
    _run(action)


@main.command()
@_target_options
@click.option("--wait", is_flag=True, help="Wait (up to --timeout) until the daemon has exited.")
@click.pass_context
def drain(ctx: click.Context, control: str | None, pidfile: str | None,
          timeout: float, wait: bool) -> None:
    """Accept no more connections; the daemon exits after its last session ends."""
    target = _target(ctx, control, pidfile, timeout)

    def action() -> None:
        click.echo(target.ask("drain")[1])
        if wait and not target.wait_gone(timeout):
            raise DaemonError(f"still running after {timeout:g}s")
    _run(action)


@main.command("log-level")
@click.argument("level", metavar="LEVEL",
                type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@_target_options
@click.pass_context
def log_level(ctx: click.Context, level: str, control: str | None, pidfile: str | None,
              timeout: float) -> None:
    """Change the daemon's log level (debug, info, warning, error) until it exits."""
    target = _target(ctx, control, pidfile, timeout)
    _run(lambda: click.echo(target.ask(f"log-level {level.lower()}")[1]))


if __name__ == "__main__":  # pragma: no cover
    main()
