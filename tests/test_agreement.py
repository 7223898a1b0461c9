"""mpxd.testing.Harness against the real daemon: the same cases, the same bytes.

Every case runs twice: through the Harness (fake edge, fake clock) and
through the real ``mpxd`` command over TCP (the ``daemon`` fixture).  Both
must produce exactly the expected bytes and end the session for the same
reason, which shows that the harness and the daemon agree on the SPEC's
sections 2-4.  The daemon's reason comes from its one log line per session
(``session N HOST:PORT closed: REASON, ...``), found by the client's port.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import pexpect
import pytest

from mpxd.testing import Harness, cli_args

# ------------------------------------------------------------ two sides


class HarnessPeer:
    """A client of the Harness, read like a socket: line by line or to the end."""

    def __init__(self, harness: Harness) -> None:
        self.client = harness.connect()
        self.read = 0

    def send(self, data: bytes) -> None:
        self.client.send(data)

    def eof(self) -> None:
        self.client.close()

    def reset(self) -> None:
        self.client.reset()

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
        return self.client.close_reason


class HarnessSide:
    def __init__(self, script: str, options: dict[str, Any]) -> None:
        self.harness = Harness(script, **options)

    def connect(self) -> HarnessPeer:
        return HarnessPeer(self.harness)

    def idle(self, seconds: float) -> None:
        self.harness.advance(seconds)

    def close(self) -> None:
        self.harness.close()


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
        return self.side.wait_for_log(
            rf"session \d+ 127\.0\.0\.1:{self.port} closed: ([^,\r\n]+),").group(1)


class DaemonSide:
    def __init__(self, daemon_fixture: Callable, script: str, options: dict[str, Any]):
        self.daemon = daemon_fixture(script, *cli_args(**options))
        self.log = ""

    def connect(self) -> DaemonPeer:
        return DaemonPeer(self)

    def idle(self, seconds: float) -> None:
        """Real time passes by itself: the next read waits for what it brings."""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Search everything the daemon logged so far, then read more until it matches."""
        child = self.daemon.child
        while not (match := re.search(pattern, self.log)):
            try:
                self.log += child.read_nonblocking(65536, timeout).decode(
                    "utf-8", "replace")
            except pexpect.TIMEOUT:
                raise AssertionError(f"no log line {pattern!r}:\n{self.log}") from None
        return match

    def close(self) -> None:
        assert self.daemon.stop() == 0


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
    Case("empty response sends nothing", RESPONSES, b"skip\nx\nskip\n", b"X\n"),
    Case("responses keep their order", RESPONSES, b"two\ntwo\n", b"1\n2\n1\n2\n"),
    Case("line too long", ECHO, b"12345678\n123456789\nnext\n",
         b"12345678\nERROR line too long\n", "line too long", {"max_line": 8}),
    Case("unterminated line too long", ECHO, b"ok\n123456789",
         b"ok\nERROR line too long\n", "line too long", {"max_line": 8}),
    # SPEC 2 and 4: session functions and connection life
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
    return peer.read_rest(), peer.reason()


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
