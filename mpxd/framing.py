"""Bytes to request lines: the pure framing layer, with no sockets and no loop.

The rules (SPEC section 3): input is split at LF, one CR directly before the
LF is removed, empty lines are requests, every other byte is data.  Bytes are
decoded as UTF-8 with ``surrogateescape`` so that any byte sequence survives a
round trip through ``str``.

Performance notes, because this runs for every read:

* A chunk is split once (``split`` on the decoded text), never once per line.
  LF (0x0A) never occurs inside a multi-byte UTF-8 sequence and
  ``surrogateescape`` escapes invalid bytes one by one, so decoding a block of
  complete lines and then splitting gives the same lines as splitting bytes
  first; ``tests/test_framing.py`` checks that property.
* The unfinished tail stays ``bytes`` (it may end inside a UTF-8 sequence) and
  is never longer than ``max_line``, so memory per connection is bounded.
* The length limit costs nothing while the buffered bytes cannot hold a line
  longer than the limit; otherwise it is checked with one ``rfind`` per
  ``max_line`` bytes.
"""

from __future__ import annotations

__all__ = ["LineFramer", "DEFAULT_MAX_LINE"]

DEFAULT_MAX_LINE = 64 * 1024


class LineFramer:
    """Split a byte stream into text lines, enforcing a maximum line length.

    ``feed(data)`` returns the complete lines found so far.  Once a line
    longer than ``max_line`` bytes (not counting its LF) is seen, ``overflow``
    becomes true, the lines before it are still returned, and every later
    ``feed`` returns nothing.
    """

    __slots__ = ("max_line", "tail", "overflow")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.tail = b""
        self.overflow = False

    def feed(self, data: bytes) -> list[str]:
        """Add received bytes; return the complete lines they finish."""
        if self.overflow:
            return []
        tail = self.tail
        if tail:
            if b"\n" not in data:      # the line goes on (one byte at a time, maybe)
                if len(tail) + len(data) > self.max_line:
                    self.overflow = True
                    self.tail = b""
                    return []
                # Grow in place: bytes + bytes would copy the whole line
                # again for every chunk, quadratic in the line's length.
                if type(tail) is bytes:
                    self.tail = tail = bytearray(tail)
                tail += data
                return []
            data = tail + data
        if len(data) > self.max_line:
            data = self._cut_at_overlong_line(data)
        if data[-1:] == b"\n":
            self.tail = b""
            text = data.decode("utf-8", "surrogateescape")
        else:
            end = data.rfind(b"\n")
            if end < 0:
                self.tail = data
                return []
            self.tail = data[end + 1:]
            text = data[: end + 1].decode("utf-8", "surrogateescape")
        lines = text.split("\n")
        lines.pop()  # the empty string after the final LF
        if "\r" in text:
            lines = [line[:-1] if line[-1:] == "\r" else line for line in lines]
        return lines

    def finish(self) -> list[str]:
        """The peer sent EOF: an unterminated final line is still a request."""
        tail, self.tail = self.tail, b""
        if self.overflow or not tail:
            return []
        line = tail.decode("utf-8", "surrogateescape")
        return [line]

    def _cut_at_overlong_line(self, data: bytes) -> bytes:
        """Return the part of ``data`` before the first overlong line.

        Sets ``overflow`` when there is such a line.  Each step looks for the
        last LF within ``max_line + 1`` bytes of the current line start, so a
        megabyte of input costs a handful of ``rfind`` calls.
        """
        limit = self.max_line
        start = 0
        size = len(data)
        while size - start > limit:
            newline = data.rfind(b"\n", start, start + limit + 1)
            if newline < 0:
                self.overflow = True
                self.tail = b""
                return data[:start]
            start = newline + 1
        return data
