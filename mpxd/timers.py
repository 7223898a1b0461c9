"""One heap of timers for everything that happens later.

``call_later``/``call_every`` from handler scripts, idle timeouts and the
drain deadline all live here.  The loop asks ``next_deadline()`` for its poll
timeout and calls ``run_due(now)``; the test kit does the same with a fake
clock.  Cancelled timers stay in the heap until they reach the top (lazy
deletion): cancelling is O(1).  Once they are more than half the heap, it
is rebuilt without them, so that a handler that keeps replacing a distant
timer (``EXPIRE key 3600`` again and again) cannot grow it without bound.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import Any, Callable

__all__ = ["Timer", "TimerHeap"]


class Timer:
    """A scheduled call; ``cancel()`` stops it (and every later repetition)."""

    __slots__ = ("when", "interval", "callback", "args", "cancelled", "_seq", "_heap")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple,
                 interval: float | None, seq: int) -> None:
        self.when = when
        self.interval = interval
        self.callback = callback
        self.args = args
        self.cancelled = False
        self._seq = seq
        self._heap: TimerHeap | None = None     # the heap holding it, while one does

    def cancel(self) -> None:
        """Stop this timer; harmless if it already ran or was cancelled.

        Callable from any thread (a ``run_in_thread`` job may cancel its
        timeout): the timer stops at once, and the heap's bookkeeping is
        handed to the loop's thread, which alone touches the heap.
        """
        if not self.cancelled:
            self.cancelled = True
            if self._heap is not None:
                self._heap._cancelled_one()

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)

    def __repr__(self) -> str:
        name = getattr(self.callback, "__qualname__", repr(self.callback))
        every = f" every {self.interval}s" if self.interval else ""
        state = " cancelled" if self.cancelled else ""
        return f"<Timer {name} at {self.when:.3f}{every}{state}>"


class TimerHeap:
    """Timers ordered by due time; runs due ones through ``run``."""

    COMPACT_FROM = 64       # cancelled timers: below this, never worth a rebuild

    def __init__(self, defer: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._dead = 0          # cancelled timers still in the heap
        # The thread that owns the heap (the loop's; the core sets it when it
        # starts) and how other threads hand it work (call_soon_threadsafe).
        self.thread = threading.get_ident()
        self._defer = defer

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, callback: Callable[..., Any], args: tuple = (),
            interval: float | None = None) -> Timer:
        timer = Timer(when, callback, args, interval, next(self._seq))
        timer._heap = self
        heapq.heappush(self._heap, timer)
        return timer

    def _cancelled_one(self) -> None:
        if self._defer is not None and threading.get_ident() != self.thread:
            # Rebuilding the heap here could pull it from under the loop.
            self._defer(self._cancelled_one)
            return
        self._dead += 1
        heap = self._heap
        if self._dead >= self.COMPACT_FROM and 2 * self._dead > len(heap):
            heap[:] = [timer for timer in heap if not timer.cancelled]   # same list:
            heapq.heapify(heap)         # run_due may hold it while callbacks cancel
            self._dead = 0

    def next_deadline(self) -> float | None:
        """When the earliest live timer is due, or ``None`` without timers."""
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)._heap = None
            self._dead -= 1
        return heap[0].when if heap else None

    def run_due(self, now: float, run: Callable[[Timer], None]) -> None:
        """Pop every timer due at ``now`` and pass it to ``run``.

        Repeating timers are pushed back before they run, so a callback may
        cancel its own timer.  Timers added by callbacks for ``now`` or
        earlier wait for the next pass: a timer that re-adds itself with no
        delay cannot starve the loop.
        """
        heap = self._heap
        due = []
        while heap and heap[0].when <= now:
            timer = heapq.heappop(heap)
            if timer.cancelled:
                self._dead -= 1
                timer._heap = None
                continue
            due.append(timer)
        # Pushed back once all due ones are out, so that this ends even for an
        # interval too small to move a float clock (now + interval == now).
        for timer in due:
            if timer.interval is not None:
                # Keep to the original schedule; after a stall longer than
                # one interval, skip the missed runs instead of bunching them.
                timer.when += timer.interval
                if timer.when <= now:
                    timer.when = now + timer.interval
                timer._seq = next(self._seq)
                heapq.heappush(heap, timer)
            else:
                timer._heap = None      # out of the heap: a late cancel counts nothing
        for timer in due:
            if not timer.cancelled:
                run(timer)
