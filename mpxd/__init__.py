"""mpxd: serve a line-based TCP protocol from a Python handler script.

What handler scripts import::

    from mpxd import Session, send_response, close_session
    from mpxd import call_later, call_every, run_in_thread, call_soon_threadsafe, sessions

The functions below act on the server that is running the calling handler;
they must be called from the loop's thread (handlers, timers, ``then``
callbacks, the hooks below), except ``call_soon_threadsafe``, which any
thread may call.  An exception raised by a timer, a ``then`` callback or a
``call_soon_threadsafe`` callback is logged with its traceback, like a
handler's, and never stops the loop.

Besides ``handle_request(s)`` (required), ``handle_open(s)`` and
``handle_close(s)``, a script may define these hooks:

``on_start(server)``   once, after the sockets listen and before the first
                       connection is served: open a database, start a
                       ``call_every`` ticker.  ``server`` is the running
                       server (``mpxd.core.Core``); ``server.call_later``,
                       ``server.sessions()`` and the rest work as the
                       functions here do.
``on_stopping(server)``  once, when the daemon begins to stop (a stop
                       signal, ``mpxctl drain``), before any session is
                       closed: what it sends to ``sessions()`` with
                       ``send_response`` goes out ahead of the close.
``on_stop(server)``    once, when the daemon stops, after the last session
                       closed: close what ``on_start`` opened.
``on_reload(old_module)``  on SIGHUP, in the newly loaded version, before it
                       takes over: copy state from the version that served
                       until now (``count = old_module.count``).  If it
                       raises, the old version keeps serving.

An exception in ``on_start`` stops start-up (logged; exit status 1, and
``on_stop`` does not run); one in ``on_stopping`` or ``on_stop`` is logged and the stop goes on.
With ``--workers N`` every worker process runs the hooks for its own copy
of the script.
"""

from __future__ import annotations

from typing import Any, Callable

from .session import Session, close_session, send_response
from .timers import Timer

__version__ = "0.1.0"

__all__ = [
    "Session", "Timer", "send_response", "close_session", "call_later",
    "call_every", "run_in_thread", "call_soon_threadsafe", "sessions",
    "__version__",
]


def _core(any_thread: bool = False):
    from .core import current_core
    return current_core(any_thread)


def call_later(delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
    """Run ``fn(*args)`` once on the loop thread after ``delay`` seconds.

    Returns a ``Timer``; ``timer.cancel()`` stops it (harmless once it ran).
    A negative delay counts as 0, ``math.inf`` never comes, ``nan`` is a
    ``ValueError``; a ``delay`` that is not a number or an ``fn`` that is not
    callable is a ``TypeError``, at once.  The loop's poll timeout comes from the
    nearest timer, so nothing polls; a timer is never early.
    """
    return _core().call_later(delay, fn, *args)


def call_every(interval: float, fn: Callable[..., Any], *args: Any) -> Timer:
    """Run ``fn(*args)`` every ``interval`` seconds until the timer is cancelled.

    The first run is one interval from now.  Runs keep to the original
    schedule; runs missed while the loop was busy are skipped, not bunched.
    A run that raises is logged and the timer goes on.  ``ValueError`` if
    ``interval`` is below 0.001 (no loop passes faster).
    """
    return _core().call_every(interval, fn, *args)


def run_in_thread(fn: Callable[..., Any], *args: Any,
                  then: Callable[[Any], Any] | None = None) -> None:
    """Run blocking ``fn(*args)`` in a worker thread, then ``then(result)`` on the loop thread.

    ``result`` is what ``fn`` returned, or the exception object if it raised
    (test with ``isinstance(result, BaseException)``).  ``fn`` must not touch
    sessions; ``then`` may, e.g. ``s.response = ...; send_response(s)``.
    At most ``--threads`` jobs (default 4) run at once; more wait their turn.
    Without ``then`` a failing job is logged.  A job started by a session's
    handler keeps that session open after the client's EOF until ``then``
    has run.  At shutdown, jobs not yet started are dropped and running ones
    are abandoned.
    """
    _core().run_in_thread(fn, *args, then=then)


def call_soon_threadsafe(fn: Callable[..., Any], *args: Any) -> None:
    """From any thread: run ``fn(*args)`` on the loop thread as soon as it can.

    For threads the handler started itself (``run_in_thread`` needs no
    help).  Wakes the loop through the same socketpair as signals.
    """
    _core(any_thread=True).call_soon_threadsafe(fn, *args)


def sessions() -> list[Session]:
    """The open sessions of this server, e.g. to broadcast to every client.

    A snapshot, a new list: closing sessions while iterating is fine, and
    ``len(sessions())`` counts the clients.  Sessions that are
    closing (``s.closed``) are left out.  With ``--workers`` only this
    worker's sessions.
    """
    return _core().sessions()
