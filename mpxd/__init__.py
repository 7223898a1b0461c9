"""mpxd: serve a line-based TCP protocol from a Python handler script.

What handler scripts import::

    from mpxd import Session, send_response, close_session
    from mpxd import call_later, call_every, run_in_thread, call_soon_threadsafe, sessions

The functions below act on the server that is running the calling handler;
they must be called from the loop's thread (handlers, timers, ``then``
callbacks), except ``call_soon_threadsafe``, which any thread may call.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .session import Session, close_session, send_response
from .timers import Timer

__version__ = "0.1.0"

__all__ = [
    "Session", "Timer", "send_response", "close_session", "call_later",
    "call_every", "run_in_thread", "call_soon_threadsafe", "sessions",
    "__version__",
]


def _core():
    from .core import current_core
    return current_core()


def call_later(delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
    """Run ``fn(*args)`` on the loop thread after ``delay`` seconds."""
    return _core().call_later(delay, fn, *args)


def call_every(interval: float, fn: Callable[..., Any], *args: Any) -> Timer:
    """Run ``fn(*args)`` every ``interval`` seconds until the timer is cancelled."""
    return _core().call_every(interval, fn, *args)


def run_in_thread(fn: Callable[..., Any], *args: Any,
                  then: Callable[[Any], Any] | None = None) -> None:
    """Run blocking ``fn(*args)`` in a worker thread (``--threads``), then call
    ``then(result)`` on the loop thread; ``result`` is the exception if ``fn`` raised."""
    _core().run_in_thread(fn, *args, then=then)


def call_soon_threadsafe(fn: Callable[..., Any], *args: Any) -> None:
    """From any thread: run ``fn(*args)`` on the loop thread as soon as it can."""
    _core().call_soon_threadsafe(fn, *args)


def sessions() -> Iterator[Session]:
    """The open sessions of this server, e.g. to broadcast to every client."""
    return _core().sessions()
