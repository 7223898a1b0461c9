"""Test kit for handler scripts: a fake-edge ``Harness`` and the real daemon as a fixture.

    from mpxd.testing import Harness

    def test_counter():
        with Harness("handlers/counter.py") as h:
            c = h.connect()
            assert c.send("2") == ["2"]

With pytest, the ``mpxd_harness`` and ``mpxd_server`` fixtures (module
``mpxd.testing.plugin``, registered on install as the plugin ``mpxd``: use
``-p no:mpxd`` to turn it off, not ``-p mpxd.testing.plugin``) make and
clean up both.
"""

from .harness import Client, Harness, make_config
from .server import LineClient, Server, ServerError, cli_args

__all__ = ["Harness", "Client", "make_config", "Server", "ServerError",
           "LineClient", "cli_args"]
