"""mpxd.access: --allow/--deny, --max-per-ip and --max-rate, alone and in the daemon."""

from __future__ import annotations

import logging
import os
from typing import Any
import socket
import time

import pytest

from conftest import cpu_seconds, wait_until
from mpxd.access import AccessRules, AddressLimit, RateLimit, parse_network, refusal_log
from mpxd.framing import LineFramer

HANDLER = '''
opens = 0

def handle_open(s):
    global opens
    opens += 1
    s.response = "hello"

def handle_request(s):
    s.response = str(opens) if s.request == "opens" else s.request
'''


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


# ------------------------------------------------------------------ rules

@pytest.mark.parametrize("allow, deny, verdicts", [
    ((), (), {"10.1.2.3": True, "::1": True}),
    (("10.0.0.0/8",), ("10.1.0.0/16",),
     {"10.2.3.4": True, "10.1.2.3": False, "11.0.0.1": False, "::1": False}),
    (("10.1.2.3",), ("10.0.0.0/8",),
     {"10.1.2.3": True, "10.1.2.4": False, "8.8.8.8": False}),
    ((), ("10.0.0.0/8", "2001:db8::/32"),
     {"10.9.9.9": False, "8.8.8.8": True, "2001:db8::5": False, "2001:db9::5": True}),
    (("127.0.0.1",), ("127.0.0.1",), {"127.0.0.1": False}),          # deny wins a tie
    (("::1",), (), {"::1": True, "127.0.0.1": False}),
    ((), ("127.0.0.0/8",), {"::ffff:127.0.0.1": False, "fe80::1%eth0": True}),
])
def test_most_specific_rule_decides_whatever_the_order(allow, deny, verdicts):
    for rules in (AccessRules(allow, deny), AccessRules(reversed(allow), reversed(deny))):
        assert {host: rules.allows(host) for host in verdicts} == verdicts


def test_rules_describe_the_order_they_are_tried_in():
    rules = AccessRules(["10.0.0.0/8", "10.1.2.3"], ["10.1.0.0/16"])
    assert rules.describe() == ["allow 10.1.2.3/32", "deny 10.1.0.0/16",
                                "allow 10.0.0.0/8", "deny everything else"]


@pytest.mark.parametrize("allow, deny, listening, expected", [
    # The rules said nothing: --allow 10.0.0.0/8 tried out on the default
    # --host, where every client comes from 127.0.0.1 or ::1, refused all.
    (("10.0.0.0/8",), (), ["127.0.0.1", "::1"],
     ["listening on S127.0.0.1, where only clients on this machine connect, but "
      "--allow/--deny refuse 127.0.0.1: none of them can connect",
      "listening on S::1, where only clients on this machine connect, but "
      "--allow/--deny refuse ::1: none of them can connect"]),
    (("0.0.0.0/0",), ("0.0.0.0/0",), ["0.0.0.0"],
     ["--allow 0.0.0.0/0 has no effect: --deny 0.0.0.0/0, the same network, wins the tie",
      "--allow/--deny refuse every IPv4 client: nobody can connect to S0.0.0.0"]),
    (("10.0.0.0/8",), (), ["0.0.0.0", "::"],
     ["--allow/--deny refuse every IPv6 client: nobody can connect to S::"]),
    ((), ("::/0",), ["::"],
     ["--allow/--deny refuse every IPv6 client: nobody can connect to S::"]),
    # Rules that mean what they say: nothing to report.
    (("10.0.0.0/8",), ("10.1.0.0/16",), ["0.0.0.0"], []),
    ((), ("10.0.0.0/8",), ["127.0.0.1", "::1", "0.0.0.0", "::"], []),
    (("127.0.0.1", "::1"), (), ["127.0.0.1", "::1"], []),
    (("10.1.2.3",), ("0.0.0.0/0",), ["0.0.0.0"], []),
    # A [::] socket that IPv4 clients reach too (systemd's default): they
    # are matched as IPv4, so refusing every IPv6 client is not everybody.
    (("127.0.0.1",), (), ["::dual"], []),
    (("10.0.0.0/8",), ("::/0",), ["::dual"], []),
    ((), ("::/0", "0.0.0.0/0"), ["::dual"],
     ["--allow/--deny refuse every IPv6 client: nobody can connect to S::dual"]),
    (("10.0.0.0/8",), ("10.0.0.0/9", "10.128.0.0/9"), ["0.0.0.0"], []),  # see _refuses_all
    # Local clients of 127.0.0.2 come from 127.0.0.1: allowing 127.0.0.2 alone
    # refused them all, without a word.
    (("127.0.0.2",), (), ["127.0.0.2"],
     ["listening on S127.0.0.2, but clients on this machine connect from 127.0.0.1 "
      "(unless they bind 127.0.0.2 themselves), which --allow/--deny refuse"]),
    (("127.0.0.0/8",), (), ["127.0.0.2"], []),
])
def test_rules_that_cannot_mean_what_they_say_are_named(allow, deny, listening, expected):
    rules = AccessRules(allow, deny)
    assert rules.mistakes([(host.removesuffix("dual"), "S" + host, host.endswith("dual"))
                           for host in listening]) == expected


def test_rules_that_cannot_be_meant_are_named():
    # Accepted silently: a host address with a prefix was widened to its
    # whole network, and an IPv4-mapped rule could never match.
    rules = AccessRules(["192.168.1.5/16", "::ffff:127.0.0.1", "10.0.0.0/8"],
                        ["::ffff:10.1.0.0/112"])
    assert rules.mistakes([]) == [
        "--allow 192.168.1.5/16 is taken as 192.168.0.0/16: the address has host bits "
        "set (write 192.168.0.0/16 for the network, or 192.168.1.5 alone for the one host)",
        "--allow ::ffff:7f00:1/128 never matches: a client that an IPv6 socket shows as "
        "IPv4-mapped is matched as IPv4 (write 127.0.0.1/32)",
        "--deny ::ffff:a01:0/112 never matches: a client that an IPv6 socket shows as "
        "IPv4-mapped is matched as IPv4 (write 10.1.0.0/16)"]


def test_bad_networks_are_rejected():
    for text in ("10.0.0.0/33", "localhost", "1.2.3"):
        with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
            parse_network(text)
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"     # host bits ignored


class Conn:
    def __init__(self) -> None:
        self._finished = False


def test_address_limit_counts_open_connections_only():
    limit = AddressLimit(2)
    a, b = Conn(), Conn()
    for conn in (a, b):
        assert limit.room("10.0.0.1")
        limit.add("10.0.0.1", conn)
    assert not limit.room("10.0.0.1")
    assert limit.room("10.0.0.2")
    a._finished = True
    assert limit.room("10.0.0.1")


# ------------------------------------------------------------ fake core

class FakeTimer(list):
    cancel: Any


class FakeCore:
    """What RateLimit and refusal_log use of the core, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.dirty: list = []
        self.timers: list = []
        self.handled: list[str] = []

    def call_later(self, delay, fn, *args):
        timer = FakeTimer([self.now + delay, fn, args])
        timer.cancel = lambda: self.timers.remove(timer) if timer in self.timers else None
        self.timers.append(timer)
        return timer

    def run_until(self, when: float) -> None:
        while True:
            due = [t for t in self.timers if t[0] <= when]
            if not due:
                break
            timer = min(due, key=lambda t: t[0])
            self.timers.remove(timer)
            self.now = timer[0]
            timer[1](*timer[2])
        self.now = when

    def data_received(self, s, data: bytes) -> None:
        self.handled += s._framer.feed(data)


class FakeSession:
    def __init__(self) -> None:
        self._framer = LineFramer(1000)
        self._throttled = self._paused = self._finished = self._closing = False


def test_rate_limit_holds_surplus_lines_and_hands_them_out_in_order():
    core = FakeCore()
    rate = RateLimit(core, 10)                  # 10 lines/s, a burst of 10
    s = FakeSession()
    rate.apply(s)
    lines = [f"line {i}" for i in range(25)]
    core.data_received(s, "".join(f"{line}\n" for line in lines).encode())
    assert core.handled == lines[:10]
    assert s._paused and s._throttled and core.dirty == [s]   # no longer polled
    core.run_until(0.55)
    assert core.handled == lines[:15]           # 10 per second after the burst
    core.run_until(1.5)
    assert core.handled == lines
    assert not s._throttled and core.dirty[-1] is s            # reading may resume
    assert rate.throttled == 1


def test_rate_limited_session_closing_drops_held_lines():
    core = FakeCore()
    s = FakeSession()
    RateLimit(core, 1).apply(s)
    core.data_received(s, b"a\nb\nc\n")
    assert core.handled == ["a"]
    s._closing = True                             # close_session: unhandled lines go
    core.run_until(10)
    assert core.handled == ["a"]


def test_refusals_are_logged_once_per_burst_with_counts(caplog):
    core = FakeCore()
    refusals = refusal_log(core)
    with caplog.at_level(logging.INFO, logger="mpxd"):
        refusals.event("10.0.0.1", "10.0.0.1", "denied by --allow/--deny")
        for _ in range(5):
            refusals.event("10.0.0.1", "10.0.0.1", "over --max-per-ip 2")
        refusals.event("10.0.0.2", "10.0.0.2", "denied by --allow/--deny")
        core.run_until(1.0)
        core.run_until(5.0)                       # quiet: the burst ends, no more lines
        refusals.event("10.0.0.3", "10.0.0.3", "denied by --allow/--deny")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused a connection from 10.0.0.1: denied by --allow/--deny (more refusals "
        "are summarised every 1s)",
        "refused 6 more connections in the last 1s: 5 over --max-per-ip 2, 1 denied by "
        "--allow/--deny; from 10.0.0.1 (5), 10.0.0.2 (1)",
        "refused a connection from 10.0.0.3: denied by --allow/--deny (more refusals "
        "are summarised every 1s)",
    ]
    assert sum(refusals.total.values()) == 8


def test_refusals_not_yet_summarised_are_logged_at_exit(caplog):
    # The last second's refusals waited for a summary timer that never ran.
    core = FakeCore()
    refusals = refusal_log(core)
    with caplog.at_level(logging.INFO, logger="mpxd"):
        for _ in range(25):
            refusals.event("127.0.0.1", "127.0.0.1", "denied by --allow/--deny")
        refusals.close()
    assert caplog.records[-1].getMessage() == (
        "refused 24 more connections before the daemon stopped: 24 denied by "
        "--allow/--deny; from 127.0.0.1 (24)")
    assert core.timers == []


# ------------------------------------------------------------ the daemon

@pytest.fixture
def handler(tmp_path):
    path = tmp_path / "access_handler.py"
    path.write_text(HANDLER)
    return str(path)


def start(mpxd, handler, *options: str):  # noqa: F811
    d = mpxd(["--port", "0", "--host", "127.0.0.1",
              *(["--host", "::1"] if ipv6_loopback() else []), *options, handler])
    d.wait_listening()
    return d


def greeted(host: str, port: int) -> bool:
    """Connect; True if the handler greeted us, False if closed unanswered."""
    with socket.create_connection((host, port), timeout=5) as sock:
        return sock.recv(100) == b"hello\n"


def opens(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        f = sock.makefile("rwb")
        assert f.readline() == b"hello\n"
        f.write(b"opens\n")
        f.flush()
        return int(f.readline())


@needs_ipv6
def test_deny_closes_before_any_handler_runs(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--deny", "::1")
    assert not greeted("::1", d.port)
    assert not greeted("::1", d.port)
    assert greeted("127.0.0.1", d.port)
    assert opens(d.port) == 2                     # the two from ::1 never reached it
    d.wait_for(r"refused a connection from ::1: denied by --allow/--deny")
    assert d.stop() == 0


@needs_ipv6
def test_allow_refuses_everything_else(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--allow", "::1/128")
    assert greeted("::1", d.port)
    assert not greeted("127.0.0.1", d.port)
    assert d.stop() == 0


def test_more_specific_deny_inside_an_allowed_network(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--deny", "127.0.0.1", "--allow", "127.0.0.0/8", "--allow", "::1")
    assert not greeted("127.0.0.1", d.port)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as denied:
        assert denied.makefile("rb").read() == b""        # told nothing
    if ipv6_loopback():
        assert greeted("::1", d.port)
    assert d.stop() == 0


def test_rules_that_refuse_every_client_are_warned_about_at_start(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--allow", "10.0.0.0/8")
    d.wait_for(r"WARNING listening on 127\.0\.0\.1:\d+, where only clients on this machine "
               r"connect, but --allow/--deny refuse 127\.0\.0\.1: none of them can connect")
    assert not greeted("127.0.0.1", d.port)       # and so it is
    assert d.stop() == 0


def test_max_per_ip_counts_each_address_and_frees_on_close(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--max-per-ip", "2")
    first = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    second = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    assert first.recv(100) == b"hello\n" and second.recv(100) == b"hello\n"
    for _ in range(10):                           # a burst of refusals
        assert not greeted("127.0.0.1", d.port)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as refused:
        assert refused.makefile("rb").read() == \
            b"ERROR too many connections from your address\n"     # told why
    if ipv6_loopback():
        assert greeted("::1", d.port)             # another address has its own count
    first.close()
    assert wait_until(lambda: greeted("127.0.0.1", d.port))
    d.wait_for(r"refused a connection from 127\.0\.0\.1: over --max-per-ip 2")
    d.wait_for(r"refused \d+ more connections in the last 1s: \d+ over --max-per-ip 2; "
               r"from 127\.0\.0\.1 \(\d+\)")
    second.close()
    assert d.stop() == 0


def test_max_rate_reads_slowly_and_drops_nothing(mpxd, handler):  # noqa: F811
    d = start(mpxd, handler, "--max-rate", "20")
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        f = sock.makefile("rwb")
        assert f.readline() == b"hello\n"
        began = time.monotonic()
        f.write(b"".join(b"%d\n" % i for i in range(40)))
        f.flush()
        sock.shutdown(socket.SHUT_WR)             # EOF waits behind the held lines
        answers = [f.readline() for _ in range(40)]
        elapsed = time.monotonic() - began
        assert answers == [b"%d\n" % i for i in range(40)]
        assert f.readline() == b""                # then closed, after the last answer
    # 20 in the first second's burst, 20 more at 20 per second: at least ~1s.
    # A lower bound only: a slow machine can only make this take longer.
    assert elapsed >= 0.8
    d.wait_for(r"closed: eof, [\d.]+s, 40 requests")
    assert d.stop() == 0


def test_a_held_back_session_whose_client_left_costs_no_cpu(mpxd, tmp_path):  # noqa: F811
    # Poll reports a hangup whatever the mask: a session held back by
    # --max-rate whose unix client had closed (or whose TCP client reset)
    # made every poll return at once, 100% CPU until its lines were handed out.
    script = tmp_path / "quiet.py"
    script.write_text("handled = 0\n"
                      "def handle_request(s):\n"
                      "    global handled\n"
                      "    handled += 1\n"
                      "    s.response = str(handled) if s.request == 'count' else ''\n")
    path = str(tmp_path / "q.sock")
    d = mpxd(["--unix", path, "--max-rate", "20", str(script)])
    assert wait_until(lambda: os.path.exists(path), timeout=10)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"fire and forget\n" * 60)     # 3 s of lines at 20 a second
    before = cpu_seconds(d.pid)
    time.sleep(1.5)
    assert cpu_seconds(d.pid) - before < 0.5       # spinning took all 1.5 s
    d.wait_for(r"closed: \w+, [\d.]+s, 60 requests", timeout=10)   # none dropped
    assert d.stop() == 0
