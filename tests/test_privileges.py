"""mpxd.privileges and ``--user``/``--group``: bind as root, then serve as the user.

These tests need root (they are skipped otherwise).  The script lives in a
directory of mode 0755 and is 0644, so that ``nobody`` can read it after the
switch; the port is below 1024, so binding it proves it was bound as root.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import ROOT, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

SCRIPT = """\
import os

def ids():
    groups = ",".join(str(g) for g in sorted(os.getgroups()))
    return f"{os.getresuid()} {os.getresgid()} {groups} {os.environ.get('HOME')}"

AT_IMPORT = ids()       # the script's top level is handler code too

def handle_request(s):
    s.response = AT_IMPORT if s.request == "import" else ids()
"""

# Starts mpxd as root with supplementary groups, which --user must drop too.
WITH_GROUPS = ("import os, sys\n"
               "os.setgroups([0, 4, 27])\n"
               "os.execv(sys.executable, [sys.executable, '-m', 'mpxd', *sys.argv[1:]])\n")


@pytest.fixture
def shared_dir():
    """A directory under /tmp that ``nobody`` may read (pytest's tmp is 0700)."""
    path = tempfile.mkdtemp(prefix="mpxd-test-")
    os.chmod(path, 0o755)
    with open(os.path.join(path, "handler.py"), "w") as f:
        f.write(SCRIPT)
    os.chmod(os.path.join(path, "handler.py"), 0o644)
    yield path
    shutil.rmtree(path)


def free_privileged_port() -> int:
    """A port below 1024 nothing listens on (tests otherwise use port 0: above 1024)."""
    for port in range(1023, 900, -1):
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    pytest.skip("no free port below 1024")


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().rstrip("\n")


def proc_ids(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: " ".join(fields[key].split()) for key in ("Uid", "Gid", "Groups")}


def in_child(code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a child (started as root) with the names it needs."""
    prelude = ("import os\n"
               "from mpxd.privileges import PrivilegeError, drop_privileges\n"
               f"UID, GID = {NOBODY.pw_uid}, {NOBODY.pw_gid}\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_user_binds_a_privileged_port_then_serves_as_that_user(mpxd, shared_dir):
    port = free_privileged_port()
    pidfile = os.path.join(shared_dir, "mpxd.pid")
    m = mpxd(["--port", str(port), "--host", "127.0.0.1", "--user", "nobody",
              "--pidfile", pidfile, os.path.join(shared_dir, "handler.py")],
             command=[sys.executable, "-c", WITH_GROUPS])
    assert m.wait_listening() == port
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    as_nobody = f"({uid}, {uid}, {uid}) ({gid}, {gid}, {gid}) {gid} {NOBODY.pw_dir}"
    assert ask(port, "who") == as_nobody
    assert ask(port, "import") == as_nobody       # loaded after the switch
    assert proc_ids(m.pid) == {"Uid": f"{uid} {uid} {uid} {uid}",
                               "Gid": f"{gid} {gid} {gid} {gid}", "Groups": str(gid)}
    with open(pidfile) as f:
        assert f.read() == f"{m.pid}\n"
    assert m.stop() == 0
    # nobody cannot remove a file from a root-owned directory: emptied instead
    with open(pidfile) as f:
        assert f.read() == ""


def test_group_alone_changes_only_the_groups(mpxd, shared_dir):
    group = grp.getgrgid(NOBODY.pw_gid).gr_name        # nogroup or nobody
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--group", group,
              os.path.join(shared_dir, "handler.py")])
    port = m.wait_listening()
    gid = NOBODY.pw_gid
    assert ask(port, "who").startswith(f"(0, 0, 0) ({gid}, {gid}, {gid}) {gid} ")
    assert m.stop() == 0


def test_unknown_user_exits_1_before_serving(mpxd, shared_dir):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--user", "no-such-user-mpxd",
              os.path.join(shared_dir, "handler.py")])
    assert m.wait() == 1
    assert "unknown user 'no-such-user-mpxd'" in m.stderr()
    assert "listening on" not in m.stderr()


def test_unknown_group_exits_1(mpxd, shared_dir):
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--user", "nobody",
              "--group", "no-such-group-mpxd", os.path.join(shared_dir, "handler.py")])
    assert m.wait() == 1
    assert "unknown group 'no-such-group-mpxd'" in m.stderr()


def test_a_script_the_user_cannot_read_names_the_user(mpxd, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)       # root's only
    script = private / "handler.py"
    script.write_text("def handle_request(s):\n    s.response = 'x'\n")
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--user", "nobody", str(script)])
    assert m.wait() == 1
    assert f"{script}: cannot read as user nobody: Permission denied" in m.stderr()


def test_check_with_user_validates_as_that_user(tmp_path, shared_dir):
    # --check said "ok" as root for a script the daemon then could not read.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    script = private / "handler.py"
    script.write_text("def handle_request(s):\n    s.response = 'x'\n")
    readable = os.path.join(shared_dir, "handler.py")       # nobody may read this one

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mpxd", "--check", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)

    refused = check("--user", "nobody", str(script))
    assert refused.returncode == 1
    # (Ending the output: the Python here may warn that nobody cannot read it.)
    assert refused.stderr.endswith(f"Error: {script}: cannot read as user nobody: "
                                   f"Permission denied\n")
    assert check(str(script)).returncode == 0                   # root may read it
    assert check("--user", "nobody", readable).returncode == 0
    unknown = check("--user", "no-such-user-here", readable)
    assert (unknown.returncode, unknown.stderr) == (1, "Error: unknown user "
                                                       "'no-such-user-here'\n")


def test_a_low_port_without_root_says_how_to_get_one():
    port = free_privileged_port()
    result = in_child(f"""
        import encodings.idna   # getaddrinfo needs it; nobody cannot read root's Python
        from mpxd.listeners import ListenError, bind_listeners
        drop_privileges("nobody", None)
        try:
            bind_listeners(["127.0.0.1"], {port}, 16)
        except ListenError as e:
            print(e)
    """)
    assert result.stdout.strip() == (
        f"cannot listen on 127.0.0.1:{port}: Permission denied (ports below 1024 need "
        f"root: start as root with --user, or let systemd bind the port)"), result.stderr


def test_numeric_ids_are_accepted():
    child = in_child("""
        drop_privileges(str(UID), str(GID))
        print(os.getresuid(), os.getresgid(), os.getgroups())
    """)
    assert child.stdout == \
        f"{(NOBODY.pw_uid,) * 3} {(NOBODY.pw_gid,) * 3} [{NOBODY.pw_gid}]\n", child.stderr


def test_switching_without_root_is_an_error_naming_the_cause():
    child = in_child("""
        os.setresgid(GID, GID, GID)
        os.setresuid(UID, UID, UID)
        try:
            drop_privileges("root", None)
        except PrivilegeError as e:
            print(e)
    """)
    assert child.stdout == "cannot switch to 'root': mpxd is not running as root\n", \
        child.stderr


def test_asking_for_the_user_we_already_are_is_fine():
    child = in_child("""
        os.setgroups([GID])
        os.setresgid(GID, GID, GID)
        os.setresuid(UID, UID, UID)
        drop_privileges("nobody", None)
        print("still", os.getresuid())
    """)
    assert child.stdout == f"still {(NOBODY.pw_uid,) * 3}\n", child.stderr


def test_a_python_the_user_cannot_read_is_named_not_called_missing(tmp_path, shared_dir):
    # pyenv under /root: after --user every module not imported yet failed,
    # an import in the script said "not installed ... pip install it", and
    # TLS start-up died with a traceback (time.strptime imports lazily).
    library = tmp_path / "private" / "lib"
    library.mkdir(parents=True)
    (tmp_path / "private").chmod(0o700)
    script = os.path.join(shared_dir, "script.py")
    with open(script, "w") as f:
        f.write("import no_such_module_here\n")
    os.chmod(script, 0o644)
    child = in_child(f"""
        import logging
        logging.basicConfig(format="%(levelname)s %(message)s")
        os.__file__ = {str(library / "os.py")!r}           # as if Python lived there
        import mpxd.core                                   # as the daemon has, by then
        from mpxd.script import ScriptError, load_script
        drop_privileges("nobody", None)
        try:
            load_script({script!r})
        except ScriptError as e:
            print(e)
    """)
    warning = (f"user nobody cannot read Python's standard library in {library}: modules "
               f"not imported yet will fail to import; run mpxd with a Python that user "
               f"can read")
    assert child.stderr.startswith("WARNING " + warning), child.stderr
    assert f"No module named 'no_such_module_here' ({warning}" in child.stdout
    assert "pip" not in child.stdout


def test_tls_files_a_hup_cannot_read_after_the_switch_are_said_at_start(mpxd, shared_dir):
    # Every HUP failed with "cannot read TLS key": the key is root's (0600),
    # as the README advised, and mpxd runs as nobody by then.
    cert, key = os.path.join(shared_dir, "cert.pem"), os.path.join(shared_dir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--user", "nobody", "--tls-cert", cert,
              "--tls-key", key, os.path.join(shared_dir, "handler.py")])
    m.wait_listening()
    m.wait_for(rf"WARNING TLS key {key} is not readable by user nobody, which mpxd runs "
               r"as now: a HUP cannot load a renewed certificate")
    m.signal(signal.SIGHUP)
    m.wait_for(rf"TLS reload failed, still using the previous certificate: cannot read TLS "
               rf"key {key} as user nobody")
    assert m.stop() == 0


def test_usr1_under_workers_makes_a_log_file_the_workers_can_write(shared_dir):
    # The supervisor keeps root and reopened first, so it made the new file
    # root's: every worker then said "Permission denied" and wrote on into
    # the rotated file, which logrotate later compresses and deletes.
    logs = os.path.join(shared_dir, "logs")
    os.mkdir(logs)
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)     # as the README tells
    log_file = os.path.join(logs, "mpxd.log")
    child = subprocess.Popen(
        [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
         "--workers", "2", "--user", "nobody", "--log-file", log_file,
         os.path.join(shared_dir, "handler.py")], cwd=ROOT)
    try:
        def logged(pattern: str) -> str | None:
            try:
                with open(log_file) as f:
                    match = re.search(pattern, f.read())
            except FileNotFoundError:
                return None
            return match.group(1) if match else None
        assert wait_until(lambda: logged(r"listening on 127\.0\.0\.1:(\d+)"), timeout=20)
        port = int(logged(r"listening on 127\.0\.0\.1:(\d+)"))
        os.rename(log_file, log_file + ".1")
        os.kill(child.pid, signal.SIGUSR1)
        assert wait_until(lambda: os.path.exists(log_file)
                          and len(re.findall(r"reopened|cannot reopen",
                                             open(log_file).read())) >= 3, timeout=10)
        assert os.stat(log_file).st_uid == NOBODY.pw_uid
        for _ in range(4):
            ask(port, "who")
        assert wait_until(lambda: open(log_file).read().count("closed: eof") == 4,
                          timeout=10)
        with open(log_file) as f:
            assert "cannot reopen" not in f.read()
    finally:
        child.terminate()
        assert child.wait(timeout=20) == 0


def test_a_socket_file_nobody_may_remove_is_said_at_exit(shared_dir):
    # It stayed behind without a word; mpxctl then said "nobody listens".
    control = os.path.join(shared_dir, "control.sock")     # a root-owned directory
    child = subprocess.Popen(
        [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
         "--user", "nobody", "--control", control, os.path.join(shared_dir, "handler.py")],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        while "listening on" not in child.stderr.readline():
            pass
    finally:
        child.terminate()
    _, err = child.communicate(timeout=20)
    assert child.returncode == 0
    assert f"cannot remove socket file {control}: Permission denied; the next start " \
           "replaces it" in err
    assert os.path.exists(control)
