"""mpxd.forks: a process forked from mpxd keeps none of mpxd's descriptors."""

from __future__ import annotations

import os
import signal
import socket
import stat

from conftest import wait_until
from mpxd.forks import keep_from_children
from spawn import mpxd, pid_gone  # noqa: F401 - a fixture


def _is_dev_null(fd: int) -> bool:
    return os.path.samestat(os.fstat(fd), os.stat(os.devnull))


def socket_kind(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def open_files(pid: int) -> list[str]:
    """What ``pid``'s descriptors above 2 point to, as /proc shows it."""
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
            if int(fd) > 2]


def test_a_forked_child_finds_dev_null_where_the_listed_descriptors_were():
    kept, forgotten = socket.socketpair()
    forget_kept = keep_from_children(lambda: [kept.fileno()])
    forget_forgotten = keep_from_children(lambda: [forgotten.fileno()])
    forget_forgotten()
    try:
        pid = os.fork()
        if pid == 0:                                    # pragma: no cover - the child
            ok = _is_dev_null(kept.fileno()) and socket_kind(forgotten.fileno())
            kept.close()                                # closes the /dev/null copy, harmless
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert socket_kind(kept.fileno())               # the parent's stays a socket
    finally:
        forget_kept()
        kept.close()
        forgotten.close()


SPAWNER = """\
import multiprocessing, os, time
def handle_request(s):
    p = multiprocessing.Process(target=time.sleep, args=(60,))
    p.start()
    with open({pid_file!r}, "w") as f:
        f.write(str(p.pid))
    s.response = "started"
"""


def test_a_child_from_multiprocessing_does_not_hold_the_port_or_the_pidfile(  # noqa: F811
        mpxd, tmp_path):
    # It held the listening socket: after mpxd stopped, a restart failed with
    # "address already in use", and connections queued where nobody accepted.
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER.format(pid_file=str(pid_file)))
    pidfile = tmp_path / "mpxd.pid"
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--pidfile", str(pidfile), str(script)])
    port = d.wait_listening()
    child = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"go\n")
            assert sock.makefile().readline() == "started\n"
        child = int(pid_file.read_text())

        def mpxds() -> list[str]:
            return [f for f in open_files(child)
                    if f.startswith(("socket:", "anon_inode:")) or f == str(pidfile)]
        # The child lets them go in its at-fork hook, which may run after
        # the parent's handler has answered.
        assert wait_until(lambda: not mpxds(), timeout=5), mpxds()
        d.signal(signal.SIGTERM)
        d.wait_for("stopped")
        # mpxd itself then waits for its child, as multiprocessing does, and says so.
        d.wait_for(rf"waiting for 1 process the script started with multiprocessing "
                   rf"\(pid {child}\) to end: end them in on_stop")
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))             # the port is free
        assert not pidfile.exists()
    finally:
        if child is not None and not pid_gone(child):
            os.kill(child, signal.SIGKILL)
            wait_until(lambda: pid_gone(child), timeout=5)


def test_a_child_forked_at_import_ends_with_the_import(mpxd, tmp_path):  # noqa: F811
    # Without os._exit it went on through mpxd's start-up: a second daemon
    # listening on the first one's sockets, which outlived the first.
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "forking.py"
    script.write_text("import os\n"
                      "if os.fork() == 0:\n"
                      f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "def handle_request(s):\n"
                      "    s.response = 'ok'\n")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", str(script)])
    d.wait_listening()
    child = int(pid_file.read_text())
    assert wait_until(lambda: pid_gone(child), timeout=5)
    assert f"process {child}, forked by {script} at import, reached the end of the " \
           f"import: it exits here rather than start a second mpxd" in d.log()
    assert d.log().count("listening on") == 1
    assert d.stop() == 0
