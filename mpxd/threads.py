"""The worker threads behind ``mpxd.run_in_thread``: an executor of daemon threads.

``concurrent.futures.ThreadPoolExecutor`` would do, except that the
interpreter joins its threads at exit: one blocking call that never returns
(a hung database, a DNS server that does not answer) would keep a stopped
daemon from ever exiting, whatever ``--drain-timeout`` says.  This executor
has the same interface (``submit`` returns a ``Future``; ``shutdown``) but
runs jobs in daemon threads, started on demand up to ``max_workers``.  After
``shutdown`` the jobs not yet started are cancelled and the running ones are
abandoned: the process may exit under them.

Results never touch the loop's state from here: the core adds a done
callback that hands the future to ``call_soon_threadsafe``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable

__all__ = ["DaemonThreadPool"]


class DaemonThreadPool(Executor):
    """Run calls in up to ``max_workers`` daemon threads; never joined at exit."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "mpxd-worker") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)     # one release per waiting thread
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; the returned future holds its outcome."""
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot run_in_thread: the server is stopping")
            future: Future = Future()
            self._jobs.put((future, fn, args, kwargs))
            # A new thread only when none waits for work (as ThreadPoolExecutor
            # does): a stream of short jobs reuses one or two threads.
            if not self._idle.acquire(blocking=False) and \
                    len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, daemon=True,
                    name=f"{self._prefix}-{len(self._threads) + 1}")
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; with ``cancel_futures`` cancel those not started.

        ``wait=True`` waits for the running jobs, as ``Executor`` promises;
        the core passes ``wait=False``.
        """
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        future, *_ = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    future.cancel()
            for _ in self._threads:
                self._jobs.put(None)        # one stop mark per thread
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            _run(*job)
            del job                         # keep nothing alive while idle
            self._idle.release()


def _run(future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return                              # cancelled before it started
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the future carries it
        future.set_exception(e)
    else:
        future.set_result(result)
