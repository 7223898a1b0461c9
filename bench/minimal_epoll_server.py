"""The counter on the leanest pure-Python epoll loop: the floor for any Python server.

    python bench/minimal_epoll_server.py --port 0

Not a peer: it has none of what a daemon needs (no line-length limit, no
backpressure, no timers, no logging, no graceful stop) and exists only to
show how little a Python server can spend around the handler.  The issue
that asked for mpxd's benchmark quotes such a loop; this one is measured in
the same run as mpxd, with the same handler and framing rules.
"""

from __future__ import annotations

import os
import select
import signal
import socket

from peers import BACKLOG, Line, announce, load_counter, parse_args, raise_fd_limit, split_lines

handle_request, handle_close = load_counter()
FIRST_READ = 512 - 33


def main() -> None:
    args = parse_args("The counter on a minimal pure-Python epoll loop.")
    raise_fd_limit()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    listener = socket.create_server((args.host, args.port), backlog=BACKLOG)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    announce(listener.getsockname())
    sessions: dict[int, list] = {}          # fd -> [session, unfinished tail]
    try:
        serve(listener, poller, sessions)
    except KeyboardInterrupt:
        pass


def serve(listener: socket.socket, poller: select.epoll, sessions: dict[int, list]) -> None:
    listen_fd = listener.fileno()
    read, write = os.read, os.write
    while True:
        for fd, _mask in poller.poll():
            if fd == listen_fd:
                while True:
                    try:
                        conn, peer = listener._accept()
                    except BlockingIOError:
                        break
                    os.set_blocking(conn, False)
                    sessions[conn] = [Line(peer), b""]
                    poller.register(conn, select.EPOLLIN)
                continue
            entry = sessions[fd]
            try:
                # A small first read: CPython makes bytes objects this small
                # from its own allocator, a 64 KiB one costs a malloc whatever
                # arrives (mpxd does the same, see FIRST_READ in mpxd/loop.py).
                data = read(fd, FIRST_READ)
            except OSError:
                data = b""
            if len(data) == FIRST_READ:
                try:
                    data += read(fd, 65536)
                except OSError:
                    pass                    # BlockingIOError: the first read got it all
            if not data:                    # EOF or reset: close (epoll forgets fd)
                del sessions[fd]
                os.close(fd)
                handle_close(entry[0])
                continue
            lines, entry[1] = split_lines(entry[1], data)
            s = entry[0]
            answers = []
            for line in lines:
                s.request = line
                s.response = ""
                handle_request(s)
                if s.response:
                    answers.append(s.response)
            if answers:
                try:
                    write(fd, ("\n".join(answers) + "\n").encode("utf-8", "surrogateescape"))
                except OSError:
                    pass                    # a short or failed write: not handled here


if __name__ == "__main__":
    main()
