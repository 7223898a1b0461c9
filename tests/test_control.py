"""mpxd.control and mpxctl: every control command against a daemon under load."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, wait_until
from mpxd.mpxctl import ControlClient, DaemonError, render_sessions, render_stats

HANDLER = '''
VERSION = "one"

def handle_request(s):
    s.response = "version " + VERSION if s.request == "version" else s.request
'''


class Load:
    """Clients asking and reading in a loop, in threads, until ``stop``."""

    def __init__(self, port: int, clients: int = 6) -> None:
        self.port = port
        self.done = threading.Event()
        self.answers = [0] * clients
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]
        for thread in self.threads:
            thread.start()
        assert wait_until(lambda: all(self.answers), timeout=10), "load did not start"

    def _client(self, index: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                f = sock.makefile("rwb")
                while not self.done.is_set():
                    f.write(b"ping %d\n" % index)
                    f.flush()
                    if f.readline() != b"ping %d\n" % index:
                        raise AssertionError("wrong or no answer")
                    self.answers[index] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            if not self.done.is_set():
                self.failures.append(e)

    def total(self) -> int:
        return sum(self.answers)

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(10)


def ask(path: str, command: str) -> tuple[list[str], str]:
    client = ControlClient(path, 10.0)
    try:
        return client.ask(command)
    finally:
        client.close()


def stats(path: str) -> dict[str, str]:
    lines, _ = ask(path, "stats")
    return dict(line.split(" ", 1) for line in lines if not line.startswith("listener "))


def mpxctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpxd.mpxctl", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def with_control(mpxd, tmp_path, source: str, name: str = "handler.py"):  # noqa: F811
    """A daemon serving ``source`` with a control socket: (daemon, socket path, port)."""
    script = tmp_path / name
    script.write_text(source)
    control = str(tmp_path / "control.sock")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--control", control, str(script)])
    return d, control, d.wait_listening()


@pytest.fixture
def served(mpxd, tmp_path):  # noqa: F811
    """A daemon with --control and --pidfile, and 6 clients keeping it busy."""
    script = tmp_path / "handler.py"
    script.write_text(HANDLER)
    control = str(tmp_path / "control.sock")
    pidfile = str(tmp_path / "mpxd.pid")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--control", control,
              "--pidfile", pidfile, str(script)])
    d.wait_listening()
    d.control, d.pidfile, d.script = control, pidfile, script
    load = Load(d.port)
    yield d, load
    load.stop()
    assert not load.failures, load.failures


def test_control_socket_is_private(served):
    d, _load = served
    st = os.stat(d.control)
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == os.geteuid()


def test_stats_show_live_figures(served):
    d, load = served
    first = stats(d.control)
    assert wait_until(lambda: load.total() > int(first["requests"]) + 100)
    second = stats(d.control)
    assert int(second["requests"]) > int(first["requests"])
    assert int(second["bytes_in"]) > int(first["bytes_in"]) > 0
    assert int(second["bytes_out"]) > 0
    assert second["connections"] == "6" and second["connections_total"] == "6"
    assert second["state"] == "serving" and second["pid"] == str(d.pid)
    assert float(second["uptime"]) >= float(first["uptime"])
    assert second["errors"] == "0" and second["reloads"] == "0"
    lines, _ = ask(d.control, "stats")
    assert f"listener 127.0.0.1:{d.port} open=6 total=6" in lines


def test_the_control_socket_keeps_no_closed_session_in_memory(mpxd, tmp_path):  # noqa: F811
    # Its per-listener tally kept every session until 1,024 more came: 200
    # closed sessions, each holding 5 MB in s.handle, kept 1 GB.
    d, control, port = with_control(mpxd, tmp_path, "def handle_request(s):\n"
                                    "    s.handle = bytearray(4_000_000)\n"
                                    "    s.response = 'ok'\n")

    def rss() -> int:
        with open(f"/proc/{d.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    before = rss()
    for _ in range(60):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"x\n")
            assert c.recv(10) == b"ok\n"
    d.wait_for(r"session 60 \S+ closed")        # not stats: it would prune
    assert rss() - before < 40_000_000          # 240 MB if the 60 were kept
    figures = stats(control)
    assert figures["connections_total"] == "60"
    assert figures["bytes_in"] == "120" and figures["bytes_out"] == "180"
    lines, _ = ask(control, "stats")
    assert f"listener 127.0.0.1:{port} open=0 total=60" in lines
    assert d.stop() == 0


BUSY = """
import time

def handle_request(s):
    if s.request == "slow":
        time.sleep(1.5)                 # the loop is busy meanwhile
    s.response = "ok"

def handle_close(s):
    time.sleep(0.5)
"""


def test_mpxctl_waits_for_a_busy_daemon_instead_of_calling_it_gone(mpxd, tmp_path):  # noqa: F811
    # With the loop busy, control clients queue up; past the queue's 16 a
    # connect fails at once (EAGAIN): status exited 3 at once, and
    # stop --wait took it for the daemon gone while it still drained.
    d, control, port = with_control(mpxd, tmp_path, BUSY, "busy.py")
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"slow\n")
    time.sleep(0.2)
    queued = []
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            sock.connect(control)
        except BlockingIOError:
            sock.close()
            break
        queued.append(sock)
    result = mpxctl("status", "--control", control, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    for sock in queued:
        sock.close()
    assert slow.recv(10) == b"ok\n"
    others = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    started = time.monotonic()
    result = mpxctl("stop", "--control", control, "--wait", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 1.5        # 4 handle_close of 0.5 s each
    assert d.wait(timeout=2) == 0
    slow.close()
    for sock in others:
        sock.close()


def test_sessions_lists_every_open_session(served):
    d, _load = served
    lines, summary = ask(d.control, "sessions")
    assert summary == "6 sessions" and len(lines) == 6
    for line in lines:
        assert re.fullmatch(r"\d+ 127\.0\.0\.1:\d+ age=[\d.]+ idle=[\d.]+ "
                            r"requests=\d+ queued=\d+", line), line
    table = render_sessions(lines)
    assert table[0].split() == ["ID", "PEER", "AGE", "IDLE", "REQUESTS", "QUEUED"]


def test_kill_closes_that_session_only(served):
    d, load = served
    victim = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    victim_port = victim.getsockname()[1]
    assert wait_until(lambda: any(f":{victim_port} " in line
                                  for line in ask(d.control, "sessions")[0]))
    line = next(x for x in ask(d.control, "sessions")[0] if f":{victim_port} " in x)
    session_id = line.split()[0]
    _, answer = ask(d.control, f"kill {session_id}")
    assert answer == f"closed session {session_id}"
    assert victim.recv(100) == b""
    victim.close()
    before = load.total()
    assert wait_until(lambda: load.total() > before + 50)     # the others go on
    d.wait_for(rf"session {session_id} 127\.0\.0\.1:{victim_port} closed: killed")
    with pytest.raises(DaemonError, match=f"no session {session_id}"):
        ask(d.control, f"kill {session_id}")
    with pytest.raises(DaemonError, match="usage: kill ID"):
        ask(d.control, "kill everyone")


def test_reload_swaps_script_and_reports_failure(served):
    d, load = served
    probe = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    f = probe.makefile("rwb")

    def version() -> bytes:
        f.write(b"version\n")
        f.flush()
        return f.readline()

    assert version() == b"version one\n"
    d.script.write_text(HANDLER.replace('"one"', '"two"'))
    _, answer = ask(d.control, "reload")
    assert answer == f"reloaded {d.script}"
    assert version() == b"version two\n"
    assert stats(d.control)["reloads"] == "1"
    d.script.write_text("def handle_request(s):\n    s.response = (\n")
    with pytest.raises(DaemonError, match=r"reload failed: script refused, the previous "
                                          r"version still serves: .*: syntax error at line 2"):
        ask(d.control, "reload")      # the reason itself, not "see the log"
    assert version() == b"version two\n"
    # A reason with a newline is still one line: "OK all good" is no answer.
    d.script.write_text("raise RuntimeError('cannot open db\\nOK all good')\n")
    client = ControlClient(d.control, 10.0)
    with pytest.raises(DaemonError, match=r"RuntimeError: cannot open db OK all good"):
        client.ask("reload")
    assert client.ask("help")[1] == ""                  # the next answer is help's own
    client.close()
    before = load.total()
    assert wait_until(lambda: load.total() > before + 50)
    probe.close()


def test_log_level_changes_what_is_logged(served):
    d, _load = served
    _, answer = ask(d.control, "log-level warning")
    assert answer == "log level warning"
    offset = len(d.log())
    total = int(stats(d.control)["connections_total"])
    socket.create_connection(("127.0.0.1", d.port), timeout=10).close()
    assert wait_until(lambda: stats(d.control)["connections"] == "6" and
                      int(stats(d.control)["connections_total"]) == total + 1)
    _, answer = ask(d.control, "log-level info")
    socket.create_connection(("127.0.0.1", d.port), timeout=10).close()
    d.wait_for(r"session \d+ 127\.0\.0\.1:\d+ closed: eof", since=offset)
    closes = re.findall(r"session \d+ \S+ closed", d.log()[offset:])
    assert len(closes) == 1                           # only the one after "info"
    with pytest.raises(DaemonError, match="usage: log-level"):
        ask(d.control, "log-level loud")


def test_drain_stops_accepting_and_exits_after_the_last_session(served):
    d, load = served
    _, answer = ask(d.control, "drain")
    assert answer == "draining: 6 sessions open"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.port), timeout=10)
    assert stats(d.control)["state"] == "draining"
    before = load.total()
    assert wait_until(lambda: load.total() > before + 50)     # still served
    assert d.proc.poll() is None
    load.stop()                                       # the clients leave...
    assert d.wait(10) == 0                            # ...and the daemon goes
    assert not os.path.exists(d.control)


def test_a_drain_runs_on_stopping_and_leaves_the_sessions_open(mpxd, tmp_path):  # noqa: F811
    d, control, port = with_control(mpxd, tmp_path, """
from mpxd import send_response, sessions

def on_stopping(server):
    for s in sessions():
        s.response = "draining: please reconnect elsewhere"
        send_response(s)

def handle_request(s):
    s.response = "pong"
""")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = client.makefile("rb")
    client.sendall(b"ping\n")
    assert reader.readline() == b"pong\n"
    assert ask(control, "drain")[1] == "draining: 1 session open"
    assert reader.readline() == b"draining: please reconnect elsewhere\n"
    client.sendall(b"ping\n")
    assert reader.readline() == b"pong\n"             # still served
    d.proc.send_signal(signal.SIGTERM)                 # on_stopping ran already
    assert reader.readline() == b""
    assert d.wait(10) == 0
    client.close()


def test_the_small_things_of_the_control_channel(mpxd, tmp_path):  # noqa: F811
    d, control, port = with_control(mpxd, tmp_path, HANDLER, "handler.py")
    # No sessions: no output at all, not an empty line a "while read" loop runs on.
    raw = mpxctl("sessions", "--raw", "-c", control)
    assert (raw.returncode, raw.stdout) == (0, "")
    assert ask(control, "sessions")[1] == "0 sessions"
    # Digits only in ASCII: "²" passed isdigit() and failed int(), unanswered.
    with pytest.raises(DaemonError, match="usage: kill ID"):
        ask(control, "kill \u00b2")
    for timeout in ("nan", "inf"):
        assert mpxctl("status", "-c", control, "--timeout", timeout).returncode == 2
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"version\n")
    client.recv(100)
    assert ask(control, "sessions")[1] == "1 session"
    assert ask(control, "drain")[1] == "draining: 1 session open"
    # A second drain --wait waits too, instead of "already shutting down".
    waiter = subprocess.Popen([sys.executable, "-m", "mpxd.mpxctl", "drain", "-c", control,
                               "--wait", "--timeout", "10"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    assert waiter.poll() is None
    client.close()                                  # the last session ends...
    out, err = waiter.communicate(timeout=10)       # ...and the daemon exits
    assert (waiter.returncode, out) == (0, "already draining: 1 session open\n"), err
    assert d.wait(timeout=5) == 0


def test_a_control_client_that_does_not_read_is_held_back_not_buffered(mpxd, tmp_path):  # noqa: F811
    # Its answers were queued up to 1 GiB: 400,000 "help" without reading
    # grew mpxd by 240 MB, and 1,000 "sessions" in one write stalled the loop.
    d, control, port = with_control(mpxd, tmp_path, HANDLER, "handler.py")
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(control)
    greedy.setblocking(False)
    commands = b"h\n" * 500000                 # each answered with an ERROR line
    sent = 0
    deadline = time.monotonic() + 3
    while sent < len(commands) and time.monotonic() < deadline:
        try:
            sent += greedy.send(commands[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < len(commands)                 # mpxd stopped reading: held back
    with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
        other.sendall(b"version\n")
        assert other.recv(100) == b"version one\n"     # and everyone else is served
    greedy.setblocking(True)
    greedy.settimeout(10)
    answered, received = 0, b""
    while answered < sent // 2:                 # every command sent is answered, in time
        received += greedy.recv(1 << 20)
        answered = received.count(b"ERROR unknown command 'h' (try help)\n")
    assert answered == sent // 2
    greedy.close()
    assert d.stop() == 0


def test_a_stop_during_a_drain_says_it_cuts_it_short(served):
    d, load = served
    assert ask(d.control, "drain")[1] == "draining: 6 sessions open"
    assert ask(d.control, "stop")[1] == ("stopping now: 6 sessions closed at once, "
                                         "their output dropped")
    assert d.wait(10) == 0
    load.stop()
    load.failures.clear()                           # they were cut off, as said


def test_stop_finishes_and_exits(served):
    d, load = served
    _, answer = ask(d.control, "stop")
    assert answer.startswith("stopping:")
    assert d.wait(10) == 0
    load.stop()
    load.failures.clear()                             # their connections were closed
    assert not os.path.exists(d.control) and not os.path.exists(d.pidfile)


def test_unknown_commands_and_help(served):
    d, _load = served
    with pytest.raises(DaemonError, match="unknown command 'frobnicate'"):
        ask(d.control, "frobnicate")
    lines, _ = ask(d.control, "help")
    assert [line.split()[0] for line in lines] == [
        "stats", "sessions", "kill", "reload", "drain", "stop", "log-level", "help"]
    # "mpxctl status" asks "stats"; by hand through nc, "status" works as well
    assert ask(d.control, "status")[0][0].startswith("pid ")


def test_an_overlong_control_line_is_logged_as_the_control_channels(served):
    # It read "session 1 pid=...: line longer than --max-line 4096 bytes",
    # as if a client had broken the daemon's --max-line.
    d, _load = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(d.control)
        sock.sendall(b"x" * 5000)
        assert sock.recv(100) == b"ERROR line too long\n"
    match = d.wait_for(r"WARNING control connection \d+ pid=\d+,uid=\d+: line longer "
                       r"than the control channel's limit of 4096 bytes; closing it")
    assert "--max-line" not in d.log()[match.start():]
    assert ask(d.control, "stats")[0][0].startswith("pid ")   # the channel still serves


def _as_nobody(control: str, code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` (which drops to uid 65534) on ``control``, passed as argv[1].

    pytest's directory is private to root: the socket is reached by a hard
    link in a directory that user 65534 can enter.
    """
    public = tempfile.mkdtemp(prefix="mpxd-control-test-")
    os.chmod(public, 0o755)
    link = os.path.join(public, "control.sock")
    os.link(control, link)
    try:
        return subprocess.run([sys.executable, "-c", code, link], capture_output=True,
                              text=True, timeout=30, cwd=ROOT)
    finally:
        shutil.rmtree(public)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_turned_away(served):
    d, _load = served
    os.chmod(d.control, 0o666)            # only the SO_PEERCRED check is left
    child = _as_nobody(d.control,
                       "import os, socket, sys\n"
                       "os.setgid(65534); os.setuid(65534)\n"
                       "s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
                       "s.connect(sys.argv[1])\n"
                       "try:\n"
                       "    s.sendall(b'stats\\n'); print(repr(s.recv(100)))\n"
                       "except (ConnectionResetError, BrokenPipeError):\n"  # closed before
                       "    print('reset')\n")
    assert child.stdout.strip() in ("b''", "reset"), child.stderr   # closed unanswered
    d.wait_for(r"control: refused pid=\d+,uid=65534: only root may use it")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run mpxctl as another user")
@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_mpxctl_as_another_user_is_told_why_with_exit_3(served, mode):
    # 0600: click's readability check made it a usage error (exit 2);
    # 0666: the daemon's refusal showed as "lost the connection: Broken pipe".
    d, _load = served
    os.chmod(d.control, mode)
    child = _as_nobody(d.control,
                       "import os, sys\n"
                       "import difflib, encodings.idna\n"
                       "from mpxd.mpxctl import main\n"   # the stdlib is root's to read
                       "os.setgid(65534); os.setuid(65534)\n"
                       "main(['status', '-c', sys.argv[1]])\n")
    assert child.returncode == 3, child.stderr
    assert "no permission to use" in child.stderr if mode == 0o600 else \
        "closed the connection unanswered (only the daemon's user and root may use it)" \
        in child.stderr, child.stderr


# ----------------------------------------------------------------- mpxctl

def test_mpxctl_status_shows_live_figures(served):
    d, load = served
    first = mpxctl("status", "--control", d.control)
    assert first.returncode == 0, first.stderr
    assert re.search(rf"mpxd \S+ \(pid {d.pid}\): serving, up \d+s", first.stdout)
    assert "connections  6 open, 6 since start" in first.stdout
    assert f"127.0.0.1:{d.port}" in first.stdout
    count = lambda out: int(re.search(r"requests +([\d,]+)", out).group(1).replace(",", ""))  # noqa: E731
    before = load.total()
    assert wait_until(lambda: load.total() > before + 100)
    second = mpxctl("--control", d.control, "status")        # options first works too
    assert count(second.stdout) > count(first.stdout)


def test_mpxctl_commands_and_exit_codes(served, tmp_path):
    d, _load = served
    sessions = mpxctl("sessions", "-c", d.control)
    assert sessions.returncode == 0 and len(sessions.stdout.splitlines()) == 7
    assert sessions.stderr.strip() == "6 sessions"
    missing = mpxctl("kill", "99999", "-c", d.control)
    assert missing.returncode == 1
    assert "the daemon says: no session 99999" in missing.stderr
    assert mpxctl("log-level", "info", "-c", d.control).returncode == 0
    assert mpxctl("status").returncode == 2                          # where?
    assert mpxctl("kill", "1", "--pidfile", d.pidfile).returncode == 2  # needs --control
    nobody = mpxctl("status", "-c", str(tmp_path / "nothing.sock"))
    assert nobody.returncode == 3 and "no control socket" in nobody.stderr
    running = mpxctl("status", "--pidfile", d.pidfile)
    assert running.returncode == 0 and f"running (pid {d.pid})" in running.stdout
    offset = len(d.log())
    hup = mpxctl("reload", "--pidfile", d.pidfile)
    assert hup.returncode == 0 and f"sent HUP to pid {d.pid}" in hup.stdout
    d.wait_for(r"reloaded ", since=offset)
    reload = mpxctl("reload", "-c", d.control)
    assert reload.returncode == 0 and "reloaded" in reload.stdout
    stop = mpxctl("stop", "--pidfile", d.pidfile, "--wait")
    assert stop.returncode == 0, stop.stderr
    assert d.wait(10) == 0
    _load.stop()
    _load.failures.clear()
    gone = mpxctl("status", "--pidfile", d.pidfile)
    assert gone.returncode == 3 and "not running" in gone.stderr


def test_mpxctl_names_a_bad_log_level_argument_level(tmp_path):
    # It said "Invalid value for '{debug|info|warning|error}'".
    result = mpxctl("log-level", "loud", "-c", str(tmp_path / "none.sock"))
    assert result.returncode == 2
    assert "Invalid value for 'LEVEL': 'loud' is not one of" in result.stderr


def test_mpxctl_options_typed_before_the_command_beat_the_environment(tmp_path):
    # MPXCTL_CONTROL filled in the command's own option, which won over the
    # -c typed before the command: "mpxctl -c B stop" stopped daemon A.
    typed, from_env = str(tmp_path / "typed.sock"), str(tmp_path / "env.sock")
    env = dict(os.environ, MPXCTL_CONTROL=from_env)
    for args in (["-c", typed, "status"], ["status", "-c", typed]):
        result = subprocess.run([sys.executable, "-m", "mpxd.mpxctl", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 3 and f"no control socket at {typed}" in result.stderr
    result = subprocess.run([sys.executable, "-m", "mpxd.mpxctl", "status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, env=env)
    assert f"no control socket at {from_env}" in result.stderr


def test_mpxctl_reports_a_stale_pidfile_as_not_running(tmp_path):
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text(f"{os.getpid()}\n")            # a live pid, but no lock
    result = mpxctl("stop", "--pidfile", str(pidfile))
    assert result.returncode == 3 and "not running" in result.stderr
    assert f"it names pid {os.getpid()})" in result.stderr
    pidfile.write_text("")                  # emptied at exit by a daemon under --user
    result = mpxctl("status", "--pidfile", str(pidfile))
    assert result.returncode == 3 and result.stderr.endswith("; it is empty)\n")


def test_mpxctl_tells_a_dead_socket_from_a_path_that_is_no_socket(tmp_path):
    # A regular file gave "nobody listens on ... (mpxd is not running)".
    regular = tmp_path / "handler.py"
    regular.write_text("x = 1\n")
    result = mpxctl("status", "--control", str(regular))
    assert result.returncode == 3
    assert result.stderr == f"mpxctl: {regular} is not a socket (give the path mpxd's " \
                            f"--control names)\n"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))              # bound, never listening
    dead.close()
    result = mpxctl("status", "--control", str(tmp_path / "dead.sock"))
    assert result.returncode == 3 and "nobody listens on" in result.stderr


@pytest.mark.parametrize("answer, said", [
    (b"", "closed the connection unanswered"),
    (b"220 smtp.example ready\n", "answered '220 smtp.example ready', which is not "
                                   "mpxd's control protocol"),
])
def test_mpxctl_tells_a_refusal_from_a_socket_that_is_not_mpxds(tmp_path, answer, said):
    path = str(tmp_path / "other.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve_once():
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(answer)
        conn.close()

    thread = threading.Thread(target=serve_once)
    thread.start()
    try:
        result = mpxctl("status", "--control", path)
    finally:
        thread.join()
        server.close()
    assert result.returncode == 3 and said in result.stderr, result.stderr


def test_render_stats_is_readable():
    lines = ["pid 7", "version 0.1.0", "state serving", "uptime 3725.5",
             "connections 2", "connections_total 1234", "requests 56789",
             "bytes_in 2048", "bytes_out 3145728", "errors 0", "reloads 1",
             "listener 127.0.0.1:47110 open=2 total=1234"]
    out = render_stats(lines)
    assert out[0] == "mpxd 0.1.0 (pid 7): serving, up 1h 02m 05s"
    assert "requests     56,789" in out
    assert "traffic      2.0 KiB in, 3.0 MiB out" in out
    assert out[-1].split() == ["127.0.0.1:47110", "2", "open", "1234", "total"]
