"""The man page's counter with its ``global`` counter in Redis, shared by every process.

Try it (needs redis-py, ``pip install redis``, and a Redis server):
    redis-server --port 6379 --save "" --appendonly no &
    mpxd --port 47110 handlers/shared_counter.py
    mpxd --port 47111 handlers/shared_counter.py          # a second instance
    printf '5 global\n' | nc -N localhost 47110           # -> 5
    printf '2 global\n1\n' | nc -N localhost 47111        # -> 7, then 1

"N" adds N to this connection's own counter, as in handlers/counter.py
(numbers are read as there: "12abc" counts 12, a word that does not start
with a number counts 0); "N global" adds N to the counter in Redis with the atomic INCRBY and answers
the new value, so every mpxd instance and every ``--workers`` process counts
together.  While Redis cannot be reached a global request is answered
"ERROR redis unavailable: <reason>" (and logged once per outage); the
connection stays open and the next request tries again.  A request that
timed out waiting for Redis's answer may have been counted all the same
(Redis may be slow, not gone): it is answered "ERROR redis timed out, the
increment may have been applied", and a client that retries it may count
it twice.

Where Redis is: the environment variable MPXD_REDIS_URL, default
redis://127.0.0.1:6379/0; the key: MPXD_REDIS_KEY, default
mpxd:global_counter.

A Redis call is network I/O, so it runs in a worker thread
(``mpxd.run_in_thread``); a slow or unreachable Redis never stalls the
loop.  Answers still go out in request order: each request takes a slot in
its session's queue, finished slots are sent from the front, and each
connection has one Redis call in flight at a time.  That queue is this
script's, not mpxd's output, so mpxd's output limits do not bound it: while
Redis is slow a client could queue requests without end, and after 1,000
waiting answers it gets "ERROR too many requests waiting" and is
disconnected once the answers before it are out.
"""

import logging
import os
import re
from collections import deque

from mpxd import close_session, run_in_thread, send_response

try:
    import redis
except ImportError:
    raise ImportError("handlers/shared_counter.py needs redis-py: pip install redis") from None

URL = os.environ.get("MPXD_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY = os.environ.get("MPXD_REDIS_KEY", "mpxd:global_counter")
TIMEOUT = 2.0       # seconds for connecting and for each command
MAX_WAITING = 1000  # answers queued per connection

log = logging.getLogger("mpxd.shared_counter")

# One client per process: redis-py's connection pool is thread-safe.
client = redis.Redis.from_url(URL, socket_timeout=TIMEOUT,
                              socket_connect_timeout=TIMEOUT)
outage = False      # logged the current outage already


def on_stop(server):
    client.close()


# As in handlers/counter.py: the C original's sscanf "%d", at most 100 digits.
_LEADING_INT = re.compile(r"[+-]?[0-9]{1,100}")     # ASCII digits: "\d" took "٣" as 3


def handle_request(s):
    if s.handle is None:
        s.handle = {"count": 0, "queue": deque(), "busy": False, "closing": False}
    state = s.handle
    if state.setdefault("closing", False):  # setdefault: a handle from before a HUP
        return                          # disconnected once its answers are out
    if len(state["queue"]) >= MAX_WAITING:
        state["closing"] = True
        state["queue"].append(["ERROR too many requests waiting", None])
        _pump(s)
        return
    tokens = s.request.split()
    number = _LEADING_INT.match(tokens[0]) if tokens else None
    if number and len(tokens) == 2 and tokens[1] == "global":
        s.handle["queue"].append([None, int(number.group())])   # answered by Redis
    else:
        value = 0
        if number:
            s.handle["count"] += int(number.group())
            value = s.handle["count"]
        s.handle["queue"].append([str(value), None])
    _pump(s)


def _pump(s):
    """Send the answers at the front of ``s``'s queue; start its next Redis call.

    The front is either answered or the oldest global request; only one
    Redis call per connection runs at a time, so a client's increments are
    applied in the order it sent them.
    """
    state = s.handle
    queue = state["queue"]
    while queue and queue[0][0] is not None:
        s.response = queue.popleft()[0]
        send_response(s)
    if not queue and state["closing"]:
        close_session(s)
    if queue and not state["busy"]:
        state["busy"] = True
        slot = queue[0]
        run_in_thread(client.incrby, KEY, slot[1],
                      then=lambda result: _counted(s, slot, result))


def _counted(s, slot, result):
    """On the loop thread: INCRBY returned the new value, or failed."""
    global outage
    if isinstance(result, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        if not outage:
            log.warning("redis at %s unavailable: %s", URL, result)
            outage = True
        # A timeout may come after Redis applied the INCRBY: say so, lest the
        # client retry and count twice.  (redis-py's TimeoutError for a
        # connect that timed out is reported so too: the safe side.)
        slot[0] = ("ERROR redis timed out, the increment may have been applied"
                   if isinstance(result, redis.exceptions.TimeoutError)
                   else f"ERROR redis unavailable: {result}")
    elif isinstance(result, BaseException):
        slot[0] = f"ERROR redis: {result}"
    else:
        if outage:
            log.info("redis at %s reachable again", URL)
            outage = False
        slot[0] = str(result)
    if not s.closed:
        s.handle["busy"] = False
        _pump(s)


def handle_close(s):
    s.handle = None
