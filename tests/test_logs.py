"""mpxd.logs: log set-up, journald lines, reopening; and what the daemon logs.

Unit tests configure the ``mpxd`` logger into a file or a StringIO; the
command tests check ``--log-file``, ``--log-level``, the one INFO line per
session (peer, id, reason, duration, requests, bytes) and journald output.
"""

from __future__ import annotations

import errno
import io
import logging
import logging.handlers
import os
import re
import signal
import socket

import pytest

from conftest import HANDLERS, LineClient, wait_until
from mpxd import logs
from mpxd.logs import (JournalFormatter, setup_logging, start_batching, stderr_is_journal,
                       stop_batching)

COUNTER = os.path.join(HANDLERS, "counter.py")

# One line per session close: "session ID PEER closed: REASON, DURATIONs,
# N requests, N bytes in, N bytes out".
CLOSE_LINE = (r"session {id} 127\.0\.0\.1:(\d+) closed: {reason}, (\d+\.\d{{3}})s, "
              r"{requests} requests, {bytes_in} bytes in, {bytes_out} bytes out")

SCRIPT = """\
from mpxd import close_session

def handle_request(s):
    if s.request == "quit":
        s.response = "bye"
        close_session(s)
    elif s.request == "boom":
        raise ValueError("on purpose")
    else:
        s.response = s.request.upper()
"""


@pytest.fixture(autouse=True)
def restore_mpxd_logger():
    """Unit tests reconfigure the 'mpxd' logger; put it back afterwards."""
    logger = logging.getLogger("mpxd")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def journal_env(monkeypatch, stream) -> None:
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


# ------------------------------------------------------------------ unit

def test_journal_formatter_prefixes_every_line_with_the_priority():
    formatter = JournalFormatter("%(message)s")
    record = logging.LogRecord("mpxd", logging.ERROR, "x", 1, "first\nsecond", (), None)
    assert formatter.format(record) == "<3>first\n<3>second"
    for level, prefix in [(logging.DEBUG, "<7>"), (logging.INFO, "<6>"),
                          (logging.WARNING, "<4>"), (logging.CRITICAL, "<2>")]:
        record = logging.LogRecord("mpxd", level, "x", 1, "m", (), None)
        assert formatter.format(record) == prefix + "m"


def test_stderr_is_journal_compares_device_and_inode(tmp_path, monkeypatch):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not stderr_is_journal(a)
        journal_env(monkeypatch, a)
        assert stderr_is_journal(a)
        assert not stderr_is_journal(b)            # inherited, but not our stderr
        monkeypatch.setenv("JOURNAL_STREAM", "junk")
        assert not stderr_is_journal(a)
        assert not stderr_is_journal(io.StringIO())


def test_setup_logging_to_the_journal_has_no_timestamps(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as stream:
        journal_env(monkeypatch, stream)
        setup_logging("info", stream=stream)
        log = logging.getLogger("mpxd")
        log.info("hello")
        log.debug("not shown")
        log.warning("careful")
    assert (tmp_path / "stderr").read_text() == "<6>hello\n<4>careful\n"


def test_setup_logging_plain_lines_carry_time_pid_and_level(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    setup_logging("debug", stream=stream)
    logging.getLogger("mpxd").debug("detail %d", 7)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
                        rf"mpxd\[{os.getpid()}\] DEBUG detail 7\n", stream.getvalue())


def test_syslog_handler_uses_facility_daemon_and_names_the_pid(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", syslog=True)
    [handler] = logging.getLogger("mpxd").handlers          # and no stderr handler
    assert isinstance(handler, logging.handlers.SysLogHandler)
    assert handler.facility == logging.handlers.SysLogHandler.LOG_DAEMON
    record = logging.LogRecord("mpxd", logging.INFO, "x", 1, "hello", (), None)
    assert handler.format(record) == f"mpxd[{os.getpid()}]: hello"


def test_log_file_handler_reopens_after_a_rename(tmp_path):
    path = tmp_path / "mpxd.log"
    handlers = setup_logging("info", log_file=str(path))
    log = logging.getLogger("mpxd")
    log.info("one")
    os.rename(path, tmp_path / "mpxd.log.1")
    log.info("two")
    handlers[0].reopen()
    log.info("three")
    assert [line.split()[-1] for line in (tmp_path / "mpxd.log.1").read_text().splitlines()] \
        == ["one", "two"]
    assert path.read_text().split()[-1] == "three"


class FullDisk:
    """A log stream whose writes fail with ENOSPC while ``full`` is set."""

    def __init__(self, stream) -> None:
        self.stream, self.full, self.encoding = stream, False, "utf-8"

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def test_a_log_file_that_cannot_be_written_is_said_on_stderr_and_marked_after(
        tmp_path, capsys):
    # A full disk used to lose log lines without a word anywhere.
    path = tmp_path / "mpxd.log"
    [handler] = setup_logging("info", log_file=str(path))
    disk = handler.stream = FullDisk(handler.stream)
    log = logging.getLogger("mpxd")
    log.warning("before")
    disk.full = True
    log.warning("lost one")
    log.warning("lost two")
    assert capsys.readouterr().err == (
        f"mpxd: cannot write log file {path}: No space left on device; log lines "
        f"are lost until it can be written again\n")          # once, not per line
    disk.full = False
    log.warning("after")
    log.warning("later")
    lines = [line.split(" WARNING ")[1] for line in path.read_text().splitlines()]
    assert lines == ["before", "after", "log lines before this one may be missing: "
                     "writing them failed (No space left on device)", "later"]
    assert capsys.readouterr().err == ""


def test_text_utf8_cannot_encode_is_escaped_not_lost(tmp_path):
    # A client's invalid bytes reach a log line surrogate-escaped, through
    # an exception message; a strict file lost that line and its batch.
    path = tmp_path / "mpxd.log"
    setup_logging("info", log_file=str(path))
    log = logging.getLogger("mpxd")
    start_batching()
    try:
        log.info("before")
        log.info("bad \udcff\ud800 bytes")
        log.info("after")
    finally:
        stop_batching()
    assert [line.split(" INFO ")[1] for line in path.read_text().splitlines()] == \
        ["before", "bad \\udcff\\ud800 bytes", "after"]


def test_a_strict_stderr_gets_escapes_too(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict", write_through=True)
    setup_logging("info", stream=stream)
    log = logging.getLogger("mpxd")
    start_batching()
    try:
        log.info("caf\u00e9 \udcff")
        log.info("after")
    finally:
        stop_batching()
    assert [line.split(" INFO ")[1] for line in raw.getvalue().decode().splitlines()] == \
        ["caf\\xe9 \\udcff", "after"]


def test_syslog_lines_are_encodable_whatever_they_hold(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("info", syslog=True)
    [handler] = logging.getLogger("mpxd").handlers
    record = logging.LogRecord("mpxd", logging.ERROR, "x", 1, "bad %s", ("\udcff",), None)
    line = handler.format(record)
    assert line.endswith("bad \\udcff")
    line.encode("utf-8")                # what SysLogHandler does, strictly


def test_an_unopenable_log_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        setup_logging("info", log_file=str(tmp_path / "no" / "dir" / "mpxd.log"))


# ------------------------------------------------------------ the command

def test_log_file_gets_the_lines_and_stderr_stays_quiet(mpxd, tmp_path):
    log_file = tmp_path / "mpxd.log"
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--log-file", str(log_file), COUNTER],
             log_file=log_file)
    port = m.wait_listening()
    client = LineClient(("127.0.0.1", port))
    assert client.ask("4") == "4"
    client.close()
    m.wait_for(CLOSE_LINE.format(id=1, reason="eof", requests=1, bytes_in=2, bytes_out=2))
    assert m.stop() == 0
    assert m.stderr() == ""
    assert log_file.read_text().splitlines()[-1].endswith("INFO stopped")


def test_an_unopenable_log_file_exits_1(mpxd, tmp_path):
    m = mpxd(["--port", "0", "--log-file", str(tmp_path / "no" / "mpxd.log"), COUNTER])
    assert m.wait() == 1
    assert f"Error: cannot open log file {tmp_path / 'no' / 'mpxd.log'}: " \
           "No such file or directory" in m.stderr()


def test_session_close_lines_name_peer_id_reason_duration_requests_bytes(
        mpxd, tmp_path):
    script = tmp_path / "handler.py"
    script.write_text(SCRIPT)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--idle-timeout", "0.3", str(script)])
    port = m.wait_listening()
    address = ("127.0.0.1", port)

    eof = LineClient(address)
    assert eof.ask("ab") == "AB"
    eof.send("cd")                               # no LF: handled at EOF
    eof.shutdown_write()
    assert eof.read_all() == b"CD\n"
    peer_port = eof.sock.getsockname()[1]
    match = m.wait_for(CLOSE_LINE.format(id=1, reason="eof", requests=2,
                                         bytes_in=5, bytes_out=6))
    assert int(match.group(1)) == peer_port

    quitter = LineClient(address)
    assert quitter.ask("quit") == "bye"
    m.wait_for(CLOSE_LINE.format(id=2, reason="close_session", requests=1,
                                 bytes_in=5, bytes_out=4))

    failing = LineClient(address)
    failing.send_lines("boom")
    assert failing.read_all() == b""
    m.wait_for(r"handle_request failed for session 3 .* on request 'boom'")
    m.wait_for(CLOSE_LINE.format(id=3, reason="error", requests=1, bytes_in=5,
                                 bytes_out=0))

    idle = LineClient(address)
    assert idle.read_all() == b""
    match = m.wait_for(CLOSE_LINE.format(id=4, reason="timeout", requests=0,
                                         bytes_in=0, bytes_out=0))
    assert float(match.group(2)) >= 0.3                 # the --idle-timeout

    resetter = LineClient(address)
    assert resetter.ask("x") == "X"
    resetter.reset()
    m.wait_for(CLOSE_LINE.format(id=5, reason="reset", requests=1,
                                 bytes_in=2, bytes_out=2))

    lingering = LineClient(address)
    assert lingering.ask("y") == "Y"
    m.signal(signal.SIGTERM)
    assert m.wait() == 0
    m.wait_for(CLOSE_LINE.format(id=6, reason="shutdown", requests=1, bytes_in=2,
                                 bytes_out=2))
    lingering.close()


def test_log_level_warning_drops_info_lines(mpxd, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--log-level", "warning", COUNTER],
             env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    status = notify.recv(4096).decode()             # READY=1, STATUS=listening on ...
    notify.close()
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", status).group(1))
    client = LineClient(("127.0.0.1", port))
    assert client.ask("1") == "1"
    client.close()
    assert m.stop() == 0
    assert m.stderr() == ""                          # no listening, session, stopped


def test_log_level_debug_shows_debug_lines(daemon):
    d = daemon(COUNTER, "--log-level", "debug")
    client = d.connect()
    assert client.ask("1") == "1"
    client.reset()
    d.expect_log(r"DEBUG session 1 127\.0\.0\.1:\d+: Connection reset by peer")
    assert d.stop() == 0


def test_under_journald_lines_have_priorities_and_no_timestamps(mpxd, tmp_path):
    script = tmp_path / "handler.py"
    script.write_text(SCRIPT)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", str(script)], journal=True)
    port = m.wait_listening()
    client = LineClient(("127.0.0.1", port))
    client.send_lines("boom")
    assert client.read_all() == b""
    m.wait_for(r"<6>session 1 .* closed: error")
    assert m.stop() == 0
    lines = m.stderr().splitlines()
    assert lines[0] == f"<6>listening on 127.0.0.1:{port}"
    assert lines[-1] == "<6>stopped"
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    traceback_lines = [line for line in lines if line.startswith("<3>")]
    assert traceback_lines[0].startswith("<3>handle_request failed for session 1")
    assert any("ValueError: on purpose" in line for line in traceback_lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_journal_stream_naming_another_file_is_ignored(mpxd, tmp_path):
    """JOURNAL_STREAM is inherited: it counts only if it names our stderr."""
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", COUNTER],
             env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    m.wait_listening()
    assert m.stop() == 0
    assert re.match(r"\d{4}-\d\d-\d\d .* INFO listening on", m.stderr())
    assert "<6>" not in m.stderr()


def test_syslog_option_starts_and_stops(mpxd, tmp_path):
    """--syslog logs nothing to stderr (it goes to /dev/log or UDP 514)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--syslog", COUNTER],
             env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notify.recv(4096).startswith(b"READY=1")
    notify.close()
    assert m.stop() == 0
    if os.path.exists("/dev/log"):
        assert m.stderr() == ""
    else:       # one warning, no log lines
        assert m.stderr().splitlines() == [
            "mpxd: no syslog socket at /dev/log; sending log lines over UDP to "
            "localhost:514, where nothing may be listening"]


def test_a_missing_syslog_socket_is_said_once_on_stderr(monkeypatch, tmp_path):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    live = tmp_path / "log"
    live.touch()                    # exists: used as it is, nothing said
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(live))
    setup_logging("info", syslog=True, stream=stream)
    assert stream.getvalue() == ""
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "missing"))
    setup_logging("info", syslog=True, stream=stream)
    assert f"no syslog socket at {tmp_path / 'missing'}; sending log lines over UDP " \
           "to localhost:514" in stream.getvalue()
    [handler] = logging.getLogger("mpxd").handlers
    assert handler.address == ("localhost", 514)
    setup_logging("info", stream=io.StringIO())


def test_syslog_lines_reach_a_syslog_daemon(mpxd):
    """Without /dev/log mpxd sends to UDP localhost:514: listen there as syslogd would."""
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log exists: lines go to the real syslog")
    syslogd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        syslogd.bind(("127.0.0.1", 514))
    except OSError as e:
        syslogd.close()
        pytest.skip(f"cannot listen on UDP 127.0.0.1:514: {e.strerror}")
    syslogd.settimeout(10)
    try:
        m = mpxd(["--port", "0", "--host", "127.0.0.1", "--syslog", COUNTER])
        first = syslogd.recv(4096).decode()
        # <30>: facility daemon (3) * 8 + priority info (6)
        port = int(re.fullmatch(rf"<30>mpxd\[{m.pid}\]: listening on 127\.0\.0\.1:(\d+)\0?",
                                first).group(1))
        client = LineClient(("127.0.0.1", port))
        assert client.ask("1") == "1"
        client.close()
        assert re.match(r"<30>mpxd\[\d+\]: session 1 127\.0\.0\.1:\d+ closed: eof",
                        syslogd.recv(4096).decode())
        m.signal(signal.SIGTERM)
        assert m.wait() == 0
        lines = []
        while not lines or lines[-1] != f"<30>mpxd[{m.pid}]: stopped\0":
            lines.append(syslogd.recv(4096).decode())
    finally:
        syslogd.close()
    assert m.stderr().startswith("mpxd: no syslog socket at /dev/log")   # and nothing else
    assert len(m.stderr().splitlines()) == 1


def test_prints_of_handler_code_come_out_at_once_and_never_fail(mpxd, tmp_path):
    # Python buffers a stdout that is not a terminal in 8 KiB blocks: under
    # systemd a handler's print() reached the journal hours late.  And in a
    # UTF-8 locale other than C, stdout's errors are "strict": printing a
    # surrogate-escaped request raised UnicodeEncodeError in the handler.
    script = tmp_path / "printer.py"
    script.write_text("def handle_request(s):\n"
                      "    print('got', s.request)\n"
                      "    s.response = 'ok'\n")
    m = mpxd(["--port", "0", "--host", "127.0.0.1", str(script)],
             env={"PYTHONUNBUFFERED": "",           # empty: as if not set
                  "PYTHONIOENCODING": "utf-8:strict"})
    port = m.wait_listening()
    client = LineClient(("127.0.0.1", port))
    assert client.ask("x") == "ok"
    client.send(b"a\xffb\n")
    assert client.readline() == "ok"
    client.close()
    m.wait_for(r"got x\ngot a\\udcffb\n", timeout=3)   # stdout, while it still runs
    assert m.proc.poll() is None
    assert "Traceback" not in m.log()
    assert m.stop() == 0


def test_counts_in_log_lines_agree_with_their_number():
    assert logs.counted(1, "session") == "1 session"
    assert logs.counted(0, "session") == "0 sessions"
    assert logs.counted(3, "process", "processes") == "3 processes"
    assert logs.counted(1, "process", "processes") == "1 process"


def test_a_syslog_that_does_not_answer_is_said_once_not_per_line(monkeypatch, tmp_path,
                                                                 capsys):
    # logging's SysLogHandler printed a 30-line traceback on stderr for every
    # log line while /dev/log refused them.
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    path = str(tmp_path / "devlog")
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(path)
    gone.close()                    # the file stays; nothing reads it: refused
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
    try:
        setup_logging("info", syslog=True)
        logger = logging.getLogger("mpxd")
        for n in range(5):
            logger.info("line %d", n)
        err = capsys.readouterr().err
        assert err.count("mpxd: cannot send log lines to syslog at") == 1
        assert "they are lost until it answers again" in err
        assert "Traceback" not in err
        again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        os.unlink(path)
        again.bind(path)            # syslog is back
        again.settimeout(5)
        logger.info("back")
        first = again.recv(4096)
        assert b"log lines before this one may be missing: sending them to syslog " \
               b"failed" in first
        assert b"back" in again.recv(4096)
        again.close()
    finally:
        setup_logging("info", stream=io.StringIO())


def test_exception_messages_are_escaped_for_the_log_but_frames_are_not():
    # Messages, notes and a SyntaxError's offending line may be a client's
    # text; the source lines of the frames are the script's own.
    def parse(text):
        try:
            eval(text)                  # a calculator handler's way to fail
        except SyntaxError as e:
            raise KeyError(f"cannot parse:\n{text}") from e

    try:
        parse("1 +\x1b[31m")
    except KeyError as e:
        e.add_note("line one\nline two\x07")
        text = logs.formatted_exception(e)
    assert "\x1b" not in text and "\x07" not in text
    assert "    1 +\\x1b[31m\n" in text                  # the SyntaxError's line
    assert "KeyError: 'cannot parse:\\n1 +\\x1b[31m'" in text  # repr'd by KeyError itself
    assert text.endswith("line one\n    line two\\x07")
    assert 'raise KeyError(f"cannot parse:\\n{text}") from e' in text   # source as it is

    try:
        raise ExceptionGroup("two\rfailures", [ValueError("a\nb"), OSError("c")])
    except ExceptionGroup as e:
        text = logs.formatted_exception(e)
    assert "two\\rfailures" in text and "ValueError: a\n    |     b" in text


def test_a_script_threads_exception_goes_to_the_log(mpxd, tmp_path):
    # Python's own hook printed it on stderr: not the --log-file, and under
    # --daemon nowhere at all.
    script = tmp_path / "poller.py"
    script.write_text("import threading\n"
                      "def poll():\n"
                      "    raise RuntimeError('poller died\\n2026 forged')\n"
                      "def on_start(server):\n"
                      "    threading.Thread(target=poll, name='poller', daemon=True).start()\n"
                      "def handle_request(s):\n"
                      "    s.response = 'ok'\n")
    log_file = tmp_path / "mpxd.log"
    m = mpxd(["--port", "0", "--host", "127.0.0.1", "--log-file", str(log_file),
              str(script)])
    assert wait_until(lambda: log_file.exists() and "poller died" in log_file.read_text(),
                      timeout=10)
    text = log_file.read_text()
    assert re.search(r"ERROR thread poller of the script failed:\nTraceback .*"
                     r"in poll\n.*\nRuntimeError: poller died\n    2026 forged\n", text,
                     re.S), text
    m.signal(signal.SIGTERM)
    assert m.wait() == 0
    assert "poller died" not in m.log()         # stderr


def test_a_bad_log_call_under_syslog_is_not_taken_for_a_syslog_outage(monkeypatch, capsys):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", "/nonexistent/devlog")
    monkeypatch.setattr(logs, "SYSLOG_UDP", receiver.getsockname())
    try:
        setup_logging("info", syslog=True)
        logging.getLogger("mpxd.script").warning("%d", "x")     # the script's own bug
        err = capsys.readouterr().err
        assert "--- Logging error ---" in err                   # logging's own report
        assert "cannot send log lines to syslog" not in err
    finally:
        receiver.close()
        setup_logging("info", stream=io.StringIO())
