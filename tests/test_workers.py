"""mpxd/workers.py: --workers N, worker processes sharing the port under a supervisor."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys

import pexpect
import pytest

from conftest import MPXD, ROOT, LineClient, wait_until

PID_SCRIPT = """
import os
VERSION = "v1"
served = 0

def handle_request(s):
    global served
    served += 1
    s.response = f"{os.getpid()} {VERSION} {served}"
"""


def _state(pid: int) -> str | None:
    """The process state letter from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.add(int(entry))
    return found


def _answers(d, want_pids: int, tries: int = 300) -> dict[int, list[str]]:
    """Connect until ``want_pids`` different workers answered; pid -> answers."""
    seen: dict[int, list[str]] = {}
    for _ in range(tries):
        c = d.connect()
        pid, rest = c.ask("x").split(" ", 1)
        c.close()
        seen.setdefault(int(pid), []).append(rest)
        if len(seen) >= want_pids:
            break
    return seen


def _ready_pids(d) -> list[int]:
    """The worker pids the supervisor announced before "listening on"."""
    match = re.search(rb"(\d+) workers ready: pids ([\d ]+)", d.child.before)
    assert match, d.child.before
    return [int(p) for p in match.group(2).split()]


@pytest.fixture
def pid_script(write_script):
    return write_script(PID_SCRIPT)


def test_two_workers_answer_each_with_its_own_globals(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    workers = _ready_pids(d)
    assert len(workers) == 2 and d.pid not in workers
    assert _children(d.pid) == set(workers)
    seen = _answers(d, 2)
    assert set(seen) == set(workers)            # both answer, the parent never does
    for answers in seen.values():               # each counts on its own
        served = [int(a.split()[1]) for a in answers]
        assert served == list(range(1, len(served) + 1))


def test_a_killed_worker_is_restarted(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    victim, survivor = _ready_pids(d)
    os.kill(victim, signal.SIGKILL)
    d.expect_log(rf"worker 1 \(pid {victim}\) was killed by SIGKILL; restarting it")
    replacement = int(d.expect_log(r"worker 1 \(pid (\d+)\) ready").group(1))
    assert replacement not in (victim, survivor)
    assert _children(d.pid) == {survivor, replacement}
    assert set(_answers(d, 2)) == {survivor, replacement}


def test_a_worker_that_crashes_by_itself_is_restarted_and_the_other_serves_on(
        daemon, write_script):
    d = daemon(write_script("""
import os

def handle_request(s):
    if s.request == "crash":
        os._exit(3)                 # dies as a crashing C extension would
    s.response = str(os.getpid())
"""), "--workers", "2")
    victim_pid, survivor_pid = _ready_pids(d)
    on: dict[int, LineClient] = {}              # worker pid -> a connection to it
    for _ in range(300):
        c = d.connect()
        pid = int(c.ask("pid"))
        if pid in on:
            c.close()
        else:
            on[pid] = c
        if len(on) == 2:
            break
    assert set(on) == {victim_pid, survivor_pid}
    on[victim_pid].send_lines("crash")
    assert on[victim_pid].read_all() == b""     # its connections are lost
    d.expect_log(rf"worker 1 \(pid {victim_pid}\) exited with status 3; restarting it in 0.5s")
    replacement = int(d.expect_log(r"worker 1 \(pid (\d+)\) ready").group(1))
    assert on[survivor_pid].ask("pid") == str(survivor_pid)    # untouched
    assert _children(d.pid) == {survivor_pid, replacement}


def test_a_worker_dying_young_again_and_again_is_restarted_with_backoff(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    victim = _ready_pids(d)[0]
    os.kill(victim, signal.SIGKILL)
    d.expect_log(r"restarting it in 0.5s")
    again = int(d.expect_log(r"worker 1 \(pid (\d+)\) ready").group(1))
    os.kill(again, signal.SIGKILL)
    d.expect_log(r"restarting it in 1s")
    d.expect_log(r"worker 1 \(pid (\d+)\) ready")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_a_stop_signal_stops_every_worker_and_exits_0(daemon, pid_script, tmp_path, signum):
    # QUIT's default action (a core dump) killed the parent without a word
    # and left the pidfile behind; nginx operators send it to stop.
    pidfile = tmp_path / "mpxd.pid"
    d = daemon(pid_script, "--workers", "2", "--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(d.pid)    # the parent owns it
    workers = _ready_pids(d)
    c = d.connect()
    c.ask("x")
    d.signal(signum)
    d.expect_log(r"shutting down: stopping 2 workers")
    d.expect_log(pexpect.EOF, timeout=10)               # this signal alone ends it
    assert d.stop() == 0
    assert not any(_alive(pid) for pid in workers)
    assert not pidfile.exists()


def test_the_supervisor_holds_the_pidfile_while_workers_restart(daemon, pid_script, tmp_path):
    pidfile = tmp_path / "mpxd.pid"
    d = daemon(pid_script, "--workers", "2", "--pidfile", str(pidfile))
    victim = _ready_pids(d)[0]
    os.kill(victim, signal.SIGKILL)
    d.expect_log(r"worker 1 \(pid (\d+)\) ready")
    assert pidfile.read_text().strip() == str(d.pid)    # a worker's death changes nothing
    second = subprocess.run(
        MPXD + ["--workers", "2", "--port", "0", "--host", "127.0.0.1",
                "--pidfile", str(pidfile), pid_script],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"another mpxd is running (pid {d.pid} holds" in second.stderr, second.stderr
    assert pidfile.read_text().strip() == str(d.pid)
    assert d.stop() == 0
    assert not pidfile.exists()


def test_hup_is_passed_on_and_every_worker_reloads(daemon, pid_script, write_script):
    d = daemon(pid_script, "--workers", "2")
    workers = _ready_pids(d)
    write_script(PID_SCRIPT.replace('"v1"', '"v2"'))
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloading: passing HUP on to 2 workers")
    reloaded = {int(d.expect_log(r"mpxd\[(\d+)\] INFO reloaded").group(1)) for _ in range(2)}
    assert reloaded == set(workers)
    seen = _answers(d, 2)
    assert set(seen) == set(workers)            # reloaded in place, not restarted
    assert all(a.split()[0] == "v2" for answers in seen.values() for a in answers)


def test_usr1_is_passed_on_to_every_worker(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    workers = _ready_pids(d)
    d.signal(signal.SIGUSR1)
    pattern = r"mpxd\[(\d+)\] INFO no log file to reopen"
    logged = {int(d.expect_log(pattern).group(1)) for _ in range(3)}
    assert logged == {d.pid, *workers}


def test_usr2_to_the_supervisor_is_ignored_once_and_not_passed_on(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    _ready_pids(d)
    d.signal(signal.SIGUSR2)
    match = d.expect_log(r"mpxd\[(\d+)\] WARNING USR2 ignored")
    assert int(match.group(1)) == d.pid
    with pytest.raises(pexpect.TIMEOUT):
        d.expect_log(r"USR2 ignored", timeout=0.5)     # no worker heard it
    c = d.connect()
    assert c.ask("x")
    assert d.stop() == 0


def test_workers_exit_when_the_supervisor_is_killed(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    workers = _ready_pids(d)
    d.child.kill(signal.SIGKILL)
    assert wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10)


def test_a_broken_script_fails_start_up_once_with_exit_1(write_script):
    broken = write_script("def handle_request(s)\n    pass\n", name="broken.py")
    result = subprocess.run(
        MPXD + ["--workers", "2", "--port", "0", "--host", "127.0.0.1", broken],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("syntax error at line 1") == 1, result.stderr
    assert "listening on" not in result.stderr


def test_a_taken_port_fails_start_up_with_exit_1(daemon, pid_script):
    d = daemon(pid_script)                      # a plain instance holds the port
    result = subprocess.run(
        MPXD + ["--workers", "2", "--port", str(d.port), "--host", "127.0.0.1",
                pid_script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "address already in use" in result.stderr


def test_a_second_workers_instance_on_the_same_port_fails_with_exit_1(daemon, pid_script):
    # SO_REUSEPORT let it start beside the first and take half its clients.
    d = daemon(pid_script, "--workers", "2")
    first = set(_answers(d, 2))
    result = subprocess.run(
        MPXD + ["--workers", "2", "--port", str(d.port), "--host", "127.0.0.1",
                pid_script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "address already in use" in result.stderr
    assert "listening on" not in result.stderr
    assert set(_answers(d, 5, tries=40)) <= first   # every client still reaches the first


def test_a_huge_drain_timeout_waits_for_the_sessions_and_exits_0(daemon, pid_script):
    # The supervisor's poll timeout came straight from its kill deadline:
    # --drain-timeout 1e300 overflowed it at the first TERM.
    d = daemon(pid_script, "--workers", "2", "--drain-timeout", "1e300")
    c = d.connect()
    assert c.ask("x").endswith(" 1")            # "PID VERSION 1": served
    d.signal(signal.SIGTERM)
    d.expect_log("shutting down")
    c.close()
    assert d.stop() == 0


def test_unix_sockets_are_refused_with_workers(pid_script, tmp_path):
    result = subprocess.run(
        MPXD + ["--workers", "2", "--port", "0", "--unix", str(tmp_path / "s"), pid_script],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "cannot be used with --workers" in result.stderr


def test_a_signal_during_start_up_is_not_lost(pid_script):
    """TERM right after the fork: workers block it until their loop handles it."""
    child = subprocess.Popen(
        MPXD + ["--workers", "2", "--port", "0", "--host", "127.0.0.1", pid_script],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(_children(child.pid)) == 2, timeout=10, interval=0.001)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def test_term_during_a_slow_import_stops_the_workers_at_once(write_script, tmp_path):
    """A worker's import used to run to its end before the TERM was taken up."""
    marker = tmp_path / "imports"
    script = write_script("import os, time\n"
                          f"with open({str(marker)!r}, 'a') as f: f.write('x')\n"
                          "time.sleep(30)\n"
                          "def handle_request(s):\n"
                          "    s.response = 'ok'\n")
    child = subprocess.Popen(
        MPXD + ["--workers", "2", "--port", "0", "--host", "127.0.0.1", script],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: marker.exists() and marker.read_text() == "xx",
                          timeout=10)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=5) == 0
        log = child.stderr.read()
        assert log.count("SIGTERM during start-up: stopped before serving") == 2, log
        assert "listening on" not in log
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def test_a_daemon_with_workers_stopped_during_start_up_fails_its_launcher(write_script,
                                                                          tmp_path):
    marker, pidfile = tmp_path / "imports", tmp_path / "mpxd.pid"
    script = write_script("import time\n"
                          f"with open({str(marker)!r}, 'a') as f: f.write('x')\n"
                          "time.sleep(30)\n"
                          "def handle_request(s):\n"
                          "    s.response = 'ok'\n")
    launcher = subprocess.Popen(
        MPXD + ["--daemon", "--workers", "2", "--port", "0", "--host", "127.0.0.1",
                "--pidfile", str(pidfile), "--log-file", str(tmp_path / "log"), script],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: marker.exists() and marker.read_text() == "xx",
                          timeout=10)
        supervisor = int(pidfile.read_text())
        os.kill(supervisor, signal.SIGTERM)
        assert launcher.wait(timeout=5) == 1
        assert "Error: SIGTERM during start-up: stopped before serving" in \
            launcher.stderr.read()
        assert wait_until(lambda: not _alive(supervisor), timeout=5)
        assert not pidfile.exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stderr.close()
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_connections_spread_over_the_workers(daemon, pid_script):
    d = daemon(pid_script, "--workers", "2")
    clients = [LineClient(d.address) for _ in range(40)]
    pids = {c.ask("x").split()[0] for c in clients}
    for c in clients:
        c.close()
    assert len(pids) == 2                       # 40 connections never all land on one


def test_only_the_supervisor_tells_systemd_and_only_once_all_are_ready(
        daemon, pid_script, tmp_path):
    path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.settimeout(10)
    try:
        d = daemon(pid_script, "--workers", "2", env={"NOTIFY_SOCKET": path})
        workers = _ready_pids(d)
        messages = []
        while not any(b"READY=1" in text for _pid, text in messages):
            data, ancillary, _flags, _addr = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            [(_level, _type, cred)] = ancillary
            sender = struct.unpack("3i", cred[:12])[0]
            messages.append((sender, data))
        assert {pid for pid, _text in messages} == {d.pid}
        assert b"with 2 workers" in messages[-1][1]
        assert len(_answers(d, 2)) == 2
        d.signal(signal.SIGTERM)
        data = notify.recv(4096)
        assert b"STOPPING=1" in data
        assert d.stop() == 0
        assert not any(_alive(pid) for pid in workers)
    finally:
        notify.close()


if not sys.platform.startswith("linux"):      # pragma: no cover
    pytestmark = pytest.mark.skip("SO_REUSEPORT balancing and /proc are Linux's")
