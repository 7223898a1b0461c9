"""mpxd.logs: per-pass batching of log lines and the fast path for session lines."""

from __future__ import annotations

import io
import logging
import re
import select
import threading

import pytest

from mpxd import logs
from mpxd.logs import flush_batched, log_fast, setup_logging, start_batching, stop_batching

log = logging.getLogger("mpxd")
PLAIN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mpxd\[\d+\] (\w+) (.*)$")


@pytest.fixture
def stream():
    out = io.StringIO()
    setup_logging("info", stream=out)
    yield out
    stop_batching()
    setup_logging("info", stream=io.StringIO())


def test_without_batching_every_line_is_written_at_once(stream):
    log.info("one")
    log_fast(log, logging.INFO, "two %d", 2)
    assert [PLAIN.match(line).groups() for line in stream.getvalue().splitlines()] == \
        [("INFO", "one"), ("INFO", "two 2")]


def test_batched_lines_wait_for_the_end_of_the_pass(stream):
    start_batching()
    log.info("first")
    log_fast(log, logging.INFO, "session %d closed", 7)
    assert stream.getvalue() == ""
    flush_batched()
    assert [PLAIN.match(line).group(2) for line in stream.getvalue().splitlines()] == \
        ["first", "session 7 closed"]


def test_a_warning_is_written_at_once_after_the_lines_before_it(stream):
    start_batching()
    log.info("before")
    log.warning("trouble")
    assert [PLAIN.match(line).groups() for line in stream.getvalue().splitlines()] == \
        [("INFO", "before"), ("WARNING", "trouble")]


def test_lines_of_other_threads_are_not_held_back(stream):
    start_batching()
    worker = threading.Thread(target=log.info, args=("from a thread",))
    worker.start()
    worker.join()
    assert "from a thread" in stream.getvalue()


def test_stop_batching_writes_what_is_left(stream):
    start_batching()
    log.info("last words")
    stop_batching()
    assert "last words" in stream.getvalue()
    log.info("after")
    assert "after" in stream.getvalue()


def test_fast_lines_look_like_ordinary_ones(stream):
    log.info("session %d %s closed: %s", 1, "127.0.0.1:5", "eof")
    log_fast(log, logging.INFO, "session %d %s closed: %s", 1, "127.0.0.1:5", "eof")
    slow, fast = stream.getvalue().splitlines()
    assert PLAIN.match(slow).groups() == PLAIN.match(fast).groups()
    assert slow.split(" mpxd[")[1] == fast.split(" mpxd[")[1]


def test_fast_lines_under_journald_carry_the_priority(monkeypatch, tmp_path):
    path = tmp_path / "journal"
    with open(path, "w") as out:
        st = __import__("os").fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info", stream=out)
        log_fast(log, logging.INFO, "session %d closed", 3)
        log.warning("careful")
    setup_logging("info", stream=io.StringIO())
    assert path.read_text().splitlines() == ["<6>session 3 closed", "<4>careful"]


def test_fast_path_is_skipped_for_foreign_handlers():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    setup_logging("info", stream=io.StringIO())
    keep = Keep()
    log.addHandler(keep)
    try:
        log_fast(log, logging.INFO, "session %d closed", 9)
    finally:
        log.removeHandler(keep)
    assert records == ["session 9 closed"]


def test_reopening_a_log_file_writes_the_batch_into_the_old_file(tmp_path):
    path = tmp_path / "mpxd.log"
    reopenable = setup_logging("info", log_file=str(path))
    try:
        start_batching()
        log.info("before the rotation")
        path.rename(tmp_path / "mpxd.log.1")
        logs.reopen_log_files(reopenable)
        flush_batched()
    finally:
        stop_batching()
        setup_logging("info", stream=io.StringIO())
    assert "before the rotation" in (tmp_path / "mpxd.log.1").read_text()
    assert "before the rotation" not in path.read_text()
    assert "reopened" in path.read_text()


class Writes(io.StringIO):
    """A stream that remembers each write: what reaches the pipe in one piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_big_batch_goes_out_in_writes_a_pipe_keeps_whole():
    # Under --workers every process writes to one stderr; a pipe may cut a
    # write over PIPE_BUF where another process's gets in, mid-line.
    out = Writes()
    setup_logging("info", stream=out)
    try:
        start_batching()
        for n in range(200):
            log_fast(log, logging.INFO, "session %d 127.0.0.1:40000 closed: eof, %s", n,
                     "é" * (n % 7) + "x" * 40)
        log_fast(log, logging.INFO, "a long one %s", "y" * 9000)
        flush_batched()
    finally:
        stop_batching()
        setup_logging("info", stream=io.StringIO())
    assert len(out.writes) > 4
    for text in out.writes:
        assert text.endswith("\n")
        if "a long one" not in text:
            assert len(text.encode()) <= select.PIPE_BUF
    messages = [PLAIN.match(line).group(2) for line in out.getvalue().splitlines()]
    assert [m.split()[1] for m in messages[:-1]] == [str(n) for n in range(200)]
    assert messages[-1] == "a long one " + "y" * 9000
