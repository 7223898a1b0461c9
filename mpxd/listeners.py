"""Open the listening sockets: bound from options, or handed over by systemd."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

__all__ = ["ListenError", "bind_listeners", "describe"]

log = logging.getLogger("mpxd")

DEFAULT_HOSTS = ("127.0.0.1", "::1")


class ListenError(Exception):
    """A listening socket cannot be opened; the message names address and port."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code           # the bind's errno, when that is what failed


def describe(sock: socket.socket) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) or the path a socket listens on."""
    address = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if sock.family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    return str(address)


Resolved = tuple[socket.AddressFamily, int, tuple]   # (family, proto, sockaddr)

WILDCARDS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
# A name's address that this machine lacks, or whose family it lacks.
NOT_HERE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _resolve(host: str, port: int) -> list[Resolved]:
    """Every ``(family, proto, sockaddr)`` to bind for ``host``, in getaddrinfo's order.

    A name may stand for several addresses (``localhost``: 127.0.0.1 and ::1);
    like nginx, mpxd listens on each, not only on the first.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return [(family, proto, address) for family, _type, proto, _name, address in infos]


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _probe_port(family: socket.AddressFamily, proto: int, address: tuple) -> None:
    """Raise ``OSError`` (EADDRINUSE) when a server already listens on ``address``.

    ``SO_REUSEPORT`` lets every socket of the same user share a port: a
    second ``mpxd --workers`` on a taken port would start beside the first
    and take half its clients.  A socket without it is refused by a
    listening socket, whoever's; it is closed again before the real bind.
    """
    probe = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is no server
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
    finally:
        probe.close()


def _bind_one(host: str, resolved: Resolved, port: int,
              backlog: int, reuse_port: bool = False, listen: bool = True,
              refuse_taken: bool = False) -> socket.socket:
    """Bind (and listen on) ``resolved``, one of the addresses ``_resolve(host, port)`` gave."""
    family, proto, address = resolved
    where = f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
    shown = where if host == address[0] else f"{host} ({where})"
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as e:            # no IPv6 in this kernel, say
        raise ListenError(f"cannot listen on {shown}: {e.strerror}", e.errno) from None
    try:
        if refuse_taken:
            _probe_port(family, proto, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # --workers: each worker listens on its own socket bound to the
            # same port; the kernel spreads new connections across them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "::" must not swallow IPv4, so that 0.0.0.0 and :: can both be used.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {shown}: address already in use "
                              f"(is another mpxd or another server running there?)") from None
        if e.errno == errno.EACCES and 0 < port < 1024:
            raise ListenError(f"cannot listen on {shown}: {e.strerror} (ports below 1024 "
                              f"need root: start as root with --user, or let systemd "
                              f"bind the port)") from None
        raise ListenError(f"cannot listen on {shown}: {e.strerror}", e.errno) from None
    return sock


def bind_listeners(hosts: tuple[str, ...], port: int, backlog: int,
                   reuse_port: bool = False, listen: bool = True,
                   refuse_taken: bool = False, warn: bool = True) -> list[socket.socket]:
    """Listen on ``port`` at every host; port 0 picks one free port for all.

    A host name stands for every address it resolves to.  The default pair
    127.0.0.1 and ::1 tolerates a machine without IPv6: ::1 is skipped when
    the kernel has no IPv6 loopback (or cannot resolve it); so is an address
    of a name that is not this machine's (or of a family it lacks), as long
    as another address of the name can be bound.  An address the user named
    explicitly must work, or start-up fails.

    An address already listened on is skipped (``--host 127.0.0.1`` given
    twice, or a name for the same address), and so, with a warning, is one
    that a wildcard of its family covers (127.0.0.1 beside 0.0.0.0).

    ``reuse_port`` sets ``SO_REUSEPORT`` (``--workers``); ``listen=False``
    only binds: the supervisor holds the port that way without ever being
    handed a connection.  ``refuse_taken`` (the supervisor's bind) fails
    when a server already listens there, which ``SO_REUSEPORT`` alone would
    let it share (see ``_probe_port``).  ``warn=False`` (a ``--workers``
    worker, after its parent bound the same hosts) says nothing of skips.
    """
    optional = tuple(hosts) == DEFAULT_HOSTS
    wanted = _addresses(hosts, port, warn, optional)
    sockets: list[socket.socket] = []
    try:
        for host, addresses in wanted:
            bound_here = 0
            for family, proto, address in addresses:
                # Resolved before port 0 was picked: the port goes in now.
                resolved = (family, proto, (address[0], port, *address[2:]))
                try:
                    sock = _bind_one(host, resolved, port, backlog, reuse_port, listen,
                                     refuse_taken)
                except ListenError as e:
                    if optional and host == "::1" and (not socket.has_ipv6
                                                       or _no_ipv6_loopback()):
                        continue
                    if not _is_literal(host) and e.errno in NOT_HERE:
                        if warn:
                            log.warning("%s; serving the other addresses of %s", e,
                                        host)
                        continue
                    raise
                sockets.append(sock)
                bound_here += 1
                if port == 0:
                    port = sock.getsockname()[1]   # the others share the picked port
            if addresses and not bound_here and not optional:
                raise ListenError(f"cannot listen on {host}:{port}: none of its "
                                  f"addresses can be bound here")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _addresses(hosts: tuple[str, ...], port: int, warn: bool,
               optional: bool) -> list[tuple[str, list[Resolved]]]:
    """Each host with the addresses to bind for it: each address once, none
    that a wildcard of its family (0.0.0.0, ::) already covers."""
    resolved = []
    for host in hosts:
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]       # [::1], the bracketed form URLs use
        try:
            resolved.append((host, _resolve(host, port)))
        except ListenError:
            if not (optional and host == "::1"):
                raise               # a default ::1 on a machine without IPv6: skip
    wildcards = {family for _host, addresses in resolved
                 for family, _proto, address in addresses
                 if address[0] == WILDCARDS.get(family)}
    seen: set[tuple] = set()
    wanted = []
    for host, addresses in resolved:
        kept = []
        for family, proto, address in addresses:
            if (family, address[0]) in seen:
                continue            # --host 127.0.0.1 twice, or a name for it
            seen.add((family, address[0]))
            if family in wildcards and address[0] != WILDCARDS[family]:
                if warn:
                    what = host if host == address[0] else f"{host} ({address[0]})"
                    log.warning("--host %s skipped: --host %s already listens on every "
                                "%s address, this one included", what, WILDCARDS[family],
                                "IPv4" if family == socket.AF_INET else "IPv6")
                continue
            kept.append((family, proto, address))
        wanted.append((host, kept))
    return wanted


def _no_ipv6_loopback() -> bool:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return True
    try:
        probe.bind(("::1", 0))
        return False
    except OSError:
        return True
    finally:
        probe.close()
