"""The optional parts of the network edge, wired into a ``Loop``: TLS, unix
sockets, access rules, rate limits and the control channel.

Everything here is decided once per listener (``Loop.admission``) and once
per session (its framer and writer), when a connection is accepted.  A TCP
listener without TLS, rules, limits or ``--control`` gets no admission hook
at all, so its connections take the loop's plain accept and I/O path.

What a connection accepted on a listener with a hook goes through:

1. unix socket: the peer's credentials become ``s.peer``; nothing else.
2. ``Gate``: ``--allow``/``--deny`` and ``--max-per-ip``; a refused
   connection is closed here, before any handler runs.
3. TLS: the handshake (``mpxd.tls``); the session opens when it is done.
4. The session opens (``Loop.adopt``, which runs ``handle_open``); the TLS
   channel and then ``--max-rate``'s token bucket wrap its framer, and the
   listener's tally (for ``stats``) counts it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import TYPE_CHECKING, Any, Callable

import click

from .access import (TOO_MANY, AccessRules, AddressLimit, Gate, RateLimit, parse_network,
                     refusal_log)
from .control import ControlServer, ListenerTally
from .listeners import describe
from .logs import BurstLog
from .privileges import ids_of
from .tls import EXPIRY_CHECK_INTERVAL, TLSChannel, TLSServer
from .unix import UnixListener, bind_unix, peer_credentials

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .loop import Loop
    from .session import Session

__all__ = ["Edge", "Admission", "edge_options", "edge_settings"]

log = logging.getLogger("mpxd")

CONTROL_MODE = 0o600


# ---------------------------------------------------------------- options

def _networks(ctx: click.Context, param: click.Parameter,
              value: tuple[str, ...]) -> tuple[str, ...]:
    for text in value:
        try:
            parse_network(text)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


def _octal(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal file mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is not a file mode (0 to 0777)")
    return mode


def _positive(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 < value < math.inf:        # nan fails too
        raise click.BadParameter(f"must be more than 0 seconds, and finite (not {value})")
    return value


def _rate(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 <= value < math.inf:       # nan fails too
        raise click.BadParameter(f"must be 0 (no limit) or more lines per second, "
                                 f"and finite (not {value})")
    return value


_FILE = click.Path(exists=True, dir_okay=False)

_OPTIONS = [
    click.option("--tls-cert", type=_FILE, default=None, metavar="FILE",
                 help="Speak TLS on the TCP listeners with this PEM certificate "
                      "(chain). HUP reloads it."),
    click.option("--tls-key", type=_FILE, default=None, metavar="FILE",
                 help="The unencrypted PEM private key of --tls-cert (default: in "
                      "that file)."),
    click.option("--tls-ca", type=_FILE, default=None, metavar="FILE",
                 help="Require client certificates signed by a CA in this PEM "
                      "file; the subject is s.tls_peer."),
    click.option("--tls-handshake-timeout", type=float, default=10.0, show_default=True,
                 metavar="SECONDS", callback=_positive,
                 help="Close a TLS client that has not finished its handshake by then."),
    click.option("--unix", "unix", multiple=True, metavar="PATH",
                 type=click.Path(dir_okay=False),
                 help="Also listen on a unix socket at PATH; repeatable. s.peer is "
                      "then (pid, uid, gid) of the client."),
    click.option("--unix-mode", default="0660", show_default=True, metavar="OCTAL",
                 callback=_octal, help="Permissions of the --unix socket files."),
    click.option("--allow", multiple=True, metavar="CIDR", callback=_networks,
                 help="Accept TCP clients from this network; repeatable. Once any "
                      "--allow is given, addresses no rule matches are refused."),
    click.option("--deny", multiple=True, metavar="CIDR", callback=_networks,
                 help="Refuse TCP clients from this network; repeatable. The most "
                      "specific matching --allow/--deny decides (deny wins a tie)."),
    click.option("--max-per-ip", type=click.IntRange(0), default=0, metavar="N",
                 help="Open connections per client address at most; more are "
                      "refused. Default 0: no limit."),
    click.option("--max-rate", type=float, default=0.0, callback=_rate,
                 metavar="LINES_PER_SECOND",
                 help="Request lines per second per session; beyond it input is "
                      "read more slowly, never dropped. Default 0: no limit."),
    click.option("--control", type=click.Path(dir_okay=False), default=None,
                 metavar="PATH",
                 help="Open the control socket (mode 0600) at PATH for mpxctl."),
]

EDGE_OPTION_NAMES = ("tls_cert", "tls_key", "tls_ca", "tls_handshake_timeout", "unix",
                     "unix_mode", "allow", "deny", "max_per_ip", "max_rate", "control")


def edge_options(command: Callable) -> Callable:
    """Decorate the ``mpxd`` command with the edge's options (in this order)."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def edge_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The ``Config`` fields for the edge's option values; usage errors raise."""
    cert = options.get("tls_cert")
    if cert is None:
        for name in ("tls_key", "tls_ca"):
            if options.get(name):
                raise click.UsageError(f"--{name.replace('_', '-')} needs --tls-cert")

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    if any(not path for path in options.get("unix", ())):
        raise click.UsageError("--unix needs a path")
    # One socket per file: a path given twice is listened on once, also
    # through a symlinked directory (which said "another process is
    # listening there": mpxd itself).
    by_file: dict[str, str] = {}
    for path in options.get("unix", ()):
        by_file.setdefault(os.path.realpath(path), os.path.abspath(path))
    unix = tuple(by_file.values())
    control = absolute(options.get("control"))
    if control is not None and os.path.realpath(control) in by_file:
        raise click.UsageError(f"--control {control} is also a --unix path; give the "
                               f"control socket a path of its own")
    return dict(
        tls_cert=absolute(cert), tls_key=absolute(options.get("tls_key")),
        tls_ca=absolute(options.get("tls_ca")),
        tls_handshake_timeout=options.get("tls_handshake_timeout", 10.0),
        unix=unix,
        unix_mode=options.get("unix_mode", 0o660),
        allow=tuple(options.get("allow", ())), deny=tuple(options.get("deny", ())),
        max_per_ip=options.get("max_per_ip", 0), max_rate=options.get("max_rate", 0.0),
        control=control,
    )


# ------------------------------------------------------------ the wiring

class Edge:
    """The edge features of one run: opened before privileges drop, installed in the loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tls: TLSServer | None = None
        self.unix: list[UnixListener] = []
        self.control_listener: UnixListener | None = None
        self.control: ControlServer | None = None
        self.refusals: BurstLog | None = None
        self.rate: RateLimit | None = None
        self.tallies: list[ListenerTally] = []

    @classmethod
    def open(cls, config: Config) -> Edge:
        """Load TLS files and bind unix and control sockets; ``ListenError`` on failure."""
        edge = cls(config)
        try:
            if config.tls_cert:
                edge.tls = TLSServer(config.tls_cert, config.tls_key, config.tls_ca,
                                     config.tls_handshake_timeout)
            for path in config.unix:
                edge.unix.append(bind_unix(path, config.unix_mode, config.backlog))
            if config.control:
                edge.control_listener = bind_unix(config.control, CONTROL_MODE, 16)
            edge._give_files_to(config.user, config.group)
        except BaseException:
            edge.close()
            raise
        return edge

    @property
    def sockets(self) -> list[socket.socket]:
        """The unix listening sockets, for the loop to accept on."""
        return [listener.sock for listener in self.unix]

    def _give_files_to(self, user: str | None, group: str | None) -> None:
        """Socket files belong to the user the daemon runs as after ``--user``."""
        ids = ids_of(user, group)       # an unknown name: drop_privileges says so
        if ids is None or os.geteuid() != 0:
            return
        for listener in self.unix + ([self.control_listener] if self.control_listener else []):
            listener.chown(*ids)

    def install(self, loop: Loop, warn: bool = True) -> None:
        """Give the loop its admission hooks, reload hook and control channel.

        ``warn``: say which access rules cannot mean what they say, and
        when the TLS certificate expires soon (the ``--workers`` after the
        first do not repeat it).
        """
        config = self.config
        core = loop.core
        gate = None
        if config.allow or config.deny or config.max_per_ip:
            self.refusals = refusal_log(core)
            rules = AccessRules(config.allow, config.deny) \
                if config.allow or config.deny else None
            limit = AddressLimit(config.max_per_ip) if config.max_per_ip else None
            gate = Gate(self.refusals, rules, limit)
            if rules is not None:
                log.debug("access rules, in the order tried: %s",
                          "; ".join(rules.describe()))
                tcp = [(sock.getsockname()[0], describe(sock), _dual_stack(sock))
                       for sock in loop.listeners.values() if sock.family != socket.AF_UNIX]
                for mistake in rules.mistakes(tcp) if warn else ():
                    log.warning("%s", mistake)
        if config.max_rate:
            self.rate = RateLimit(core, config.max_rate)
        if self.tls is not None:
            self.tls.attach(loop)
            loop.reload_hooks.append(self.tls.reload)
            self.tls.warns_of_expiry = warn
            if warn:                # a certificate expiring while the daemon runs
                if problem := self.tls.unreloadable():
                    log.warning("%s", problem)
                self.tls.check_expiry()
                core.call_every(EXPIRY_CHECK_INTERVAL, self.tls.check_expiry)
        for fd, sock in loop.listeners.items():
            unix = sock.family == socket.AF_UNIX
            tally = ListenerTally(describe(sock)) if self.control_listener else None
            if tally is not None:
                self.tallies.append(tally)
            admission = Admission(loop, unix=unix, gate=None if unix else gate,
                                  tls=None if unix else self.tls, rate=self.rate,
                                  tally=tally)
            if admission.needed:
                loop.admission[fd] = admission
        if self.control_listener is not None:
            self.control = ControlServer(self.control_listener, loop, self)
            log.info("control socket at %s", self.control_listener.path)

    def close(self) -> None:
        """Close the control channel; remove socket files that are still ours."""
        if self.refusals is not None:
            self.refusals.close()
            self.refusals = None
        if self.tls is not None:
            self.tls.close()
        if self.control is not None:
            self.control.close()
            self.control = None
        elif self.control_listener is not None:
            self.control_listener.remove()
        self.control_listener = None
        for listener in self.unix:
            listener.remove()
        self.unix = []


def _dual_stack(sock: socket.socket) -> bool:
    """Whether IPv4 clients reach this IPv6 socket too (IPV6_V6ONLY off)."""
    if sock.family != socket.AF_INET6:
        return False
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        return False


class Admission:
    """What a connection accepted on one listener goes through (see the module doc)."""

    def __init__(self, loop: Loop, *, unix: bool, gate: Gate | None,
                 tls: TLSServer | None, rate: RateLimit | None,
                 tally: ListenerTally | None) -> None:
        self.loop = loop
        self.unix = unix
        self.gate = gate
        self.tls = tls
        self.rate = rate
        self.tally = tally
        self.needed = bool(unix or gate or tls or rate or tally)
        self.too_many = b"ERROR too many connections from your address" + \
            loop.config.eol.encode()

    def __call__(self, fd: int, addr: Any) -> None:
        if self.unix:
            try:
                peer: Any = peer_credentials(fd)
            except OSError:
                peer = "unix"
            self.open(fd, peer)
            return
        peer = addr[:2]
        gate = self.gate
        if gate is not None:
            verdict = gate.admit(peer[0])
            if verdict:
                if verdict == TOO_MANY and self.tls is None:
                    # As "ERROR line too long": a client learns why.  A
                    # denied one is told nothing.  Best effort: the socket
                    # is new, its buffer empty, and nothing waits for it.
                    try:
                        os.write(fd, self.too_many)
                    except OSError:
                        pass
                os.close(fd)
                return
        if self.tls is not None:
            conn: Any = self.tls.handshake(fd, peer, self.open)
        else:
            conn = self.open(fd, peer)
        if gate is not None:
            gate.track(peer[0], conn)

    def open(self, fd: int, peer: Any, channel: TLSChannel | None = None) -> Session:
        """Make the connection a session (after the handshake, for TLS)."""
        s = self.loop.adopt(fd, peer, tls_peer=channel.subject if channel else None)
        if channel is not None:
            channel.attach(s)
        if self.rate is not None:
            self.rate.apply(s)          # outermost: its timer feeds held lines back in
        if self.tally is not None:
            self.tally.add(s)
        if channel is not None:
            channel.start()             # through the rate, too
        return s
