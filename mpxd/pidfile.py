"""A pidfile held with ``flock`` for the whole run.

The lock, not the pid written in the file, says whether an instance runs:
a file nobody holds locked is stale whatever pid it names (pids get reused,
``kill(pid, 0)`` lies), and is taken over.  After locking we check that the
path still names the file we locked, because a previous owner may have
removed it between our ``open`` and our ``flock``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable

from .forks import keep_from_children

__all__ = ["PidFile", "PidFileError"]


class PidFileError(Exception):
    """The pidfile cannot be taken; the message says why (and whose it is)."""


class PidFile:
    """Create, lock and fill a pidfile; ``release`` removes it while still ours."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd: int | None = None
        self._forget: Callable[[], None] = lambda: None

    def acquire(self, pid: int | None = None) -> None:
        """Lock the file and write ``pid`` (default: this process) into it."""
        for _attempt in range(10):
            try:
                # O_NOFOLLOW: a symlink planted at the path must not make root
                # truncate some other file.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o644)
            except OSError as e:
                why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
                raise PidFileError(f"cannot open pidfile {self.path}: {why}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f"pid {holder}" if holder else "another process"
                    raise PidFileError(f"another mpxd is running ({who} holds "
                                       f"the pidfile {self.path})") from None
                raise PidFileError(f"cannot lock pidfile {self.path}: {e.strerror}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)          # the file we locked was unlinked meanwhile: retry
        else:
            raise PidFileError(f"cannot lock pidfile {self.path}: it keeps being replaced")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{pid if pid is not None else os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise PidFileError(f"cannot write pidfile {self.path}: {e.strerror}") from None
        self._fd = fd
        # A process forked from mpxd must not hold the lock after mpxd exits.
        self._forget = keep_from_children(lambda: [] if self._fd is None else [self._fd])

    def release(self) -> None:
        """Remove the file if it is still the one we hold locked, then unlock.

        After ``--user`` dropped root, the pidfile's directory may no longer
        be writable: then the file is emptied instead (through the descriptor
        opened before the switch), so that no stale pid is left for
        ``kill $(cat pidfile)`` to hit.  The next start takes it over anyway,
        since nobody holds its lock.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._forget()
        try:
            if _same_file(fd, self.path):
                try:
                    os.unlink(self.path)
                except OSError:
                    os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
