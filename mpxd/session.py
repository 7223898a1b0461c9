"""The session object that handler scripts see, and the functions on it.

A ``Session`` is one accepted connection.  The public attributes are the ones
in SPEC section 2; everything starting with ``_`` belongs to the server core
(``mpxd.core``) and the I/O edge that drives it (``mpxd.loop`` or the test
kit's fake edge).  Sessions are slotted: ten thousand idle connections must
stay cheap.
"""

from __future__ import annotations

import reprlib
from os import write as _os_write
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - imported for type hints only
    from .core import Core
    from .framing import LineFramer

__all__ = ["Session", "send_response", "close_session", "response_problem", "short_repr"]


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
        "handle", "request", "response",
        # core bookkeeping (read-only to handlers as peer, id, closed, tls_peer)
        "_peer", "_id", "_closed", "_tls_peer", "_core", "_framer", "_batch", "_out", "_out_size", "_held",
        "_paused", "_eof", "_closing", "_abort", "_reason", "_finished",
        "_started", "_last_active", "_idle_out", "_idle_timeout", "_idle_timer",
        "_stall_timer",
        "_requests", "_bytes_in", "_bytes_out", "_jobs",
        # I/O edge bookkeeping
        "_fd", "_tls", "_wbuf", "_woff", "_mask", "_write", "_throttled",
    )

    def __init__(self, core: Core, session_id: int, peer: Any,
                 framer: LineFramer, now: float) -> None:
        self.handle: Any = None
        self.request: str = ""
        self.response: str = ""
        self._peer = peer
        self._id = session_id
        self._closed = False
        self._tls_peer: str | None = None
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
        self._last_active = now                # last input, or output taken (idle timeout)
        self._idle_out = 0                     # _bytes_out when the idle timer last looked
        self._idle_timeout: float | None = None
        self._idle_timer: Any = None
        self._stall_timer: Any = None          # a closing session's output not taken
        self._requests = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._jobs = 0                         # run_in_thread jobs not yet delivered
        self._fd = -1
        self._tls: Any = None                  # its mpxd.tls.TLSChannel, over TLS
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

    @property
    def tls_peer(self) -> str | None:
        return self._tls_peer

    @tls_peer.setter
    def tls_peer(self, value: Any) -> None:
        _read_only("tls_peer")

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
    Returns ``False`` (and sends nothing) when the session is already gone,
    or when this output closed it (``--max-output``).  ``TypeError`` for a
    ``s.response`` that is not a ``str``, ``UnicodeEncodeError`` for one UTF-8
    cannot encode; ``RuntimeError`` from another thread (see
    ``call_soon_threadsafe``).
    """
    try:
        core = s._core
    except AttributeError:
        raise _not_a_session("send_response", s) from None
    core.check_thread("send_response")
    text = s.response
    if not isinstance(text, str) or not text.isascii():
        problem = response_problem(text)
        if problem is not None:
            raise problem
    s.response = ""
    if s._closed:
        return False
    if text:
        return core.enqueue(s, text)
    return True


def response_problem(response: object) -> TypeError | UnicodeEncodeError | None:
    """Why ``response`` cannot be sent, or None: a handler's bug, to be logged as one.

    It must be a ``str``, and one that goes back into bytes:
    ``surrogateescape`` turns back every character that decoding a client's
    bytes makes, but a ``str`` can hold a lone surrogate that no UTF-8
    encoder takes (``json.loads('"\\ud800"')`` on a client's input, say).
    """
    if not isinstance(response, str):
        hint = " (decode bytes first, or build a str)" \
            if isinstance(response, (bytes, bytearray)) else ""
        return TypeError(f"s.response must be a str, not {type(response).__name__}: "
                         f"{short_repr(response)}{hint}")
    try:
        response.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        e.reason += " (a lone surrogate, from json.loads of a client's \\ud800, say)"
        return e.with_traceback(None)       # the handler's bug, not a line of mpxd
    return None


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80


def short_repr(value: object) -> str:
    """``repr(value)`` cut short, for a log line; never builds a huge one, never raises."""
    try:
        return _SHORT.repr(value)
    except Exception as e:  # noqa: BLE001 - a user's type may break anything
        return f"<{type(value).__name__} object whose repr raised {type(e).__name__}>"


def close_session(s: Session) -> None:
    """Stop processing input of ``s``; write what is queued, then close it.

    Lines already received but not yet handled are dropped.  ``handle_close``
    runs once the connection is closed.  ``RuntimeError`` from another thread.
    """
    try:
        core = s._core
    except AttributeError:
        raise _not_a_session("close_session", s) from None
    core.check_thread("close_session")
    core.request_close(s, "close_session")


def _not_a_session(what: str, value: object) -> TypeError:
    # send_response(find(nick)) after that user left passes None: mpxd's own
    # AttributeError ('NoneType' object has no attribute '_core') said
    # nothing of the call that was wrong.
    return TypeError(f"{what} needs a session, not {short_repr(value)}")
