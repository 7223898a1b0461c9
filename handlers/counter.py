"""The man page's counter: per-session counters and one global counter.

Try it:
    mpxd --port 47110 handlers/counter.py
    printf '1\n1\n5 global\n' | nc -N localhost 47110      # prints 1, 2, 5

A line "N" adds N to this connection's counter and answers its value;
"N global" adds to the counter all connections share.  Anything that does not
start with a whole number counts as 0 (answers the current value).
"""

global_counter = 0


def _is_int(token):
    try:
        int(token)
    except ValueError:
        return False
    return True


def handle_request(s):
    global global_counter
    if s.handle is None:
        s.handle = {"count": 0}          # per-session state, like the C example
    tokens = s.request.split()
    value = 0
    if tokens and _is_int(tokens[0]):
        if len(tokens) == 2 and tokens[1] == "global":
            global_counter += int(tokens[0])
            value = global_counter
        else:
            s.handle["count"] += int(tokens[0])
            value = s.handle["count"]
    s.response = str(value)


def handle_close(s):
    s.handle = None
