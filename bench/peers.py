"""What the comparison servers share: the counter handler, its session stand-in, start-up.

Every peer calls the very ``handle_request`` and ``handle_close`` of
``handlers/counter.py`` that mpxd serves, on an object with the attributes
mpxd's session gives a handler, so the per-line work (decode the line to
``str``, compute, encode the answer) is the same code everywhere and the
benchmark compares what is around it: the loop, the framing, the writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
from pathlib import Path
from typing import Any, Callable

__all__ = ["BACKLOG", "MAX_LINE", "TOO_LONG", "Line", "load_counter", "parse_args",
           "raise_fd_limit", "announce", "split_lines"]

REPO = Path(__file__).resolve().parent.parent
COUNTER = REPO / "handlers" / "counter.py"
BACKLOG = 1024              # what mpxd listens with
MAX_LINE = 64 * 1024        # mpxd's default --max-line
TOO_LONG = b"ERROR line too long\n"


class Line:
    """The part of mpxd's ``Session`` the counter handler uses."""

    __slots__ = ("handle", "request", "response", "peer")

    def __init__(self, peer: Any = None) -> None:
        self.handle: Any = None
        self.request = ""
        self.response = ""
        self.peer = peer


def load_counter() -> tuple[Callable[[Line], None], Callable[[Line], None]]:
    """``handle_request`` and ``handle_close`` from ``handlers/counter.py``."""
    spec = importlib.util.spec_from_file_location("bench_counter", COUNTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handle_request, getattr(module, "handle_close", lambda s: None)


def parse_args(description: str) -> argparse.Namespace:
    """``--port`` (0 picks a free one) and ``--host`` (default 127.0.0.1)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    return parser.parse_args()


def raise_fd_limit() -> None:
    """Allow as many open files as the hard limit does (10,000 idle clients)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce(sockname: tuple) -> None:
    """Print the ready line the benchmark waits for."""
    print(f"listening on {sockname[0]}:{sockname[1]}", flush=True)


def split_lines(tail: bytes, data: bytes) -> tuple[list[str], bytes]:
    """Complete lines of ``tail + data`` as text, and the unfinished rest.

    The same framing as mpxd's: decode the complete lines in one go, split
    once, strip one CR before each LF.
    """
    if tail:
        data = tail + data
    end = data.rfind(b"\n")
    if end < 0:
        return [], data
    text = data[:end].decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line[-1:] == "\r" else line for line in lines]
    return lines, data[end + 1:]
