"""The asyncio Protocol counter server run on uvloop (libuv) instead of asyncio's loop.

    python bench/uvloop_protocol_server.py --port 0

Exits with status 3 and a message when uvloop is not installed; the
benchmark then skips this row and says so.
"""

from __future__ import annotations

import sys

try:
    import uvloop
except ImportError:
    print("uvloop is not installed (pip install uvloop)", file=sys.stderr)
    sys.exit(3)

from asyncio_protocol_server import main

if __name__ == "__main__":
    main(uvloop.new_event_loop, "The counter as a Protocol server on uvloop.")
