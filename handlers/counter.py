"""The man page's counter: per-session counters and one global counter.

Try it:
    mpxd --port 47110 handlers/counter.py
    printf '1\n1\n5 global\n' | nc -N localhost 47110      # prints 1, 2, 5

A line "N" adds N to this connection's counter and answers its value;
"N global" adds to the counter all connections share.  As in the C original
(which reads the number with sscanf "%d"), a first word that does not start
with a whole number makes the answer 0, and digits (0 to 9 only, as in C)
are read up to the first non-digit ("12abc" counts as 12), at most 100 of
them.  Words are split at any whitespace, as Python's str.split() does.
"""

import re

global_counter = 0

# At most 100 digits: Python refuses to turn more than 4300 digits into an
# int or back (ValueError), so "9" * 4300 sent twice as "N global" made the
# shared counter unprintable, and every client's "N global" failed after it.
_LEADING_INT = re.compile(r"[+-]?[0-9]{1,100}")     # ASCII digits: "\d" took "٣" as 3


def handle_request(s):
    global global_counter
    if s.handle is None:
        s.handle = {"count": 0}          # per-session state, like the C example
    tokens = s.request.split()
    value = 0
    number = _LEADING_INT.match(tokens[0]) if tokens else None
    if number:
        increment = int(number.group())
        if len(tokens) == 2 and tokens[1] == "global":
            global_counter += increment
            value = global_counter
        else:
            s.handle["count"] += increment
            value = s.handle["count"]
    s.response = str(value)


def handle_close(s):
    s.handle = None
