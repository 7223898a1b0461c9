"""mpxd.signals and the loop's signal handling: TERM/INT drain, HUP reload, USR1.

The ``Wakeup`` tests use real signals sent to this process and a real
socketpair.  The rest run the real ``mpxd`` command: a handler script records
every ``handle_close`` to a file, so the tests can check that a shutdown
called it for every session, however it ended.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pexpect
import pytest

from conftest import HANDLERS, MPXD, ROOT, LineClient, wait_until
from spawn import mpxd, pid_gone  # noqa: F401 - a fixture
from mpxd import script
from mpxd.signals import StopDuringImport, Wakeup

# VERSION is what HUP tests change; s.handle counts this session's requests.
SCRIPT = """\
VERSION = "v1"
CALLS = {calls!r}


def record(*words):
    with open(CALLS, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")


def handle_open(s):
    record("open", s.id)


def handle_request(s):
    s.handle = (s.handle or 0) + 1
    words = s.request.split()
    if words and words[0] == "big":       # "big N": N lines of 99 bytes
        s.response = "\\n".join(["y" * 99] * int(words[1]))
        record("big", s.id)
    else:
        s.response = f"{{VERSION}} {{s.handle}} {{s.request}}"


def handle_close(s):
    record("close", s.id)
"""

BIG_LINES = 160_000                 # 16 MB of output: far more than socket buffers


def calls(path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


def exit_status(d, timeout: float = 10) -> int:
    """Wait for the pexpect-run daemon to exit by itself; its exit status."""
    d.child.expect(pexpect.EOF, timeout=timeout)
    d.child.close()
    return d.child.exitstatus


def slow_reader(port: int) -> socket.socket:
    """A client with a tiny receive buffer, so that mpxd has to queue its output."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def recording(tmp_path):
    """(script path, calls file path) for the recording handler."""
    calls_path = tmp_path / "calls"
    script = tmp_path / "handler.py"
    script.write_text(SCRIPT.format(calls=str(calls_path)))
    return str(script), calls_path


# ------------------------------------------------------------------ Wakeup

def test_wakeup_records_a_signal_and_becomes_readable():
    wakeup = Wakeup()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        wakeup.install((signal.SIGUSR1,))
        wakeup.install((signal.SIGUSR1,))          # a second install is a no-op
        os.kill(os.getpid(), signal.SIGUSR1)
        readable, _, _ = select.select([wakeup.fileno()], [], [], 5)
        assert readable == [wakeup.fileno()]
        assert wakeup.drain() == [signal.SIGUSR1]
        assert wakeup.drain() == []
        readable, _, _ = select.select([wakeup.fileno()], [], [], 0)
        assert readable == []
    finally:
        wakeup.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_wakeup_wake_from_a_thread_records_no_signal():
    wakeup = Wakeup()
    try:
        thread = threading.Thread(target=wakeup.wake)
        thread.start()
        thread.join()
        readable, _, _ = select.select([wakeup.fileno()], [], [], 5)
        assert readable == [wakeup.fileno()]
        assert wakeup.drain() == []
    finally:
        wakeup.close()


def test_wakeup_uninstall_restores_the_previous_wakeup_fd():
    wakeup = Wakeup()
    wakeup.install((signal.SIGUSR2,))
    wakeup.close()
    assert signal.set_wakeup_fd(-1) == -1      # nothing left installed


def test_interrupting_raises_for_a_stop_signal_once_and_keeps_it_pending():
    wakeup = Wakeup()
    try:
        wakeup.install((signal.SIGUSR1, signal.SIGINT))
        with wakeup.interrupting():
            os.kill(os.getpid(), signal.SIGUSR1)    # not a stop: no exception
        assert wakeup.stop_pending is None
        with pytest.raises(StopDuringImport) as raised:
            with wakeup.interrupting():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)                       # the handler raises before this ends
        assert raised.value.signum == signal.SIGINT
        assert wakeup.stop_pending == signal.SIGINT
        with pytest.raises(StopDuringImport):      # still pending: raised on the way in
            with wakeup.interrupting():
                pass
        assert wakeup.drain() == [signal.SIGUSR1, signal.SIGINT]
        assert wakeup.stop_pending is None
        os.kill(os.getpid(), signal.SIGINT)         # outside: only recorded
        assert wakeup.stop_pending == signal.SIGINT
    finally:
        wakeup.close()


def test_a_stop_during_a_reload_lands_in_the_script_not_in_mpxds_bookkeeping(
        tmp_path, monkeypatch):
    # The whole load was interruptible: a TERM while mpxd swapped the
    # helpers left sys.path and sys.modules half done for the version that
    # drains.  Now it waits for the script's code and is raised there.
    helper = f"mpxd_test_helper_{uuid.uuid4().hex}"
    (tmp_path / f"{helper}.py").write_text("WORD = 'one'\n")
    path = tmp_path / "app.py"
    path.write_text(f"import {helper}\ndef handle_request(s):\n    s.response = {helper}.WORD\n")
    first = script.load_script(str(path))
    path_before, serving_helper = list(sys.path), sys.modules[helper]

    def term_in_the_middle(module):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)                 # the signal's handler runs meanwhile
    monkeypatch.setattr(script, "_forget_bytecode_older_than_its_source", term_in_the_middle)
    wakeup = Wakeup()
    try:
        wakeup.install((signal.SIGTERM,))
        with pytest.raises(StopDuringImport):
            script.load_script(str(path), interruptible=False, stoppable_by=wakeup)
        assert wakeup.stop_pending == signal.SIGTERM
    finally:
        wakeup.close()
    assert sys.path == path_before
    assert sys.modules[helper] is serving_helper
    assert first.module.__dict__[helper] is serving_helper


def test_a_forked_child_gets_default_signal_handling_back():
    # multiprocessing's Process.terminate() (a SIGTERM) did nothing in a
    # child forked from a handler: it had inherited handlers that only record.
    wakeup = Wakeup()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        wakeup.install((signal.SIGUSR1,))
        pid = os.fork()
        if pid == 0:                            # pragma: no cover - the child
            os.kill(os.getpid(), signal.SIGUSR1)    # the default action: killed
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == wakeup._record   # the parent's stay
    finally:
        wakeup.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_close_for_exit_leaves_stop_signals_ignored_not_fatal():
    # After the loop ends, a second TERM (an operator's, systemd's, a
    # supervisor passing one on) used to meet the default action and kill
    # the clean exit: a --workers run then ended with status 1 about one
    # time in fifteen.  In a child process: this one's signals stay as they are.
    pid = os.fork()
    if pid == 0:                                # pragma: no cover - the child
        code = 1
        try:
            wakeup = Wakeup()
            wakeup.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                            signal.SIGUSR1, signal.SIGCHLD))
            wakeup.close_for_exit()
            ignored = all(signal.getsignal(n) == signal.SIG_IGN for n in
                          (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1))
            restored = signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGHUP)
            code = 0 if ignored and restored and signal.set_wakeup_fd(-1) == -1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------- TERM/INT

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signal_closes_every_session_removes_pidfile_exits_0(
        daemon, recording, tmp_path, signum):
    script, calls_path = recording
    pidfile = tmp_path / "mpxd.pid"
    d = daemon(script, "--pidfile", str(pidfile))
    clients = [d.connect() for _ in range(3)]
    assert clients[0].ask("hello") == "v1 1 hello"
    assert clients[1].ask("a") == "v1 1 a"
    assert clients[1].ask("b") == "v1 2 b"
    assert wait_until(lambda: len(calls(calls_path)) == 3)   # all three accepted
    d.signal(signum)
    d.expect_log(r"shutting down: 3 sessions to drain \(at most 10s\)")   # the default
    for client in clients:
        assert client.read_all() == b""            # closed by the server
    assert exit_status(d) == 0
    assert sorted(calls(calls_path)) == ["close 1", "close 2", "close 3",
                                         "open 1", "open 2", "open 3"]
    assert not pidfile.exists()


def test_term_writes_queued_output_before_closing(daemon, recording):
    script, calls_path = recording
    d = daemon(script, "--drain-timeout", "60")
    sock = slow_reader(d.port)
    sock.sendall(f"big {BIG_LINES}\n".encode())
    assert wait_until(lambda: "big 1" in calls(calls_path))
    d.signal(signal.SIGTERM)
    d.expect_log(r"shutting down: 1 session")
    data = receive_all(sock)
    assert len(data) == BIG_LINES * 100
    assert data == (b"y" * 99 + b"\n") * BIG_LINES
    d.expect_log(r"session 1 \S+ closed: shutdown")
    assert exit_status(d) == 0
    assert calls(calls_path)[-1] == "close 1"


def test_term_handles_no_more_input(daemon, recording):
    """Lines received but not yet handled, and lines sent later, are dropped."""
    script, calls_path = recording
    d = daemon(script, "--drain-timeout", "60")
    sock = slow_reader(d.port)
    # "held" arrives with "big" but waits: the big answer is past the high-water mark.
    sock.sendall(f"big {BIG_LINES}\nheld\n".encode())
    assert wait_until(lambda: "big 1" in calls(calls_path))
    d.signal(signal.SIGTERM)
    d.expect_log(r"shutting down: 1 session")
    sock.sendall(b"big 1\nlater\n")
    data = receive_all(sock)
    assert data == (b"y" * 99 + b"\n") * BIG_LINES      # no "v1 2 held", no "later"
    sock.close()
    assert exit_status(d) == 0
    assert calls(calls_path) == ["open 1", "big 1", "close 1"]


def test_second_term_during_drain_ends_it_at_once(daemon, recording):
    script, calls_path = recording
    d = daemon(script, "--drain-timeout", "600")
    sock = slow_reader(d.port)
    sock.sendall(f"big {BIG_LINES}\n".encode())
    assert wait_until(lambda: "big 1" in calls(calls_path))
    d.signal(signal.SIGTERM)
    d.expect_log(r"shutting down: 1 session")
    assert d.child.isalive()                      # the client reads nothing: draining
    d.signal(signal.SIGTERM)
    d.expect_log(r"second stop signal: closing 1 session now")
    assert exit_status(d) == 0                    # long before the 600 s drain timeout
    assert calls(calls_path) == ["open 1", "big 1", "close 1"]
    assert len(receive_all_or_reset(sock)) < BIG_LINES * 100


def test_drain_timeout_bounds_the_drain(daemon, recording):
    script, calls_path = recording
    d = daemon(script, "--drain-timeout", "0.5")
    sock = slow_reader(d.port)
    sock.sendall(f"big {BIG_LINES}\n".encode())
    assert wait_until(lambda: "big 1" in calls(calls_path))
    d.signal(signal.SIGINT)
    d.expect_log(r"shutting down: 1 session to drain \(at most 0.5s\)")
    d.expect_log(r"drain timeout: closing 1 session with output unsent")
    assert exit_status(d) == 0
    assert calls(calls_path) == ["open 1", "big 1", "close 1"]
    sock.close()


def receive_all_or_reset(sock: socket.socket) -> bytes:
    """What arrives until EOF, or until the server's reset (it dropped output)."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_term_stops_accepting_new_connections(daemon, recording):
    script, _calls = recording
    d = daemon(script, "--drain-timeout", "60")
    sock = slow_reader(d.port)
    sock.sendall(f"big {BIG_LINES}\n".encode())
    assert sock.recv(1)                          # handled; output is queued
    d.signal(signal.SIGTERM)
    d.expect_log(r"shutting down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(d.address, timeout=5)
    sock.close()
    assert exit_status(d) == 0


# --------------------------------------------------------------------- HUP

def rewrite_same_size_and_time(path: str, old: str, new: str) -> None:
    """Change ``path`` to a text of the same size with the same mtime.

    A loader that trusted cached bytecode (keyed on size and mtime) would
    keep running the old version.
    """
    assert len(old) == len(new)
    before = os.stat(path)
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def stuck(daemon, tmp_path, source: str):
    """A daemon serving ``source`` (stuck.py), and a client whose request it is stuck on."""
    script = tmp_path / "stuck.py"
    script.write_text(source)
    d = daemon(str(script))
    client = d.connect()
    client.send("x\n")
    time.sleep(0.3)                             # the handler is stuck now
    return d, client


def test_a_third_stop_signal_ends_a_stuck_daemon(daemon, tmp_path):
    # A handler that never returns keeps the loop from taking up TERM and
    # INT: ^C, ^C, ^C did nothing, and only SIGKILL ended it.
    d, client = stuck(daemon, tmp_path, "import time\n"
                                        "def handle_request(s):\n"
                                        "    time.sleep(60)\n")
    for _ in range(3):
        d.signal(signal.SIGINT)
        time.sleep(1.1)
    d.expect_log(r"mpxd: 3 stop signals in 2s and the loop took up none: a handler "
                 r"\(or a timer, or on_reload\) is stuck; exiting now, without a drain")
    # And where: the stuck line, so that the operator need not guess.
    d.expect_log(r'File "[^"]*stuck.py", line 3 in handle_request')
    assert d.stop() == 1


def test_a_watchdogs_abort_logs_where_the_handler_is_stuck(daemon, tmp_path):
    # systemd's watchdog sends SIGABRT to a daemon whose loop a handler
    # blocks: the journal showed the restart, and nothing of why.
    d, client = stuck(daemon, tmp_path, "def spin():\n"
                                        "    while True:\n"
                                        "        pass\n"
                                        "def handle_request(s):\n"
                                        "    spin()\n")
    d.signal(signal.SIGABRT)
    d.expect_log(r"Fatal Python error: Aborted")
    d.expect_log(r'stuck.py", line [23] in spin\r?\n.*stuck.py", line 5 in handle_request')
    assert d.stop() == -signal.SIGABRT          # the default action stays


def test_stop_signals_in_a_quick_burst_still_drain(daemon):
    # The loop had no time to take them up, but it is not stuck: graceful.
    d = daemon(os.path.join(HANDLERS, "counter.py"))
    for _ in range(3):
        d.signal(signal.SIGTERM)
    d.expect_log(r"stopped")
    assert d.stop() == 0


def test_hup_swaps_in_a_good_script_and_sessions_keep_their_handle(daemon, recording):
    script, _calls = recording
    d = daemon(script)
    old = d.connect()
    assert old.ask("a") == "v1 1 a"
    rewrite_same_size_and_time(script, '"v1"', '"v2"')
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded .*handler\.py")
    assert old.ask("b") == "v2 2 b"             # same session, same s.handle
    new = d.connect()
    assert new.ask("c") == "v2 1 c"
    assert d.stop() == 0


BROKEN_VERSIONS = {
    "syntax error": ("def handle_request(s)\n    pass\n", r"syntax error at line 1"),
    "exception at import": ("raise RuntimeError('nope')\n", r"RuntimeError: nope"),
    "no handle_request": ("def handle_close(s):\n    pass\n", r"does not define handle_request"),
    # Not the operator's ^C (SIGINT drains): the script's own, so an error like any other.
    "KeyboardInterrupt at import": ("raise KeyboardInterrupt\n", r"KeyboardInterrupt"),
    # Refused at start-up, so refused on reload too, though a server runs then.
    "timer at import": ("import mpxd\nmpxd.call_every(1, print)\n"
                        "def handle_request(s):\n    pass\n", r"on_start\(server\)"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_VERSIONS))
def test_hup_with_a_broken_script_keeps_the_old_one_serving(daemon, recording, broken):
    script, _calls = recording
    good = open(script).read()
    source, error = BROKEN_VERSIONS[broken]
    d = daemon(script)
    client = d.connect()
    assert client.ask("a") == "v1 1 a"
    with open(script, "w") as f:
        f.write(source)
    d.signal(signal.SIGHUP)
    d.expect_log(r"reload failed, still serving the previous version: .*handler\.py: .*"
                 + error)
    assert client.ask("b") == "v1 2 b"
    assert d.connect().ask("c") == "v1 1 c"
    with open(script, "w") as f:                 # fixed: the next HUP takes it
        f.write(good.replace('"v1"', '"v3"'))
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    assert client.ask("d") == "v3 3 d"
    assert d.stop() == 0


def test_hup_lets_the_old_versions_go(daemon, tmp_path):
    # Each HUP kept the previous version with all its data (in sys.modules,
    # in the start-up code's frame, in uncollected cycles): ten reloads of a
    # script holding 100,000 strings grew the daemon by 60 MB for good.
    script = tmp_path / "versioned.py"
    script.write_text("import builtins, weakref\n"
                      "class Marker:\n"
                      "    pass\n"
                      "MARKER = Marker()\n"
                      "builtins.__dict__.setdefault('_versions', []).append(weakref.ref(MARKER))\n"
                      "def handle_request(s):\n"
                      "    alive = sum(ref() is not None for ref in builtins._versions)\n"
                      "    s.response = f'{alive} of {len(builtins._versions)}'\n")
    d = daemon(str(script))
    for _ in range(3):
        d.signal(signal.SIGHUP)
        d.expect_log(r"reloaded")
    assert d.connect().ask("x") == "1 of 4"
    assert d.stop() == 0


def test_hup_reloads_the_helper_modules_beside_the_script_too(daemon, tmp_path):
    (tmp_path / "words.py").write_text("GREETING = 'hello'\n")
    script = tmp_path / "greeter.py"
    script.write_text("import words\n"
                      "def handle_request(s):\n"
                      "    s.response = words.GREETING + ' ' + s.request\n")
    d = daemon(str(script))
    client = d.connect()
    assert client.ask("ann") == "hello ann"
    (tmp_path / "words.py").write_text("GREETING = 'goodbye'\n")
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    assert client.ask("bob") == "goodbye bob"
    assert d.stop() == 0


def test_a_script_cannot_take_the_daemons_signals(daemon, tmp_path):
    # Its SIGTERM handler used to replace mpxd's on a HUP: TERM then only
    # printed "mine" and the daemon ran on until it was killed.
    script = tmp_path / "own_signals.py"
    script.write_text("import signal\n"
                      "signal.signal(signal.SIGTERM, lambda *a: print('mine'))\n"
                      "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
                      "def handle_request(s):\n"
                      "    s.response = 'ok'\n")
    d = daemon(str(script))
    assert re.search(rb"own_signals.py set its own handler for SIGTERM, SIGUSR1 at import; "
                     rb"mpxd keeps its own", d.child.before)      # the lines before listening
    assert d.connect().ask("x") == "ok"
    d.signal(signal.SIGHUP)
    d.expect_log(r"set its own handler for SIGTERM, SIGUSR1 at import")
    d.expect_log(r"reloaded")
    assert d.stop(timeout=5) == 0


def test_nor_take_them_in_on_start_or_in_a_handler(daemon, tmp_path):
    # on_start is where libraries get set up, and some set signal handlers:
    # TERM then only printed "mine" and the daemon had to be killed.
    script = tmp_path / "later_signals.py"
    script.write_text("import signal\n"
                      "def on_start(server):\n"
                      "    signal.signal(signal.SIGTERM, lambda *a: print('mine'))\n"
                      "def handle_request(s):\n"
                      "    signal.signal(signal.SIGTERM, lambda *a: print('mine again'))\n"
                      "    s.response = 'ok'\n")
    d = daemon(str(script))
    assert re.search(rb"later_signals.py set its own handler for SIGTERM in on_start; "
                     rb"mpxd keeps its own", d.child.before)
    assert d.connect().ask("x") == "ok"     # the handler's own goes unnoticed, until...
    d.signal(signal.SIGTERM)
    d.expect_log(r"SIGTERM reached a handler the script set after start-up; mpxd keeps "
                 r"its own")
    d.expect_log(r"shutting down")
    d.expect_log(r"stopped")
    assert d.stop() == 0


def test_a_stop_that_came_while_on_start_had_its_own_handler_still_stops(tmp_path):
    # The script's handler took the TERM, then mpxd restored its own and
    # had seen nothing: the stop was lost.
    script = tmp_path / "late_term.py"
    script.write_text("import os, signal, time\n"
                      "def on_start(server):\n"
                      "    signal.signal(signal.SIGTERM, lambda *a: print('mine'))\n"
                      "    os.kill(os.getpid(), signal.SIGTERM)\n"
                      "    time.sleep(0.1)\n"
                      "def handle_request(s):\n"
                      "    s.response = 'ok'\n")
    result = subprocess.run([*MPXD, "--port", "0", "--host", "127.0.0.1", str(script)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "set its own handler for SIGTERM in on_start" in result.stderr
    assert "SIGTERM during start-up: stopped before serving" in result.stderr


def test_a_script_cannot_make_a_leaving_client_kill_the_daemon(daemon, tmp_path):
    # signal(SIGPIPE, SIG_DFL), a common CLI idiom, made the first client
    # that closed during a write kill mpxd (status 141, nothing logged).
    script = tmp_path / "default_pipe.py"
    script.write_text("import signal\n"
                      "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
                      "def handle_request(s):\n"
                      "    s.response = 'x' * 100000\n")
    path = str(tmp_path / "mpxd.sock")
    d = daemon(str(script), "--unix", path)
    assert b"set its own handler for SIGPIPE at import; mpxd keeps its own" \
        in d.child.before
    for _ in range(10):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b"a\n" * 500)
            sock.recv(1000)             # then leave while it writes
    c = d.connect()
    c.send("still here\n")
    assert len(c.readline()) == 100000
    assert d.stop() == 0


# ------------------------------------------------------- during start-up

SLOW_START = """\
import pathlib, time
pathlib.Path({marker!r}).write_text("importing")
try:
    time.sleep({import_sleep})          # a slow import: a model, a database, ...
except {caught}:
    pass
def on_start(server):
    pathlib.Path({marker!r}).write_text("starting")
    time.sleep({start_sleep})
def on_stop(server):
    pathlib.Path({marker!r}).write_text("on_stop ran")
def handle_request(s):
    s.response = "ok"
"""


def slow_script(tmp_path, caught: str = "ZeroDivisionError", import_sleep: float = 30,
                start_sleep: float = 0) -> tuple[str, str]:
    """A script that sleeps at import and in on_start; its marker file says where it is."""
    marker = str(tmp_path / "marker")
    script = tmp_path / "slow.py"
    script.write_text(SLOW_START.format(marker=marker, caught=caught,
                                        import_sleep=import_sleep, start_sleep=start_sleep))
    return str(script), marker


def wait_for_marker(marker: str, text: str) -> None:
    assert wait_until(lambda: os.path.exists(marker) and open(marker).read() == text,
                      timeout=10), f"the script never wrote {text!r}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_a_stop_signal_during_a_slow_import_stops_cleanly_at_once(mpxd, tmp_path, signum):
    # It used to kill mpxd (status 143, nothing logged), leaving the
    # pidfile and the unix socket file behind.
    script, marker = slow_script(tmp_path)
    pidfile, unix = tmp_path / "mpxd.pid", tmp_path / "mpxd.sock"
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--pidfile", str(pidfile),
              "--unix", str(unix), script])
    wait_for_marker(marker, "importing")
    assert pidfile.exists() and unix.exists()
    d.signal(signum)
    assert d.wait(timeout=5) == 0                       # not after the 30 s sleep
    name = signal.Signals(signum).name
    assert f"{name} during start-up: stopped before serving" in d.log()
    assert "listening on" not in d.log()
    assert open(marker).read() == "importing"           # no on_start, so no on_stop
    assert not pidfile.exists() and not unix.exists()


def test_a_script_that_swallows_the_stop_is_still_not_started(mpxd, tmp_path):
    script, marker = slow_script(tmp_path, caught="BaseException")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", script])
    wait_for_marker(marker, "importing")
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=5) == 0, d.log()
    assert "SIGTERM during start-up: stopped before serving" in d.log()
    assert open(marker).read() == "importing"           # on_start did not run


def test_a_stop_signal_during_on_start_runs_on_stop_and_does_not_serve(mpxd, tmp_path):
    script, marker = slow_script(tmp_path, import_sleep=0, start_sleep=1)
    d = mpxd(["--port", "0", "--host", "127.0.0.1", script])
    wait_for_marker(marker, "starting")
    d.signal(signal.SIGTERM)                # on_start is not interrupted
    assert d.wait(timeout=5) == 0
    assert open(marker).read() == "on_stop ran"
    assert "SIGTERM during start-up: stopped before serving" in d.log()
    assert "listening on" not in d.log()


def test_other_signals_during_start_up_are_not_fatal_and_wait_for_the_loop(mpxd, tmp_path):
    # Their default actions killed mpxd; a HUP reloads once it serves.
    script, marker = slow_script(tmp_path, import_sleep=1)
    d = mpxd(["--port", "0", "--host", "127.0.0.1", script])
    wait_for_marker(marker, "importing")
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        d.signal(signum)
    d.wait_listening()
    d.wait_for(r"reloading .*slow\.py")
    d.wait_for(r"USR2 ignored")
    assert d.stop() == 0


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_a_stop_signal_during_a_slow_reload_import_abandons_the_reload(mpxd, tmp_path, workers):
    # The stop waited for the whole import (8 s in the report; for ever if
    # it hung): systemctl stop ran into its SIGKILL, and three TERMs blamed
    # "a handler" and left the pidfile behind.
    script, marker = slow_script(tmp_path, import_sleep=0)
    pidfile = tmp_path / "mpxd.pid"
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--pidfile", str(pidfile),
              *workers, script])
    port = d.wait_listening()
    c = LineClient(("127.0.0.1", port))
    assert c.ask("x") == "ok"
    slow, _ = slow_script(tmp_path, import_sleep=30)     # the same file, now slow
    os.remove(marker)
    d.signal(signal.SIGHUP)
    wait_for_marker(marker, "importing")
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=8) == 0, d.log()                # not after the 30 s sleep
    assert "reload abandoned: SIGTERM during the import of" in d.log()
    assert "stuck" not in d.log() and "ERROR" not in d.log()   # a stop, not a failure
    with pytest.raises(EOFError):
        c.readline()                                      # drained and closed
    assert open(marker).read() == "on_stop ran"           # the old version's on_stop
    assert not pidfile.exists()


def test_hups_that_come_during_a_slow_reload_are_one_more_reload(mpxd, tmp_path):
    # Each HUP was its own reload, one after another: ten HUPs during a
    # 1.5 s import paused the service for 14 s.
    script, marker = slow_script(tmp_path, import_sleep=0)
    d = mpxd(["--port", "0", "--host", "127.0.0.1", script])
    d.wait_listening()
    slow_script(tmp_path, import_sleep=1.5)             # the same file, now slow
    d.signal(signal.SIGHUP)
    wait_for_marker(marker, "importing")                # the reload is under way
    for _ in range(5):                                  # well within its 1.5 s
        d.signal(signal.SIGHUP)
        time.sleep(0.02)
    assert wait_until(lambda: d.log().count("INFO reloaded ") == 2, timeout=10), d.log()
    time.sleep(0.5)
    # The first, then one more for all five: no third.
    assert d.log().count("INFO reloading ") == 2, d.log()
    assert d.stop() == 0


def test_a_daemon_stopped_during_start_up_fails_its_launcher(mpxd, tmp_path):
    script, marker = slow_script(tmp_path)
    pidfile = tmp_path / "mpxd.pid"
    launcher = mpxd(["--daemon", "--port", "0", "--host", "127.0.0.1",
                     "--pidfile", str(pidfile), script])
    wait_for_marker(marker, "importing")
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert launcher.wait(timeout=5) == 1
    assert "Error: SIGTERM during start-up: stopped before serving" in launcher.stderr()
    assert not pidfile.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_c_to_the_waiting_launcher_stops_the_daemon_too(mpxd, tmp_path, signum):
    # The launcher said "Aborted!" and exited 1, and the daemon went on to
    # serve: an init script saw a failure, and its retry "another mpxd".
    script, marker = slow_script(tmp_path)
    pidfile = tmp_path / "mpxd.pid"
    launcher = mpxd(["--daemon", "--port", "0", "--host", "127.0.0.1",
                     "--pidfile", str(pidfile), script])
    wait_for_marker(marker, "importing")
    daemon_pid = int(pidfile.read_text())
    try:
        launcher.signal(signum)
        assert launcher.wait(timeout=5) == 1
        assert launcher.stderr().endswith(
            "\nError: SIGTERM during start-up: stopped before serving\n")
        assert wait_until(lambda: pid_gone(daemon_pid), timeout=5)
        assert not pidfile.exists()
    finally:
        if not pid_gone(daemon_pid):        # a detached daemon must not outlive the test
            os.kill(daemon_pid, signal.SIGKILL)


def test_a_handlers_multiprocessing_child_can_be_terminated(daemon, tmp_path):
    script = tmp_path / "spawner.py"
    script.write_text("import multiprocessing, time\n"
                      "def handle_request(s):\n"
                      "    p = multiprocessing.Process(target=time.sleep, args=(30,))\n"
                      "    p.start()\n"
                      "    p.terminate()\n"
                      "    p.join(5)\n"
                      "    s.response = f'exitcode {p.exitcode}'\n"
                      "    if p.is_alive():\n"
                      "        p.kill()\n")
    d = daemon(str(script))
    assert d.connect().ask("go") == f"exitcode {-signal.SIGTERM}"
    assert d.stop() == 0


def test_hup_during_drain_is_ignored(daemon, recording):
    script, calls_path = recording
    d = daemon(script, "--drain-timeout", "60")
    sock = slow_reader(d.port)
    sock.sendall(f"big {BIG_LINES}\n".encode())
    assert wait_until(lambda: "big 1" in calls(calls_path))
    d.signal(signal.SIGTERM)
    d.expect_log(r"shutting down")
    d.signal(signal.SIGHUP)
    d.expect_log(r"not reloading .*: shutting down")
    assert len(receive_all(sock)) == BIG_LINES * 100
    assert exit_status(d) == 0


# -------------------------------------------------------------------- USR1

def test_usr1_reopens_a_renamed_log_file(mpxd, recording, tmp_path):
    script, _calls = recording
    log_file = tmp_path / "mpxd.log"
    rotated = tmp_path / "mpxd.log.1"
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--log-file", "mpxd.log", script],
             log_file=log_file, cwd=str(tmp_path))
    port = m.wait_listening()
    os.rename(log_file, rotated)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"before\n")
        assert sock.recv(100) == b"v1 1 before\n"
    assert wait_until(lambda: "session 1" in rotated.read_text())  # still the old file
    m.signal(signal.SIGUSR1)
    assert wait_until(lambda: log_file.exists() and "reopened" in log_file.read_text())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"after\n")
        assert sock.recv(100) == b"v1 1 after\n"
    assert m.stop() == 0
    new_lines = log_file.read_text()
    old_lines = rotated.read_text()
    assert f"log file {log_file} reopened" in new_lines
    assert "session 2" in new_lines and "stopped" in new_lines
    assert "session 2" not in old_lines and "reopened" not in old_lines
    assert "listening on" in old_lines and "listening on" not in new_lines
    assert m.stderr() == ""


def test_usr1_when_the_new_file_cannot_be_created_keeps_logging(mpxd, recording, tmp_path):
    script, _calls = recording
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_file = log_dir / "mpxd.log"
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--log-file", str(log_file), script],
             log_file=log_file)
    m.wait_listening()
    rotated = tmp_path / "mpxd.log.1"
    os.rename(log_file, rotated)
    log_dir.rmdir()                               # nowhere to create the new file
    m.signal(signal.SIGUSR1)
    assert wait_until(lambda: "cannot reopen log file" in rotated.read_text())
    assert m.proc.poll() is None                  # still serving
    assert m.stop() == 0
    assert "stopped" in rotated.read_text()


def test_usr2_is_ignored_with_a_warning_not_fatal(daemon, recording):
    # Its default action killed mpxd at once: no drain, pidfile and unix
    # sockets left behind. nginx and gunicorn operators send it to upgrade.
    script, _calls = recording
    d = daemon(script)
    c = d.connect()
    d.signal(signal.SIGUSR2)
    d.expect_log(r"WARNING USR2 ignored: mpxd has no binary upgrade as nginx and "
                 r"gunicorn do; HUP reloads the script, a restart upgrades mpxd")
    assert c.ask("x") == "v1 1 x"
    assert d.stop() == 0


def test_usr1_without_a_log_file_is_harmless(daemon, recording):
    script, _calls = recording
    d = daemon(script)
    d.signal(signal.SIGUSR1)
    d.expect_log(r"no log file to reopen")
    assert d.connect().ask("x") == "v1 1 x"
    assert d.stop() == 0
