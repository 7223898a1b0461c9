"""The I/O edge: listening sockets, the poll set, accept, recv, send, close.

This is the only module that touches the poll set.  It reads bytes and hands
them to the core (``mpxd.core``), then works through ``core.dirty``: writes
queued output, adjusts what each socket is polled for, and closes sessions
the core marked.  Signals arrive through ``mpxd.signals.Wakeup`` and are
dispatched to ``handle_<name>`` methods here, in the loop, never in the
signal handler.

Hot path, per readable connection: one ``read`` (two when the first fills
FIRST_READ), one call into the core, and, after every WRITE_EVERY reads and at
the end of the pass, one ``write`` per session with output.
Write interest is registered only while output is left over.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource     # at the top: after --user the stdlib may be unreadable
import select
import signal
import socket
import struct
import termios
from typing import Any, Callable

from . import core as core_module
from .config import Config
from .core import Core, format_peer
from .forks import keep_from_children
from .logs import counted, flush_batched, lines_waiting, start_batching, stop_batching
from .script import ScriptError, load_script
from .session import Session
from .signals import StopDuringImport, Wakeup
from .timers import Timer
from .systemd import Notifier

__all__ = ["Loop", "make_poller", "raise_descriptor_limit", "USR2_IGNORED"]

log = logging.getLogger("mpxd")

USR2_IGNORED = ("USR2 ignored: mpxd has no binary upgrade as nginx and gunicorn do; "
                "HUP reloads the script, a restart upgrades mpxd")

IN = select.POLLIN
OUT = select.POLLOUT
ERR_HUP = select.POLLERR | select.POLLHUP
READABLE = IN | ERR_HUP
PARKED = 1 << 30            # a session's _mask while out of the poll set (_park)
# 64 KiB, not asyncio's 256 KiB: glibc serves allocations above 128 KiB with
# mmap/munmap, and recv() allocates its full size before shrinking, which made
# every read ten times dearer (measured: 11.7 us against 1.3 us per recv).
RECV_SIZE = 64 * 1024
# The first read of each readable connection asks for only FIRST_READ bytes:
# CPython serves bytes objects that small from its own allocator, while a
# 64 KiB read costs a malloc and a shrinking realloc whatever arrives
# (measured: 70 to 140 ns more per read, most requests of a line protocol are
# short).  A full first read is followed at once by a RECV_SIZE one.
FIRST_READ = 512 - 33           # pymalloc's limit less a bytes object's header
ACCEPT_BATCH = 128
# Answers go out once per loop pass, one write per session: bursts of writes
# wake the clients' side less often than a write per read (measured: 14% less
# CPU per request than writing at once).  But in a pass of 50 ready sessions
# the first waits for all the others; writing out after every 16 reads keeps
# that wait short (p99 at 50 busy connections: 530 -> about 310 us) at a
# CPU cost within the benchmark's noise (0 to 2%).
WRITE_EVERY = 16
ACCEPT_BACKOFF = 0.1            # seconds without accepting after EMFILE
FULL_WARNING_EVERY = 60.0       # seconds between "--max-connections reached" warnings
# The longest poll wait: a far timer (call_later(1e300, ...), EXPIRE 1e300
# in handlers/kv.py, --drain-timeout 1e300 in the --workers supervisor)
# would overflow poll's timeout; waking once an hour to find nothing due
# costs nothing.
MAX_WAIT = 3600.0
STATUS_INTERVAL = 5.0           # seconds between systemd STATUS= updates
LINGER_TIMEOUT = 2.0            # seconds a closed session waits for the peer's EOF

KEEPALIVE_PROBES = 3             # unanswered keepalive probes before a client is gone
ROUTINE_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                  errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH}
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Poller:
    """``select.poll`` or ``select.epoll`` behind one small interface.

    Both report the same bit values on Linux (POLLIN == EPOLLIN, ...); only
    the timeout unit differs, and ``wait`` takes seconds for both.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        # epoll drops a descriptor from its set when the descriptor is closed
        # (when no duplicate of it is left open: mpxd makes none), so a
        # session closed at once needs no unregister call; poll does not.
        self.forgets_closed = kind == "epoll"
        if kind == "epoll":
            self._p = select.epoll()
            self.wait = self._p.poll
        else:
            self._p = select.poll()
            poll = self._p.poll
            self.wait = lambda timeout: poll(None if timeout is None else timeout * 1000.0)
        self.register = self._p.register
        self.modify = self._p.modify
        self.unregister = self._p.unregister

    def close(self) -> None:
        if self.kind == "epoll":
            self._p.close()

    def filenos(self) -> list[int]:
        """The epoll descriptor, if there is one (poll has none)."""
        return [self._p.fileno()] if self.kind == "epoll" and not self._p.closed else []


def make_poller(kind: str) -> _Poller:
    """A poller of ``kind`` (``epoll`` or ``poll``); epoll falls back to poll."""
    if kind == "epoll" and not hasattr(select, "epoll"):
        kind = "poll"
    return _Poller(kind)


class Loop:
    """Run a ``Core`` over real sockets until shut down."""

    def __init__(self, core: Core, config: Config, listeners: list[socket.socket],
                 notifier: Notifier | None = None,
                 reopen_logs: Callable[[], None] | None = None,
                 wakeup: Wakeup | None = None) -> None:
        self.core = core
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.reopen_logs = reopen_logs
        self.poller = make_poller(config.poller)
        self.listeners = {sock.fileno(): sock for sock in listeners}
        for sock in listeners:
            prepare_listener(sock, config.keepalive)
        self.conns: dict[int, Session] = {}
        self.max_connections = config.max_connections or default_max_connections()
        log.debug("at most %d connections (file-descriptor limit %d)", self.max_connections,
                  resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # Accepted connections that are not sessions yet (TLS handshakes):
        # they hold a descriptor too, so they count toward max_connections.
        self.admitting = 0
        self.accepting = False
        self.draining = False
        self.running = False
        self._emfile_logged = False
        self._full_warned_at = float("-inf")     # last "--max-connections reached"
        self._wakeup = wakeup or Wakeup()     # the CLI's routes signals from start-up on
        core.wake = self._wakeup.wake
        core.edge_taken = _taken
        # Edge features (mpxd.edge), empty unless TLS, unix sockets, access
        # rules, rate limits or --control are used: per-listener hooks that
        # take over accepted connections, callbacks for descriptors that are
        # not sessions (TLS handshakes, the control channel), HUP extras.
        self.admission: dict[int, Callable[[int, Any], None]] = {}
        self.watchers: dict[int, Callable[[int], None]] = {}
        self.reload_hooks: list[Callable[[], str | None]] = []   # each: why it failed
        # Told how each HUP reload ended (None: it worked): a --workers
        # worker tells its supervisor, which tells systemd.
        self.reload_done: Callable[[str | None], None] | None = None
        # Closed sessions' descriptors waiting for the peer's EOF (_linger).
        self.lingering: dict[int, Timer] = {}
        self._forget_descriptors = keep_from_children(self._descriptors)

    # ------------------------------------------------------------ running

    def run(self) -> None:
        """Serve until a stop signal's drain has closed every session.

        The caller has run ``core.start()`` (the script's ``on_start``)."""
        core = self.core
        poller = self.poller
        self.install_signals()
        poller.register(self._wakeup.fileno(), IN)
        self._start_accepting()
        if self.notifier.enabled:
            core.call_every(STATUS_INTERVAL, self._report_status)
            if self.notifier.watchdog_interval:
                core.call_every(self.notifier.watchdog_interval, self.notifier.watchdog)
        self.running = True
        start_batching()            # log lines: one write per pass
        try:
            self._serve()
        finally:
            stop_batching()
            self.running = False
            core.stop()
            self._wakeup.close_for_exit()
            poller.close()
            self._forget_descriptors()

    def _descriptors(self) -> list[int]:
        """Every descriptor this loop owns: none of them is a forked child's business."""
        return [*self.listeners, *self.conns, *self.watchers, *self.lingering,
                *self._wakeup.filenos(), *self.poller.filenos()]

    def _serve(self) -> None:
        core = self.core
        conns = self.conns
        wait = self.poller.wait
        clock = core.clock
        dirty = core.dirty
        ready = core._ready
        wake_fd = self._wakeup.fileno()
        data_received = core.data_received
        read = os.read
        write_log_lines = flush_batched
        write_out = self._flush_dirty
        while self.running:
            deadline = core.next_deadline()
            if ready:
                timeout = 0.0
            elif deadline is None:
                timeout = None
            else:
                timeout = min(max(0.0, deadline - clock()), MAX_WAIT)
            events = wait(timeout)
            core.now = clock()
            reads = 0
            for fd, mask in events:
                s = conns.get(fd)
                if s is None:
                    if fd == wake_fd:
                        self._dispatch_signals()
                    elif fd in self.listeners:
                        self._accept(self.listeners[fd])
                    elif fd in self.watchers:
                        self.watchers[fd](mask)
                    continue
                if mask & READABLE and s._mask & IN:
                    try:
                        data = read(fd, FIRST_READ)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError as e:
                        self._broken(s, e)
                        continue
                    if data:
                        if len(data) == FIRST_READ:         # see FIRST_READ
                            data = _read_rest(fd, data)
                        data_received(s, data)
                        reads += 1
                        if reads == WRITE_EVERY:    # see WRITE_EVERY
                            reads = 0
                            write_out()
                    elif data is not None:
                        core.eof_received(s)
                if mask & OUT:
                    dirty.append(s)
                elif mask & ERR_HUP:        # rare: the peer hung up or failed
                    if s._mask & OUT:
                        dirty.append(s)     # the write meets the error
                    elif not s._mask & IN:
                        self._park(s)
            if deadline is not None and deadline <= core.now:
                core.run_timers()
            if ready:
                core.run_ready()
            if dirty:
                write_out()
            if lines_waiting:
                write_log_lines()
            if self.draining and not conns and not self.lingering:
                break

    def _flush_dirty(self) -> None:
        """Write out every session with new output (one write each)."""
        dirty = self.core.dirty
        flush = self._flush
        for s in dirty:
            flush(s)
        dirty.clear()

    # ------------------------------------------------------------- accept

    def _start_accepting(self) -> None:
        if not self.accepting and not self.draining:
            for fd in self.listeners:
                self.poller.register(fd, IN)
            self.accepting = True

    def _stop_accepting(self) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.poller.unregister(fd)
            self.accepting = False

    def _accept(self, listener: socket.socket) -> None:
        """Accept up to ACCEPT_BATCH waiting clients from ``listener``.

        Connections are kept as bare file descriptors, read and written with
        ``os.read``/``os.write``: ``socket.accept()`` wraps each one in a
        Python socket object whose construction (enum conversions, a Python
        ``__init__``) and close cost more than the system calls themselves
        under connection churn, and the object costs memory per idle client.
        ``_accept`` is the C method ``socket.accept`` itself is built on.
        """
        core = self.core
        conns = self.conns
        register = self.poller.register
        accept = listener._accept
        inet = listener.family != socket.AF_UNIX
        admit = self.admission.get(listener.fileno())     # None: plain TCP
        lingering = self.lingering
        for _ in range(ACCEPT_BATCH):
            if len(conns) + self.admitting >= self.max_connections:
                self._full()
                return
            if lingering and len(conns) + self.admitting + len(lingering) >= \
                    self.max_connections:
                # A lingering close holds a descriptor too: clients that
                # never hang up (closed by an idle timeout) ran the daemon
                # out of them below the limit.  The oldest has waited longest.
                self._end_linger(next(iter(lingering)))
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in FD_EXHAUSTED:
                    self._fd_exhausted(e)
                    return
                log.debug("accept failed: %s", e)    # ECONNABORTED and friends
                continue
            self._emfile_logged = False
            os.set_blocking(fd, False)    # TCP_NODELAY is inherited from the listener
            if admit is not None:         # TLS, unix credentials, access rules...
                admit(fd, addr)           # refuses, or calls self.adopt (maybe later)
                continue
            s = core.open_session(addr[:2] if inet else (addr or "unix"))
            s._fd = fd
            s._mask = IN
            conns[fd] = s
            register(fd, IN)

    def _full(self) -> None:
        """At --max-connections: new clients wait in the kernel's backlog until room frees.

        A daemon at its limit flaps (one session closes, one client comes
        in), so the warning comes at most once every FULL_WARNING_EVERY
        seconds: enough for an operator to see why clients wait.
        """
        self._stop_accepting()
        now = self.core.now
        if now - self._full_warned_at >= FULL_WARNING_EVERY:
            self._full_warned_at = now
            log.warning("--max-connections reached (%s open): new clients wait in the "
                        "listen backlog until one closes (said at most once a minute)",
                        counted(len(self.conns) + self.admitting, "connection"))

    def _fd_exhausted(self, e: OSError) -> None:
        """Out of descriptors: log once per burst, pause accepting briefly."""
        if not self._emfile_logged:
            log.warning("cannot accept: %s (%s open); "
                        "pausing accepts for %.1fs", e.strerror,
                        counted(len(self.conns), "connection"),
                        ACCEPT_BACKOFF)
            self._emfile_logged = True
        self._stop_accepting()
        self.core.call_later(ACCEPT_BACKOFF, self._start_accepting)

    # -------------------------------------------------------------- write

    def _flush(self, s: Session) -> None:
        """Write what ``s`` has queued; close it or re-arm polling as its state says."""
        if s._finished:
            return
        if s._abort:
            self._close(s)
            return
        write = s._write        # os.write, or a TLS session's encrypting writer
        buf = s._wbuf           # left over from an earlier short write, or None
        offset = s._woff
        while True:
            if buf is None:
                out = s._out
                if out is None:
                    break
                s._out = None
                buf = out[0] if len(out) == 1 else b"".join(out)
                offset = 0
            try:
                sent = write(s._fd, memoryview(buf)[offset:] if offset else buf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._broken(s, e)
                return
            s._bytes_out += sent
            s._out_size -= sent
            offset += sent
            if offset < len(buf):   # the socket is full: keep the rest for later
                break
            buf = None
        s._wbuf = buf
        s._woff = offset
        if s._closing or s._paused or s._eof:   # the core decides what comes next
            if self.core.after_write(s, buf is not None):
                self._close(s)
                return
            want = IN if self.core.wants_input(s) else 0
        else:
            want = IN
        if buf is not None:
            want |= OUT
        if want != s._mask:
            if s._mask != PARKED:
                self.poller.modify(s._fd, want)
            elif want:
                self.poller.register(s._fd, want)   # back from _park
            else:
                return                      # nothing to wait for yet: stay parked
            s._mask = want

    def _park(self, s: Session) -> None:
        """Stop polling a session that reads nothing and has nothing to write, whose peer hung up.

        Poll reports a hangup (POLLHUP, POLLERR) whatever the mask, so a
        session held back by ``--max-rate`` or paused for backpressure whose
        client had gone made every poll return at once: 100% CPU until its
        held lines were all handled.  It leaves the poll set until it wants
        to read or write again (``_flush`` registers it then), and meets its
        peer's state there.
        """
        try:
            self.poller.unregister(s._fd)
        except (OSError, KeyError, ValueError):
            pass
        s._mask = PARKED

    # -------------------------------------------------------------- close

    def _broken(self, s: Session, e: OSError) -> None:
        """A socket call failed: routine errors quietly, others loudly."""
        if e.errno in ROUTINE_ERRNOS:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("session %d %s: %s", s.id, format_peer(s.peer), e.strerror)
            reason = "reset"
        else:
            log.error("session %d %s: socket error", s.id, format_peer(s.peer),
                      exc_info=e)
            reason = "error"
        self.core.connection_lost(s, reason)
        self._close(s)

    def _close(self, s: Session) -> None:
        """Close ``s``'s socket and let the core finish the session."""
        if s._finished:
            return
        fd = s._fd
        close_now = s._eof or s._abort
        if self.conns.pop(fd, None) is not None and not (
                close_now and self.poller.forgets_closed):
            try:
                self.poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass
        s._wbuf = None
        if s._tls is not None and not s._abort:
            s._tls.goodbye(fd)
        if close_now:
            # After EOF nothing unread can be left; an abort means to reset.
            _close_fd(fd)
        else:
            self._linger(fd)
        self.core.finish(s)
        self._accept_again_if_room()

    def _accept_again_if_room(self) -> None:
        if not self.accepting and not self.draining and \
                len(self.conns) + self.admitting < self.max_connections:
            self._start_accepting()

    def _linger(self, fd: int) -> None:
        """Close ``fd`` without losing output to a reset ("lingering close").

        ``close()`` on a socket with unread input makes the kernel send a
        reset, and a reset makes the client's kernel throw away answers the
        client has not read yet: the last responses, ``ERROR line too
        long``, what a handler sent before ``close_session``.  So send our
        FIN first, read and discard what the peer still sends until its
        EOF, and close then, or after LINGER_TIMEOUT at the latest.
        """
        try:
            sock = socket.socket(fileno=fd)
            try:
                sock.shutdown(socket.SHUT_WR)
            finally:
                sock.detach()
        except OSError:
            _close_fd(fd)
            return

        def discard(mask: int) -> None:
            try:
                data = os.read(fd, RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._end_linger(fd)

        self.lingering[fd] = self.core.call_later(LINGER_TIMEOUT, self._end_linger, fd)
        self.watch(fd, IN, discard)

    def _end_linger(self, fd: int) -> None:
        timer = self.lingering.pop(fd, None)
        if timer is None:
            return
        timer.cancel()
        self.unwatch(fd)
        _close_fd(fd)

    def _end_all_lingering(self) -> None:
        for fd in list(self.lingering):
            self._end_linger(fd)

    # ------------------------------------------------------------ signals

    def install_signals(self) -> None:
        """Route mpxd's signals (``HANDLED_SIGNALS``) to this loop (main thread; idempotent).

        The CLI calls this before it announces readiness, so that a signal
        sent as soon as "listening on" appears is handled, not fatal.
        """
        self._wakeup.install()
        # SIGINT now drains; a KeyboardInterrupt can only be user code's own.
        self.core.interrupts_are_user_errors = True

    def _dispatch_signals(self) -> None:
        # Each signal once: ten HUPs that came during a slow import are one
        # more reload, not ten (each pausing the service).
        for signum in dict.fromkeys(self._wakeup.drain()):
            name = signal.Signals(signum).name.lower()
            getattr(self, "handle_" + name[3:])()

    def handle_term(self) -> None:
        """Graceful shutdown (TERM, INT, QUIT); a second one while draining ends it at once."""
        if self.draining:
            log.info("second stop signal: closing %s now", counted(len(self.conns), "session"))
            self._abort_all("shutdown")
            return
        self.begin_drain()

    handle_int = handle_quit = handle_term

    def handle_usr2(self) -> None:
        """Say that USR2 does nothing here (its default action would kill mpxd)."""
        log.warning(USR2_IGNORED)

    def handle_hup(self) -> str | None:
        """Reload the script; keep the old one if the new one is broken.

        Returns why the reload failed (for ``mpxctl reload``), or None.
        """
        failure = self._reload()
        if self.reload_done is not None:
            self.reload_done(failure)
        return failure

    def _reload(self) -> str | None:
        path = self.core.handlers.path
        if self.draining:
            log.info("not reloading %s: shutting down", path)
            return "not reloading: the daemon is shutting down"
        log.info("reloading %s", path)
        flush_batched()         # now: the import may take long, and the log says why
        self.notifier.reloading()
        # The TLS certificate files (each hook logs its own failure).
        problems = [problem for hook in self.reload_hooks if (problem := hook())]
        failure: str | None = None
        try:
            # A stop need not wait for a slow (or hung) import: the TERM
            # abandons the reload and stays pending, so the drain follows.
            # The serving core is current (not the control channel's, for an
            # mpxctl reload): the script's threads hand work to it meanwhile.
            core_module._current = self.core
            handlers = load_script(path, interruptible=False, stoppable_by=self._wakeup)
        except StopDuringImport as e:
            # Not a failure: the stop that follows says STOPPING=1 itself.
            log.info("reload abandoned: %s during the import of %s", e, path)
            return f"reload abandoned: {e} during the import; stopping"
        except ScriptError as e:
            failure = str(e)
        else:
            if not self.core.reload(handlers):
                failure = "on_reload raised (its traceback is in the log)"
            else:
                log.info("reloaded %s", path)
        if failure is not None:
            log.error("reload failed, still serving the previous version: %s", failure)
            problems.append(f"script refused, the previous version still serves: {failure}")
        if not problems:
            self.notifier.ready(self._status_text())
            return None
        # mpxctl reload and systemd hear of a certificate refused even when
        # the script reloaded: a renewal hook must see that it failed.
        # One line: the control protocol and systemd's STATUS are line-based,
        # and an exception's message may hold newlines.
        said = " ".join("; ".join(problems).splitlines())
        self.notifier.ready(f"reload failed: {said}; {self._status_text()}")
        return said

    def handle_usr1(self) -> None:
        """Reopen log files (after logrotate moved them)."""
        if self.reopen_logs is not None:
            self.reopen_logs()

    # ------------------------------------------------------ edge features

    def adopt(self, fd: int, peer: Any, tls_peer: str | None = None) -> Session:
        """Serve accepted ``fd`` as a session (for admission hooks, see mpxd.edge)."""
        s = self.core.open_session(peer, tls_peer=tls_peer)
        s._fd = fd
        s._mask = IN
        self.conns[fd] = s
        self.poller.register(fd, IN)
        return s

    def admission_started(self) -> None:
        """An accepted connection is on its way to a session (a TLS handshake began)."""
        self.admitting += 1

    def admission_ended(self) -> None:
        """It became a session (``adopt``) or is gone: its place is free again."""
        self.admitting -= 1
        self._accept_again_if_room()

    def watch(self, fd: int, mask: int, callback: Callable[[int], None]) -> None:
        """Poll ``fd``, which is not a session, for ``mask``; events go to ``callback(mask)``."""
        self.watchers[fd] = callback
        self.poller.register(fd, mask)

    def rewatch(self, fd: int, mask: int) -> None:
        """Poll a watched ``fd`` for ``mask`` from now on."""
        self.poller.modify(fd, mask)

    def unwatch(self, fd: int) -> None:
        """Stop polling a watched ``fd`` (before it is closed or adopted)."""
        if self.watchers.pop(fd, None) is not None:
            try:
                self.poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass

    def soft_drain(self) -> None:
        """Stop accepting for good; exit once the open sessions have ended on their own.

        ``mpxctl drain``.  Unlike ``begin_drain`` (TERM) nothing is closed
        and there is no deadline; a TERM during it closes what is left at once.
        """
        if self.draining:
            return
        log.info("draining: accepting no more connections; %s open, "
                 "exiting after the last one", counted(len(self.conns), "session"))
        self.notifier.stopping()
        self._stop_accepting()
        self.draining = True
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        self.core.stopping()

    # ------------------------------------------------------------ draining

    def begin_drain(self) -> None:
        """Stop accepting and reading; close sessions once their output is out."""
        if self.draining:
            return
        to_drain = counted(len(self.conns), "session")
        log.info("shutting down: %s to drain (at most %gs)", to_drain,
                 self.config.drain_timeout)
        self.notifier.stopping(f"shutting down: {to_drain} to drain")
        self._stop_accepting()
        self.draining = True
        for fd, sock in self.listeners.items():
            sock.close()
        self.listeners.clear()
        self.core.shutdown()
        self.core.call_later(self.config.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        if self.conns:
            log.warning("drain timeout: closing %s with output unsent",
                        counted(len(self.conns), "session"))
        self._abort_all("shutdown")

    def _abort_all(self, reason: str) -> None:
        for s in list(self.conns.values()):
            self.core.abort(s, reason)
        self._end_all_lingering()

    # ------------------------------------------------------------- status

    def _status_text(self) -> str:
        core = self.core
        return (f"{counted(len(self.conns), 'connection')}, {core.connections_total} total, "
                f"{counted(core.requests_total, 'request')}")

    def _report_status(self) -> None:
        self.notifier.status(self._status_text())


def _read_rest(fd: int, data: bytes) -> bytes:
    """``data`` filled a first read: add what else is waiting (one more read).

    An error is not raised here, so that ``data`` is handled first: the
    socket stays readable and the next pass's read meets the error, or EOF
    after a reset (the kernel reports a reset once).
    """
    try:
        return data + os.read(fd, RECV_SIZE)
    except OSError:
        return data


def _taken(s: Session) -> int:
    """Bytes written to ``s``'s socket that its client has taken (its kernel has).

    What was written (over TLS, the ciphertext), less what the kernel still
    holds (SIOCOUTQ): on loopback a slow reader frees the socket's buffer
    long before mpxd can write again.
    """
    written = s._tls.written if s._tls is not None else s._bytes_out
    try:
        return written - struct.unpack("i", fcntl.ioctl(s._fd, termios.TIOCOUTQ,
                                                          b"\0" * 4))[0]
    except OSError:
        return written


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def prepare_listeners(listeners: list[socket.socket], keepalive: int) -> None:
    """Ready freshly bound listeners before the script imports, and keep them
    from children: clients may connect meanwhile, and the script may fork."""
    for sock in listeners:
        prepare_listener(sock, keepalive)
    keep_from_children(lambda: [sock.fileno() for sock in listeners])


def prepare_listener(sock: socket.socket, keepalive: int = 0) -> None:
    """Make a listening socket fit for the loop, whoever created it.

    Non-blocking, or one accept could stall the loop (systemd may pass
    blocking sockets).  TCP_NODELAY and the keepalive settings here rather
    than per connection: Linux copies them to every accepted socket, which
    saves system calls per accept.  Responses go out in one write per pass,
    so Nagle would only add delay.  Keepalive (``--keepalive``, seconds of
    silence before the first probe; 3 probes a third of that apart) closes
    the sessions of clients whose machine went away without a FIN (a laptop
    closed, a NAT entry dropped), which would otherwise stay open for ever.
    """
    sock.setblocking(False)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    # A socket that has keepalive on already came from systemd with its
    # unit's KeepAlive*= settings: those are the operator's, and stay.
    if keepalive and hasattr(socket, "TCP_KEEPIDLE") and \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
        options += [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, keepalive // 3)),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)]
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go programs do.

    Shells and systemd start programs with a soft limit of 1024, low for the
    sake of programs that use select(); mpxd polls, so it takes what the
    hard limit allows.  The operator's caps are the hard limit (``ulimit
    -Hn``, systemd's ``LimitNOFILE=``) and ``--max-connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:        # the kernel's cap is nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                wanted = int(f.read())
        except (OSError, ValueError):
            wanted = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            pass                # then the soft limit stays; accepting still works


def default_max_connections() -> int:
    """What RLIMIT_NOFILE allows, less headroom for listeners, logs and threads."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, soft - 32) if soft > 64 else max(1, soft // 2)
