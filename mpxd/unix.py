"""Unix-domain listening sockets: bind with a mode, replace stale files, peer credentials.

A socket file left behind by a crashed daemon is replaced only when it is a
socket and nobody accepts on it (a ``connect`` is refused); a live socket or
any other kind of file at the path stops start-up with a message.  The file
is created with its final mode (the umask is set around ``bind``, so there
is no moment when it is more open than asked) and removed on exit only while
it is still the file this process created.

Sessions on a unix socket have ``s.peer == UnixPeer(pid, uid, gid)``: the
client's credentials from ``SO_PEERCRED``, a 3-tuple, printed in logs as
``unix:pid=...,uid=...,gid=...``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from typing import NamedTuple

from .listeners import ListenError

__all__ = ["UnixPeer", "UnixListener", "bind_unix", "peer_credentials"]

log = logging.getLogger("mpxd")

_UCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid
MAX_PATH = 107                        # sizeof(sun_path) - 1 on Linux


class UnixPeer(NamedTuple):
    """The process at the other end of a unix socket (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"unix:pid={self.pid},uid={self.uid},gid={self.gid}"


def peer_credentials(fd: int) -> UnixPeer:
    """The credentials of the process connected to unix socket ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    finally:
        sock.detach()               # the caller keeps owning the descriptor
    return UnixPeer(*_UCRED.unpack(raw))


class UnixListener:
    """A bound unix socket and the identity of the file it created."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def chown(self, uid: int, gid: int) -> None:
        """Give the socket file to the user the daemon will run as."""
        os.chown(self.path, uid, gid)

    def remove(self) -> None:
        """Close the socket; unlink the file if it is still the one we created."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            try:
                os.unlink(self.path)
            except OSError as e:
                # After --user, a root-owned directory (/run) keeps it: the
                # next start takes the stale file over.
                log.info("cannot remove socket file %s: %s; the next start replaces it",
                         self.path, e.strerror)


def bind_unix(path: str, mode: int, backlog: int) -> UnixListener:
    """Listen on a unix socket at ``path`` whose file has permissions ``mode``.

    Raises ``ListenError`` when the path is too long, a live server listens
    there, or something other than a socket is in the way.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > MAX_PATH:
        raise ListenError(f"cannot listen on {path}: the path is longer than "
                          f"{MAX_PATH} bytes, the limit for unix sockets")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for attempt in range(2):
            try:
                _bind_with_mode(sock, path, mode)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or attempt:
                    raise ListenError(f"cannot listen on {path}: {e.strerror}") from None
                _remove_stale(path)
        os.chmod(path, mode)            # exact, whatever the umask took away
        sock.listen(backlog)
        sock.setblocking(False)
        return UnixListener(path, sock)
    except BaseException:
        sock.close()
        raise


def _bind_with_mode(sock: socket.socket, path: str, mode: int) -> None:
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def _remove_stale(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody accepts on; else ``ListenError``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"cannot listen on {path}: the path exists and is not "
                          f"a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass                        # stale: left by a process that is gone
    except OSError as e:
        raise ListenError(f"cannot listen on {path}: cannot tell whether the "
                          f"socket there is in use ({e.strerror})") from None
    else:
        raise ListenError(f"cannot listen on {path}: another process is listening "
                          f"there (is another mpxd running?)")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:            # a root-owned leftover, mpxd run as another user
        raise ListenError(f"cannot listen on {path}: a stale socket file is there and "
                          f"cannot be removed ({e.strerror}); remove it, or choose "
                          f"another path") from None
