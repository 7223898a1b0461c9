"""The example handlers in handlers/, tested with mpxd.testing's Harness (no sockets).

One section per handler; each starts with the example from the handler's
docstring, then the edges of its protocol.
"""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def handler(name: str) -> str:
    return os.path.join(ROOT, "handlers", name)


# -------------------------------------------------------------- counter.py


def test_counter_docstring_example(mpxd_harness):
    c = mpxd_harness(handler("counter.py")).connect()
    assert c.send(["1", "1", "5 global"]) == ["1", "2", "5"]
    assert c.close() == []
    assert c.closed and c.close_reason == "eof"


def test_counter_keeps_one_count_per_connection_and_one_global(mpxd_harness):
    h = mpxd_harness(handler("counter.py"))
    a, b = h.connect(), h.connect()
    assert a.send("3") == ["3"]
    assert b.send("4") == ["4"]
    assert a.send("2 global") == ["2"]
    assert b.send("2 global") == ["4"]
    assert a.send("1") == ["4"]


def test_counter_answers_zero_for_lines_without_a_number(mpxd_harness):
    c = mpxd_harness(handler("counter.py")).connect()
    c.send("7")
    assert c.send(["x", "", "seven", "1 2 3"]) == ["0", "0", "0", "8"]
    assert c.send(b"-2\r\n") == ["6"]
    assert c.send(["12abc", "+1 apples"]) == ["18", "19"]     # sscanf "%d" reads a prefix
    # Digits 0 to 9 only, as in C: "\d" counted "٣" as 3 and "５" as 5.
    assert c.send(["\u0663", "\uff15 global"]) == ["0", "0"]


def test_counter_reads_at_most_100_digits_so_huge_numbers_break_nothing(mpxd_harness):
    # "9" * 4300, twice, made the global counter 4301 digits long: more than
    # Python turns into a str, so every "N global" after it failed.
    h = mpxd_harness(handler("counter.py"))
    a, b = h.connect(), h.connect()
    huge, most = "9" * 4300, int("9" * 100)
    assert a.send([f"{huge} global", f"{huge} global"]) == [str(most), str(2 * most)]
    assert b.send("1 global") == [str(2 * most + 1)]
    assert b.send("9" * 5000) == [str(most)]
    assert not a.closed and not b.closed


def test_counter_frees_session_state_on_close(mpxd_harness):
    c = mpxd_harness(handler("counter.py")).connect()
    c.send("1")
    assert c.session.handle == {"count": 1}
    c.close()
    assert c.session.handle is None


# ----------------------------------------------------------------- echo.py


def test_echo_docstring_example(mpxd_harness):
    c = mpxd_harness(handler("echo.py")).connect()
    assert c.send(["hello", "world"]) == ["hello", "world"]


def test_echo_framing_rules(mpxd_harness):
    c = mpxd_harness(handler("echo.py")).connect()
    assert c.send(b"crlf\r\n\nbare\rcr\n") == ["crlf", "bare\rcr"]
    c.send(b"\xff\x00\xc3\xa9\n")
    assert c.output.endswith(b"\xff\x00\xc3\xa9\n")
    assert c.send(b"partial") == []
    assert c.close() == ["partial"]


def test_echo_with_crlf_eol(mpxd_harness):
    c = mpxd_harness(handler("echo.py"), eol="crlf").connect()
    assert c.send("x") == ["x"]
    assert c.output == b"x\r\n"


# ----------------------------------------------------------------- chat.py


@pytest.fixture
def chat(mpxd_harness):
    return mpxd_harness(handler("chat.py"))


def test_chat_welcomes_and_announces_joins(chat):
    alice = chat.connect()
    assert alice.new() == ["* welcome, you are guest1; 0 other(s) here; "
                           "/nick NAME to rename, /who, /quit"]
    bob = chat.connect()
    assert bob.new()[0].startswith("* welcome, you are guest2; 1 other(s) here")
    assert alice.new() == ["* guest2 joined"]


def test_chat_broadcasts_to_the_others_only(chat):
    alice, bob, carol = chat.connect(), chat.connect(), chat.connect()
    for c in (alice, bob, carol):
        c.new()
    assert alice.send("/nick alice") == ["* you are now alice"]
    assert bob.new() == carol.new() == ["* guest1 is now alice"]
    assert alice.send("hello") == []
    assert bob.new() == carol.new() == ["<alice> hello"]
    assert alice.new() == []


def test_chat_says_the_server_is_going_down_before_it_closes(chat):
    alice, bob = chat.connect(), chat.connect()
    alice.send("/nick alice")
    for c in (alice, bob):
        c.new()
    chat.close()
    assert alice.new() == bob.new() == ["* the server is going down"]
    assert alice.closed and bob.closed


def test_chat_nick_rules_and_who(chat):
    alice, bob = chat.connect(), chat.connect()
    alice.send("/nick alice")
    bob.new()
    assert bob.send("/nick alice") == ["* alice is taken"]
    usage = "* usage: /nick NAME (one word, at most 24 characters)"
    assert bob.send("/nick") == [usage]
    assert bob.send("/nick two words") == [usage]
    assert bob.send("/nick a\tb") == [usage]             # a tab made /who ambiguous
    assert bob.send("/nick " + "x" * 25) == [usage]
    assert bob.send("/who") == ["* here: alice guest2"]
    # "/nickbob" renamed to "bob", "/NICK x" and "/who " were broadcast.
    assert bob.send("/nicknames") == ["* commands: /nick NAME, /who, /quit"]
    assert bob.send("/NICK bob") == ["* you are now bob"]
    assert bob.send("/nick bob") == ["* you are bob already"]
    assert bob.send("/WHO ") == ["* here: alice bob"]
    assert alice.new()[-1] == "* guest2 is now bob"
    assert bob.send("") == []


def test_chat_shows_control_characters_instead_of_passing_them_on(chat):
    # "hi\r* guest1 left" showed as "* guest1 left" on the others' terminals.
    alice, bob = chat.connect(), chat.connect()
    bob.new()
    alice.send(b"hi\r* guest1 left\x1b[2J\n")
    assert bob.new() == ["<guest1> hi?* guest1 left?[2J"]


def test_chat_guest_names_never_collide_with_a_chosen_nick(chat):
    alice = chat.connect()
    assert alice.send("/nick guest2") == ["* you are now guest2"]
    bob = chat.connect()            # session 2: its default name is taken
    assert bob.new()[0].startswith("* welcome, you are guest2_;")
    assert bob.send("/who") == ["* here: guest2 guest2_"]


def test_chat_quit_and_disconnects_are_announced(chat):
    alice, bob, carol = chat.connect(), chat.connect(), chat.connect()
    for c in (alice, bob, carol):
        c.new()
    assert bob.send("/quit") == ["* bye"]
    assert bob.closed and bob.close_reason == "close_session"
    assert alice.new() == carol.new() == ["* guest2 left"]
    carol.reset()
    assert alice.new() == ["* guest3 left"]
    assert alice.send("/who") == ["* here: guest1"]


def test_chat_shutdown_closes_everyone(chat):
    alice, bob = chat.connect(), chat.connect()
    chat.close()
    assert alice.closed and bob.closed
    assert {alice.close_reason, bob.close_reason} == {"shutdown"}


# ------------------------------------------------------------------- kv.py


@pytest.fixture
def kv(mpxd_harness):
    return mpxd_harness(handler("kv.py"))


def test_kv_docstring_example(kv):
    c = kv.connect()
    assert c.send("SET greeting hello world") == ["OK"]
    assert c.send("GET greeting") == ["hello world"]
    assert c.send("EXPIRE greeting 5") == ["1"]
    [ttl] = c.send("TTL greeting")
    assert 0 <= float(ttl) <= 5          # kv measures TTL with the real clock
    kv.advance(5)
    assert c.send("GET greeting") == ["(nil)"]
    assert c.send("DEL greeting") == ["0"]
    assert c.send("FROB x") == ["ERROR unknown command 'FROB'"]


def test_kv_store_is_shared_by_connections(kv):
    a, b = kv.connect(), kv.connect()
    a.send("set k v")
    assert b.send("get k") == ["v"]
    assert b.send("del k") == ["1"]
    assert a.send("ttl k") == ["-2"]


def test_kv_expiry_fires_at_its_time_and_set_cancels_it(kv):
    c = kv.connect()
    c.send(["SET a 1", "SET b 2", "EXPIRE a 1.5", "EXPIRE b 3"])
    kv.advance(1.4)
    assert c.send(["GET a", "GET b"]) == ["1", "2"]
    kv.advance(0.1)
    assert c.send(["GET a", "GET b"]) == ["(nil)", "2"]
    assert c.send("SET b 3") == ["OK"]            # cancels b's expiry
    assert c.send("TTL b") == ["-1"]
    kv.advance(10)
    assert c.send("GET b") == ["3"]


def test_kv_expire_zero_deletes_and_bad_input_is_refused(kv):
    c = kv.connect()
    c.send("SET a 1")
    assert c.send("EXPIRE a 0") == ["1"]
    assert c.send("GET a") == ["(nil)"]
    assert c.send("EXPIRE a 5") == ["0"]
    assert c.send("EXPIRE a soon") == ["ERROR seconds must be a number"]
    assert c.send("EXPIRE a inf") == ["ERROR seconds must be a number"]
    assert c.send("EXPIRE a nan") == ["ERROR seconds must be a number"]
    c.send("SET a 1")
    # 1e308 was taken, and TTL then printed a number of 309 digits.
    assert c.send("EXPIRE a 1e308") == ["ERROR seconds must be at most 315360000 (10 years)"]
    assert c.send("EXPIRE a 315360000") == ["1"]
    assert c.send("GET") == ["ERROR wrong number of arguments for 'GET'"]
    assert c.send("") == []


def test_kv_reload_keeps_the_data_and_the_expiries(kv):
    c = kv.connect()
    c.send(["SET a 1", "SET b 2", "EXPIRE b 2"])
    kv.reload()
    assert c.send("GET a") == ["1"]
    kv.advance(2)
    assert c.send("GET b") == ["(nil)"]
    assert kv.errors == []


# --------------------------------------------------------------- ticker.py


@pytest.fixture
def ticker(mpxd_harness, monkeypatch):
    monkeypatch.delenv("TICKER_INTERVAL", raising=False)
    return mpxd_harness(handler("ticker.py"))


def test_ticker_docstring_example(ticker):
    c = ticker.connect()
    assert c.send("PING") == ["PONG"]
    assert c.send("SUBSCRIBE") == ["OK subscribed"]
    ticker.advance(2)
    assert c.new() == ["tick 1", "tick 2"]
    assert c.send("UNSUBSCRIBE") == ["OK unsubscribed"]
    ticker.advance(5)
    assert c.new() == []
    assert c.send("frob") == ["ERROR unknown command 'frob'"]


def test_ticker_counts_from_server_start_for_everyone(ticker):
    a = ticker.connect()
    ticker.advance(3)                    # nobody listens; ticks still count
    a.send("subscribe")
    b = ticker.connect()
    b.send("SUBSCRIBE")
    ticker.advance(1)
    assert a.new() == b.new() == ["tick 4"]
    b.close()
    ticker.advance(1)
    assert a.new() == ["tick 5"]
    assert list(ticker.module.subscribers) == [a.session.id]


def test_ticker_reload_keeps_subscribers_and_one_timer(ticker):
    c = ticker.connect()
    c.send("SUBSCRIBE")
    ticker.advance(1)
    ticker.reload()
    ticker.advance(2)
    assert c.new() == ["tick 1", "tick 2", "tick 3"]


def test_ticker_interval_from_the_environment(mpxd_harness, monkeypatch):
    monkeypatch.setenv("TICKER_INTERVAL", "0.25")
    h = mpxd_harness(handler("ticker.py"))
    c = h.connect()
    c.send("SUBSCRIBE")
    h.advance(1)
    assert c.new() == ["tick 1", "tick 2", "tick 3", "tick 4"]


# --------------------------------------------------------------- lookup.py


@pytest.fixture
def lookup(mpxd_harness):
    return mpxd_harness(handler("lookup.py"))


def test_lookup_resolves_localhost_in_a_worker_thread(lookup):
    c = lookup.connect()
    assert c.send("RESOLVE localhost") == []          # the loop does not wait
    lookup.run_threads()
    [answer] = c.new()
    host, *addresses = answer.split()
    assert host == "localhost" and set(addresses) & {"127.0.0.1", "::1"}
    assert c.send("STATS") == ["lookups 1 answered 1 abandoned 0 in-flight 0"]


def test_lookup_answers_in_request_order_when_a_later_one_finishes_first(
        lookup, monkeypatch):
    import threading
    fast_done = threading.Event()

    def fake_resolve(host, delay):
        if host == "slow.example":
            assert fast_done.wait(5)
        else:
            fast_done.set()
        return ["192.0.2.1"]

    monkeypatch.setattr(lookup.module, "_resolve", fake_resolve)
    c = lookup.connect()
    c.send(["RESOLVE slow.example", "RESOLVE fast.example", "STATS"])
    lookup.run_threads()
    assert c.new() == ["slow.example 192.0.2.1", "fast.example 192.0.2.1",
                       "lookups 2 answered 0 abandoned 0 in-flight 2"]


def test_lookup_bounds_what_a_client_queues_behind_a_slow_lookup(lookup, monkeypatch):
    # Answers waiting behind a pending lookup are the script's, not mpxd's
    # output, so no output limit applied: one client grew mpxd by 300 MiB,
    # and counting the lookups in flight walked the whole queue per request.
    import threading
    release = threading.Event()

    def fake_resolve(host, delay):
        assert release.wait(5)
        return ["192.0.2.1"]

    monkeypatch.setattr(lookup.module, "_resolve", fake_resolve)
    c = lookup.connect()
    assert c.send(["RESOLVE slow.example"] + ["STATS"] * 300) == []
    release.set()
    lookup.run_threads()
    answers = c.new()
    assert answers[0] == "slow.example 192.0.2.1"
    assert answers[1:256] == ["lookups 1 answered 0 abandoned 0 in-flight 1"] * 255
    assert answers[256:] == ["ERROR too many requests waiting"]
    assert c.closed                     # once the answers before it were out


def test_lookup_counts_lookups_in_flight_as_they_finish(lookup, monkeypatch):
    monkeypatch.setattr(lookup.module, "_resolve", lambda host, delay: ["192.0.2.1"])
    c = lookup.connect()
    for _ in range(3):                  # 48 lookups, never more than 16 at once
        assert c.send(["RESOLVE x"] * 16) == []
        lookup.run_threads()
        assert c.new() == ["x 192.0.2.1"] * 16
    assert c.send("STATS") == ["lookups 48 answered 48 abandoned 0 in-flight 0"]


def test_lookup_reports_failures_and_usage(lookup, monkeypatch):
    import socket

    def fake_resolve(host, delay):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(lookup.module, "_resolve", fake_resolve)
    c = lookup.connect()
    c.send("RESOLVE no.such.name.")
    lookup.run_threads()
    assert c.new() == ["ERROR no.such.name.: Name or service not known"]
    assert c.send("RESOLVE") == ["ERROR usage: RESOLVE HOST [DELAY]"]
    assert c.send("RESOLVE x soon") == ["ERROR delay must be a number of seconds"]
    for delay in ("-1", "nan", "inf", "1e9"):     # each would hold a thread that long
        assert c.send(f"RESOLVE x {delay}") == ["ERROR delay must be between 0 and 10 seconds"]
    assert c.send("WHOIS x") == ["ERROR unknown command 'WHOIS'"]


def test_lookup_limits_lookups_in_flight_and_counts_abandoned_ones(lookup, monkeypatch):
    monkeypatch.setattr(lookup.module, "_resolve", lambda host, delay: ["192.0.2.7"])
    c = lookup.connect()
    c.send([f"RESOLVE h{i}" for i in range(17)])
    assert c.new() == []                   # the 17th waits behind the 16 lookups
    c.reset()
    lookup.run_threads()
    other = lookup.connect()
    assert other.send("STATS") == ["lookups 16 answered 0 abandoned 16 in-flight 0"]


# ------------------------------------------------------- shared_counter.py


class FakeRedis:
    """Stands in for redis-py: INCRBY on a dict, or failing like a lost server."""

    class exceptions:
        class ConnectionError(Exception):
            pass

        class TimeoutError(Exception):
            pass

    counters: dict = {}
    down = False

    class Redis:
        @classmethod
        def from_url(cls, url, **options):
            return cls()

        def incrby(self, key, amount):
            if FakeRedis.down:
                raise FakeRedis.exceptions.ConnectionError("connection refused")
            FakeRedis.counters[key] = FakeRedis.counters.get(key, 0) + amount
            return FakeRedis.counters[key]

        def close(self):
            pass


@pytest.fixture
def shared_counter(mpxd_harness, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "redis", FakeRedis)
    monkeypatch.setattr(FakeRedis, "counters", {})
    monkeypatch.setattr(FakeRedis, "down", False)
    return mpxd_harness(handler("shared_counter.py"))


def test_shared_counter_counts_globally_through_redis(shared_counter):
    a, b = shared_counter.connect(), shared_counter.connect()
    assert a.send("5 global") == []
    shared_counter.run_threads()
    assert a.new() == ["5"]
    b.send(["2 global", "1"])
    shared_counter.run_threads()
    assert b.new() == ["7", "1"]                    # in request order
    assert FakeRedis.counters == {"mpxd:global_counter": 7}


def test_shared_counter_survives_a_redis_outage(shared_counter):
    c = shared_counter.connect()
    FakeRedis.down = True
    c.send("1 global")
    shared_counter.run_threads()
    assert c.new() == ["ERROR redis unavailable: connection refused"]
    assert not c.closed
    FakeRedis.down = False
    c.send("1 global")
    shared_counter.run_threads()
    assert c.new() == ["1"]


def test_shared_counter_logs_an_outage_once_and_the_recovery(shared_counter, caplog):
    c = shared_counter.connect()
    FakeRedis.down = True
    with caplog.at_level("INFO", logger="mpxd.shared_counter"):
        c.send(["1 global", "2 global"])
        shared_counter.run_threads()
        assert c.new() == ["ERROR redis unavailable: connection refused"] * 2
        FakeRedis.down = False
        c.send("3 global")
        shared_counter.run_threads()
        assert c.new() == ["3"]
    url = shared_counter.module.URL
    assert [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "mpxd.shared_counter"] == [
        ("WARNING", f"redis at {url} unavailable: connection refused"),
        ("INFO", f"redis at {url} reachable again")]


def test_lookup_answers_pending_lookups_before_closing_at_eof(lookup, monkeypatch):
    monkeypatch.setattr(lookup.module, "_resolve", lambda host, delay: ["192.0.2.9"])
    c = lookup.connect()
    c.send("RESOLVE a")
    assert c.close() == [] and not c.closed       # EOF waits for the lookup
    lookup.run_threads()
    assert c.new() == ["a 192.0.2.9"]
    assert c.closed and c.close_reason == "eof"
