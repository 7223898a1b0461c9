"""mpxd.loop and mpxd.core under abuse (SPEC section 4): the limits, for real.

Every test runs the real ``mpxd`` command with its log in a file (a pty that
nobody reads would block a daemon that logs a lot) and measures the server's
memory as VmRSS from /proc.  The bounds on memory are generous for Python's
own allocator, but far below what the abusive input would cost if it were
buffered.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import HANDLERS, MPXD, ROOT, cpu_seconds, wait_until

COUNTER = os.path.join(HANDLERS, "counter.py")
ECHO = os.path.join(HANDLERS, "echo.py")
MiB = 1024 * 1024
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


class LoggedDaemon:
    """``mpxd`` as a subprocess logging to a file; stopped by pid."""

    def __init__(self, log_path: str, script: str, *args: str,
                 nofile: int | tuple[int, int] | None = None):
        """``nofile``: the descriptor limit, or its (soft, hard) pair; mpxd
        raises the soft limit to the hard one, so a lone number sets both."""
        self.log_path = log_path

        def limit_descriptors() -> None:
            if nofile is not None:
                limits = (nofile, nofile) if isinstance(nofile, int) else nofile
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)

        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*MPXD, "--port", "0", "--host", "127.0.0.1", *args, script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                preexec_fn=limit_descriptors)
        match = self.wait_log(LISTENING, timeout=15)
        self.port = int(match.group(1))
        self.address = ("127.0.0.1", self.port)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_log(self, pattern: str | re.Pattern, timeout: float = 10) -> re.Match:
        found: list[re.Match] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
            return bool(match) or self.proc.poll() is not None

        wait_until(seen, timeout)
        assert found, f"not in the log: {pattern!r}\n{self.log()}"
        return found[0]

    def count_log(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def rss(self) -> int:
        """The daemon's resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User and system CPU time the daemon has used so far."""
        return cpu_seconds(self.proc.pid)

    def connect(self, timeout: float = 10, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:          # before connect: fixes the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(self.address)
        return sock

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def mpxd_run(tmp_path):
    """Factory: ``mpxd_run(script, *options, nofile=None)``; killed after the test."""
    started: list[LoggedDaemon] = []

    def start(script: str, *args: str, nofile: int | None = None) -> LoggedDaemon:
        d = LoggedDaemon(str(tmp_path / f"mpxd{len(started)}.log"), script, *args,
                         nofile=nofile)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def readline(sock: socket.socket, buffer: bytearray) -> bytes:
    """One line from ``sock``; ``buffer`` keeps what was read past it."""
    while (end := buffer.find(b"\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed; unterminated {bytes(buffer)!r}")
        buffer += chunk
    line = bytes(buffer[:end])
    del buffer[:end + 1]
    return line


def ask(sock: socket.socket, line: str) -> str:
    sock.sendall(line.encode() + b"\n")
    return readline(sock, bytearray()).decode()


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the server closes; how it closed: ``eof`` or ``reset``."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """``sendall`` in a thread; a reset or broken pipe on the way is expected."""
    def send() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- --max-line

def test_a_ten_mib_line_gets_an_error_and_memory_stays_bounded(mpxd_run):
    d = mpxd_run(ECHO)
    other = d.connect()
    assert ask(other, "before") == "before"
    baseline = d.rss()
    for attempt in range(3):
        sock = d.connect()
        sender = send_in_background(sock, b"y" * (10 * MiB) + b"\nnever handled\n")
        data, _how = read_until_closed(sock)    # a reset after the line is fine
        assert data == b"ERROR line too long\n"
        sender.join(10)
        sock.close()
        growth = d.rss() - baseline
        assert growth < 4 * MiB, f"attempt {attempt}: RSS grew {growth} bytes"
    assert d.count_log(r"line longer than --max-line 65536 bytes") == 3
    assert d.count_log(r"closed: line too long") == 3
    assert "never handled" not in d.log()
    assert ask(other, "after") == "after", "other sessions are untouched"
    assert d.stop() == 0


def test_max_line_option_sets_the_limit(mpxd_run):
    d = mpxd_run(ECHO, "--max-line", "10")
    sock = d.connect()
    assert ask(sock, "x" * 10) == "x" * 10
    sock.sendall(b"y" * 11 + b"\n")
    assert read_until_closed(sock)[0] == b"ERROR line too long\n"


# ------------------------------------------------------------- slow readers

PADDED = """
def handle_request(s):
    if s.handle is None:
        s.handle = 0
    s.handle += 1
    s.response = f"{s.handle:>10} " + "." * 88       # 100 bytes with the LF
"""


def test_a_client_that_does_not_read_is_paused_not_buffered(mpxd_run, write_script):
    requests = 300_000
    d = mpxd_run(write_script(PADDED))
    baseline = d.rss()
    slow = d.connect(timeout=30, rcvbuf=64 * 1024)
    sender = send_in_background(slow, b"go\n" * requests)      # 30 MB of answers
    # Wait until the server has stopped producing: the queue stays put.
    last = [-1]

    def settled() -> bool:
        now = unread_bytes(slow)
        still, last[0] = now == last[0], now
        return still and now > 0
    assert wait_until(settled, timeout=15, interval=0.3)
    peak = max(d.rss() for _ in range(5))
    # 30 MB of answers are due, the kernel holds at most a few: the rest was
    # neither produced nor buffered while the client did not read.
    assert peak - baseline < 16 * MiB, f"server RSS grew {peak - baseline} bytes"

    fast = d.connect(timeout=3)
    assert ask(fast, "x") == f"{1:>10} " + "." * 88, "another client is answered at once"
    fast.close()

    received = bytearray()
    expected_size = requests * 100
    while len(received) < expected_size:
        chunk = slow.recv(1 << 20)
        assert chunk, f"closed after {len(received)} bytes"
        received += chunk
    sender.join(10)
    assert len(received) == expected_size
    lines = bytes(received).split(b"\n")
    assert lines.pop() == b""
    assert [int(line[:10]) for line in lines] == list(range(1, requests + 1))
    assert d.rss() - baseline < 16 * MiB
    slow.close()
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_the_counter_answers_300000_unread_requests_in_order(mpxd_run):
    d = mpxd_run(COUNTER)
    baseline = d.rss()
    slow = d.connect(timeout=30, rcvbuf=16 * 1024)
    sender = send_in_background(slow, b"1\n" * 300_000)
    time.sleep(1.0)                       # let it fill every buffer on the way
    assert ask(d.connect(timeout=3), "5") == "5"
    assert d.rss() - baseline < 16 * MiB
    received = bytearray()
    while received.count(b"\n") < 300_000:
        chunk = slow.recv(1 << 20)
        assert chunk, f"closed after {len(received)} bytes"
        received += chunk
    sender.join(10)
    slow.shutdown(socket.SHUT_WR)
    rest, how = read_until_closed(slow)
    assert (rest, how) == (b"", "eof")
    assert bytes(received).split(b"\n")[:-1] == [b"%d" % n for n in range(1, 300_001)]


def test_delayed_output_past_max_output_closes_the_session(mpxd_run, write_script):
    script = write_script("""
        from mpxd import send_response, sessions
        def handle_request(s):
            if s.request != "flood":
                s.response = "ok " + s.request
                return
            sent = 0
            for other in sessions():
                if other is s:
                    continue
                for _ in range(100_000):            # 100 MB if nothing stopped it
                    other.response = "z" * 1023
                    if not send_response(other):
                        break
                    sent += 1024
            s.response = f"flooded {sent}"
    """)
    max_output = 256 * 1024
    d = mpxd_run(script, "--max-output", str(max_output))
    baseline = d.rss()
    victim = d.connect(rcvbuf=16 * 1024)
    assert ask(victim, "hi") == "ok hi"
    flooder = d.connect()
    answer = ask(flooder, "flood")
    sent = int(answer.split()[1])
    assert max_output <= sent <= max_output + 1024
    data, _how = read_until_closed(victim)
    assert len(data) < 4 * MiB, "queued output was dropped, not delivered"
    assert set(data) <= set(b"z\n")
    d.wait_log(r"more than --max-output 262144; closing it")
    d.wait_log(r"closed: output overflow")
    assert ask(flooder, "still") == "ok still"
    assert d.rss() - baseline < 16 * MiB


# ---------------------------------------------------------- --max-connections

GREETER = """
def handle_open(s):
    s.response = f"hello {s.id}"

def handle_request(s):
    s.response = f"{s.id} {s.request}"
"""


def test_max_connections_leaves_clients_waiting_in_the_backlog(mpxd_run, write_script):
    d = mpxd_run(write_script(GREETER), "--max-connections", "2")
    first, second = d.connect(), d.connect()
    assert readline(first, bytearray()) == b"hello 1"
    assert readline(second, bytearray()) == b"hello 2"
    waiting = [d.connect(), d.connect()]      # the kernel completes the handshake
    cpu_before = d.cpu_seconds()
    for sock in waiting:
        sock.sendall(b"queued\n")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)                    # not accepted yet: no greeting
        sock.settimeout(10)
    # The listener left the poll set: a pending connection does not make the
    # loop spin (a level-triggered listener still polled would burn a core).
    assert d.cpu_seconds() - cpu_before < 0.15
    first.close()
    buffers = [bytearray(), bytearray()]
    assert readline(waiting[0], buffers[0]) == b"hello 3"
    assert readline(waiting[0], buffers[0]) == b"3 queued", "input sent while waiting"
    second.close()
    assert readline(waiting[1], buffers[1]) == b"hello 4"
    assert readline(waiting[1], buffers[1]) == b"4 queued"
    for sock in waiting:
        sock.close()
    assert wait_until(lambda: d.count_log("closed: eof") == 4)
    later = d.connect()
    assert readline(later, bytearray()) == b"hello 5"
    assert "ERROR" not in d.log() and "Traceback" not in d.log()
    # The operator is told why clients wait, once, not at every flap.
    assert d.count_log(r"WARNING --max-connections reached \(2 connections open\): "
                       r"new clients wait in the listen backlog") == 1


def test_running_out_of_descriptors_pauses_accepting_and_recovers(mpxd_run, write_script):
    d = mpxd_run(write_script(GREETER), "--max-connections", "500", nofile=48)
    clients = [d.connect() for _ in range(80)]
    greeted, waiting = [], []
    for sock in clients:
        sock.settimeout(0.3 if greeted and not waiting else 0.05)
        try:
            line = readline(sock, bytearray())
        except socket.timeout:
            waiting.append(sock)
        else:
            assert line.startswith(b"hello ")
            greeted.append(sock)
    assert greeted and waiting, f"{len(greeted)} greeted, {len(waiting)} waiting"
    assert len(greeted) < 48
    time.sleep(1.0)                           # several back-off periods pass
    assert d.count_log(r"cannot accept: Too many open files") == 1, \
        "logged once per burst, not once per attempt"
    assert d.proc.poll() is None
    for sock in greeted:
        sock.close()
    # Everyone who waited is served now, nobody was dropped.
    served = 0
    for sock in waiting:
        sock.settimeout(10)
        buffer = bytearray()
        if readline(sock, buffer).startswith(b"hello "):
            assert ask(sock, "ping").endswith(" ping")
            served += 1
        sock.close()
    assert served == len(waiting)
    later = d.connect()
    assert readline(later, bytearray()).startswith(b"hello ")
    assert "Traceback" not in d.log()
    later.close()
    assert d.stop() == 0


def test_lingering_closes_count_within_max_connections(mpxd_run, tmp_path):
    # A closed session keeps its descriptor up to 2 s for the client's
    # EOF.  Clients that never hang up, closed by the idle timeout, ran a
    # daemon at its default --max-connections out of descriptors.
    script = tmp_path / "quiet.py"
    script.write_text("def handle_request(s):\n    s.response = 'ok'\n")
    d = mpxd_run(str(script), "--idle-timeout", "0.3", nofile=100)   # 68 connections
    first = [d.connect() for _ in range(68)]
    assert wait_until(lambda: d.count_log(r"closed: timeout") == 68)
    second = [d.connect() for _ in range(68)]
    for sock in second:
        assert ask(sock, "x") == "ok"
    assert d.count_log(r"cannot accept") == 0
    for sock in first + second:
        sock.close()
    assert d.stop() == 0


def test_running_out_of_descriptors_pauses_the_control_socket_too(mpxd_run, write_script,
                                                                   tmp_path):
    # A control client waiting while descriptors ran out made every poll
    # return at once, and each logged "control: accept failed": 10,000 lines
    # a second, at full CPU.
    control = str(tmp_path / "control.sock")
    d = mpxd_run(write_script(GREETER), "--max-connections", "500", "--control", control,
                 nofile=48)
    clients = [d.connect() for _ in range(60)]
    assert wait_until(lambda: d.count_log(r"cannot accept: Too many open files") == 1)
    waiting = socket.socket(socket.AF_UNIX)
    waiting.connect(control)                    # queued: no descriptor to accept it with
    before = cpu_seconds(d.proc.pid)
    time.sleep(1.0)
    assert cpu_seconds(d.proc.pid) - before < 0.5
    assert d.count_log(r"control: cannot accept: Too many open files") == 1
    for sock in clients:
        sock.close()
    waiting.sendall(b"help\n")                  # served once descriptors are free
    waiting.settimeout(10)
    assert readline(waiting, bytearray()).startswith(b"stats ")
    waiting.close()
    assert d.stop() == 0


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(mpxd_run, write_script):
    # Shells and systemd hand out a soft limit of 1024: mpxd polls, so it
    # takes the hard limit, and more clients than the soft limit get served.
    d = mpxd_run(write_script(GREETER), "--log-level", "debug", nofile=(48, 400))
    with open(f"/proc/{d.proc.pid}/limits") as f:
        assert re.search(r"Max open files\s+400\s+400", f.read())
    d.wait_log(r"at most 368 connections \(file-descriptor limit 400\)")
    clients = [d.connect() for _ in range(120)]
    for sock in clients:
        sock.settimeout(10)
        assert readline(sock, bytearray()).startswith(b"hello ")
    assert "cannot accept" not in d.log()
    for sock in clients:
        sock.close()
    assert d.stop() == 0


HOGGER = GREETER + """
hogged = []

def handle_request(s):
    if s.request == "hog":                 # take every descriptor that is left
        try:
            while True:
                hogged.append(open("/dev/null"))
        except OSError:
            pass
        s.response = f"hogging {len(hogged)}"
    elif s.request == "free":
        while hogged:
            hogged.pop().close()
        s.response = "freed"
    else:
        s.response = f"{s.id} {s.request}"
"""


def test_accepting_resumes_after_a_back_off_without_any_session_closing(
        mpxd_run, write_script):
    d = mpxd_run(write_script(HOGGER), "--max-connections", "500", nofile=64)
    hog = d.connect()
    assert readline(hog, bytearray()) == b"hello 1"
    assert ask(hog, "hog").startswith("hogging ")
    waiting = d.connect()                     # the kernel completes the handshake
    d.wait_log(r"cannot accept: Too many open files")
    waiting.settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting.recv(100)
    assert ask(hog, "free") == "freed"        # nobody disconnects...
    waiting.settimeout(10)
    assert readline(waiting, bytearray()) == b"hello 2"   # ...yet accepting resumes
    assert ask(waiting, "ping") == "2 ping"
    assert d.count_log(r"cannot accept") == 1
    assert d.stop() == 0


# ------------------------------------------------------------- --idle-timeout

def test_idle_sessions_are_closed_and_busy_ones_are_not(mpxd_run):
    d = mpxd_run(COUNTER, "--idle-timeout", "1.5")
    idle, busy = d.connect(), d.connect()
    assert ask(idle, "1") == "1"
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < 3.0:
        count += 1
        assert ask(busy, "1") == str(count)
        time.sleep(0.25)
    assert read_until_closed(idle) == (b"", "eof")
    d.wait_log(r"session 1 127\.0\.0\.1:\d+ closed: timeout")
    assert ask(busy, "1") == str(count + 1)
    assert d.count_log("closed: timeout") == 1


BIG_ANSWERS = """
def handle_request(s):
    s.response = s.request + " " + "x" * 100_000
"""


def test_a_pipeline_held_back_by_backpressure_is_not_idle(mpxd_run, tmp_path):
    # Past the high-water mark mpxd stops reading, so no input comes: the
    # idle timeout closed the session and dropped the requests it had
    # received already (44 of 200 answered, no error).
    script = tmp_path / "big.py"
    script.write_text(BIG_ANSWERS)
    d = mpxd_run(str(script), "--idle-timeout", "1", "--send-timeout", "1")
    sock = d.connect()
    sock.sendall(b"".join(b"%d\n" % i for i in range(200)))
    time.sleep(1.5)                 # busy elsewhere; then reads it all
    data, how = read_until_closed_or(sock, lines=200)
    assert data.count(b"\n") == 200, (data.count(b"\n"), how)
    # A client that reads nothing is still closed, once its output stops
    # (and then given --send-timeout to take what is queued).
    dead = d.connect()
    dead.sendall(b"".join(b"%d\n" % i for i in range(200)))
    d.wait_log(r"session 2 127\.0\.0\.1:\d+ closed: timeout", timeout=10)


def read_until_closed_or(sock: socket.socket, lines: int) -> tuple[bytes, str]:
    """What comes until ``lines`` lines have, or the server closes."""
    chunks, count = [], 0
    while count < lines:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks), "closed"
        chunks.append(chunk)
        count += chunk.count(b"\n")
    return b"".join(chunks), "all"


def test_idle_timeout_is_off_by_default(mpxd_run):
    d = mpxd_run(COUNTER)
    sock = d.connect()
    time.sleep(1.5)
    assert ask(sock, "2") == "2"


# ----------------------------------------------------------- handler bugs

FAULTY = """
from mpxd import sessions

fail_next_open = False


def handle_open(s):
    global fail_next_open
    if fail_next_open:
        fail_next_open = False
        raise LookupError("handle_open broke on purpose")
    s.handle = {"fail_close": False}


def handle_request(s):
    global fail_next_open
    if s.request == "boom":
        raise ZeroDivisionError("handle_request broke on purpose")
    if s.request == "fail-next-open":
        fail_next_open = True
    if s.request == "fail-my-close":
        s.handle["fail_close"] = True
    s.response = f"{s.id} {s.request}"


def handle_close(s):
    if s.handle and s.handle["fail_close"]:
        raise KeyError("handle_close broke on purpose")
"""


def test_exceptions_in_each_handler_are_logged_and_survived(mpxd_run, write_script):
    d = mpxd_run(write_script(FAULTY))
    bystander = d.connect()
    assert ask(bystander, "hi") == "1 hi"

    # handle_request: earlier answers are written, later lines dropped.
    victim = d.connect()
    victim_port = victim.getsockname()[1]
    victim.sendall(b"first\nboom\nafter\n")
    assert read_until_closed(victim) == (b"2 first\n", "eof")
    match = d.wait_log(r"(?s)handle_request failed for session 2 "
                       rf"127\.0\.0\.1:{victim_port} on request 'boom':\n"
                       r"Traceback \(most recent call last\):.*"
                       r"ZeroDivisionError: handle_request broke on purpose")
    assert "'after'" not in d.log()
    assert match

    # handle_open: that session ends, nobody else notices.
    assert ask(bystander, "fail-next-open") == "1 fail-next-open"
    broken_open = d.connect()
    assert read_until_closed(broken_open)[0] == b""
    d.wait_log(r"(?s)handle_open failed for session 3 127\.0\.0\.1:\d+:\n"
               r"Traceback.*LookupError: handle_open broke on purpose")

    # handle_close: logged after the session is gone.
    closer = d.connect()
    assert ask(closer, "fail-my-close") == "4 fail-my-close"
    closer.close()
    d.wait_log(r"(?s)handle_close failed for session 4 127\.0\.0\.1:\d+:\n"
               r"Traceback.*KeyError: 'handle_close broke on purpose'")
    d.wait_log(r"session 4 127\.0\.0\.1:\d+ closed: eof")

    assert ask(bystander, "still here") == "1 still here"
    newcomer = d.connect()
    assert ask(newcomer, "new") == "5 new"
    assert d.stop() == 0


def test_routine_resets_are_not_logged_as_errors(mpxd_run):
    d = mpxd_run(COUNTER, "--log-level", "debug")
    for _ in range(5):
        sock = d.connect()
        sock.sendall(b"1\n1\n1\npartial")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert wait_until(lambda: d.count_log(r"closed: (reset|eof)") == 5)
    assert "Traceback" not in d.log() and " ERROR " not in d.log()
    assert ask(d.connect(), "7") == "7"


def test_a_closing_sessions_slow_reader_is_waited_for_and_a_stopped_one_dropped(
        mpxd_run, write_script):
    # What counts is what the client reads (the kernel's send queue), not
    # what mpxd wrote: a slow reader drains loopback's buffers long before
    # mpxd can write again.
    script = write_script("""
        from mpxd import close_session
        def handle_request(s):
            s.response = "x" * (16 * 1024 * 1024)
            close_session(s)
    """)
    d = mpxd_run(script, "--send-timeout", "1.5")
    slow = d.connect(rcvbuf=64 * 1024)
    slow.sendall(b"go\n")
    received = 0
    started = time.monotonic()
    while time.monotonic() - started < 3:        # three drain timeouts of reading
        chunk = slow.recv(64 * 1024)          # about 240 KB/s
        assert chunk, f"closed while the client read, after {received} bytes"
        received += len(chunk)
        time.sleep(0.2)
    assert "took none" not in d.log()
    d.wait_log(r"closing \(close_session\), but the client took none of its last "
               r"output for 1.5s; dropping it, with \d+ bytes unsent", timeout=5)
    data, _how = read_until_closed(slow)
    assert received + len(data) < 16 * 1024 * 1024
    assert d.stop() == 0
