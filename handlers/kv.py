"""A key-value store with expiry: GET, SET, DEL, EXPIRE and TTL, like a tiny Redis.

Try it:
    mpxd --port 47110 handlers/kv.py
    nc localhost 47110
    SET greeting hello world        -> OK
    GET greeting                    -> hello world
    EXPIRE greeting 5               -> 1       (5 s from now it is gone)
    TTL greeting                    -> 4.2     (seconds left; -1 no expiry, -2 no key)
    GET greeting                    -> (nil)   (once the 5 s are up)
    DEL greeting                    -> 0       (number of keys removed)
    FROB x                          -> ERROR unknown command 'FROB'

Commands are case-insensitive; keys are single words; SET's value is the
rest of the line.  EXPIRE takes seconds (decimals allowed); 0 or less deletes
at once; SET and DEL cancel an expiry.  Empty lines are ignored.

Expiry is driven by timers: EXPIRE schedules ``mpxd.call_later(seconds,
_expire, key)`` and keeps the ``Timer`` so that SET, DEL or another EXPIRE can
``cancel()`` it.  Nothing polls and nothing is checked per request.  The
store is module globals, so every connection sees the same keys (within one
process: with ``--workers`` each worker has its own store).  ``on_reload``
takes the data over when the script is reloaded with SIGHUP.

What it is not: the store lives in memory only (a TERM, a crash or a restart
loses every key; a HUP keeps them), and it has no limit on the number or
size of keys and values beyond mpxd's --max-line.  A value that is the text
"(nil)" reads the same as a missing key: this protocol has no types.
"""

import math
import time

from mpxd import call_later

MAX_EXPIRE = 10 * 365 * 24 * 3600

store = {}          # key -> value
expiry = {}         # key -> (Timer, time.monotonic() when it runs)


def on_reload(old_module):
    """HUP: keep the data.  The old module's timers act on these same dicts."""
    global store, expiry
    store = old_module.store
    expiry = old_module.expiry


def handle_request(s):
    words = s.request.split()
    if not words:
        return
    command = words[0].upper()
    if command not in COMMANDS:
        s.response = f"ERROR unknown command '{words[0]}'"
        return
    function, arity = COMMANDS[command]
    # SET's value is the rest of the line, spaces and all.
    args = s.request.split(None, arity)[1:] if command == "SET" else words[1:]
    if len(args) != arity:
        s.response = f"ERROR wrong number of arguments for '{command}'"
        return
    s.response = function(*args)


def _get(key):
    return store.get(key, "(nil)")


def _set(key, value):
    _forget_expiry(key)
    store[key] = value
    return "OK"


def _del(key):
    _forget_expiry(key)
    return "1" if store.pop(key, None) is not None else "0"


def _expire(key, seconds):
    try:
        delay = float(seconds)
    except ValueError:
        return "ERROR seconds must be a number"
    if not math.isfinite(delay):        # "inf", "nan": float() takes them
        return "ERROR seconds must be a number"
    if delay > MAX_EXPIRE:              # 1e308 made TTL print 309 digits
        return f"ERROR seconds must be at most {MAX_EXPIRE} (10 years)"
    if key not in store:
        return "0"
    _forget_expiry(key)
    if delay <= 0:
        del store[key]
    else:
        expiry[key] = (call_later(delay, _expired, key), time.monotonic() + delay)
    return "1"


def _ttl(key):
    if key not in store:
        return "-2"
    if key not in expiry:
        return "-1"
    _timer, deadline = expiry[key]
    return f"{max(0.0, deadline - time.monotonic()):.1f}"


def _expired(key):
    """The EXPIRE timer ran: the key is gone."""
    expiry.pop(key, None)
    store.pop(key, None)


def _forget_expiry(key):
    entry = expiry.pop(key, None)
    if entry is not None:
        entry[0].cancel()


COMMANDS = {
    "GET": (_get, 1),
    "SET": (_set, 2),
    "DEL": (_del, 1),
    "EXPIRE": (_expire, 2),
    "TTL": (_ttl, 1),
}
