"""mpxd.core and mpxd.loop end to end: the real ``mpxd`` command over TCP.

Each test starts the daemon with the ``daemon`` fixture (pexpect, port 0,
the ``listening on`` line as the ready signal) and talks to it with plain
sockets: SPEC sections 1-3 and the connection life of section 4.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import HANDLERS, ROOT, wait_until
from mpxd.loop import FIRST_READ, KEEPALIVE_PROBES, RECV_SIZE, _read_rest, prepare_listener

COUNTER = os.path.join(HANDLERS, "counter.py")
ECHO = os.path.join(HANDLERS, "echo.py")
CHAT = os.path.join(HANDLERS, "chat.py")

# Logs every handler call to a file, one line each, so tests can count them.
RECORDING_SCRIPT = """
import time
from mpxd import close_session, send_response, sessions

LOG = {log!r}
by_name = {{}}


def record(*words):
    with open(LOG, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")


def handle_open(s):
    record("open", s.id)
    s.response = f"hello {{s.id}}"


def handle_request(s):
    record("request", s.id, s.request)
    command, _, rest = s.request.partition(" ")
    if command == "close":
        s.response = "closing"
        close_session(s)
    elif command == "boom":
        raise RuntimeError("boom on purpose")
    elif command == "name":
        by_name[rest] = s
        s.response = "named " + rest
    elif command == "kick":
        close_session(by_name[rest])
        s.response = "kicked " + rest
    elif command == "tell":
        name, _, text = rest.partition(" ")
        other = by_name[name]
        other.response = f"{{s.id}} says {{text}}"
        s.response = f"sent {{send_response(other)}}"
    elif command == "sleep":
        time.sleep(float(rest))
        s.response = "slept"
    else:
        s.response = f"{{s.id}}:{{s.request}}"


def handle_close(s):
    record("close", s.id, s.closed)
"""


class Recorder:
    """The recording handler script and what it wrote."""

    def __init__(self, tmp_path):
        self.log = str(tmp_path / "calls.log")
        self.script = str(tmp_path / "recording.py")
        with open(self.script, "w") as f:
            f.write(RECORDING_SCRIPT.format(log=self.log))

    def calls(self) -> list[list[str]]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [line.split(" ", 2) for line in f.read().splitlines()]

    def count(self, what: str) -> collections.Counter:
        return collections.Counter(int(c[1]) for c in self.calls() if c[0] == what)

    def requests_of(self, session_id: int) -> list[str]:
        return [c[2] if len(c) > 2 else "" for c in self.calls()
                if c[0] == "request" and int(c[1]) == session_id]

    def wait_closed(self, session_id: int) -> None:
        assert wait_until(lambda: self.count("close")[session_id] >= 1), \
            f"handle_close never ran for session {session_id}"


@pytest.fixture
def recorder(tmp_path):
    return Recorder(tmp_path)


def greeted(client) -> int:
    """Read the recording script's greeting; return the session id."""
    line = client.readline()
    assert line.startswith("hello ")
    return int(line.split()[1])


# ------------------------------------------------------------- the counter

def test_counter_semantics(daemon):
    d = daemon(COUNTER)
    a, b = d.connect(), d.connect()
    assert [a.ask("1"), a.ask("1"), a.ask("5 global")] == ["1", "2", "5"]
    assert b.ask("3") == "3", "each session has its own counter"
    assert b.ask("2 global") == "7", "the global counter is shared"
    assert a.ask("10") == "12"
    assert a.ask("-4") == "8"
    assert a.ask("1 other") == "9", "a second token other than global: own counter"
    assert a.ask("x") == "0", "anything unparsable counts as 0, like the C example"
    assert a.ask("") == "0", "an empty line is a request too"
    assert a.ask("0 global") == "7"
    a.close()
    b.close()
    assert d.stop() == 0


def test_pipelining_ten_thousand_lines_in_one_write(daemon):
    d = daemon(COUNTER)
    c = d.connect(timeout=20)
    c.send("1\n" * 10_000)
    assert c.readlines(10_000) == [str(n) for n in range(1, 10_001)]
    assert c.ask("0") == "10000"


def test_a_final_line_without_lf_before_half_close_is_answered(daemon):
    d = daemon(COUNTER)
    c = d.connect()
    c.send("1\n2\r\n3")
    c.shutdown_write()           # what nc -N does at the end of its input
    assert c.read_all() == b"1\n3\n6\n"


def test_half_close_with_many_pipelined_lines_answers_them_all(daemon):
    d = daemon(COUNTER)
    c = d.connect(timeout=20)
    c.send("2\n" * 5000)
    c.shutdown_write()
    answers = c.read_all().decode().split("\n")
    assert answers == [str(2 * n) for n in range(1, 5001)] + [""]


# ---------------------------------------------------------------- the wire

def test_echo_round_trips_any_bytes(daemon):
    d = daemon(ECHO)
    c = d.connect()
    weird = b"\xff\xfe raw \xc3 \x00 nul \r bare cr \t\xe2\x82\xac"
    c.send(weird + b"\n")
    assert c.sock.recv(4096) == weird + b"\n"
    c.send(b"crlf\r\n\n\nafter\n")     # empty responses send nothing
    assert c.readlines(2) == ["crlf", "after"]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_reads_around_the_first_read_size_lose_nothing(daemon, delta):
    """The loop reads FIRST_READ bytes first and the rest in a second read:
    a burst of exactly FIRST_READ bytes (the second read finds nothing), one
    byte less and one more must all arrive whole, and so must a burst far
    larger than both reads together."""
    d = daemon(ECHO)
    c = d.connect(timeout=20)
    size = FIRST_READ + delta
    line = b"x" * (size - 1)
    c.send(line + b"\n")                       # one burst of `size` bytes
    assert c.readlines(1) == [line.decode()]
    lines = [(b"%05d" % n) * 40 for n in range(2 * RECV_SIZE // 200 + delta + 3)]
    c.send(b"\n".join(lines) + b"\n")
    assert c.readlines(len(lines)) == [x.decode() for x in lines]


def test_the_rest_of_a_full_first_read_is_added_and_errors_wait_for_the_next_pass():
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"more")
        assert _read_rest(b.fileno(), b"first") == b"firstmore"
        assert _read_rest(b.fileno(), b"only") == b"only"      # EAGAIN: nothing else waits
        a.close()
        assert _read_rest(b.fileno(), b"last") == b"last"      # EOF: seen by the next read
    assert _read_rest(b.fileno(), b"kept") == b"kept"          # even EBADF loses no data


def test_crlf_end_of_line(daemon, write_script):
    script = write_script("def handle_request(s):\n"
                          "    s.response = 'two\\nlines' if s.request == 'm' else s.request\n")
    d = daemon(script, "--eol", "crlf")
    c = d.connect()
    c.send("a\nm\nb\r\n")
    c.shutdown_write()
    assert c.read_all() == b"a\r\ntwo\r\nlines\r\nb\r\n"


def test_line_breaks_inside_a_response_make_several_lines(daemon, write_script):
    script = write_script("""
        def handle_request(s):
            s.response = {"two": "a\\nb", "trailing": "c\\n", "crlf": "d\\r\\ne"}[s.request]
    """)
    d = daemon(script)
    c = d.connect()
    c.send_lines("two", "trailing", "crlf")
    c.shutdown_write()
    assert c.read_all() == b"a\nb\nc\nd\r\ne\n"


def test_send_response_inside_the_handler_keeps_the_order(daemon, write_script):
    script = write_script("""
        from mpxd import send_response
        def handle_request(s):
            for i in range(3):
                s.response = f"{s.request}{i}"
                assert send_response(s) is True
                assert s.response == ""
            s.response = s.request + "-last"
    """)
    d = daemon(script)
    c = d.connect()
    c.send_lines("x", "y")
    assert c.readlines(8) == ["x0", "x1", "x2", "x-last", "y0", "y1", "y2", "y-last"]


# ------------------------------------------------------ sessions together

def test_greeting_from_handle_open_comes_first(daemon, recorder):
    d = daemon(recorder.script)
    a = d.connect()
    b = d.connect()
    id_a, id_b = greeted(a), greeted(b)
    assert id_a != id_b
    assert a.ask("x") == f"{id_a}:x"


def test_delayed_responses_between_sessions(daemon, recorder):
    d = daemon(recorder.script)
    a, b = d.connect(), d.connect()
    id_a = greeted(a)
    greeted(b)
    assert a.ask("name alice") == "named alice"
    assert b.ask("tell alice hi there") == "sent True"
    assert a.readline() == f"{id_a + 1} says hi there"
    # alice's own answers still come in order after the pushed line
    assert a.ask("ping") == f"{id_a}:ping"
    a.close()
    recorder.wait_closed(id_a)
    assert b.ask("tell alice anyone?") == "sent False", "a gone session sends nothing"


def test_timer_sends_a_delayed_response(daemon, write_script):
    script = write_script("""
        from mpxd import call_later, send_response
        def later(s, text):
            s.response = text
            send_response(s)
        def handle_request(s):
            call_later(0.2, later, s, "later " + s.request)
            s.response = "now " + s.request
    """)
    d = daemon(script)
    c = d.connect()
    c.send_lines("a", "b")
    assert c.readlines(4) == ["now a", "now b", "later a", "later b"]


def test_chat_broadcasts_to_every_other_session(daemon):
    d = daemon(CHAT)
    a = d.connect()
    assert a.readline().startswith("* welcome")
    b = d.connect()
    assert b.readline().startswith("* welcome")
    joined = a.readline()
    assert joined.startswith("* guest") and joined.endswith(" joined")
    assert a.ask("/nick alice") == "* you are now alice"
    assert b.readline().endswith(" is now alice")
    a.send_lines("hello")
    assert b.readline() == "<alice> hello"
    assert b.ask("/who").startswith("* here: ") and "alice" in b.ask("/who")
    b.close()
    assert a.readline().endswith(" left")
    assert a.ask("/quit") == "* bye"
    assert a.read_all() == b""


# ------------------------------------------------------- close_session

def test_close_session_writes_queued_output_then_drops_later_lines(daemon, recorder):
    d = daemon(recorder.script)
    c = d.connect()
    sid = greeted(c)
    c.send("one\nclose\nafter\nmore\n")
    assert c.read_all() == f"{sid}:one\nclosing\n".encode()
    recorder.wait_closed(sid)
    assert recorder.requests_of(sid) == ["one", "close"]


def test_close_session_output_survives_input_the_server_never_read(daemon, write_script):
    script = write_script("""
        from mpxd import close_session
        def handle_request(s):
            s.response = "z" * (1 << 20)
            close_session(s)
    """)
    d = daemon(script)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(10)
    sock.connect(d.address)
    sock.sendall(b"big\n" + b"x" * 200_000 + b"\n")   # more than one read
    time.sleep(0.5)                                    # read late
    received = 0
    with sock:
        while chunk := sock.recv(65536):
            received += len(chunk)
    assert received == (1 << 20) + 1


def test_close_session_from_another_session(daemon, recorder):
    d = daemon(recorder.script)
    a, b = d.connect(), d.connect()
    id_a, _ = greeted(a), greeted(b)
    assert a.ask("name victim") == "named victim"
    assert b.ask("kick victim") == "kicked victim"
    assert a.read_all() == b""
    recorder.wait_closed(id_a)


def test_no_input_is_handled_after_another_session_closed_it(daemon, recorder):
    """The kick and the victim's next line arrive in the same pass of the loop."""
    d = daemon(recorder.script)
    sleeper, kicker, victim = d.connect(), d.connect(), d.connect()
    greeted(sleeper), greeted(kicker)
    id_victim = greeted(victim)
    assert victim.ask("name victim") == "named victim"
    sleeper.send_lines("sleep 0.5")      # keeps the loop busy while both arrive
    time.sleep(0.1)
    kicker.send_lines("kick victim")
    time.sleep(0.05)
    victim.send_lines("too late")
    assert sleeper.readline() == "slept"
    assert kicker.readline() == "kicked victim"
    try:
        assert victim.read_all() == b""
    except ConnectionResetError:
        pass    # on a slow machine "too late" may arrive after the close: RST
    recorder.wait_closed(id_victim)
    assert recorder.requests_of(id_victim) == ["name victim"]


# ------------------------------------------- handle_close exactly once

def test_handle_close_runs_exactly_once_however_a_session_ends(daemon, recorder):
    d = daemon(recorder.script)
    ids = {}

    c = d.connect()                                 # peer EOF
    ids["eof"] = greeted(c)
    assert c.ask("x") == f"{ids['eof']}:x"
    c.close()

    c = d.connect()                                 # half-close
    ids["half-close"] = greeted(c)
    c.send_lines("y")
    c.shutdown_write()
    assert c.read_all() == f"{ids['half-close']}:y\n".encode()

    c = d.connect()                                 # reset (RST, not FIN)
    ids["reset"] = greeted(c)
    c.send("partial line without")
    c.reset()

    c = d.connect()                                 # close_session
    ids["close_session"] = greeted(c)
    c.send_lines("close")
    assert c.read_all() == b"closing\n"

    c = d.connect()                                 # handler error
    ids["error"] = greeted(c)
    c.send_lines("ok", "boom", "never")
    assert c.read_all() == f"{ids['error']}:ok\n".encode()
    d.expect_log("RuntimeError: boom on purpose")

    c = d.connect()                                 # no request at all
    ids["silent"] = greeted(c)
    c.close()

    kept = d.connect()                              # still open at shutdown
    ids["shutdown"] = greeted(kept)

    for sid in ids.values():
        if sid != ids["shutdown"]:
            recorder.wait_closed(sid)
    assert d.stop() == 0
    closes = recorder.count("close")
    assert {name: closes[sid] for name, sid in ids.items()} == {name: 1 for name in ids}
    assert recorder.count("open") == closes, "every opened session closed once"
    assert all(c[2] == "True" for c in recorder.calls() if c[0] == "close"), \
        "s.closed is true in handle_close"
    assert recorder.requests_of(ids["error"]) == ["ok", "boom"]


def test_handle_close_once_when_handle_open_fails(daemon, write_script, tmp_path):
    log = tmp_path / "closes.log"
    script = write_script(f"""
        def handle_open(s):
            raise ValueError("no greeting today")
        def handle_request(s):
            s.response = "unreachable"
        def handle_close(s):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{s.id}}\\n")
    """)
    d = daemon(script)
    c = d.connect()
    assert c.read_all() == b"", "closed at once, nothing sent"
    d.expect_log("no greeting today")
    other = d.connect()
    assert d.stop() == 0
    other.close()
    assert log.read_text().split() == ["1", "2"]


def test_a_wrong_response_type_or_any_base_exception_ends_one_session_not_the_daemon(
        daemon, write_script):
    # All three used to escape the loop: a TypeError from the output queue,
    # SystemExit (argparse exits on bad input) and KeyboardInterrupt, stopping
    # every session.
    # So did the other BaseExceptions: asyncio.CancelledError, GeneratorExit
    # and a library's own, which killed the daemon with a traceback.
    script = write_script("""
        import asyncio
        import sys

        class Stop(BaseException):
            pass

        def handle_request(s):
            if s.request == "number":
                s.response = 42
            elif s.request == "exit":
                sys.exit(3)
            elif s.request == "interrupt":
                raise KeyboardInterrupt     # SIGINT drains: this is the handler's own
            elif s.request == "cancelled":
                raise asyncio.CancelledError()
            elif s.request == "generator-exit":
                raise GeneratorExit()
            elif s.request == "base":
                raise Stop("a library's own")
            else:
                s.response = "ok " + s.request
    """)
    d = daemon(script)
    bystander = d.connect()
    assert bystander.ask("before") == "ok before"
    for line, logged in [("number", "TypeError: s.response must be a str, not int: 42"),
                         ("exit", "SystemExit: 3"), ("interrupt", "KeyboardInterrupt"),
                         ("cancelled", "CancelledError"), ("generator-exit", "GeneratorExit"),
                         ("base", "Stop: a library's own")]:
        c = d.connect()
        c.send_lines("first", line, "never handled")
        assert c.read_all() == b"ok first\n"
        d.expect_log(f"on request '{line}':")
        d.expect_log(logged)
    assert bystander.ask("after") == "ok after"
    assert d.stop() == 0


def test_closed_standard_descriptors_are_reopened_on_dev_null(tmp_path):
    # Started with stdout and stderr closed (an init script's ">&-"), the
    # pidfile took descriptor 1: what a child process printed went into it.
    script = tmp_path / "spawner.py"
    script.write_text("import subprocess\n"
                      "def handle_request(s):\n"
                      "    subprocess.run(['echo', 'printed by a child'])\n"
                      "    s.response = 'ok'\n")
    log, pidfile = tmp_path / "mpxd.log", tmp_path / "mpxd.pid"

    def close_standard_descriptors() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    proc = subprocess.Popen(
        [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
         "--log-file", str(log), "--pidfile", str(pidfile), str(script)],
        cwd=ROOT, preexec_fn=close_standard_descriptors)
    try:
        assert wait_until(lambda: log.exists() and "listening on" in log.read_text())
        port = int(log.read_text().split("listening on 127.0.0.1:")[1].split()[0])
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == "/dev/null"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"x\n")
            assert sock.recv(100) == b"ok\n"
        assert pidfile.read_text() == f"{proc.pid}\n"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# ------------------------------------------------------------ listening

def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_same_host_twice_listens_once(daemon):
    # It used to fail with "address already in use (is another mpxd ...?)":
    # the second bind met the first socket of the same daemon.
    d = daemon(COUNTER, "--host", "127.0.0.1", "--host", "localhost")
    c = d.connect()
    assert c.ask("5") == "5"
    c.close()
    assert d.stop() == 0
    assert b"listening on 127.0.0.1" not in d.child.before


def test_an_address_a_wildcard_covers_is_skipped_with_a_warning(daemon):
    # --host 0.0.0.0 --host 127.0.0.1 failed with "address already in use
    # (is another mpxd ...?)", against its own wildcard socket.
    d = daemon(COUNTER, "--host", "0.0.0.0", "--host", "127.0.0.1", "--host", "localhost",
               listening=rb"listening on 0\.0\.0\.0:(\d+)")
    assert b"--host 127.0.0.1 skipped: --host 0.0.0.0 already listens on every IPv4 " \
           b"address, this one included" in d.child.before
    c = d.connect()
    assert c.ask("5") == "5"
    c.close()
    assert d.stop() == 0
    assert b"listening on 127.0.0.1" not in d.child.before


def fake_names(monkeypatch, names: dict[str, list[str]]) -> None:
    """Make ``socket.getaddrinfo`` resolve each name to these addresses, in order."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        return [info for address in names[host]
                for info in real(address, port, *args, **kwargs)]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def foreign_addresses(count: int) -> list[str]:
    """Documentation addresses (RFC 5737) this machine cannot bind."""
    found = []
    for address in ["198.51.100.7", "203.0.113.9", "192.0.2.77", "198.51.100.8"]:
        with socket.socket() as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                found.append(address)
    if len(found) < count:
        pytest.skip("this machine can bind the documentation addresses")
    return found[:count]


def test_a_name_is_listened_on_at_every_address_it_resolves_to(monkeypatch, caplog):
    # Debian's localhost is ::1 and 127.0.0.1, ::1 first: --host localhost
    # listened on ::1 only, and clients of 127.0.0.1 were refused.
    from mpxd.listeners import bind_listeners
    addresses = ["::1", "127.0.0.1"] if _has_ipv6_loopback() else ["127.0.0.1"]
    [foreign] = foreign_addresses(1)
    fake_names(monkeypatch, {"twohomed": addresses + [foreign]})
    with caplog.at_level("WARNING", logger="mpxd"):
        sockets = bind_listeners(("twohomed",), 0, 16)
    try:
        assert [s.getsockname()[0] for s in sockets] == addresses
        assert len({s.getsockname()[1] for s in sockets}) == 1, "one port for all"
        # The foreign address is not this machine's: skipped, and said.
        assert f"cannot listen on twohomed ({foreign}:" in caplog.text
        assert "serving the other addresses of twohomed" in caplog.text
    finally:
        for sock in sockets:
            sock.close()


def test_the_default_ipv6_loopback_may_fail_to_resolve(monkeypatch):
    # A machine without IPv6 must still start with the default hosts; an
    # explicit --host ::1 there fails, naming it.
    from mpxd.listeners import DEFAULT_HOSTS, ListenError, bind_listeners
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "::1":
            raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname "
                                                         "not supported")
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sockets = bind_listeners(DEFAULT_HOSTS, 0, 16)
    try:
        assert [s.getsockname()[0] for s in sockets] == ["127.0.0.1"]
    finally:
        for sock in sockets:
            sock.close()
    with pytest.raises(ListenError, match="cannot listen on ::1:0: Address family"):
        bind_listeners(("::1",), 0, 16)


def test_a_name_none_of_whose_addresses_can_be_bound_fails(monkeypatch):
    from mpxd.listeners import ListenError, bind_listeners
    fake_names(monkeypatch, {"faraway": foreign_addresses(2)})
    with pytest.raises(ListenError, match="cannot listen on faraway:0: none of its "
                                          "addresses can be bound here"):
        bind_listeners(("faraway",), 0, 16)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "[::1]"])     # the form URLs use, too
def test_ipv6_listening_line_and_service(daemon, host):
    d = daemon(COUNTER, "--host", host)
    match = d.expect_log(rb"listening on \[::1\]:(\d+)")
    assert int(match.group(1)) == d.port, "both addresses share the picked port"
    with socket.create_connection(("::1", d.port), timeout=5) as sock:
        sock.sendall(b"4\n4\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == b"4\n8\n"
    d.expect_log(rb"session \d+ \[::1\]:\d+ closed: eof")


def test_accepted_connections_inherit_the_listeners_keepalive():
    # Without it, the session of a client whose machine vanished without a
    # FIN (a laptop closed, a NAT entry dropped) stayed open for ever.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        prepare_listener(listener, keepalive=90)
        with socket.create_connection(listener.getsockname()), _accept(listener) as conn:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 90
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 30
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
    with socket.create_server(("127.0.0.1", 0)) as listener:
        prepare_listener(listener, keepalive=0)
        with socket.create_connection(listener.getsockname()), _accept(listener) as conn:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_a_client_that_connects_while_the_script_imports_gets_keepalive_too(
        daemon, tmp_path):
    # The listener got its options only when the loop was made, after the
    # import: a connection the kernel accepted meanwhile went without.
    marker = tmp_path / "importing"
    script = tmp_path / "slow.py"
    script.write_text("import pathlib, time\n"
                      f"pathlib.Path({str(marker)!r}).touch()\n"
                      "time.sleep(1)\n"
                      "def handle_request(s):\n"
                      "    s.response = s.request\n")
    port = _free_port()
    started = threading.Thread(target=lambda: daemon(str(script), "--port", str(port)))
    started.start()
    assert wait_until(marker.exists, timeout=10)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as early:
        started.join()
        early.sendall(b"hi\n")
        assert early.makefile().readline() == "hi\n"
        assert _keepalive_timer(port)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, where no outgoing
    connection can take it between this probe and the daemon's bind."""
    for port in random.sample(range(20000, 30000), 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 20000 and 30000")


def test_a_socket_from_systemd_keeps_its_units_keepalive_settings():
    # KeepAlive=yes and KeepAliveTimeSec=77 in a .socket unit are the operator's.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
        prepare_listener(listener, keepalive=300)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77


def _accept(listener: socket.socket) -> socket.socket:
    listener.settimeout(5)
    return listener.accept()[0]


def _keepalive_timer(port: int) -> bool:
    """Whether the daemon's end of an established connection on ``port`` has a
    keepalive timer pending (/proc/net/tcp's "tr" column is 2)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    ours = [row for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01"]
    assert ours, f"no established connection on port {port}"
    return all(row[5].startswith("02:") for row in ours)


@pytest.mark.parametrize("option, expected", [((), True), (("--keepalive", "0"), False)])
def test_the_daemon_turns_keepalive_on_by_default(daemon, option, expected):
    d = daemon(COUNTER, *option)
    client = d.connect()
    assert client.ask("1") == "1"
    assert _keepalive_timer(d.port) is expected
    assert d.stop() == 0


def test_session_log_line_names_peer_reason_and_counts(daemon):
    d = daemon(COUNTER)
    c = d.connect()
    port = c.sock.getsockname()[1]
    c.send("1\n2\n")
    c.shutdown_write()
    assert c.read_all() == b"1\n3\n"
    d.expect_log(rf"session \d+ 127\.0\.0\.1:{port} closed: eof, [\d.]+s, "
                 rf"2 requests, 4 bytes in, 4 bytes out".encode())


def test_no_session_log_drops_only_the_per_session_line(daemon):
    d = daemon(COUNTER, "--no-session-log")
    c = d.connect()
    c.send("1\n2\n")
    c.shutdown_write()
    assert c.read_all() == b"1\n3\n"     # the session has closed: its line is due
    assert d.stop() == 0
    rest = d.child.before                 # everything after "listening on"
    assert b"shutting down" in rest, "other INFO lines are still written"
    assert b" closed: " not in rest


def test_term_stops_the_daemon_with_status_0_and_closes_sessions(daemon, recorder):
    d = daemon(recorder.script)
    c = d.connect()
    sid = greeted(c)
    assert d.stop() == 0
    assert c.read_all() == b""
    assert recorder.count("close")[sid] == 1
