"""mpxd.framing.LineFramer: bytes in, request lines out (SPEC section 3).

Every fixed input is fed in every chunk size from 1 byte up and compared with
a plain reference model of the rules; hypothesis then checks the same for
arbitrary byte streams cut at arbitrary places, and that the length limit
holds for every input.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpxd.framing import DEFAULT_MAX_LINE, LineFramer


def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def reference(stream: bytes, max_line: int = DEFAULT_MAX_LINE):
    """The rules written the slow, obvious way.

    Returns ``(lines, overflow, final)``: the complete lines before the first
    overlong one, whether some line (terminated or not) is longer than
    ``max_line`` bytes, and what ``finish()`` yields for the unterminated rest.
    """
    *complete, rest = stream.split(b"\n")
    lines = []
    for raw in complete:
        if len(raw) > max_line:
            return lines, True, []
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        lines.append(decode(raw))
    if len(rest) > max_line:
        return lines, True, []
    return lines, False, [decode(rest)] if rest else []


def feed_chunks(framer: LineFramer, chunks) -> list[str]:
    lines: list[str] = []
    for chunk in chunks:
        lines.extend(framer.feed(chunk))
        assert len(framer.tail) <= framer.max_line
    return lines


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def frame(data: bytes, size: int, max_line: int = DEFAULT_MAX_LINE):
    framer = LineFramer(max_line)
    lines = feed_chunks(framer, chunked(data, size))
    overflow = framer.overflow
    return lines, overflow, framer.finish()


EXAMPLES = {
    "plain": (b"1\n1\n5 global\n", ["1", "1", "5 global"], []),
    "crlf": (b"a\r\nb\r\n", ["a", "b"], []),
    "mixed lf and crlf": (b"a\nb\r\nc\n", ["a", "b", "c"], []),
    "only one cr removed": (b"a\r\r\n", ["a\r"], []),
    "bare cr is data": (b"a\rb\n\r\n", ["a\rb", ""], []),
    "cr not before lf at the end stays": (b"a\nb\r", ["a"], ["b\r"]),
    "empty lines are requests": (b"\n\n\r\nx\n\n", ["", "", "", "x", ""], []),
    "final line without lf": (b"one\ntwo", ["one"], ["two"]),
    "only an unterminated line": (b"lonely", [], ["lonely"]),
    "nothing": (b"", [], []),
    "nul bytes are data": (b"a\0b\n\0\n", ["a\0b", "\0"], []),
    "utf-8 multibyte": ("zw\u00f6lf \u20ac \U0001f600\n".encode(),
                        ["zw\u00f6lf \u20ac \U0001f600"], []),
    "invalid utf-8": (b"\xff\xfe\n\xc3\n\xe2\x82\n",
                      ["\udcff\udcfe", "\udcc3", "\udce2\udc82"], []),
    "invalid utf-8 in the unterminated tail": (b"ok\n\xf0\x9f\x98", ["ok"],
                                               ["\udcf0\udc9f\udc98"]),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_chunk_size_gives_the_same_lines(name):
    data, lines, final = EXAMPLES[name]
    assert reference(data) == (lines, False, final)
    for size in range(1, len(data) + 2):
        assert frame(data, size) == (lines, False, final), f"chunk size {size}"


def test_one_feed_returns_lines_as_soon_as_they_are_complete():
    framer = LineFramer()
    assert framer.feed(b"ab") == []
    assert framer.feed(b"c\r") == []
    assert framer.feed(b"\nd\n") == ["abc", "d"]
    assert framer.feed(b"e") == []
    assert framer.finish() == ["e"]
    assert framer.finish() == []


def test_a_cr_lf_pair_split_across_chunks_is_one_terminator():
    framer = LineFramer()
    assert framer.feed(b"x\r") == []
    assert framer.feed(b"\n") == ["x"]


def test_invalid_utf8_round_trips_byte_for_byte():
    every_byte = bytes(b for b in range(256) if b != 0x0A)
    data = every_byte + b"\n" + b"\xed\xa0\x80\xc0\xaf\n"   # surrogate, overlong
    for size in (1, 2, 3, 7, len(data)):
        lines, overflow, final = frame(data, size)
        assert not overflow and final == []
        assert [line.encode("utf-8", "surrogateescape") for line in lines] == [
            every_byte, b"\xed\xa0\x80\xc0\xaf"]


# ------------------------------------------------------------------ limits

def test_a_line_of_exactly_max_line_bytes_is_accepted():
    for size in range(1, 12):
        assert frame(b"x" * 10 + b"\n" + b"y" * 10, size, max_line=10) == (
            ["x" * 10], False, ["y" * 10])


def test_the_cr_counts_towards_the_limit():
    assert frame(b"x" * 10 + b"\r\n", 3, max_line=10) == ([], True, [])
    assert frame(b"x" * 9 + b"\r\n", 3, max_line=10) == (["x" * 9], False, [])


@pytest.mark.parametrize("size", [1, 2, 5, 10, 11, 12, 100])
def test_an_overlong_line_sets_overflow_after_the_lines_before_it(size):
    data = b"a\nbb\n" + b"z" * 11 + b"\nafter\n"
    framer = LineFramer(max_line=10)
    assert feed_chunks(framer, chunked(data, size)) == ["a", "bb"]
    assert framer.overflow
    assert framer.feed(b"more\n") == []
    assert framer.finish() == []


def test_an_overlong_unterminated_line_overflows_before_any_lf_arrives():
    framer = LineFramer(max_line=10)
    assert framer.feed(b"ok\n" + b"z" * 10) == ["ok"]
    assert not framer.overflow
    assert framer.feed(b"z") == []
    assert framer.overflow
    assert framer.tail == b""


def test_ten_megabytes_without_lf_keep_the_buffer_bounded():
    framer = LineFramer()
    chunk = b"x" * 65536
    for _ in range(160):
        assert framer.feed(chunk) == []
        assert len(framer.tail) <= DEFAULT_MAX_LINE
    assert framer.overflow


def test_a_line_arriving_byte_by_byte_grows_in_place_not_by_copies():
    # bytes + bytes per chunk copied the whole partial line again each time:
    # a 1 MiB line sent a byte at a time (--max-line 2M) cost minutes of CPU.
    framer = LineFramer(max_line=1 << 21)
    framer.feed(b"first\nx")
    framer.feed(b"y")
    growing = framer.tail
    for _ in range(1000):
        assert framer.feed(b"z") == []
    assert framer.tail is growing and len(growing) == 1002
    assert framer.feed(b"\r\nnext") == ["xy" + "z" * 1000]
    assert framer.tail == b"next"


def test_many_short_lines_in_one_big_chunk_pass_the_limit_check():
    data = b"".join(b"%d\n" % i for i in range(100_000))   # far above max_line
    lines = LineFramer(max_line=16).feed(data)
    assert lines == [str(i) for i in range(100_000)]


# -------------------------------------------------------------- properties

# Bytes rich in the characters framing cares about, plus arbitrary ones.
interesting_bytes = st.lists(
    st.one_of(st.sampled_from([b"\n", b"\r", b"\r\n", b"\0", b"\xff", b"\xc3",
                               b"\xa9", b"\xe2\x82\xac", b"\xf0\x9f", b"a", b"b"]),
              st.binary(min_size=0, max_size=8)),
    max_size=60).map(b"".join)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(data=interesting_bytes, cuts=st.lists(st.integers(0, 600), max_size=30))
def test_any_chunking_yields_the_same_lines_as_one_feed(data, cuts):
    whole = LineFramer()
    expected = whole.feed(data) if data else []
    expected_final = whole.finish()
    pieces = LineFramer()
    got = feed_chunks(pieces, cut(data, cuts))
    assert got == expected
    assert pieces.finish() == expected_final
    assert (expected, False, expected_final) == reference(data)


@settings(max_examples=300, deadline=None)
@given(data=interesting_bytes)
def test_decoding_then_splitting_equals_splitting_then_decoding(data):
    assert decode(data).split("\n") == [decode(part) for part in data.split(b"\n")]
    for line in decode(data).split("\n"):
        assert line.encode("utf-8", "surrogateescape") in data.split(b"\n")


@settings(max_examples=500, deadline=None)
@given(data=interesting_bytes, cuts=st.lists(st.integers(0, 600), max_size=30),
       max_line=st.integers(1, 24))
def test_the_limit_holds_for_every_input(data, cuts, max_line):
    framer = LineFramer(max_line)
    lines = feed_chunks(framer, cut(data, cuts))   # asserts tail <= max_line
    overflow = framer.overflow
    final = framer.finish()
    expected_lines, expected_overflow, expected_final = reference(data, max_line)
    assert overflow == expected_overflow
    assert overflow == any(len(raw) > max_line for raw in data.split(b"\n"))
    assert lines == expected_lines
    assert final == expected_final
    assert all(len(line.encode("utf-8", "surrogateescape")) <= max_line
               for line in lines + final)
