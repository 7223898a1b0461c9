"""pytest plugin: the ``mpxd_harness`` and ``mpxd_server`` fixtures for handler tests.

Registered through the ``pytest11`` entry point, so installing mpxd is enough
(no ``conftest.py``, no ``pytest_plugins``; ``-p no:mpxd`` turns it off).
Script paths are relative to the current directory, as on the command line::

    def test_counter(mpxd_harness):
        c = mpxd_harness("handlers/counter.py").connect()
        assert c.send("2") == ["2"]

    def test_counter_for_real(mpxd_server):
        server = mpxd_server("handlers/counter.py")
        with server.client() as c:
            assert c.ask("2") == "2"
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest

from .harness import Harness
from .server import Server, ServerError


@pytest.fixture
def mpxd_harness() -> Iterator[Callable[..., Harness]]:
    """Factory: ``mpxd_harness(script, **options)`` -> a ``Harness``, closed after the test."""
    made: list[Harness] = []

    def make(script: str | os.PathLike[str], **options: Any) -> Harness:
        harness = Harness(script, **options)
        made.append(harness)
        return harness

    yield make
    problems = []
    for harness in made:            # every one, even after one failed to close
        try:
            harness.close()
        except Exception as e:  # noqa: BLE001 - reported below, with the others
            problems.append(f"{harness.config.script}: {type(e).__name__}: {e}")
    if problems:
        pytest.fail("closing the harness failed:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def mpxd_server() -> Iterator[Callable[..., Server]]:
    """Factory: ``mpxd_server(script, *args, **options)`` -> a running daemon on a free port.

    ``options`` become command-line options (``idle_timeout=5`` is
    ``--idle-timeout 5``); ``args`` are passed as they are.  The server
    listens on 127.0.0.1 on a free port: ``server.address``, ``server.port``,
    ``server.client()`` (a ``LineClient``), ``server.log``.  After the test
    every server still running is stopped with SIGTERM; one that then does
    not exit with status 0 (or not within 10 s) fails the test's teardown,
    and so does one that exited by itself during the test with another
    status than 0 (a crash, ``os._exit(3)`` in a handler).
    """
    started: list[Server] = []

    def start(script: str, *args: str, **options: Any) -> Server:
        server = Server.start(script, *args, **options)
        started.append(server)
        return server

    yield start
    problems = []
    for server in started:          # every one, even after a failure
        running = server.returncode is None and server.process.poll() is None
        stopped_by_test = server.returncode is not None    # server.stop() in the test
        try:
            status = server.stop()
        except ServerError as e:
            problems.append(f"mpxd (pid {server.pid}): {e}")
            continue
        if running and status != 0:
            problems.append(f"mpxd (pid {server.pid}) exited with status {status} "
                            f"on SIGTERM, not 0; its log:\n{server.log}")
        elif not running and not stopped_by_test and status != 0:
            problems.append(f"mpxd (pid {server.pid}) exited by itself during the test "
                            f"with status {status}; its log:\n{server.log}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
