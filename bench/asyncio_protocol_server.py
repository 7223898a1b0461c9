"""The counter as an asyncio ``Protocol``: the leanest way to write it on asyncio.

    python bench/asyncio_protocol_server.py --port 0

Per read: frame the complete lines, call the counter's ``handle_request`` for
each, and write all the answers with one ``transport.write``.  The uvloop
server runs this same class on uvloop's loop.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Callable

from peers import (BACKLOG, MAX_LINE, TOO_LONG, Line, announce, load_counter,
                   parse_args, raise_fd_limit, split_lines)

handle_request, handle_close = load_counter()


class CounterProtocol(asyncio.Protocol):
    """One connection: lines in, the counter's answers out."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.session = Line(transport.get_extra_info("peername"))
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        lines, self.tail = split_lines(self.tail, data)
        if lines:
            self.answer(lines)
        if len(self.tail) > MAX_LINE:
            self.transport.write(TOO_LONG)
            self.transport.close()

    def eof_received(self) -> bool:
        if self.tail:                 # a last line without LF is still a request
            tail, self.tail = self.tail, b""
            self.answer([tail.decode("utf-8", "surrogateescape")])
        return False                  # close once the answers are written

    def answer(self, lines: list[str]) -> None:
        s = self.session
        answers = []
        for line in lines:
            s.request = line
            s.response = ""
            handle_request(s)
            if s.response:
                answers.append(s.response)
        if answers:
            self.transport.write(("\n".join(answers) + "\n").encode("utf-8", "surrogateescape"))

    def connection_lost(self, exc: Exception | None) -> None:
        handle_close(self.session)


def main(new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
         description: str = "The counter as an asyncio Protocol server.") -> None:
    """Serve until SIGTERM or SIGINT on the loop ``new_loop`` makes."""
    args = parse_args(description)
    raise_fd_limit()
    loop = new_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(CounterProtocol, args.host, args.port, backlog=BACKLOG))
    announce(server.sockets[0].getsockname())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


if __name__ == "__main__":
    main()
