"""mpxd.systemd: sd_notify messages and socket activation, with no systemd.

A fake ``NOTIFY_SOCKET`` is an AF_UNIX datagram socket bound in the test's
temporary directory; the test reads what mpxd tells "systemd" there.  Socket
activation passes a listening socket as descriptor 3 through a small Python
wrapper that sets ``LISTEN_PID`` to its own pid and then execs mpxd, exactly
as systemd does.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from conftest import HANDLERS, ROOT, LineClient
from mpxd.systemd import Notifier, listen_fds

COUNTER = os.path.join(HANDLERS, "counter.py")

# What systemd does before exec: LISTEN_PID is the pid of the exec'd program.
ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "mpxd", *sys.argv[2:]])
"""


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(10)

    def receive(self) -> dict[str, str]:
        """The next notification as a dict of its fields."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def receive_until(self, key: str) -> list[dict[str, str]]:
        """Notifications up to and including the first one that has ``key``."""
        messages = []
        while True:
            message = self.receive()
            messages.append(message)
            if key in message:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.close()


def without_watchdog(messages):
    return [m for m in messages if "WATCHDOG" not in m]


# ------------------------------------------------------------------ unit

def test_notifier_sends_each_state_as_one_datagram(systemd, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier(systemd.path)
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("listening on x")
    assert systemd.receive() == {"READY": "1", "STATUS": "listening on x"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = systemd.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    notifier.status("3 connections")
    assert systemd.receive() == {"STATUS": "3 connections"}
    notifier.watchdog()
    assert systemd.receive() == {"WATCHDOG": "1"}
    notifier.stopping()
    assert systemd.receive() == {"STOPPING": "1"}
    notifier.stopping("draining 2")
    assert systemd.receive() == {"STOPPING": "1", "STATUS": "draining 2"}
    notifier.close()


def test_notifier_reaches_an_abstract_socket():
    name = f"mpxd-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        notifier = Notifier("@" + name)
        notifier.ready()
        assert receiver.recv(100) == b"READY=1"
        notifier.close()
    finally:
        receiver.close()


def test_notifier_without_notify_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.stopping()
    notifier.close()


def test_notifier_survives_a_vanished_socket(tmp_path):
    notifier = Notifier(str(tmp_path / "gone"))
    notifier.ready()                                 # logged at debug, no exception
    notifier.close()


def test_notifier_never_waits_for_a_receiver_that_does_not_read(systemd):
    # A blocking sendto stalled the whole loop (or the --workers parent)
    # once the receiver's buffer was full.
    notifier = Notifier(systemd.path)

    def flood() -> None:
        for _ in range(100_000):
            notifier.watchdog()                 # nobody reads: the buffer fills up
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "a send blocked"
    assert systemd.receive() == {"WATCHDOG": "1"}
    notifier.close()


@pytest.mark.parametrize("usec, pid, interval", [
    ("3000000", None, 1.5), ("3000000", "self", 1.5), ("3000000", "1", None),
    ("0", None, None), ("junk", None, None)])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
        systemd, monkeypatch, usec, pid, interval):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    notifier = Notifier(systemd.path)
    assert notifier.watchdog_interval == interval
    notifier.close()


def test_listen_fds_ignores_variables_meant_for_another_process(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def run_listen_fds_child(passed: socket.socket | int) -> str:
    """Call listen_fds() in a child that got ``passed`` as descriptor 3."""
    import subprocess
    fd = passed if isinstance(passed, int) else passed.fileno()
    code = (f"import os\nos.dup2({fd}, 3)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'\n"
            "from mpxd.systemd import listen_fds\n"
            "from mpxd.listeners import ListenError\n"
            "try:\n"
            "    socks = listen_fds()\n"
            "except ListenError as e:\n"
            "    print('error', e)\n"
            "else:\n"
            "    s = socks[0]\n"
            "    print(s.fileno(), s.getblocking(), os.get_inheritable(3), "
            "'LISTEN_FDS' in os.environ)\n")
    result = subprocess.run([sys.executable, "-c", code], pass_fds=[fd], cwd=ROOT,
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_listen_fds_takes_a_passed_socket_and_makes_it_non_blocking():
    listener = socket.create_server(("127.0.0.1", 0))
    assert listener.getblocking()
    try:
        assert run_listen_fds_child(listener) == "3 False False False"
    finally:
        listener.close()


def test_listen_fds_refuses_a_socket_that_does_not_listen():
    unbound = socket.socket()
    try:
        assert run_listen_fds_child(unbound) == ("error LISTEN_FDS: descriptor 3 is not a "
                                                 "listening stream socket (the socket unit "
                                                 "needs Accept=no and ListenStream=)")
    finally:
        unbound.close()


def test_listen_fds_refuses_a_descriptor_that_is_not_a_socket(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert run_listen_fds_child(fd).startswith("error LISTEN_FDS: descriptor 3 is "
                                                   "not a socket")
    finally:
        os.close(fd)


# ------------------------------------------------------------ the command

def test_ready_after_listening_reload_and_stopping(systemd, mpxd, tmp_path):
    script = tmp_path / "handler.py"
    script.write_text("def handle_request(s):\n    s.response = 'one'\n")
    m = mpxd(["--port", "0", "--host", "127.0.0.1", str(script)],
             env={"NOTIFY_SOCKET": systemd.path})
    first = systemd.receive()
    assert first["READY"] == "1"                    # nothing is sent before READY=1
    port = int(first["STATUS"].rpartition(":")[2])
    assert "listening on 127.0.0.1:" in m.log()     # logged before READY=1
    client = LineClient(("127.0.0.1", port))        # it does listen
    assert client.ask("x") == "one"

    script.write_text("def handle_request(s):\n    s.response = 'two'\n")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m.signal(signal.SIGHUP)
    reloading = systemd.receive()
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"])
    ready = systemd.receive()
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("1 connection")
    assert client.ask("y") == "two"

    script.write_text("def handle_request(s)\n")      # broken: READY=1 all the same
    m.signal(signal.SIGHUP)
    assert systemd.receive()["RELOADING"] == "1"
    ready = systemd.receive()
    assert ready["READY"] == "1" and ready["STATUS"].startswith("reload failed: ")
    assert client.ask("z") == "two"

    m.signal(signal.SIGTERM)
    assert systemd.receive() == {"STOPPING": "1",
                                 "STATUS": "shutting down: 1 session to drain"}
    assert client.read_all() == b""
    assert m.wait() == 0


def test_ready_only_once_the_script_is_loaded_and_every_socket_listens(
        systemd, mpxd, tmp_path):
    loaded = tmp_path / "loaded"
    script = tmp_path / "handler.py"
    script.write_text("import time\n"
                      "time.sleep(0.5)                  # a slow import\n"
                      f"open({str(loaded)!r}, 'w').close()\n"
                      "def handle_request(s):\n    s.response = 'hi'\n")
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--host", "::1", str(script)],
             env={"NOTIFY_SOCKET": systemd.path})
    ready = systemd.receive()
    assert ready["READY"] == "1"
    assert loaded.exists()
    port = int(ready["STATUS"].rpartition(":")[2])
    assert ready["STATUS"] == f"listening on 127.0.0.1:{port}, [::1]:{port}"
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"x\n")
            assert sock.recv(10) == b"hi\n"
    assert m.stop() == 0


def test_no_ready_when_start_up_fails(systemd, mpxd, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("def handle_request(s)\n")
    m = mpxd(["--port", "0", "--host", "127.0.0.1", str(script)],
             env={"NOTIFY_SOCKET": systemd.path})
    assert m.wait() == 1
    systemd.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        systemd.sock.recv(4096)                       # nothing was sent


def test_status_reports_connection_counts_every_few_seconds(systemd, mpxd):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", COUNTER],
             env={"NOTIFY_SOCKET": systemd.path})
    port = int(systemd.receive()["STATUS"].rpartition(":")[2])
    clients = [LineClient(("127.0.0.1", port)) for _ in range(3)]
    assert [c.ask("1") for c in clients] == ["1", "1", "1"]
    clients.pop().close()
    assert clients[0].ask("2") == "3"
    systemd.sock.settimeout(15)                       # STATUS_INTERVAL is 5 s
    assert systemd.receive() == {"STATUS": "2 connections, 3 total, 4 requests"}
    for client in clients:
        client.close()
    assert m.stop() == 0


def test_watchdog_pings_come_from_the_loop(systemd, mpxd):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", COUNTER],
             env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "100000"})
    assert systemd.receive()["READY"] == "1"
    assert systemd.receive() == {"WATCHDOG": "1"}
    assert systemd.receive() == {"WATCHDOG": "1"}
    m.signal(signal.SIGTERM)
    assert systemd.receive_until("STOPPING")[-1]["STOPPING"] == "1"
    assert m.wait() == 0


def test_workers_ready_only_when_every_worker_reloaded(systemd, mpxd, tmp_path):
    # The supervisor sent READY=1 right after passing HUP on: a slow reload
    # looked done at once, a refused one looked like success, and a HUP
    # during start-up sent READY=1 before anything listened.
    script = tmp_path / "slow.py"
    source = ("import time, os\n"
              "time.sleep(float(os.environ.get('SLOW', '0')))\n"
              "def handle_request(s):\n"
              "    s.response = {answer!r}\n")
    script.write_text(source.format(answer="one"))
    m = mpxd(["--workers", "2", "--port", "0", "--host", "127.0.0.1", str(script)],
             env={"NOTIFY_SOCKET": systemd.path, "SLOW": "1"})
    m.wait_catching(signal.SIGHUP)                  # not killed by its default action
    m.signal(signal.SIGHUP)                         # during start-up (workers import for 1 s)
    ready = systemd.receive_until("READY")
    assert ready[-1]["STATUS"].startswith("listening on 127.0.0.1:")
    assert "RELOADING" not in str(ready)
    port = m.wait_listening()

    script.write_text(source.format(answer="two"))
    m.signal(signal.SIGHUP)
    assert systemd.receive()["RELOADING"] == "1"
    hup = time.monotonic()
    ready = systemd.receive()
    assert ready["READY"] == "1" and ready["STATUS"] == "2 of 2 workers ready"
    assert time.monotonic() - hup > 0.8             # each worker's import took 1 s
    assert LineClient(("127.0.0.1", port)).ask("x") == "two"

    # Two HUPs at once: the second reload begins once the first has ended
    # (a worker may merge two HUPs into one reload, and answer once).
    script.write_text(source.format(answer="three"))
    m.signal(signal.SIGHUP)
    assert systemd.receive()["RELOADING"] == "1"
    m.signal(signal.SIGHUP)                         # while the first reload runs
    first = systemd.receive_until("READY")
    assert [message for message in first if "RELOADING" in message] == []
    second = systemd.receive_until("READY")         # not merged into the first
    assert second[0]["RELOADING"] == "1" and second[-1]["READY"] == "1"
    assert LineClient(("127.0.0.1", port)).ask("x") == "three"

    script.write_text("def handle_request(s)\n")
    m.signal(signal.SIGHUP)
    assert systemd.receive()["RELOADING"] == "1"
    ready = systemd.receive()
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("reload failed: ") and "syntax error" in ready["STATUS"]
    m.wait_for(r"reload failed in 2 workers: script refused, the previous version still serves")
    assert LineClient(("127.0.0.1", port)).ask("x") == "three"
    m.signal(signal.SIGTERM)
    assert systemd.receive_until("STOPPING")[-1] == {
        "STOPPING": "1", "STATUS": "shutting down: stopping 2 workers"}
    assert m.wait() == 0


def test_workers_withhold_watchdog_pings_while_a_worker_loop_is_blocked(
        systemd, mpxd, tmp_path):
    # The parent's loop never blocks; a worker's must count too, or a
    # handler stuck for good under --workers is never restarted.
    script = tmp_path / "block.py"
    script.write_text("import time\n"
                      "def handle_request(s):\n"
                      "    time.sleep(float(s.request))\n"
                      "    s.response = 'woke'\n")
    m = mpxd(["--workers", "2", "--port", "0", "--host", "127.0.0.1", str(script)],
             env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000"})
    port = m.wait_listening()
    assert systemd.receive_until("READY")[-1]["READY"] == "1"
    assert systemd.receive() == {"WATCHDOG": "1"}
    client = LineClient(("127.0.0.1", port))
    client.send_lines("2")                      # one worker sleeps for 2 s
    blocked_at = time.monotonic()
    pings = []
    while time.monotonic() - blocked_at < 3.5:
        if systemd.receive().get("WATCHDOG") == "1":
            pings.append(time.monotonic() - blocked_at)
    assert client.readline() == "woke"
    gaps = [b - a for a, b in zip([0.0] + pings, pings)]
    assert max(gaps) > 1.2, pings               # none while the worker was blocked
    assert pings[-1] > 2.5, pings               # and again once it woke
    m.wait_for(r"ERROR worker \d \(pid \d+\) sent no heartbeat for [\d.]+s: its loop is "
               r"blocked")
    m.wait_for(r"every worker sends heartbeats again")
    client.close()
    assert m.stop() == 0


def test_no_watchdog_pings_for_another_pid(systemd, mpxd):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", COUNTER],
             env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "100000",
                  "WATCHDOG_PID": "1"})
    assert systemd.receive()["READY"] == "1"
    time.sleep(0.3)                                  # three intervals' worth
    m.signal(signal.SIGTERM)
    assert "STOPPING" in systemd.receive()           # no WATCHDOG=1 in between
    assert m.wait() == 0


def test_socket_activation_serves_the_passed_socket_without_port(systemd, mpxd, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))   # blocking, as systemd may pass it
    port = listener.getsockname()[1]
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(ACTIVATE)
    try:
        m = mpxd([str(wrapper), str(listener.fileno()), COUNTER],
                 command=[sys.executable], pass_fds=[listener.fileno()],
                 env={"NOTIFY_SOCKET": systemd.path})
        ready = systemd.receive()
    finally:
        listener.close()                              # only mpxd holds it now
    assert ready == {"READY": "1", "STATUS": f"listening on 127.0.0.1:{port}"}
    assert m.wait_listening() == port
    clients = [LineClient(("127.0.0.1", port)) for _ in range(3)]
    assert [c.ask("2") for c in clients] == ["2", "2", "2"]
    assert clients[0].ask("5 global") == "5"
    for client in clients:
        client.close()
    assert m.stop() == 0
    assert "Traceback" not in m.log()


def test_socket_activation_with_a_bad_descriptor_exits_1(mpxd, tmp_path):
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(ACTIVATE)
    unbound = socket.socket()
    try:
        m = mpxd([str(wrapper), str(unbound.fileno()), COUNTER],
                 command=[sys.executable], pass_fds=[unbound.fileno()])
        assert m.wait() == 1
    finally:
        unbound.close()
    assert "descriptor 3 is not a listening stream socket" in m.stderr()


def test_without_port_or_listen_fds_exits_2(mpxd):
    m = mpxd([COUNTER], env={"LISTEN_FDS": "", "LISTEN_PID": ""})
    assert m.wait() == 2
    assert "no --port given and no sockets passed by systemd (LISTEN_FDS)" in m.stderr()


def test_listen_fds_for_another_pid_counts_as_none(mpxd):
    m = mpxd([COUNTER], env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert m.wait() == 2
    assert "no --port given" in m.stderr()
