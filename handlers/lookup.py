"""Name lookups: answers come from a blocking call run in a worker thread.

Try it:
    mpxd --port 47110 handlers/lookup.py
    nc localhost 47110
    RESOLVE localhost          -> localhost 127.0.0.1 ::1
    RESOLVE localhost 2        -> (2 s later) localhost 127.0.0.1 ::1
    RESOLVE no.such.name.      -> ERROR no.such.name.: Name or service not known
    STATS                      -> lookups 3 answered 3 abandoned 0 in-flight 0

``RESOLVE HOST [DELAY]`` calls ``socket.getaddrinfo``, which blocks (it may
wait seconds for a DNS server); DELAY seconds of ``time.sleep`` first (at
most 10) stand in for a slow server.  A blocking call in a handler would stall every
connection, so the handler hands it to ``mpxd.run_in_thread`` and returns at
once with no response; the loop goes on serving everyone else.  When the
lookup is done, ``then`` runs on the loop thread and sends the answer with
``send_response``.  The lookups of all clients share mpxd's worker threads
(``--threads``, default 4): while they are all busy with slow lookups, the
next lookups wait their turn, whoever sent them (other commands do not).

Answers go out in the order of the requests, even when a later lookup
finishes first: each request takes a slot in its session's queue, and
finished slots are sent from the front only.  STATS is answered as it stood
when the request came.  At most 16 lookups per connection are in flight;
more get "ERROR too many lookups in flight".  The queue itself is this
script's, not mpxd's output, so mpxd's output limits do not bound it: a
client that sends requests faster than its lookups finish gets "ERROR too
many requests waiting" once 256 are queued, and is disconnected after the
answers before it.

A client may go away before its answer is ready.  ``then`` still runs; it
sees ``s.closed`` and drops the answer (counted as abandoned in STATS).  A
client that only half-closes (EOF, as ``nc -N`` does) still gets its
answers: mpxd keeps a session open while a ``run_in_thread`` job of its
handler runs.  ``send_response`` on a closed session would also just return
False: the session is never touched from the worker thread, only from
``then``.
"""

import socket
import time
from collections import deque

from mpxd import close_session, run_in_thread, send_response

MAX_IN_FLIGHT = 16
MAX_WAITING = 256       # answers queued per connection, lookups in flight included
MAX_DELAY = 10          # seconds; each delayed lookup holds one of --threads meanwhile

stats = {"lookups": 0, "answered": 0, "abandoned": 0}


def handle_request(s):
    if s.handle is None:
        # queue: [answer or None] per request, oldest first
        s.handle = {"queue": deque(), "in_flight": 0, "closing": False}
    elif isinstance(s.handle, deque):   # made by an older version, before a HUP
        s.handle = {"queue": s.handle, "closing": False,
                    "in_flight": sum(1 for slot in s.handle if slot[0] is None)}
    state = s.handle
    if state["closing"]:
        return                          # disconnected once its answers are out
    if len(state["queue"]) >= MAX_WAITING:
        state["closing"] = True
        _answer(s, ["ERROR too many requests waiting"])
        return
    words = s.request.split()
    if not words:
        return
    command = words[0].upper()
    if command == "STATS":
        in_flight = stats["lookups"] - stats["answered"] - stats["abandoned"]
        _answer(s, [f"lookups {stats['lookups']} answered {stats['answered']} "
                    f"abandoned {stats['abandoned']} in-flight {in_flight}"])
    elif command == "RESOLVE" and len(words) in (2, 3):
        host = words[1]
        try:
            delay = float(words[2]) if len(words) == 3 else 0.0
        except ValueError:
            _answer(s, ["ERROR delay must be a number of seconds"])
            return
        if not 0 <= delay <= MAX_DELAY:     # also refuses nan: a thread is held that long
            _answer(s, [f"ERROR delay must be between 0 and {MAX_DELAY} seconds"])
            return
        if state["in_flight"] >= MAX_IN_FLIGHT:
            _answer(s, ["ERROR too many lookups in flight"])
            return
        slot = [None]
        state["queue"].append(slot)
        state["in_flight"] += 1
        stats["lookups"] += 1
        run_in_thread(_resolve, host, delay,
                      then=lambda result: _resolved(s, slot, host, result))
    elif command == "RESOLVE":
        _answer(s, ["ERROR usage: RESOLVE HOST [DELAY]"])
    else:
        _answer(s, [f"ERROR unknown command '{words[0]}'"])


def _resolve(host, delay):
    """In a worker thread: the blocking part.  Touches no session."""
    if delay > 0:
        time.sleep(delay)
    addresses = []
    for *_, address in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        if address[0] not in addresses:
            addresses.append(address[0])
    return addresses


def _resolved(s, slot, host, result):
    """On the loop thread: the lookup finished (``result`` may be an exception)."""
    if s.closed:
        stats["abandoned"] += 1
        return
    stats["answered"] += 1
    s.handle["in_flight"] -= 1
    if isinstance(result, socket.gaierror):
        slot[0] = f"ERROR {host}: {result.strerror}"
    elif isinstance(result, BaseException):
        slot[0] = f"ERROR {host}: {result}"
    else:
        slot[0] = " ".join([host, *result])
    _flush(s)


def _answer(s, slot):
    """An immediate answer, queued behind lookups still in flight."""
    s.handle["queue"].append(slot)
    _flush(s)


def _flush(s):
    """Send the finished answers at the front of ``s``'s queue, in order."""
    queue = s.handle["queue"]
    while queue and queue[0][0] is not None:
        s.response = queue.popleft()[0]
        send_response(s)
    if not queue and s.handle["closing"]:
        close_session(s)
