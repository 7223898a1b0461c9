"""mpxd.testing.Harness against the real daemon: the same cases, the same bytes.

Every case runs twice: through the Harness (fake edge, fake clock) and
through the real ``mpxd`` command over TCP (the ``daemon`` fixture).  Both
must produce exactly the expected bytes and end the session for the same
reason, which shows that the harness and the daemon agree on the SPEC's
sections 2-4.  The reason comes from the one log line per session
(``session N HOST:PORT closed: REASON, ...``) that the core logs on both
sides, found by the client's port.

What is covered, by SPEC section:

* 2, the session object: ``s.handle``/``s.request``/``s.response``/``s.peer``/
  ``s.id``/``s.closed`` as a handler sees them, the methods (``session
  object ...`` cases); ``send_response`` from the own handler, to another
  session (broadcast), from a timer, and on a gone session (``False``);
  ``close_session`` writes what is queued and drops unhandled lines.
* 3, lines on the wire: the ``CASES`` table (LF and CRLF input, bare CR and
  NUL, empty lines, invalid UTF-8, final line without LF at EOF, pipelining,
  ``--eol crlf``, line breaks inside a response, a trailing one not doubled,
  empty responses, ``--max-line`` (set and default) with its error line,
  log line and close).
* 4, connection life: ``handle_close`` exactly once for EOF, reset,
  close_session, idle timeout, handler error, shutdown and a session without
  requests; half-close; a handler error logged with traceback, peer and
  request while other sessions carry on; ``--idle-timeout``; a client that
  does not read closed past ``--max-output``.  ``--max-connections`` and
  EMFILE are the socket edge's alone (the harness has no sockets).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import pexpect
import pytest

from mpxd.testing import Harness, cli_args

# ------------------------------------------------------------ two sides


def closed_line(host: str, port: int) -> str:
    """The pattern of the core's log line for the session of client ``port``."""
    return rf"session \d+ {re.escape(host)}:{port} closed: ([^,\r\n]+),"


class HarnessPeer:
    """A client of the Harness, read like a socket: line by line or to the end."""

    def __init__(self, side: HarnessSide) -> None:
        self.side = side
        self.client = side.harness.connect()
        self.port = self.client.peer[1]
        self.read = 0

    def send(self, data: bytes) -> None:
        self.client.send(data)

    def eof(self) -> None:
        self.client.close()

    def reset(self) -> None:
        self.client.reset()

    def stop_reading(self) -> None:
        self.client.pause_reading()

    def readline(self) -> bytes:
        output = self.client.output
        end = output.find(b"\n", self.read)
        assert end >= 0, f"no complete line received; have {output[self.read:]!r}"
        line, self.read = output[self.read:end + 1], end + 1
        return line

    def read_rest(self) -> bytes:
        assert self.client.closed, "the server did not close the connection"
        rest, self.read = self.client.output[self.read:], len(self.client.output)
        return rest

    def reason(self) -> str:
        assert self.client.closed, "the session is still open"
        logged = self.side.wait_for_log(closed_line(*self.client.peer)).group(1)
        assert logged == self.client.close_reason
        return logged


class HarnessSide:
    """A Harness whose ``mpxd`` log records are kept, as the daemon's stderr is."""

    def __init__(self, script: str, options: dict[str, Any]) -> None:
        self.messages: list[str] = []
        self.logger = logging.getLogger("mpxd")
        self.level = self.logger.level
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)      # the daemon's default --log-level
        self.harness = Harness(script, **options)
        self.pid = os.getpid()
        self.closed = False

    def connect(self) -> HarnessPeer:
        return HarnessPeer(self)

    def idle(self, seconds: float) -> None:
        self.harness.advance(seconds)

    def wait_for_log(self, pattern: str) -> re.Match:
        """Search what the core logged (nothing is late: the harness runs to idle)."""
        match = re.search(pattern, "\n".join(self.messages), re.S)
        assert match, f"no log line {pattern!r}:\n" + "\n".join(self.messages)
        return match

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.harness.close()
        finally:
            self.logger.removeHandler(self.handler)
            self.logger.setLevel(self.level)


class DaemonPeer:
    """A TCP client of the real daemon with the same interface as ``HarnessPeer``."""

    def __init__(self, side: DaemonSide) -> None:
        self.side = side
        self.sock = socket.create_connection(side.daemon.address, timeout=5)
        self.port = self.sock.getsockname()[1]
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def stop_reading(self) -> None:
        """Simply never call recv again: the kernel's buffers fill, then mpxd's."""

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; have {self.buffer!r}"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_rest(self) -> bytes:
        chunks = [self.buffer]
        self.buffer = b""
        while chunk := self.sock.recv(65536):        # until the server closes
            chunks.append(chunk)
        self.sock.close()
        return b"".join(chunks)

    def reason(self) -> str:
        return self.side.wait_for_log(closed_line("127.0.0.1", self.port)).group(1)


class DaemonSide:
    def __init__(self, daemon_fixture: Callable, script: str, options: dict[str, Any]):
        self.daemon = daemon_fixture(script, *cli_args(**options))
        self.pid = self.daemon.pid
        # what the child printed after "listening on" in the same read
        self.log = self.daemon.child.buffer.decode("utf-8", "replace")
        self.closed = False

    def connect(self) -> DaemonPeer:
        return DaemonPeer(self)

    def idle(self, seconds: float) -> None:
        """Real time passes by itself: the next read waits for what it brings."""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Search everything the daemon logged so far, then read more until it matches."""
        child = self.daemon.child
        while not (match := re.search(pattern, self.log, re.S)):
            if self.closed:
                raise AssertionError(f"no log line {pattern!r}:\n{self.log}")
            try:
                self.log += child.read_nonblocking(65536, timeout).decode(
                    "utf-8", "replace")
            except pexpect.TIMEOUT:
                raise AssertionError(f"no log line {pattern!r}:\n{self.log}") from None
        return match

    def close(self) -> None:
        """SIGTERM; keep the rest of the log (the shutdown's session lines)."""
        if self.closed:
            return
        self.closed = True
        assert self.daemon.stop() == 0
        rest = self.daemon.child.before
        if isinstance(rest, bytes):
            self.log += rest.decode("utf-8", "replace")


@pytest.fixture
def both(daemon, write_script):
    """``both(source, **options)``: a HarnessSide and a DaemonSide for one script."""
    sides = []

    def make(source: str, **options: Any) -> list:
        path = write_script(source)
        made = [HarnessSide(path, options), DaemonSide(daemon, path, options)]
        sides.extend(made)
        return made

    yield make
    for side in sides:
        side.close()


# ----------------------------------------------------- one client, a table

ECHO = """
def handle_request(s):
    s.response = s.request
"""

BRACKETS = """
def handle_request(s):
    s.response = "[" + s.request + "]"
"""

RESPONSES = """
from mpxd import close_session, send_response

def handle_request(s):
    line = s.request
    if line == "quit":
        s.response = "first"
        send_response(s)
        s.response = "bye"
        close_session(s)
    elif line == "boom":
        s.response = "dropped"
        raise RuntimeError("boom on purpose")
    elif line == "half":
        s.response = "sent before the error"
        send_response(s)
        raise RuntimeError("after a send")
    elif line == "lines":
        s.response = "a\\nb\\n"
    elif line == "crlf-inside":
        s.response = "c\\r\\nd"
    elif line == "skip":
        s.response = ""
    elif line == "done":
        s.response = "done\\n"
    elif line == "done-crlf":
        s.response = "done\\r\\n"
    elif line == "two":
        s.response = "1"
        send_response(s)
        s.response = "2"
    else:
        s.response = line.upper()
"""

GREETING = """
def handle_open(s):
    s.response = "hello\\nthere"

def handle_request(s):
    s.response = s.request
"""

REFUSING = """
from mpxd import close_session

def handle_open(s):
    s.response = "go away"
    close_session(s)

def handle_request(s):
    s.response = "unreachable"
"""

BROKEN_OPEN = """
def handle_open(s):
    s.response = "never sent"
    raise RuntimeError("broken greeting")

def handle_request(s):
    s.response = "unreachable"
"""


SESSION = """
def handle_request(s):
    if s.request == "state":
        s.response = (f"{s.handle!r} {s.response!r} {type(s.peer).__name__} "
                      f"{s.peer[0]} {type(s.peer[1]).__name__} {type(s.id).__name__} "
                      f"{s.closed}")
        s.handle = "kept"
    elif s.request == "again":
        s.response = f"{s.handle!r} {s.response!r}"
    elif s.request == "methods":
        s.response = "by s.send_response()"
        sent = s.send_response()
        s.response = f"{sent} {s.response!r}"
    elif s.request == "close":
        s.close()
        s.response = f"closed={s.closed}"
    else:
        s.response = "unreachable"
"""


@dataclass
class Case:
    """One client sends ``data``; it receives ``expect``; the session ends for ``reason``.

    ``reason == "eof"`` means the server keeps the connection until the
    client's EOF (sent after ``data``); any other reason means the server
    closes it by itself.
    """

    name: str
    script: str
    data: bytes
    expect: bytes
    reason: str = "eof"
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    # SPEC 3: lines on the wire
    Case("crlf input: one CR before LF removed", ECHO, b"one\r\ntwo\r\n", b"one\ntwo\n"),
    Case("bare CR and NUL are data", ECHO, b"a\rb\n\x00c\n\r\r\n", b"a\rb\n\x00c\n\r\n"),
    Case("empty lines are requests", BRACKETS, b"\n\nx\n\r\n", b"[]\n[]\n[x]\n[]\n"),
    Case("invalid UTF-8 round trips", ECHO, b"\xff\xfe caf\xc3\xa9 \xed\xa0\x80\n",
         b"\xff\xfe caf\xc3\xa9 \xed\xa0\x80\n"),
    Case("final line without LF at EOF", ECHO, b"one\ntwo", b"one\ntwo\n"),
    Case("final CR without LF at EOF is data", ECHO, b"x\r", b"x\r\n"),
    Case("pipelined lines answered in order", BRACKETS,
         b"".join(b"%d\n" % i for i in range(200)),
         b"".join(b"[%d]\n" % i for i in range(200))),
    Case("crlf eol on every response line", RESPONSES, b"x\nlines\ntwo\n",
         b"X\r\na\r\nb\r\n1\r\n2\r\n", options={"eol": "crlf"}),
    Case("line breaks inside a response make lines", RESPONSES,
         b"lines\ncrlf-inside\n", b"a\nb\nc\r\nd\n"),
    Case("line breaks inside a response, crlf eol", RESPONSES,
         b"lines\ncrlf-inside\n", b"a\r\nb\r\nc\r\nd\r\n", options={"eol": "crlf"}),
    Case("a trailing line break is not doubled", RESPONSES, b"done\ndone-crlf\n",
         b"done\ndone\n"),
    Case("a trailing line break is not doubled, crlf eol", RESPONSES,
         b"done\ndone-crlf\n", b"done\r\ndone\r\n", options={"eol": "crlf"}),
    Case("empty response sends nothing", RESPONSES, b"skip\nx\nskip\n", b"X\n"),
    Case("responses keep their order", RESPONSES, b"two\ntwo\n", b"1\n2\n1\n2\n"),
    Case("line too long", ECHO, b"12345678\n123456789\nnext\n",
         b"12345678\nERROR line too long\n", "line too long", {"max_line": 8}),
    Case("unterminated line too long", ECHO, b"ok\n123456789",
         b"ok\nERROR line too long\n", "line too long", {"max_line": 8}),
    Case("default max-line is 64 KiB", ECHO,
         b"x" * 65536 + b"\n" + b"y" * 65537 + b"\nnext\n",
         b"x" * 65536 + b"\nERROR line too long\n", "line too long"),
    Case("lines held at the high-water mark are answered before a line too long", ECHO,
         b"".join(b"%02d" % i + b"x" * 48 + b"\n" for i in range(10)) + b"y" * 70 + b"\n",
         b"".join(b"%02d" % i + b"x" * 48 + b"\n" for i in range(10))
         + b"ERROR line too long\n", "line too long", {"max_line": 60, "max_output": 1600}),
    # SPEC 2 and 4: the session object, session functions and connection life
    Case("session object as handlers see it", SESSION,
         b"state\nagain\nmethods\nclose\nignored\n",
         b"None '' tuple 127.0.0.1 int int False\n'kept' ''\nby s.send_response()\n"
         b"True ''\nclosed=True\n", "close_session"),
    Case("close_session writes queued output, drops later lines", RESPONSES,
         b"a\nquit\nb\n", b"A\nfirst\nbye\n", "close_session"),
    Case("handler exception closes the session", RESPONSES, b"ok\nboom\nafter\n",
         b"OK\n", "error"),
    Case("output sent before an exception is written", RESPONSES, b"half\nafter\n",
         b"sent before the error\n", "error"),
    Case("greeting from handle_open comes first", GREETING, b"x\n", b"hello\nthere\nx\n"),
    Case("greeting without any request", GREETING, b"", b"hello\nthere\n"),
    Case("close_session in handle_open", REFUSING, b"", b"go away\n", "close_session"),
    Case("exception in handle_open", BROKEN_OPEN, b"", b"", "error"),
]


def run_case(side: Any, case: Case) -> tuple[bytes, str]:
    peer = side.connect()
    if case.data:
        peer.send(case.data)
    if case.reason == "eof":
        peer.eof()
    output = peer.read_rest()
    if case.reason == "line too long":
        side.wait_for_log(rf"session \d+ 127\.0\.0\.1:{peer.port}: line longer than "
                          rf"--max-line {case.options.get('max_line', 65536)} bytes; "
                          rf"closing it")
    return output, peer.reason()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_harness_and_daemon_agree(case, both):
    harness_side, daemon_side = both(case.script, **case.options)
    assert run_case(harness_side, case) == (case.expect, case.reason)
    assert run_case(daemon_side, case) == (case.expect, case.reason)


# ------------------------------------------------ several clients, scripted

SHARED = """
from mpxd import close_session, send_response, sessions

kept = {}
closes = {}


def handle_open(s):
    s.handle = s.peer


def handle_request(s):
    word, _, rest = s.request.partition(" ")
    if word == "leave":
        kept["gone"] = s
        s.response = "bye"
        close_session(s)
    elif word == "poke":
        gone = kept["gone"]
        gone.response = "are you there?"
        s.response = f"{send_response(gone)} {gone.response!r}"
    elif word == "say":
        for other in sessions():
            if other is not s:
                other.response = rest
                s.response += str(send_response(other))
    elif word == "closes":
        s.response = " ".join(str(n) for n in sorted(closes.values()))


def handle_close(s):
    closes[s.handle] = closes.get(s.handle, 0) + 1
"""


def test_send_response_on_a_closed_session_returns_false(both):
    for side in both(SHARED):
        a, b = side.connect(), side.connect()
        a.send(b"leave\n")
        assert a.read_rest() == b"bye\n"
        assert a.reason() == "close_session"
        b.send(b"poke\n")
        assert b.readline() == b"False ''\n"


def test_send_response_to_another_session_broadcasts(both):
    for side in both(SHARED):
        a, b, c = side.connect(), side.connect(), side.connect()
        a.send(b"say hi\n")
        assert a.readline() == b"TrueTrue\n"
        assert b.readline() == b"hi\n" and c.readline() == b"hi\n"
        c.send(b"say yo\n")
        assert c.readline() == b"TrueTrue\n"
        assert a.readline() == b"yo\n" and b.readline() == b"yo\n"


def test_handle_close_runs_once_whatever_ended_the_session(both):
    for side in both(SHARED):
        quitter, resetter, leaver = side.connect(), side.connect(), side.connect()
        quitter.send(b"x\n")
        quitter.eof()
        assert quitter.read_rest() == b""
        assert quitter.reason() == "eof"
        resetter.send(b"closes\n")
        assert resetter.readline() == b"1\n"
        resetter.reset()
        assert resetter.reason() == "reset"
        leaver.send(b"leave\n")
        assert leaver.read_rest() == b"bye\n"
        assert leaver.reason() == "close_session"
        observer = side.connect()
        observer.send(b"closes\n")
        assert observer.readline() == b"1 1 1\n"


def test_idle_timeout_closes_a_quiet_session(both):
    for side in both(ECHO, idle_timeout=0.2):
        peer = side.connect()
        peer.send(b"x\n")
        assert peer.readline() == b"x\n"
        side.idle(0.2)
        assert peer.read_rest() == b""
        assert peer.reason() == "timeout"


TIMERS = """
from mpxd import call_later, send_response

gone = []


def handle_request(s):
    if s.request == "later":
        def late():
            s.response = "late"
            send_response(s)
        call_later(0.2, late)
        s.response = "now"
    elif s.request == "leave-then-poke":
        def poke():
            s.response = "after the end"
            gone.append(send_response(s))
        call_later(0.2, poke)
    elif s.request == "poked":
        s.response = repr(gone)
"""


def test_send_response_from_a_timer_and_to_a_session_gone_meanwhile(both):
    for side in both(TIMERS):
        a, b = side.connect(), side.connect()
        a.send(b"later\n")
        assert a.readline() == b"now\n"
        side.idle(0.2)
        assert a.readline() == b"late\n"
        b.send(b"leave-then-poke\n")
        b.eof()
        assert b.read_rest() == b""
        assert b.reason() == "eof"
        side.idle(0.2)
        a.send(b"later\n")             # its "late" comes 0.2 s after the poke
        assert a.readline() == b"now\n"
        side.idle(0.2)
        assert a.readline() == b"late\n"
        a.send(b"poked\n")
        assert a.readline() == b"[False]\n"


LIFE = """
import os
from mpxd import close_session

# One file per process: the harness runs in the test's, the daemon in its own.
RECORD = os.path.join(os.path.dirname(__file__), f"closes-{os.getpid()}.txt")


def handle_request(s):
    if s.request == "boom":
        raise RuntimeError("boom on purpose")
    if s.request == "leave":
        close_session(s)
    elif s.request == "idle":
        s.set_idle_timeout(0.3)
    s.response = "ok"


def handle_close(s):
    with open(RECORD, "a") as f:
        f.write(f"{s.peer[1]} {s.closed}\\n")
"""


def test_handle_close_runs_once_for_every_way_a_session_ends(both, tmp_path):
    for side in both(LIFE):
        ended = {}
        silent = side.connect()             # no request ever
        silent.eof()
        ended[silent.port] = "eof"
        quitter = side.connect()
        quitter.send(b"x\nlast without LF")
        quitter.eof()
        assert quitter.read_rest() == b"ok\nok\n"
        ended[quitter.port] = "eof"
        resetter = side.connect()
        resetter.send(b"x\n")
        assert resetter.readline() == b"ok\n"
        resetter.reset()
        ended[resetter.port] = "reset"
        leaver = side.connect()
        leaver.send(b"leave\nnot handled\n")
        assert leaver.read_rest() == b"ok\n"
        ended[leaver.port] = "close_session"
        crasher = side.connect()
        crasher.send(b"boom\n")
        assert crasher.read_rest() == b""
        ended[crasher.port] = "error"
        sleeper = side.connect()
        sleeper.send(b"idle\n")
        assert sleeper.readline() == b"ok\n"
        side.idle(0.3)
        assert sleeper.read_rest() == b""
        ended[sleeper.port] = "timeout"
        for peer in (silent, resetter, crasher):
            assert peer.reason() == ended[peer.port]
        stayer = side.connect()             # the others' ends did not touch it
        stayer.send(b"x\n")
        assert stayer.readline() == b"ok\n"
        side.close()                        # SIGTERM / Harness.close
        ended[stayer.port] = "shutdown"
        reasons = {}
        for peer in (silent, quitter, resetter, leaver, crasher, sleeper, stayer):
            reasons[peer.port] = peer.reason()
        assert reasons == ended
        record = (tmp_path / f"closes-{side.pid}.txt").read_text().split("\n")[:-1]
        assert sorted(record) == sorted(f"{port} True" for port in ended)


def test_a_handler_error_is_logged_and_other_sessions_carry_on(both):
    for side in both(RESPONSES):
        bystander, crasher = side.connect(), side.connect()
        crasher.send(b"ok\nboom\nafter\n")
        assert crasher.read_rest() == b"OK\n"
        assert crasher.reason() == "error"
        side.wait_for_log(
            rf"handle_request failed for session \d+ 127\.0\.0\.1:{crasher.port} on "
            rf"request 'boom':\r?\nTraceback \(most recent call last\):.*"
            rf"RuntimeError: boom on purpose")
        bystander.send(b"still\n")
        assert bystander.readline() == b"STILL\n"
        bystander.eof()
        assert bystander.read_rest() == b""


FLOOD = """
from mpxd import call_every, send_response

CHUNK = "x" * (256 * 1024 - 1)


def handle_request(s):
    if s.request == "flood":
        sent = []
        def more():
            s.response = CHUNK
            if not send_response(s) or len(sent) > 400:
                timer.cancel()
            sent.append(1)
        timer = call_every(0.01, more)
    s.response = "ok"
"""


def test_a_client_that_does_not_read_is_closed_past_max_output(both):
    for side in both(FLOOD, max_output=1024 * 1024):
        bystander, reader = side.connect(), side.connect()
        reader.stop_reading()
        reader.send(b"flood\n")
        side.idle(5)
        assert reader.reason() == "output overflow"
        side.wait_for_log(rf"session \d+ 127\.0\.0\.1:{reader.port}: \d+ bytes of output "
                          rf"unsent, more than --max-output 1048576; closing it")
        bystander.send(b"x\n")
        assert bystander.readline() == b"ok\n"
        bystander.eof()
        assert bystander.read_rest() == b""



BIG_LATER = """
from mpxd import call_later, send_response


def handle_request(s):
    def answer():
        s.response = "y" * (2 * 1024 * 1024)
        s.response = f"sent {send_response(s)}"     # False: it closed the session
        send_response(s)
    call_later(0, answer)
"""


def test_send_response_says_when_its_output_passed_max_output(both):
    for side in both(BIG_LATER, max_output=1024 * 1024):
        c = side.connect()
        c.send(b"big\n")
        assert c.read_rest() == b""
        assert c.reason() == "output overflow"
        side.wait_for_log(r"closing it \(one response of 2097153 bytes: raise "
                          r"--max-output to send answers this big with send_response\)")


STUCK = """
from mpxd import close_session


def handle_request(s):
    if s.request in ("big", "bye"):     # more than loopback's buffers hold
        s.response = "x" * (16 * 1024 * 1024)
    else:
        s.response = s.request
    if s.request == "bye":
        close_session(s)
"""


@pytest.mark.parametrize("request_line, options, reason", [
    (b"big\n", {"idle_timeout": 1}, "timeout"),
    (b"bye\n", {}, "close_session"),
])
def test_a_closing_session_whose_client_reads_nothing_is_dropped(both, request_line,
                                                                 options, reason):
    # An idle timeout or close_session waits for the queued output; a client
    # that never read kept its session (and its output) until it went away.
    for side in both(STUCK, send_timeout=1, **options):
        stuck = side.connect()
        stuck.stop_reading()
        stuck.send(request_line)
        side.idle(4)
        assert stuck.reason() == reason
        side.wait_for_log(rf"session \d+ 127\.0\.0\.1:{stuck.port}: closing \({reason}\), "
                          rf"but the client took none of its last output for 1s; "
                          rf"dropping it, with \d+ bytes unsent")
        later = side.connect()
        later.send(b"hi\n")
        assert later.readline() == b"hi\n"
