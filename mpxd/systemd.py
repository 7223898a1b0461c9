"""systemd integration without a dependency: sd_notify and socket activation.

``Notifier`` speaks the ``NOTIFY_SOCKET`` datagram protocol (READY=1,
RELOADING=1 with MONOTONIC_USEC, STOPPING=1, STATUS=, WATCHDOG=1); without
``NOTIFY_SOCKET`` every call does nothing.  ``listen_fds`` takes the sockets
systemd passed (``LISTEN_FDS``/``LISTEN_PID``) and makes them non-blocking, so
one accept can never stall the loop.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from .listeners import ListenError

__all__ = ["Notifier", "listen_fds", "SD_LISTEN_FDS_START"]

log = logging.getLogger("mpxd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Send state changes to systemd's notification socket, if there is one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self.watchdog_interval: float | None = None
        if not address:
            return
        if address.startswith("@"):                # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    @classmethod
    def from_environment(cls) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``; one that does nothing without it."""
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``KEY=value`` strings) as one notification."""
        if self._sock is None:
            return
        try:
            # Never wait: a wedged receiver must not stall the loop (a lost
            # WATCHDOG=1 costs less than a loop stuck in sendto).
            self._sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT,
                              self.address)
        except OSError as e:
            log.debug("sd_notify failed: %s", e)

    def ready(self, status: str = "") -> None:
        """Start-up or a reload is complete (``READY=1``)."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        """A reload begins; ``ready`` must follow."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        """Shutdown begins (``STOPPING=1``); ``status`` says what it waits for."""
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        """Free-form state for ``systemctl status`` (``STATUS=``)."""
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """The loop is alive (``WATCHDOG=1``)."""
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed to this process, non-blocking.

    Empty unless ``LISTEN_PID`` names this process and ``LISTEN_FDS`` is set.
    The variables are removed so that child processes do not inherit them.
    Raises ``ListenError`` when a passed descriptor is not a listening
    stream socket (a socket unit with ``Accept=yes`` or ``ListenDatagram=``).
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not count.isdigit() or pid != str(os.getpid()):
        return []
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
            sockets.append(_listening_socket(fd))
    except ListenError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listening_socket(fd: int) -> socket.socket:
    """Wrap passed descriptor ``fd``; check that it is a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ListenError(f"LISTEN_FDS: descriptor {fd} is not a socket "
                          f"({e.strerror})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ListenError(f"LISTEN_FDS: descriptor {fd} is not a listening stream "
                          f"socket (the socket unit needs Accept=no and ListenStream=)")
    os.set_inheritable(fd, False)
    sock.setblocking(False)   # a blocking accept would stall the whole loop
    return sock
