"""Descriptors that a process forked from mpxd must not keep.

User code forks: ``multiprocessing`` with its default fork start method (a
pool made in ``on_start``, a ``Process`` per request), a script's own
``os.fork()``.  The child gets a copy of every descriptor, and mpxd's are
not its business.  A child that kept them held the listening sockets: after
mpxd stopped, the port stayed taken (a restart failed with "address already
in use") and the kernel went on queueing connections nobody would accept.

Each part of mpxd that owns descriptors registers a function that lists
them (``keep_from_children``); in a forked child they are pointed at
``/dev/null`` with ``dup2``, not closed, so that the child's copies of the
socket objects can still close "their" descriptor without closing something
the child opened since.  Listing lazily keeps this off the hot path.

mpxd's own forks: ``--daemon`` forks before anything is registered, and
the ``--workers`` supervisor registers only its pidfile, so the sockets it
passes to its workers stay theirs and the pidfile's lock stays its own.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

__all__ = ["keep_from_children"]

_listers: list[Callable[[], Iterable[int]]] = []


def keep_from_children(lister: Callable[[], Iterable[int]]) -> Callable[[], None]:
    """Have ``lister()``'s descriptors left out of forked children; returns the undo."""
    _listers.append(lister)

    def forget() -> None:
        if lister in _listers:
            _listers.remove(lister)
    return forget


def _leave_descriptors_in_child() -> None:
    fds = set()
    for lister in _listers:
        try:
            fds.update(fd for fd in lister() if fd > 2)
        except Exception:  # noqa: BLE001 - a half-built owner: leave its descriptors
            pass
    _listers.clear()
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in fds:
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass                            # already closed
    os.close(null)


os.register_at_fork(after_in_child=_leave_descriptors_in_child)
