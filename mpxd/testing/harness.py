"""A fake I/O edge with a fake clock: test a handler script without sockets or sleeps.

``Harness`` drives the daemon's own ``mpxd.core.Core`` exactly as the real
edge (``mpxd.loop.Loop``) does: it hands the core the bytes a client sends,
then works through ``core.dirty`` and delivers the queued output to that
client, closing sessions the core marked.  Framing, session semantics,
timers, idle timeouts and error handling are the daemon's code, not a copy.
What the harness replaces is only what touches the outside world: sockets
(each ``Client`` is an in-memory peer), time (``advance`` moves a fake
clock) and the moment worker threads are waited for (``run_threads``).

    h = Harness("handlers/counter.py", idle_timeout=5)
    c = h.connect()
    assert c.send("2") == ["2"]
    h.advance(5)
    assert c.closed and c.close_reason == "timeout"
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
from dataclasses import fields
from typing import Any, Callable, Iterable

import click

from .. import core as core_module
from ..config import Config, water_marks
from ..core import Core, as_seconds, check_callable, check_job
from ..script import Handlers, ScriptError, load_script
from ..session import Session
from ..unix import UnixPeer

__all__ = ["Harness", "Client"]

# Passes of the loop allowed at one instant of fake time before the harness
# decides the script keeps scheduling work for "now" forever.
MAX_PASSES = 10_000

EOLS = {"lf": "\n", "crlf": "\r\n", "\n": "\n", "\r\n": "\r\n"}
_EOF = object()            # in a client's inbound queue: the peer sent FIN
# Settings of the process, its sockets and the network edge (mpxd.edge: TLS,
# unix sockets, access rules, rate limits, the control channel): the harness
# has none of these, so it refuses them rather than ignore them (test those
# with ``mpxd_server``; ``connect(tls_peer=...)`` stands in for a TLS client).
DAEMON_ONLY = {"script", "port", "hosts", "poller", "backlog", "max_connections", "keepalive",
               "pidfile", "log_file", "log_level", "syslog", "daemon", "user", "group",
               "tls_cert", "tls_key", "tls_ca", "tls_handshake_timeout", "unix",
               "unix_mode", "allow", "deny", "max_per_ip", "max_rate", "control"}
# What is left is what the core reads: eol, max_line, max_output, high_water,
# low_water, idle_timeout, drain_timeout, send_timeout, threads.
OPTIONS = {f.name for f in fields(Config)} - DAEMON_ONLY


# A test must not run the core in a state the daemon refuses to start in:
# options the command line has are checked by its own click parameters (one
# place for the ranges); the water marks, which it derives, here.
_WATER_MARKS = {"high_water": 1, "low_water": 0}      # name: least value


def _as_on_the_command_line(name: str, value: Any) -> Any:
    """``value`` converted and checked as ``mpxd --NAME`` does; else ValueError."""
    from ..cli import main          # not at import: the CLI pulls in the whole daemon
    param = next((p for p in main.params if p.name == name), None)
    if param is None:
        least = _WATER_MARKS[name]
        if not least <= value < math.inf:           # nan fails too
            raise ValueError(f"{name}={value!r} is refused: it must be {least} or "
                             f"more, and finite")
        return value
    try:
        return param.process_value(click.Context(main), value)
    except click.BadParameter as e:
        raise ValueError(f"{name}={value!r} is refused, as by mpxd "
                         f"--{name.replace('_', '-')}: {e.message}") from None


def make_config(script: str, **options: Any) -> Config:
    """A ``Config`` for ``script`` from keyword options named like its fields.

    Only the fields the core reads are accepted (see ``OPTIONS``).
    ``eol`` may be given as ``"lf"``/``"crlf"`` (as on the command line) or as
    the string itself.  ``max_output`` alone sets the high- and low-water
    marks the way ``mpxd --max-output`` does.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        daemon_only = [name for name in unknown if name in DAEMON_ONLY]
        why = (f"{', '.join(daemon_only)} set(s) up the process or its sockets, "
               f"which the harness does not have (use mpxd_server); "
               if daemon_only else "")
        raise TypeError(f"not a harness option: {', '.join(unknown)}; {why}"
                        f"options are {', '.join(sorted(OPTIONS))}")
    for name in ("max_line", "max_output", "threads", "idle_timeout", "drain_timeout",
                 "send_timeout", *_WATER_MARKS):
        if options.get(name) is not None:
            options[name] = _as_on_the_command_line(name, options[name])
    if "eol" in options:
        if isinstance(options["eol"], str) and options["eol"].lower() in EOLS:
            options["eol"] = options["eol"].lower()     # as click's Choice takes it
        if options["eol"] not in EOLS:
            raise ValueError(f"eol must be 'lf' or 'crlf', not {options['eol']!r}")
        options["eol"] = EOLS[options["eol"]]
    if "max_output" in options and "high_water" not in options:
        high_water, low_water = water_marks(options["max_output"])   # as the CLI does
        options["high_water"] = high_water
        options.setdefault("low_water", low_water)
    for name in ("idle_timeout", "send_timeout"):
        if options.get(name) == 0:
            options[name] = None                # as --idle-timeout 0: never
    return Config(script=script, **options)


class _Job:
    """One ``run_in_thread`` call as the harness tracks it."""

    __slots__ = ("has_then", "returned", "raised", "finished", "deliveries", "taken")

    def __init__(self, has_then: bool) -> None:
        self.has_then = has_then
        self.returned = threading.Event()      # the function is done
        self.raised = False
        self.finished = 0                      # rank among the jobs that have returned
        self.deliveries: list[tuple[Callable[..., Any], tuple]] = []
        self.taken = False                     # run_threads has delivered it

    @property
    def delivered(self) -> bool:
        # The core hands the loop at least a result with a ``then`` to call
        # and a failure without one, to log it; anything else may come later.
        expected = 1 if (self.has_then or self.raised) else 0
        return len(self.deliveries) >= expected


class Client:
    """The peer's end of one connection to a ``Harness``.

    Made by ``Harness.connect()``.  ``send``, ``close`` and
    ``resume_reading`` return the lines that arrived during the call.
    Everything the server writes to this client is kept: ``received()``
    returns all of it as lines, ``new()`` the lines no call has returned
    yet (a greeting, timer output, broadcasts), ``output`` the raw bytes.
    """

    def __init__(self, harness: Harness, session: Session) -> None:
        self.harness = harness
        self.session = session
        self.output = b""               # every byte the server wrote to this client
        self.closed = False             # the server closed the connection
        self.reading = True             # False: output stays unsent (a slow client)
        self._inbound: list[Any] = []   # sent but not yet read by the server
        self._unsent: list[bytes] = []  # written by the core, not yet read by us
        self._lines: list[str] = []     # output as lines, end-of-line removed
        self._unreturned: list[int] = []  # indexes in _lines no call has returned
        self._peer_done = False         # we sent EOF or RST

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self.closed else "open"
        return f"<Client {self.session.id} {self.peer!r} {state}>"

    @property
    def peer(self) -> Any:
        return self.session.peer

    @property
    def close_reason(self) -> str:
        """Why the session ended (``eof``, ``timeout``, ``error``, ...); ``""`` while open."""
        return self.session._reason if self.closed else ""

    # --------------------------------------------------------- the peer acts

    def send(self, data: str | bytes | Iterable[str]) -> list[str]:
        """Send input; return the lines the server sent in answer, before going idle.

        ``data`` is one line (``str``; a newline is added if it has none),
        several lines (a list of ``str``, sent as one packet), or raw
        ``bytes`` sent as they are, partial lines included.  Answers that
        come later (timers, worker threads) are not returned here: see
        ``new()``, ``received()``, ``Harness.advance``, ``Harness.run_threads``.
        """
        if isinstance(data, str):
            data = (data if data.endswith("\n") else data + "\n").encode(
                "utf-8", "surrogateescape")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            # A list, not any iterable: a dict sent its keys, a set in no order.
            if not isinstance(data, (list, tuple)) or \
                    not all(isinstance(line, str) for line in data):
                raise TypeError(f"send takes a str (a line), a list of str (lines) "
                                f"or bytes (sent as they are), not {data!r}")
            data = "".join(line + "\n" for line in data).encode("utf-8", "surrogateescape")
        self._check_open("send")
        if data:
            self._inbound.append(bytes(data))
        return self._step(self.harness._settle)

    def close(self) -> list[str]:
        """Send EOF (a half-close, like ``nc -N``); return the lines answered.

        The server handles an unterminated last line, writes what is queued
        and closes; this client goes on receiving until then.  On a
        connection already closed (by either side) it does nothing and
        returns ``[]``, as closing a socket twice does: a test's clean-up
        may close every client.
        """
        if self.closed or self._peer_done:
            return []
        self._peer_done = True
        self._inbound.append(_EOF)
        return self._step(self.harness._settle)

    def reset(self) -> None:
        """Abort the connection with a TCP reset: unread input and unsent output are lost.

        Does nothing on a connection already closed (by either side).
        """
        if self.closed or self._peer_done:
            return
        self._peer_done = True
        self._inbound.clear()
        self.harness._reset(self)

    def pause_reading(self) -> None:
        """Stop reading, like a client that does not read: the server's output backs up."""
        self.reading = False

    def resume_reading(self) -> list[str]:
        """Read again; return the lines that arrive, including backed-up ones."""
        self.reading = True
        if self.closed:
            return []
        self.harness.core.dirty.append(self.session)
        return self._step(self.harness._settle)

    # ------------------------------------------------------ what arrived

    def received(self) -> list[str]:
        """Every line the server sent to this client so far, end-of-line removed."""
        return list(self._lines)

    def new(self) -> list[str]:
        """The lines received that no ``send``, ``close`` or ``new`` has returned yet."""
        lines = [self._lines[i] for i in self._unreturned]
        self._unreturned.clear()
        return lines

    def _step(self, run: Callable[[], None]) -> list[str]:
        """Run one step of the harness; return (as returned) the lines it brought."""
        start = len(self._lines)
        run()
        self._unreturned = [i for i in self._unreturned if i < start]
        return self._lines[start:]

    def _deliver(self, data: bytes) -> None:
        """The edge wrote ``data`` (always whole lines) to this client."""
        self.output += data
        eol = self.harness.config.eol
        lines = data.decode("utf-8", "surrogateescape").split(eol)
        lines.pop()                     # the empty string after the last end-of-line
        if eol == "\n":                 # a CR before the LF is not data, for mpxd's
            lines = [line[:-1] if line.endswith("\r") else line for line in lines]
            # input as for LineClient: "b\r\n" inside a response reads as "b"
        self._unreturned.extend(range(len(self._lines), len(self._lines) + len(lines)))
        self._lines.extend(lines)

    def _check_open(self, what: str) -> None:
        if self.closed or self._peer_done:
            by = "the server" if self.closed else "this client"
            raise BrokenPipeError(f"cannot {what}: connection {self.session.id} "
                                  f"was closed by {by}")


class Harness:
    """Run a handler script on the daemon's core with in-memory clients and a fake clock.

    ``script`` is a path, relative to the current directory as on the
    ``mpxd`` command line; it is loaded exactly as the daemon loads it (a
    broken script raises ``mpxd.script.ScriptError`` with the daemon's
    message).  ``options`` are the command-line options the core reads,
    named as keywords: ``eol`` (``"lf"``/``"crlf"``), ``max_line``,
    ``max_output``, ``idle_timeout`` (``0``: off), ``drain_timeout``, ``send_timeout``,
    ``threads``, and ``high_water``/``low_water`` to set the backpressure
    marks directly.  Options of the process or its sockets (``port``,
    ``max_connections``, ``tls_cert``, ``max_rate``, ...) raise ``TypeError``:
    test those with ``mpxd_server``.

    Time starts at 0 and moves only through ``advance``; worker threads'
    results arrive only in ``run_threads``.  ``errors`` lists what handler
    code raised; the core also logs it to the ``mpxd`` logger as the daemon
    does.  ``close()`` (or leaving a ``with`` block) shuts down as SIGTERM does.
    """

    def __init__(self, script: str | os.PathLike[str], **options: Any) -> None:
        # As in the daemon, the script is imported before any server runs:
        # mpxd.call_later at import time fails here too, and cannot land on
        # another harness's core.
        core_module._current = None
        handlers = load_script(script)
        self.config = make_config(handlers.path, **options)
        self._now = 0.0
        self.core = Core(handlers, self.config, clock=lambda: self._now)
        self.core.errors = []
        # Results from threads reach the core only in run_threads, so a test
        # sees the same answers however fast its threads are.
        self._thread = threading.get_ident()
        self._local = threading.local()
        self._handed_over = threading.Condition()
        self._jobs: list[_Job] = []
        self._from_threads: list[tuple[Callable[..., Any], tuple]] = []
        self._submitting: _Job | None = None
        self._finish_order = itertools.count(1)
        self.core.run_in_thread = self._run_in_thread
        self.core.call_soon_threadsafe = self._call_soon_threadsafe
        self.clients: list[Client] = []
        self._by_id: dict[int, Client] = {}
        self._next_port = 50000
        self._closed = False
        self._runaway = False           # a pass raised "still busy" (see close)
        if not self.core.start():
            # As the daemon does: a failing on_start stops start-up.
            self.core.stop(run_on_stop=False)
            self._release_current()
            raise ScriptError(f"{handlers.path}: on_start failed: "
                              f"{self.core.errors[-1][2]!r}; not serving")
        self._settle()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- inspection

    @property
    def now(self) -> float:
        """The fake clock: seconds since the harness started."""
        return self._now

    @property
    def errors(self) -> list[tuple[str, Session | None, BaseException]]:
        """Exceptions raised by handler code: ``(where, session or None, exception)``."""
        return self.core.errors

    @property
    def handlers(self) -> Handlers:
        return self.core.handlers

    @property
    def module(self) -> Any:
        """The loaded script module (the current version after a reload)."""
        return self.core.handlers.module

    @property
    def sessions(self) -> list[Session]:
        """The open sessions, as ``mpxd.sessions()`` shows them to handlers."""
        return list(self.core.sessions())

    # --------------------------------------------------------------- acting

    def connect(self, peer: Any = None, tls_peer: str | None = None) -> Client:
        """Open a connection from ``peer`` (a ``(host, port)``); runs ``handle_open``.

        ``peer`` may also be a ``mpxd.unix.UnixPeer(pid, uid, gid)``, as
        ``s.peer`` is for a ``--unix`` client.  ``tls_peer`` sets
        ``s.tls_peer`` as a verified TLS client certificate would.
        """
        self._check_running()
        if peer is None:
            self._next_port += 1
            peer = ("127.0.0.1", self._next_port)
        elif not isinstance(peer, UnixPeer) and not (
                isinstance(peer, tuple) and len(peer) == 2
                and isinstance(peer[0], str) and isinstance(peer[1], int)):
            # A bare host ("10.0.0.1") would make s.peer[0] "1" in the handler.
            raise TypeError(f"h.connect needs peer=(host, port), as s.peer is for a "
                            f"TCP client, such as ('203.0.113.5', 4242); not {peer!r}")
        if tls_peer is None:
            s = self.core.open_session(peer)
        else:
            s = self.core.open_session(peer, tls_peer=tls_peer)
        client = Client(self, s)
        self.clients.append(client)
        self._by_id[s.id] = client
        self._settle()
        return client

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward, firing each timer due on the way at its own time."""
        seconds = as_seconds(seconds, "advance needs seconds")
        if not math.isfinite(seconds):      # a call_every would fire for ever
            raise ValueError(f"advance needs a finite number of seconds, not {seconds}")
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._check_running()
        core = self.core
        target = self._now + seconds
        self._settle()
        while True:
            deadline = core.next_deadline()
            if deadline is None or deadline > target:
                break
            self._now = core.now = max(self._now, deadline)
            self._settle()
        self._now = core.now = target
        self._settle()

    def run_threads(self, timeout: float = 10.0) -> None:
        """Wait for pending ``run_in_thread`` work and deliver its ``then`` callbacks.

        In the daemon a result reaches the loop as soon as its thread
        finishes; in the harness only here, so nothing arrives while a test
        is not looking.  Results are delivered in the order the work
        finished, as in the daemon: to test a given order, make the
        functions wait for each other (``threading.Event``).  What other
        threads passed to ``call_soon_threadsafe`` is delivered first.
        Repeats while callbacks start more work; raises ``TimeoutError`` if
        the work is not done within ``timeout`` real seconds.
        """
        self._check_running()
        limit = time.monotonic() + timeout
        while self._jobs or self._from_threads:
            jobs, self._jobs = self._jobs, []
            done = all(job.returned.wait(max(0.0, limit - time.monotonic()))
                       for job in jobs)
            with self._handed_over:
                done = done and self._handed_over.wait_for(
                    lambda: all(job.delivered for job in jobs),
                    max(0.0, limit - time.monotonic()))
                if not done:
                    self._jobs[:0] = jobs
                    running = sum(not job.returned.is_set() for job in jobs)
                    raise TimeoutError(f"{running} run_in_thread call(s) still "
                                       f"running after {timeout}s")
                items, self._from_threads = self._from_threads, []
                for job in sorted(jobs, key=lambda job: job.finished):
                    job.taken = True
                    items += job.deliveries
            for fn, args in items:
                Core.call_soon_threadsafe(self.core, fn, *args)
            self._settle()

    def _run_in_thread(self, fn: Callable[..., Any], *args: Any,
                       then: Callable[[Any], Any] | None = None) -> None:
        """``core.run_in_thread`` with the work tracked for ``run_threads``."""
        check_job(fn, then)             # before fn is wrapped and the job tracked
        self.core.check_thread("run_in_thread")     # a refused call is no job either
        job = _Job(then is not None)
        self._jobs.append(job)
        local = self._local

        @functools.wraps(fn)        # logs name the user's function, not this one
        def work(*work_args: Any) -> Any:
            local.job = None
            try:
                return fn(*work_args)
            except BaseException:
                job.raised = True
                raise
            finally:
                local.job = job     # what this thread hands over next is job's result
                job.finished = next(self._finish_order)
                job.returned.set()

        self._submitting = job
        try:
            Core.run_in_thread(self.core, work, *args, then=then)
        finally:
            self._submitting = None

    def _call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """``core.call_soon_threadsafe`` as the harness sees it: threads wait for run_threads."""
        check_callable(fn, "call_soon_threadsafe")
        if threading.get_ident() == self._thread:
            job = self._submitting      # a pool that reports at once, on this thread
            if job is None:             # handler code: the loop runs it next pass
                Core.call_soon_threadsafe(self.core, fn, *args)
                return
        else:
            job = getattr(self._local, "job", None)
            self._local.job = None
        with self._handed_over:
            if job is not None and not job.taken:
                job.deliveries.append((fn, args))
            else:
                self._from_threads.append((fn, args))
            self._handed_over.notify_all()

    def reload(self) -> None:
        """Reload the script from its file, as SIGHUP does.

        The new version is validated first; if it is broken, or its
        ``on_reload`` raises, ``ScriptError`` is raised and the old version
        keeps serving, as in the daemon.
        """
        self._check_running()
        path = self.core.handlers.path
        handlers = load_script(path)
        if self.core.reload(handlers) is False:
            raise ScriptError(f"{path}: on_reload failed (see h.errors); "
                              f"still serving the previous version")
        self._settle()

    def close(self) -> None:
        """Shut down as on SIGTERM: write queued output, close every session, ``on_stop``.

        Sessions whose client does not read are closed when the drain
        timeout passes, as in the daemon (the fake clock moves on by it).
        """
        if self._closed:
            return
        core = self.core
        reported = self._runaway
        try:
            core.shutdown()
            self._settle()
            if core.sessions_by_id:
                self.advance(self.config.drain_timeout)
                for s in list(core.sessions_by_id.values()):
                    core.abort(s, "shutdown")
                self._settle()
        except RuntimeError:
            # A timer that reschedules itself with no delay: the test that
            # met it has its error already; a second one from its clean-up
            # (the fixture's h.close()) would only bury it.
            if not reported:
                raise
        finally:                # on_stop runs even if the script's timers never settle
            self._closed = True
            core.stop()
            self._release_current()

    def _release_current(self) -> None:
        """Leave no stopped core behind for ``mpxd.call_later`` & co to find."""
        if core_module._current is self.core:
            core_module._current = None

    # ------------------------------------------------------- the fake edge

    def _check_running(self) -> None:
        if self._closed:
            raise RuntimeError("this harness is closed")

    def _settle(self) -> None:
        """Run loop passes at the current instant until nothing is left to do.

        One pass is what ``Loop._serve`` does after ``poll`` returns: read
        one chunk per readable connection, run due timers, run callbacks
        from threads, then flush every session in ``core.dirty``.
        """
        core = self.core
        dirty = core.dirty
        for _ in range(MAX_PASSES):
            busy = False
            for client in list(self._by_id.values()):
                if client._inbound and self._readable(client.session):
                    busy = True
                    chunk = client._inbound.pop(0)
                    if chunk is _EOF:
                        core.eof_received(client.session)
                    else:
                        core.data_received(client.session, chunk)
            deadline = core.next_deadline()
            if deadline is not None and deadline <= core.now:
                busy = True
                core.run_timers()
            if core.has_ready:
                busy = True
                core.run_ready()
            if dirty:
                busy = True
                for s in dirty:
                    self._flush(s)
                dirty.clear()
            if not busy:
                return
        self._runaway = True
        raise RuntimeError(f"still busy after {MAX_PASSES} loop passes at "
                           f"t={self._now}: does a timer reschedule itself with no delay?")

    @staticmethod
    def _readable(s: Session) -> bool:
        # As in the loop: input waits in the kernel while the core says so.
        return Core.wants_input(s)

    def _flush(self, s: Session) -> None:
        """Deliver ``s``'s queued output; close it or resume reading as its state says."""
        if s._finished:
            return
        if s._abort:
            self._close(s)
            return
        client = self._by_id[s.id]
        out = s._out
        if out is not None:
            s._out = None
            client._unsent.append(out[0] if len(out) == 1 else b"".join(out))
        if client.reading and client._unsent:
            data = b"".join(client._unsent)
            client._unsent.clear()
            client._deliver(data)
            s._out_size -= len(data)
            s._bytes_out += len(data)
        if self.core.after_write(s, bool(client._unsent)):
            self._close(s)

    def _close(self, s: Session) -> None:
        """The edge closes the connection; the core runs ``handle_close``."""
        if s._finished:
            return
        client = self._by_id.pop(s.id)
        client._unsent.clear()
        client._inbound.clear()
        client.closed = True
        self.core.finish(s)

    def _reset(self, client: Client) -> None:
        s = client.session
        if not s._finished:
            self.core.connection_lost(s, "reset")
            self._close(s)
        self._settle()
