"""Who may connect, how many at once, and how fast they may send.

* ``--allow CIDR`` / ``--deny CIDR`` (``AccessRules``): the rules are tried
  from the most specific network to the least specific (longest prefix
  first; at equal length a deny before an allow) and the first one that
  matches the client's address decides.  No match: refused if any
  ``--allow`` was given, accepted otherwise.  So ``--allow 10.0.0.0/8
  --deny 10.1.0.0/16`` and ``--deny 10.0.0.0/8 --allow 10.1.2.3`` both mean
  what they say, in whatever order they are written.  IPv4-mapped IPv6
  addresses (``::ffff:10.1.2.3``) are matched as the IPv4 address.
* ``--max-per-ip N`` (``AddressLimit``): at most N connections (sessions and
  TLS handshakes in progress) from one address.
* A refused connection is closed before any handler runs; ``RefusalLog``
  logs the first of a burst at once and then one summary line per second
  while refusals go on, with counts by reason and by address.
* ``--max-rate LINES_PER_SECOND`` (``RateLimit``): a token bucket per
  session, holding one second's worth of lines.  A session over its budget
  has its surplus lines held and its socket taken out of the poll set (the
  core's pause) until the budget allows them: input is read more slowly,
  never dropped.

All of it is decided per listener and per session when a connection is
accepted; sessions of a daemon started without these options never meet
this module.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Iterable

from .logs import BurstLog

if TYPE_CHECKING:  # pragma: no cover
    from .core import Core
    from .session import Session

__all__ = ["AccessRules", "AddressLimit", "refusal_log", "Gate", "RateLimit",
           "ThrottledFramer", "parse_network"]

log = logging.getLogger("mpxd")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RELEASE_INTERVAL = 0.05     # a throttled session gets lines at most this often
MIN_WAIT = 0.001            # never a zero-delay timer: that would spin the loop
SWEEP_EVERY = 1024          # admissions between sweeps of finished connections


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``::1``, ``192.168.1.7``: a network (a host is a /32 or /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or network "
                         f"(like 10.0.0.0/8 or 2001:db8::/32)") from None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])    # drop an IPv6 zone
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AccessRules:
    """``--allow``/``--deny`` networks, tried most specific first; first match decides."""

    def __init__(self, allow: Iterable[str | Network] = (),
                 deny: Iterable[str | Network] = ()) -> None:
        rules: list[tuple[Network, bool]] = []
        self._typos: list[str] = []     # for mistakes(): rules that cannot be meant
        for allowed, texts in ((True, allow), (False, deny)):
            option = "--allow" if allowed else "--deny"
            for text in texts:
                network = text if not isinstance(text, str) else parse_network(text)
                rules.append((network, allowed))
                given, slash, _prefix = text.strip().partition("/") \
                    if isinstance(text, str) else ("", "", "")
                if slash and ipaddress.ip_address(given) != network.network_address:
                    self._typos.append(
                        f"{option} {text.strip()} is taken as {network}: the address has "
                        f"host bits set (write {network} for the network, or "
                        f"{given} alone for the one host)")
                mapped = network.network_address.ipv4_mapped \
                    if network.version == 6 else None
                if mapped is not None and network.prefixlen >= 96:
                    self._typos.append(
                        f"{option} {network} never matches: a client that an IPv6 socket "
                        f"shows as IPv4-mapped is matched as IPv4 (write "
                        f"{mapped}/{network.prefixlen - 96})")
        # Longest prefix first; at equal length deny (False) sorts before allow.
        rules.sort(key=lambda rule: (-rule[0].prefixlen, rule[1]))
        self.rules = rules
        self._by_version = {4: [r for r in rules if r[0].version == 4],
                            6: [r for r in rules if r[0].version == 6]}
        self.default = not any(allowed for _net, allowed in rules)

    def allows(self, host: str) -> bool:
        """Whether a client at ``host`` (an IP address string) may connect."""
        address = _address(host)
        for network, allowed in self._by_version[address.version]:
            if address in network:
                return allowed
        return self.default

    def mistakes(self, listening: Iterable[tuple[str, str, bool]]) -> list[str]:
        """Rules that cannot mean what they say, for warnings at start-up.

        ``listening``: ``(host, shown, dual)`` for each TCP socket, the bound
        address, how logs show the socket, and whether it is an IPv6 socket
        that IPv4 clients reach too (``[::]`` without IPV6_V6ONLY, as
        systemd passes one by default).  Reported: an ``--allow``
        that the same network's ``--deny`` always overrules; a loopback
        socket whose own address is refused (only local clients reach it:
        ``--allow 10.0.0.0/8`` with the default ``--host``), or another
        127.x address whose clients come from a refused 127.0.0.1; a socket
        whose whole address family is refused.
        """
        found = list(self._typos)
        denied = {network for network, allowed in self.rules if not allowed}
        for network, allowed in self.rules:
            if allowed and network in denied:
                found.append(f"--allow {network} has no effect: --deny {network}, "
                             "the same network, wins the tie")
        for host, shown, dual in listening:
            address = _address(host)
            if address.is_loopback and not self.allows(host):
                found.append(f"listening on {shown}, where only clients on this machine "
                             f"connect, but --allow/--deny refuse {address}: "
                             "none of them can connect")
            elif address.version == 4 and address.is_loopback and \
                    not self.allows("127.0.0.1"):
                # Linux gives a local client 127.0.0.1 as its address, whichever
                # 127.x address it connects to, unless it binds another itself.
                found.append(f"listening on {shown}, but clients on this machine connect "
                             f"from 127.0.0.1 (unless they bind {address} themselves), "
                             "which --allow/--deny refuse")
            elif not address.is_loopback and self._refuses_all(address.version, denied) \
                    and not (dual and not self._refuses_all(4, denied)):
                found.append(f"--allow/--deny refuse every IPv{address.version} "
                             f"client: nobody can connect to {shown}")
        return found

    def _refuses_all(self, version: int, denied: set[Network]) -> bool:
        """Whether no IPv``version`` address can be allowed (exact but for
        several denies that together cover an allow: never a false alarm)."""
        rules = self._by_version[version]
        if any(allowed and network not in denied for network, allowed in rules):
            return False
        return not self.default or any(network.prefixlen == 0 for network in denied
                                       if network.version == version)

    def describe(self) -> list[str]:
        """The rules in the order they are tried, for logs and ``--help`` checks."""
        lines = [f"{'allow' if allowed else 'deny'} {network}"
                 for network, allowed in self.rules]
        lines.append(f"{'allow' if self.default else 'deny'} everything else")
        return lines


class AddressLimit:
    """``--max-per-ip``: open connections per client address.

    A connection is anything with a ``_finished`` attribute (a session, or
    a TLS handshake in progress).  Finished ones are dropped lazily, when
    their address connects again or in a sweep every ``SWEEP_EVERY``
    admissions, so closing a session costs nothing here.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_address: dict[str, list[Any]] = {}
        self._admitted = 0

    def room(self, host: str) -> bool:
        """Whether ``host`` has fewer than ``limit`` open connections."""
        conns = self.by_address.get(host)
        if not conns:
            return True
        if len(conns) >= self.limit:
            conns[:] = [c for c in conns if not c._finished]
        return len(conns) < self.limit

    def add(self, host: str, conn: Any) -> None:
        """Count ``conn`` against ``host`` until it is finished."""
        self.by_address.setdefault(host, []).append(conn)
        self._admitted += 1
        if self._admitted >= SWEEP_EVERY:
            self._admitted = 0
            for address, conns in list(self.by_address.items()):
                conns[:] = [c for c in conns if not c._finished]
                if not conns:
                    del self.by_address[address]


def refusal_log(core: Core) -> BurstLog:
    """Refused connections, logged once per burst, with counts."""
    return BurstLog(core, first="refused a connection from {who}: {reason}",
                    summary="refused {count} {when}", noun="connection", later="refusals")


ADMITTED, DENIED, TOO_MANY = "", "denied", "too many"    # Gate.admit's verdicts


class Gate:
    """The access check made once per accepted TCP connection."""

    def __init__(self, refusals: BurstLog, rules: AccessRules | None = None,
                 per_address: AddressLimit | None = None) -> None:
        self.rules = rules
        self.per_address = per_address
        self.refusals = refusals

    def admit(self, host: str) -> str:
        """``ADMITTED`` if ``host`` may connect now, else why not (logged in bursts)."""
        if self.rules is not None and not self.rules.allows(host):
            self.refusals.event(host, host, "denied by --allow/--deny")
            return DENIED
        if self.per_address is not None and not self.per_address.room(host):
            self.refusals.event(host, host, f"over --max-per-ip {self.per_address.limit}")
            return TOO_MANY
        return ADMITTED

    def track(self, host: str, conn: Any) -> None:
        """Count an admitted connection (session or handshake) for ``--max-per-ip``."""
        if self.per_address is not None:
            self.per_address.add(host, conn)


class RateLimit:
    """``--max-rate``: the shared settings of every session's token bucket."""

    def __init__(self, core: Core, lines_per_second: float) -> None:
        self.core = core
        self.rate = float(lines_per_second)
        self.burst = max(1.0, self.rate)          # one second's worth of lines
        self.batch = max(1.0, self.rate * RELEASE_INTERVAL)
        self.throttled = 0                        # times a session was held back

    def apply(self, s: Session) -> None:
        """Put ``s``'s input through a token bucket (at accept, before any input)."""
        s._framer = ThrottledFramer(self, s, s._framer)


class ThrottledFramer:
    """A session's framer that hands out at most ``rate`` lines per second.

    Wraps the session's real framer.  Lines beyond the budget wait in
    ``stash`` while the session is paused (no longer polled for input); a
    timer hands them over as tokens accrue, through ``data_received(s,
    b"")``, so they go the same way as lines read from the socket.
    """

    __slots__ = ("limit", "session", "inner", "tokens", "stamp", "stash", "timer")

    def __init__(self, limit: RateLimit, s: Session, inner: Any) -> None:
        self.limit = limit
        self.session = s
        self.inner = inner
        self.tokens = limit.burst
        self.stamp = limit.core.now
        self.stash: list[str] = []
        self.timer: Any = None

    @property
    def overflow(self) -> bool:
        # An overlong line closes the session: not before the lines ahead of it are out.
        return self.inner.overflow and not self.stash

    def feed(self, data: bytes) -> list[str]:
        """Lines in ``data`` (and held ones) that the budget allows now."""
        lines = self.inner.feed(data)   # b"" too: TLS may hold decrypted input
        if self.stash:
            lines = self.stash + lines
            self.stash = []
        if not lines:
            return lines
        limit = self.limit
        now = limit.core.now
        tokens = min(limit.burst, self.tokens + (now - self.stamp) * limit.rate)
        self.stamp = now
        if len(lines) <= tokens + 1e-9:
            self.tokens = tokens - len(lines)
            return lines
        allowed = int(tokens + 1e-9)      # 0.9999999999999998 tokens are one token
        self.tokens = max(0.0, tokens - allowed)
        self.stash = lines[allowed:]
        self._hold()
        return lines[:allowed]

    def finish(self) -> list[str]:
        """EOF: everything left.  (While lines are held the socket is not read,
        so EOF normally arrives only after the stash has been handed out.)"""
        lines, self.stash = self.stash, []
        return lines + self.inner.finish()

    def _hold(self) -> None:
        s = self.session
        limit = self.limit
        if not s._throttled:
            limit.throttled += 1
            s._throttled = True
            if not s._paused:
                s._paused = True            # the loop stops polling it for input
                limit.core.dirty.append(s)
        if self.timer is None:
            need = min(len(self.stash), limit.batch)
            wait = max(MIN_WAIT, (need - self.tokens) / limit.rate)
            self.timer = limit.core.call_later(wait, self._release)

    def _release(self) -> None:
        self.timer = None
        s = self.session
        if s._finished or s._closing:
            self.stash = []
            return
        core = self.limit.core
        core.data_received(s, b"")          # feed(b"") hands out what the budget allows
        if not self.stash and not s._finished:
            s._throttled = False
            core.dirty.append(s)            # the loop resumes reading once output is low
