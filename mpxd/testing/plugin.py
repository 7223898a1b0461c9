"""pytest plugin: the ``mpxd_harness`` and ``mpxd_server`` fixtures for handler tests.

Registered through the ``pytest11`` entry point, so installing mpxd is enough::

    def test_counter(mpxd_harness):
        c = mpxd_harness("handlers/counter.py").connect()
        assert c.send("2") == ["2"]

    def test_counter_for_real(mpxd_server):
        server = mpxd_server("handlers/counter.py")
        with server.client() as c:
            assert c.ask("2") == "2"
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from .harness import Harness
from .server import Server


@pytest.fixture
def mpxd_harness() -> Iterator[Callable[..., Harness]]:
    """Factory: ``mpxd_harness(script, **options)`` -> a ``Harness``, closed after the test."""
    made: list[Harness] = []

    def make(script: str, **options: Any) -> Harness:
        harness = Harness(script, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def mpxd_server() -> Iterator[Callable[..., Server]]:
    """Factory: ``mpxd_server(script, *args, **options)`` -> a running daemon on a free port.

    ``options`` become command-line options (``idle_timeout=5`` is
    ``--idle-timeout 5``); ``args`` are passed as they are.  Every server is
    stopped with SIGTERM after the test.
    """
    started: list[Server] = []

    def start(script: str, *args: str, **options: Any) -> Server:
        server = Server.start(script, *args, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
