"""mpxd.daemonize: ``--daemon`` detaches, and the command reports the outcome.

The command the operator types exits 0 only once the daemon listens, or 1
with the daemon's error message; the pidfile holds the daemon's pid, which
is how the tests stop it (it is not their child).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, wait_until
from spawn import SYSTEMD_VARIABLES, pid_gone, stop_pid

# Answers where it runs and what it is: cwd, pid, session id, and a file it
# opens by a relative path (the daemon runs in "/").
SCRIPT = """\
import os

def handle_request(s):
    if s.request == "where":
        s.response = f"{os.getcwd()} {os.getpid()} {os.getsid(0)} {os.getppid()}"
    elif s.request == "print":
        print("printed by the handler", flush=True)
        s.response = "ok"
    else:
        s.response = s.request
"""


def run_command(args: list[str], cwd, pass_fds=()) -> subprocess.CompletedProcess:
    """Run ``mpxd ARGS`` as an operator would and wait for the command to exit."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    return subprocess.run([sys.executable, "-m", "mpxd", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=30,
                          env=dict(env, PYTHONPATH=ROOT), pass_fds=pass_fds)


@pytest.fixture
def workdir(tmp_path):
    """A directory with the script; daemons whose pidfile is left are stopped."""
    (tmp_path / "handler.py").write_text(SCRIPT)
    yield tmp_path
    pidfile = tmp_path / "mpxd.pid"
    if pidfile.exists() and pidfile.read_text().strip().isdigit():
        stop_pid(int(pidfile.read_text()))


def port_from_log(log_path) -> int:
    text = log_path.read_text()
    marker = "listening on 127.0.0.1:"
    return int(text[text.index(marker) + len(marker):].split()[0])


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().rstrip("\n")


def test_daemon_detaches_once_listening_with_relative_paths(workdir):
    result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                          "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                          "handler.py"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    pid = int((workdir / "mpxd.pid").read_text())   # relative paths made absolute
    assert pid != os.getpid() and not pid_gone(pid)
    log = workdir / "mpxd.log"
    assert f"mpxd[{pid}] INFO listening on 127.0.0.1:" in log.read_text()
    port = port_from_log(log)
    cwd, daemon_pid, sid, _parent = ask(port, "where").split()
    assert (cwd, int(daemon_pid)) == ("/", pid)
    # A new session, of which it is not the leader: it can never get a terminal.
    assert int(sid) not in (pid, os.getsid(0))
    assert ask(port, "print") == "ok"                 # stdout goes to the log file
    assert stop_pid(pid)
    assert not (workdir / "mpxd.pid").exists()
    text = log.read_text()
    assert "printed by the handler" in text
    assert "stopped" in text


def test_daemon_without_a_log_file_has_stdio_on_dev_null(workdir):
    result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                          "--pidfile", "mpxd.pid", "handler.py"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "log lines are discarded" in result.stderr    # warned before detaching
    pid = int((workdir / "mpxd.pid").read_text())
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == [os.devnull] * 3
    assert stop_pid(pid)


def test_daemon_keeps_no_descriptor_of_its_caller(workdir):
    """A caller reading a pipe until EOF must not wait for the daemon to exit."""
    read_end, write_end = os.pipe()
    try:
        result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                              "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                              "handler.py"], cwd=workdir, pass_fds=[write_end])
        assert result.returncode == 0, result.stderr
        pid = int((workdir / "mpxd.pid").read_text())
        os.close(write_end)
        write_end = None
        readable, _, _ = select.select([read_end], [], [], 5)
        assert readable and os.read(read_end, 1) == b""      # EOF: nobody holds it
        assert ask(port_from_log(workdir / "mpxd.log"), "hi") == "hi"
        assert stop_pid(pid)
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def test_daemon_with_a_broken_script_exits_1_with_the_message(workdir):
    (workdir / "broken.py").write_text("def handle_request(s)\n")
    result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                          "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                          "broken.py"], cwd=workdir)
    assert result.returncode == 1
    assert f"Error: {workdir / 'broken.py'}: syntax error at line 1" in result.stderr
    assert not (workdir / "mpxd.pid").exists()
    assert "syntax error at line 1" in (workdir / "mpxd.log").read_text()


def test_daemon_on_a_taken_port_exits_1(workdir):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        result = run_command(["--daemon", "--port", str(taken.getsockname()[1]),
                              "--host", "127.0.0.1", "handler.py"], cwd=workdir)
    finally:
        taken.close()
    assert result.returncode == 1
    assert "address already in use" in result.stderr
    assert "log lines are discarded" in result.stderr   # the warning, before detaching


def test_daemon_refused_by_a_held_pidfile_exits_1_naming_the_pid(workdir):
    first = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                         "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                         "handler.py"], cwd=workdir)
    assert first.returncode == 0, first.stderr
    pid = int((workdir / "mpxd.pid").read_text())
    second = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                          "--pidfile", "mpxd.pid", "--log-file", "second.log",
                          "handler.py"], cwd=workdir)
    assert second.returncode == 1
    assert f"another mpxd is running (pid {pid} holds the pidfile" in second.stderr
    assert int((workdir / "mpxd.pid").read_text()) == pid
    assert stop_pid(pid)
    assert wait_until(lambda: not (workdir / "mpxd.pid").exists())


def test_daemon_usr1_moves_log_lines_and_stdout_to_the_new_file(workdir):
    result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                          "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                          "handler.py"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    pid = int((workdir / "mpxd.pid").read_text())
    log, rotated = workdir / "mpxd.log", workdir / "mpxd.log.1"
    port = port_from_log(log)
    os.rename(log, rotated)
    os.kill(pid, signal.SIGUSR1)
    assert wait_until(lambda: log.exists() and "reopened" in log.read_text())
    assert ask(port, "print") == "ok"
    assert stop_pid(pid)
    assert "printed by the handler" in log.read_text()
    assert "printed by the handler" not in rotated.read_text()


def test_command_returns_although_a_process_forked_by_the_script_lives_on(workdir):
    """The report ends at its newline: the command does not wait for the pipe's EOF."""
    (workdir / "forking.py").write_text(
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(60)       # holds every descriptor the daemon had\n"
        "    os._exit(0)\n"
        f"open({str(workdir / 'child.pid')!r}, 'w').write(str(child))\n"
        "def handle_request(s):\n"
        "    s.response = s.request\n")
    try:
        result = run_command(["--daemon", "--port", "0", "--host", "127.0.0.1",
                              "--pidfile", "mpxd.pid", "--log-file", "mpxd.log",
                              "forking.py"], cwd=workdir)
        assert result.returncode == 0, result.stderr
        port = port_from_log(workdir / "mpxd.log")
        assert ask(port, "hi") == "hi"
        # A TERM to that child made it run mpxd's start-up clean-up, which
        # removed the daemon's pidfile: the daemon then outlived the test.
        assert stop_pid(int((workdir / "child.pid").read_text()))
        assert (workdir / "mpxd.pid").exists()
        assert ask(port, "still") == "still"
    finally:
        child_pid = workdir / "child.pid"
        if child_pid.exists():
            stop_pid(int(child_pid.read_text()))
