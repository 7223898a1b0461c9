"""mpxd.timers: the TimerHeap on its own, and call_later/call_every in the real daemon."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from mpxd.testing import Harness
from mpxd.timers import TimerHeap

from conftest import wait_until


def _run(heap: TimerHeap, now: float) -> list:
    """Run what is due at ``now``; return the callbacks' recorded values."""
    ran = []
    heap.run_due(now, lambda timer: ran.append(timer.callback(*timer.args)))
    return ran


# ------------------------------------------------------------ TimerHeap

def test_an_empty_heap_has_no_deadline():
    assert TimerHeap().next_deadline() is None


def test_next_deadline_is_the_earliest_timer():
    heap = TimerHeap()
    heap.add(5.0, lambda: None)
    heap.add(2.0, lambda: None)
    heap.add(9.0, lambda: None)
    assert heap.next_deadline() == 2.0


def test_cancelled_timers_do_not_count_for_the_deadline_and_are_dropped():
    heap = TimerHeap()
    first = heap.add(1.0, lambda: None)
    heap.add(3.0, lambda: None)
    first.cancel()
    assert heap.next_deadline() == 3.0
    assert len(heap) == 1


def test_run_due_runs_only_due_timers_in_deadline_order():
    heap = TimerHeap()
    heap.add(3.0, lambda: "c")
    heap.add(1.0, lambda: "a")
    heap.add(2.0, lambda: "b")
    heap.add(4.5, lambda: "late")
    assert _run(heap, 3.0) == ["a", "b", "c"]
    assert heap.next_deadline() == 4.5
    assert _run(heap, 4.0) == []
    assert _run(heap, 4.5) == ["late"]


def test_timers_due_at_the_same_time_run_in_the_order_they_were_added():
    heap = TimerHeap()
    for name in "abcde":
        heap.add(1.0, lambda n=name: n)
    assert _run(heap, 1.0) == list("abcde")


def test_arguments_are_passed_to_the_callback():
    heap = TimerHeap()
    heap.add(0.0, lambda x, y: (x, y), (1, "two"))
    assert _run(heap, 0.0) == [(1, "two")]


def test_a_cancelled_timer_never_runs():
    heap = TimerHeap()
    timer = heap.add(1.0, lambda: "no")
    timer.cancel()
    timer.cancel()                      # twice is harmless
    assert _run(heap, 10.0) == []
    assert "cancelled" in repr(timer)


def test_a_repeating_timer_keeps_to_its_schedule():
    heap = TimerHeap()
    heap.add(1.0, lambda: "tick", (), 1.0)
    assert _run(heap, 1.2) == ["tick"]
    assert heap.next_deadline() == 2.0          # not 2.2: no drift
    assert _run(heap, 2.0) == ["tick"]
    assert heap.next_deadline() == 3.0


def test_a_repeating_timer_skips_runs_missed_during_a_stall():
    heap = TimerHeap()
    heap.add(1.0, lambda: "tick", (), 1.0)
    assert _run(heap, 5.5) == ["tick"]          # once, not five times
    assert heap.next_deadline() == 6.5


def test_run_due_ends_even_when_the_interval_cannot_move_the_clock():
    # now + 1e-300 == now: the timer was pushed back due, and run_due ran it
    # for ever; the daemon served nobody and ignored TERM.
    heap = TimerHeap()
    heap.add(524.0, lambda: "tick", (), 1e-300)
    assert _run(heap, 524.0) == ["tick"]        # once per pass, then the loop goes on


def test_call_every_refuses_an_interval_below_a_millisecond(tmp_path):
    script = tmp_path / "every.py"
    script.write_text("from mpxd import call_every\n"
                      "def handle_request(s):\n"
                      "    try:\n"
                      "        call_every(float(s.request), print).cancel()\n"
                      "        s.response = 'ok'\n"
                      "    except ValueError as e:\n"
                      "        s.response = str(e)\n")
    with Harness(str(script)) as h:
        c = h.connect()
        assert c.send("1e-300") == ["call_every needs an interval of at least 0.001s, "
                                    "not 1e-300"]
        assert c.send("0.001") == ["ok"]


def test_a_repeating_timer_may_cancel_itself():
    heap = TimerHeap()
    count = []

    def tick():
        count.append(1)
        if len(count) == 3:
            timer.cancel()

    timer = heap.add(1.0, tick, (), 1.0)
    for now in range(1, 10):
        _run(heap, float(now))
    assert len(count) == 3
    assert heap.next_deadline() is None


def test_a_callback_may_cancel_a_timer_due_in_the_same_pass():
    heap = TimerHeap()
    ran = []
    heap.add(1.0, lambda: (ran.append("first"), second.cancel()))
    second = heap.add(1.0, lambda: ran.append("second"))
    heap.run_due(1.0, lambda timer: timer.callback())
    assert ran == ["first"]


def test_a_timer_added_for_now_by_a_callback_waits_for_the_next_pass():
    heap = TimerHeap()
    ran = []

    def again():
        ran.append("again")
        heap.add(1.0, again)            # due already: must not loop forever

    heap.add(1.0, again)
    heap.run_due(1.0, lambda timer: timer.callback())
    assert ran == ["again"]
    heap.run_due(1.0, lambda timer: timer.callback())
    assert ran == ["again", "again"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.booleans()), max_size=40),
       st.lists(st.integers(0, 60), max_size=10))
def test_every_live_one_shot_timer_runs_once_in_order_and_never_early(specs, steps):
    heap = TimerHeap()
    ran: list[tuple[float, int]] = []
    clock = {"now": 0.0}
    timers = []
    for index, (when, cancelled) in enumerate(specs):
        timer = heap.add(float(when), lambda w, i: ran.append((w, i)), (float(when), index))
        if cancelled:
            timer.cancel()
        timers.append(timer)

    def run(timer):
        assert timer.when <= clock["now"]
        timer.callback(*timer.args)

    for now in sorted(steps) + [100]:
        clock["now"] = float(now)
        heap.run_due(float(now), run)
    expected = sorted((float(w), i) for i, (w, c) in enumerate(specs) if not c)
    assert ran == expected
    assert heap.next_deadline() is None


# ------------------------------------------------------- in the daemon

TIMER_SCRIPT = """
from mpxd import call_later, call_every, send_response

ticks = {"count": 0}
timer = None

def _say(s, text):
    s.response = text
    send_response(s)

def _tick(s):
    ticks["count"] += 1
    _say(s, f"tick {ticks['count']}")

def _fail():
    raise ZeroDivisionError("timer went wrong")

def _tick_and_fail(s):
    ticks["count"] += 1
    _say(s, f"failing tick {ticks['count']}")
    raise ZeroDivisionError(f"tick {ticks['count']} went wrong")

def handle_request(s):
    global timer
    command, _, arg = s.request.partition(" ")
    if command == "later":
        delay, _, text = arg.partition(" ")
        call_later(float(delay), _say, s, text)
        s.response = "scheduled"
    elif command == "every":
        timer = call_every(float(arg), _tick, s)
        s.response = "started"
    elif command == "cancel":
        timer.cancel()
        s.response = f"cancelled after {ticks['count']}"
    elif command == "count":
        s.response = f"count {ticks['count']}"
    elif command == "later-cancelled":
        call_later(0.05, _say, s, "cancelled timer ran").cancel()
        call_later(0.15, _say, s, "the other timer ran")
        s.response = "scheduled"
    elif command == "every-failing":
        timer = call_every(float(arg), _tick_and_fail, s)
        s.response = "started"
    elif command == "fail":
        call_later(0, _fail)
        call_later(0.1, _say, s, "still here")
        s.response = "failing"
    else:
        s.response = "pong"
"""


def test_call_later_answers_after_the_delay(daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    started = time.monotonic()
    c.send_lines("later 0.3 first", "later 0.1 second")
    assert c.readlines(2) == ["scheduled", "scheduled"]
    assert c.readline() == "second"             # the shorter delay fires first
    assert c.readline() == "first"
    assert time.monotonic() - started >= 0.3    # never early
    assert c.ask("ping") == "pong"


def test_call_every_repeats_until_cancelled(daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    assert c.ask("every 0.05") == "started"
    assert c.readlines(3) == ["tick 1", "tick 2", "tick 3"]
    c.send_lines("cancel")
    lines = []
    while not (line := c.readline()).startswith("cancelled"):
        lines.append(line)                      # ticks that fired before the cancel
    stopped_at = int(line.split()[-1])
    assert lines == [f"tick {n}" for n in range(4, stopped_at + 1)]
    time.sleep(0.3)                             # six intervals: no tick may come
    assert c.ask("count") == f"count {stopped_at}"


def test_a_failing_timer_is_logged_and_the_loop_carries_on(daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    assert c.ask("fail") == "failing"
    d.expect_log(r"ERROR timer _fail failed")
    d.expect_log(r"ZeroDivisionError: timer went wrong")
    assert c.readline() == "still here"         # a later timer still runs
    assert c.ask("ping") == "pong"              # and the session is still served
    other = d.connect()
    assert other.ask("ping") == "pong"


def test_a_timer_far_away_or_at_infinity_does_not_stop_the_loop(daemon, write_script):
    # The poll timeout came straight from the nearest timer: 1e300 seconds
    # overflowed it and stopped the daemon (EXPIRE k 1e300 in handlers/kv.py).
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    assert c.ask("later 1e300 never") == "scheduled"
    assert c.ask("later inf never") == "scheduled"
    c.send_lines("later 0.1 soon")
    assert c.readlines(2) == ["scheduled", "soon"]
    assert c.ask("ping") == "pong"


def test_call_later_refuses_nan_in_the_handler_that_asked(daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    c.send_lines("later nan x")
    assert c.read_all() == b""
    d.expect_log("ValueError: call_later needs a delay in seconds, not nan")
    assert d.connect().ask("ping") == "pong"


def test_a_cancelled_call_later_never_runs(daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    assert c.ask("later-cancelled") == "scheduled"
    assert c.readline() == "the other timer ran"    # due after the cancelled one
    assert c.ask("ping") == "pong"


def test_a_failing_repeating_timer_is_logged_each_time_and_keeps_repeating(
        daemon, write_script):
    d = daemon(write_script(TIMER_SCRIPT))
    c = d.connect()
    assert c.ask("every-failing 0.05") == "started"
    assert c.readlines(3) == ["failing tick 1", "failing tick 2", "failing tick 3"]
    for n in (1, 2, 3):
        d.expect_log(r"ERROR timer _tick_and_fail failed")
        d.expect_log(rf"ZeroDivisionError: tick {n} went wrong")
    c.send_lines("cancel")
    while not (line := c.readline()).startswith("cancelled"):
        assert line.startswith("failing tick ")
    assert c.ask("ping") == "pong"


def test_call_later_from_on_start_runs_without_any_client(daemon, write_script, tmp_path):
    marker = tmp_path / "fired"
    d = daemon(write_script(f"""
from mpxd import call_later

def on_start(server):
    call_later(0.05, lambda: open({str(marker)!r}, "w").write("fired"))

def handle_request(s):
    s.response = "pong"
"""))
    assert wait_until(marker.exists)
    assert d.connect().ask("ping") == "pong"


def test_a_timer_is_timed_from_the_call_not_from_the_start_of_the_pass(daemon, write_script):
    # The delay counted from when the loop pass began: a handler that had
    # worked 0.9 s before call_later(1) saw its timer fire 0.1 s later, and
    # on_start's call_later(2) after a 2 s connect fired at once.
    d = daemon(write_script("""
import time
from mpxd import call_later, send_response

def handle_request(s):
    time.sleep(float(s.request))                # work before the call
    asked = time.monotonic()

    def fire():
        s.response = f"after {time.monotonic() - asked:.2f}"
        send_response(s)
    call_later(0.5, fire)
"""))
    c = d.connect()
    c.send_lines("0.6")
    waited = float(c.readline().split()[1])
    assert waited >= 0.5, waited


def test_cancelled_timers_do_not_pile_up():
    # kv.py's EXPIRE cancels a key's timer and starts another: a client
    # repeating "EXPIRE k 3600" used to grow the heap by one per line, for
    # an hour, since cancelled timers left it only on reaching the top.
    heap = TimerHeap()
    keeper = heap.add(5.0, lambda: "keeper")
    timer = heap.add(3600.0, lambda: "expire k")
    for _ in range(10_000):
        timer.cancel()
        timer = heap.add(3600.0, lambda: "expire k")
    assert len(heap) < 2 * TimerHeap.COMPACT_FROM + 2
    keeper.cancel()
    assert heap.next_deadline() == 3600.0
    assert _run(heap, 3600.0) == ["expire k"]
    assert len(heap) == 0 and heap.next_deadline() is None


def test_a_cancel_from_another_thread_leaves_the_heap_to_the_loop():
    # A run_in_thread job cancelling its timeout timer rebuilt the heap from
    # its own thread, under a loop that might be popping from it.
    handed_over = []
    heap = TimerHeap(defer=handed_over.append)
    keeper = heap.add(1.0, lambda: "keeper")
    timers = [heap.add(2.0 + i, lambda: "cancelled") for i in range(3 * TimerHeap.COMPACT_FROM)]
    heap_list = heap._heap
    snapshot = list(heap_list)
    thread = threading.Thread(target=lambda: [t.cancel() for t in timers])
    thread.start()
    thread.join()
    assert all(t.cancelled for t in timers)         # stopped at once...
    assert heap_list == snapshot and heap._dead == 0    # ...the heap untouched
    assert len(handed_over) == len(timers)
    for bookkeeping in handed_over:                 # the loop's thread does it
        bookkeeping()
    assert len(heap) < TimerHeap.COMPACT_FROM and heap._dead < TimerHeap.COMPACT_FROM
    assert _run(heap, 1000.0) == ["keeper"]
    keeper.cancel()


def test_a_job_may_cancel_a_timer(write_script):
    from mpxd.testing import Harness
    with Harness(write_script("""
import mpxd

def handle_request(s):
    timer = mpxd.call_later(5, mpxd.close_session, s)
    mpxd.run_in_thread(timer.cancel)        # from the job's thread
    s.response = "started"
""")) as h:
        c = h.connect()
        assert c.send("go") == ["started"]
        h.run_threads()
        h.advance(10)
        assert not c.closed and h.errors == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.booleans()), max_size=400))
def test_rebuilding_the_heap_keeps_every_live_timer_in_order(plan):
    heap = TimerHeap()
    live = []
    for when, cancel in plan:
        timer = heap.add(float(when), lambda value=(when, len(live)): value)
        if cancel:
            timer.cancel()
        else:
            live.append((when, len(live)))
    assert _run(heap, 50.0) == sorted(live)
