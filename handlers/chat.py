"""Chat: every line is sent to every other connected client.

Try it with three terminals:
    mpxd --port 47110 handlers/chat.py
    nc localhost 47110        # type "/nick alice", then "hello"
    nc localhost 47110        # sees "* guest1 is now alice", then "<alice> hello"

Each newcomer is "guestN" (N: its session id) until it picks a name, and
the others see "* guestN joined" when it connects.

Commands: "/nick NAME" changes your name (announced to the others), "/who"
lists who is here, "/quit" leaves.  Every other line is broadcast as
"<name> text" with send_response to every other session; joins and leaves
are announced from handle_open and handle_close.  The sender gets nothing
back for a chat line, so the others' lines never interleave with its own.
"""

from mpxd import send_response, close_session, sessions


def _name(s):
    return s.handle["nick"]


def _broadcast(sender, text):
    """Send ``text`` to every open session except ``sender``."""
    for other in sessions():
        if other is not sender and other.handle is not None:
            other.response = text
            send_response(other)


def handle_open(s):
    nick = f"guest{s.id}"
    taken = {_name(o) for o in sessions() if o is not s and o.handle is not None}
    while nick in taken:            # someone already renamed themselves to it
        nick += "_"
    s.handle = {"nick": nick}
    present = sum(1 for other in sessions() if other is not s)
    s.response = (f"* welcome, you are {_name(s)}; {present} other(s) here; "
                  f"/nick NAME to rename, /who, /quit")
    _broadcast(s, f"* {_name(s)} joined")


def handle_request(s):
    line = s.request
    if line.startswith("/nick"):
        new = line[len("/nick"):].strip()
        if not new or " " in new:
            s.response = "* usage: /nick NAME (one word)"
            return
        if any(o.handle is not None and _name(o) == new for o in sessions() if o is not s):
            s.response = f"* {new} is taken"
            return
        old = _name(s)
        s.handle["nick"] = new
        s.response = f"* you are now {new}"
        _broadcast(s, f"* {old} is now {new}")
    elif line == "/who":
        s.response = "* here: " + " ".join(
            sorted(_name(o) for o in sessions() if o.handle is not None))
    elif line == "/quit":
        s.response = "* bye"
        close_session(s)
    elif line:
        _broadcast(s, f"<{_name(s)}> {line}")


def handle_close(s):
    if s.handle is not None:
        name = _name(s)
        s.handle = None
        _broadcast(s, f"* {name} left")
