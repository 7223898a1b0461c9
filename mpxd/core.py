"""The server core: sessions, framing, handler calls, output queues and timers.

The core never touches a socket or a poller.  An I/O edge drives it:

* the edge tells the core what happened: ``open_session``, ``data_received``,
  ``eof_received``, ``connection_lost``, ``output_drained``, ``finish``;
* the core answers by changing session state (queued output in ``s._out``,
  ``s._paused``, ``s._closing``, ``s._abort``) and listing every session whose
  state changed in ``core.dirty``; the edge works through that list after
  each pass of its loop: writes the output, adjusts what it polls for, closes.

``mpxd.loop`` is the real edge (sockets and epoll); ``mpxd.testing`` is a fake
one.  Both run exactly this code, so what a handler author tests is what the
daemon does.
"""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from .config import Config
from .framing import LineFramer
from .logs import formatted_exception, log_fast
from .script import Handlers, retire
from .session import Session, response_problem, short_repr
from .signals import signal_handlers_kept
from .threads import DaemonThreadPool
from .timers import Timer, TimerHeap

__all__ = ["Core", "current_core", "as_seconds", "check_callable", "check_job"]

log = logging.getLogger("mpxd")

ERROR_LINE_TOO_LONG = "ERROR line too long"

# Requests of each script version whose return value is checked (a handler
# that returns its answer instead of setting s.response is warned about).
CHECKED_REQUESTS = 1000
# Seconds between looks at a closing session whose client does not take its
# last output (--send-timeout).
STALL_CHECK = 1.0

_current: Core | None = None
_importing_over: Core | None = None     # the core serving while a HUP imports


# Where mpxd's own frames come from: the package, and the thread pool's module.
_MACHINERY = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.dirname(os.path.abspath(concurrent.futures.__file__)) + os.sep)


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback from the first frame of user code on.

    The frames above it (the loop, the call into the handler) are the same
    every time and only push the user's own lines down the log.  A
    traceback with no user frame at all is kept whole.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_MACHINERY):
        tb = tb.tb_next
    if tb is None:
        tb = exc.__traceback__
    text = formatted_exception(exc, tb)
    if type(exc) is AttributeError and str(exc).startswith("'Session' object has no attribute"):
        text += ("\n(a session has only the attributes mpxd gives it: keep your own "
                 "per-session state in s.handle, as in s.handle = {'count': 0})")
    return text


def as_seconds(value: Any, needs: str) -> float:
    """``value`` (an int, a float, a Decimal, ...) as float seconds; a str is refused.

    Checked when the timer is made, not when it would run: by then nobody
    could tell the handler why.
    """
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{needs}, not {value!r}")
    return float(value)


def check_callable(fn: Any, what: str) -> None:
    """Refuse what is not callable at once: when it would run, nobody would be told why."""
    if not callable(fn):
        raise TypeError(f"{what} needs a function to call, not {fn!r}")


def check_job(fn: Any, then: Any) -> None:
    """What ``run_in_thread`` is given: ``fn`` to call, ``then`` None or one too."""
    check_callable(fn, "run_in_thread")
    if then is not None:
        check_callable(then, "run_in_thread's then")


def current_core(any_thread: bool = False) -> Core:
    """The core whose handler code is running (for ``mpxd.call_later`` & co).

    ``any_thread``: for ``call_soon_threadsafe`` from the script's own
    threads, which go on while a HUP imports the new version (when no core
    is current, so that the import itself is refused as at start-up).
    """
    if _current is None and any_thread and _importing_over is not None:
        return _importing_over
    if _current is None:
        raise RuntimeError("no mpxd server runs this code: call this from a "
                           "handler, or at start-up from on_start(server) (on a "
                           "reload, from on_reload), not at import")
    return _current


def format_peer(peer: Any) -> str:
    """``host:port``, ``[v6]:port``, or the peer as given (unix sockets)."""
    if isinstance(peer, tuple) and len(peer) == 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


SHOWN_REQUEST = 200     # characters of a request quoted in a log line
# call_every's shortest interval: no loop passes faster, and below it a float
# clock can stop moving (now + 1e-300 == now made the timer run for ever).
MIN_INTERVAL = 0.001


def shown_request(line: str) -> str:
    """``line`` quoted for a log line; a long one cut, so a client cannot flood the log."""
    if len(line) <= SHOWN_REQUEST:
        return repr(line)
    return f"{line[:SHOWN_REQUEST]!r}... ({len(line)} characters)"


class Core:
    """Everything between the bytes an edge reads and the bytes it writes."""

    def __init__(self, handlers: Handlers, config: Config,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.now = clock()
        self.started = self.now
        self.timers = TimerHeap(defer=lambda fn: self.call_soon_threadsafe(fn))
        self.sessions_by_id: dict[int, Session] = {}
        self.dirty: list[Session] = []
        self.errors: list[tuple[str, Session | None, BaseException]] | None = None
        self.interrupts_are_user_errors = False  # the daemon's loop sets it
        # How log lines name a session and the line limit (the control
        # channel's core has its own names for both).
        self.sessions_are = "session"
        self.line_limit_is = "--max-line"
        self.wake: Callable[[], None] = lambda: None   # set by the edge
        self._ready: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._handling: Session | None = None   # whose handler runs (for run_in_thread)
        self._executor: DaemonThreadPool | None = None
        self._next_id = 1
        self._loop_thread = threading.get_ident()     # start() sets it again
        self._eol = config.eol
        self._eol_bytes = config.eol.encode()
        self._high_water = config.high_water
        self._low_water = config.low_water
        self._max_output = config.max_output
        self._send_timeout = config.send_timeout
        # How many bytes of a session's output its client has taken: the
        # loop asks the kernel; the test kit's clients take what they get.
        self.edge_taken: Callable[[Session], int] = lambda s: s._bytes_out
        self._max_line = config.max_line
        self._idle_timeout = config.idle_timeout
        self._session_log = config.session_log
        # figures for logs, STATUS= and the control channel
        self.connections_total = 0
        self.requests_total = 0
        self.errors_total = 0
        self.closed_bytes_in = 0        # of the sessions that have ended (for stats)
        self.closed_bytes_out = 0
        self.reloads = 0
        self._stopping_said = False     # on_stopping has run
        self._install(handlers)

    # ----------------------------------------------------------- the script

    def _install(self, handlers: Handlers) -> None:
        self.handlers = handlers
        if handlers.helpers is not None:
            handlers.helpers.keep()     # the version it replaces may go
        # The first requests of each version go through a check that costs
        # the hot path nothing afterwards; see _check_request.
        self._handle_request = self._check_request
        self._checks_left = CHECKED_REQUESTS
        self._handle_open = handlers.handle_open
        self._handle_close = handlers.handle_close
        self._said_close_response = False   # the warning about it, once per version
        self._said_returned = False         # the same, for a returned answer

    def start(self) -> bool:
        """Make this the current core and run the script's ``on_start``.

        False when ``on_start`` raised (logged with its traceback): the
        service it was to prepare is not there, so the edge does not serve.
        """
        global _current
        _current = self
        self._loop_thread = self.timers.thread = threading.get_ident()
        if self.handlers.on_start is None:
            return True
        with signal_handlers_kept(self.handlers.path, "in on_start"):
            return self._call_user(self.handlers.on_start, None, "on_start", self)

    def stop(self, run_on_stop: bool = True) -> None:
        """Run the script's ``on_stop`` and end the worker threads.

        ``run_on_stop=False`` after a failed ``on_start``: ``on_stop`` may
        take for granted what ``on_start`` set up.
        """
        global _current
        _current = self
        if run_on_stop and self.handlers.on_stop is not None:
            self._call_user(self.handlers.on_stop, None, "on_stop", self)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def reload(self, handlers: Handlers) -> bool:
        """Swap in a newly loaded, already validated version of the script.

        Open sessions stay and keep their ``handle``; the new module's
        ``on_reload(old_module)`` runs first so it can carry state over.  If
        it raises, the state did not come over: the old version keeps
        serving and ``False`` is returned.
        """
        global _current
        _current = self
        old = self.handlers
        # The version that goes has functions that refer to its globals, and
        # globals that refer to its functions: a cycle, which only the
        # garbage collector frees.  It counts new containers to decide when
        # to look, and a script's data is mostly strings and numbers, which
        # it does not count: ten reloads of a script holding 100,000 strings
        # kept 60 MB for as long as the daemon ran on.  So collect once the
        # reload's frames (which still hold that version) are gone.
        self.call_later(0, gc.collect)
        if handlers.on_reload is not None:
            with signal_handlers_kept(handlers.path, "in on_reload"):
                reloaded = self._call_user(handlers.on_reload, None, "on_reload", old.module)
            if not reloaded:
                retire(handlers, serving=old)
                return False
        self._install(handlers)
        retire(old)
        self.reloads += 1
        return True

    # ------------------------------------------------------ edge -> core

    def open_session(self, peer: Any, tls_peer: str | None = None) -> Session:
        """A connection was accepted: make its session and greet it."""
        global _current
        _current = self
        session_id = self._next_id
        self._next_id = session_id + 1
        s = Session(self, session_id, peer, LineFramer(self._max_line), self.now)
        if tls_peer is not None:
            s._tls_peer = tls_peer      # before handle_open, which may look at it
        self.sessions_by_id[session_id] = s
        self.connections_total += 1
        if self._idle_timeout:
            self.set_idle_timeout(s, self._idle_timeout)
        if self._handle_open is not None:
            s._batch = batch = []
            self._handling = s
            try:
                returned = self._handle_open(s)
                response = s.response
                ok = True
            except BaseException as e:
                self._user_code_failed("handle_open", s, e)
                returned, response, ok = None, "", False
            self._handling = None
            s._batch = None
            s.response = ""
            problem = response_problem(response) if ok else None
            if problem is not None:
                self._user_code_failed("handle_open", s, problem)
                ok = False
            elif returned is not None and not response:
                self._returned_instead(returned, "handle_open")
            if ok and response:
                batch.append(response)
            if batch:
                self._queue_batch(s, batch)
            if not ok:
                self.request_close(s, "error")
        return s

    def data_received(self, s: Session, data: bytes) -> None:
        """Bytes arrived for ``s``: frame them and handle every complete line."""
        s._bytes_in += len(data)
        if s._closing:
            # close_session (perhaps from another session or a timer earlier
            # in this pass) means no further input of s is processed.
            return
        s._last_active = self.now
        framer = s._framer
        lines = framer.feed(data)
        if lines:
            if s._held is not None:
                s._held.extend(lines)
            else:
                self._handle_lines(s, lines)
        if framer.overflow and not s._closing and s._held is None:
            self._line_too_long(s)      # held lines first: see output_drained

    def eof_received(self, s: Session) -> None:
        """The peer will send no more: handle the last line, then close."""
        s._eof = True
        lines = s._framer.finish()
        if lines and not s._closing:
            if s._held is not None:
                s._held.extend(lines)
            else:
                self._handle_lines(s, lines)
        if s._held is None and not s._jobs:
            self.request_close(s, "eof")
        else:
            self.dirty.append(s)        # the edge stops reading it: nothing more comes

    def connection_lost(self, s: Session, reason: str) -> None:
        """The connection broke (reset, write error): drop its output."""
        self.abort(s, reason)

    def output_drained(self, s: Session) -> None:
        """The edge wrote ``s``'s output below the low-water mark: read again."""
        if not s._paused or s._closing:
            return
        s._paused = False
        held, s._held = s._held, None
        if held:
            self._handle_lines(s, held)
        if s._held is None and s._framer.overflow and not s._closing:
            self._line_too_long(s)      # it came behind the lines just handled
        if s._eof and s._held is None and not s._jobs:
            self.request_close(s, "eof")
        self.dirty.append(s)

    def after_write(self, s: Session, unsent: bool) -> bool:
        """The edge wrote what it could of ``s``'s output; ``unsent``: some is left.

        Returns True when the edge should close the connection now: ``s`` is
        closing and all its output is out.  A paused session whose output
        fell to the low-water mark reads again (``output_drained``).  Every
        edge (the loop, the test harness) asks this rather than decide.
        """
        if s._closing:
            if unsent and s._stall_timer is None and self._send_timeout:
                self._watch_last_output(s, self.edge_taken(s), self.now)
            return not unsent
        if s._paused and s._out_size <= self._low_water and not s._throttled:
            self.output_drained(s)
        return False

    @staticmethod
    def wants_input(s: Session) -> bool:
        """Whether the edge should read ``s``: not while paused, closing or
        closed, nor after EOF (its ``run_in_thread`` jobs may keep it open)."""
        return not (s._paused or s._closing or s._finished or s._eof)

    def finish(self, s: Session) -> None:
        """The edge closed ``s``'s connection: run ``handle_close`` once, log it."""
        if s._finished:
            return
        global _current
        _current = self
        s._finished = True
        s._closed = True
        s._held = None
        s._out = None
        if s._idle_timer is not None:
            s._idle_timer.cancel()
            s._idle_timer = None
        if s._stall_timer is not None:
            s._stall_timer.cancel()
            s._stall_timer = None
        self.sessions_by_id.pop(s._id, None)
        self.closed_bytes_in += s._bytes_in
        self.closed_bytes_out += s._bytes_out
        if self._handle_close is not None:
            s.response = ""
            self._call_user(self._handle_close, s, "handle_close", s)
            response = getattr(s, "response", "")   # the script may have deleted it
            s.response = ""
            if (not isinstance(response, str) or response) and not self._said_close_response:
                self._said_close_response = True
                log.warning("handle_close set s.response to %s, which is not sent: the "
                            "connection is closed by then (a goodbye goes out before "
                            "close_session); said once per script version",
                            shown_request(response) if isinstance(response, str)
                            else short_repr(response))
        if self._session_log and log.isEnabledFor(logging.INFO):
            log_fast(log, logging.INFO, "session %d %s closed: %s, %.3fs, %d requests, "
                     "%d bytes in, %d bytes out",
                     s._id, format_peer(s._peer), s._reason or "closed",
                     self.now - s._started, s._requests, s._bytes_in, s._bytes_out)

    # ----------------------------------------------------- handler calls

    def _handle_lines(self, s: Session, lines: list[str]) -> None:
        """Call ``handle_request`` for each line; queue the answers as one write.

        Stops early when the handler closes the session, raises, or when the
        answers pass the high-water mark; then the rest of the lines wait in
        ``s._held`` and reading pauses until the output drains.
        """
        global _current
        _current = self
        handler = self._handle_request
        s._batch = batch = []
        self._handling = s
        room = self._high_water - s._out_size  # bytes until the high-water mark
        rest: Sequence[str] = ()    # lines not handled (held back, or dropped)
        remaining = iter(lines)     # on a break, what it still holds is the rest
        for line in remaining:
            s.request = line
            s.response = ""
            try:
                handler(s)
                response = s.response   # in the try: a script may have deleted it
            except BaseException as e:  # a handler bug ends its session only
                self._handler_failed(s, line, e)
                rest = list(remaining)
                break
            if not isinstance(response, str) or not response.isascii():
                problem = response_problem(response)    # a handler bug, not a daemon's
                if problem is not None:
                    self._handler_failed(s, line, problem)
                    rest = list(remaining)
                    break
            if response:
                batch.append(response)
                room -= len(response)
                if room < 0:        # past the high-water mark: hold the rest
                    rest = list(remaining)
                    if rest and not s._closed:
                        s._held = rest
                        s._paused = True
                        self.dirty.append(s)
                    break
            if s._closed:
                rest = list(remaining)
                break
        s._batch = None
        self._handling = None
        handled = len(lines) - len(rest)
        s._requests += handled
        self.requests_total += handled
        if batch:
            self._queue_batch(s, batch)
        if room < 0 and not s._paused and not s._closed:
            # The last line took the output past the mark: read no more
            # until it drains, or a client sending one line per read and
            # never reading would make mpxd queue without bound.
            s._paused = True
            self.dirty.append(s)

    def _check_request(self, s: Session) -> None:
        """``handle_request`` for a version's first requests, checking what it returns.

        Returning the answer instead of setting ``s.response`` is a common
        first mistake, and nothing would be sent, silently.  After
        ``CHECKED_REQUESTS`` requests the handler is called directly.
        """
        returned = self.handlers.handle_request(s)
        if returned is not None and not s.response:
            self._returned_instead(returned, "handle_request")
        self._checks_left -= 1
        if self._checks_left <= 0:
            self._handle_request = self.handlers.handle_request

    def _returned_instead(self, returned: Any, what: str) -> None:
        """A handler returned its answer instead of setting ``s.response``: say so once."""
        if inspect.iscoroutine(returned):
            # A plain def around an async one (the async def itself is
            # refused at load): Python would add "never awaited", and no more.
            returned.close()
            if not self._said_returned:
                self._said_returned = True
                log.warning("%s returned a coroutine, which mpxd never runs: handlers "
                            "are called directly, not awaited (write plain code; run "
                            "blocking work with run_in_thread); said once per script "
                            "version", what)
            return
        if not self._said_returned:
            self._said_returned = True
            log.warning("%s returned %s and left s.response empty: mpxd sends "
                        "s.response, not what a handler returns (write s.response = "
                        "...); said once per script version", what,
                        shown_request(returned) if isinstance(returned, str)
                        else short_repr(returned))

    def _let_interrupts_through(self, exc: BaseException) -> None:
        """Re-raise the user's ^C in a test run; anything else user code raises is its error.

        Whatever a handler, callback or hook raises is logged, and the
        daemon carries on: every BaseException, SystemExit too (argparse and
        click exit on bad input, and a client's bad line must not stop the
        service for everyone), asyncio.CancelledError, GeneratorExit, a
        library's own.  KeyboardInterrupt only once the daemon's loop routes
        signals (``interrupts_are_user_errors``): from then on SIGINT drains
        instead of raising, so one can only come from user code.
        """
        if isinstance(exc, KeyboardInterrupt) and not self.interrupts_are_user_errors:
            raise exc

    def _handler_failed(self, s: Session, line: str, exc: BaseException) -> None:
        self._let_interrupts_through(exc)
        log.error("handle_request failed for session %d %s on request %s:\n%s",
                  s.id, format_peer(s.peer), shown_request(line),
                  user_traceback(exc))
        self._count_error("handle_request", s, exc)
        s.response = ""
        self.request_close(s, "error")

    def _call_user(self, fn: Callable[..., Any], s: Session | None,
                   what: str, *args: Any) -> bool:
        """Call user code other than ``handle_request``; log and survive errors."""
        try:
            fn(*args)
            return True
        except BaseException as e:  # user code must not stop the loop
            self._user_code_failed(what, s, e)
            return False

    def _user_code_failed(self, what: str, s: Session | None, exc: BaseException) -> None:
        """Log and count an error of user code other than ``handle_request``."""
        self._let_interrupts_through(exc)
        where = f" for session {s.id} {format_peer(s.peer)}" if s is not None else ""
        log.error("%s failed%s:\n%s", what, where,
                  user_traceback(exc))
        self._count_error(what, s, exc)

    def _count_error(self, what: str, s: Session | None, exc: BaseException) -> None:
        """Count an error of user code (logged by the caller); the harness keeps it."""
        self.errors_total += 1
        if self.errors is not None:
            self.errors.append((what, s, exc))

    # ---------------------------------------------------------- output

    def enqueue(self, s: Session, text: str) -> bool:
        """Queue one response (``send_response``); False if the output cap closed ``s``.

        ``--max-output`` is for a client that reads nothing while output
        from elsewhere (broadcasts, timers) piles up, so only this output
        counts against it; a handler's own answers pause reading instead.
        """
        batch = s._batch
        if batch is not None:       # from inside this session's own handler
            batch.append(text)
            return True
        before = s._out_size
        self._queue_batch(s, [text])
        if s._out_size > self._max_output:
            alone = s._out_size - before
            log.warning("session %d %s: %d bytes of output unsent, more than "
                        "--max-output %d; closing it%s", s.id, format_peer(s.peer),
                        s._out_size, self._max_output,
                        f" (one response of {alone} bytes: raise --max-output to "
                        f"send answers this big with send_response)"
                        if alone > self._max_output else "")
            self.abort(s, "output overflow")
            return False
        if s._out_size > self._high_water and not s._paused:
            s._paused = True
            self.dirty.append(s)
        return True

    def _queue_batch(self, s: Session, batch: list[str]) -> None:
        """Encode responses (each checked by ``response_problem``) as lines; queue them."""
        eol = self._eol
        if len(batch) == 1:                 # one request per read: the usual case
            text = batch[0]
            if "\n" in text:
                text = self._as_lines(text)
        else:
            text = eol.join(batch)
            if text.count("\n") != len(batch) - 1:   # line breaks inside responses
                text = eol.join([self._as_lines(r) for r in batch])
        data = (text + eol).encode("utf-8", "surrogateescape")
        out = s._out
        if out is None:
            s._out = [data]
            self.dirty.append(s)
        else:
            out.append(data)
        s._out_size += len(data)

    def _as_lines(self, response: str) -> str:
        """One response with its own line breaks, in this run's end-of-line.

        A single trailing line break is dropped (the end-of-line is added
        anyway), so ``s.response = "done\\n"`` sends one line, not two.
        """
        if response.endswith("\n"):
            response = response[:-2] if response.endswith("\r\n") else response[:-1]
        if self._eol == "\r\n":
            response = response.replace("\r\n", "\n").replace("\n", "\r\n")
        return response

    def _line_too_long(self, s: Session) -> None:
        log.warning("%s %d %s: line longer than %s %d bytes; closing it",
                    self.sessions_are, s.id, format_peer(s.peer), self.line_limit_is,
                    self._max_line)
        self._queue_batch(s, [ERROR_LINE_TOO_LONG])
        self.request_close(s, "line too long")

    # ------------------------------------------------------- closing

    def request_close(self, s: Session, reason: str) -> None:
        """Close ``s`` once its queued output is written; drop unhandled input."""
        if s._closing:
            return
        s._closed = True
        s._closing = True
        s._held = None
        if not s._reason:
            s._reason = reason
        self.dirty.append(s)

    def _watch_last_output(self, s: Session, taken: int, since: float) -> None:
        """A closing session's output did not all go out: give up if the client stops reading.

        An idle timeout, ``close_session`` or an error closes a session once
        its queued output is written; a client that reads none of it would
        keep the session, its descriptor and its output for ever.  Once the
        client has taken no byte for ``--send-timeout`` seconds (``since``:
        when it last did), it is dropped.  Looked at every STALL_CHECK
        seconds: how much a client took shows only a TCP window at a time.
        """
        s._stall_timer = self.timers.add(
            self.now + min(self._send_timeout, STALL_CHECK),
            self._last_output_stalled, (s, taken, since))

    def _last_output_stalled(self, s: Session, taken: int, since: float) -> None:
        s._stall_timer = None
        if s._finished or s._abort:
            return
        now_taken = self.edge_taken(s)
        if now_taken != taken:              # it reads, however slowly: wait on
            taken, since = now_taken, self.now
        elif self.now - since >= self._send_timeout:
            log.warning("session %d %s: closing (%s), but the client took none of its "
                        "last output for %gs; dropping it, with %d bytes unsent", s.id,
                        format_peer(s.peer), s._reason, self._send_timeout, s._out_size)
            self.abort(s, s._reason)
            return
        self._watch_last_output(s, taken, since)

    def abort(self, s: Session, reason: str) -> None:
        """Close ``s`` at once, dropping its queued output."""
        if s._abort or s._finished:
            return
        s._closed = True
        s._closing = True
        s._abort = True
        s._held = None
        if not s._reason:
            s._reason = reason
        self.dirty.append(s)

    def stopping(self) -> None:
        """The daemon begins to stop: the script's ``on_stopping``, once.

        Before any session is closed, so a goodbye it sends with
        ``send_response`` goes out ahead of the close.
        """
        if self._stopping_said:
            return
        self._stopping_said = True
        global _current
        _current = self
        if self.handlers.on_stopping is not None:
            self._call_user(self.handlers.on_stopping, None, "on_stopping", self)

    def shutdown(self) -> None:
        """Begin a graceful stop: every session writes its output and closes."""
        self.stopping()
        for s in list(self.sessions_by_id.values()):
            self.request_close(s, "shutdown")

    def check_thread(self, what: str) -> None:
        """Refuse a call from another thread than the loop's.

        Sessions, output queues and timers belong to the loop's thread;
        from another one a call races it, and its effect waits unseen until
        the loop next wakes up.  A thread hands work over with
        ``call_soon_threadsafe``.
        """
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(f"{what} called from a thread that is not mpxd's "
                               f"loop: hand the work over with call_soon_threadsafe")

    # --------------------------------------------------------- timers

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        self.check_thread("call_later")
        delay = as_seconds(delay, "call_later needs a delay in seconds")
        if delay != delay:          # nan: due never and always; the heap cannot order it
            raise ValueError("call_later needs a delay in seconds, not nan")
        check_callable(fn, "call_later")
        # From the clock, not from the pass's start (self.now): a handler or
        # on_start that took a while before this call would shorten the delay.
        return self.timers.add(self.clock() + max(0.0, delay), fn, args)

    def call_every(self, interval: float, fn: Callable[..., Any], *args: Any) -> Timer:
        self.check_thread("call_every")
        interval = as_seconds(interval, "call_every needs an interval above 0")
        if not interval >= MIN_INTERVAL:
            raise ValueError(f"call_every needs an interval of at least {MIN_INTERVAL:g}s, "
                             f"not {interval!r}")
        check_callable(fn, "call_every")
        return self.timers.add(self.clock() + interval, fn, args, interval)

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def run_timers(self) -> None:
        """Run every timer due at ``self.now``."""
        global _current
        _current = self
        self.timers.run_due(self.now, self._run_timer)

    def _run_timer(self, timer: Timer) -> None:
        self._call_user(timer.callback, None, "timer " + getattr(
            timer.callback, "__qualname__", repr(timer.callback)), *timer.args)

    def set_idle_timeout(self, s: Session, seconds: float | None) -> None:
        """Close ``s`` after ``seconds`` without input (``None``: never)."""
        self.check_thread("set_idle_timeout")
        if seconds is not None:
            seconds = as_seconds(seconds, "set_idle_timeout needs seconds or None")
        if seconds is not None and not seconds >= 0:     # nan too
            raise ValueError(f"set_idle_timeout needs seconds (0 or None: off), "
                             f"not {seconds}")
        if s._idle_timer is not None:
            s._idle_timer.cancel()
            s._idle_timer = None
        s._idle_timeout = seconds if seconds and seconds > 0 else None
        if s._idle_timeout is not None and not s._finished:
            s._idle_timer = self.timers.add(
                s._last_active + s._idle_timeout, self._check_idle, (s,))

    def _check_idle(self, s: Session) -> None:
        # Input only records a time; the timer re-arms itself lazily, so a
        # busy session costs one heap push per timeout period, not per line.
        s._idle_timer = None
        if s._finished or s._idle_timeout is None:
            return
        took_output, s._idle_out = s._bytes_out != s._idle_out, s._bytes_out
        if s._jobs or (took_output and (s._paused or s._held is not None)):
            # Not idle, though no input came: it waits for a run_in_thread
            # job's answer, or mpxd stopped reading it (backpressure) while
            # its client takes the answers to requests received already,
            # which closing would drop.  (Output alone, a ticker's to a
            # dead client, is no sign of life.)
            s._last_active = self.now
        deadline = s._last_active + s._idle_timeout
        if deadline <= self.now:
            self.request_close(s, "timeout")
        else:
            s._idle_timer = self.timers.add(deadline, self._check_idle, (s,))

    # -------------------------------------------------------- threads

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon; callable from any thread."""
        check_callable(fn, "call_soon_threadsafe")
        self._ready.append((fn, args))
        self.wake()

    def run_in_thread(self, fn: Callable[..., Any], *args: Any,
                      then: Callable[[Any], Any] | None = None) -> None:
        """Run ``fn(*args)`` in the worker pool; ``then(result or exception)``
        runs on the loop thread afterwards.

        Work started by a session's handler (or by a ``then`` of its work)
        holds that session open after the peer's EOF until it is delivered,
        so ``then`` can still answer a client that half-closed.
        """
        self.check_thread("run_in_thread")     # from a job: start the next from then
        check_job(fn, then)
        if self._executor is None:
            # Daemon threads: a job that never returns must not keep a
            # stopped daemon from exiting (ThreadPoolExecutor's threads are
            # joined at interpreter exit).
            self._executor = DaemonThreadPool(
                max_workers=self.config.threads, thread_name_prefix="mpxd-worker")
        owner = self._handling
        future = self._executor.submit(fn, *args)
        if owner is not None:
            owner._jobs += 1
        future.add_done_callback(
            lambda f: self.call_soon_threadsafe(self._deliver, f, then, fn, owner))

    def _deliver(self, future: Any, then: Callable[[Any], Any] | None,
                 fn: Callable[..., Any], owner: Session | None) -> None:
        """On the loop thread: hand a finished job's result to ``then``."""
        if owner is not None:
            owner._jobs -= 1
        previous, self._handling = self._handling, owner
        try:
            if future.cancelled():
                return
            exc = future.exception()
            if then is not None:
                name = getattr(fn, "__qualname__", repr(fn))
                self._call_user(then, owner, f"the then callback of run_in_thread {name}",
                                future.result() if exc is None else exc)
            elif exc is not None:       # nobody to hand it to: log it like a handler's
                log.error("run_in_thread %s failed:\n%s",
                          getattr(fn, "__qualname__", repr(fn)),
                          user_traceback(exc))
                self._count_error("run_in_thread", None, exc)
        finally:
            self._handling = previous
            if owner is not None and owner._eof and not owner._jobs and \
                    owner._held is None:
                self.request_close(owner, "eof")     # no-op if already closing

    def run_ready(self) -> None:
        """Run the callbacks queued by ``call_soon_threadsafe``."""
        global _current
        _current = self
        ready = self._ready
        for _ in range(len(ready)):
            fn, args = ready.popleft()
            name = getattr(fn, "__qualname__", repr(fn))
            if getattr(fn, "__self__", None) is not self:      # not mpxd's own delivery
                name = "call_soon_threadsafe " + name
            self._call_user(fn, None, name, *args)

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    # ----------------------------------------------------- inspection

    def sessions(self) -> list[Session]:
        """The open sessions (a snapshot, safe to close sessions while iterating)."""
        self.check_thread("sessions")      # the loop changes the dict meanwhile
        return [s for s in self.sessions_by_id.values() if not s._closed]
