"""mpxd.pidfile: a pidfile held with flock, and ``--pidfile`` on the real command.

A second ``acquire`` has to come from another process (flock locks belong
to the open file, and one process could lock twice through two opens, but
the point is another instance), so those tests run a small Python child.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from conftest import HANDLERS, ROOT
from mpxd.pidfile import PidFile, PidFileError

COUNTER = os.path.join(HANDLERS, "counter.py")


def acquire_in_child(path) -> subprocess.CompletedProcess:
    """Try ``PidFile(path).acquire()`` in another process; print the outcome."""
    code = ("import sys\n"
            "from mpxd.pidfile import PidFile, PidFileError\n"
            "try:\n"
            f"    PidFile({str(path)!r}).acquire()\n"
            "except PidFileError as e:\n"
            "    print(e); sys.exit(1)\n"
            "print('acquired')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


# ------------------------------------------------------------------- unit

def test_acquire_writes_our_pid_and_release_removes_the_file(tmp_path):
    path = tmp_path / "mpxd.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    pidfile.release()
    assert not path.exists()
    pidfile.release()                                # twice: nothing to do


def test_second_acquire_in_another_process_is_refused_naming_our_pid(tmp_path):
    path = tmp_path / "mpxd.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    try:
        child = acquire_in_child(path)
        assert child.returncode == 1
        assert f"another mpxd is running (pid {os.getpid()} holds the pidfile {path})" \
            in child.stdout
        assert path.read_text() == f"{os.getpid()}\n"     # untouched
    finally:
        pidfile.release()
    assert acquire_in_child(path).stdout == "acquired\n"  # free again once released


@pytest.mark.parametrize("leftover", ["", "garbage\n", "12x\n", "1\n", "{parent}\n"])
def test_an_unlocked_leftover_file_is_taken_over(tmp_path, leftover):
    """Whatever pid it names, even a live one (pid reuse): nobody holds the lock."""
    path = tmp_path / "mpxd.pid"
    path.write_text(leftover.format(parent=os.getppid()))
    pidfile = PidFile(str(path))
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    pidfile.release()
    assert not path.exists()


def test_a_file_removed_between_open_and_lock_is_not_used(tmp_path, monkeypatch):
    """The previous owner may unlink the file just before we lock it: open again."""
    path = tmp_path / "mpxd.pid"
    path.write_text("4242\n")
    real_flock = fcntl.flock
    locked = []

    def flock_after_the_owner_left(fd, operation):
        if not locked:
            os.unlink(path)                      # the exiting owner's release
        locked.append(os.fstat(fd).st_ino)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_owner_left)
    pidfile = PidFile(str(path))
    pidfile.acquire()
    assert len(locked) == 2                      # the unlinked file, then a new one
    assert path.read_text() == f"{os.getpid()}\n"
    assert os.stat(path).st_ino == locked[1]
    monkeypatch.undo()
    assert acquire_in_child(path).returncode == 1   # and it is the locked one
    pidfile.release()
    assert not path.exists()


def test_release_leaves_a_file_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "mpxd.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    os.unlink(path)
    path.write_text("4242\n")                        # someone else's file now
    pidfile.release()
    assert path.read_text() == "4242\n"


def test_release_after_the_file_was_removed_does_nothing(tmp_path):
    path = tmp_path / "mpxd.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    os.unlink(path)
    pidfile.release()
    assert not path.exists()


def test_release_empties_the_file_when_it_cannot_be_removed(tmp_path):
    """As after --user: the directory is not writable, the descriptor still is."""
    if os.geteuid() == 0:
        pytest.skip("root may remove files from read-only directories")
    directory = tmp_path / "run"
    directory.mkdir()
    path = directory / "mpxd.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    directory.chmod(0o555)
    try:
        pidfile.release()
        assert path.read_text() == ""
    finally:
        directory.chmod(0o755)


def test_a_symlink_at_the_path_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "mpxd.pid"
    path.symlink_to(victim)
    with pytest.raises(PidFileError, match="symbolic link"):
        PidFile(str(path)).acquire()
    assert victim.read_text() == "precious\n"


def test_a_missing_directory_is_reported(tmp_path):
    path = tmp_path / "no" / "such" / "mpxd.pid"
    with pytest.raises(PidFileError, match=f"cannot open pidfile {path}: No such file"):
        PidFile(str(path)).acquire()


# ------------------------------------------------------------ the command

def test_pidfile_holds_the_daemon_pid_and_is_removed_on_exit(daemon, tmp_path):
    path = tmp_path / "mpxd.pid"
    d = daemon(COUNTER, "--pidfile", str(path))
    assert path.read_text() == f"{d.pid}\n"       # written before "listening on"
    assert d.connect().ask("3") == "3"
    assert d.stop() == 0
    assert not path.exists()


def test_second_instance_with_the_same_pidfile_exits_1_naming_the_pid(daemon, tmp_path):
    path = tmp_path / "mpxd.pid"
    d = daemon(COUNTER, "--pidfile", str(path))
    second = subprocess.run(
        [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
         "--pidfile", str(path), COUNTER],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert second.returncode == 1
    assert f"another mpxd is running (pid {d.pid} holds the pidfile {path})" \
        in second.stderr
    assert "Traceback" not in second.stderr
    assert path.read_text() == f"{d.pid}\n"        # the first one's, untouched
    assert d.connect().ask("1") == "1"            # and it still serves
    assert d.stop() == 0
    assert not path.exists()


def test_stale_pidfile_of_a_dead_instance_is_taken_over(daemon, tmp_path):
    path = tmp_path / "mpxd.pid"
    path.write_text("1\n")                        # a live pid, but nobody's lock
    d = daemon(COUNTER, "--pidfile", str(path))
    assert path.read_text() == f"{d.pid}\n"
    assert d.stop() == 0
    assert not path.exists()


def test_pidfile_is_released_when_start_up_fails(tmp_path):
    path = tmp_path / "mpxd.pid"
    broken = tmp_path / "broken.py"
    broken.write_text("def handle_request(s)\n")
    result = subprocess.run(
        [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
         "--pidfile", str(path), str(broken)],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert "syntax error" in result.stderr
    assert not path.exists()
