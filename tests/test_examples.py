"""The example handlers handlers/kv.py, handlers/ticker.py and handlers/lookup.py,
each run by the real daemon and driven over TCP as a user would with nc."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from conftest import HANDLERS, MPXD, ROOT, wait_until

KV = os.path.join(HANDLERS, "kv.py")
TICKER = os.path.join(HANDLERS, "ticker.py")
LOOKUP = os.path.join(HANDLERS, "lookup.py")


# ------------------------------------------------------------------ kv

def test_kv_set_get_del(daemon):
    c = daemon(KV).connect()
    assert c.ask("GET greeting") == "(nil)"
    assert c.ask("SET greeting hello  big world") == "OK"
    assert c.ask("get greeting") == "hello  big world"     # case-insensitive command
    assert c.ask("DEL greeting") == "1"
    assert c.ask("DEL greeting") == "0"
    assert c.ask("GET greeting") == "(nil)"


def test_kv_keys_are_shared_by_every_connection(daemon):
    d = daemon(KV)
    one, two = d.connect(), d.connect()
    assert one.ask("SET k 42") == "OK"
    assert two.ask("GET k") == "42"


def test_kv_errors_are_one_clear_line(daemon):
    c = daemon(KV).connect()
    assert c.ask("FROB x") == "ERROR unknown command 'FROB'"
    assert c.ask("GET") == "ERROR wrong number of arguments for 'GET'"
    assert c.ask("GET a b") == "ERROR wrong number of arguments for 'GET'"
    assert c.ask("SET lonely") == "ERROR wrong number of arguments for 'SET'"
    assert c.ask("SET k v") == "OK"
    assert c.ask("EXPIRE k soon") == "ERROR seconds must be a number"
    assert c.ask("EXPIRE missing 5") == "0"
    c.send_lines("", "GET k")                   # empty lines are ignored
    assert c.readline() == "v"


def test_kv_expire_removes_the_key_when_its_timer_fires(daemon):
    c = daemon(KV).connect()
    assert c.ask("SET k v") == "OK"
    assert c.ask("TTL k") == "-1"
    assert c.ask("EXPIRE k 0.3") == "1"
    assert 0.0 <= float(c.ask("TTL k")) <= 0.3
    assert wait_until(lambda: c.ask("GET k") == "(nil)")
    assert c.ask("TTL k") == "-2"


def test_kv_set_and_del_cancel_an_expiry(daemon):
    c = daemon(KV).connect()
    c.send_lines("SET kept v", "EXPIRE kept 0.2", "SET kept new",
                 "SET gone v", "EXPIRE gone 0.2", "DEL gone", "SET gone again")
    assert c.readlines(7) == ["OK", "1", "OK", "OK", "1", "1", "OK"]
    time.sleep(0.5)                             # past both deadlines
    assert c.ask("GET kept") == "new"
    assert c.ask("GET gone") == "again"
    assert c.ask("TTL kept") == "-1"


def test_kv_expire_zero_deletes_at_once_and_a_new_expire_replaces_the_old(daemon):
    c = daemon(KV).connect()
    c.send_lines("SET a 1", "EXPIRE a 0", "GET a", "SET b 2", "EXPIRE b 0.2", "EXPIRE b 60")
    assert c.readlines(6) == ["OK", "1", "(nil)", "OK", "1", "1"]
    time.sleep(0.4)
    assert c.ask("GET b") == "2"


def test_kv_keeps_its_data_and_expiries_over_a_reload(daemon):
    d = daemon(KV)
    c = d.connect()
    c.send_lines("SET stays 1", "SET fades 2", "EXPIRE fades 0.5")
    assert c.readlines(3) == ["OK", "OK", "1"]
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    assert c.ask("GET stays") == "1"
    assert wait_until(lambda: c.ask("GET fades") == "(nil)")


# -------------------------------------------------------------- ticker

def _ticks(client, n):
    lines = client.readlines(n)
    assert all(line.startswith("tick ") for line in lines), lines
    return [int(line.split()[1]) for line in lines]


def test_ticker_pushes_the_same_ticks_to_every_subscriber(daemon):
    d = daemon(TICKER, env={"TICKER_INTERVAL": "0.1"})
    one, two = d.connect(), d.connect()
    assert one.ask("SUBSCRIBE") == "OK subscribed"
    assert two.ask("subscribe") == "OK subscribed"
    first = _ticks(one, 4)
    assert first == list(range(first[0], first[0] + 4))
    second = _ticks(two, 4)
    assert second == list(range(second[0], second[0] + 4))
    assert set(first) & set(second)             # the same numbers at the same time


def test_ticker_sends_nothing_before_subscribe_or_after_unsubscribe(daemon):
    d = daemon(TICKER, env={"TICKER_INTERVAL": "0.05"})
    c = d.connect()
    time.sleep(0.2)                             # four ticks happen, none for us
    assert c.ask("PING") == "PONG"
    assert c.ask("SUBSCRIBE") == "OK subscribed"
    _ticks(c, 2)
    c.send_lines("UNSUBSCRIBE")
    while (line := c.readline()) != "OK unsubscribed":
        assert line.startswith("tick ")         # sent before the unsubscribe
    time.sleep(0.3)
    assert c.ask("PING") == "PONG"              # no tick in between
    assert c.ask("FOO") == "ERROR unknown command 'FOO'"


def test_ticker_goes_on_without_a_gap_or_a_double_over_a_reload(daemon):
    d = daemon(TICKER, env={"TICKER_INTERVAL": "0.05"})
    c = d.connect()
    assert c.ask("SUBSCRIBE") == "OK subscribed"
    before = _ticks(c, 2)
    d.signal(signal.SIGHUP)
    d.expect_log(r"reloaded")
    after = _ticks(c, 12)
    ticks = before + after
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))


def test_ticker_subscriber_that_leaves_is_forgotten(daemon):
    d = daemon(TICKER, env={"TICKER_INTERVAL": "0.05"})
    leaver, stayer = d.connect(), d.connect()
    assert leaver.ask("SUBSCRIBE") == "OK subscribed"
    assert stayer.ask("SUBSCRIBE") == "OK subscribed"
    leaver.reset()
    d.expect_log(r"closed: reset")
    _ticks(stayer, 5)
    assert d.stop() == 0
    assert b"Traceback" not in d.child.before


def test_ticker_interval_is_checked_at_import_so_check_says_so():
    # TICKER_INTERVAL=-1 passed "mpxd --check" and failed only at start-up.
    for value in ("-1", "0", "nan"):
        result = subprocess.run([*MPXD, "--check", TICKER], capture_output=True, text=True,
                                timeout=30, cwd=ROOT,
                                env=dict(os.environ, TICKER_INTERVAL=value))
        assert result.returncode == 1
        assert "TICKER_INTERVAL must be at least 0.001 seconds" in result.stderr


# -------------------------------------------------------------- lookup

def test_lookup_resolves_with_a_blocking_call_in_a_thread(daemon):
    c = daemon(LOOKUP).connect()
    answer = c.ask("RESOLVE localhost").split()
    assert answer[0] == "localhost"
    assert "127.0.0.1" in answer[1:] or "::1" in answer[1:]


def test_lookup_reports_a_failed_lookup_as_an_error_line(daemon):
    c = daemon(LOOKUP).connect()
    assert c.ask("RESOLVE a..b").startswith("ERROR a..b: ")
    assert c.ask("RESOLVE") == "ERROR usage: RESOLVE HOST [DELAY]"
    assert c.ask("RESOLVE localhost soon") == "ERROR delay must be a number of seconds"
    assert c.ask("FROB") == "ERROR unknown command 'FROB'"


def test_lookup_answers_in_request_order_though_later_ones_finish_first(daemon):
    c = daemon(LOOKUP).connect()
    c.send_lines("RESOLVE localhost 0.5", "RESOLVE a..b", "STATS")
    first, second, third = c.readlines(3)
    assert first.startswith("localhost ")
    assert second.startswith("ERROR a..b: ")
    # STATS was answered at once, then waited its turn behind the lookups.
    assert third == "lookups 2 answered 0 abandoned 0 in-flight 2"


def test_lookup_does_not_stall_other_clients(daemon):
    d = daemon(LOOKUP)
    slow, quick = d.connect(), d.connect()
    slow.send_lines("RESOLVE localhost 2")
    assert quick.ask("RESOLVE localhost").startswith("localhost ")
    ready, _, _ = select.select([slow.sock], [], [], 0)
    assert not ready
    assert slow.readline().startswith("localhost ")


def test_lookup_answers_a_client_that_half_closed(daemon):
    c = daemon(LOOKUP).connect()
    c.send_lines("RESOLVE localhost 0.2")       # printf ... | nc -N
    c.shutdown_write()
    assert c.read_all().decode().startswith("localhost ")


def test_lookup_drops_the_answer_for_a_client_that_left(daemon):
    d = daemon(LOOKUP)
    leaver = d.connect()
    leaver.send_lines("RESOLVE localhost 0.3")
    assert wait_until(lambda: "in-flight 1" in d.connect().ask("STATS"))
    leaver.reset()
    d.expect_log(r"closed: reset")
    watcher = d.connect()
    assert wait_until(lambda: watcher.ask("STATS") ==
                      "lookups 1 answered 0 abandoned 1 in-flight 0")
    assert watcher.ask("RESOLVE localhost").startswith("localhost ")


def test_lookup_limits_lookups_in_flight_per_connection(daemon):
    c = daemon(LOOKUP).connect()
    c.send_lines(*["RESOLVE localhost 0.2"] * 17)
    answers = c.readlines(17)
    assert all(a.startswith("localhost ") for a in answers[:16])
    assert answers[16] == "ERROR too many lookups in flight"
