"""The control channel: mpxd serving its own line protocol on a unix socket.

``--control PATH`` opens a unix socket (mode 0600) that the daemon's own
loop serves.  Its sessions run through a second ``Core`` whose handler is
built in (``ControlServer.handle_request``), so framing, output queues and
sessions are the same code user scripts get.  Only the socket file's owner
may use it: besides the file mode, a client whose ``SO_PEERCRED`` uid is
neither the daemon's nor root is closed unanswered.

The protocol: one command per line; the answer is zero or more data lines
and then one status line, ``OK`` (perhaps followed by text) or
``ERROR reason``.  Data lines never begin with ``OK`` or ``ERROR``.

    stats, status   key value lines: pid, version, state, uptime,
                    connections, connections_total, requests, bytes_in,
                    bytes_out, errors, reloads, the access, TLS and rate
                    figures in use, and one "listener ADDRESS open=N total=N"
                    line per listener
    sessions        one line per open session:
                    ID PEER age=S idle=S requests=N queued=BYTES [tls=SUBJECT]
    kill ID         close session ID now (queued output is dropped)
    reload          what HUP does: reload the script (and TLS certificates)
    drain           stop accepting; exit once the open sessions have ended
    stop            what TERM does: finish queued output, close, exit
    log-level LEVEL debug, info, warning or error, from now on
    help            this list
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from . import __version__
from . import core as core_module
from .config import Config
from .core import Core, format_peer
from .logs import LEVELS, counted
from .loop import ACCEPT_BACKOFF, FD_EXHAUSTED
from .script import Handlers
from .unix import UnixListener, UnixPeer, peer_credentials

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Loop
    from .session import Session

__all__ = ["ControlServer", "ListenerTally", "ControlPeer"]

log = logging.getLogger("mpxd")

IN = 0x001
OUT = 0x004
ERR_HUP = 0x008 | 0x010
READ_SIZE = 64 * 1024
ACCEPT_BATCH = 16
PRUNE_EVERY = 1024
# Reading pauses at 1 MiB of unread answers, as for any session: a client
# that pipelined 400,000 commands without reading grew mpxd by 240 MB, and
# 1,000 "sessions" in one write stalled the loop for 15 s.  One answer may
# still be large (a "sessions" of 100,000 clients is 10 MB).
CONTROL_CONFIG = Config(script="<control>", max_line=4096, idle_timeout=None,
                        high_water=1 << 20, low_water=1 << 18, max_output=1 << 30)


HELP = [
    "stats            figures: uptime, connections, requests, bytes, errors, ... "
    "(also: status)",
    "sessions         one line per open session: ID PEER age idle requests queued",
    "kill ID          close session ID now, dropping its queued output",
    "reload           reload the script and TLS certificates, as HUP does",
    "drain            accept no more connections; exit after the last session",
    "stop             finish queued output, close every session and exit (TERM)",
    "log-level LEVEL  debug, info, warning or error from now on",
    "help             this list",
]


class ControlPeer(UnixPeer):
    """A control client's credentials, shown as ``pid=...,uid=...``."""

    def __str__(self) -> str:
        return f"pid={self.pid},uid={self.uid}"


class ListenerTally:
    """Connections accepted on one listener, for ``stats``.

    It keeps the ids of the sessions it counted, not the sessions: a
    closed session (and whatever its ``s.handle`` holds) must not stay in
    memory because ``--control`` is on.  Closed ones are dropped lazily
    (every ``PRUNE_EVERY`` sessions, and before ``stats`` answers), so a
    session's close costs nothing here; their bytes are the core's totals.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0
        self.ids: list[int] = []
        self._since_prune = 0

    def add(self, s: Session) -> None:
        self.total += 1
        self.ids.append(s.id)
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self.prune(s._core.sessions_by_id)

    def prune(self, open_sessions: dict[int, Session]) -> None:
        """Forget the sessions that are no longer open."""
        self._since_prune = 0
        self.ids = [i for i in self.ids if i in open_sessions]


class ControlServer:
    """Accepts control clients and answers their commands, inside the daemon's loop."""

    def __init__(self, listener: UnixListener, loop: Loop, edge: Any) -> None:
        self.listener = listener
        self.loop = loop
        self.edge = edge                    # tallies, gate, TLS and rate figures
        self.main = loop.core
        handlers = Handlers(path="<control>", module=sys.modules[__name__],
                            handle_request=self.handle_request, handle_open=None,
                            handle_close=None, on_start=None, on_stop=None,
                            on_reload=None)
        self.core = Core(handlers, CONTROL_CONFIG, clock=self.main.clock)
        self.core.sessions_are = "control connection"
        self.core.line_limit_is = "the control channel's limit of"
        self.conns: dict[int, Session] = {}
        self.soft_draining = False
        self._exhausted_logged = False      # out of descriptors, said once per burst
        self.commands: dict[str, Callable[[Session, list[str]], str]] = {
            "stats": self.cmd_stats, "status": self.cmd_stats,   # as mpxctl names it
            "sessions": self.cmd_sessions,
            "kill": self.cmd_kill, "reload": self.cmd_reload,
            "drain": self.cmd_drain, "stop": self.cmd_stop,
            "log-level": self.cmd_log_level, "help": self.cmd_help,
        }
        loop.watch(listener.sock.fileno(), IN, self._accept)

    def close(self) -> None:
        """Close every control connection and the socket (its file is removed)."""
        for fd in list(self.conns):
            self.loop.unwatch(fd)
            os.close(fd)
        self.conns.clear()
        self.loop.unwatch(self.listener.sock.fileno())
        self.listener.remove()

    # ------------------------------------------------------------- the edge

    def _accept(self, mask: int) -> None:
        accept = self.listener.sock._accept
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in FD_EXHAUSTED:
                    self._pause_accepting(e)
                else:
                    log.warning("control: accept failed: %s", e.strerror)
                break
            self._exhausted_logged = False
            os.set_blocking(fd, False)
            try:
                creds = peer_credentials(fd)
            except OSError:
                os.close(fd)
                continue
            if creds.uid not in (os.geteuid(), 0):
                log.warning("control: refused pid=%d,uid=%d: only %s may use it",
                            creds.pid, creds.uid, f"uid {os.geteuid()} and root"
                            if os.geteuid() else "root")
                os.close(fd)
                continue
            self.core.now = self.main.now
            s = self.core.open_session(ControlPeer(*creds))
            s._fd = fd
            s._mask = IN
            self.conns[fd] = s
            self.loop.watch(fd, IN, lambda event, s=s: self._ready(s, event))
        self._restore_current()

    def _pause_accepting(self, e: OSError) -> None:
        """Out of descriptors: stop polling the socket briefly, as the loop does
        for its listeners; a waiting client made every poll return at once,
        and each logged a line (10,000 a second)."""
        fd = self.listener.sock.fileno()
        if not self._exhausted_logged:      # once per burst, as for the listeners
            log.warning("control: cannot accept: %s; pausing for %gs at a time",
                        e.strerror, ACCEPT_BACKOFF)
            self._exhausted_logged = True
        self.loop.unwatch(fd)
        self.main.call_later(ACCEPT_BACKOFF, self._resume_accepting, fd)

    def _resume_accepting(self, fd: int) -> None:
        if self.listener.sock.fileno() == fd and fd not in self.loop.watchers:
            self.loop.watch(fd, IN, self._accept)

    def _ready(self, s: Session, mask: int) -> None:
        core = self.core
        core.now = self.main.now
        if mask & (IN | ERR_HUP) and s._mask & IN:
            try:
                data = os.read(s._fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                core.connection_lost(s, "reset")
                data = None
            if data:
                core.data_received(s, data)
            elif data is not None:
                core.eof_received(s)
        if mask & OUT or (mask & ERR_HUP and not s._mask & IN):
            core.dirty.append(s)
        for dirty in core.dirty:
            self._flush(dirty)
        core.dirty.clear()
        self._restore_current()

    def _restore_current(self) -> None:
        # The core of the running script stays "current": a worker thread's
        # mpxd.call_soon_threadsafe must reach it, not this one.
        core_module._current = self.main

    def _flush(self, s: Session) -> None:
        if s._finished:
            return
        while not s._abort and (s._wbuf is not None or s._out is not None):
            if s._wbuf is None:
                s._wbuf, s._woff, s._out = b"".join(s._out), 0, None
            try:
                written = os.write(s._fd, memoryview(s._wbuf)[s._woff:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                s._abort = True
                break
            s._woff += written
            s._out_size -= written
            s._bytes_out += written
            if s._woff < len(s._wbuf):
                break
            s._wbuf = None
        if s._abort or (s._closing and s._wbuf is None):
            self._close(s)
            return
        if s._paused:               # past the high-water mark: reading resumes, and the
            self.core.after_write(s, s._wbuf is not None)  # held commands run, below the low
        want = (IN if self.core.wants_input(s) else 0) | (OUT if s._wbuf is not None else 0)
        if want != s._mask:
            s._mask = want
            self.loop.rewatch(s._fd, want)

    def _close(self, s: Session) -> None:
        fd = s._fd
        self.conns.pop(fd, None)
        self.loop.unwatch(fd)
        os.close(fd)
        # Not core.finish: there is no handle_close to run, and a session
        # line per mpxctl call would flood the log of a monitored daemon.
        s._finished = s._closed = True
        s._out = s._wbuf = None
        self.core.sessions_by_id.pop(s._id, None)

    # ------------------------------------------------------------- commands

    def handle_request(self, s: Session) -> None:
        """Answer one control command: data lines, then ``OK ...`` or ``ERROR ...``."""
        words = s.request.split()
        if not words:
            return
        command = self.commands.get(words[0].lower())
        if command is None:
            s.response = f"ERROR unknown command {words[0]!r} (try help)"
            return
        try:
            s.response = command(s, words[1:])
        except UsageError as e:
            s.response = "ERROR " + " ".join(str(e).splitlines())    # one line, always

    def cmd_help(self, s: Session, args: list[str]) -> str:
        return "\n".join(HELP + ["OK"])

    def cmd_stats(self, s: Session, args: list[str]) -> str:
        loop, main, edge = self.loop, self.main, self.edge
        for tally in edge.tallies:
            tally.prune(main.sessions_by_id)
        open_sessions = list(main.sessions_by_id.values())
        bytes_in = main.closed_bytes_in + sum(x._bytes_in for x in open_sessions)
        bytes_out = main.closed_bytes_out + sum(x._bytes_out for x in open_sessions)
        state = "serving"
        if loop.draining:
            state = "draining" if self.soft_draining else "stopping"
        lines = [
            f"pid {os.getpid()}", f"version {__version__}", f"state {state}",
            f"uptime {main.now - main.started:.3f}",
            f"connections {len(loop.conns)}",
            f"connections_total {main.connections_total}",
            f"requests {main.requests_total}",
            f"bytes_in {bytes_in}", f"bytes_out {bytes_out}",
            f"errors {main.errors_total}", f"reloads {main.reloads}",
        ]
        if edge.refusals is not None:
            lines.append(f"refused {sum(edge.refusals.total.values())}")
        if edge.tls is not None:
            lines.append(f"tls_handshakes {edge.tls.handshakes}")
            lines.append(f"tls_failures {edge.tls.failures}")
        if edge.rate is not None:
            lines.append(f"throttled {edge.rate.throttled}")
        for tally in edge.tallies:
            lines.append(f"listener {tally.name} open={len(tally.ids)} "
                         f"total={tally.total}")
        return "\n".join(lines + ["OK"])

    def cmd_sessions(self, s: Session, args: list[str]) -> str:
        now = self.main.now
        lines = []
        for x in list(self.main.sessions_by_id.values()):
            line = (f"{x.id} {format_peer(x.peer)} age={now - x._started:.1f} "
                    f"idle={now - x._last_active:.1f} requests={x._requests} "
                    f"queued={x._out_size}")
            tls_peer = getattr(x, "tls_peer", None)
            if tls_peer:
                line += " tls=" + tls_peer.replace(" ", "\\20")
            lines.append(line)
        return "\n".join(lines + [f"OK {counted(len(lines), 'session')}"])

    def cmd_kill(self, s: Session, args: list[str]) -> str:
        if len(args) != 1 or not (args[0].isascii() and args[0].isdigit()):
            raise UsageError("usage: kill ID (a session id from 'sessions')")
        victim = self.main.sessions_by_id.get(int(args[0]))
        if victim is None or victim._finished:
            raise UsageError(f"no session {args[0]}")
        log.info("control (%s): closing session %d %s", s.peer, victim.id,
                 format_peer(victim.peer))
        self.main.abort(victim, "killed")
        return f"OK closed session {victim.id}"

    def cmd_reload(self, s: Session, args: list[str]) -> str:
        if self.loop.draining:
            raise UsageError("not reloading: the daemon is shutting down")
        log.info("control (%s): reload", s.peer)
        failure = self.loop.handle_hup()
        if failure is not None:
            raise UsageError(f"reload failed: {failure}")
        return f"OK reloaded {self.main.handlers.path}"

    def cmd_drain(self, s: Session, args: list[str]) -> str:
        if self.loop.draining:      # OK: "drain --wait" then waits, as the first did
            already = "draining" if self.soft_draining else "stopping"
            return f"OK already {already}: {counted(len(self.loop.conns), 'session')} open"
        log.info("control (%s): drain", s.peer)
        self.soft_draining = True
        self.loop.soft_drain()
        return f"OK draining: {counted(len(self.loop.conns), 'session')} open"

    def cmd_stop(self, s: Session, args: list[str]) -> str:
        log.info("control (%s): stop", s.peer)
        stopping = self.loop.draining    # a drain (soft or not) is cut short
        sessions = counted(len(self.loop.conns), "session")
        self.loop.handle_term()     # while stopping already: as a second TERM
        if stopping:
            return f"OK stopping now: {sessions} closed at once, their output dropped"
        return f"OK stopping: {sessions} to close"

    def cmd_log_level(self, s: Session, args: list[str]) -> str:
        if len(args) != 1 or args[0].lower() not in LEVELS:
            raise UsageError(f"usage: log-level {'|'.join(LEVELS)}")
        level = args[0].lower()
        logging.getLogger("mpxd").setLevel(level.upper())
        log.warning("control (%s): log level set to %s", s.peer, level)
        return f"OK log level {level}"


class UsageError(Exception):
    """A command the control channel cannot carry out; its text follows ERROR."""
