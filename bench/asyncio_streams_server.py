"""The counter on asyncio streams: ``readline``, answer, ``write``, ``drain``.

    python bench/asyncio_streams_server.py --port 0

The way the asyncio documentation writes a line server; one coroutine per
connection, one line at a time.
"""

from __future__ import annotations

import asyncio
import signal

from peers import (BACKLOG, MAX_LINE, TOO_LONG, Line, announce, load_counter,
                   parse_args, raise_fd_limit)

handle_request, handle_close = load_counter()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one connection's lines until EOF or an error."""
    s = Line(writer.get_extra_info("peername"))
    try:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:            # a line longer than the reader's limit
                writer.write(TOO_LONG)
                break
            if not raw:
                break
            if raw[-1:] == b"\n":
                raw = raw[:-2] if raw[-2:] == b"\r\n" else raw[:-1]
            s.request = raw.decode("utf-8", "surrogateescape")
            s.response = ""
            handle_request(s)
            if s.response:
                writer.write((s.response + "\n").encode("utf-8", "surrogateescape"))
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        handle_close(s)
        writer.close()


async def serve_forever(host: str, port: int) -> None:
    server = await asyncio.start_server(serve, host, port, limit=MAX_LINE, backlog=BACKLOG)
    announce(server.sockets[0].getsockname())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    args = parse_args("The counter as an asyncio streams server.")
    raise_fd_limit()
    asyncio.run(serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
