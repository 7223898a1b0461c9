"""Hold N idle TCP connections to a server until stdin closes: the idle crowd.

    python bench/idle.py HOST PORT N

Connects without sending anything, at most ``WINDOW`` handshakes at a time,
prints ``open=K failed=F`` once every connection was tried, then holds them
until its standard input reaches EOF (the benchmark closes it) or it is
killed.  Raises its own open-file limit to the hard limit first.
"""

from __future__ import annotations

import errno
import resource
import selectors
import socket
import sys
import time

WINDOW = 256            # handshakes in flight at once
CONNECT_TIMEOUT = 10.0  # seconds for all of them to finish


def open_idle(host: str, port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections; return the open sockets and how many failed."""
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    failed = 0
    started = 0
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while (started < count or sel.get_map()) and time.monotonic() < deadline:
        while started < count and len(sel.get_map()) < WINDOW:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((host, port))
            started += 1
            if err in (0, errno.EINPROGRESS):
                sel.register(sock, selectors.EVENT_WRITE)
            else:
                sock.close()
                failed += 1
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            sel.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                failed += 1
            else:
                done.append(sock)
    for key in list(sel.get_map().values()):   # still connecting at the deadline
        key.fileobj.close()
        failed += 1
    sel.close()
    return done, failed + (count - started)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: idle.py HOST PORT N")
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failed = open_idle(host, port, count)
    print(f"open={len(socks)} failed={failed}", flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()


if __name__ == "__main__":
    main()
