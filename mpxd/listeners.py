"""Open the listening sockets: bound from options, or handed over by systemd."""

from __future__ import annotations

import errno
import socket

__all__ = ["ListenError", "bind_listeners", "describe"]

DEFAULT_HOSTS = ("127.0.0.1", "::1")


class ListenError(Exception):
    """A listening socket cannot be opened; the message names address and port."""


def describe(sock: socket.socket) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) or the path a socket listens on."""
    address = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if sock.family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, int, tuple]:
    """``(family, proto, sockaddr)`` to bind for ``host``: its first address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _type, proto, _name, address = infos[0]
    return family, proto, address


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


def _bind_one(host: str, resolved: tuple[socket.AddressFamily, int, tuple], port: int,
              backlog: int, reuse_port: bool = False, listen: bool = True,
              refuse_taken: bool = False) -> socket.socket:
    """Bind (and listen on) ``resolved``, what ``_resolve(host, port)`` returned."""
    family, proto, address = resolved
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
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
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {shown}: address already in use "
                              f"(is another mpxd or another server running there?)") from None
        if e.errno == errno.EACCES and 0 < port < 1024:
            raise ListenError(f"cannot listen on {shown}: {e.strerror} (ports below 1024 "
                              f"need root: start as root with --user, or let systemd "
                              f"bind the port)") from None
        raise ListenError(f"cannot listen on {shown}: {e.strerror}") from None
    return sock


def bind_listeners(hosts: tuple[str, ...], port: int, backlog: int,
                   reuse_port: bool = False, listen: bool = True,
                   refuse_taken: bool = False) -> list[socket.socket]:
    """Listen on ``port`` at every host; port 0 picks one free port for all.

    The default pair 127.0.0.1 and ::1 tolerates a machine without IPv6: ::1
    is skipped when the kernel has no IPv6 loopback.  A host the user named
    explicitly must work, or start-up fails.

    A host that resolves to an address already listened on is skipped
    (``--host 127.0.0.1`` given twice, or a name for the same address).

    ``reuse_port`` sets ``SO_REUSEPORT`` (``--workers``); ``listen=False``
    only binds: the supervisor holds the port that way without ever being
    handed a connection.  ``refuse_taken`` (the supervisor's bind) fails
    when a server already listens there, which ``SO_REUSEPORT`` alone would
    let it share (see ``_probe_port``).
    """
    sockets: list[socket.socket] = []
    optional = tuple(hosts) == DEFAULT_HOSTS
    bound: set[tuple] = set()           # (family, address) already listened on
    try:
        for host in hosts:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]       # [::1], the bracketed form URLs use
            try:
                resolved = _resolve(host, port)
                family, _proto, address = resolved
                if (family, address[0]) in bound:
                    continue            # --host 127.0.0.1 twice, or a name for it
                bound.add((family, address[0]))
                sock = _bind_one(host, resolved, port, backlog, reuse_port, listen,
                                 refuse_taken)
            except ListenError:
                if optional and host == "::1" and not socket.has_ipv6:
                    continue
                if optional and host == "::1" and _no_ipv6_loopback():
                    continue
                raise
            sockets.append(sock)
            if port == 0:
                port = sock.getsockname()[1]   # the others share the picked port
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
