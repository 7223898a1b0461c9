"""A ticker: every second, each subscribed client gets a line "tick N".

Try it:
    mpxd --port 47110 handlers/ticker.py
    nc localhost 47110
    SUBSCRIBE          -> OK subscribed       then "tick 7", "tick 8", ... once a second
    UNSUBSCRIBE        -> OK unsubscribed     and the ticks stop
    PING               -> PONG

N counts the ticks since the server started, whether anyone listened or not,
so two subscribers see the same numbers at the same time.  The interval is
1 second; the environment variable TICKER_INTERVAL (seconds) changes it.

How it works: ``on_start(server)`` starts one ``call_every`` timer for the
whole server; the timer pushes a line to each subscriber with
``send_response``, from the loop thread, without any request from them.
``on_stop`` cancels it; ``handle_close`` forgets a subscriber that left.
After a HUP reload, ``on_reload(old_module)`` stops the old module's timer
and starts one here, keeping the subscribers and the tick count.
"""

import os

from mpxd import call_every, send_response

INTERVAL = float(os.environ.get("TICKER_INTERVAL", "1"))
if not 0.001 <= INTERVAL < float("inf"):  # at import: "mpxd --check" says so too
    raise ValueError(f"TICKER_INTERVAL must be at least 0.001 seconds, not {INTERVAL}")

subscribers = {}    # session id -> session, in the order they subscribed
ticks = 0
timer = None


def on_start(server):
    global timer
    timer = call_every(INTERVAL, _tick)


def on_stop(server):
    if timer is not None:
        timer.cancel()


def on_reload(old_module):
    global subscribers, ticks, timer
    if old_module.timer is not None:
        old_module.timer.cancel()
    subscribers = old_module.subscribers
    ticks = old_module.ticks
    timer = call_every(INTERVAL, _tick)


def _tick():
    global ticks
    ticks += 1
    for s in list(subscribers.values()):
        s.response = f"tick {ticks}"
        send_response(s)


def handle_request(s):
    command = s.request.strip().upper()
    if command == "SUBSCRIBE":
        subscribers[s.id] = s
        s.response = "OK subscribed"
    elif command == "UNSUBSCRIBE":
        subscribers.pop(s.id, None)
        s.response = "OK unsubscribed"
    elif command == "PING":
        s.response = "PONG"
    elif command:
        s.response = f"ERROR unknown command '{s.request.strip()}'"


def handle_close(s):
    subscribers.pop(s.id, None)
