"""The handler API beyond requests (mpxd/__init__.py, mpxd/core.py), in the real daemon:
run_in_thread, call_soon_threadsafe, sessions(), set_idle_timeout and the
script hooks on_start, on_stop and on_reload."""

from __future__ import annotations

import select
import signal
import subprocess
import time

import pytest

from conftest import MPXD, LineClient, cpu_seconds, wait_until
from spawn import mpxd  # noqa: F401 - a fixture

THREAD_SCRIPT = """
import threading, time
from mpxd import run_in_thread, call_soon_threadsafe, send_response

def _say(s, text):
    where = "loop" if threading.current_thread() is threading.main_thread() else "thread"
    s.response = f"{text} on {where}"
    send_response(s)

def _upper(text):
    return text.upper()

def _fail(text):
    raise ValueError(text)

def _got(s, result):
    if isinstance(result, BaseException):
        _say(s, f"error {type(result).__name__} {result}")
    else:
        _say(s, f"result {result}")

def handle_request(s):
    command, _, arg = s.request.partition(" ")
    if command == "upper":
        run_in_thread(_upper, arg, then=lambda r: _got(s, r))
    elif command == "fail":
        run_in_thread(_fail, arg, then=lambda r: _got(s, r))
    elif command == "fail-quietly":
        run_in_thread(_fail, arg)
        s.response = "started"
    elif command == "sleep":
        run_in_thread(time.sleep, float(arg), then=lambda r: _got(s, "slept"))
    elif command == "own-thread":
        def work():
            time.sleep(0.05)
            call_soon_threadsafe(_say, s, "from my thread")
        threading.Thread(target=work).start()
        s.response = "thread started"
    else:
        s.response = "pong"
"""


def test_run_in_thread_hands_the_result_to_then_on_the_loop_thread(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    assert c.ask("upper hello") == "result HELLO on loop"


def test_run_in_thread_hands_an_exception_to_then(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    assert c.ask("fail nope") == "error ValueError nope on loop"
    assert c.ask("ping") == "pong"


def test_a_failing_job_without_then_is_logged_and_nothing_stops(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    assert c.ask("fail-quietly disk gone") == "started"
    d.expect_log(r"ERROR run_in_thread _fail failed")
    d.expect_log(r"ValueError: disk gone")
    assert c.ask("ping") == "pong"


def test_a_blocking_job_does_not_stall_other_sessions(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    slow, quick = d.connect(), d.connect()
    slow.send_lines("sleep 2")
    assert quick.ask("upper x") == "result X on loop"
    assert quick.ask("ping") == "pong"
    ready, _, _ = select.select([slow.sock], [], [], 0)
    assert not ready                            # the slow answer is still to come
    assert slow.readline() == "result slept on loop"


def test_a_job_holds_a_half_closed_session_open_until_then_answers(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    c.send_lines("sleep 0.2", "upper late")     # as `printf ... | nc -N` does
    c.shutdown_write()
    answers = c.read_all().decode().splitlines()   # in the order the jobs finish
    assert sorted(answers) == ["result LATE on loop", "result slept on loop"]
    d.expect_log(r"closed: eof, [\d.]+s, 2 requests")


def test_a_half_closed_session_waiting_for_its_job_costs_no_cpu(daemon, write_script):
    # Its socket, at EOF, stayed in the poll set for reading: every poll
    # returned at once, 100% CPU for as long as the job ran (for ever, if it hung).
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    c.send_lines("sleep 1.5")
    c.shutdown_write()
    time.sleep(0.2)
    before = cpu_seconds(d.pid)
    time.sleep(1)
    assert cpu_seconds(d.pid) - before < 0.3
    assert c.read_all().decode() == "result slept on loop\n"
    d.expect_log(r"closed: eof, [\d.]+s, 1 requests")


def test_call_soon_threadsafe_from_a_thread_the_handler_started(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    assert c.ask("own-thread") == "thread started"
    assert c.readline() == "from my thread on loop"


POLLER = """
import threading, time
from mpxd import call_soon_threadsafe
{slow}
state = {{"count": 0}}

def bump():
    state["count"] += 1

def poll():
    while True:
        call_soon_threadsafe(bump)      # from a thread of the script's own
        time.sleep(0.01)

def on_start(server):
    threading.Thread(target=poll, name="poller", daemon=True).start()

def on_reload(old):
    global state
    state = old.state                   # the thread goes on bumping the same dict

def handle_request(s):
    s.response = str(state["count"])
"""


def test_call_soon_threadsafe_works_while_a_hup_imports_the_new_version(
        mpxd, write_script):  # noqa: F811
    # "From any thread" failed for the import's duration: no core was
    # current, and the script's thread got a RuntimeError and died.
    path = write_script(POLLER.format(slow=""))
    d = mpxd(["--port", "0", "--host", "127.0.0.1", path])
    c = LineClient(("127.0.0.1", d.wait_listening()))
    assert wait_until(lambda: int(c.ask("x")) > 5)
    write_script(POLLER.format(slow="time.sleep(0.5)      # a heavy import"))
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded ")
    before = int(c.ask("x"))
    assert wait_until(lambda: int(c.ask("x")) > before + 5)   # the thread lives on
    assert "failed" not in d.log(), d.log()
    assert d.stop() == 0


def test_a_stop_is_not_held_up_by_a_job_that_never_returns(daemon, write_script):
    d = daemon(write_script(THREAD_SCRIPT))
    c = d.connect()
    c.send_lines("sleep 600")
    c.close()
    assert d.stop(timeout=10) == 0              # not after 600 s


POOL_SCRIPT = """
import threading
from mpxd import run_in_thread, send_response

lock = threading.Lock()
running = {"now": 0, "peak": 0, "done": 0}
go = threading.Event()

def _job():
    with lock:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
    go.wait(10)
    with lock:
        running["now"] -= 1

def _finished(s, result):
    running["done"] += 1
    s.response = f"done {running['done']}"
    send_response(s)

def _fail_in_then(result):
    raise RuntimeError("then went wrong")

def handle_request(s):
    command, _, arg = s.request.partition(" ")
    if command == "start":
        for _ in range(int(arg)):
            run_in_thread(_job, then=lambda r: _finished(s, r))
        s.response = "started"
    elif command == "peak":
        s.response = f"peak {running['peak']}"
    elif command == "go":
        go.set()
        s.response = "going"
    elif command == "bad-then":
        run_in_thread(int, "1", then=_fail_in_then)
        s.response = "started"
    else:
        s.response = "pong"
"""


@pytest.mark.parametrize("option, size", [((), 4), (("--threads", "2"), 2)])
def test_threads_sets_how_many_jobs_run_at_once(daemon, write_script, option, size):
    d = daemon(write_script(POOL_SCRIPT), *option)
    c = d.connect()
    assert c.ask("start 6") == "started"
    assert wait_until(lambda: c.ask("peak") == f"peak {size}")
    time.sleep(0.3)                             # the jobs held back stay held back
    assert c.ask("peak") == f"peak {size}"
    assert c.ask("go") == "going"
    assert sorted(c.readlines(6)) == sorted(f"done {n}" for n in range(1, 7))


def test_an_exception_in_then_is_logged_and_the_loop_carries_on(daemon, write_script):
    d = daemon(write_script(POOL_SCRIPT))
    c, other = d.connect(), d.connect()
    assert c.ask("bad-then") == "started"
    d.expect_log(r"the then callback of run_in_thread \S+ failed for session \d+ ")
    d.expect_log(r"RuntimeError: then went wrong")
    assert other.ask("ping") == "pong"
    assert c.ask("start 1") == "started"        # the pool still works
    assert c.ask("go") == "going"
    assert c.readline() == "done 1"


SESSIONS_SCRIPT = """
from mpxd import sessions, send_response

def handle_request(s):
    command, _, arg = s.request.partition(" ")
    if command == "all":
        sent = 0
        for other in sessions():
            other.response = f"all: {arg}"
            sent += send_response(other)
        s.response = f"sent to {sent}"
    elif command == "idle":
        s.set_idle_timeout(None if arg == "off" else float(arg))
        s.response = f"idle {arg}"
    else:
        s.response = "pong"
"""


def test_sessions_lists_every_open_session_for_a_broadcast(daemon, write_script):
    d = daemon(write_script(SESSIONS_SCRIPT))
    clients = [d.connect() for _ in range(3)]
    gone = d.connect()
    for c in clients + [gone]:
        assert c.ask("ping") == "pong"          # accepted and served
    gone.close()
    d.expect_log(r"closed: eof")
    clients[0].send_lines("all hello")
    assert clients[0].readlines(2) == ["all: hello", "sent to 3"]
    assert clients[1].readline() == "all: hello"
    assert clients[2].readline() == "all: hello"


def test_set_idle_timeout_closes_only_that_session(daemon, write_script):
    d = daemon(write_script(SESSIONS_SCRIPT))
    sleepy, busy = d.connect(), d.connect()
    assert sleepy.ask("idle 0.3") == "idle 0.3"
    assert sleepy.read_all() == b""             # the server closed it
    d.expect_log(r"closed: timeout")
    assert busy.ask("ping") == "pong"


def test_set_idle_timeout_none_overrides_the_idle_timeout_option(daemon, write_script):
    d = daemon(write_script(SESSIONS_SCRIPT), "--idle-timeout", "0.3")
    keeper, default = d.connect(), d.connect()
    assert keeper.ask("idle off") == "idle off"
    assert default.ask("ping") == "pong"
    assert default.read_all() == b""            # --idle-timeout still applies here
    assert keeper.ask("ping") == "pong"         # but not here


def test_on_start_and_on_stop_run_once_around_the_service(daemon, write_script, tmp_path):
    log = tmp_path / "hooks.log"
    d = daemon(write_script(f"""
import os

def _note(text):
    with open({str(log)!r}, "a") as f:
        f.write(text + "\\n")

def on_start(server):
    _note(f"start {{os.getpid()}}")
    server.call_later(0, _note, "timer from on_start")

def on_stop(server):
    _note(f"stop {{len(server.sessions())}} open")

def handle_request(s):
    s.response = "pong"
"""))
    assert wait_until(lambda: log.exists() and "timer" in log.read_text())
    assert d.connect().ask("ping") == "pong"
    assert d.stop() == 0
    assert log.read_text().splitlines() == [
        f"start {d.pid}", "timer from on_start", "stop 0 open"]


def test_on_stopping_says_goodbye_before_a_stop_closes_the_sessions(daemon, write_script):
    d = daemon(write_script("""
from mpxd import send_response, sessions

def on_stopping(server):
    for s in sessions():
        s.response = f"bye {s.id}, {len(server.sessions())} open"
        send_response(s)

def handle_request(s):
    s.response = "pong"
"""))
    a, b = d.connect(), d.connect()
    assert a.ask("ping") == "pong" and b.ask("ping") == "pong"
    assert d.stop() == 0
    assert a.read_all() == b"bye 1, 2 open\n"
    assert b.read_all() == b"bye 2, 2 open\n"


FAILING_ON_START = """
def on_start(server):
    raise ConnectionError("database unreachable")

def on_stop(server):
    print("on_stop ran")

def handle_request(s):
    s.response = "pong"
"""


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_a_failing_on_start_stops_start_up_with_status_1(mpxd, write_script, workers):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", *workers,
              write_script(FAILING_ON_START)])
    assert m.wait() == 1
    log = m.log()
    assert "ConnectionError: database unreachable" in log
    assert "on_start failed" in log and "not serving" in log
    assert "listening on" not in log
    assert "on_stop ran" not in log                  # on_start's work is not there


def test_a_failing_on_start_under_daemon_fails_the_starting_command(tmp_path, write_script):
    pidfile = tmp_path / "mpxd.pid"
    result = subprocess.run(
        MPXD + ["--daemon", "--port", "0", "--host", "127.0.0.1", "--pidfile", str(pidfile),
                "--log-file", str(tmp_path / "mpxd.log"), write_script(FAILING_ON_START)],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "on_start failed" in result.stderr
    assert not pidfile.exists()


RELOAD_V1 = """
count = 0

def handle_request(s):
    global count
    count += 1
    s.response = f"v1 {count}"
"""

RELOAD_V2 = """
count = 0

def on_reload(old_module):
    global count
    count = old_module.count

def handle_request(s):
    global count
    count += 1
    s.response = f"v2 {count}"
"""


def test_on_reload_carries_state_over_a_hup(daemon, write_script):
    path = write_script(RELOAD_V1)
    d = daemon(path)
    c = d.connect()
    assert [c.ask("x") for _ in range(3)] == ["v1 1", "v1 2", "v1 3"]
    write_script(RELOAD_V2)
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    assert c.ask("x") == "v2 4"                 # same session, state carried over


def test_a_failing_on_reload_keeps_the_old_version(daemon, write_script):
    path = write_script(RELOAD_V1)
    d = daemon(path)
    c = d.connect()
    assert c.ask("x") == "v1 1"
    write_script(RELOAD_V2.replace("count = old_module.count", "count = old_module.missing"))
    d.signal(signal.SIGHUP)
    d.expect_log(r"on_reload failed")
    d.expect_log(r"reload failed, still serving the previous version")
    assert c.ask("x") == "v1 2"


def test_a_timer_started_before_a_reload_keeps_running(daemon, write_script):
    source = """
from mpxd import call_every, send_response
VERSION = "{version}"
subscribers = []

def on_reload(old_module):
    subscribers.extend(old_module.subscribers)

def _push():
    for s in subscribers:
        s.response = "push"
        send_response(s)

def handle_request(s):
    if s.request == "sub":
        subscribers.append(s)
        call_every(0.05, _push)
    s.response = VERSION
"""
    path = write_script(source.format(version="v1"))
    d = daemon(path)
    c = d.connect()
    assert c.ask("sub") == "v1"
    assert c.readline() == "push"
    write_script(source.format(version="v2"))
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    c.send_lines("version?")
    deadline = time.monotonic() + 5
    while (line := c.readline()) == "push" and time.monotonic() < deadline:
        pass
    assert line == "v2"
    assert c.readline() == "push"               # the old module's timer goes on
