"""mpxd.unix: unix-socket listeners with peer credentials, file modes and stale files."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from conftest import ROOT
from mpxd.listeners import ListenError
from mpxd.unix import UnixPeer, bind_unix

HANDLER = '''
def handle_open(s):
    s.response = f"peer {tuple(s.peer)!r} pid={s.peer.pid}"

def handle_request(s):
    s.response = s.request
'''


@pytest.fixture
def handler(tmp_path):
    path = tmp_path / "unix_handler.py"
    path.write_text(HANDLER)
    return str(path)


class UnixClient:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def readline(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def ask(self, line: str) -> str:
        self.file.write(line.encode() + b"\n")
        self.file.flush()
        return self.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_unix_session_peer_is_pid_uid_gid(mpxd, handler, tmp_path):  # noqa: F811
    path = str(tmp_path / "a.sock")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--unix", path, handler])
    d.wait_for(f"listening on {path}")
    c = UnixClient(path)
    mine = (os.getpid(), os.getuid(), os.getgid())
    assert c.readline() == f"peer {mine!r} pid={os.getpid()}"
    assert c.ask("over unix") == "over unix"
    c.close()
    d.wait_for(rf"session 1 unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()} "
               rf"closed: eof")
    assert d.stop() == 0


def test_unix_only_daemon_needs_no_port_and_removes_its_files(mpxd, handler, tmp_path):  # noqa: F811
    first, second = str(tmp_path / "one.sock"), str(tmp_path / "two.sock")
    d = mpxd(["--unix", first, "--unix", second, "--unix-mode", "0600", handler])
    d.wait_for(f"listening on {second}")
    assert "listening on 127.0.0.1" not in d.log()
    for path in (first, second):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        c = UnixClient(path)
        assert c.readline().startswith("peer ")
        c.close()
    assert d.stop() == 0
    assert not os.path.exists(first) and not os.path.exists(second)


def test_default_mode_is_0660(mpxd, handler, tmp_path):  # noqa: F811
    path = str(tmp_path / "m.sock")
    d = mpxd(["--unix", path, handler])
    d.wait_for(f"listening on {path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert d.stop() == 0


def test_stale_socket_file_is_replaced(mpxd, handler, tmp_path):  # noqa: F811
    path = str(tmp_path / "stale.sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)              # bound, never unlinked: what a crash leaves
    crashed.close()
    d = mpxd(["--unix", path, handler])
    d.wait_for(f"listening on {path}")
    c = UnixClient(path)
    assert c.readline().startswith("peer ")
    c.close()
    assert d.stop() == 0


def test_live_socket_and_other_files_are_left_alone(tmp_path, handler):
    live = str(tmp_path / "live.sock")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(live)
    holder.listen(1)
    regular = tmp_path / "file.sock"
    regular.write_text("precious")
    try:
        for path, message in ((live, "another process is listening there"),
                              (str(regular), "exists and is not a socket")):
            result = subprocess.run([sys.executable, "-m", "mpxd", "--unix", path, handler],
                                    capture_output=True, text=True, timeout=30, cwd=ROOT)
            assert result.returncode == 1, result.stderr
            assert message in result.stderr
        assert regular.read_text() == "precious"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(live)             # still the holder's socket
        probe.close()
    finally:
        holder.close()


def test_socket_file_replaced_by_someone_else_is_not_removed(tmp_path):
    path = str(tmp_path / "mine.sock")
    listener = bind_unix(path, 0o600, 4)
    os.unlink(path)
    with open(path, "w") as f:
        f.write("not ours")
    listener.remove()
    assert open(path).read() == "not ours"


def test_bad_unix_arguments(tmp_path, handler):
    too_long = str(tmp_path / ("x" * 120))
    with pytest.raises(ListenError, match="longer than"):
        bind_unix(too_long, 0o600, 4)
    result = subprocess.run([sys.executable, "-m", "mpxd", "--unix", str(tmp_path / "s"),
                             "--unix-mode", "999", handler],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert "not an octal file mode" in result.stderr


def test_a_path_given_twice_is_listened_on_once(mpxd, handler, tmp_path):  # noqa: F811
    path = str(tmp_path / "twice.sock")
    os.symlink(tmp_path, tmp_path.parent / (tmp_path.name + "-link"))
    through_link = str(tmp_path.parent / (tmp_path.name + "-link") / "twice.sock")
    d = mpxd(["--unix", path, "--unix", os.path.relpath(path, ROOT), "--unix", through_link,
              handler])
    d.wait_for(f"listening on {path}")
    c = UnixClient(path)
    assert c.readline().startswith("peer ")
    c.close()
    assert d.stop() == 0
    assert d.log().count("listening on") == 1
    assert "another process" not in d.log()


def test_unix_paths_that_cannot_work_are_usage_errors(tmp_path, handler):
    shared = str(tmp_path / "both.sock")
    for args, message in ((["--unix", ""], "--unix needs a path"),
                          (["--unix", shared, "--control", shared],
                           f"--control {shared} is also a --unix path")):
        result = subprocess.run([sys.executable, "-m", "mpxd", *args, handler],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    assert not os.path.exists(shared)


def test_unix_peer_prints_its_credentials():
    peer = UnixPeer(12, 1000, 100)
    assert peer == (12, 1000, 100) and peer.uid == 1000
    assert str(peer) == "unix:pid=12,uid=1000,gid=100"


def test_a_stale_socket_file_that_cannot_be_removed_is_a_clear_error(tmp_path, monkeypatch):
    # A root-owned leftover in a sticky /tmp, mpxd run as another user:
    # PermissionError came out as a traceback.
    path = str(tmp_path / "stale.sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)
    crashed.close()

    def refuse(target):
        raise PermissionError(1, "Operation not permitted", target)
    monkeypatch.setattr("mpxd.unix.os.unlink", refuse)
    with pytest.raises(ListenError, match=r"cannot listen on .*stale.sock: a stale socket "
                                          r"file is there and cannot be removed \(Operation "
                                          r"not permitted\); remove it, or choose another"):
        bind_unix(path, 0o660, 16)
