"""Logging set-up: stderr, a log file that USR1 reopens, syslog, journald.

Under systemd (``JOURNAL_STREAM`` names the file stderr is connected to)
lines carry a ``<N>`` priority prefix that journald turns into the entry's
priority, and no timestamp, since journald adds its own.  The variable is
compared with stderr itself because it is inherited: a program started from
a service's shell script, its stderr redirected, must not prefix its lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import select
import sys
import threading
import time
import traceback
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .core import Core

__all__ = ["setup_logging", "reopen_log_files", "stderr_is_journal", "LEVELS",
           "BurstLog", "counted", "log_fast", "formatted_exception", "start_batching", "stop_batching", "flush_batched", "lines_waiting"]

log = logging.getLogger("mpxd")

LEVELS = ("debug", "info", "warning", "error")

SYSLOG_SOCKET = "/dev/log"           # --syslog sends here; else over UDP to:
SYSLOG_UDP = ("localhost", 514)

# syslog priorities (RFC 5424) for the <N> prefix journald understands
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
             logging.ERROR: 3, logging.CRITICAL: 2}


PLAIN_FORMAT = "%(asctime)s mpxd[%(process)d] %(levelname)s %(message)s"


class CachedTimeFormatter(logging.Formatter):
    """``PLAIN_FORMAT``, rendering the date and time once per second, not per line."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return "%s,%03d" % (self._stamp, int(created * 1000) % 1000)

    _fast_key = -1
    _fast_prefix = ""

    def fast(self, levelno: int, message: str) -> str:
        """The line ``format`` makes of a record of ``message``, without the record.

        The prefix (time to the millisecond, pid, level) is built once per
        millisecond and level: under connection churn many lines share it.
        """
        now = time.time()
        key = int(now * 1000) * 64 + levelno
        if key != self._fast_key:
            self._fast_key = key
            self._fast_prefix = "%s mpxd[%d] %s " % (self._time(now), _PID[0],
                                                     _LEVEL_NAMES[levelno])
        return self._fast_prefix + message


_LEVEL_NAMES = {level: logging.getLevelName(level) for level in _PRIORITY}


def counted(number: int, noun: str, plural: str = "") -> str:
    """``"1 session"``, ``"3 sessions"``: a count for a log line, in good English."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


class BurstLog:
    """Log the first of a burst of like events in full, then one summary a second.

    A scanner or a flood must not write a line per connection.  The first
    event of a burst is logged as it comes; the ones after it are counted by
    reason and by address, and summarised every ``SUMMARY_INTERVAL`` seconds
    while they go on; a quiet interval ends the burst.  ``close()`` (at exit)
    logs what the last interval counted, since its timer will not come.

    ``first`` is the first event's line, with ``{who}`` and ``{reason}``;
    ``summary`` counts the later ones, with ``{count}`` (``"3 more"`` and
    ``noun`` in the right number) and ``{when}``; ``later`` names them in
    the first line's promise, ``"(more refusals are summarised every 1s)"``.
    """

    SUMMARY_INTERVAL = 1.0

    def __init__(self, core: Core, first: str, summary: str, noun: str, later: str) -> None:
        self.core = core
        self.first, self.summary, self.noun, self.later = first, summary, noun, later
        self.total: Counter[str] = Counter()      # by reason, for the control channel
        self._reasons: Counter[str] = Counter()   # this summary period
        self._hosts: Counter[str] = Counter()
        self._timer: Any = None

    def event(self, who: str, host: str, reason: str) -> None:
        """One event; ``who`` names it in a line of its own, ``host`` in a summary."""
        self.total[reason] += 1
        if self._timer is None:
            log.info("%s (more %s are summarised every %gs)",
                     self.first.format(who=who, reason=reason), self.later,
                     self.SUMMARY_INTERVAL)
            self._timer = self.core.call_later(self.SUMMARY_INTERVAL, self._summarise)
            return
        self._reasons[reason] += 1
        self._hosts[host] += 1

    def _summarise(self, final: bool = False) -> None:
        count = sum(self._reasons.values())
        if not count:
            self._timer = None          # a quiet period: the burst is over
            return
        reasons = ", ".join(f"{n} {reason}" for reason, n in self._reasons.most_common())
        hosts = ", ".join(f"{host} ({n})" for host, n in self._hosts.most_common(3))
        more = len(self._hosts) - 3
        when = ("before the daemon stopped" if final
                else f"in the last {self.SUMMARY_INTERVAL:g}s")
        log.info("%s: %s; from %s%s",
                 self.summary.format(count=counted(count, "more " + self.noun), when=when),
                 reasons, hosts, f" and {more} other addresses" if more > 0 else "")
        self._reasons.clear()
        self._hosts.clear()
        self._timer = None if final else self.core.call_later(self.SUMMARY_INTERVAL,
                                                              self._summarise)

    def close(self) -> None:
        """At exit: the events since the last summary, whose timer will not come."""
        if self._timer is not None:
            self._timer.cancel()
            self._summarise(final=True)


def log_fast(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log like ``logger.log``, at a fifth of the cost, for lines written per connection.

    When the logger's one handler is mpxd's own stderr or file handler, the
    line is formatted straight into its batch; otherwise (syslog, a test's
    handlers) a lean ``LogRecord`` goes the usual way.  ``LogRecord.__init__``
    works out file, module, thread and process names for every record: a
    third of a connection's cost under churn.
    """
    if not logger.isEnabledFor(level):
        return
    handlers = logger.handlers
    if len(handlers) == 1:
        handler = handlers[0]
        fast = getattr(handler, "fast_format", None)
        if fast is not None:
            with handler.lock:
                handler.add(fast(level, msg % args), level)
            return
    record = logging.LogRecord.__new__(logging.LogRecord)
    now = time.time()
    record.__dict__.update(
        name=logger.name, msg=msg, args=args, levelno=level,
        levelname=logging.getLevelName(level), pathname="mpxd", filename="mpxd",
        module="mpxd", lineno=0, funcName=None, exc_info=None, exc_text=None,
        stack_info=None, created=now, msecs=int(now * 1000) % 1000,
        relativeCreated=0.0, thread=None, threadName=None, processName=None,
        process=_PID[0], taskName=None)
    logger.handle(record)


# The thread whose INFO and DEBUG lines are batched (the loop's, while it
# runs); 0: none, every line is written at once.
_batching_thread = [0]
_batching_handlers: list["LineBatching"] = []
# Handlers holding batched lines: the loop calls flush_batched only when
# this list is not empty, so a pass without log lines costs one test.
lines_waiting: list["LineBatching"] = []


def start_batching() -> None:
    """From now on the calling thread's lines are written by ``flush_batched``.

    The loop calls ``flush_batched`` once per pass: one write for all the
    lines of a pass instead of one per line.  Warnings and errors, and lines
    of other threads, are still written at once (after the batch, in order).
    """
    _batching_thread[0] = threading.get_ident()


def stop_batching() -> None:
    """Write what is batched; from now on every line is written at once."""
    _batching_thread[0] = 0
    lines_waiting.clear()
    for handler in _batching_handlers:
        handler.flush()


def flush_batched() -> None:
    """Write the lines batched since the last call (the loop, once per pass)."""
    while lines_waiting:
        lines_waiting.pop().flush()


class LineBatching:
    """Mix-in for a ``StreamHandler``: lines wait in ``batch`` until ``flush``."""

    batch: list[str]
    fast_format: Callable[[int, str], str] | None = None
    lock: threading.RLock
    failing = ""            # why writes fail, from the first failure to the next success

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.batch = []
        super().__init__(*args, **kwargs)   # type: ignore[call-arg]
        _batching_handlers.append(self)

    def close(self) -> None:
        self.flush()
        if self in _batching_handlers:
            _batching_handlers.remove(self)
        super().close()                     # type: ignore[misc]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)      # type: ignore[attr-defined]
        except Exception:                   # noqa: BLE001 - as logging does
            self.handleError(record)        # type: ignore[attr-defined]
            return
        self.add(line, record.levelno)

    def add(self, line: str, levelno: int) -> None:
        """Queue one formatted line (the caller holds ``lock``)."""
        self.batch.append(line)
        if levelno >= logging.WARNING or _batching_thread[0] != threading.get_ident():
            self.flush()
        elif len(self.batch) == 1:
            lines_waiting.append(self)

    def flush(self) -> None:
        with self.lock:
            stream = self.stream            # type: ignore[attr-defined]
            if not self.batch or stream is None:
                return
            texts = _atomic_writes(self.batch)
            self.batch.clear()
            try:
                for text in texts:
                    _write(stream, text)
            except (OSError, ValueError) as e:
                if not self.failing:
                    self.write_failed(e)
                self.failing = getattr(e, "strerror", None) or str(e)
                return
            if self.failing:        # mark the gap, now that it can be marked
                because, self.failing = self.failing, ""
                try:
                    _write(stream, self._gap_notice(because) + "\n")
                except (OSError, ValueError):
                    self.failing = because

    def _gap_notice(self, because: str) -> str:
        record = logging.LogRecord("mpxd", logging.WARNING, __file__, 0,
                                   "log lines before this one may be missing: "
                                   "writing them failed (%s)", (because,), None)
        return self.format(record)          # type: ignore[attr-defined]

    def write_failed(self, e: Exception) -> None:
        """The first of a run of failed writes; stderr's handler has nowhere to say so."""


ATOMIC_WRITE = select.PIPE_BUF     # bytes a pipe takes in one piece (4096 on Linux)


def _atomic_writes(lines: list[str]) -> list[str]:
    """The batch's lines as texts of at most ATOMIC_WRITE bytes, each whole lines.

    Under ``--workers`` every process writes to the same stderr.  A pipe (a
    container runtime's, supervisord's, ``| tee``) takes a write of up to
    PIPE_BUF bytes in one piece, but may cut a longer one where another
    process's write gets in: half a line from one worker, then the other's.
    A busy pass's batch passes 4 KiB.  One line longer than that is written
    on its own.  Files are opened for appending, where every write is whole.
    """
    text = "\n".join(lines) + "\n"
    if _size(text) <= ATOMIC_WRITE:
        return [text]
    texts: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in lines:
        n = _size(line) + 1
        if chunk and size + n > ATOMIC_WRITE:
            texts.append("\n".join(chunk) + "\n")
            chunk, size = [], 0
        chunk.append(line)
        size += n
    texts.append("\n".join(chunk) + "\n")
    return texts


def _size(text: str) -> int:
    """``text``'s length in bytes once written, near enough."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def _write(stream: Any, text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:  # a strict stream: PYTHONIOENCODING=ascii:strict...
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
    stream.flush()


class BatchingStreamHandler(LineBatching, logging.StreamHandler):
    """stderr, one write per loop pass."""


_PID = [os.getpid()]    # refreshed by setup_logging and in a forked child
# --daemon forks after logging is set up: the daemon's lines carry its own pid.
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


class JournalFormatter(logging.Formatter):
    """``<priority>message``, one prefix per line of a multi-line message."""

    def format(self, record: logging.LogRecord) -> str:
        return self.fast(record.levelno, super().format(record))

    def fast(self, levelno: int, message: str) -> str:
        prefix = f"<{_PRIORITY.get(levelno, 6)}>"
        if "\n" not in message:
            return prefix + message
        return "\n".join(prefix + line for line in message.splitlines())


class EncodableFormatter(logging.Formatter):
    """Lines UTF-8 can encode: what it cannot (lone surrogates) becomes ``\\udcff``.

    For handlers that encode strictly, as ``SysLogHandler`` does: a
    client's invalid bytes, surrogate-escaped, can reach a log line through
    an exception message, and strict encoding would drop the line.
    """

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


class ReopenableFileHandler(LineBatching, logging.FileHandler):
    """A file handler whose file can be reopened after logrotate moved it.

    With ``redirect_stdio`` the process's stdout and stderr (descriptors 1
    and 2) follow the log file, so that ``print`` in a handler and fatal
    interpreter errors of a ``--daemon`` land in the log too.
    """

    redirect_stdio = False

    def write_failed(self, e: Exception) -> None:
        # A full disk, say: tell stderr (the journal, or a terminal), once.
        try:
            print(f"mpxd: cannot write log file {self.baseFilename}: "
                  f"{getattr(e, 'strerror', None) or e}; log lines are lost until "
                  f"it can be written again", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass                # --daemon: stderr is that same file

    def reopen(self, owner: tuple[int, int] | None = None) -> None:
        """Open the path anew, then switch to it; on failure keep the old file.

        ``owner``: ``(uid, gid)`` to give a file this creates, from a process
        that kept root (the ``--workers`` supervisor) for ones that did not.
        """
        new = not os.path.exists(self.baseFilename)
        stream = self._open()             # raises OSError; the old stream stays
        if new and owner is not None and os.geteuid() == 0:
            try:
                os.chown(self.baseFilename, *owner)
            except OSError:
                pass                      # the workers' reopen says what failed
        self.acquire()
        try:
            self.flush()                  # what was batched belongs in the old file
            old, self.stream = self.stream, stream
            if self.redirect_stdio:
                point_stdio_at(stream.fileno())
        finally:
            self.release()
        if old is not None:
            old.close()


class QuietSysLogHandler(logging.handlers.SysLogHandler):
    """``--syslog``: a syslog that does not answer costs one line on stderr, not a
    traceback per log line; the first line that gets through again marks the gap."""

    failing = ""            # why sending fails, from the first failure to the next success
    _failed = False         # the last record sent failed

    def emit(self, record: logging.LogRecord) -> None:
        if self.failing:                # first the gap, if syslog answers again
            self._failed = False
            super().emit(logging.LogRecord(
                "mpxd", logging.WARNING, __file__, 0, "log lines before this one may "
                "be missing: sending them to syslog failed (%s)", (self.failing,), None))
            if self._failed:
                return                  # still refused: this line would be too
            self.failing = ""
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a bad log call ("%d" % "x"): as logging says
            super().handleError(record)
            return
        self._failed = True
        because = getattr(error, "strerror", None) or str(error)
        if not self.failing:
            try:
                print(f"mpxd: cannot send log lines to syslog at {self.address}: "
                      f"{because}; they are lost until it answers again",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass
        self.failing = because


def point_stdio_at(fd: int) -> None:
    """Make descriptors 1 and 2 refer to the open file ``fd``."""
    for stdio in (1, 2):
        if fd != stdio:
            os.dup2(fd, stdio)


def reopen_log_files(handlers: list[ReopenableFileHandler],
                     owner: tuple[int, int] | None = None) -> None:
    """Reopen every log file (USR1); one that fails is logged and kept as it was."""
    if not handlers:
        log.info("no log file to reopen (logging to stderr or syslog)")
    for handler in handlers:
        try:
            handler.reopen(owner)
        except OSError as e:
            log.error("cannot reopen log file %s: %s; still writing to the old file",
                      handler.baseFilename, e.strerror)
        else:
            log.info("log file %s reopened", handler.baseFilename)


def stderr_is_journal(stream=None) -> bool:
    """True when ``JOURNAL_STREAM`` (``DEVICE:INODE``) names ``stream`` (stderr)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


# What a message may not bring into a log line as it is: control characters
# (CR, ESC and its ANSI sequences, the C1 set) and Unicode's line separators.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _as_log_text(text: str) -> str:
    """``text`` with control characters escaped, and its lines after the first indented."""
    body = text.rstrip("\n")
    body = _UNSAFE.sub(lambda m: repr(m.group())[1:-1], body)
    return body.replace("\n", "\n    ") + text[len(body):]


def formatted_exception(exc: BaseException, tb: Any = None) -> str:
    """``exc`` and its traceback (from ``tb`` on, if given) as Python prints them, for the log.

    The frames come from source files, but the messages may hold a client's
    text (``raise ValueError(s.request)``, ``eval(s.request)``): there,
    control characters are escaped and the lines after a message's first
    are indented, so that a client can neither rewrite the terminal nor
    write what passes for a log line of its own.
    """
    te = traceback.TracebackException(type(exc), exc, tb or exc.__traceback__, compact=True)
    _defang(te, set())
    return "".join(te.format()).rstrip()


def _defang(te: traceback.TracebackException | None, seen: set[int]) -> None:
    """Make the messages of ``te``, its causes, contexts and group members log-safe."""
    if te is None or id(te) in seen:
        return
    seen.add(id(te))
    for name in ("_str", "text", "msg"):        # the message; a SyntaxError's line too
        value = getattr(te, name, None)
        if isinstance(value, str):
            setattr(te, name, _as_log_text(value))
    notes = getattr(te, "__notes__", None)
    if isinstance(notes, list):
        te.__notes__ = [_as_log_text(n) if isinstance(n, str) else n for n in notes]
    for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        _defang(other, seen)


def _log_thread_error(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread the script started: into the log, as a handler's.

    Python's own hook prints it on stderr, which under ``--log-file`` or
    ``--syslog`` is not the log, and under ``--daemon`` is nowhere.
    """
    if args.exc_type is SystemExit:     # as Python's hook: a thread's way to end
        return
    name = args.thread.name if args.thread is not None else "?"
    log.error("thread %s of the script failed:\n%s", name,
              formatted_exception(args.exc_value, args.exc_traceback)
              if args.exc_value is not None else args.exc_type.__name__)


def setup_logging(level: str = "info", log_file: str | None = None,
                  syslog: bool = False, stream=None,
                  redirect_stdio: bool = False) -> list[ReopenableFileHandler]:
    """Configure the ``mpxd`` logger; return the handlers USR1 must reopen.

    ``redirect_stdio`` (``--daemon``): when reopened, the log file also
    becomes the process's stdout and stderr again.

    Raises ``OSError`` when the log file cannot be opened.
    """
    logger = logging.getLogger("mpxd")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level.upper())
    logger.propagate = False
    threading.excepthook = _log_thread_error
    _PID[0] = os.getpid()
    plain = CachedTimeFormatter(PLAIN_FORMAT)
    reopenable: list[ReopenableFileHandler] = []
    if log_file:
        # backslashreplace, as on stderr: a line can hold text no UTF-8
        # encoder takes (a client's invalid bytes, surrogate-escaped, in an
        # exception message); strict would lose it and its whole batch.
        file_handler = ReopenableFileHandler(log_file, encoding="utf-8",
                                             errors="backslashreplace")
        file_handler.redirect_stdio = redirect_stdio
        file_handler.setFormatter(plain)
        file_handler.fast_format = plain.fast
        logger.addHandler(file_handler)
        reopenable.append(file_handler)
    if syslog:
        if os.path.exists(SYSLOG_SOCKET):
            address: str | tuple[str, int] = SYSLOG_SOCKET
        else:
            # Say so once: UDP fails silently when no syslog daemon listens.
            address = SYSLOG_UDP
            print(f"mpxd: no syslog socket at {SYSLOG_SOCKET}; sending log lines "
                  f"over UDP to {SYSLOG_UDP[0]}:{SYSLOG_UDP[1]}, where nothing may "
                  f"be listening", file=stream or sys.stderr, flush=True)
        syslog_handler = QuietSysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        syslog_handler.setFormatter(EncodableFormatter("mpxd[%(process)d]: %(message)s"))
        logger.addHandler(syslog_handler)
    if not log_file and not syslog:
        stderr_handler = BatchingStreamHandler(stream or sys.stderr)
        formatter = JournalFormatter("%(message)s") if stderr_is_journal(stream) else plain
        stderr_handler.setFormatter(formatter)
        stderr_handler.fast_format = formatter.fast
        logger.addHandler(stderr_handler)
    return reopenable
