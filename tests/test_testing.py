"""mpxd.testing: the Harness (fake edge, fake clock) and the pytest plugin's fixtures."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mpxd import core as core_module
from mpxd.script import ScriptError
from mpxd.testing import Harness, cli_args, make_config
from mpxd.testing.harness import OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTER = os.path.join(ROOT, "handlers", "counter.py")

ECHO = """
def handle_request(s):
    s.response = s.request
"""

# Records every handle_close so tests can count calls per session.
LIFECYCLE = """
from mpxd import close_session, send_response

closed = []
stopped = []


def handle_open(s):
    s.handle = {"n": 0}
    s.response = f"hello {s.peer[0]}"


def handle_request(s):
    s.handle["n"] += 1
    if s.request == "quit":
        s.response = "bye"
        close_session(s)
    elif s.request == "boom":
        s.response = "never sent"
        raise ValueError("boom on purpose")
    elif s.request == "half":
        s.response = "sent before the error"
        send_response(s)
        raise ValueError("after a send")
    else:
        s.response = f"{s.handle['n']}:{s.request}"


def handle_close(s):
    closed.append((s.id, s.handle["n"] if s.handle else None))


def on_stop(core):
    stopped.append(True)
"""


@pytest.fixture
def harness(write_script):
    """Factory for harnesses of inline scripts; closes them after the test."""
    made = []

    def make(source: str, name: str = "handler.py", **options) -> Harness:
        h = Harness(write_script(source, name), **options)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


# ------------------------------------------------------------- requests


def test_counter_answers_each_line_through_the_fixture(mpxd_harness):
    c = mpxd_harness(COUNTER).connect()
    assert c.send("2") == ["2"]
    assert c.send("3") == ["5"]
    assert c.send(["1", "x", "4 global"]) == ["6", "0", "4"]


def test_the_issue_example_as_written_with_a_path_relative_to_the_cwd(
        mpxd_harness, monkeypatch):
    monkeypatch.chdir(ROOT)         # relative paths mean what they mean to mpxd
    c = mpxd_harness("handlers/counter.py").connect()
    assert c.send("2") == ["2"]
    monkeypatch.chdir(os.path.join(ROOT, "tests"))
    with pytest.raises(ScriptError, match="tests/handlers/counter.py: no such file"):
        mpxd_harness("handlers/counter.py")


def test_counter_sessions_have_own_state_and_share_globals(mpxd_harness):
    h = mpxd_harness(COUNTER)
    a, b = h.connect(), h.connect()
    assert a.send("5") == ["5"]
    assert b.send("1") == ["1"]
    assert a.send("2 global") == ["2"]
    assert b.send("3 global") == ["5"]
    assert h.module.global_counter == 5
    assert [s.id for s in h.sessions] == [a.session.id, b.session.id]


def test_raw_bytes_with_partial_lines_go_through_the_framing(harness):
    c = harness(ECHO).connect()
    assert c.send(b"ab") == []
    assert c.send(b"c\nde") == ["abc"]
    assert c.send(b"\r\n") == ["de"]
    assert c.send(b"x\ry\n") == ["x\ry"]
    assert c.received() == ["abc", "de", "x\ry"]


def test_invalid_utf8_round_trips(harness):
    c = harness(ECHO).connect()
    c.send(b"\xff\xfecaf\xc3\xa9\n")
    assert c.output == b"\xff\xfecaf\xc3\xa9\n"
    assert c.received() == ["\udcff\udcfecaf\u00e9"]


def test_new_returns_only_lines_not_yet_returned(harness):
    h = harness("""
from mpxd import call_later, send_response

def handle_request(s):
    s.response = "now"
    def later():
        s.response = "later"
        send_response(s)
    call_later(1, later)
""")
    c = h.connect()
    assert c.send("x") == ["now"]
    assert c.new() == []
    h.advance(1)
    assert c.new() == ["later"]
    assert c.new() == []
    assert c.received() == ["now", "later"]


def test_received_keeps_broadcasts_and_timer_output_in_arrival_order(harness):
    h = harness("""
from mpxd import call_later, send_response, sessions

def handle_request(s):
    for other in sessions():
        if other is not s:
            other.response = "from " + str(s.id)
            send_response(other)
    def later():
        s.response = "later"
        send_response(s)
    call_later(1, later)
    s.response = "sent"
""")
    a, b = h.connect(), h.connect()
    assert a.send("x") == ["sent"]
    assert b.send("y") == ["sent"]
    h.advance(1)
    assert a.received() == ["sent", f"from {b.session.id}", "later"]
    assert b.received() == [f"from {a.session.id}", "sent", "later"]
    assert a.new() == [f"from {b.session.id}", "later"]


def test_final_line_without_lf_is_handled_at_eof(harness):
    c = harness(ECHO).connect()
    assert c.send(b"one\ntwo") == ["one"]
    assert c.close() == ["two"]
    assert c.closed and c.close_reason == "eof"


def test_embedded_newlines_make_several_lines_and_empty_sends_nothing(harness):
    c = harness("""
def handle_request(s):
    s.response = {"two": "a\\nb\\n", "none": ""}.get(s.request, s.request)
""").connect()
    assert c.send(["two", "none", "x"]) == ["a", "b", "x"]
    assert c.output == b"a\nb\nx\n"


def test_crlf_eol_on_output_and_crlf_input(harness):
    c = harness("""
def handle_request(s):
    s.response = s.request + "\\n" + s.request.upper()
""", eol="crlf").connect()
    assert c.send(b"ab\r\n") == ["ab", "AB"]
    assert c.output == b"ab\r\nAB\r\n"


# ---------------------------------------------------------- session life


def test_greeting_from_handle_open_comes_first(harness):
    h = harness(LIFECYCLE)
    c = h.connect(peer=("203.0.113.5", 4242))
    assert c.peer == ("203.0.113.5", 4242)
    assert c.new() == ["hello 203.0.113.5"]
    assert c.send("a") == ["1:a"]
    assert c.received() == ["hello 203.0.113.5", "1:a"]


def test_a_peer_that_is_no_address_is_refused_and_a_unix_one_taken(harness):
    # "10.0.0.1" alone made s.peer[0] "1" in the handler, without a word.
    h = harness(LIFECYCLE)
    for wrong in ("10.0.0.1", ("10.0.0.1",), ("10.0.0.1", "80"), ["10.0.0.1", 80]):
        with pytest.raises(TypeError, match=r"h.connect needs peer=\(host, port\)"):
            h.connect(peer=wrong)
    from mpxd.unix import UnixPeer
    c = h.connect(peer=UnixPeer(4242, 1000, 1000))
    assert c.peer.uid == 1000
    assert c.send("a") == ["1:a"]


def test_send_returns_its_own_answers_and_new_the_rest(harness):
    h = harness(LIFECYCLE)
    c = h.connect()
    assert c.send("a") == ["1:a"]            # not the greeting that came before
    assert c.new() == ["hello 127.0.0.1"]
    assert c.send("b") == ["2:b"]
    assert c.new() == []


def test_connect_can_present_a_tls_client_identity(harness):
    h = harness("""
def handle_open(s):
    s.response = f"hello {s.tls_peer}"

def handle_request(s):
    pass
""")
    assert h.connect(tls_peer="CN=alice").new() == ["hello CN=alice"]
    assert h.connect().new() == ["hello None"]


def test_close_session_writes_queued_output_and_drops_later_lines(harness):
    h = harness(LIFECYCLE)
    c = h.connect()
    c.new()
    assert c.send(["a", "quit", "b"]) == ["1:a", "bye"]
    assert c.closed and c.close_reason == "close_session"
    assert h.module.closed == [(c.session.id, 2)]
    assert c.session.closed
    with pytest.raises(BrokenPipeError):
        c.send("c")
    # A test's clean-up may close every client: as for a socket, a second
    # close is harmless.  It raised BrokenPipeError.
    assert c.close() == []
    c.reset()


def test_handler_exception_closes_that_session_only(harness):
    h = harness(LIFECYCLE)
    bad, good = h.connect(), h.connect()
    assert bad.send(["a", "boom", "b"]) == ["1:a"]
    assert bad.closed and bad.close_reason == "error"
    [(where, session, exc)] = h.errors
    assert where == "handle_request" and session is bad.session
    assert isinstance(exc, ValueError) and str(exc) == "boom on purpose"
    good.new()
    assert good.send("still here") == ["1:still here"]
    assert not good.closed


def test_handler_exceptions_are_logged_with_peer_request_and_traceback(harness, caplog):
    h = harness(LIFECYCLE)
    c = h.connect(peer=("203.0.113.5", 4242))
    with caplog.at_level(logging.INFO, logger="mpxd"):
        c.send("boom")
    messages = [r.getMessage() for r in caplog.records if r.name == "mpxd"]
    assert messages[0].startswith(
        f"handle_request failed for session {c.session.id} 203.0.113.5:4242 "
        f"on request 'boom':\nTraceback")
    assert messages[0].endswith("ValueError: boom on purpose")
    assert messages[1].startswith(f"session {c.session.id} 203.0.113.5:4242 closed: error,")


def test_a_clients_text_in_an_exception_message_cannot_forge_log_lines(harness, caplog):
    # The request was quoted, but the traceback's last line, the message,
    # went to the log raw: a client's CR, ANSI escapes and (through the
    # handler's own decoding) newlines with it.
    h = harness("""
def handle_request(s):
    raise ValueError("bad command: " + s.request.replace("|", "\\n"))
""")
    forged = "2026-12-01 12:00:00,000 mpxd[1] ERROR session 9 closed"
    with caplog.at_level(logging.ERROR, logger="mpxd"):
        h.connect().send(f"x\r|{forged}\x1b[2J\x9b")
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith(f"ValueError: bad command: x\\r\n    {forged}\\x1b[2J\\x9b")
    assert not any(line.startswith("2026") for line in message.splitlines())


def test_tracebacks_start_at_the_users_code(harness, caplog):
    # The loop's frames above the handler were the same every time.
    h = harness("""
import mpxd

def work(text):
    raise LookupError(text)

def handle_request(s):
    if s.request == "api":
        mpxd.call_later("soon", print)
    elif s.request == "job":
        mpxd.run_in_thread(work, "in a thread")
    else:
        raise ValueError("on purpose")
""")
    with caplog.at_level(logging.ERROR, logger="mpxd"):
        h.connect().send("x")
        h.connect().send("api")
        h.connect().send("job")
        h.run_threads()
    handler, api, job = [r.getMessage().split("\n") for r in caplog.records]
    assert handler[1] == "Traceback (most recent call last):"
    assert handler[2].endswith("handler.py\", line 13, in handle_request")
    assert not any("mpxd/core.py" in line for line in handler)
    # Frames of mpxd below the user's stay: they show where the call failed.
    assert api[2].endswith("line 9, in handle_request")
    assert "in as_seconds" in "\n".join(api)
    assert job[0] == "run_in_thread work failed:"
    assert job[2].endswith("line 5, in work")


def test_a_long_request_is_cut_in_the_error_log_line(harness, caplog):
    # A client sending 64 KiB lines that make the handler fail must not be
    # able to write 64 KiB log lines.
    h = harness("""
def handle_request(s):
    raise ValueError("no")
""")
    c = h.connect()
    with caplog.at_level(logging.ERROR, logger="mpxd"):
        c.send("x" * 10_000)
    [message] = [r.getMessage() for r in caplog.records if r.name == "mpxd"]
    assert f"on request {'x' * 200!r}... (10000 characters):" in message
    assert len(message) < 1000


def test_output_sent_before_an_exception_is_still_written(harness):
    h = harness(LIFECYCLE)
    c = h.connect()
    c.new()
    assert c.send("half") == ["sent before the error"]
    assert c.closed and len(h.errors) == 1


def test_exception_in_handle_open_closes_the_session(harness):
    h = harness("""
def handle_open(s):
    raise RuntimeError("no greeting")

def handle_request(s):
    s.response = "unreachable"
""")
    c = h.connect()
    assert c.closed and c.close_reason == "error"
    assert [e[0] for e in h.errors] == ["handle_open"]


WRONG_TYPES = """
import sys
from mpxd import send_response


def handle_request(s):
    kind, _, value = s.request.partition(" ")
    if kind == "int":
        s.response = int(value)
    elif kind == "bytes":
        s.response = value.encode()
    elif kind == "none":
        s.response = None
    elif kind == "send-int":
        s.response = 7
        try:
            send_response(s)
        except TypeError as e:
            s.response = f"refused: {e}"
    elif kind == "exit":
        sys.exit(int(value))
    elif kind == "interrupt":
        raise KeyboardInterrupt
    else:
        s.response = f"ok {s.request}"
"""


@pytest.mark.parametrize("line, shown", [
    ("int 0", "not int: 0"),        # falsy: not silently dropped either
    ("int 42", "not int: 42"),
    ("bytes hi", "not bytes: b'hi' (decode bytes first, or build a str)"),
    ("none", "not NoneType: None"),
])
def test_a_response_that_is_not_a_str_is_a_handler_error(harness, line, shown):
    h = harness(WRONG_TYPES)
    bad, good = h.connect(), h.connect()
    assert bad.send(["first", line, "never handled"]) == ["ok first"]
    assert bad.closed and bad.close_reason == "error"
    [(where, session, exc)] = h.errors
    assert where == "handle_request" and session is bad.session
    assert isinstance(exc, TypeError)
    assert str(exc) == f"s.response must be a str, {shown}"
    assert good.send("still here") == ["ok still here"]


BROKEN_OBJECTS = """
from mpxd import send_response

class Broken:
    def __repr__(self):
        raise RuntimeError("repr boom")
    __str__ = __bool__ = __repr__

def handle_open(s):
    if s.peer[1] == 1:
        s.response = Broken()
    if s.peer[1] == 2:
        return Broken()

def handle_request(s):
    if s.request == "broken":
        s.response = Broken()
    elif s.request == "huge":
        s.response = list(range(10**6))
    elif s.request == "deleted":
        del s.response
    elif s.request == "send-broken":
        s.response = Broken()
        send_response(s)
    else:
        s.response = "ok " + s.request

def handle_close(s):
    if s.request == "bye":
        s.response = Broken()
"""


@pytest.mark.parametrize("line, shown", [
    ("broken", "not Broken: <Broken instance at 0x"),
    ("huge", "not list: [0, 1, 2, 3, 4, 5, ...]"),
    ("deleted", "'Session' object has no attribute 'response'"),
    ("send-broken", "not Broken: <Broken instance at 0x"),
])
def test_a_response_that_breaks_repr_or_is_gone_ends_its_session_only(harness, line, shown):
    # These used to stop the daemon: the repr for the log line raised
    # outside the handler's try, or reading s.response did.
    h = harness(BROKEN_OBJECTS)
    bad, good = h.connect(("127.0.0.1", 9)), h.connect(("127.0.0.1", 10))
    assert bad.send(["first", line, "never handled"]) == ["ok first"]
    assert bad.closed and bad.close_reason == "error"
    [(where, session, exc)] = h.errors
    assert where == "handle_request" and session is bad.session
    assert shown in str(exc)
    assert good.send("still here") == ["ok still here"]
    assert good.send("still") == ["ok still"]


def test_greetings_and_goodbyes_that_break_repr_end_their_session_only(harness, caplog):
    h = harness(BROKEN_OBJECTS)
    greeted = h.connect(("127.0.0.1", 1))
    assert greeted.closed and greeted.close_reason == "error"
    returned = h.connect(("127.0.0.1", 2))        # a warning, no greeting
    assert returned.send("hi") == ["ok hi"]
    assert "handle_open returned <Broken instance at 0x" in caplog.text
    returned.send("bye")
    returned.close()
    assert "handle_close set s.response to <Broken instance at 0x" in caplog.text
    assert h.connect().send("still") == ["ok still"]
    assert [where for where, _, _ in h.errors] == ["handle_open"]


def test_send_response_refuses_a_response_that_is_not_a_str(harness):
    h = harness(WRONG_TYPES)
    c = h.connect()
    assert c.send("send-int") == ["refused: s.response must be a str, not int: 7"]
    assert not c.closed and h.errors == []


def test_a_greeting_that_is_not_a_str_closes_the_session(harness):
    h = harness("""
def handle_open(s):
    s.response = 220

def handle_request(s):
    s.response = "unreachable"
""")
    c = h.connect()
    assert c.closed and c.close_reason == "error" and c.new() == []
    [(where, _session, exc)] = h.errors
    assert where == "handle_open" and "not int: 220" in str(exc)


def test_sys_exit_in_a_handler_ends_its_session_not_the_server(harness):
    # argparse and click exit on bad input: a client must not stop the daemon.
    h = harness(WRONG_TYPES)
    bad, good = h.connect(), h.connect()
    assert bad.send(["exit 2", "later"]) == []
    assert bad.closed and bad.close_reason == "error"
    [(where, _session, exc)] = h.errors
    assert where == "handle_request" and isinstance(exc, SystemExit) and exc.code == 2
    assert good.send("still here") == ["ok still here"]


def test_base_exceptions_other_than_interrupts_are_handler_errors(harness):
    # asyncio.CancelledError and GeneratorExit are BaseExceptions: they used
    # to escape the core, and the daemon died with a traceback.
    h = harness("""
import asyncio

def on_start(server):
    server.call_later(1, tick)

def tick():
    raise GeneratorExit("in a timer")

def handle_open(s):
    if s.peer[1] == 1:
        raise asyncio.CancelledError("in handle_open")

def handle_request(s):
    raise asyncio.CancelledError("in handle_request")
""")
    opened = h.connect(peer=("127.0.0.1", 1))
    assert opened.closed and opened.close_reason == "error"
    c = h.connect()
    assert c.send("x") == [] and c.closed
    h.advance(1)
    assert [(where, type(exc).__name__) for where, _s, exc in h.errors] == [
        ("handle_open", "CancelledError"), ("handle_request", "CancelledError"),
        ("timer tick", "GeneratorExit")]
    assert h.connect(peer=("127.0.0.1", 2)).send("y") == []      # still serving


def test_keyboard_interrupt_stops_a_test_run(harness):
    # In a test run ^C raises KeyboardInterrupt wherever the code is, a
    # handler included: it must stop pytest, not become a handler error.
    # (The daemon, where SIGINT drains instead, treats it as one.)
    h = harness(WRONG_TYPES)
    c = h.connect()
    with pytest.raises(KeyboardInterrupt):
        c.send("interrupt now")
    assert h.errors == []


def test_sys_exit_in_a_timer_is_logged_and_the_server_carries_on(harness):
    h = harness("""
import sys
import mpxd

def stop():
    sys.exit(1)

def handle_request(s):
    mpxd.call_later(1, stop)
    s.response = "scheduled"
""")
    c = h.connect()
    assert c.send("go") == ["scheduled"]
    h.advance(1)
    assert [type(e[2]) for e in h.errors] == [SystemExit]
    assert c.send("again") == ["scheduled"] and not c.closed


UNENCODABLE = """
import json

handled = []


def handle_request(s):
    handled.append(s.request)
    # A JSON string escape can make a lone surrogate, which UTF-8 cannot encode.
    s.response = json.loads(s.request) if s.request.startswith('"') else "ok " + s.request
"""


def test_a_response_utf8_cannot_encode_closes_the_session_after_the_ones_before(harness):
    h = harness(UNENCODABLE)
    bad, good = h.connect(), h.connect()
    # one read: the answers before the bad one still go out, in order, and
    # the lines after it are not handled, as after a handler's exception
    assert bad.send(b'a\nb\n"\\ud800 lone"\nc\n') == ["ok a", "ok b"]
    assert bad.closed and bad.close_reason == "error"
    assert h.module.handled == ["a", "b", '"\\ud800 lone"']
    [(where, session, exc)] = h.errors
    assert where == "handle_request" and session is bad.session
    assert isinstance(exc, UnicodeEncodeError) and "lone surrogate" in str(exc)
    assert good.send('"fine \\u00e9"') == ["fine \u00e9"]


def test_send_response_refuses_a_response_utf8_cannot_encode(harness):
    h = harness("""
from mpxd import send_response, call_later

def handle_request(s):
    s.response = "\\ud800"
    call_later(0, later, s)
    if s.request == "now":
        send_response(s)        # raises: a handler error, the session closes
    s.response = "ok"

def later(s):
    s.response = "\\udfff"
    try:
        send_response(s)
    except UnicodeEncodeError:
        s.response = "refused"
        send_response(s)
""")
    c = h.connect()
    assert c.send("later") == ["ok", "refused"] and not c.closed
    assert c.send("now") == [] and c.closed
    [(where, _, exc)] = h.errors
    assert where == "handle_request" and isinstance(exc, UnicodeEncodeError)


def test_the_handler_api_refuses_calls_from_other_threads(harness):
    # From a thread, send_response used to queue the answer unseen until
    # the loop next woke up, racing it meanwhile.
    h = harness("""
import threading
import mpxd

refusals = []

def handle_request(s):
    def from_a_thread():
        for call in (lambda: mpxd.send_response(s), lambda: mpxd.close_session(s),
                     lambda: mpxd.call_later(1, print), lambda: mpxd.call_every(1, print),
                     lambda: mpxd.run_in_thread(print), lambda: s.set_idle_timeout(5),
                     lambda: mpxd.sessions()):
            try:
                call()
            except RuntimeError as e:
                refusals.append(str(e))
    thread = threading.Thread(target=from_a_thread)
    thread.start()
    thread.join()
    s.response = "done"
""")
    c = h.connect()
    assert c.send("go") == ["done"] and not c.closed
    assert [r.split(" called")[0] for r in h.module.refusals] == \
        ["send_response", "close_session", "call_later", "call_every", "run_in_thread",
         "set_idle_timeout", "sessions"]
    assert "call_soon_threadsafe" in h.module.refusals[0]


@pytest.mark.parametrize("option, value, said", [
    ("max_line", 0, "as by mpxd --max-line: 0 is not in the range x>=1"),
    ("max_output", -1, "as by mpxd --max-output: -1 is not in the range x>=1"),
    ("threads", 0, "as by mpxd --threads: 0 is not in the range 1<=x<=256"),
    ("idle_timeout", float("nan"), "as by mpxd --idle-timeout: must be 0 or more seconds"),
    ("drain_timeout", float("inf"), "as by mpxd --drain-timeout: must be 0 or more seconds"),
    ("low_water", -1, "it must be 0 or more, and finite"),
])
def test_option_values_the_command_line_refuses_are_refused(write_script, option, value, said):
    # The harness used to run the core with them (max_line=-5 cut every line).
    with pytest.raises(ValueError) as caught:
        Harness(write_script(ECHO), **{option: value})
    assert str(caught.value).startswith(f"{option}={value!r} is refused")
    assert said in str(caught.value)


def test_peer_reset_drops_output_and_calls_handle_close_once(harness):
    h = harness(LIFECYCLE)
    c = h.connect()
    c.send("a")
    c.reset()
    assert c.closed and c.close_reason == "reset"
    assert h.module.closed == [(c.session.id, 1)]
    assert c.close() == []                      # closed already: nothing to do


ASSIGNS = """
def handle_request(s):
    name, _, value = s.request.partition(" ")
    try:
        setattr(s, name, value)
    except AttributeError as e:
        s.response = str(e)
    else:
        s.response = f"{name} is {getattr(s, name)!r}"
"""


@pytest.mark.parametrize("name, hint", [
    ("id", ""), ("peer", ""), ("tls_peer", ""),
    ("closed", "; to close the session, call s.close() (close_session(s))")])
def test_the_servers_facts_about_a_session_cannot_be_assigned(harness, name, hint):
    # s.id = 5 made the harness fail with KeyError and the daemon drop
    # another session from its table; s.closed = True left a session that
    # dropped its input but never closed.
    h = harness(ASSIGNS)
    c = h.connect()
    before = (c.session.id, c.session.peer, c.session.closed, c.session.tls_peer)
    assert c.send(f"{name} 5") == [f"s.{name} is set by mpxd and cannot be assigned{hint}; "
                                   f"keep your own per-session state in s.handle"]
    assert (c.session.id, c.session.peer, c.session.closed, c.session.tls_peer) == before
    assert c.send("handle mine") == ["handle is 'mine'"]
    assert not c.closed and h.errors == []



def test_an_attribute_of_its_own_on_a_session_gets_a_hint_in_the_log(harness, caplog):
    h = harness("""
def handle_request(s):
    s.count = 1
""")
    c = h.connect()
    c.send("x")
    assert c.closed
    assert "AttributeError: 'Session' object has no attribute 'count'\n(a session has " \
           "only the attributes mpxd gives it: keep your own per-session state in " \
           "s.handle, as in s.handle = {'count': 0})" in caplog.text


RETURNS = """
def handle_open(s):
    if s.peer[1] == 1:
        return "hello"

def handle_request(s):
    if s.request == "set":
        s.response = "set"
        return True                 # harmless: the answer is in s.response
    return s.request.upper()
"""


@pytest.mark.parametrize("peer, line, said", [
    (("127.0.0.1", 1), "x", "handle_open returned 'hello'"),
    (("127.0.0.1", 2), "x", "handle_request returned 'X'"),
])
def test_an_answer_returned_instead_of_set_is_warned_about_once(harness, caplog,
                                                                 peer, line, said):
    # Nothing is sent either way: mpxd sends s.response.  It used to be silent.
    h = harness(RETURNS)
    with caplog.at_level(logging.WARNING, logger="mpxd"):
        c = h.connect(peer=peer)
        assert c.send(line) == [] and c.send("set") == ["set"] and c.send(line) == []
    warnings = [r.getMessage() for r in caplog.records if "returned" in r.getMessage()]
    assert warnings == [f"{said} and left s.response empty: mpxd sends s.response, "
                        f"not what a handler returns (write s.response = ...); said "
                        f"once per script version"]


def test_a_returned_true_beside_a_set_response_is_not_warned_about(harness, caplog):
    h = harness(RETURNS)
    with caplog.at_level(logging.WARNING, logger="mpxd"):
        assert h.connect(peer=("127.0.0.1", 2)).send(["set"] * 3) == ["set"] * 3
    assert "returned" not in caplog.text


def test_a_coroutine_returned_by_a_plain_wrapper_is_named_as_such(harness, caplog,
                                                                 recwarn):
    # A plain def around an async one got the generic warning and Python's
    # "coroutine ... was never awaited", with no word that it is async.
    h = harness("""
async def real(s):
    s.response = "never"

def handle_request(s):
    return real(s)
""")
    with caplog.at_level(logging.WARNING, logger="mpxd"):
        assert h.connect().send(["a", "b"]) == []
    assert caplog.text.count("handle_request returned a coroutine, which mpxd never runs") == 1
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_return_values_are_checked_for_the_first_requests_only(harness):
    # After CHECKED_REQUESTS the handler is called directly: no cost per request.
    h = harness(ECHO)
    c = h.connect()
    c.send(["x"] * (core_module.CHECKED_REQUESTS - 1))
    assert h.core._handle_request != h.handlers.handle_request
    c.send("x")
    assert h.core._handle_request == h.handlers.handle_request
    h.reload()                                      # a new version is checked anew
    assert h.core._handle_request != h.handlers.handle_request


GOODBYE = """
seen = []

def handle_request(s):
    s.response = "ok " + s.request

def handle_close(s):
    seen.append(s.response)
    s.response = "bye"
"""


def test_a_response_set_in_handle_close_is_not_sent_and_said_once(harness, write_script,
                                                                  caplog):
    h = harness(GOODBYE)
    with caplog.at_level(logging.WARNING, logger="mpxd"):
        a, b = h.connect(), h.connect()
        assert a.send("x") == ["ok x"]
        assert a.close() == [] and b.close() == []
        assert h.module.seen == ["", ""]    # not the last request's answer
        said = [r.getMessage() for r in caplog.records if "handle_close set" in r.getMessage()]
        assert said == ["handle_close set s.response to 'bye', which is not sent: the "
                        "connection is closed by then (a goodbye goes out before "
                        "close_session); said once per script version"]
        h.reload()                          # the new version is told again
        h.connect().close()
        assert sum("handle_close set" in r.getMessage() for r in caplog.records) == 2


def test_eof_without_requests_still_calls_handle_close(harness):
    h = harness(LIFECYCLE)
    c = h.connect()
    assert c.close() == []
    assert c.new() == ["hello 127.0.0.1"]
    assert h.module.closed == [(c.session.id, 0)]


def test_close_shuts_down_every_session_and_runs_on_stop(write_script):
    h = Harness(write_script(LIFECYCLE))
    a, b = h.connect(), h.connect()
    a.send("x")
    h.close()
    assert a.closed and b.closed
    assert {a.close_reason, b.close_reason} == {"shutdown"}
    assert sorted(h.module.closed) == [(a.session.id, 1), (b.session.id, 0)]
    assert h.module.stopped == [True]
    h.close()                                   # idempotent
    with pytest.raises(RuntimeError):
        h.connect()


GOING_DOWN = """
from mpxd import send_response, sessions, close_session

said = []

def on_stopping(server):
    said.append(len(server.sessions()))
    for s in sessions():
        s.response = "server going down"
        send_response(s)

def handle_request(s):
    s.response = "ok"

def handle_close(s):
    said.append("closed")
"""


def test_on_stopping_says_goodbye_before_the_sessions_close(write_script):
    h = Harness(write_script(GOING_DOWN))
    a, b = h.connect(), h.connect()
    assert a.send("x") == ["ok"]
    h.close()
    assert a.new() == ["server going down"] and b.new() == ["server going down"]
    assert a.closed and a.close_reason == "shutdown"
    h.close()
    assert h.module.said == [2, "closed", "closed"]     # once, before any session closed
    assert h.errors == []


def test_a_failing_on_stopping_is_logged_and_the_stop_goes_on(write_script):
    h = Harness(write_script("""
def on_stopping(server):
    raise RuntimeError("no goodbye today")

def handle_request(s):
    s.response = "ok"
"""))
    c = h.connect()
    h.close()
    assert c.closed and c.close_reason == "shutdown"
    assert [what for what, _, _ in h.errors] == ["on_stopping"]


# ------------------------------------------------------------- framing limits


def test_line_too_long_gets_an_error_line_and_closes(harness):
    c = harness(ECHO, max_line=8).connect()
    assert c.send(b"12345678\n123456789\nnext\n") == ["12345678", "ERROR line too long"]
    assert c.closed and c.close_reason == "line too long"


def test_unterminated_line_past_max_line_is_refused_without_waiting_for_lf(harness):
    c = harness(ECHO, max_line=8).connect()
    assert c.send(b"1234") == []
    assert c.send(b"56789") == ["ERROR line too long"]
    assert c.closed


# --------------------------------------------------------------- timers


TIMERS = """
from mpxd import call_every, call_later, send_response

events = []


def handle_request(s):
    if s.request == "start":
        s.handle = call_every(1, tick, s)
        call_later(2.5, note, s, "half")
    elif s.request == "stop":
        s.handle.cancel()
    elif s.request == "chain":
        call_later(1, lambda: call_later(1, note, s, "chained"))


def tick(s):
    events.append("tick")
    s.response = "tick"
    send_response(s)


def note(s, what):
    events.append(what)
    s.response = what
    send_response(s)
"""


def test_advance_fires_timers_in_order_each_at_its_own_time(harness):
    h = harness(TIMERS)
    c = h.connect()
    c.send("start")
    h.advance(0.5)
    assert c.new() == []
    h.advance(3)
    assert c.new() == ["tick", "tick", "half", "tick"]
    assert h.now == 3.5
    c.send("stop")
    h.advance(10)
    assert c.new() == []


@pytest.mark.parametrize("seconds, error, said", [
    (-1, ValueError, "time only moves forward"),
    ("1", TypeError, "advance needs seconds, not '1'"),
    (float("nan"), ValueError, "finite number of seconds, not nan"),
    (float("inf"), ValueError, "finite number of seconds, not inf"),
])
def test_advance_refuses_what_is_not_a_forward_step_in_time(harness, seconds, error, said):
    # advance(inf) with a call_every running fired it for ever.
    h = harness("import mpxd\n"
                "def on_start(server): server.call_every(1, print)\n" + ECHO)
    with pytest.raises(error, match=said):
        h.advance(seconds)
    assert h.now == 0


@pytest.mark.parametrize("data", [123, None, [1, 2], ["ok", b"bytes"]])
def test_send_refuses_what_is_not_lines_or_bytes(harness, data):
    c = harness(ECHO).connect()
    with pytest.raises(TypeError, match="send takes a str .a line., a list of str"):
        c.send(data)
    assert c.send(("still", "works")) == ["still", "works"]


def test_timers_scheduled_by_timers_fire_within_one_advance(harness):
    h = harness(TIMERS)
    c = h.connect()
    c.send("chain")
    h.advance(1.9)
    assert c.new() == []
    h.advance(0.1)
    assert c.new() == ["chained"]


def test_timer_errors_are_recorded_and_the_server_carries_on(harness):
    h = harness("""
from mpxd import call_later

def handle_request(s):
    call_later(1, lambda: 1 / 0)
    s.response = "ok"
""")
    c = h.connect()
    c.send("x")
    h.advance(1)
    assert len(h.errors) == 1 and isinstance(h.errors[0][2], ZeroDivisionError)
    assert c.send("y") == ["ok"]


def test_a_timer_rescheduling_itself_at_the_same_instant_is_reported(harness):
    h = harness("""
from mpxd import call_later

spinning = True

def spin():
    if spinning:
        call_later(0, spin)

def handle_request(s):
    call_later(0, spin)
""")
    c = h.connect()
    with pytest.raises(RuntimeError, match="still busy"):
        c.send("go")
    h.module.spinning = False
    assert c.send("calm") == []


def test_idle_timeout_closes_quiet_sessions(harness):
    h = harness(LIFECYCLE, idle_timeout=5)
    c = h.connect()
    h.advance(4)
    c.send("a")                   # input at t=4 moves the deadline to t=9
    h.advance(4.9)
    assert not c.closed
    h.advance(0.1)
    assert c.closed and c.close_reason == "timeout"
    assert h.module.closed == [(c.session.id, 1)]


def test_a_session_waiting_for_a_thread_job_is_not_idle(harness):
    # lookup.py --idle-timeout 2: a 4 s lookup was closed unanswered at 2 s.
    h = harness("""
from mpxd import run_in_thread, send_response

def answer(s, result):
    s.response = result
    send_response(s)

def handle_request(s):
    run_in_thread(str.upper, s.request, then=lambda r: answer(s, r))
""", idle_timeout=2)
    c = h.connect()
    assert c.send("slow") == []
    h.advance(10)                   # the job still runs
    assert not c.closed
    h.run_threads()
    assert c.new() == ["SLOW"]
    h.advance(2)
    assert c.closed and c.close_reason == "timeout"


def test_output_alone_does_not_keep_a_session_from_its_idle_timeout(harness):
    # A ticker's output to a client that went away is no sign of life.
    h = harness("""
from mpxd import call_every, send_response

def handle_open(s):
    def tick():
        s.response = "tick"
        send_response(s)
    s.handle = call_every(1, tick)

def handle_close(s):
    s.handle.cancel()

def handle_request(s):
    pass
""", idle_timeout=5)
    c = h.connect()
    h.advance(4.5)
    assert not c.closed
    h.advance(1)
    assert c.closed and c.close_reason == "timeout"


def test_handlers_can_set_their_own_idle_timeout(harness):
    h = harness("""
def handle_request(s):
    s.set_idle_timeout(float(s.request))
""")
    c = h.connect()
    c.send("2")
    h.advance(1.5)
    assert not c.closed
    h.advance(0.5)
    assert c.closed and c.close_reason == "timeout"


def test_set_idle_timeout_refuses_nan_and_negative_seconds(harness):
    # A negative value turned the timeout off without a word, where
    # --idle-timeout -1 is refused; 0 is off, as for the option.
    h = harness("""
def handle_request(s):
    s.set_idle_timeout(float(s.request))
    s.response = "set"
""", idle_timeout=5)
    for bad in ("nan", "-1"):
        c = h.connect()
        assert c.send(bad) == []
        assert c.closed and c.close_reason == "error"
        assert f"not {bad}" in str(h.errors[-1][2])
    c = h.connect()
    assert c.send("0") == ["set"]
    h.advance(3600)
    assert not c.closed


def test_send_response_and_close_session_name_what_is_not_a_session(harness):
    # send_response(find(nick)) after that user left: mpxd's own
    # AttributeError said 'NoneType' object has no attribute '_core'.
    h = harness("""
from mpxd import close_session, send_response
def handle_request(s):
    if s.request == "send":
        send_response(None)
    close_session(s.request)
""")
    h.connect().send("send")
    h.connect().send("bob")
    assert [str(e) for _, _, e in h.errors] == ["send_response needs a session, not None",
                                                "close_session needs a session, not 'bob'"]
    assert all(type(e) is TypeError for _, _, e in h.errors)


MISUSED_API = """
import decimal
import mpxd

CALLS = {
    "later-str": lambda s: mpxd.call_later("1", print),
    "every-str": lambda s: mpxd.call_every("1", print),
    "later-not-callable": lambda s: mpxd.call_later(1, 5),
    "every-not-callable": lambda s: mpxd.call_every(1, None),
    "thread-not-callable": lambda s: mpxd.run_in_thread(5),
    "then-not-callable": lambda s: mpxd.run_in_thread(print, then="x"),
    "soon-not-callable": lambda s: mpxd.call_soon_threadsafe(None),
    "idle-str": lambda s: s.set_idle_timeout("5"),
    "later-decimal": lambda s: mpxd.call_later(decimal.Decimal("0.5"), mpxd.send_response, s),
}

def handle_request(s):
    try:
        CALLS[s.request](s)
    except TypeError as e:
        s.response = str(e)
    else:
        s.response = "accepted"
"""


@pytest.mark.parametrize("call, said", [
    ("later-str", "call_later needs a delay in seconds, not '1'"),
    ("every-str", "call_every needs an interval above 0, not '1'"),
    ("later-not-callable", "call_later needs a function to call, not 5"),
    ("every-not-callable", "call_every needs a function to call, not None"),
    ("thread-not-callable", "run_in_thread needs a function to call, not 5"),
    ("then-not-callable", "run_in_thread's then needs a function to call, not 'x'"),
    ("soon-not-callable", "call_soon_threadsafe needs a function to call, not None"),
    ("idle-str", "set_idle_timeout needs seconds or None, not '5'"),
])
def test_the_api_refuses_wrong_arguments_when_called_not_when_run(harness, call, said):
    # A timer of 5 failed only when it ran, and a delay of "1" failed with
    # "'>' not supported between instances of 'str' and 'float'".
    h = harness(MISUSED_API)
    c = h.connect()
    assert c.send(call) == [said]
    h.advance(2)
    h.run_threads()
    assert h.errors == [] and c.new() == []


def test_a_run_in_thread_refused_from_a_foreign_thread_is_no_job_to_wait_for(harness):
    # The harness tracked the job before the core refused it: every later
    # run_threads() then timed out waiting for a job that never existed.
    h = harness("""
import threading
import mpxd

def handle_request(s):
    refused = []
    def elsewhere():
        try:
            mpxd.run_in_thread(print)
        except RuntimeError as e:
            refused.append(e)
    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    s.response = f"refused {len(refused)}"
""")
    c = h.connect()
    assert c.send("x") == ["refused 1"]
    h.run_threads(timeout=2)            # nothing to wait for, as in the daemon


def test_any_number_is_a_delay(harness):
    h = harness(MISUSED_API)
    c = h.connect()
    assert c.send("later-decimal") == ["accepted"]
    h.advance(0.5)
    assert c.new() == ["accepted"]          # the response, sent once more by the timer
    assert h.errors == []


# --------------------------------------------------------------- threads


THREADS = """
import threading
from mpxd import run_in_thread, send_response

def work(text):
    if text == "fail":
        raise LookupError(text)
    return text.upper(), threading.current_thread().name

def handle_request(s):
    if s.request == "twice":
        run_in_thread(work, "one", then=lambda r: again(s, r))
        return
    run_in_thread(work, s.request, then=lambda r: reply(s, r))

def reply(s, result):
    s.response = repr(result) if isinstance(result, Exception) else " ".join(result)
    send_response(s)

def again(s, result):
    reply(s, result)
    run_in_thread(work, "two", then=lambda r: reply(s, r))
"""


def test_run_threads_completes_work_and_delivers_then_callbacks(harness):
    h = harness(THREADS)
    c = h.connect()
    assert c.send("abc") == []
    h.run_threads()
    [line] = c.new()
    assert line.startswith("ABC mpxd-worker")
    assert threading.current_thread().name not in line


def test_run_threads_passes_the_exception_to_then(harness):
    h = harness(THREADS)
    c = h.connect()
    c.send("fail")
    h.run_threads()
    assert c.new() == ["LookupError('fail')"]
    assert h.errors == []


def test_run_threads_follows_work_started_by_callbacks(harness):
    h = harness(THREADS)
    c = h.connect()
    c.send("twice")
    h.run_threads()
    assert [line.split()[0] for line in c.new()] == ["ONE", "TWO"]


def test_run_threads_delivers_in_the_order_the_work_finished(harness):
    h = harness("""
import threading
from mpxd import run_in_thread, send_response

second_done = threading.Event()

def first():
    assert second_done.wait(5)
    return "first"

def second():
    second_done.set()
    return "second"

def handle_request(s):
    for work in (first, second):
        run_in_thread(work, then=lambda result: reply(s, result))

def reply(s, result):
    s.response = result
    send_response(s)
""")
    c = h.connect()
    c.send("go")
    h.run_threads()
    assert c.new() == ["second", "first"]


def test_a_failing_job_without_then_is_an_error(harness):
    h = harness("""
from mpxd import run_in_thread

def fail():
    raise OSError("disk gone")

def handle_request(s):
    run_in_thread(fail)
    s.response = "started"
""")
    c = h.connect()
    assert c.send("x") == ["started"]
    h.run_threads()
    [(where, session, exc)] = h.errors
    assert where == "run_in_thread" and session is None and str(exc) == "disk gone"
    assert not c.closed


def test_results_wait_for_run_threads_however_fast_the_thread(harness):
    h = harness("""
import threading
from mpxd import run_in_thread, send_response

finished = threading.Event()

def work():
    finished.set()
    return "done"

def handle_request(s):
    run_in_thread(work, then=lambda result: reply(s, result))

def reply(s, result):
    s.response = result
    send_response(s)
""")
    c = h.connect()
    c.send("go")
    assert h.module.finished.wait(5)
    assert c.send("again") == []
    h.advance(60)
    assert c.new() == []
    h.run_threads()
    assert c.new() == ["done", "done"]


def test_call_soon_threadsafe_from_other_threads_arrives_in_run_threads(harness):
    h = harness("""
import threading
from mpxd import call_soon_threadsafe, send_response

def handle_request(s):
    def background():
        call_soon_threadsafe(answer, s, "from a thread")
    t = threading.Thread(target=background)
    t.start()
    t.join()

def answer(s, text):
    s.response = text
    send_response(s)
""")
    c = h.connect()
    assert c.send("go") == []
    h.run_threads()
    assert c.new() == ["from a thread"]


def test_a_failing_call_soon_threadsafe_callback_is_named_as_such(harness):
    # It was logged as "broken failed:", with nothing to say where it came from.
    h = harness("""
import threading
from mpxd import call_soon_threadsafe

def broken():
    raise ValueError("oops")

def handle_request(s):
    t = threading.Thread(target=call_soon_threadsafe, args=(broken,))
    t.start()
    t.join()
""")
    h.connect().send("go")
    h.run_threads()
    [(what, session, error)] = h.errors
    assert what == "call_soon_threadsafe broken" and session is None
    assert isinstance(error, ValueError)


def test_run_threads_gives_up_after_its_timeout(harness):
    release = threading.Event()
    h = harness("""
from mpxd import run_in_thread

def handle_request(s):
    run_in_thread(s.handle.wait)
""")
    c = h.connect()
    c.session.handle = release
    c.send("x")
    with pytest.raises(TimeoutError):
        h.run_threads(timeout=0.05)
    release.set()
    h.run_threads()


# ----------------------------------------------------------- backpressure


BIG = """
def handle_request(s):
    s.response = s.request * 10
"""


def test_a_client_that_does_not_read_pauses_its_input_until_it_drains(harness):
    h = harness(BIG, high_water=100, low_water=25)
    c = h.connect()
    c.pause_reading()
    assert c.send(["a" * 5] * 6) == []
    handled = c.session._requests
    assert c.session._paused and handled < 6
    c.send("b")                           # waits in the "kernel" meanwhile
    assert c.session._requests == handled
    lines = c.resume_reading()
    assert lines == ["a" * 50] * 6 + ["b" * 10]
    assert not c.session._paused


def test_one_line_per_read_past_the_high_water_mark_pauses_input_too(harness):
    # The mark was checked only before the next line of the same read: a
    # client sending one line per packet and reading nothing was never
    # paused, and its unsent output grew without bound.
    h = harness(BIG, high_water=100, low_water=25)
    c = h.connect()
    c.pause_reading()
    for _ in range(3):
        c.send("a" * 5)                   # 51 bytes of answer each
    assert c.session._paused and c.session._requests == 2   # 102 bytes > 100
    assert c.session._out_size == 102
    c.send("b")                           # waits in the "kernel" meanwhile
    assert c.session._requests == 2
    assert c.resume_reading() == ["a" * 50] * 3 + ["b" * 10]
    assert not c.session._paused


def test_output_past_max_output_closes_the_session(harness):
    h = harness("""
from mpxd import call_every, send_response

def handle_request(s):
    def flood():
        s.response = "x" * 1000
        send_response(s)
    call_every(1, flood)
""", max_output=4000)
    c = h.connect()
    c.pause_reading()
    c.send("go")
    h.advance(10)
    assert c.closed and c.close_reason == "output overflow"
    assert c.output == b""


# -------------------------------------------------------------- reload


V1 = """
def handle_request(s):
    s.handle = (s.handle or 0) + 1
    s.response = f"v1 {s.handle}"
"""

V2 = """
carried = None

def on_reload(old):
    global carried
    carried = old.__name__

def handle_request(s):
    s.handle = (s.handle or 0) + 1
    s.response = f"v2 {s.handle}"
"""


def test_reload_swaps_the_script_and_keeps_sessions(write_script):
    path = write_script(V1)
    with Harness(path) as h:
        c = h.connect()
        assert c.send("x") == ["v1 1"]
        old_name = h.module.__name__
        write_script(V2)
        h.reload()
        assert c.send("x") == ["v2 2"]
        assert h.module.carried == old_name
        assert h.core.reloads == 1


def test_a_broken_reload_keeps_the_old_script(write_script):
    path = write_script(V1)
    with Harness(path) as h:
        c = h.connect()
        write_script("def handle_request(s)\n")
        with pytest.raises(ScriptError, match="syntax error"):
            h.reload()
        assert c.send("x") == ["v1 1"]


def test_a_failing_on_reload_keeps_the_old_script(write_script):
    path = write_script(V1)
    with Harness(path) as h:
        c = h.connect()
        write_script(V2.replace("carried = old.__name__", "carried = old.missing"))
        with pytest.raises(ScriptError, match="on_reload failed"):
            h.reload()
        assert [e[0] for e in h.errors] == ["on_reload"]
        assert c.send("x") == ["v1 1"]


# -------------------------------------------------- loading and isolation


def test_a_broken_script_raises_script_error(write_script):
    with pytest.raises(ScriptError, match="does not define handle_request"):
        Harness(write_script("x = 1\n"))


def test_scheduling_at_import_fails_as_in_the_daemon(harness, write_script):
    harness(ECHO)                  # another running harness must not catch it
    with pytest.raises(ScriptError, match="no mpxd server runs this code"):
        Harness(write_script("import mpxd\nmpxd.call_later(1, print)\n"
                             "def handle_request(s): pass\n", "early.py"))


def test_scheduling_at_import_fails_on_reload_too(mpxd_harness, write_script):
    # A server runs during a reload; if the timer were taken then, the script
    # would serve until the next restart and then refuse to start.
    path = write_script(ECHO, "grows.py")
    h = mpxd_harness(path)
    c = h.connect()
    with open(path, "a") as f:
        f.write("import mpxd\nmpxd.call_every(1, print)\n")
    with pytest.raises(ScriptError, match=r"line \d+\): RuntimeError: no mpxd server runs "
                                          r"this code.*on_reload"):
        h.reload()
    assert len(h.core.timers) == 0          # the refused version left no timer behind
    assert c.send("still") == ["still"]


def test_two_harnesses_do_not_share_state(mpxd_harness, write_script):
    a = mpxd_harness(COUNTER)
    b = mpxd_harness(COUNTER)
    ca, cb = a.connect(), b.connect()
    assert ca.send("3 global") == ["3"]
    assert cb.send("4 global") == ["4"]
    assert a.module is not b.module

    timers = write_script(TIMERS)
    ta, tb = mpxd_harness(timers), mpxd_harness(timers)
    x, y = ta.connect(), tb.connect()
    x.send("chain")             # tb was made last: the timer must still land on ta
    tb.advance(5)
    assert x.new() == [] and tb.module.events == []
    ta.advance(2)
    assert x.new() == ["chained"]
    assert y.received() == []


def test_a_closed_harness_leaves_no_current_core(write_script):
    with Harness(write_script(ECHO)) as h:
        assert core_module._current is h.core
    assert core_module._current is None


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="idle_timout"):
        make_config("x.py", idle_timout=5)
    with pytest.raises(TypeError, match="port.*use mpxd_server"):
        make_config("x.py", port=47110)
    with pytest.raises(ValueError, match="eol"):
        make_config("x.py", eol="cr")


@pytest.mark.parametrize("option", ["max_rate", "allow", "tls_cert", "unix", "control",
                                    "max_connections"])
def test_options_of_the_process_and_network_edge_are_refused(option):
    with pytest.raises(TypeError, match=f"{option}.*use mpxd_server"):
        make_config("x.py", **{option: 1})


@pytest.mark.parametrize("args", [
    [],
    ["--eol", "crlf", "--max-output", "1600", "--idle-timeout", "0"],
    ["--max-line", "100", "--max-output", "100000000", "--idle-timeout", "2.5",
     "--drain-timeout", "3", "--threads", "2"],
])
def test_harness_options_make_the_config_the_command_line_makes(args, monkeypatch):
    from click.testing import CliRunner

    from mpxd import cli
    seen = []
    monkeypatch.setattr(cli, "run", lambda config, inherited: seen.append(config) or 0)
    result = CliRunner().invoke(cli.main, ["--port", "0", *args, COUNTER])
    assert result.exit_code == 0, result.output
    [from_cli] = seen
    options = {}
    for flag, value in zip(args[::2], args[1::2]):
        name = flag[2:].replace("-", "_")
        options[name] = value if name == "eol" else float(value) if "." in value \
            or name.endswith("timeout") else int(value)
    harness_config = make_config(COUNTER, **options)
    assert {name: getattr(harness_config, name) for name in OPTIONS} == \
        {name: getattr(from_cli, name) for name in OPTIONS}


def test_options_map_like_the_command_line():
    config = make_config("x.py", eol="crlf", max_output=1600, idle_timeout=0)
    assert config.eol == "\r\n"
    assert (config.high_water, config.low_water) == (100, 25)
    assert config.idle_timeout is None
    assert cli_args(eol="\r\n", idle_timeout=5, daemon=False, syslog=True) == \
        ["--eol", "crlf", "--idle-timeout", "5", "--syslog"]


# --------------------------------------------------------- the real daemon


def test_mpxd_server_runs_the_real_daemon(mpxd_server):
    server = mpxd_server(COUNTER, eol="crlf")
    assert server.port > 0 and server.pid > 0
    with server.client() as a, server.client() as b:
        assert a.ask("2") == "2"
        assert b.ask("2 global") == "2"
        a.send("3\n1 global\n")
        assert a.readlines(2) == ["5", "3"]
    server.wait_for_log(r"closed: eof")
    assert server.stop() == 0
    assert "stopped" in server.log


@pytest.mark.parametrize("options", [{"log_level": "warning"}, {"log_file": "mpxd.log"}])
def test_mpxd_server_is_ready_when_the_log_says_nothing_on_stderr(
        mpxd_server, tmp_path, monkeypatch, options):
    # Readiness comes from READY=1 then; the "listening on" line never
    # reaches stderr, which used to make start() wait out its timeout.
    monkeypatch.chdir(tmp_path)
    server = mpxd_server(os.path.join(ROOT, COUNTER), timeout=3, **options)
    with server.client() as c:
        assert c.ask("2") == "2"
    assert "listening on" not in server.log
    assert server.stop() == 0


def test_mpxd_server_has_the_start_up_lines_by_the_time_it_returns(mpxd_server, write_script):
    # It returns on READY=1 here; what mpxd wrote before that is in the log.
    script = write_script("import logging\n"
                          "logging.getLogger('mpxd').warning('said at import')\n" + ECHO)
    server = mpxd_server(script, log_level="warning", env={"PYTHONUNBUFFERED": "1"})
    assert "WARNING said at import" in server.log


@pytest.mark.parametrize("args, options", [((), {"daemon": True}), (("-d",), {})])
def test_mpxd_server_refuses_to_detach_the_daemon(mpxd_server, args, options):
    # The launcher would exit at once and stop() would leave the daemon running.
    with pytest.raises(TypeError, match="daemon.*foreground"):
        mpxd_server(COUNTER, *args, **options)


def test_mpxd_server_is_ready_when_it_listens_on_every_address_too():
    # --host 0.0.0.0 covers the fixture's 127.0.0.1, which is then skipped:
    # "listening on 0.0.0.0:PORT" is ready too.  (Not started here: tests
    # listen on loopback only.)
    from mpxd.testing.server import LISTENING
    assert LISTENING.search("INFO listening on 0.0.0.0:4711").group(1) == "4711"
    assert LISTENING.search("INFO listening on 127.0.0.1:4712").group(1) == "4712"
    assert LISTENING.search("INFO listening on [::1]:4713") is None


def test_mpxd_server_reports_a_script_that_does_not_load(mpxd_server, write_script):
    from mpxd.testing import ServerError
    with pytest.raises(ServerError, match="does not define handle_request"):
        mpxd_server(write_script("x = 1\n"))


# ------------------------------------------------ the plugin, as installed

PLUGIN_TESTS = """
import os


def test_harness(mpxd_harness):
    c = mpxd_harness("handlers/counter.py").connect()
    assert c.send("2") == ["2"]


def test_server(mpxd_server):
    server = mpxd_server("handlers/counter.py")
    with open("server.pid", "w") as f:
        f.write(str(server.pid))
    with server.client() as c:
        assert c.ask("2") == "2"
"""

STOPS_BADLY = """
import os

def handle_request(s):
    s.response = "ok"

def on_stop(core):
    os._exit(3)
"""


def run_pytest_in(directory, *args: str) -> subprocess.CompletedProcess:
    """Run pytest in ``directory`` as a handler author would: only what is installed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_PLUGINS", "PYTEST_ADDOPTS", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--confcutdir", str(directory), *args],
        cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def author_project(tmp_path):
    """A directory outside the repository: a handler script and a test file, no conftest."""
    (tmp_path / "handlers").mkdir()
    with open(COUNTER) as f:
        (tmp_path / "handlers" / "counter.py").write_text(f.read())
    (tmp_path / "test_counter.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    return tmp_path


def test_the_plugin_works_as_installed_without_a_conftest(author_project):
    assert not list(author_project.rglob("conftest.py"))
    result = run_pytest_in(author_project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    pid = int((author_project / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):     # mpxd_server stopped it
        os.kill(pid, 0)
    # The fixtures come from the entry point: without the plugin they do not exist.
    result = run_pytest_in(author_project, "-p", "no:mpxd")
    assert result.returncode == 1
    assert "fixture 'mpxd_harness' not found" in result.stdout


def test_mpxd_server_fails_the_test_when_the_daemon_does_not_stop_cleanly(author_project):
    (author_project / "handlers" / "bad_stop.py").write_text(textwrap.dedent(STOPS_BADLY))
    (author_project / "test_counter.py").write_text(textwrap.dedent("""
        def test_stops_badly(mpxd_server):
            first = mpxd_server("handlers/bad_stop.py")
            second = mpxd_server("handlers/counter.py")
            with open("server.pid", "w") as f:
                f.write(str(second.pid))
    """))
    result = run_pytest_in(author_project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout
    assert "exited with status 3 on SIGTERM, not 0" in result.stdout
    pid = int((author_project / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):     # the failure did not leave it running
        os.kill(pid, 0)


DIES = """
import os

def handle_request(s):
    os._exit(3)
"""


def test_mpxd_server_fails_the_test_when_the_daemon_dies_during_it(author_project):
    (author_project / "handlers" / "dies.py").write_text(textwrap.dedent(DIES))
    (author_project / "test_counter.py").write_text(textwrap.dedent("""
        import time

        def test_dies(mpxd_server):
            server = mpxd_server("handlers/dies.py")
            with server.client() as c:
                c.send_line("x")
                time.sleep(0.5)

        def test_stopped_by_the_test_is_fine(mpxd_server):
            mpxd_server("handlers/counter.py").stop()
    """))
    result = run_pytest_in(author_project)
    assert "2 passed, 1 error" in result.stdout, result.stdout + result.stderr
    assert "exited by itself during the test with status 3" in result.stdout


def test_a_harness_that_fails_to_close_does_not_keep_the_others_open(author_project):
    # It spins only once closing, so the test itself met no error.
    (author_project / "handlers" / "spin.py").write_text(textwrap.dedent("""
        from mpxd import call_later

        def spin():
            call_later(0, spin)

        def handle_request(s):
            pass

        def handle_close(s):
            spin()
    """))
    (author_project / "handlers" / "stopper.py").write_text(textwrap.dedent("""
        def handle_request(s):
            pass

        def on_stop(server):
            open("on_stop_ran", "w").close()
    """))
    (author_project / "test_counter.py").write_text(textwrap.dedent("""
        import pytest

        def test_two(mpxd_harness):
            spinning = mpxd_harness("handlers/spin.py")
            mpxd_harness("handlers/stopper.py")
            spinning.connect().send("go")
    """))
    result = run_pytest_in(author_project)
    assert "closing the harness failed" in result.stdout, result.stdout
    assert "still busy" in result.stdout
    assert (author_project / "on_stop_ran").exists()


def test_a_runaway_timer_the_test_met_is_not_reported_again_at_teardown(author_project):
    # The test's own "still busy" error was followed by the same one from
    # the fixture's h.close(): an error in teardown too, burying the first.
    (author_project / "handlers" / "spin.py").write_text(textwrap.dedent("""
        from mpxd import call_later

        def spin():
            call_later(0, spin)

        def handle_request(s):
            spin()
    """))
    (author_project / "test_spin.py").write_text(textwrap.dedent("""
        import pytest

        def test_spins(mpxd_harness):
            h = mpxd_harness("handlers/spin.py")
            with pytest.raises(RuntimeError, match="still busy"):
                h.connect().send("go")
    """))
    result = run_pytest_in(author_project)
    assert " passed" in result.stdout and "error" not in result.stdout, result.stdout


def test_mpxd_server_leaves_out_the_shells_mpxd_variables(mpxd_server, monkeypatch):
    # An exported MPXD_DAEMON=1 detached the server out of the fixture's
    # reach; MPXD_IDLE_TIMEOUT changed what the test tested.
    monkeypatch.setenv("MPXD_DAEMON", "1")
    monkeypatch.setenv("MPXD_IDLE_TIMEOUT", "0.1")
    server = mpxd_server(COUNTER)
    with server.client() as c:
        time.sleep(0.4)
        assert c.ask("2") == "2"                # no idle timeout
    with pytest.raises(TypeError, match="MPXD_DAEMON would detach it"):
        mpxd_server(COUNTER, env={"MPXD_DAEMON": "1"})


def test_mpxd_server_takes_false_flags_and_repeated_options(mpxd_server):
    server = mpxd_server(COUNTER, session_log=False, allow=["10.0.0.0/8", "127.0.0.1"])
    with server.client() as c:
        assert c.ask("2") == "2"                # 127.0.0.1 is allowed
    assert server.stop() == 0
    assert "closed:" not in server.log          # --no-session-log


def test_harness_lines_read_as_a_line_client_reads_them(harness):
    # "b\r\n" inside a response is the line "b" for LineClient and for mpxd's
    # own input rules; the harness gave "b\r".
    h = harness("""
def handle_request(s):
    s.response = "a\\nb\\r\\nc"
""", eol="LF")                                  # any case, as on the command line
    c = h.connect()
    assert c.send("x") == ["a", "b", "c"]
    assert c.output == b"a\nb\r\nc\n"


@pytest.mark.parametrize("data", [{"k": 1}, {"a", "b"}, (line for line in ["a"])])
def test_send_takes_a_list_of_lines_not_any_iterable(harness, data):
    c = harness(ECHO).connect()
    with pytest.raises(TypeError, match="send takes a str"):
        c.send(data)


def test_a_failing_on_start_raises_as_the_daemon_refuses_to_start(tmp_path):
    script = tmp_path / "db.py"
    script.write_text("def on_start(server):\n"
                      "    raise ConnectionError('database unreachable')\n"
                      "def handle_request(s):\n    s.response = 'pong'\n")
    with pytest.raises(ScriptError, match="on_start failed.*database unreachable"):
        Harness(script)


def test_send_response_returns_false_when_its_output_closed_the_session(harness):
    h = harness("""
from mpxd import call_later, send_response

results = []

def handle_request(s):
    def answer():
        s.response = "y" * 4096
        results.append(send_response(s))
    call_later(0, answer)
""", max_output=1024)
    c = h.connect()
    c.send("big")
    assert c.closed and c.close_reason == "output overflow"
    assert h.module.results == [False]


CLOSES_WITH_OUTPUT = """
from mpxd import close_session

def handle_request(s):
    s.response = "x" * 100
    close_session(s)
"""


def _closing_unread(h):
    """A client that does not read, whose session closes with output queued."""
    c = h.connect()
    c.pause_reading()
    c.send("bye")
    return c


def test_send_timeout_0_waits_for_ever_for_a_closing_sessions_client(harness):
    # --drain-timeout 0 is no stall limit either
    h = harness(CLOSES_WITH_OUTPUT, send_timeout=0, drain_timeout=0)
    c = _closing_unread(h)
    h.advance(10_000)
    assert not c.closed
    assert c.resume_reading() == ["x" * 100] and c.closed


def test_a_stalled_closing_session_is_dropped_send_timeout_after_its_last_progress(harness):
    h = harness(CLOSES_WITH_OUTPUT, send_timeout=5)
    c = _closing_unread(h)
    h.advance(4.5)
    assert not c.closed
    h.advance(1)
    assert c.closed and c.close_reason == "close_session"
