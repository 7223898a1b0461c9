"""handlers/shared_counter.py against a real redis-server on a loopback port.

Skipped, with the reason, when the redis-server program (Debian package
redis-server; ``make test`` installs it when run as root) or the redis-py
module (the ``test`` extra) is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import HANDLERS, wait_until

redis = pytest.importorskip("redis", reason="redis-py is not installed "
                                            "(pip install -e '.[test]')")

SCRIPT = os.path.join(HANDLERS, "shared_counter.py")
REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (apt-get install redis-server; "
           "`make test` installs it when run as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on 127.0.0.1: no disk, stopped by pid."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                return client.ping()
            except redis.exceptions.RedisError:
                return False
        try:
            if not wait_until(answers, timeout=10):
                raise RuntimeError("redis-server did not answer PING within 10s")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def redis_server():
    server = RedisServer()
    try:
        server.start()
    except RuntimeError:                        # the free port was taken meanwhile
        server.stop()
        server = RedisServer()
        server.start()
    yield server
    server.stop()


def test_two_instances_share_the_global_counter(daemon, redis_server):
    env = {"MPXD_REDIS_URL": redis_server.url}
    first, second = daemon(SCRIPT, env=env), daemon(SCRIPT, env=env)
    a, b = first.connect(), second.connect()
    assert a.ask("5 global") == "5"
    assert b.ask("2 global") == "7"
    assert a.ask("0 global") == "7"
    assert a.ask("1") == "1"                    # per-session counters stay local
    assert b.ask("3") == "3"
    assert b.ask("x") == "0"


def test_workers_of_one_instance_share_it_too(daemon, redis_server):
    d = daemon(SCRIPT, "--workers", "2", env={"MPXD_REDIS_URL": redis_server.url})
    values = []
    for _ in range(20):
        c = d.connect()
        values.append(int(c.ask("1 global")))
        c.close()
    assert values == list(range(1, 21))


def test_answers_keep_request_order_across_local_and_redis_requests(daemon, redis_server):
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": redis_server.url})
    c = d.connect()
    c.send_lines("1 global", "10", "1 global", "5", "1 global")
    assert c.readlines(5) == ["1", "10", "2", "15", "3"]
    c.send_lines("4 global")                    # as printf ... | nc -N sends it
    c.shutdown_write()
    assert c.read_all() == b"7\n"


def test_numbers_are_read_as_the_plain_counter_reads_them(daemon, redis_server):
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": redis_server.url})
    c = d.connect()
    c.send_lines("12abc", "x", "+3", "2x global", "9" * 200 + " global")
    assert c.readlines(4) == ["12", "0", "15", "2"]
    assert c.readline().startswith("ERROR redis: ")   # beyond Redis's 64-bit integers
    c.send_lines("1 global")
    assert c.readlines(1) == ["3"]


def test_an_unreachable_redis_gives_an_error_line_not_a_crash(daemon, redis_server):
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": redis_server.url})
    c = d.connect()
    assert c.ask("3 global") == "3"
    port = redis_server.port
    redis_server.stop()
    answer = c.ask("1 global")
    assert answer.startswith("ERROR redis unavailable: "), answer
    assert f"127.0.0.1:{port}" in answer
    d.expect_log(r"WARNING redis at redis://127\.0\.0\.1:\d+/0 unavailable")
    assert c.ask("2") == "2"                    # the session and the rest still work
    assert c.ask("1 global").startswith("ERROR redis unavailable: ")
    restarted = redis_server.__class__(port)    # same port; it keeps no data
    restarted.start()
    try:
        assert c.ask("4 global") == "4"
        d.expect_log(r"redis at .* reachable again")
    finally:
        restarted.stop()


def test_a_redis_too_slow_to_answer_may_have_counted_and_the_answer_says_so(
        daemon, redis_server):
    # "ERROR redis unavailable" for an INCRBY that Redis applied: a client
    # retrying on that error counted twice.
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": redis_server.url})
    c = d.connect()
    assert c.ask("100 global") == "100"
    os.kill(redis_server.process.pid, signal.SIGSTOP)   # slow, not gone
    try:
        assert c.ask("1 global") == "ERROR redis timed out, the increment may have been applied"
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert c.ask("1 global") == "102"                   # the first one did count


def test_a_client_cannot_queue_without_end_behind_a_slow_redis(daemon, redis_server):
    # The answers waiting for Redis are the script's, not mpxd's output: no
    # output limit applied, and 6 s of a paused Redis grew mpxd by 120 MB.
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": redis_server.url})
    c = d.connect()
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        c.send_lines("7 global", *["1"] * 1200)
        time.sleep(0.5)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    answers = c.readlines(1001)
    assert answers[0] == "7"
    assert answers[1:1000] == [str(n) for n in range(1, 1000)]
    assert answers[1000] == "ERROR too many requests waiting"
    assert c.read_all() == b""                          # then disconnected


def test_no_redis_at_start_up_is_no_crash_either(daemon):
    d = daemon(SCRIPT, env={"MPXD_REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"})
    c = d.connect()
    started = time.monotonic()
    assert c.ask("1 global").startswith("ERROR redis unavailable: ")
    assert time.monotonic() - started < 5       # refused at once, no long timeout
    assert c.ask("1") == "1"
    assert d.stop() == 0
