"""TLS on the TCP listeners: handshakes, per-session encryption, certificate reloads.

The loop reads and writes bare descriptors with ``os.read``/``os.write``.
TLS fits in without touching that path: ``ssl.SSLObject`` runs over two
``MemoryBIO`` buffers and never sees the socket, mpxd does all the I/O.

* The handshake happens before there is a session.  The accepted descriptor
  is polled through ``Loop.watch`` and fed to the SSL object until the
  handshake completes, fails (logged at INFO in bursts, nothing else is disturbed) or
  times out (``--tls-handshake-timeout``, a core timer).  Only then does the
  session open, so ``handle_open`` already sees ``s.tls_peer``.
* Reading: the session's framer is a ``TLSChannel``; the loop hands it the
  ciphertext it read and gets lines back, as from the plain ``LineFramer``.
* Writing: the session's ``_write`` is ``TLSChannel.write``, which keeps
  ``os.write``'s contract (bytes in, count of those bytes out, or
  ``BlockingIOError``) so the loop's flush treats both alike.

TLS 1.2 is the oldest version accepted, renegotiation is refused, and with
``--tls-ca`` a client certificate signed by that CA is required; its subject
becomes ``s.tls_peer`` in RFC 4514 form (``CN=alice,O=Example``).  HUP loads
the certificate files again; if that fails the previous ones stay in use.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import ssl
from typing import TYPE_CHECKING, Any, Callable

from .core import format_peer
from .listeners import ListenError
from .logs import BurstLog
from .privileges import user_name

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Loop
    from .session import Session

__all__ = ["TLSSetupError", "TLSServer", "TLSChannel", "subject_string",
           "certificate_expiry", "expiry_problem"]

log = logging.getLogger("mpxd")

IN = 0x001                      # select.POLLIN / EPOLLIN
OUT = 0x004                     # select.POLLOUT / EPOLLOUT
READ_SIZE = 64 * 1024           # ciphertext per os.read during the handshake
RECORD_SIZE = 16 * 1024         # plaintext per SSLObject.read: one TLS record at most
WRITE_CHUNK = 64 * 1024         # plaintext encrypted per write call
EOF_RETRY = 0.05                # a close_notify waits this long behind --max-rate's lines
EXPIRY_WARNING = datetime.timedelta(days=14)    # renewals (certbot's at 30) have failed
EXPIRY_CHECK_INTERVAL = 24 * 3600.0             # a daemon runs for months: look daily

# RFC 4514 short names for the attributes the ssl module reports by long name
_SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O",
    "organizationalUnitName": "OU", "streetAddress": "STREET",
    "domainComponent": "DC", "userId": "UID",
}


class TLSSetupError(ListenError):
    """The TLS certificate, key or CA file cannot be used; the message says why."""


def _files(cert: str, key: str | None, ca: str | None) -> list[tuple[str, str]]:
    return [(what, path) for what, path in (("certificate", cert), ("key", key),
                                            ("CA file", ca)) if path is not None]


def make_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, no renegotiation, client certs if ``ca``."""
    for what, path in _files(cert, key, ca):
        if not os.access(path, os.R_OK):
            who = "" if os.geteuid() == 0 else f" as user {user_name()}"
            raise TLSSetupError(f"cannot read TLS {what} {path}{who}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    pair = f"{cert} with key {key}" if key else cert

    def refuse_pass_phrase() -> str:
        # Without this, OpenSSL asks for the pass phrase on the terminal and
        # the daemon (or its loop, on HUP) waits there for an answer.
        raise TLSSetupError(
            f"cannot use TLS certificate {pair}: the key is encrypted and a "
            f"daemon cannot ask for its pass phrase; store it unencrypted, "
            f"readable only by root (openssl pkey -in KEY -out NEWKEY)")
    try:
        context.load_cert_chain(cert, key, password=refuse_pass_phrase)
    except (ssl.SSLError, OSError) as e:
        reason = _pem_problem(cert, key) or _reason(e)
        raise TLSSetupError(f"cannot use TLS certificate {pair}: {reason}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise TLSSetupError(f"cannot use TLS CA file {ca}: {_reason(e)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _pem_problem(cert: str, key: str | None) -> str | None:
    """Why ``cert``/``key`` cannot be PEM certificate and key, if it shows.

    OpenSSL says only "PEM lib" when a file holds no certificate or no key.
    """
    def holds(path: str, marker: bytes) -> bool:
        try:
            with open(path, "rb") as f:
                return marker in f.read(1 << 20)
        except OSError:
            return True      # unreadable now: let OpenSSL's reason stand
    if not holds(cert, b"-----BEGIN CERTIFICATE-----"):
        return f"{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    key_file = key or cert
    if not holds(key_file, b"PRIVATE KEY-----"):
        where = key_file if key else f"{cert} (give the key file with --tls-key)"
        return f"no PEM private key in {where}"
    return None


def certificate_expiry(path: str) -> datetime.datetime | None:
    """When the first certificate in PEM file ``path`` expires (UTC), or None if unknown.

    The ``ssl`` module parses only a peer's certificate, so this reads the
    DER itself, just far enough: Certificate, tbsCertificate, then past
    version, serial number, signature algorithm and issuer to validity.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20).decode("ascii", "replace")
        first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----",
                          pem, re.S)
        if first is None:
            return None
        der = ssl.PEM_cert_to_DER_cert(first.group(0))
        _, tbs, _ = _der_item(der, 0)               # Certificate
        tag, pos, end = _der_item(der, tbs)         # tbsCertificate
        tag, start, end = _der_item(der, pos)       # [0] version, or v1's serial number
        if tag == 0xA0:
            tag, start, end = _der_item(der, end)   # the serial number
        for _field in ("signature algorithm", "issuer"):
            tag, start, end = _der_item(der, end)
        tag, validity, _ = _der_item(der, end)      # validity: notBefore ...
        tag, start, end = _der_item(der, _der_item(der, validity)[2])   # ... notAfter
        text = der[start:end].decode("ascii")
        if tag == 0x17:                             # UTCTime, YYMMDDHHMMSSZ
            year = int(text[:2])
            text = ("19" if year >= 50 else "20") + text
        # By hand, not with strptime: that imports a module on first use,
        # which fails after --user if the user cannot read Python's library.
        if len(text) != 15 or not text.endswith("Z"):
            return None
        fields = [int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12),
                                              (12, 14))]
        return datetime.datetime(*fields, tzinfo=datetime.timezone.utc)
    except (OSError, ValueError, IndexError):
        return None                                 # not ours to judge: OpenSSL took it


def _der_item(der: bytes, offset: int) -> tuple[int, int, int]:
    """``(tag, start, end)`` of the DER element at ``offset``: its contents are der[start:end]."""
    tag, length = der[offset], der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    return tag, start, start + length


def expiry_problem(path: str, now: datetime.datetime | None = None) -> str | None:
    """A warning if the certificate in ``path`` has expired or expires within 14 days."""
    expires = certificate_expiry(path)
    if expires is None:
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if expires <= now:
        return (f"TLS certificate {path} expired on {when}: clients that check it "
                f"refuse to connect; renew it and send HUP")
    if expires - now <= EXPIRY_WARNING:
        days = (expires - now) / datetime.timedelta(days=1)
        return (f"TLS certificate {path} expires on {when}, in {days:.1f} days: "
                f"renew it and send HUP")
    return None


def _reason(e: BaseException) -> str:
    """A short human reason from an ``ssl.SSLError`` or ``OSError``."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return e.verify_message
    reason = getattr(e, "reason", None)
    if reason:
        return reason.lower().replace("_", " ")
    return getattr(e, "strerror", None) or str(e)


def subject_string(cert: dict | None) -> str | None:
    """A peer certificate's subject in RFC 4514 order and escaping, or None."""
    if not cert or not cert.get("subject"):
        return None
    parts = []
    for rdn in reversed(cert["subject"]):
        parts.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}"
                              for name, value in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    # Non-printable characters as \XX per UTF-8 byte (RFC 4514 allows it): a
    # newline in a client's CN must not reach log lines and the control
    # protocol as a line of its own.
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c if c.isprintable()
                      else "".join(f"\\{b:02X}" for b in c.encode("utf-8", "replace"))
                      for c in value)
    if escaped[:1] in ("#", " "):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def _host(peer: Any) -> str:
    """The address of a TCP peer, as a summary counts it."""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class TLSServer:
    """The TLS settings of one run: the current context, handshakes, counts."""

    def __init__(self, cert: str, key: str | None, ca: str | None,
                 handshake_timeout: float) -> None:
        self.cert, self.key, self.ca = cert, key, ca
        self.handshake_timeout = handshake_timeout
        self.context = make_context(cert, key, ca)
        self.loop: Loop | None = None
        self.warns_of_expiry = False    # the edge decides: under --workers, worker 1 only
        self.handshakes = 0             # completed
        self.failures = 0               # failed or timed out
        # A scanner or a plain-text client fails one handshake after another:
        # the first is logged, the rest summarised.
        self.failure_log: BurstLog | None = None

    def attach(self, loop: Loop) -> None:
        """Serve the listeners of ``loop`` (the edge's set-up)."""
        self.loop = loop
        self.failure_log = BurstLog(
            loop.core, first="TLS handshake with {who} failed: {reason}",
            summary="{count} failed {when}", noun="TLS handshake", later="failures")

    def close(self) -> None:
        """At exit: the failures the last summary has not told yet."""
        if self.failure_log is not None:
            self.failure_log.close()

    def reload(self) -> str | None:
        """Load the certificate files again (HUP); keep the old ones on failure.

        Returns why they were refused, or None.
        """
        try:
            self.context = make_context(self.cert, self.key, self.ca)
        except TLSSetupError as e:
            log.error("TLS reload failed, still using the previous certificate: %s", e)
            return f"TLS certificate refused, the previous one still serves: {e}"
        log.info("reloaded TLS certificate %s", self.cert)
        if self.warns_of_expiry:
            self.check_expiry()
        return None

    def unreloadable(self) -> str | None:
        """Why a HUP could not read the files again (after ``--user``), if so."""
        for what, path in _files(self.cert, self.key, self.ca):
            if not os.access(path, os.R_OK):
                return (f"TLS {what} {path} is not readable by user {user_name()}, which "
                        f"mpxd runs as now: a HUP cannot load a renewed certificate; make "
                        f"it readable by that user or group (e.g. chgrp ssl-cert KEY; "
                        f"chmod 640 KEY; mpxd --group ssl-cert), or restart mpxd to renew")
        return None

    def check_expiry(self) -> None:
        """Warn if the certificate in use has expired or soon will (at start, HUP, daily)."""
        problem = expiry_problem(self.cert)
        if problem is not None:
            log.warning("%s", problem)

    def handshake(self, fd: int, peer: Any,
                  done: Callable[[int, Any, TLSChannel], Any]) -> Handshake:
        """Start the server side of a handshake on accepted ``fd``."""
        assert self.loop is not None, "TLSServer.attach is called by the edge set-up"
        return Handshake(self, self.loop, fd, peer, done)


class Handshake:
    """One connection between accept and its session: the TLS handshake.

    ``_finished`` is true once the connection is gone (so per-address
    limits can count handshakes in progress as connections).
    """

    def __init__(self, server: TLSServer, loop: Loop, fd: int, peer: Any,
                 done: Callable[[int, Any, TLSChannel], Any]) -> None:
        self.server = server
        self.loop = loop
        self.fd = fd
        self.peer = peer
        self.done = done
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = server.context.wrap_bio(self.incoming, self.outgoing,
                                              server_side=True)
        self.unsent = b""
        self.mask = IN
        self.complete = False
        self.closed = False
        self.session: Session | None = None
        self.timer = loop.core.call_later(server.handshake_timeout, self._expired)
        loop.watch(fd, IN, self._ready)
        loop.admission_started()        # counts toward --max-connections

    @property
    def _finished(self) -> bool:
        if self.session is not None:
            return self.session._finished
        return self.closed

    def _ready(self, mask: int) -> None:
        if mask & OUT and not self._send():
            return
        if self.complete:
            if not self.unsent:
                self._open()
            return
        if mask & ~OUT:                 # readable, or an error/hang-up to read
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._fail(e.strerror or str(e), quiet=e.errno in (errno.ECONNRESET,))
                return
            if not data:
                self._fail("connection closed by the client", quiet=True)
                return
            self.incoming.write(data)
        self._step()

    def _step(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send()
            return
        except ssl.SSLError as e:
            self._send()                # the alert, so the client learns why
            self._fail(_reason(e))
            return
        self.complete = True
        if self._send():
            self._open()

    def _send(self) -> bool:
        """Write pending handshake bytes; False if some must wait for POLLOUT."""
        data = self.unsent + self.outgoing.read()
        if data:
            try:
                written = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError as e:
                self._fail(e.strerror or str(e), quiet=True)
                return False
            data = data[written:]
        self.unsent = data
        if self.closed:
            return False
        mask = IN | OUT if data else IN
        if mask != self.mask:
            self.mask = mask
            self.loop.rewatch(self.fd, mask)
        return not data

    def _open(self) -> None:
        """Handshake done and flushed: the connection becomes a session."""
        self.timer.cancel()
        self.loop.unwatch(self.fd)
        self.loop.admission_ended()
        if self.loop.draining:
            self._close()
            return
        self.server.handshakes += 1
        channel = TLSChannel(self.sslobj, self.incoming, self.outgoing)
        self.session = self.done(self.fd, self.peer, channel)

    def _expired(self) -> None:
        if self.session is None and not self.closed:
            self._fail(f"timed out after {self.server.handshake_timeout:g}s")

    def _fail(self, reason: str, quiet: bool = False) -> None:
        if self.closed:
            return
        self.server.failures += 1
        if quiet:
            log.debug("TLS handshake with %s failed: %s", format_peer(self.peer), reason)
        else:
            assert self.server.failure_log is not None, "set with the loop, by attach"
            self.server.failure_log.event(format_peer(self.peer), _host(self.peer), reason)
        self.timer.cancel()
        self.loop.unwatch(self.fd)
        self.loop.admission_ended()
        self._close()

    def _close(self) -> None:
        self.closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass


class TLSChannel:
    """A TLS session's framer (ciphertext in, lines out) and writer (``os.write`` with TLS).

    ``attach`` wraps the session's plain ``LineFramer``.  Ciphertext that
    cannot be written at once waits in ``unsent``; the loop is told nothing
    of it was written (0) until it is out, and then the whole plaintext
    chunk it encrypted counts as written, so the loop retries with the same
    buffer and never loses or repeats data.
    """

    __slots__ = ("sslobj", "incoming", "outgoing", "subject", "session", "inner",
                 "unsent", "unsent_plain", "notified", "written")

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.sslobj = sslobj
        self.incoming = incoming
        self.outgoing = outgoing
        self.subject = subject_string(sslobj.getpeercert())
        self.session: Session | None = None
        self.inner: Any = None
        self.unsent = b""
        self.unsent_plain = 0
        self.notified = False           # close_notify sent
        self.written = 0                # ciphertext bytes handed to the socket

    def attach(self, s: Session) -> None:
        """Become ``s``'s framer and writer (then ``start``, once the rest is set up)."""
        self.session = s
        self.inner = s._framer
        s._framer = self
        s._write = self.write
        s._tls = self

    def start(self) -> None:
        """Hand on the data that came with the handshake's last message.

        After the session's other wrappers (``--max-rate``) are in place:
        lines a client sent along with its Finished went past the rate.
        """
        s = self.session
        if self.incoming.pending and not s._closing:
            s._core.data_received(s, b"")

    # --------------------------------------------------------- framer face

    @property
    def overflow(self) -> bool:
        return self.inner.overflow

    def feed(self, data: bytes) -> list[str]:
        """Ciphertext read from the socket; returns the complete lines it finishes."""
        if data:
            self.incoming.write(data)
        plain = self._decrypt()
        s = self.session
        s._bytes_in += len(plain) - len(data)     # count plaintext, as plain sessions do
        if not plain or s._closing:
            return []
        return self.inner.feed(plain)

    def finish(self) -> list[str]:
        """The client closed its side (TCP EOF): the unterminated last line, if any.

        Every complete record was decrypted as it came; the EOF itself is
        not fed to OpenSSL, which would answer a missing close_notify with
        a fatal alert and refuse to encrypt the answers still to be sent.
        """
        return self.inner.finish()

    def _decrypt(self) -> bytes:
        chunks = []
        sslobj = self.sslobj
        while True:
            try:
                chunk = sslobj.read(RECORD_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLEOFError:
                break                   # EOF without close_notify: an ordinary EOF here
            except ssl.SSLError as e:
                self._broken(e)
                break
            if not chunk:               # close_notify: the client will send no more
                self._client_done()
                break
            chunks.append(chunk)
        if self.outgoing.pending:       # e.g. a KeyUpdate answer or an alert
            self._send_control()
        return b"".join(chunks)

    def _client_done(self) -> None:
        s = self.session
        if not s._eof and not s._closing:
            # Not from inside data_received: the lines of this read come first.
            s._core.call_later(0, self._deliver_eof)

    def _deliver_eof(self) -> None:
        s = self.session
        if s._throttled and not s._closing and not s._finished:
            # Lines --max-rate holds back come first, at their rate: a plain
            # client's EOF waits in the socket meanwhile, as mpxd reads none.
            s._core.call_later(EOF_RETRY, self._deliver_eof)
            return
        if not s._eof and not s._closing and not s._finished:
            s._core.eof_received(s)

    def _broken(self, e: ssl.SSLError) -> None:
        s = self.session
        log.info("session %d: TLS error: %s; closing it", s.id, _reason(e))
        s._core.abort(s, "tls error")

    def _send_control(self) -> None:
        """Write TLS records made while reading; they queue behind ``unsent``."""
        data = self.outgoing.read()
        if not self.unsent:
            try:
                data = data[self._send(self.session._fd, data):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return                  # the next read or write reports it
        self.unsent += data

    # ---------------------------------------------------------- writer face

    def write(self, fd: int, data: Any) -> int:
        """``os.write`` for this session: encrypt and send; returns plaintext bytes done."""
        if self.unsent:
            written = self._send(fd, self.unsent)    # BlockingIOError: the loop retries
            self.unsent = self.unsent[written:]
            if self.unsent:
                return 0
            done, self.unsent_plain = self.unsent_plain, 0
            if done:
                return done
        chunk = memoryview(data)[:WRITE_CHUNK]
        try:
            self.sslobj.write(chunk)
            s = self.session
            if s._closing and s._out is None and len(chunk) == len(data):
                self._close_notify()            # the last bytes this session sends
        except ssl.SSLError as e:
            raise ConnectionAbortedError(errno.ECONNABORTED, f"TLS: {_reason(e)}") from None
        cipher = self.outgoing.read()
        try:
            written = self._send(fd, cipher)
        except (BlockingIOError, InterruptedError):
            written = 0
        if written < len(cipher):
            self.unsent = cipher[written:]
            self.unsent_plain = len(chunk)
            return 0
        return len(chunk)

    def _send(self, fd: int, cipher: Any) -> int:
        written = os.write(fd, cipher)
        self.written += written
        return written

    def _close_notify(self) -> None:
        self.notified = True
        try:
            self.sslobj.unwrap()
        except ssl.SSLError:
            pass                        # sent; the client's own close_notify is not awaited

    def goodbye(self, fd: int) -> None:
        """Send close_notify as the connection closes, unless the last write did.

        A session closed with nothing left to write (idle timeout, EOF)
        ended with a bare TCP close, which strict clients report as a
        truncation attack (``UNEXPECTED_EOF_WHILE_READING``).
        """
        if self.notified:
            return
        self._close_notify()
        try:                            # behind any record still queued
            self._send(fd, self.unsent + self.outgoing.read())
        except OSError:
            pass                        # best effort: the connection closes anyway
