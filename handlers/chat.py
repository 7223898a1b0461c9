"""Chat: every line is sent to every other connected client.

Try it with three terminals:
    mpxd --port 47110 handlers/chat.py
    nc localhost 47110        # type "/nick alice", then "hello"
    nc localhost 47110        # sees "* guest1 is now alice", then "<alice> hello"

Each newcomer is "guestN" (N: its session id) until it picks a name, and
the others see "* guestN joined" when it connects.

Commands (any case): "/nick NAME" changes your name (announced to the
others; at most 24 printable characters, no spaces), "/who" lists who is
here, "/quit" leaves; another line starting with "/" gets a usage line.
Every other line is broadcast as "<name> text" with send_response to every
other session, its control characters (a CR that would let one client
overwrite the line on the others' terminals, "* guest1 left") shown as "?".
Joins and leaves are announced from handle_open and handle_close, and a
stop of the daemon (kill -TERM, mpxctl drain) from on_stopping.  The
sender gets nothing back for a chat line, so the others' lines never
interleave with its own.

Every line goes to every client: a client that never reads piles up the
others' lines until mpxd's --max-output (16 MiB) drops it, so a flooder and
100 such clients can cost 1.6 GB.  For a public chat, bound both:
    mpxd --port 47110 --max-output 65536 --max-rate 20 handlers/chat.py
"""

from mpxd import send_response, close_session, sessions

MAX_NICK = 24
USAGE = "* commands: /nick NAME, /who, /quit"


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
    if line.startswith("/"):
        command, *args = line.split()   # never empty: "/" is its first word
        command = command.lower()
        if command == "/nick":
            _nick(s, args)
        elif command == "/who" and not args:
            s.response = "* here: " + " ".join(
                sorted(_name(o) for o in sessions() if o.handle is not None))
        elif command == "/quit" and not args:
            s.response = "* bye"
            close_session(s)
        else:
            s.response = USAGE
    elif line:
        if not line.isprintable():
            line = "".join(c if c.isprintable() else "?" for c in line)
        _broadcast(s, f"<{_name(s)}> {line}")


def _nick(s, args):
    new = args[0] if len(args) == 1 else ""
    if not new or len(new) > MAX_NICK or not new.isprintable():
        s.response = f"* usage: /nick NAME (one word, at most {MAX_NICK} characters)"
        return
    old = _name(s)
    if new == old:
        s.response = f"* you are {new} already"
        return
    if any(o.handle is not None and _name(o) == new for o in sessions() if o is not s):
        s.response = f"* {new} is taken"
        return
    s.handle["nick"] = new
    s.response = f"* you are now {new}"
    _broadcast(s, f"* {old} is now {new}")


def on_stopping(server):
    """The daemon is stopping: tell everyone, before their connections close."""
    _broadcast(None, "* the server is going down")


def handle_close(s):
    if s.handle is not None:
        name = _name(s)
        s.handle = None
        _broadcast(s, f"* {name} left")
