"""Logging set-up: stderr, a log file that USR1 reopens, syslog, journald.

Under systemd (``JOURNAL_STREAM`` set and logging to stderr) lines carry a
``<N>`` priority prefix that journald turns into the entry's priority, and
no timestamp, since journald adds its own.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

__all__ = ["setup_logging", "LEVELS"]

LEVELS = ("debug", "info", "warning", "error")

# syslog priorities (RFC 5424) for the <N> prefix journald understands
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
             logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<priority>message``, one prefix per line of a multi-line message."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class ReopenableFileHandler(logging.FileHandler):
    """A file handler whose file can be reopened after logrotate moved it."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup_logging(level: str = "info", log_file: str | None = None,
                  syslog: bool = False, stream=None) -> list[ReopenableFileHandler]:
    """Configure the ``mpxd`` logger; return the handlers USR1 must reopen.

    Raises ``OSError`` when the log file cannot be opened.
    """
    logger = logging.getLogger("mpxd")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level.upper())
    logger.propagate = False
    plain = logging.Formatter("%(asctime)s mpxd[%(process)d] %(levelname)s %(message)s")
    reopenable: list[ReopenableFileHandler] = []
    if log_file:
        file_handler = ReopenableFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(plain)
        logger.addHandler(file_handler)
        reopenable.append(file_handler)
    if syslog:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        syslog_handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        syslog_handler.setFormatter(logging.Formatter("mpxd[%(process)d]: %(message)s"))
        logger.addHandler(syslog_handler)
    if not log_file and not syslog:
        stderr_handler = logging.StreamHandler(stream or sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            stderr_handler.setFormatter(JournalFormatter("%(message)s"))
        else:
            stderr_handler.setFormatter(plain)
        logger.addHandler(stderr_handler)
    return reopenable
