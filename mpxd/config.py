"""The frozen settings one run of mpxd works with.

The CLI turns options into a ``Config``; the core, the loop and the test kit
read it.  Defaults live here, once, and ``--help`` and the man page quote them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config", "water_marks"]

KiB = 1024
MiB = 1024 * KiB


def water_marks(max_output: int) -> tuple[int, int]:
    """``(high_water, low_water)`` for a ``--max-output``: reading stops at the
    high mark (1 MiB, or a sixteenth of ``max_output`` if that is less) and
    resumes once unsent output falls to the low mark, a quarter of it."""
    high_water = min(1 * MiB, max(1, max_output // 16))
    return high_water, high_water // 4


@dataclass(frozen=True)
class Config:
    """Everything a run is configured with; see ``mpxd --help``."""

    script: str = ""
    port: int | None = None
    hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    eol: str = "\n"
    poller: str = "epoll"
    backlog: int = 1024
    max_line: int = 64 * KiB
    high_water: int = 1 * MiB
    low_water: int = 256 * KiB
    max_output: int = 16 * MiB
    max_connections: int = 0          # 0: derived from RLIMIT_NOFILE
    idle_timeout: float | None = None
    keepalive: int = 300              # TCP keepalive idle seconds; 0: off
    drain_timeout: float = 10.0
    send_timeout: float | None = 60.0  # a closing session's client taking nothing
    threads: int = 4
    pidfile: str | None = None
    log_file: str | None = None
    log_level: str = "info"
    session_log: bool = True          # the INFO line per closed session
    syslog: bool = False
    daemon: bool = False
    user: str | None = None
    group: str | None = None
    # the network edge (mpxd.edge): TLS, unix sockets, access, control
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_handshake_timeout: float = 10.0
    unix: tuple[str, ...] = ()
    unix_mode: int = 0o660
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_per_ip: int = 0               # 0: no limit
    max_rate: float = 0.0             # request lines per second per session; 0: none
    control: str | None = None
