"""The session object that handler scripts see, and the functions on it.

A ``Session`` is one accepted connection.  The public attributes are the ones
in SPEC section 2; everything starting with ``_`` belongs to the server core
(``mpxd.core``) and the I/O edge that drives it (``mpxd.loop`` or the test
kit's fake edge).  Sessions are slotted: ten thousand idle connections must
stay cheap.
"""

from __future__ import annotations

from os import write as _os_write
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - imported for type hints only
    from .core import Core
    from .framing import LineFramer

__all__ = ["Session", "send_response", "close_session", "not_a_str"]


class Session:
    """One client connection, as handed to ``handle_request`` and friends.

    Attributes handlers use:

    ``handle``    ``None`` at first; free for the handler's per-session state.
    ``request``   the current input line, terminator removed.
    ``response``  ``""`` when ``handle_request`` is called; sent on return.
    ``peer``      ``(host, port)`` of the client; on a unix socket
                  ``(pid, uid, gid)`` of the client process (``mpxd.unix.UnixPeer``).
    ``id``        a number unique within this run of the daemon.
    ``closed``    true once ``close_session`` was called or the peer left.
    ``tls_peer``  over TLS with ``--tls-ca``: the client certificate's subject
                  (RFC 4514, ``"CN=alice,O=Example"``); otherwise ``None``.
    """

    __slots__ = (
        "handle", "request", "response", "tls_peer",
        # core bookkeeping (read-only to handlers as peer, id and closed)
        "_peer", "_id", "_closed", "_core", "_framer", "_batch", "_out", "_out_size", "_held",
        "_paused", "_eof", "_closing", "_abort", "_reason", "_finished",
        "_started", "_last_input", "_idle_timeout", "_idle_timer",
        "_requests", "_bytes_in", "_bytes_out", "_jobs",
        # I/O edge bookkeeping
        "_fd", "_sock", "_wbuf", "_woff", "_mask", "_write", "_throttled",
    )

    def __init__(self, core: Core, session_id: int, peer: Any,
                 framer: LineFramer, now: float) -> None:
        self.handle: Any = None
        self.request: str = ""
        self.response: str = ""
        self._peer = peer
        self._id = session_id
        self._closed = False
        self.tls_peer: str | None = None
        self._core = core
        self._framer = framer
        self._batch: list[str] | None = None   # responses of the lines being handled
        self._out: list[bytes] | None = None   # encoded output not yet handed to the edge
        self._out_size = 0                     # bytes queued, in _out and in the edge
        self._held: list[str] | None = None    # lines read but held back (backpressure)
        self._paused = False                   # reading stopped until output drains
        self._eof = False                      # the peer sent EOF
        self._closing = False                  # close once output is written
        self._abort = False                    # close now, drop output
        self._reason = ""                      # why it ends: eof, reset, timeout, ...
        self._finished = False                 # handle_close has run
        self._started = now
        self._last_input = now
        self._idle_timeout: float | None = None
        self._idle_timer: Any = None
        self._requests = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._jobs = 0                         # run_in_thread jobs not yet delivered
        self._fd = -1
        self._sock: Any = None
        self._wbuf: bytes | None = None
        self._woff = 0
        self._mask = 0
        self._write = _os_write                # TLS sessions: their channel's writer
        self._throttled = False                # held back by --max-rate (mpxd.access)

    # The server's facts about the connection: a handler reads them, and a
    # handler that assigned one (s.closed = True to close, say) would
    # only mislead the server, so assigning raises.
    @property
    def peer(self) -> Any:
        return self._peer

    @peer.setter
    def peer(self, value: Any) -> None:
        _read_only("peer")

    @property
    def id(self) -> int:
        return self._id

    @id.setter
    def id(self, value: Any) -> None:
        _read_only("id")

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: Any) -> None:
        _read_only("closed", "; to close the session, call s.close() (close_session(s))")

    def send_response(self) -> bool:
        """Send what ``self.response`` holds now and empty it (see ``send_response``)."""
        return send_response(self)

    def close(self) -> None:
        """End this session once its queued output is written (see ``close_session``)."""
        close_session(self)

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Close this session after ``seconds`` without input; ``None`` turns it off."""
        self._core.set_idle_timeout(self, seconds)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Session {self.id} {self.peer!r} {state}>"


def _read_only(name: str, hint: str = "") -> None:
    raise AttributeError(f"s.{name} is set by mpxd and cannot be assigned{hint}; "
                         f"keep your own per-session state in s.handle")


def send_response(s: Session) -> bool:
    """Send what ``s.response`` holds now, then empty it.

    Callable at any time from the loop's thread: from this session's handler,
    from another session's handler (broadcast), from a timer.  Never blocks.
    Returns ``False`` (and sends nothing) when the session is already gone.
    ``RuntimeError`` from another thread (see ``call_soon_threadsafe``).
    """
    s._core.check_thread("send_response")
    text = s.response
    if not isinstance(text, str):
        raise TypeError(not_a_str(text))
    s.response = ""
    if s._closed:
        return False
    if text:
        s._core.enqueue(s, text)
    return True


def not_a_str(response: object) -> str:
    """What is wrong when a handler leaves ``s.response`` as something other than ``str``."""
    hint = " (decode bytes first, or build a str)" if isinstance(response, (bytes, bytearray)) else ""
    return (f"s.response must be a str, not {type(response).__name__}: "
            f"{response!r:.80}{hint}")


def close_session(s: Session) -> None:
    """Stop processing input of ``s``; write what is queued, then close it.

    Lines already received but not yet handled are dropped.  ``handle_close``
    runs once the connection is closed.  ``RuntimeError`` from another thread.
    """
    s._core.check_thread("close_session")
    s._core.request_close(s, "close_session")
